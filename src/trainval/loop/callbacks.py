"""Callbacks: a small regular grid of hooks that observe the loop and may set ``trainer.should_stop``.

Hooks, in the order the loop calls them::

    on_fit_start(trainer)
    for each epoch:
        on_epoch_start(trainer, epoch)
        for each training batch:
            on_optimizer_step(trainer)    # right after each optimizer step (trainer.global_step counts it)
            on_train_batch_end(trainer, batch_index)
        on_validation_start(trainer)      # the weights that validation and best.pt/top-k files see
        (validation; best.pt and top-k files)   # (e.g. EMA swaps its averaged weights in here)
        on_validation_end(trainer)        # always called, also on an error: the training weights back
        on_epoch_end(trainer, row)        # row: the epoch's dict of metrics, as in trainer.history
    on_fit_end(trainer)

``on_epoch_end`` is called once per row, i.e. per evaluation: at each epoch's end by default; with
``Trainer(val_every_steps=K)`` every K optimizer steps (inside an epoch) and at the run's end instead
(``row["step"]`` says where; ``trainer.batch_in_epoch`` is 0 only at an epoch's end).

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
from typing import TYPE_CHECKING, TextIO

from trainval import extras, notebook
from trainval.errors import ConfigError
from trainval.fsio import atomic_write
from trainval.run import runfolder
from trainval.untrusted import shown

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm.std import tqdm

    from trainval.loop.trainer import Trainer


class Callback:
    """Base class: override the hooks you need; all of them do nothing by default."""

    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None: ...
    def on_optimizer_step(self, trainer: Trainer) -> None: ...
    def on_train_batch_end(self, trainer: Trainer, batch_index: int) -> None: ...
    def on_validation_start(self, trainer: Trainer) -> None: ...
    def on_validation_end(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, row: dict) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EarlyStopping(Callback):
    """Stop when the monitored metric has not improved for ``patience`` evaluations (rows): epochs, or
    with ``val_every_steps`` validations every that many steps.

    Its state is derived from the trainer's best row (its step, or its epoch), which every checkpoint
    holds with the history, so a resumed run stops exactly where an uninterrupted one would.
    """

    def __init__(self, patience: int):
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if trainer.best_epoch is None:
            return
        best_step = trainer.best_step
        if best_step is not None:  # the rows after the best one (every row has its step)
            waited = sum(
                1 for r in trainer.history if isinstance(r.get("step"), int) and r["step"] > best_step
            )
        else:  # a run resumed from a last.pt that recorded no best step: one row per epoch
            waited = row["epoch"] - trainer.best_epoch
        if waited >= self.patience:
            if trainer.options.val_every_steps:
                trainer.log(
                    f"early stopping: {trainer.monitor} has not improved for {self.patience} evaluations "
                    f"(best {trainer.best_value:.4f} at step {best_step})"
                )
            else:
                trainer.log(
                    f"early stopping: {trainer.monitor} has not improved for {self.patience} epochs "
                    f"(best {trainer.best_value:.4f} at epoch {trainer.best_epoch})"
                )
            trainer.should_stop = True


class ProgressBar(Callback):
    """A tqdm bar on a terminal or in a notebook; elsewhere (CI, nohup, a log file) plain lines at a bounded rate.

    It reads the running loss at most ``refresh_s`` apart (a terminal) or ``line_s`` apart (plain lines):
    each read is one host sync, never one per batch.
    """

    def __init__(self, refresh_s: float = 0.25, line_s: float = 10.0, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.refresh_s, self.line_s = refresh_s, line_s
        self.bar: tqdm | None = None
        self._next = 0.0
        self._total: int | None = 0
        self._epoch = 0

    @property
    def is_terminal(self) -> bool:
        """A bar, not lines: the stream is a terminal, or a Jupyter kernel shows the output (a widget)."""
        return (hasattr(self.stream, "isatty") and self.stream.isatty()) or notebook.in_kernel()

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.close()  # (with val_every_steps an epoch may end without a row)
        assert trainer.train_loader is not None  # fit builds it before the first epoch
        self._total, self._epoch = trainer.train_loader.num_batches, epoch  # None: a stream without len
        self._next = time.monotonic() + (self.refresh_s if self.is_terminal else self.line_s)
        if self.is_terminal:
            from tqdm.auto import tqdm  # a widget in a notebook (with ipywidgets), the text bar elsewhere

            self.bar = tqdm(
                total=self._total,
                initial=trainer.batch_in_epoch,
                file=self.stream,
                leave=False,
                desc=f"epoch {epoch}/{trainer.max_epochs}",
                dynamic_ncols=True,
            )

    def on_train_batch_end(self, trainer: Trainer, batch_index: int) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        assert trainer.train_metrics is not None  # fit builds them before the first batch
        values, _ = trainer.train_metrics.compute(all_reduce=False)  # a sync point, rate-limited
        shown = {"loss": values["loss"], **{k: v for k, v in values.items() if k != "loss"}}
        text = {k: f"{v:.4f}" for k, v in list(shown.items())[:4]}
        if self.bar is not None:
            self.bar.n = batch_index + 1
            self.bar.set_postfix(text, refresh=True)
            self._next = now + self.refresh_s
        else:
            metrics = " ".join(f"{k} {v}" for k, v in text.items())
            total = f"/{self._total}" if self._total else ""
            self.stream.write(
                f"  epoch {self._epoch}/{trainer.max_epochs} batch {batch_index + 1}{total} {metrics}\n"
            )
            self.stream.flush()
            self._next = now + self.line_s

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if trainer.batch_in_epoch == 0:  # a row inside the epoch (val_every_steps) keeps the bar
            self.close()

    def on_fit_end(self, trainer: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def metric_columns(history: list[dict]) -> list[str]:
    """Every key of every row, in first-seen order, with the learning rates (``lr``: param group 0,
    ``lr_<i>``: group i) and ``seconds`` last."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tail = [c for c in columns if _is_lr_column(c)] + (["seconds"] if "seconds" in columns else [])
    return [c for c in columns if c not in tail] + tail


