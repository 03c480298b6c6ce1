"""The loop: fit / validate / test / predict, and the per-batch ``*_step`` methods, top to bottom.

``Trainer.fit`` is the canonical supervised loop of the notes, done correctly::

    for epoch in range(start, max_epochs):
        model.train()
        for x, y in train_loader:                      # in-memory slicing or a DataLoader
            loss, logits = train_step(x, y)            # forward + loss (autocast when asked)
            loss.backward()                            # no_sync() on non-final accumulation steps
            optimizer.step(); optimizer.zero_grad(set_to_none=True)
            metrics.update(loss, logits, y)            # device tensors only: no host sync
        val = evaluate(val_loader)                     # eval mode + no_grad, modes restored after
        print("[003/020] Train Acc ... | Val Acc ...") # one host read per epoch
        if val improved and weights are finite: save best.pt
        save last.pt                                   # both atomic; last.pt resumes exactly

``test`` and ``predict`` reload ``best.pt`` first. Everything a subclass may want to change per batch
is in ``train_step``, ``eval_step`` and ``predict_step``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from trainval import distributed, runfolder
from trainval.callbacks import Callback, ProgressBar, plot_curves, write_metrics_csv
from trainval.checkpoint import (
    atomic_write,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    unwrap_model,
)
from trainval.data import (
    DataLoaderAdapter,
    ShardSampler,
    TensorLoader,
    as_tensors,
    check_finite,
    check_labels,
)
from trainval.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    NonFiniteLossError,
    RunFolderError,
)
from trainval.metrics import RunningMetrics

PRECISIONS = ("fp32", "bf16", "fp16")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as tensors and plain containers (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Train, validate, keep the best checkpoint, reload it, test and predict.

    Args:
        model: a module mapping a batch ``x`` to logits of shape ``[B, C]``.
        optimizer: an optimizer over ``model``'s parameters (default: AdamW, lr 1e-3).
        loss_fn: a loss with mean reduction (default: ``nn.CrossEntropyLoss()``).
        max_epochs: epochs to train (a resumed run continues up to this number).
        out_dir: run folder for ``best.pt``, ``last.pt``, ``metrics.csv`` and ``curves.png``.
        seed: seeds Python/NumPy/torch at the start of ``fit`` and the trainer's shuffling generator.
        monitor: ``val_acc`` (max), ``val_loss`` (min), ``train_acc`` or ``train_loss``; ``mode``
            (``"max"``/``"min"``) overrides the direction.
        batch_size: samples per batch, per process; ``eval_batch_size`` for evaluation (default: same).
        progress: show a progress bar (a terminal) or bounded-rate progress lines (otherwise), rank 0.
        callbacks: :class:`~trainval.callbacks.Callback` objects.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default CUDA if available (``LOCAL_RANK`` under torchrun).
        scheduler: a learning-rate scheduler; ``scheduler_interval`` ``"step"`` or ``"epoch"`` (default:
            per step for OneCycleLR/CyclicLR, per epoch otherwise; ReduceLROnPlateau gets the monitored value).
        grad_clip: clip the global gradient norm to this value.
        accumulate_steps: micro-batches per optimizer step (gradient accumulation).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + grad scaler, CUDA).
        compile: run the model through ``torch.compile`` (checkpoints stay loadable into a plain model).
        checkpoint_every_steps: also write ``last.pt`` every this many optimizer steps inside an epoch.
        check_inputs: refuse NaN/Inf in in-memory features before training.
        on_device: keep in-memory data wholly on the GPU (default: when it takes under 1/4 of free memory).
        num_workers: DataLoader workers for map-style Datasets.
        overwrite: allow ``fit`` into an ``out_dir`` that already holds a run.
        plot: write ``curves.png`` at the end of ``fit``.
        config: a plain dict describing the run, saved in every checkpoint.
    """

    # On one process the host checks the running loss for NaN/Inf at most this often (a sync point).
    poll_interval_s = 0.5

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        loss_fn: nn.Module | None = None,
        *,
        max_epochs: int = 20,
        out_dir: str = "runs/exp",
        seed: int = 0,
        monitor: str = "val_acc",
        mode: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
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
        check_inputs: bool = True,
        on_device: bool | None = None,
        num_workers: int = 0,
        overwrite: bool = False,
        plot: bool = True,
        config: dict | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if monitor not in ("val_acc", "val_loss", "train_acc", "train_loss"):
            raise ConfigError(f"monitor must be val_acc, val_loss, train_acc or train_loss, got {monitor!r}.")
        mode = mode or ("max" if monitor.endswith("acc") else "min")
        if mode not in ("max", "min"):
            raise ConfigError(f"mode must be 'max' or 'min', got {mode!r}.")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
        for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("accumulate_steps", accumulate_steps)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
        if scheduler_interval not in (None, "step", "epoch"):
            raise ConfigError(f"scheduler_interval must be 'step' or 'epoch', got {scheduler_interval!r}.")

        self.model = model
        self.optimizer = optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
        self.max_epochs, self.out_dir, self.seed = max_epochs, str(out_dir), seed
        self.monitor, self.mode = monitor, mode
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.progress = progress
        self.callbacks = list(callbacks)
        self.scheduler = scheduler
        self.scheduler_interval = scheduler_interval or self._default_interval(scheduler)
        self.grad_clip, self.accumulate_steps, self.precision = grad_clip, accumulate_steps, precision
        self.compile, self.checkpoint_every_steps = compile, checkpoint_every_steps
        self.check_inputs, self.on_device, self.num_workers = check_inputs, on_device, num_workers
        self.overwrite, self.plot, self.config = overwrite, plot, config

        self.dist = distributed.DistInfo()
        self._requested_device = device
        self.device: torch.device = torch.device(device) if device is not None else distributed.default_device()
        self.generator = torch.Generator().manual_seed(seed)
        self.scaler = None
        self._train_model: nn.Module = model
        self._eval_model: nn.Module = model
        self._set_up = False

        # Loop state: everything below is saved in last.pt.
        self.epoch = 0                 # completed epochs
        self.batch_in_epoch = 0        # batches done in the epoch in progress
        self.global_step = 0           # optimizer steps
        self.history: list[dict] = []
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.should_stop = False
        self.num_classes: int | None = None
        self.train_loader = None
        self.val_loader = None
        self.train_metrics: RunningMetrics | None = None
        self._epoch_start: dict | None = None
        self._pending_rng: dict | None = None
        self._stop_signal: int | None = None
        self._bar: ProgressBar | None = None

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
        if not self.dist.is_main:
            return
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
            train_data: a ``DataLoader``, a map-style ``Dataset`` of ``(x, y)``, or ``(X, y)`` tensors/arrays.
            val_data: the same kinds, or ``None`` (then ``monitor`` must be a train metric).
            resume: continue from ``out_dir/last.pt`` exactly where it stopped (mid-epoch too).
        """
        self._setup()
        if val_data is None and self.monitor.startswith("val_"):
            raise ConfigError(f"monitor={self.monitor!r} needs validation data: pass val_data, "
                              "or monitor='train_acc'/'train_loss'.")
        self.train_loader = self._make_loader(train_data, train=True, name="train")
        self.val_loader = self._make_loader(val_data, train=False, name="val") if val_data is not None else None
        self._preflight(self.train_loader, "train", labelled=True)
        if self.val_loader is not None:
            self._preflight(self.val_loader, "val", labelled=True)
        self.train_metrics = RunningMetrics(self.device, len(self.train_loader))
        self._val_metrics = RunningMetrics(self.device, len(self.val_loader) if self.val_loader else 1)

        if not resume and distributed.elastic_restart_count() > 0 and os.path.exists(self.last_path):
            resume = True  # torchrun restarted the workers after a failure: continue from last.pt
        self._prepare_run_folder(resume)
        if resume:
            self._restore(load_checkpoint(self.last_path, map_location=self.device))
            self.log(f"resuming from {self.last_path} (epoch {self.epoch}, batch {self.batch_in_epoch})")
        else:
            seed_everything(self.seed)
            self.generator.manual_seed(self.seed)

        modes = _module_modes(self.model)
        try:
            with self._signal_handlers():
                self._bar = ProgressBar() if (self.progress and self.dist.is_main) else None
                callbacks = ([self._bar] if self._bar else []) + self.callbacks
                for cb in callbacks:
                    cb.on_fit_start(self)
                while self.epoch < self.max_epochs and not self.should_stop:
                    self._run_epoch(callbacks)
                for cb in callbacks:
                    cb.on_fit_end(self)
                if self.plot and self.dist.is_main and self.history:
                    plot_curves(os.path.join(self.out_dir, "curves.png"), self.history)
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
            _restore_module_modes(self.model, modes)
        distributed.barrier()
        return self.history

    def validate(self, val_data: Any, ckpt: str | None = None) -> dict:
        """Loss and accuracy on ``val_data`` with the current weights (or ``ckpt``: best/last/path)."""
        return self._evaluate_public(val_data, ckpt, "val")

    def test(self, test_data: Any, ckpt: str | None = "best") -> dict:
        """Reload ``best.pt`` (or ``ckpt``), then ``{"test_loss", "test_acc"}`` on ``test_data``."""
        return self._evaluate_public(test_data, ckpt, "test")

    def predict(self, inputs: Any, ckpt: str | None = "best") -> torch.Tensor:
        """Class ids (LongTensor, input order) from ``best.pt`` (or ``ckpt``); labels are ignored."""
        return self.predict_proba(inputs, ckpt).argmax(dim=1)

    def predict_proba(self, inputs: Any, ckpt: str | None = "best") -> torch.Tensor:
        """Class probabilities ``[N, C]`` (softmax of the logits), input order, on the CPU."""
        self._setup()
        loader = self._make_loader(inputs, train=False, name="predict", labelled=False)
        self._preflight(loader, "predict", labelled=False)
        self._load_weights(ckpt)
        outputs = []
        with self._evaluating():
            for x, _ in loader:
                outputs.append(self.predict_step(x).float())
        if outputs:
            local = torch.cat(outputs).softmax(dim=1).cpu()  # one device-to-host copy
        else:
            local = torch.empty((0, self.num_classes or 0))
        result = distributed.gather_in_order(local, _num_samples(loader))
        if self.dist.enabled:
            result = distributed.broadcast_object(result)
        return result

    # ------------------------------------------------------------------------------------------
    # Per-batch steps: override these in a subclass to change what one batch does

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss for one training batch (training mode, autograd on): ``(loss, logits)``."""
        with self._autocast():
            logits = self._train_model(x)
            loss = self.loss_fn(logits, y)
        return loss, logits

    def eval_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and loss for one evaluation batch (eval mode, no autograd): ``(loss, logits)``."""
        with self._autocast():
            logits = self._eval_model(x)
            loss = self.loss_fn(logits, y)
        return loss, logits

    def predict_step(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for one batch of inputs (eval mode, no autograd)."""
        with self._autocast():
            return self._eval_model(x)

    # ------------------------------------------------------------------------------------------
    # One epoch

    def _run_epoch(self, callbacks: list[Callback]) -> None:
        epoch = self.epoch + 1
        # a resumed epoch counts the seconds it had run before the interruption
        done_before = self._epoch_start.get("seconds", 0.0) if (self.batch_in_epoch and self._epoch_start) else 0.0
        started = time.perf_counter() - done_before
        lr = self.optimizer.param_groups[0]["lr"]
        for cb in callbacks:
            cb.on_epoch_start(self, epoch)
        self._train_epoch(epoch, callbacks, started)
        train_loss, train_acc, _ = self.train_metrics.compute()  # a sync point: once per epoch
        val_loss = val_acc = None
        if self.val_loader is not None:
            val_loss, val_acc, count = self._evaluate(self.val_loader, self._val_metrics)
            self._check_count(count, self.val_loader, "validation")
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
               "val_acc": val_acc, "lr": lr}
        self._step_scheduler_per_epoch(row)
        self.epoch, self.batch_in_epoch, self._epoch_start = epoch, 0, None
        line = f"[{epoch:03d}/{self.max_epochs:03d}] Train Acc: {train_acc:3.6f} Loss: {train_loss:3.6f}"
        if val_loss is not None:
            line += f" | Val Acc: {val_acc:3.6f} loss: {val_loss:3.6f}"
        self.log(line)

        value = row[self.monitor]
        if self._improved(value) and self._weights_finite():
            self.best_value, self.best_epoch = value, epoch
            if self.dist.is_main:
                save_checkpoint(self._best_state(), self.best_path, "best checkpoint")
            self.log(f"saving best model ({self.monitor} {value:.4f}) -> {self.best_path}")
        row["seconds"] = round(time.perf_counter() - started, 4)
        self.history.append(row)
        for cb in callbacks:
            cb.on_epoch_end(self, row)
        if self.dist.enabled:  # every rank must agree, or the next collective hangs
            self.should_stop = bool(distributed.all_reduce_max(int(self.should_stop)))
        if self.dist.is_main:
            save_checkpoint(self._state(), self.last_path, "last checkpoint")
            write_metrics_csv(os.path.join(self.out_dir, "metrics.csv"), self.history)
        if self._stop_signal is not None:
            self._interrupt(epoch, mid_epoch=False)

    def _train_epoch(self, epoch: int, callbacks: list[Callback], started: float) -> None:
        loader, opt, metrics = self.train_loader, self.optimizer, self.train_metrics
        model = self._train_model
        model.train()
        if self.batch_in_epoch > 0:
            # Mid-epoch resume: redraw this epoch's order from its start state, skip what was done,
            # then continue with the RNG state saved at the interruption.
            start = self._epoch_start
            set_rng_state(start["rng"])
            self.generator.set_state(start["generator"])
            batches = loader.iter_from(self.batch_in_epoch)
            set_rng_state(self._pending_rng)
        else:
            self._epoch_start = {"rng": rng_state(), "generator": self.generator.get_state()}
            batches = loader.iter_from(0)
            metrics.reset(len(loader))
        self._pending_rng = None

        steps, acc = len(loader), self.accumulate_steps
        per_step_scheduler = self.scheduler if self.scheduler_interval == "step" else None
        batch_callbacks = [cb for cb in callbacks if type(cb).on_train_batch_end is not Callback.on_train_batch_end]
        no_sync = getattr(model, "no_sync", None) if self.dist.enabled else None
        every = self.checkpoint_every_steps
        next_poll = time.monotonic() + self.poll_interval_s
        for x, y in batches:
            i = self.batch_in_epoch
            boundary = acc == 1 or (i + 1) % acc == 0 or i + 1 == steps
            with no_sync() if (no_sync is not None and not boundary) else contextlib.nullcontext():
                loss, logits = self.train_step(x, y)
                if acc > 1:  # mean over the accumulation group, whose last one may be short
                    group = min(acc, steps - (i // acc) * acc)
                    self._backward(loss / group)
                else:
                    self._backward(loss)
            if boundary:
                self._optimizer_step(opt)
                if per_step_scheduler is not None:
                    per_step_scheduler.step()
                self.global_step += 1
            metrics.update(loss, logits, y)
            self.batch_in_epoch = i + 1
            for cb in batch_callbacks:
                cb.on_train_batch_end(self, i)
            if not boundary:
                continue
            # Host reads are rate-limited: by time on one process, every 32 steps on several
            # (where all ranks must take the same decision at the same step).
            if self.dist.enabled:
                if self.global_step % 32 == 0:
                    self._poll_distributed(epoch, started)
            elif time.monotonic() >= next_poll:
                self._raise_if_nonfinite(epoch)  # a sync point, rate-limited by time
                next_poll = time.monotonic() + self.poll_interval_s
            if self._stop_signal is not None and not self.dist.enabled:
                self._interrupt(epoch, mid_epoch=i + 1 < steps, started=started)
            if every and self.global_step % every == 0 and i + 1 < steps:
                self._save_mid_epoch(epoch, started)
        self._raise_if_nonfinite(epoch)

    def _save_mid_epoch(self, epoch: int, started: float) -> None:
        """last.pt inside an epoch: never from non-finite weights; with the seconds run so far."""
        self._raise_if_nonfinite(epoch)
        if self.dist.is_main:
            self._epoch_start["seconds"] = time.perf_counter() - started
            save_checkpoint(self._state(), self.last_path, "last checkpoint")

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
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
        else:
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
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
    # Evaluation

    @contextlib.contextmanager
    def _evaluating(self) -> Iterator[None]:
        """Eval mode and no autograd, for exactly this block; each module's own mode is restored after."""
        modes = _module_modes(self.model)
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            _restore_module_modes(self.model, modes)

    def _evaluate(self, loader, metrics: RunningMetrics) -> tuple[float, float, int]:
        metrics.reset(len(loader))
        with self._evaluating():
            for x, y in loader:
                loss, logits = self.eval_step(x, y)
                metrics.update(loss, logits, y)
        return metrics.compute()  # all-reduced over ranks: each sample counted once

    def _evaluate_public(self, data: Any, ckpt: str | None, prefix: str) -> dict:
        self._setup()
        loader = self._make_loader(data, train=False, name=prefix)
        self._preflight(loader, prefix, labelled=True)
        self._load_weights(ckpt)
        loss, acc, count = self._evaluate(loader, RunningMetrics(self.device, len(loader)))
        self._check_count(count, loader, prefix)
        return {f"{prefix}_loss": loss, f"{prefix}_acc": acc}

    def _check_count(self, count: int, loader, what: str) -> None:
        expected = _num_samples(loader)
        if expected is not None and count != expected:
            raise RuntimeError(f"{what} counted {count} samples but the data set holds {expected}")

    # ------------------------------------------------------------------------------------------
    # Set-up: device, processes, data

    def _setup(self) -> None:
        if self._set_up:
            return
        if distributed.launched_by_torchrun():
            self.dist = distributed.setup(self.device if self._requested_device is not None else None)
            if self._requested_device is None:
                self.device = distributed.default_device(self.dist.local_rank)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {str(self.device)!r} was asked for but CUDA is not available; use 'cpu'.")
        if self.precision == "fp16":
            if self.device.type != "cuda":
                raise ConfigError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU.")
            self.scaler = torch.amp.GradScaler("cuda")
        self.model.to(self.device)
        net = torch.compile(self.model) if self.compile else self.model
        self._eval_model = net
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._train_model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        else:
            self._train_model = net
        self._set_up = True

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _make_loader(self, data: Any, *, train: bool, name: str, labelled: bool = True):
        batch_size = self.batch_size if train else self.eval_batch_size
        rank, world = self.dist.rank, self.dist.world_size
        tensors = as_tensors(data, labelled=labelled, what=name)
        if tensors is not None:
            X, y = tensors
            if len(X) == 0:
                raise DataError(f"{name} data is empty (0 samples).")
            if self.check_inputs:
                check_finite(X, name)
            X, y = self._place(X), (None if y is None else self._place(y))
            return TensorLoader(X, y, batch_size, shuffle=train, generator=self.generator if train else None,
                                rank=rank, world_size=world, pad=train, device=self.device)
        if isinstance(data, DataLoader):
            # Re-sample through our sharded order: seeded (and resumable) shuffling for training; in
            # dataset order, each sample once, for evaluation and prediction.
            if train or world > 1 or not isinstance(data.sampler, torch.utils.data.SequentialSampler):
                if data.batch_size is None:
                    raise DataError(f"{name}: a DataLoader with a custom batch_sampler cannot be sharded; "
                                    "give a Dataset or a DataLoader with batch_size.")
                data = _rebuild_loader(data, ShardSampler(len(data.dataset), shuffle=train and _shuffles(data),
                                       generator=self.generator if train else None, rank=rank,
                                       world_size=world, pad=train), drop_last=data.drop_last and train)
            return DataLoaderAdapter(data, self.device, labelled)
        if isinstance(data, Dataset):
            sampler = ShardSampler(len(data), shuffle=train, generator=self.generator if train else None,
                                   rank=rank, world_size=world, pad=train)
            loader = DataLoader(data, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                                pin_memory=self.device.type == "cuda")
            return DataLoaderAdapter(loader, self.device, labelled)
        raise DataError(f"{name} data must be a DataLoader, a Dataset of (x, y), or a pair (X, y) of tensors or "
                        f"NumPy arrays; got {type(data).__name__}.")

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """In-memory data on the GPU when it fits (or in pinned memory for non_blocking copies)."""
        if self.device.type != "cuda":
            return t
        keep = self.on_device
        if keep is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            keep = t.numel() * t.element_size() < free / 4
        return t.to(self.device) if keep else t.pin_memory()

    def _preflight(self, loader, name: str, labelled: bool) -> None:
        """Clear errors before the first step: empty data, wrong output shape, labels out of range."""
        x, y = _sample_batch(loader, name)
        with self._evaluating():
            out = self.model(x[:2].to(self.device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != min(2, len(x)):
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DataError(f"the model's output for a {name} batch of {min(2, len(x))} inputs of shape "
                            f"{list(x.shape[1:])} is {shape}; trainval needs logits of shape [B, C] (one score per class).")
        self.num_classes = out.shape[1]
        if labelled:
            labels = loader.y if isinstance(loader, TensorLoader) else y
            if labels is None:
                raise DataError(f"{name} data has no labels; labels are needed to train, validate or test "
                                "(use predict for unlabelled inputs).")
            check_labels(labels, self.num_classes, name)

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def _prepare_run_folder(self, resume: bool) -> None:
        if self.dist.is_main:  # under the run folder's lock (see fit)
            runfolder.claim(self.out_dir, resume)
            runfolder.remove_own_temp_files(self.out_dir)  # temp files of writes cut short by a kill
        distributed.barrier()
        # A run exists once its first last.pt does. best.pt is written just before last.pt, so a
        # best.pt alone is a fit stopped inside its first epoch's saves: nothing to resume, and
        # starting over loses nothing.
        if resume:
            if not os.path.exists(self.last_path):
                raise CheckpointError(f"cannot resume: no last.pt in {self.out_dir} (no epoch was saved there); "
                                      "start without resume to train from the beginning.")
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

    def _best_state(self) -> dict:
        return {"model": unwrap_model(self.model).state_dict(), "epoch": self.epoch,
                "monitor": self.monitor, "value": self.best_value, "config": self.config,
                "versions": _versions()}

    def _state(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        mid = self.batch_in_epoch > 0
        return {
            "model": unwrap_model(self.model).state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng_state(),
            "generator": self.generator.get_state(),
            "epoch_start": self._epoch_start if mid else None,
            "train_metrics": self.train_metrics.state_dict() if mid else None,
            "best": {"value": self.best_value, "epoch": self.best_epoch},
            "monitor": self.monitor,
            "mode": self.mode,
            "should_stop": self.should_stop,
            "history": self.history,
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "config": self.config,
            "versions": _versions(),
        }

    def _restore(self, state: dict) -> None:
        needed = ("optimizer", "rng", "generator", "history", "global_step")
        missing = [k for k in needed if k not in state]
        if missing:
            raise CheckpointError(f"{self.last_path} cannot be resumed from: it lacks {', '.join(missing)} "
                                  "(a weights-only checkpoint?).")
        load_model_weights(self.model, state["model"], self.last_path)
        saved_keys = {k for g in state["optimizer"].get("param_groups", []) for k in g}
        foreign = sorted(saved_keys - {k for g in self.optimizer.param_groups for k in g})
        try:
            if foreign:  # loading would succeed, then the first step fail (e.g. Adam's state into SGD)
                raise ValueError(f"it has settings this optimizer lacks: {', '.join(foreign)}")
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:  # another optimizer or scheduler than last.pt's
            raise CheckpointError(f"{self.last_path} cannot be resumed with this optimizer/scheduler: its saved "
                                  f"state does not fit ({type(e).__name__}: {e}). Resume with the ones it was "
                                  "trained with.") from None
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state.get("batch_in_epoch", 0))
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        self.best_value, self.best_epoch = state["best"]["value"], state["best"]["epoch"]
        self.should_stop = bool(state.get("should_stop", False))
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(cb_state)
        self.generator.set_state(state["generator"])
        set_rng_state(state["rng"])
        if self.batch_in_epoch > 0:
            self._epoch_start = state["epoch_start"]
            self._pending_rng = state["rng"]
            self.train_metrics.load_state_dict(state["train_metrics"], len(self.train_loader))

    def _load_weights(self, ckpt: str | None) -> None:
        if ckpt is None:
            return
        path = {"best": self.best_path, "last": self.last_path}.get(ckpt, ckpt)
        distributed.barrier()  # rank 0 may still be writing it
        if ckpt == "best" and not os.path.exists(path):
            raise CheckpointError(f"no best.pt in {self.out_dir}: run fit first, or pass ckpt=None to use the "
                                  "current weights.")
        state = load_checkpoint(path, map_location=self.device)
        load_model_weights(self.model, state["model"], path)

    def _improved(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def _weights_finite(self) -> bool:
        params = [p.detach() for p in self.model.parameters()]
        if not params:
            return True
        return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())  # one sync per epoch

    # ------------------------------------------------------------------------------------------
    # Non-finite loss and signals

    def _raise_if_nonfinite(self, epoch: int) -> None:
        bad = self.train_metrics.first_nonfinite()  # a sync point
        if bad is not None:
            value = self.train_metrics.losses[bad].item()
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch}, step {bad + 1} of {len(self.train_loader)}; "
                f"training stopped and nothing from this epoch was saved (the last good checkpoint is "
                f"{self.last_path}). Lower the learning rate, clip gradients or check the data."
            )

    def _poll_distributed(self, epoch: int, started: float) -> None:
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
            self._interrupt(epoch, mid_epoch=self.batch_in_epoch < len(self.train_loader), started=started)

    def _interrupt(self, epoch: int, mid_epoch: bool, started: float = 0.0) -> None:
        if mid_epoch:
            self._save_mid_epoch(epoch, started)
        distributed.barrier()
        name = signal.Signals(self._stop_signal).name
        where = f"epoch {epoch}, batch {self.batch_in_epoch}" if mid_epoch else f"the end of epoch {epoch}"
        raise Interrupted(f"stopped by {name} at {where}; {self.last_path} is saved. Resume with "
                          "`trainval fit CONFIG --resume` or Trainer.fit(..., resume=True).", self._stop_signal)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save last.pt, stop. A second SIGINT: exit at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop_signal is not None:
                distributed.exit_process(128 + signum)  # checkpoints are atomic: nothing is corrupted
            self._stop_signal = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self._stop_signal = None
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# ----------------------------------------------------------------------------------------------
# Helpers


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_module_modes(model: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _versions() -> dict:
    from trainval import __version__

    return {"trainval": __version__, "torch": str(torch.__version__)}


def _num_samples(loader) -> int | None:
    if isinstance(loader, TensorLoader):
        return len(loader.X)
    if isinstance(loader, DataLoaderAdapter):
        inner = loader.loader
        if isinstance(inner.sampler, ShardSampler):
            return len(inner.dataset)
    return None


def _shuffles(loader: DataLoader) -> bool:
    return isinstance(loader.sampler, torch.utils.data.RandomSampler)


def _rebuild_loader(loader: DataLoader, sampler, drop_last: bool) -> DataLoader:
    """The same DataLoader, drawing indices from ``sampler`` (our sharded, seeded order)."""
    kwargs = dict(batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                  collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=drop_last,
                  timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                  persistent_workers=loader.persistent_workers)
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs)


def _sample_batch(loader, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A couple of samples for the pre-flight checks, read without touching any RNG."""
    if isinstance(loader, TensorLoader):
        if len(loader.X) == 0:
            raise DataError(f"{name} data is empty (0 samples).")
        return loader.X[:2], (None if loader.y is None else loader.y[:2])
    inner = loader.loader
    dataset = inner.dataset
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"{name}: iterable-style datasets are not supported; give a map-style Dataset.") from None
    if n == 0:
        raise DataError(f"{name} data is empty (0 samples).")
    collate = inner.collate_fn or default_collate
    batch = collate([dataset[i] for i in range(min(2, n))])
    if isinstance(batch, (tuple, list)):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and loader.labelled else None
    else:
        x, y = batch, None
    if y is not None:
        from trainval.data import prepare_labels

        y = prepare_labels(torch.as_tensor(y), f"{name} labels")
    return x, y
