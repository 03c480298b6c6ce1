"""weights_only=True with or without map_location; other load functions."""
import json
import pickle  # noqa: F401

import numpy as np
import torch


def restore(model, path):
    model.load_state_dict(torch.load(path, weights_only=True))


def restore_cpu(model, path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])


def other_loads(path):
    return np.load(path), json.load(open(path))


def suppressed(path):
    return torch.load(path)  # noqa: TVL008
