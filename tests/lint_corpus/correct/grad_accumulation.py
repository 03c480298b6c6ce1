"""Gradient accumulation every k steps, with a final partial step."""
import torch
from torch import nn


def train_epoch(model, loader, optimizer, accumulation_steps=4):
    model.train()
    criterion = nn.CrossEntropyLoss()
    optimizer.zero_grad()
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y) / accumulation_steps
        loss.backward()
        if (step + 1) % accumulation_steps == 0 or step + 1 == len(loader):
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=5.0)
            optimizer.step()
            optimizer.zero_grad()


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    total, correct = 0, 0
    for x, y in loader:
        correct += (model(x).argmax(dim=-1) == y).sum().item()
        total += y.numel()
    return correct / total


def fit(model, train_loader, val_loader, epochs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for epoch in range(epochs):
        train_epoch(model, train_loader, optimizer)
        print(epoch, evaluate(model, val_loader))
