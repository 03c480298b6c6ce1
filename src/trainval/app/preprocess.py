"""Feature standardisation (``data.standardize``): fitted on the training split, kept in the run folder.

The statistics are saved as plain JSON (``standardize.json``: per-feature mean and standard deviation),
never as a pickle, so that a run folder from elsewhere cannot run code when it is loaded; ``test`` and
``predict`` apply the same statistics to new data.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from trainval.errors import ConfigError, DataError
from trainval.fsio import atomic_write
from trainval.loop.callbacks import Callback
from trainval.untrusted import read_bytes, shown

MAX_BYTES = 2**30  # two numbers per feature: even a large image's statistics are far below this

FILE = "standardize.json"


def fit_standardizer(X: np.ndarray) -> dict:
    """Per-feature mean and standard deviation of ``X`` (samples first); a constant feature keeps std 1."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 2 or len(X) == 0:
        raise DataError("data.standardize needs a non-empty training set of feature vectors or arrays.")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return {
        "shape": list(X.shape[1:]),
        "mean": mean.reshape(-1).tolist(),
        "std": std.reshape(-1).tolist(),
        "samples": int(len(X)),
    }


def apply(stats: dict, X: np.ndarray, what: str = "data") -> np.ndarray:
    """``(X - mean) / std`` in ``X``'s float dtype (float32 for integer features)."""
    X = np.asarray(X)
    shape = tuple(stats["shape"])
    if tuple(X.shape[1:]) != shape:
        raise DataError(
            f"the {what} has samples of shape {list(X.shape[1:])}; the run was standardised for {list(shape)}."
        )
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
    mean = np.asarray(stats["mean"], dtype=np.float64).reshape(shape)
    std = np.asarray(stats["std"], dtype=np.float64).reshape(shape)
    return ((X - mean) / std).astype(dtype)


class SaveStandardizer(Callback):
    """Writes ``standardize.json`` at the start of ``fit`` (rank 0), after the run folder was accepted."""

    def __init__(self, stats: dict):
        self.stats = stats

    def on_fit_start(self, trainer) -> None:
        if trainer.dist.is_main:
            save(trainer.out_dir, self.stats)


def save(folder: str, stats: dict) -> str:
    path = os.path.join(folder, FILE)
    data = (json.dumps(stats) + "\n").encode()
    atomic_write(path, lambda f: f.write(data), "standardisation statistics")
    return path


def load(folder: str) -> dict:
    """The statistics ``save`` wrote (a regular file of JSON), checked for their shape before any use."""
    path = os.path.join(folder, FILE)
    if not os.path.lexists(path):
        raise ConfigError(
            f"data.standardize is on but {shown(path)} does not exist (the run was trained without it, "
            "or the file was removed); use the run's own config."
        )
    raw = read_bytes(path, "the standardisation file", DataError, limit=MAX_BYTES)
    try:
        stats = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise DataError(f"cannot read {shown(path)}: {shown(e)}") from None
    if not (isinstance(stats, dict) and all(k in stats for k in ("shape", "mean", "std"))):
        raise DataError(f"{shown(path)} is not a standardisation file trainval wrote (shape, mean, std).")
    shape, size = stats["shape"], None
    if isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape):
        size = math.prod(shape)
    if size is None or not all(
        isinstance(stats[k], list)
        and len(stats[k]) == size
        and all(type(v) in (int, float) for v in stats[k])
        for k in ("mean", "std")
    ):
        raise DataError(
            f"{shown(path)}: 'mean' and 'std' must be lists of numbers, one per feature of 'shape' (a list "
            "of sizes); the file was not written by trainval or was changed. Train the run again."
        )
    return stats