def _is_lr_column(column: str) -> bool:
    return column == "lr" or (column.startswith("lr_") and column[3:].isdigit())


def write_metrics_csv(path: str, history: list[dict]) -> None:
    """All epochs so far, every column (a callback's own included), rewritten atomically."""
    columns = metric_columns(history)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    data = buf.getvalue().encode()
    atomic_write(path, lambda f: f.write(data), "metrics file")


def plot_curves(
    path: str,
    history: list[dict],
    monitor: str | None = None,
    best_epoch: int | None = None,
    x: str = "epoch",
) -> None:
    """One panel per metric (loss first), train vs val per row, the best row marked, and a panel of
    every param group's learning rate; one PNG, written atomically. ``x``: ``"epoch"`` or ``"step"`` (the
    rows' column on the x axis; ``best_epoch`` is then the best row's value of it)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names: list[str] = []
    for column in metric_columns(history):
        split, _, name = column.partition("_")
        if split in ("train", "val") and name and name not in names:
            names.append(name)
    names.sort(key=lambda n: n != "loss")
    lr_columns = [c for c in metric_columns(history) if _is_lr_column(c)]
    epochs = [r.get(x) for r in history]
    panels = len(names) + bool(lr_columns)
    cols = min(3, panels) or 1
    rows = math.ceil(panels / cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for split in ("train", "val"):
            values = [r.get(f"{split}_{name}") for r in history]
            if any(isinstance(v, (int, float)) and not math.isnan(v) for v in values):
                ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", ms=3, label=split)
        if best_epoch is not None:
            ax.axvline(
                best_epoch, color="grey", ls="--", lw=1, label=f"best ({monitor})" if monitor else "best"
            )
        ax.set_title("Loss" if name == "loss" else ("Accuracy" if name == "acc" else name))
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend()
    if lr_columns:
        ax = axes.flat[len(names)]
        for column in lr_columns:
            values = [r.get(column) for r in history]
            label = "group 0" if column == "lr" else f"group {column[3:]}"
            ax.plot(epochs, [math.nan if v is None else v for v in values], marker="o", ms=3, label=label)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label="best")
        if all(isinstance(rate := r.get(c), (int, float)) and rate > 0 for r in history for c in lr_columns):
            ax.set_yscale("log")
        ax.set_title(
            "Learning rate (at the epoch's start)" if x == "epoch" else "Learning rate (at the row's step)"
        )
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), "plot")


class Curves(Callback):
    """``curves.png`` at the end of ``fit``: each metric per epoch (per step with ``val_every_steps``), the
    best row marked. The Trainer adds it last, on rank 0, when ``plot`` is on. Without matplotlib (the
    ``plot`` extra) it says so in one line at fit start, and the fit goes on without the picture."""

    def __init__(self) -> None:
        self.drawing = True

    def on_fit_start(self, trainer: Trainer) -> None:
        self.drawing = extras.available("matplotlib")
        if not self.drawing:
            trainer.log(
                extras.missing_line("matplotlib", "curves.png")
                + " (or set log.plot=false); training without it"
            )

    def on_fit_end(self, trainer: Trainer) -> None:
        if not trainer.history or not self.drawing:
            return
        by_step = trainer.options.val_every_steps is not None  # x: the step of each row, else its epoch
        plot_curves(
            os.path.join(trainer.out_dir, "curves.png"),
            trainer.history,
            trainer.monitor,
            trainer.best_step if by_step else trainer.best_epoch,
            x="step" if by_step else "epoch",
        )


class TensorBoardLogger(Callback):
    """Epoch scalars to TensorBoard (needs the ``tensorboard`` extra); rank 0 only.

    Args:
        log_dir: where the event files go; default: the run folder's own ``tb`` folder (made if missing; a
            symbolic link or a file named ``tb`` there is refused: nothing is written out of the run folder).
    """

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.writer: SummaryWriter | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "log.tensorboard=true needs TensorBoard: pip install 'trainval[tensorboard]'."
            ) from None
        if self.log_dir is None:
            log_dir = runfolder.own_subfolder(
                trainer.out_dir, "tb", "cannot log to TensorBoard", "writes TensorBoard's event files"
            )
        else:  # the user's own choice of folder, anywhere
            log_dir = self.log_dir
            try:
                os.makedirs(log_dir, exist_ok=True)
            except OSError as e:
                raise ConfigError(
                    f"cannot log to TensorBoard in {shown(log_dir)}: {os.strerror(e.errno or 0)}; "
                    "give TensorBoardLogger another log_dir."
                ) from None
        self.writer = SummaryWriter(log_dir)

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.writer is None:
            return
        at = row["step"] if trainer.options.val_every_steps else row["epoch"]
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, at)
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
