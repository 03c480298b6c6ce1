"""trainval: the canonical PyTorch train / validate / best-checkpoint / test / predict loop."""

__version__ = "0.1.0"

from trainval.callbacks import Callback, EarlyStopping, ProgressBar, TensorBoardLogger  # noqa: E402
from trainval.checkpoint import load_checkpoint, load_model_weights, save_checkpoint  # noqa: E402
from trainval.data import TensorLoader  # noqa: E402
from trainval.errors import TrainvalError  # noqa: E402
from trainval.trainer import Trainer, seed_everything  # noqa: E402

__all__ = [
    "Trainer", "Callback", "EarlyStopping", "ProgressBar", "TensorBoardLogger", "TensorLoader",
    "TrainvalError", "load_checkpoint", "load_model_weights", "save_checkpoint", "seed_everything",
    "__version__",
]
