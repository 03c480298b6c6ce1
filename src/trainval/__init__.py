"""trainval: the canonical PyTorch train / validate / best-checkpoint / test / predict loop.

The public names are imported on first use, so that ``trainval --help`` and config errors answer
without waiting for torch to import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_PUBLIC = {
    "Trainer": "trainval.loop.trainer",
    "seed_everything": "trainval.loop.trainer",
    "Callback": "trainval.loop.callbacks",
    "EarlyStopping": "trainval.loop.callbacks",
    "ProgressBar": "trainval.loop.callbacks",
    "TensorBoardLogger": "trainval.loop.callbacks",
    "EMA": "trainval.loop.ema",
    "TensorLoader": "trainval.data",
    "TrainvalError": "trainval.errors",
    "load_checkpoint": "trainval.checkpoint",
    "load_model_weights": "trainval.checkpoint",
    "save_checkpoint": "trainval.checkpoint",
    "load_model": "trainval.app.workflow",
    "find_runs": "trainval.app.runs",
    "RunSummary": "trainval.loop.summary",
    "tune": "trainval.app.tuning",
    "PruningCallback": "trainval.app.tuning",
    "MLflowLogger": "trainval.loop.trackers",
    "WandbLogger": "trainval.loop.trackers",
    "FSDPStrategy": "trainval.loop.strategies",
    "DDPStrategy": "trainval.loop.strategies",
}

__all__ = [
    "Trainer",
    "seed_everything",
    "Callback",
    "EarlyStopping",
    "ProgressBar",
    "TensorBoardLogger",
    "EMA",
    "TensorLoader",
    "TrainvalError",
    "load_checkpoint",
    "load_model_weights",
    "save_checkpoint",
    "load_model",
    "find_runs",
    "RunSummary",
    "tune",
    "PruningCallback",
    "MLflowLogger",
    "WandbLogger",
    "FSDPStrategy",
    "DDPStrategy",
    "__version__",
]


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainval' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from trainval.app.runs import find_runs
    from trainval.app.tuning import PruningCallback, tune
    from trainval.app.workflow import load_model
    from trainval.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
    from trainval.data import TensorLoader
    from trainval.errors import TrainvalError
    from trainval.loop.callbacks import Callback, EarlyStopping, ProgressBar, TensorBoardLogger
    from trainval.loop.ema import EMA
    from trainval.loop.strategies import DDPStrategy, FSDPStrategy
    from trainval.loop.summary import RunSummary
    from trainval.loop.trackers import MLflowLogger, WandbLogger
    from trainval.loop.trainer import Trainer, seed_everything
