"""train() inside the epoch loop, inside a helper, or restored by the evaluation helper."""
import torch


def train_one_epoch(model, loader, opt, criterion):
    model.train()
    for x, y in loader:
        opt.zero_grad()
        criterion(model(x), y).backward()
        opt.step()


@torch.no_grad()
def evaluate(model, loader):
    model.eval()
    return [model(x) for x, _ in loader]


def fit_helpers(model, train_loader, val_loader, opt, criterion, epochs):
    for epoch in range(epochs):
        train_one_epoch(model, train_loader, opt, criterion)
        evaluate(model, val_loader)


@torch.no_grad()
def evaluate_restoring(model, loader):
    model.eval()
    out = [model(x) for x, _ in loader]
    model.train()
    return out


def fit_restoring(model, train_loader, val_loader, opt, criterion, epochs):
    model.train()
    for epoch in range(epochs):
        for x, y in train_loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
        evaluate_restoring(model, val_loader)


def fit_inline(model, train_loader, val_loader, opt, criterion, epochs):
    for epoch in range(epochs):
        model.train()
        for x, y in train_loader:
            opt.zero_grad()
            criterion(model(x), y).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, y in val_loader:
                model(x)
