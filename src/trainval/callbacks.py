"""Callbacks: a small regular grid of hooks that observe the loop and may set ``trainer.should_stop``.

Hooks, in the order the loop calls them::

    on_fit_start(trainer)
    for each epoch:
        on_epoch_start(trainer, epoch)
        for each training batch: on_train_batch_end(trainer, batch_index)
        on_epoch_end(trainer, row)        # row: the epoch's dict of metrics, as in trainer.history
    on_fit_end(trainer)

Callbacks that keep state across epochs implement ``state_dict``/``load_state_dict``; it travels in
``last.pt`` so that a resumed run continues exactly.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sys
import time
from typing import TYPE_CHECKING

from trainval.checkpoint import atomic_write

if TYPE_CHECKING:
    from trainval.trainer import Trainer


class Callback:
    """Base class: override the hooks you need; all of them do nothing by default."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_train_batch_end(self, trainer: Trainer, batch_index: int) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved for ``patience`` epochs.

    Its state is derived from the trainer's best epoch, which every checkpoint holds, so a resumed
    run stops exactly where an uninterrupted one would.
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if trainer.best_epoch is not None and row["epoch"] - trainer.best_epoch >= self.patience:
            trainer.log(f"early stopping: {trainer.monitor} has not improved for {self.patience} epochs "
                        f"(best {trainer.best_value:.4f} at epoch {trainer.best_epoch})")
            trainer.should_stop = True


class ProgressBar(Callback):
    """A tqdm bar on a terminal; elsewhere (CI, nohup, a log file) plain lines at a bounded rate.

    It reads the running loss at most ``refresh_s`` apart (a terminal) or ``line_s`` apart (plain lines):
    each read is one host sync, never one per batch.
    """

    def __init__(self, refresh_s: float = 0.25, line_s: float = 10.0, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.refresh_s, self.line_s = refresh_s, line_s
        self.bar = None
        self._next = 0.0
        self._total = 0
        self._epoch = 0

    @property
    def is_terminal(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self._total, self._epoch = len(trainer.train_loader), epoch
        self._next = time.monotonic() + (self.refresh_s if self.is_terminal else self.line_s)
        if self.is_terminal:
            from tqdm import tqdm

            self.bar = tqdm(total=self._total, initial=trainer.batch_in_epoch, file=self.stream, leave=False,
                            desc=f"epoch {epoch}/{trainer.max_epochs}", dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, batch_index: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        loss, acc, _ = trainer.train_metrics.compute(all_reduce=False)  # a sync point, rate-limited
        if self.bar is not None:
            self.bar.n = batch_index + 1
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", refresh=True)
            self._next = now + self.refresh_s
        else:
            self.stream.write(f"  epoch {self._epoch}/{trainer.max_epochs} batch {batch_index + 1}/{self._total} "
                              f"loss {loss:.4f} acc {acc:.4f}\n")
            self.stream.flush()
            self._next = now + self.line_s

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self.close()

    def on_fit_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def write_metrics_csv(path: str, history: list[dict]) -> None:
    """All epochs so far, rewritten atomically: a crash never leaves a half-written file."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_COLUMNS})
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data), "metrics file")


def plot_curves(path: str, history: list[dict]) -> None:
    """Loss and accuracy per epoch, train vs val, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((ax_loss, "loss", "Loss"), (ax_acc, "acc", "Accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], marker="o", ms=3, label="train")
        val = [r.get(f"val_{key}") for r in history]
        if any(v is not None and not math.isnan(v) for v in val):
            ax.plot(epochs, [math.nan if v is None else v for v in val], marker="o", ms=3, label="val")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), "plot")


class TensorBoardLogger(Callback):
    """Epoch scalars to TensorBoard (needs the ``tensorboard`` extra); rank 0 only."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from trainval.errors import ConfigError

            raise ConfigError("log.tensorboard=true needs TensorBoard: pip install 'trainval[tensorboard]'.") from None
        os.makedirs(self.log_dir, exist_ok=True)
        self.writer = SummaryWriter(self.log_dir)

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
