"""weights_only=True, a variable flag that is True, other libraries' weights_only."""
import torch


def restore(path):
    return torch.load(path, weights_only=True)


def restore_flag(path, safe=True):
    return torch.load(path, map_location="cpu", weights_only=safe)


def other(loader, path):
    return loader.load(path, weights_only=False)
