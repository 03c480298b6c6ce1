"""item() in evaluation, once per epoch, and in a non-training loop."""
import torch



def train(model, loader, opt, criterion, epochs):
    for epoch in range(epochs):
        total = 0
        for x, y in loader:
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach()
        print(total.item())


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    return [model(x).argmax(1).cpu() for x, _ in loader]


def to_numpy(batches):
    return [b.numpy() for b in batches]
