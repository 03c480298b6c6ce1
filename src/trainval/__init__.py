"""trainval: the canonical PyTorch train / validate / best-checkpoint / test / predict loop.

The public names are imported on first use, so that ``trainval --help`` and config errors answer
without waiting for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "Trainer": "trainval.trainer",
    "seed_everything": "trainval.trainer",
    "Callback": "trainval.callbacks",
    "EarlyStopping": "trainval.callbacks",
    "ProgressBar": "trainval.callbacks",
    "TensorBoardLogger": "trainval.callbacks",
    "EMA": "trainval.ema",
    "TensorLoader": "trainval.data",
    "TrainvalError": "trainval.errors",
    "load_checkpoint": "trainval.checkpoint",
    "load_model_weights": "trainval.checkpoint",
    "save_checkpoint": "trainval.checkpoint",
    "load_model": "trainval.workflow",
    "find_runs": "trainval.runs",
    "RunSummary": "trainval.runs",
    "tune": "trainval.tuning",
}

__all__ = [
    "Trainer", "seed_everything", "Callback", "EarlyStopping", "ProgressBar", "TensorBoardLogger", "EMA",
    "TensorLoader", "TrainvalError", "load_checkpoint", "load_model_weights", "save_checkpoint",
    "load_model", "find_runs", "RunSummary", "tune",
    "__version__",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainval' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from trainval.callbacks import Callback, EarlyStopping, ProgressBar, TensorBoardLogger
    from trainval.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from trainval.data import TensorLoader
    from trainval.ema import EMA
    from trainval.errors import TrainvalError
    from trainval.runs import RunSummary, find_runs
    from trainval.trainer import Trainer, seed_everything
    from trainval.tuning import tune
    from trainval.workflow import load_model
