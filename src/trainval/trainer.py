"""The loop: fit / validate / test / predict, and the per-batch ``*_step`` methods, top to bottom.

``Trainer.fit`` is the canonical supervised loop of the notes, done correctly, for any task::

    for epoch in range(start, max_epochs):
        model.train(); callbacks.on_epoch_start()      # a callback may freeze modules here
        for inputs, target in train_loader:            # in-memory slicing, a DataLoader or a stream
            loss, output = train_step(inputs, target)  # model(x) / model(*x) / model(**x), then the loss
            loss.backward()                            # accumulating: loss * its share of the group's count,
                                                       # no_sync() on non-final accumulation steps
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
            metrics.update(loss, output, target)       # device tensors only: no host sync
        val = evaluate(val_loader)                     # eval mode + no_grad, modes restored after
        print("[003/020] Train Acc ... | Val Acc ...") # one all-reduce and one host read per epoch
        if val improved and weights are finite: save best.pt
        save last.pt                                   # both atomic; last.pt resumes exactly

``test`` and ``predict`` reload ``best.pt`` first. What a model's output and a target mean (class ids,
0/1, multi-hot rows, values) is the :mod:`~trainval.tasks` object's business; what is measured is the
:mod:`~trainval.metrics` set's; where batches come from is the :mod:`~trainval.data` loader's. Everything
a subclass may want to change per batch is in ``train_step``, ``eval_step`` and ``predict_step``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainval import distributed, runfolder, sharded
from trainval.callbacks import Callback, ProgressBar, plot_curves, write_metrics_csv
from trainval.checkpoint import (
    BackgroundWriter,
    atomic_write,
    load_checkpoint,
    model_weights,
    save_checkpoint,
    snapshot,
)
from trainval.data import Loader, Step, TensorLoader, describe, make_loader, tree_map
from trainval.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    NonFiniteLossError,
    RunFolderError,
    TrainvalError,
)
from trainval.metrics import MetricSet, confusion_metric, metric_direction, resolve_metrics
from trainval.runs import RunSummary, record_test
from trainval.state import LoopState, check_last, check_seed, rng_state, seed_everything, set_rng_state
from trainval.strategies import SingleProcess, make_strategy
from trainval.tasks import Task, check_loss, exact_weight_fn, loss_weight_fn, make_task, task_for_output
from trainval.untrusted import shown, shown_line, shown_repr

PRECISIONS = ("fp32", "bf16", "fp16")
_BATCHNORM = nn.modules.batchnorm._BatchNorm

__all__ = ["Trainer", "seed_everything"]


class Trainer:
    """Train, validate, keep the best checkpoint, reload it, test and predict.

    Args:
        model: a module; called ``model(x)``, ``model(*x)`` for a tuple ``x`` or ``model(**x)`` for a dict.
        optimizer: an optimizer over ``model``'s parameters (default: AdamW, lr 1e-3).
        loss_fn: a loss with mean reduction (default: the task's: cross-entropy, BCE-with-logits or MSE).
        task: ``"multiclass"``, ``"binary"``, ``"multilabel"`` or ``"regression"`` (see :mod:`trainval.tasks`);
            default: inferred from the loss (cross-entropy/NLL -> multiclass, BCE -> binary or multilabel by
            the output's width, MSE/L1/SmoothL1/Huber -> regression).
        metrics: metric names (see :mod:`trainval.metrics`), metric objects, or ``{name: metric}``; default
            per task: ``acc`` (multiclass, binary), ``f1_micro`` (multilabel), ``mse`` and ``mae`` (regression).
        max_epochs: epochs to train (a resumed run continues up to this number).
        out_dir: run folder for ``best.pt``, ``last.pt``, ``metrics.csv``, ``curves.png`` and ``summary.json``
            (see :class:`~trainval.runs.RunSummary`).
        seed: seeds the trainer's shuffling generator (the same on every process: one shared permutation)
            and, at the start of ``fit``, Python/NumPy/torch with ``seed + rank`` (each process draws its
            own dropout masks and DataLoader worker seeds).
        monitor: the metric that picks ``best.pt``: ``val_<metric>``, ``train_<metric>`` or ``*_loss``
            (default: ``val_`` + the first metric, ``train_`` without validation data); ``mode``
            (``"max"``/``"min"``) overrides the direction the metric implies.
        batch_size: samples per batch, per process; ``eval_batch_size`` for evaluation (default: same).
        ignore_index: targets with this value are left out of the loss's mean and every metric
            (multiclass; default: the loss's own ``ignore_index``, -100 for cross-entropy).
        threshold: probability above which binary/multilabel predictions are 1 (default 0.5).
        target_key: the target's key in dict batches (default ``"labels"``); ``output_key``: the prediction's
            key in dict model outputs (default ``"logits"``). A tuple output's first element is the prediction.
        eval_frozen_batchnorm: run BatchNorm layers whose parameters are all frozen in eval mode while
            training, so their running statistics stay as loaded (Keras' rule; default True).
        progress: show a progress bar (a terminal) or bounded-rate progress lines (otherwise), rank 0.
        callbacks: :class:`~trainval.callbacks.Callback` objects.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA if available (``LOCAL_RANK`` under torchrun).
        scheduler: a learning-rate scheduler; ``scheduler_interval`` ``"step"`` or ``"epoch"`` (default:
            per step for OneCycleLR/CyclicLR, per epoch otherwise; ReduceLROnPlateau gets the monitored value).
        grad_clip: clip the global gradient norm to this value (> 0).
        accumulate_steps: micro-batches per optimizer step (gradient accumulation), equal to one batch that
            many times larger: each micro-batch's mean loss is weighted by its share of the group's count
            (samples; non-ignored targets or their class weights for cross-entropy/NLL; elements for BCE,
            MSE, L1, SmoothL1, Huber) over the whole group and every rank, a short last group and a stream's
            included (the group is read ahead: up to this many batches held on the device). A ``loss_fn``
            of your own (not one of those) keeps the mean of the micro-batch means: its denominator is unknown.
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + grad scaler, CUDA).
        compile: run the model through ``torch.compile`` (checkpoints stay loadable into a plain model).
        checkpoint_every_steps: also write ``last.pt`` every this many optimizer steps inside an epoch.
        async_save: write ``last.pt`` in the background: its state is copied to CPU memory, then training goes
            on while a thread writes it (DCP's ``async_save`` for a sharded last.pt). At most one write is
            in flight; ``fit`` waits for it before the next one, at its end, on a stop and on errors, and
            a failed write raises :class:`~trainval.errors.CheckpointError` from ``fit``. ``best.pt`` is
            always written synchronously.
        check_inputs: refuse NaN/Inf in in-memory features before training.
        on_device: keep in-memory data wholly on the GPU (default: when it takes under 1/4 of free memory).
        num_workers: DataLoader workers for Datasets (map-style or streams) given without a DataLoader.
        overwrite: allow ``fit`` into an ``out_dir`` that already holds a run.
        plot: write ``curves.png`` at the end of ``fit``.
        config: a plain dict describing the run, saved in every checkpoint.
        strategy: ``"auto"`` (DDP on several processes), ``"ddp"``, ``"fsdp"`` (FSDP2: parameters, gradients
            and optimizer state sharded over the processes), or a :mod:`trainval.strategies` object
            (e.g. ``FSDPStrategy(param_dtype=torch.bfloat16, cpu_offload=True)``).
        sync_batchnorm: BatchNorm statistics over every process's batch (``SyncBatchNorm``; DDP on CUDA).
        dist_timeout: seconds a collective waits for the other processes before the run fails (default:
            the ``TRAINVAL_DIST_TIMEOUT`` environment variable, or 300).
    """

    # On one process the host checks the running loss for NaN/Inf at most this often (a sync point).
    poll_interval_s = 0.5

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: nn.Module | None = None,
        *,
        task: str | Task | None = None,
        metrics: Iterable | dict | None = None,
        max_epochs: int = 20,
        out_dir: str = "runs/exp",
        seed: int = 0,
        monitor: str | None = None,
        mode: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        ignore_index: int | None = None,
        threshold: float = 0.5,
        target_key: str = "labels",
        output_key: str = "logits",
        eval_frozen_batchnorm: bool = True,
        progress: bool = True,
        callbacks: Iterable[Callback] = (),
        device: str | torch.device | None = None,
        scheduler: Any = None,
        scheduler_interval: str | None = None,
        grad_clip: float | None = None,
        accumulate_steps: int = 1,
        precision: str = "fp32",
        compile: bool = False,
        checkpoint_every_steps: int | None = None,
        async_save: bool = False,
        check_inputs: bool = True,
        on_device: bool | None = None,
        num_workers: int = 0,
        overwrite: bool = False,
        plot: bool = True,
        config: dict | None = None,
        strategy: str | SingleProcess = "auto",
        sync_batchnorm: bool = False,
        dist_timeout: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if monitor is not None and not re.fullmatch(r"(train|val)_\w+", str(monitor)):
            raise ConfigError(f"monitor must be 'val_<metric>', 'train_<metric>', 'val_loss' or 'train_loss', "
                              f"got {monitor!r}.")
        if mode not in (None, "max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}.")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("accumulate_steps", accumulate_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ConfigError(f"eval_batch_size must be a positive integer, got {eval_batch_size!r}.")
        seed = check_seed(seed)  # a plain int in the range every generator takes
        if scheduler_interval not in (None, "step", "epoch"):
            raise ConfigError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}.")
        if grad_clip is not None and not (isinstance(grad_clip, (int, float)) and math.isfinite(grad_clip) and grad_clip > 0):
            raise ConfigError(f"grad_clip must be a positive number (the largest gradient norm allowed), got {grad_clip!r}.")
        try:
            self.device: torch.device = torch.device(device) if device is not None else distributed.default_device()
        except (RuntimeError, TypeError):
            raise ConfigError(f"device {device!r} is not a device torch knows; use 'cpu', 'cuda' or 'cuda:N'.") from None

        self.model = model
        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-3)
        if loss_fn is not None:
            check_loss(loss_fn)
        self._check_optimizer_and_scheduler(loss_fn, scheduler, default_optimizer=optimizer is None)
        # The task may wait for the model's output width (a BCE loss: binary or multilabel), and the
        # default loss for the task: both are settled in the first pre-flight check.
        self.task: Task | None = make_task(task, loss_fn, ignore_index=ignore_index, threshold=threshold)
        self.loss_fn = loss_fn  # None: the task's default, chosen once the output's width is known
        self._task_args = (ignore_index, threshold)
        self._metrics_spec = metrics
        # {name: metric}; settled with the task (now, or in the first pre-flight check for a BCE loss)
        self.metrics: dict[str, Any] = resolve_metrics(metrics, self.task) if self.task is not None else {}
        self.max_epochs, self.out_dir, self.seed = max_epochs, str(out_dir), seed
        self._monitor_arg, self._mode_arg = monitor, mode
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.target_key, self.output_key = target_key, output_key
        self.eval_frozen_batchnorm = eval_frozen_batchnorm
        self.progress = progress
        self.callbacks = list(callbacks)
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval or self._default_interval(scheduler)
        self.grad_clip, self.accumulate_steps, self.precision = grad_clip, accumulate_steps, precision
        self.compile, self.checkpoint_every_steps = compile, checkpoint_every_steps
        self.async_save = bool(async_save)
        self.check_inputs, self.on_device, self.num_workers = check_inputs, on_device, num_workers
        self.overwrite, self.plot, self.config = overwrite, plot, config
        make_strategy(strategy, distributed_on=False)  # a wrong name fails here, before any process group
        self._strategy_arg, self.sync_batchnorm = strategy, sync_batchnorm
        if dist_timeout is not None and not (isinstance(dist_timeout, (int, float)) and dist_timeout > 0):
            raise ConfigError(f"dist_timeout must be a positive number of seconds, got {dist_timeout!r}.")
        self.dist_timeout = dist_timeout
        self.strategy: SingleProcess = SingleProcess()  # settled in _setup, once the process count is known

        self.dist = distributed.DistInfo()
        self._requested_device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.scaler = None
        self._train_model: nn.Module = model
        self._eval_model: nn.Module = model
        self._set_up = False

        self.state = LoopState(monitor=monitor or "", mode=mode or "max")  # saved in last.pt
        self.train_loader: Loader | None = None
        self.val_loader: Loader | None = None
        self.train_metrics: MetricSet | None = None
        self._val_metrics: MetricSet | None = None
        self._pending_rng: dict | None = None
        self._stop_signal: int | None = None
        self._bar: ProgressBar | None = None
        self._writes = BackgroundWriter()  # last.pt writes: at most one in flight (async_save)
        self._save_group: Any = None  # the process group of background sharded saves, made on first use

    # ------------------------------------------------------------------------------------------
    # The loop state, as attributes (callbacks read these, and may set should_stop)

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def batch_in_epoch(self) -> int:
        return self.state.batch_in_epoch

    @property
    def global_step(self) -> int:
        return self.state.global_step

    @property
    def history(self) -> list[dict]:
        return self.state.history

    @property
    def best_value(self) -> float | None:
        return self.state.best_value

    @property
    def best_epoch(self) -> int | None:
        return self.state.best_epoch

    @property
    def monitor(self) -> str:
        return self.state.monitor

    @property
    def mode(self) -> str:
        return self.state.mode

    @property
    def should_stop(self) -> bool:
        return self.state.should_stop

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        self.state.should_stop = bool(value)

    # ------------------------------------------------------------------------------------------
    # Paths and reporting

    @property
    def best_path(self) -> str:
        return os.path.join(self.out_dir, "best.pt")

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, "last.pt")

    def log(self, message: str) -> None:
        """The one reporting path: rank 0 prints; beside a live progress bar, above it."""
        # Before fit joins the process group, self.dist is every rank's default (rank 0): RANK decides.
        if not (self.dist.is_main and runfolder.is_main_process()):
            return
        message = shown_line(message)  # it may quote a file's text (a column, a path): no terminal escapes
        if self._bar is not None and self._bar.bar is not None:
            self._bar.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    # Public entry points

    @runfolder.holds_run_folder  # one writer per run folder, released on any exit
    def fit(self, train_data: Any, val_data: Any = None, *, resume: bool = False) -> list[dict]:
        """Train for ``max_epochs``, validating after each epoch; return the per-epoch history.

        Args:
            train_data: a ``DataLoader``, a map-style ``Dataset``, an ``IterableDataset`` (a stream: an epoch
                is one pass over it, each rank reading its own share; see :class:`~trainval.data.StreamLoader`),
                or in-memory ``(X, y)`` (``X`` a tensor/array, a tuple or a dict of them).
            val_data: the same kinds, or ``None`` (then ``monitor`` must be a train metric).
            resume: continue from ``out_dir/last.pt`` exactly where it stopped (mid-epoch too).
        """
        self._setup()
        if val_data is None and (self._monitor_arg or "").startswith("val_"):
            raise ConfigError(f"monitor={self._monitor_arg!r} needs validation data: pass val_data, "
                              "or monitor a train metric (e.g. 'train_loss').")
        self.train_loader = self._make_loader(train_data, train=True, name="train")
        self.val_loader = self._make_loader(val_data, train=False, name="val") if val_data is not None else None
        self._preflight(self.train_loader, "train", labelled=True)
        if self.val_loader is not None:
            self._preflight(self.val_loader, "val", labelled=True)
        self._choose_monitor(has_val=self.val_loader is not None)
        self.train_metrics = self._metric_set(self.train_loader.num_batches or 64)  # (a stream's may be unknown)
        self._val_metrics = self._metric_set((self.val_loader.num_batches or 64) if self.val_loader is not None else 1)

        if not resume and distributed.elastic_restart_count() > 0:
            # torchrun restarted the workers after a failure: continue from last.pt (rank 0's view decides)
            resume = distributed.broadcast_object(os.path.exists(self.last_path))
        last = self._prepare_run_folder(resume)
        if last is not None:
            self._restore(last)
            self.log(f"resuming from {self.last_path} (epoch {self.epoch}, batch {self.batch_in_epoch})")
            if self.dist.is_main and self.history:  # a row a crash cut from metrics.csv comes back
                write_metrics_csv(os.path.join(self.out_dir, "metrics.csv"), self.history)
        else:
            seed_everything(self.seed + self.dist.rank)  # model randomness (dropout, workers): per rank
            self.generator.manual_seed(self.seed)  # the shuffling permutation: shared by every rank

        modes = _module_modes(self.model)
        try:
            with self._signal_handlers():
                self._bar = ProgressBar() if (self.progress and self.dist.is_main) else None
                # summary.json last: it records the columns the user's callbacks add to a row
                callbacks = ([self._bar] if self._bar else []) + self.callbacks + ([RunSummary()] if self.dist.is_main else [])
                for cb in callbacks:
                    cb.on_fit_start(self)
                while self.epoch < self.max_epochs and not self.should_stop:
                    self._run_epoch(callbacks)
                self._writes.wait()  # the last save is on disk before the run ends (its error raises here)
                for cb in callbacks:
                    cb.on_fit_end(self)
                if self.plot and self.dist.is_main and self.history:
                    plot_curves(os.path.join(self.out_dir, "curves.png"), self.history, self.monitor, self.best_epoch)
        except BaseException:
            self._wait_for_writes_quietly()  # no write left running behind the error; the first error wins
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
            _restore_module_modes(self.model, modes)
        distributed.barrier()
        return self.history

    def validate(self, val_data: Any, ckpt: str | None = None) -> dict:
        """``{"val_loss", "val_<metric>", ...}`` on ``val_data`` with the current weights (or ``ckpt``)."""
        return self._score(val_data, ckpt, "val")

    def test(self, test_data: Any, ckpt: str | None = "best") -> dict:
        """Reload ``best.pt`` (or ``ckpt``), then ``{"test_loss", "test_<metric>", ...}`` on ``test_data``.

        For a multiclass task the confusion matrix (rows: true class, columns: predicted) is also
        written to ``out_dir/confusion_matrix.csv`` when the run folder exists. The metrics of the run's
        own ``best``/``last`` checkpoint also go into its ``summary.json``.
        """
        metrics = self._score(test_data, ckpt, "test")
        if self.dist.is_main and ckpt in ("best", "last"):
            record_test(self.out_dir, metrics)
        return metrics

    def predict(self, inputs: Any, ckpt: str | None = "best") -> torch.Tensor:
        """Predictions from ``best.pt`` (or ``ckpt``), input order, on the CPU; targets are ignored.

        Class ids (multiclass: one per sample, or per position for dense outputs), 0/1 (binary),
        multi-hot rows (multilabel, ``threshold``), or the outputs (regression).
        """
        raw = self._predict_outputs(inputs, ckpt)
        return self.task.predict(raw)

    def predict_proba(self, inputs: Any, ckpt: str | None = "best") -> torch.Tensor:
        """Class probabilities: ``[N, C, *]`` (multiclass, softmax), ``[N]`` (binary, the positive class),
        ``[N, K]`` (multilabel, sigmoid); input order, on the CPU."""
        raw = self._predict_outputs(inputs, ckpt)
        return self.task.proba(raw)  # the regression task refuses, in one clear sentence

    # ------------------------------------------------------------------------------------------
    # Per-batch steps: override these in a subclass to change what one batch does

    def forward(self, model: nn.Module, inputs: Any) -> torch.Tensor:
        """``model(x)``, ``model(*x)`` or ``model(**x)``; the prediction out of a tuple or dict output."""
        if isinstance(inputs, torch.Tensor):
            out = model(inputs)
        elif isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, Mapping):
            if self.output_key in out:
                return out[self.output_key]
            raise DataError(f"the model returned a dict with keys {list(out)}; trainval takes the prediction from "
                            f"'{self.output_key}' (set output_key= to one of them).")
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise DataError(f"the model returned {describe(out)}; trainval needs a tensor, a tuple whose first "
                        f"element is the prediction, or a dict with it under '{self.output_key}'.")

    def train_step(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss for one training batch (training mode, autograd on): ``(loss, output)``."""
        with self._autocast():
            output = self.forward(self._train_model, x)
            loss = self.loss_fn(*self.task.loss_inputs(output, y))
        return loss, output

    def eval_step(self, x: Any, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss for one evaluation batch (eval mode, no autograd): ``(loss, output)``."""
        with self._autocast():
            output = self.forward(self._eval_model, x)
            loss = self.loss_fn(*self.task.loss_inputs(output, y))
        return loss, output

    def predict_step(self, x: Any) -> torch.Tensor:
        """The model's output for one batch of inputs (eval mode, no autograd)."""
        with self._autocast():
            return self.forward(self._eval_model, x)

    # ------------------------------------------------------------------------------------------
    # One epoch

    def _run_epoch(self, callbacks: list[Callback]) -> None:
        epoch = self.epoch + 1
        # a resumed epoch counts the seconds it had run before the interruption
        start = self.state.epoch_start
        done_before = start.get("seconds", 0.0) if (self.batch_in_epoch and start) else 0.0
        started = time.perf_counter() - done_before
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # before this epoch's scheduler steps
        self._train_model.train()
        for cb in callbacks:  # after train(): a callback may freeze modules or put some in eval mode
            cb.on_epoch_start(self, epoch)
        if self.eval_frozen_batchnorm:
            _eval_frozen_batchnorm(self.model)
        self._train_epoch(epoch, callbacks, started)
        train, _ = self.train_metrics.compute()  # a sync point: once per epoch
        row: dict[str, Any] = {"epoch": epoch, **{f"train_{k}": v for k, v in train.items()}}
        if self.val_loader is not None:
            val, count = self._evaluate(self.val_loader, self._val_metrics)
            self._check_count(count, self.val_loader, "validation")
            row.update({f"val_{k}": v for k, v in val.items()})
        row["lr"] = lrs[0]  # param group 0; lr_1, lr_2... for the others
        row.update({f"lr_{i}": lr for i, lr in enumerate(lrs[1:], start=1)})
        self._step_scheduler_per_epoch(row)
        self.state.epoch, self.state.batch_in_epoch, self.state.epoch_start = epoch, 0, None
        self.log(self._epoch_line(epoch, row))

        value = row[self.monitor]
        if self.state.improved(value):  # the weights are finite: checked at the end of _train_epoch
            self.state.best_value, self.state.best_epoch = value, epoch
            best = self._best_state()  # under FSDP a collective: every rank takes part, rank 0 writes
            if self.dist.is_main:
                save_checkpoint(best, self.best_path, "best checkpoint")
            self.log(f"saving best model ({self.monitor} {value:.4f}) -> {self.best_path}")
        row["seconds"] = round(time.perf_counter() - started, 4)
        self.history.append(row)
        for cb in callbacks:
            cb.on_epoch_end(self, row)  # may add columns to the row: metrics.csv and the plot show them
        if self.dist.enabled:  # every rank must agree, or the next collective hangs
            self.should_stop = bool(distributed.all_reduce_max(int(self.should_stop)))
        self._save_last(with_metrics=True)
        stop = self._stop_signal
        if self.dist.enabled:  # a signal may reach one rank an instant before the others: stop together
            stop = distributed.all_reduce_max(stop or 0) or None
        if stop is not None:
            self._stop_signal = stop
            self._interrupt(epoch, mid_epoch=False)

    def _epoch_line(self, epoch: int, row: dict) -> str:
        """``[003/020] Train Acc: ... Loss: ... | Val Acc: ... loss: ...`` (the notes' line, every metric)."""
        def part(split: str, loss_label: str) -> str:
            names = [n for n in self.metrics if isinstance(row.get(f"{split}_{n}"), float)]
            shown = " ".join(f"{'Acc' if n == 'acc' else n}: {row[f'{split}_{n}']:3.6f}" for n in names)
            return f"{shown} {loss_label}: {row[f'{split}_loss']:3.6f}".strip()

        line = f"[{epoch:03d}/{self.max_epochs:03d}] Train {part('train', 'Loss')}"
        if self.val_loader is not None:
            line += f" | Val {part('val', 'loss')}"
        return line

    def _train_epoch(self, epoch: int, callbacks: list[Callback], started: float) -> None:
        loader, opt, metrics, task = self.train_loader, self.optimizer, self.train_metrics, self.task
        weigh = loss_weight_fn(self.loss_fn, task)  # what each batch's mean loss was divided by
        loader.set_epoch(epoch - 1)  # a stream's own shuffling, like DistributedSampler.set_epoch (from 0)
        lockstep = self.dist.enabled  # a stream's shares may differ by a batch or more: count per step
        if self.batch_in_epoch > 0:
            # Mid-epoch resume: redraw this epoch's order from its start state, skip what was done
            # (a stream re-reads it), then continue with the RNG state saved at the interruption.
            start = self.state.epoch_start
            set_rng_state(start["rng"])
            self.generator.set_state(start["generator"])
            batches = loader.steps(self.batch_in_epoch, lockstep)
            set_rng_state(self._pending_rng)
        else:
            self.state.epoch_start = {"rng": rng_state(), "generator": self.generator.get_state()}
            batches = loader.steps(0, lockstep)
            metrics.reset(loader.num_batches or 64)
        self._pending_rng = None

        # A stream's length is learnt by reading it: with the mean of batch means (a loss of unknown
        # denominator) its last accumulation group is rescaled once it ends.
        steps, acc, world = (None if loader.is_stream else loader.num_batches), self.accumulate_steps, self.dist.world_size
        # Exact accumulation (a loss whose denominator is known): each batch's loss is weighted by its share
        # of the group's weight, read ahead; None: one process without accumulation, or the user's own loss.
        exact = self._exact_weighting(loader)
        if exact is not None:
            batches = self._weighted_steps(batches, self.batch_in_epoch, *exact)
        per_step_scheduler = self.scheduler if self.scheduler_interval == "step" else None
        batch_callbacks = [cb for cb in callbacks if type(cb).on_train_batch_end is not Callback.on_train_batch_end]
        every = self.checkpoint_every_steps
        next_poll = time.monotonic() + self.poll_interval_s
        in_group, stand_in = 0, None  # real batches (every rank's) in this accumulation group so far
        first = True  # the first batch's loss is checked (free: no host sync), after on_epoch_start's freezing
        for step in batches:
            step, scale, weight = step if exact is not None else (step, None, None)
            i, x, y = self.batch_in_epoch, step.x, step.y
            boundary = acc == 1 or (i + 1) % acc == 0 or step.last
            group = acc if steps is None else min(acc, steps - (i // acc) * acc)  # the last group may be short
            with self.strategy.no_sync(self._train_model, sync=boundary):
                if x is None:  # this rank's stream share ran out before the others'
                    stand_in = stand_in or self._stand_in(loader)
                    self._stand_in_step(*stand_in)
                else:
                    loss, output = self.train_step(x, y)
                    if first:
                        self._check_loss_value(loss, training=True)
                        first = False
                    if exact is not None:  # summed loss / the group's weight (times the ranks DDP/FSDP divide by)
                        self._backward(loss * (scale.to(loss.dtype) if isinstance(scale, torch.Tensor) else scale))
                    else:
                        self._backward(loss / group if acc > 1 else loss)  # mean of the group's batch means
            in_group += step.batches
            if boundary:
                if exact is None and in_group != world * group:  # a stream's last steps held fewer batches
                    self._scale_gradients(world * group / in_group)
                in_group = 0
                self._optimizer_step(opt)
                if per_step_scheduler is not None:
                    self._step_scheduler(per_step_scheduler)
                self.state.global_step += 1
            if x is not None:
                real = loader.unpadded(i, y.shape[0])
                if real < y.shape[0]:  # the padding that evens out the ranks' shards repeats samples: not counted
                    loss, output, y = self._unpadded_part(output, y, real)
                metrics.update(loss, weigh(y) if weight is None or real < step.y.shape[0] else weight,
                               task.outputs(output.detach(), y), real)
            self.state.batch_in_epoch = i + 1
            for cb in batch_callbacks:
                cb.on_train_batch_end(self, i)
            if not boundary:
                continue
            # Host reads are rate-limited: by time on one process, every 32 steps on several
            # (where all ranks must take the same decision at the same step).
            if self.dist.enabled:
                if self.global_step % 32 == 0:
                    self._poll_distributed(epoch, started, step)
            elif time.monotonic() >= next_poll:
                self._raise_if_nonfinite(epoch)  # a sync point, rate-limited by time
                next_poll = time.monotonic() + self.poll_interval_s
            if self._stop_signal is not None and not self.dist.enabled:
                self._interrupt(epoch, mid_epoch=not step.last, started=started)
            if every and self.global_step % every == 0 and not step.last:
                self._save_mid_epoch(epoch, started)
        self._raise_if_nonfinite(epoch)
        self._raise_if_weights_nonfinite(epoch)  # the last step's update, which no loss has seen yet

    def _exact_weighting(self, loader: Loader) -> tuple[Any, bool] | None:
        """``(weigh, across_ranks)`` when this epoch's batches are weighted exactly, else ``None``.

        ``None`` for a loss whose denominator trainval cannot know (the mean of micro-batch means, as
        documented), and where weighting changes nothing: one process without accumulation, or several
        whose batches weigh the same on every rank (a shape-only weight over in-memory data, whose padded
        shards give every rank batches of one size), where DDP's mean over ranks is exact already. A
        DataLoader's or a stream's batches (a collate may pad to each batch's longest sequence; a stream's
        last ones are short) and value-dependent weights (``ignore_index``, class weights) are all-reduced.
        """
        weigh, by_value = exact_weight_fn(self.loss_fn, self.task)
        if weigh is None:
            return None
        several = self.dist.world_size > 1
        across_ranks = several and (self.accumulate_steps > 1 or by_value or not isinstance(loader, TensorLoader))
        if self.accumulate_steps == 1 and not across_ranks:
            return None
        return weigh, across_ranks

    def _weighted_steps(self, steps: Iterator[Step], start: int, weigh: Any,
                        across_ranks: bool) -> Iterator[tuple[Step, Any, Any]]:
        """``(step, scale, weight)``: the epoch's steps, an accumulation group read ahead at a time.

        ``weight`` is what the batch's mean loss was divided by (:func:`~trainval.tasks.loss_weight_fn`);
        ``scale = weight * world / W`` with ``W`` the group's weight over all its batches and, with
        ``across_ranks``, all ranks (one all-reduce of one number per optimizer step, on the device: no
        host sync). Backpropagating ``loss * scale`` gives, after DDP/FSDP's mean over the ranks, the
        gradient of the group's summed loss over ``W``: the large batch's. A group is read whole before its
        first backward (at most ``accumulate_steps`` batches held on the device), so a short last group and
        a stream's, whose end is known only once read, need no rescaling; a rank whose stream share ran
        out weighs 0 there. Groups end where the loop's boundaries are, so a save at a boundary leaves no
        batch read ahead, and resume is exact.
        """
        acc, world, i = self.accumulate_steps, self.dist.world_size, start
        while True:
            group = []
            for step in steps:
                group.append(step)
                i += 1
                if i % acc == 0 or step.last:
                    break
            if not group:
                return
            weights = [0 if step.x is None else weigh(step.y) for step in group]
            total = sum(weights)  # a device tensor (ignore_index, class weights) or an int (shapes only)
            if across_ranks or isinstance(total, torch.Tensor):  # (ints alone: host arithmetic, no device op)
                dtype = torch.float32 if self.device.type == "mps" else torch.float64
                total = (total.to(dtype) if isinstance(total, torch.Tensor)
                         else torch.full((), float(total), dtype=dtype, device=self.device))
                if across_ranks:
                    total = distributed.all_reduce_sum(total)
            for step, weight in zip(group, weights):
                yield step, weight * world / total, weight

    def _step_scheduler(self, scheduler: Any) -> None:
        try:
            scheduler.step()
        except ValueError as e:  # OneCycleLR past its total_steps: too few planned steps (a stream's length?)
            if "total steps" not in str(e):
                raise
            raise ConfigError(
                f"the {type(scheduler).__name__} scheduler planned fewer optimizer steps than this run takes "
                f"(step {self.global_step + 1}, epoch {self.epoch + 1}): build it with total_steps (or "
                f"steps_per_epoch) of at least the run's optimizer steps; for a stream without a length, count "
                f"its batches per epoch (CLI: scheduler.steps_per_epoch). ({e})") from None

    def _stand_in(self, loader: Loader) -> tuple[Any, torch.Tensor | None]:
        """The stream's first samples on the device: what a rank whose share ran out computes on."""
        x, y = loader.sample_batch()
        x = tree_map(lambda t: t.to(self.device), x)
        return x, (None if y is None else self.task.cast_target(y.to(self.device)))

    def _stand_in_step(self, x: Any, y: torch.Tensor) -> None:
        """A training step without a batch of this rank's own: the forward and backward of a zero loss.

        The other ranks' gradient collectives (DDP's all-reduce, FSDP's gathers and reduce-scatters) need
        this rank's part; it adds zeros. Every module runs in eval mode (no BatchNorm statistics, no dropout
        draws from samples that were trained on already), so nothing is counted twice; the gradients are
        rescaled to the mean over the real batches at the optimizer step.
        """
        with self._evaluating(grad=True):
            loss, _ = self.train_step(x, y)
            self._backward(loss * 0.0)

    def _scale_gradients(self, factor: float) -> None:
        """Gradients times ``factor``: the mean over the step's real batches where some ranks had none
        (a stream's last steps; DDP and FSDP divide by the number of ranks). Once per epoch at most."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _save_mid_epoch(self, epoch: int, started: float) -> None:
        """last.pt inside an epoch: never from non-finite weights; with the seconds run so far."""
        self._raise_if_nonfinite(epoch)
        self._raise_if_weights_nonfinite(epoch)
        self.state.epoch_start["seconds"] = time.perf_counter() - started
        self._save_last()

    def _save_last(self, with_metrics: bool = False) -> None:
        """Write last.pt (and metrics.csv after it): whole from rank 0, or sharded by every rank.

        A sharded save (FSDP) writes each rank's shards into a fresh folder, then rank 0 points last.pt at
        it (see :mod:`trainval.sharded`). With ``async_save`` the state is copied now and written by a
        background thread; the previous write is waited for first (at most one in flight).
        """
        self._writes.wait()  # a failed background write raises here, before anything new is written
        state = self._state()  # a collective under FSDP and on several processes
        if self.strategy.sharded_checkpoint:
            if self.async_save and self._save_group is None:
                self._save_group = sharded.async_group()  # a collective, once: saves leave training's group alone
            shards = self.strategy.sharded_state_dict(self.model, self.optimizer)
            write = sharded.write(shards, state if self.dist.is_main else None, self.out_dir,
                                  background=self.async_save, group=self._save_group)
        elif self.dist.is_main:
            if self.async_save:
                state = snapshot(state)  # copies: the next optimizer steps must not change what is written

            def write() -> None:
                save_checkpoint(state, self.last_path, "last checkpoint")
                sharded.remove_stale(self.out_dir, keep="")  # a sharded last.pt's folders, once it is replaced
        else:
            return
        if with_metrics and self.dist.is_main:
            rows, whole = [dict(row) for row in self.history], write

            def write() -> None:
                whole()
                write_metrics_csv(os.path.join(self.out_dir, "metrics.csv"), rows)  # never ahead of last.pt
        self._writes.run(write, self.last_path, background=self.async_save)

    def _wait_for_writes_quietly(self) -> None:
        try:
            self._writes.wait()
        except CheckpointError as e:
            self.log(f"error: {e}")  # another error is on its way out; this one is reported, not lost

    def _unpadded_part(self, output: torch.Tensor, y: torch.Tensor, real: int) -> tuple[torch.Tensor, ...]:
        """The loss, output and target of a padded batch's first ``real`` samples (the rest are repeats).

        Only the last batch or two of an epoch on some ranks; the loss is recomputed for the metrics
        alone (no autograd), with weight 0 when the whole batch is padding. No host sync.
        """
        output, y = output.detach()[:real], y[:real]
        if real == 0:
            return torch.zeros((), device=output.device), output, y
        with torch.no_grad():
            return self.loss_fn(*self.task.loss_inputs(output, y)), output, y

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self, opt: torch.optim.Optimizer) -> None:
        """step, then zero_grad(set_to_none=True): never between backward and step."""
        if self.scaler is not None:
            if self.grad_clip:
                self.scaler.unscale_(opt)
                self.strategy.clip_grad_norm(self.model, self.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            if self.grad_clip:
                self.strategy.clip_grad_norm(self.model, self.grad_clip)
            opt.step()
        opt.zero_grad(set_to_none=True)

    def _step_scheduler_per_epoch(self, row: dict) -> None:
        if self.scheduler is None or self.scheduler_interval != "epoch":
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            value = row.get(self.monitor)
            self.scheduler.step(value if value is not None else row["train_loss"])
        else:
            self.scheduler.step()

    @staticmethod
    def _default_interval(scheduler: Any) -> str:
        per_step = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
        return "step" if isinstance(scheduler, per_step) else "epoch"

    # ------------------------------------------------------------------------------------------
    # Evaluation and prediction

    @contextlib.contextmanager
    def _evaluating(self, grad: bool = False) -> Iterator[None]:
        """Eval mode and no autograd (``grad``: autograd on, for a stand-in training step), for exactly this
        block; each module's own mode is restored after."""
        modes = _module_modes(self.model)
        self.model.eval()
        try:
            with torch.set_grad_enabled(grad):
                yield
        finally:
            _restore_module_modes(self.model, modes)

    def _evaluate(self, loader: Loader, metrics: MetricSet) -> tuple[dict[str, float], int]:
        """Loss and metrics over every rank's shard, each sample once.

        Evaluation shards are not padded, so ranks may hold different numbers of batches; where a forward
        is a collective (FSDP's parameter gathers) a rank that runs out runs stand-in forwards whose
        outputs it drops (``Step(None, ...)``), so that no peer waits forever.
        """
        metrics.reset(loader.num_batches or 64)
        task = self.task
        weigh = loss_weight_fn(self.loss_fn, task)
        stand_in, first = None, True
        with self._evaluating():
            for step in loader.steps(0, lockstep=self.strategy.forward_is_collective):
                if step.x is None:
                    stand_in = stand_in or self._stand_in(loader)
                    self.predict_step(stand_in[0])
                    continue
                loss, output = self.eval_step(step.x, step.y)
                if first:
                    self._check_loss_value(loss, training=False)
                    first = False
                metrics.update(loss, weigh(step.y), task.outputs(output, step.y), step.y.shape[0])
        return metrics.compute()  # all-reduced over ranks: each sample counted once

    def _score(self, data: Any, ckpt: str | None, prefix: str) -> dict:
        """validate/test: reload ``ckpt``, then the loss and every metric on ``data``."""
        self._setup()
        loader = self._make_loader(data, train=False, name=prefix)
        self._preflight(loader, prefix, labelled=True)
        self._load_weights(ckpt)
        self._resolve_metrics()
        confusion = prefix == "test" and self.task.name == "multiclass"
        extra = {"__confusion": confusion_metric()} if confusion else {}
        metric_set = MetricSet({**self.metrics, **extra}, self.task.num_outputs, self.device,
                               loader.num_batches or 64)
        values, count = self._evaluate(loader, metric_set)
        self._check_count(count, loader, prefix)
        if confusion:
            cm = metric_set.state_of("confusion")  # summed over ranks: every rank takes part
            if self.dist.is_main and os.path.isdir(self.out_dir):
                _write_confusion(os.path.join(self.out_dir, "confusion_matrix.csv"), cm)
        return {f"{prefix}_{k}": v for k, v in values.items() if not k.startswith("__")}

    def _predict_outputs(self, inputs: Any, ckpt: str | None) -> torch.Tensor:
        """The model's outputs for every input, in input order, gathered on the CPU of every rank."""
        self._setup()
        loader = self._make_loader(inputs, train=False, name="predict", labelled=False, positions=True)
        self._preflight(loader, "predict", labelled=False)
        self._load_weights(ckpt)
        outputs, stand_in, none = [], None, None  # none: no rows, shaped like the outputs
        with self._evaluating():
            for step in loader.steps(0, lockstep=self.strategy.forward_is_collective):
                if step.x is None:  # this rank's shard ran out: a forward for the others' gathers (FSDP)
                    stand_in = stand_in or self._stand_in(loader)
                    none = self.predict_step(stand_in[0]).float()[:0]
                    continue
                outputs.append(self.predict_step(step.x).float())
            if not outputs and none is None and not self.strategy.forward_is_collective:
                none = self.predict_step(self._stand_in(loader)[0]).float()[:0]  # a rank with no rows: their shape
        local = torch.cat(outputs).cpu() if outputs else none.cpu()  # one device-to-host copy
        if loader.is_stream:  # rows back in stream order (see StreamLoader.positions), on every rank
            return distributed.gather_by_position(local, loader.positions())
        result = distributed.gather_in_order(local, loader.dataset_size)
        if self.dist.enabled:
            result = distributed.broadcast_object(result)
        return result

    def _check_count(self, count: int, loader: Loader, what: str) -> None:
        if loader.is_stream and count == 0:  # the count is over every rank: all of them raise
            raise DataError(f"the {what} stream yielded no samples; its __iter__ must start a new pass over the "
                            "data every time it is called.")
        expected = loader.dataset_size
        if expected is not None and count != expected:
            raise RuntimeError(f"{what} counted {count} samples but the data set holds {expected}")

    # ------------------------------------------------------------------------------------------
    # Set-up: device, processes, data, task, metrics

    def _setup(self) -> None:
        if self._set_up:
            return
        if distributed.launched_by_torchrun():
            self.dist = distributed.setup(self.device if self._requested_device is not None else None,
                                          self.dist_timeout)
            if self._requested_device is None:
                self.device = distributed.default_device(self.dist.local_rank)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(self.device)!r} was asked for but CUDA is not available; use 'cpu'.")
        if self.precision == "fp16":
            if self.device.type != "cuda":
                raise ConfigError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU.")
            self.scaler = torch.amp.GradScaler("cuda")
        self.model.to(self.device)
        if isinstance(self.loss_fn, nn.Module):
            self.loss_fn.to(self.device)  # class weights, pos_weight
        self.strategy = make_strategy(self._strategy_arg, distributed_on=self.dist.enabled,
                                      sync_batchnorm=self.sync_batchnorm)
        self._train_model, self._eval_model = self.strategy.wrap(
            self.model, self.optimizer, self.device, torch.compile if self.compile else (lambda m: m))
        self._set_up = True

    def _check_optimizer_and_scheduler(self, loss_fn: nn.Module | None, scheduler: Any, default_optimizer: bool) -> None:
        """Refuse an optimizer or scheduler that would "train" without changing this model, before training.

        The optimizer must hold this model's parameters (and perhaps the loss's), and only finite settings
        (a NaN learning rate turns every weight into NaN at the first step); the scheduler must be built on
        this optimizer (one built on another sets the other's learning rate, and this one never changes).
        Whether anything requires a gradient is checked on the first step's loss (``_check_loss_value``):
        a callback may freeze or unfreeze modules at ``on_epoch_start``.
        """
        model_params = {id(p) for p in self.model.parameters()}
        own = set(model_params)
        if isinstance(loss_fn, nn.Module):
            own |= {id(p) for p in loss_fn.parameters()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        foreign = [p for p in params if id(p) not in own]
        if foreign:
            raise ConfigError(f"the optimizer holds {len(foreign)} of {len(params)} parameter tensors that are not the "
                              "model's (or the loss's): build it from this model, e.g. "
                              "torch.optim.AdamW(model.parameters()).")
        if model_params and not any(id(p) in model_params for p in params):
            raise ConfigError(f"the optimizer holds none of the model's parameters (only {len(params)} of the loss's), "
                              "so the model would never change: build it over the model's parameters too, e.g. "
                              "torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()]).")
        for i, group in enumerate(self.optimizer.param_groups):
            for key, value in group.items():
                if key != "params" and not _finite_setting(value):
                    raise ConfigError(f"the optimizer's {key}={shown_repr(value)} (param group {i}) is not a finite "
                                      "number, and a step with it would make the weights NaN: build the optimizer "
                                      f"with a finite {key}.")
        if scheduler is None:
            return
        name = type(scheduler).__name__
        if not callable(getattr(scheduler, "step", None)):
            raise ConfigError(f"scheduler must be a learning-rate scheduler with a step() method "
                              f"(torch.optim.lr_scheduler), got {shown_repr(scheduler)}.")
        stepped = getattr(scheduler, "optimizer", self.optimizer)  # torch's schedulers all name theirs
        if stepped is not self.optimizer:
            if default_optimizer:
                raise ConfigError(f"scheduler {name} was built on an optimizer the Trainer was not given (it builds "
                                  "its own default AdamW); pass the optimizer the scheduler was built on: "
                                  f"Trainer(model, optimizer, scheduler={name}(optimizer, ...)).")
            raise ConfigError(f"scheduler {name} was built on another optimizer than the Trainer's, so the learning "
                              f"rate would never change: build it on this optimizer, {name}(optimizer, ...), with the "
                              "optimizer passed to the Trainer.")

    def _check_loss_value(self, loss: Any, training: bool) -> None:
        """The first batch's loss: a scalar tensor, and in training one that a gradient flows back from.

        Free (attributes only, no host sync); once per epoch (a callback may freeze modules at
        ``on_epoch_start``) and per evaluation, before the first backward.
        """
        if not isinstance(loss, torch.Tensor):
            if isinstance(loss, (int, float)):
                raise ConfigError(f"loss_fn returned a {type(loss).__name__} ({loss!r}), not a tensor; a number has no "
                                  "gradient: return the loss tensor itself (no .item() or float() on it).")
            raise ConfigError(f"loss_fn returned {describe(loss)}; it must return the batch's mean loss as a scalar "
                              "tensor.")
        if loss.numel() != 1:
            raise ConfigError(f"loss_fn returned a tensor of shape {list(loss.shape)}; it must return a scalar (the "
                              "batch's mean): use reduction='mean', or return loss.mean().")
        if not training:
            return
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # the model's, the loss's
        if loss.requires_grad:
            if not any(p.requires_grad for p in params):
                raise ConfigError(f"none of the parameters the optimizer holds requires a gradient (its "
                                  f"{len(params)} parameter tensors are frozen: requires_grad=False), so training "
                                  "would change nothing: build the optimizer over the trainable parameters, e.g. "
                                  "torch.optim.AdamW(p for p in model.parameters() if p.requires_grad).")
            return
        model_params = list(self.model.parameters())
        if not any(p.requires_grad for p in [*model_params, *params]):
            count = len(model_params)
            raise ConfigError(f"no parameter of the model requires a gradient (all {count} parameter tensors have "
                              "requires_grad=False), so there is nothing to train: unfreeze the ones to train "
                              "(p.requires_grad_(True)) before fit, or only validate, test or predict with this model.")
        raise ConfigError("the training loss does not depend on any parameter that requires a gradient (it was "
                          "detached, or computed under torch.no_grad()): return the loss of the model's output "
                          "as it is.")

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _make_loader(self, data: Any, *, train: bool, name: str, labelled: bool = True,
                     positions: bool = False) -> Loader:
        return make_loader(
            data, train=train, batch_size=self.batch_size if train else self.eval_batch_size,
            generator=self.generator, device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
            labelled=labelled, target_key=self.target_key, num_workers=self.num_workers,
            check_inputs=self.check_inputs, place=self._place, name=name, positions=positions,
        )

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """In-memory data on the GPU when it fits (or in pinned memory for non_blocking copies)."""
        if self.device.type != "cuda":
            return t
        keep = self.on_device
        if keep is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            keep = t.numel() * t.element_size() < free / 4
        return t.to(self.device) if keep else t.pin_memory()

    def _preflight(self, loader: Loader, name: str, labelled: bool) -> None:
        """Clear errors before the first step: the model's output and the targets, checked by the task.

        Settles the task (and the default loss) when they wait for the output's width; casts in-memory
        targets once (Dataset batches are cast per batch).
        """
        x, y = loader.sample_batch()
        x = tree_map(lambda t: t.to(self.device), x)
        with self._evaluating():
            try:
                out = self.forward(self.model, x)
            except TrainvalError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's model or data; say which, in one line
                raise DataError(f"the model failed on a {name} batch of inputs {describe(x)}: "
                                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from None
        if not isinstance(out, torch.Tensor):
            raise DataError(f"the model's output for a {name} batch is {describe(out)}; trainval needs a tensor.")
        if self.task is None:  # a BCE loss: one logit per sample is binary, several are multilabel
            self.task = task_for_output(self.loss_fn, out, *self._task_args)
        if labelled and y is None:
            raise DataError(f"{name} data has no targets; targets are needed to train, validate or test "
                            f"(use predict for unlabelled inputs; dict batches hold them under '{self.target_key}').")
        self.task.check_output(out, y, name)
        if self.loss_fn is None:  # binary: BCE for one logit, cross-entropy for two
            self.loss_fn = self.task.default_loss().to(self.device)
        if not labelled:
            return
        if isinstance(loader, TensorLoader):
            loader.y = self.task.prepare_targets(loader.y, name)
            if name == "train":
                self._check_training_data(loader)
        else:
            self.task.prepare_targets(torch.as_tensor(y), name)
            loader.target_transform = self.task.cast_target
            if self.task.ignore_index is not None:  # later batches may hold ignored targets: mask them
                self.task.masking = True

    def _check_training_data(self, loader: TensorLoader) -> None:
        y = loader.y
        if self.task.name == "multiclass" and y.dim() == 1 and len(y) > 1 and bool((y == y[0]).all()):
            raise DataError(f"the training targets hold a single class ({int(y[0])}) in {len(y)} samples: there is "
                            "nothing to tell apart. Check the labels (or the split).")
        has_batchnorm = any(isinstance(m, _BATCHNORM) and m.training for m in self.model.modules())
        if has_batchnorm and loader.num_samples % self.batch_size == 1:
            raise DataError(f"the last training batch would hold 1 sample ({loader.num_samples} samples per process, "
                            f"batch_size {self.batch_size}), and BatchNorm cannot train on one sample; choose a "
                            f"batch_size that leaves more over (e.g. {self.batch_size + 1}).")

    def _resolve_metrics(self) -> None:
        if not self.metrics:
            self.metrics = resolve_metrics(self._metrics_spec, self.task)

    def _metric_set(self, capacity: int) -> MetricSet:
        self._resolve_metrics()
        return MetricSet(self.metrics, self.task.num_outputs, self.device, capacity)

    def _choose_monitor(self, has_val: bool) -> None:
        """The monitored column, checked against the metrics; its direction from the metric."""
        self._resolve_metrics()
        split = "val" if has_val else "train"
        monitor = self._monitor_arg or f"{split}_{next(iter(self.metrics), 'loss')}"
        names = ["loss", *self.metrics]
        short = monitor.split("_", 1)[1]
        if short not in names:
            raise ConfigError(f"monitor {monitor!r} is not a column of this run; choose one of "
                              f"{', '.join(f'{s}_{n}' for s in (('val', 'train') if has_val else ('train',)) for n in names)}.")
        self.state.monitor = monitor
        self.state.mode = self._mode_arg or metric_direction(monitor, self.metrics)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def _prepare_run_folder(self, resume: bool) -> dict | None:
        """Claim the run folder and check it; with ``resume``, the last.pt every rank agreed on."""
        if self.dist.is_main:  # under the run folder's lock (see fit)
            runfolder.claim(self.out_dir, resume)
            runfolder.remove_own_temp_files(self.out_dir)  # temp files of writes cut short by a kill
            sharded.remove_stale(self.out_dir)  # shard folders no last.pt points to (a save cut short)
        distributed.barrier()
        last = self._agree_on_last() if resume else None  # first: a stale copy on one node is named as such
        if self.dist.enabled:
            runfolder.check_shared(self.out_dir, self.dist.rank)
        # A run exists once its first last.pt does. best.pt is written just before last.pt, so a
        # best.pt alone is a fit stopped inside its first epoch's saves: nothing to resume, and
        # starting over loses nothing.
        if resume:
            pass  # last.pt was read and agreed on above
        elif not self.overwrite and os.path.exists(self.last_path):
            raise RunFolderError(f"{self.out_dir} already holds a run (last.pt); resume it, "
                                 "choose another folder, or allow overwriting it (run.overwrite=true, "
                                 "Trainer(overwrite=True)).")
        elif os.path.exists(self.best_path) and not os.path.exists(self.last_path):
            self.log(f"{self.best_path} has no last.pt beside it (a fit stopped before its first epoch was "
                     "saved): starting over.")
        if self.config is not None and self.dist.is_main:
            import yaml

            text = yaml.safe_dump({**self.config, "versions": _versions()}, sort_keys=False).encode()
            atomic_write(os.path.join(self.out_dir, "config.yaml"), lambda f: f.write(text), "config")
        return last

    def _agree_on_last(self) -> dict:
        """last.pt, read by every rank, after all of them agree it is the same file (a collective).

        Epoch, step and a content hash per rank are compared on every rank, so that a disagreement (a
        missing or stale copy on one node) is one clear error everywhere instead of ranks training from
        different states.
        """
        state, seen, refused = None, "no last.pt", None
        if os.path.exists(self.last_path):
            try:
                state = load_checkpoint(self.last_path, map_location="cpu")  # not N full copies on the GPUs (FSDP)
                try:
                    check_last(state, self.last_path)  # its fields are data from a file, checked before any use
                except CheckpointError as e:
                    state, refused = None, e
                    raise
                loop = state.get("loop") or {}
                seen = f"epoch {state.get('epoch')}, step {loop.get('global_step')}, sha256 {sharded.sha256_file(self.last_path)[:12]}"
                if "shards" in state:  # every rank must see the complete folder last.pt points to
                    sharded.verify(state["shards"], self.last_path)
                    seen += f", shards {sharded.pointed_folder(state)}"
            except CheckpointError as e:
                seen = f"unreadable ({e})"
        views = distributed.all_gather_objects(seen)
        if len(set(views)) > 1:
            each = "; ".join(f"rank {r}: {v}" for r, v in enumerate(views))
            raise CheckpointError(f"cannot resume: the processes see different last.pt files in {self.out_dir} ({each}). "
                                  "Every process must resume from the same checkpoint: put the run folder on a file "
                                  "system every node mounts.")
        if refused is not None:
            raise refused
        if state is None:
            if seen != "no last.pt":
                raise CheckpointError(f"cannot resume from {self.last_path}: {seen}.")
            raise CheckpointError(f"cannot resume: no last.pt in {self.out_dir} (no epoch was saved there); "
                                  "start without resume to train from the beginning.")
        return state

    def _best_state(self) -> dict:
        return {"model": self.strategy.model_state_dict(self.model), "epoch": self.epoch, "task": self.task.name,
                "monitor": self.monitor, "value": self.best_value, "config": self.config, "versions": _versions()}

    def _state(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        mid = self.batch_in_epoch > 0
        # Each rank's own random streams and running sums; rank 0 gets every rank's (a collective).
        own = {"rng": rng_state(), "epoch_start_rng": (self.state.epoch_start or {}).get("rng"),
               "train_metrics": self.train_metrics.state_dict() if mid else None}
        whole = not self.strategy.sharded_checkpoint  # sharded: model and optimizer go to the shards
        return {
            **({"model": self.strategy.model_state_dict(self.model)} if whole else {}),
            "epoch": self.epoch,
            "task": self.task.name,
            "loop": self.state.state_dict(),
            **({"optimizer": self.strategy.optimizer_state_dict(self.model, self.optimizer)} if whole else {}),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": own["rng"],
            "generator": self.generator.get_state(),
            "train_metrics": own["train_metrics"],
            "ranks": distributed.gather_objects(own),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self.config,
            "versions": _versions(),
        }

    def _restore(self, state: dict) -> None:
        needed = ("optimizer" if "shards" not in state else "shards", "rng", "generator", "loop")
        missing = [k for k in needed if k not in state]
        if missing:
            raise CheckpointError(f"{self.last_path} cannot be resumed from: it lacks {', '.join(missing)} "
                                  "(a weights-only checkpoint, or one written by an older trainval).")
        saved = state["loop"]
        if (saved["monitor"], saved["mode"]) != (self.monitor, self.mode):
            raise ConfigError(f"{self.last_path} was monitoring {shown(saved['monitor'])} ({saved['mode']}); this run monitors "
                              f"{self.monitor} ({self.mode}). Its best value cannot be compared: resume with the same "
                              "monitor, or start a new run.")
        if state.get("task", self.task.name) != self.task.name:
            raise ConfigError(f"{self.last_path} was a {shown(state['task'])} run; this one is {self.task.name}.")
        written_by = len(state.get("ranks") or []) or None
        if saved.get("batch_in_epoch", 0) > 0 and written_by and written_by != self.dist.world_size:
            # each rank's shard of the epoch, and so what was done, depends on the number of processes
            raise CheckpointError(
                f"{self.last_path} was saved in the middle of epoch {state.get('epoch', 0) + 1} by {written_by} "
                f"process{'es' if written_by > 1 else ''}; this run has {self.dist.world_size}. The samples already "
                f"trained in that epoch are known only for {written_by}: resume with {written_by} "
                f"(--nproc {written_by}), then change the number of processes at an epoch's end.")
        if "shards" in state:  # each rank reads the pieces of its own shards (a collective)
            shards = self.strategy.sharded_state_dict(self.model, self.optimizer)
            sharded.load(shards, state["shards"], self.last_path)
            self.strategy.load_sharded_state_dict(self.model, self.optimizer, shards)
        else:
            self.strategy.load_model_state_dict(self.model, state["model"], self.last_path)
        saved_keys = {k for g in state.get("optimizer", {}).get("param_groups", []) for k in g}
        foreign = sorted(saved_keys - {k for g in self.optimizer.param_groups for k in g})
        try:
            if foreign:  # loading would succeed, then the first step fail (e.g. Adam's state into SGD)
                raise ValueError(f"it has settings this optimizer lacks: {', '.join(foreign)}")
            if "shards" not in state:
                self.strategy.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:  # another optimizer or scheduler than last.pt's
            raise CheckpointError(f"{self.last_path} cannot be resumed with this optimizer/scheduler: its saved "
                                  f"state does not fit ({type(e).__name__}: {e}). Resume with the ones it was "
                                  "trained with.") from None
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(saved, self.last_path)
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(cb_state)
        try:
            self.generator.set_state(state["generator"])
            own = self._own_state(state)
            set_rng_state(own["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:  # check_last saw their types only
            raise CheckpointError(f"{self.last_path} cannot be resumed from: its random generators' states are not "
                                  f"ones trainval saved ({type(e).__name__}: {shown(str(e))}); start a new run, or "
                                  "resume from a last.pt that trainval wrote.") from None
        if self.batch_in_epoch > 0:
            self.state.epoch_start["rng"] = own["epoch_start_rng"]
            self._pending_rng = own["rng"]
            self.train_metrics.load_state_dict(own["train_metrics"], self.train_loader.num_batches)

    def _own_state(self, state: dict) -> dict:
        """This rank's random streams and running sums from last.pt (``ranks``, one entry per rank)."""
        ranks = state.get("ranks")
        if ranks and len(ranks) == self.dist.world_size:
            return ranks[self.dist.rank]
        # Written by another number of processes (or a trainval before per-rank state): rank 0's, and on
        # the other ranks fresh streams of their own.
        if self.dist.rank > 0:
            seed_everything(hash((self.seed, self.dist.rank, self.global_step)) % 2**31)
            return {"rng": rng_state(), "epoch_start_rng": rng_state(), "train_metrics": state.get("train_metrics")}
        start = (state["loop"].get("epoch_start") or {}).get("rng")
        return {"rng": state["rng"], "epoch_start_rng": start, "train_metrics": state.get("train_metrics")}

    def _load_weights(self, ckpt: str | None) -> None:
        if ckpt is None:
            return
        path = {"best": self.best_path, "last": self.last_path}.get(ckpt, ckpt)
        self._writes.wait()  # a background write of last.pt ends first
        distributed.barrier()  # rank 0 may still be writing it
        if ckpt == "best" and not os.path.exists(path):
            raise CheckpointError(f"no best.pt in {self.out_dir}: run fit first, or pass ckpt=None to use the "
                                  "current weights.")
        state = load_checkpoint(path, map_location="cpu")
        self.strategy.load_model_state_dict(self.model, model_weights(state, path), path)  # shards: put together

    def _raise_if_weights_nonfinite(self, epoch: int) -> None:
        """The weights after the epoch's (or a mid-epoch save's) last step: a loss is computed before its step,
        so the losses alone never see the last update. A sync point (under FSDP a collective): once per
        epoch and per mid-epoch save, before last.pt is written."""
        if not self.strategy.all_finite(self.model):
            raise NonFiniteLossError(
                f"the model's weights became non-finite at epoch {epoch} (step {self.global_step}) although every "
                "training loss was finite: an optimizer step (or a callback) made them NaN or Inf after the last loss "
                "was computed (a non-finite learning rate from the scheduler, an overflow). Training stopped and nothing from this epoch was saved (the "
                f"last good checkpoint is {self.last_path}). Check the scheduler, lower the learning rate or clip "
                "gradients.")

    # ------------------------------------------------------------------------------------------
    # Non-finite loss and signals

    def _raise_if_nonfinite(self, epoch: int) -> None:
        bad = self.train_metrics.first_nonfinite()  # a sync point
        if bad is not None:
            value = self.train_metrics.losses[bad].item()
            total = self.train_loader.num_batches
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch}, step {bad + 1}{f' of {total}' if total else ''}; "
                f"training stopped and nothing from this epoch was saved (the last good checkpoint is "
                f"{self.last_path}). Lower the learning rate, clip gradients or check the data."
            )

    def _poll_distributed(self, epoch: int, started: float, step: Step) -> None:
        k = len(self.train_metrics.sizes)
        flags = torch.stack([
            (~torch.isfinite(self.train_metrics.losses[:k])).any().to(torch.int64),
            torch.tensor(self._stop_signal or 0, device=self.train_metrics.losses.device),
        ])
        if dist.get_backend() != "nccl":
            flags = flags.cpu()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signum = flags.tolist()
        if nonfinite:
            self._raise_if_nonfinite(epoch)
            raise NonFiniteLossError(f"training loss became non-finite on another rank at epoch {epoch}.")
        if signum:
            self._stop_signal = int(signum)
            self._interrupt(epoch, mid_epoch=not step.last, started=started)

    def _interrupt(self, epoch: int, mid_epoch: bool, started: float = 0.0) -> None:
        if mid_epoch:
            self._save_mid_epoch(epoch, started)
        self._writes.wait()  # "last.pt is saved" below must be true
        distributed.barrier()
        name = signal.Signals(self._stop_signal).name
        where = f"epoch {epoch}, batch {self.batch_in_epoch}" if mid_epoch else f"the end of epoch {epoch}"
        raise Interrupted(f"stopped by {name} at {where}; {self.last_path} is saved. Resume with "
                          "`trainval fit CONFIG --resume` or Trainer.fit(..., resume=True).", self._stop_signal)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save last.pt, stop. A second SIGINT: exit at once.

        A repeated SIGTERM changes nothing: schedulers send it to every process of a job (SLURM's
        ``scancel`` reaches the workers besides torchrun's forwarded one), and the stop is under way.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        received: list[int] = []  # by this process (self._stop_signal may be another rank's, agreed on)

        def handler(signum, frame):
            if received:
                if signum == signal.SIGINT:  # a user's second Ctrl-C
                    distributed.exit_process(128 + signum)  # checkpoints are atomic: nothing is corrupted
                return
            received.append(signum)
            self._stop_signal = self._stop_signal or signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._stop_signal = None
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Helpers


def _finite_setting(value: Any) -> bool:
    """Is an optimizer setting finite: a number, a 1-element tensor, or a tuple of them (betas)?"""
    if isinstance(value, (tuple, list)):
        return all(_finite_setting(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.numel() != 1 or bool(torch.isfinite(value).all())  # once, at construction
    if isinstance(value, float):
        return math.isfinite(value)
    return True  # ints, bools, strings (foreach, capturable, ...)


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_module_modes(model: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _eval_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics (eval mode)."""
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, _BATCHNORM) and params and not any(p.requires_grad for p in params):
            m.eval()


def _write_confusion(path: str, cm: torch.Tensor) -> None:
    """``confusion_matrix.csv``: one row per true class, one column per predicted class (counts)."""
    counts = cm.round().long().tolist()
    lines = ["true\\pred," + ",".join(str(c) for c in range(len(counts)))]
    lines += [f"{r}," + ",".join(str(v) for v in row) for r, row in enumerate(counts)]
    data = ("\n".join(lines) + "\n").encode()
    atomic_write(path, lambda f: f.write(data), "confusion matrix")


def _versions() -> dict:
    from trainval import __version__

    return {"trainval": __version__, "torch": str(torch.__version__)}
