import torch
from torch import load


def restore(model, path):
    model.load_state_dict(torch.load(path))  # expect: TVL008


def restore_cpu(model, path):
    state = torch.load(path, map_location="cpu")  # expect: TVL008
    model.load_state_dict(state["model"])


def restore_any(path):
    return load(path)  # expect: TVL008

