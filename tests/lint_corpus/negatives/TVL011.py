"""Per-sample means, and len(loader) used for something else."""


def epoch_loss(model, loader, criterion):
    total, n = 0.0, 0
    for x, y in loader:
        total += criterion(model(x), y).item() * len(y)
        n += len(y)
    return total / n


def per_dataset(model, loader, criterion):
    total = sum(criterion(model(x), y).item() * len(y) for x, y in loader)
    return total / len(loader.dataset)


def steps(loader, epochs):
    return epochs * len(loader) / len(loader)
