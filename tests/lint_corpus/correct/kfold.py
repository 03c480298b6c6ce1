"""k-fold cross-validation with a fresh model and optimizer per fold."""
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset


def run_fold(make_model, train_set, val_set, epochs):
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=128)
    for _ in range(epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(val_set)


def cross_validate(make_model, dataset, k=5, epochs=10):
    n = len(dataset)
    folds = torch.randperm(n).chunk(k)
    scores = []
    for i in range(k):
        val_idx = folds[i].tolist()
        train_idx = torch.cat([f for j, f in enumerate(folds) if j != i]).tolist()
        scores.append(run_fold(make_model, Subset(dataset, train_idx), Subset(dataset, val_idx), epochs))
    return sum(scores) / k
