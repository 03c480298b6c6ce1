"""A language model with truncated backpropagation through time: hidden state detached per chunk."""
import torch
from torch import nn


def repackage(h):
    return tuple(v.detach() for v in h) if isinstance(h, tuple) else h.detach()


def train_epoch(model, data, optimizer, bptt=35, clip=0.25):
    model.train()
    criterion = nn.CrossEntropyLoss()
    hidden = model.init_hidden(data.size(1))
    total_loss = 0.0
    for i in range(0, data.size(0) - 1, bptt):
        inputs, targets = data[i : i + bptt], data[i + 1 : i + 1 + bptt]
        hidden = repackage(hidden)
        model.zero_grad()
        output, hidden = model(inputs, hidden)
        loss = criterion(output.view(-1, output.size(-1)), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        total_loss += len(inputs) * loss.item()
    return total_loss / (len(data) - 1)


def evaluate(model, data, bptt=35):
    model.eval()
    criterion = nn.CrossEntropyLoss()
    hidden = model.init_hidden(data.size(1))
    total = 0.0
    with torch.no_grad():
        for i in range(0, data.size(0) - 1, bptt):
            output, hidden = model(data[i : i + bptt], hidden)
            total += len(output) * criterion(output.view(-1, output.size(-1)), data[i + 1 : i + 1 + bptt].reshape(-1)).item()
    return total / (len(data) - 1)


def main(model, train_data, val_data, epochs):
    optimizer = torch.optim.SGD(model.parameters(), lr=20)
    for epoch in range(epochs):
        train_epoch(model, train_data, optimizer)
        print(epoch, evaluate(model, val_data))
