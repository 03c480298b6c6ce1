"""A user's own data factory and model class, imported by `module:name` strings in CLI tests."""

import torch
from torch import nn
from torch.utils.data import IterableDataset, TensorDataset


def blobs():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 3
    def split(n):
        y = torch.arange(n) % 3
        return TensorDataset(centers[y] + 0.5 * torch.randn(n, 5, generator=g), y)
    return {"train": split(90), "val": split(30), "test": split(30)}


def arrays():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 5, generator=g) * 3
    y = torch.arange(120) % 3
    X = centers[y] + 0.5 * torch.randn(120, 5, generator=g)
    return {"train": (X[:80], y[:80]), "val": (X[80:100], y[80:100]), "test": (X[100:], y[100:])}


class Stream(IterableDataset):
    """``(x, y)`` samples read in order, without a len(); ``dict_from``: later samples come as dicts."""

    def __init__(self, X, y, dict_from=None):
        self.X, self.y, self.dict_from = X, y, dict_from

    def __iter__(self):
        for i in range(len(self.y)):
            if self.dict_from is not None and i >= self.dict_from:
                yield {"x": self.X[i], "labels": self.y[i]}
            else:
                yield self.X[i], self.y[i]


def streams():
    return {name: Stream(*split.tensors) for name, split in blobs().items()}


def empty_streams():
    return {name: Stream(*(t[:0] for t in split.tensors)) for name, split in blobs().items()}


def mixed_streams():
    return {name: Stream(*split.tensors, dict_from=4) for name, split in blobs().items()}


def broken():
    raise RuntimeError("the database is down")


class TinyNet(nn.Module):
    def __init__(self, in_features, num_classes, width=8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
