import torch


def validate(model, loader, criterion):
    total = 0.0
    with torch.no_grad():
        for x, y in loader:
            out = model(x)  # expect: TVL004
            total += criterion(out, y).item()
    return total


@torch.no_grad()
def predict(net, xs):
    return [net(x).argmax(1) for x in xs]  # expect: TVL004


def fit(model, train_loader, val_loader, optimizer, criterion, epochs):
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            for x, y in val_loader:
                pred = model(x).argmax(1)  # expect: TVL004
