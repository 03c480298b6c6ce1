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
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from trainval import distributed
from trainval.data import (
    DataLoaderAdapter,
    Loader,
    Step,
    StreamLoader,
    TensorLoader,
    describe,
    make_loader,
    tabular,
    tree_map,
)
from trainval.errors import ConfigError, DataError, TrainvalError
from trainval.fsio import atomic_write
from trainval.loop import materialize
from trainval.loop.callbacks import Callback, Curves, ProgressBar, write_metrics_csv
from trainval.loop.checkpointing import Checkpoints
from trainval.loop.checks import (
    BATCHNORM,
    check_loss_value,
    check_optimizer_and_scheduler,
    check_training_data,
)
from trainval.loop.guard import Guard
from trainval.loop.plan import StepPlan
from trainval.loop.precision import Precision
from trainval.loop.strategies import SingleProcess, make_strategy
from trainval.loop.summary import RunSummary
from trainval.metrics import MetricSet, confusion_metric, metric_direction, resolve_metrics
from trainval.options import TrainerOptionsArgs, make_options, signature_with_options
from trainval.options import docs as option_docs
from trainval.run.runfolder import holds_run_folder, is_main_process
from trainval.run.summary import record_test
from trainval.state import LoopState, rng_state, seed_everything, set_rng_state
from trainval.tasks import (
    MultiTask,
    Task,
    check_loss,
    check_threshold,
    first_len,
    is_builtin_loss,
    is_structured,
    loss_weight_fn,
    make_task,
    task_for_output,
)
from trainval.untrusted import shown_line

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11

__all__ = ["Trainer", "seed_everything"]

_T = TypeVar("_T")


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
            callbacks: :class:`~trainval.loop.callbacks.Callback` objects.
            scheduler: a learning-rate scheduler built on ``optimizer`` (see ``scheduler_interval``).
            config: a plain dict describing the run, saved in every checkpoint.
            **options: keyword options, each declared once in :class:`~trainval.options.TrainerOptions` (its type,
                default and check) and kept as ``trainer.options``:

    {options}
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
        callbacks: Iterable[Callback] = (),
        scheduler: Any = None,
        config: dict | None = None,
        **options: Unpack[TrainerOptionsArgs],
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.options = make_options(options)  # each checked as TrainerOptions declares it
        o = self.options
        device, strategy = o.device, o.strategy
        try:
            self.device: torch.device = (
                torch.device(device) if device is not None else distributed.default_device()
            )
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"device {device!r} is not a device torch knows; use 'cpu', 'cuda' or 'cuda:N'."
            ) from None
        make_strategy(strategy, distributed_on=False)  # a wrong name fails here, before any process group

        self.model = model
        self.optimizer = (
            optimizer if optimizer is not None else torch.optim.AdamW(model.parameters(), lr=1e-3)
        )
        if loss_fn is not None:
            check_loss(loss_fn)
        check_optimizer_and_scheduler(
            self.model, self.optimizer, loss_fn, scheduler, default_optimizer=optimizer is None
        )
        # The task may wait for the model's output width (a BCE loss: binary or multilabel), or for the first
        # batch's targets (the user's own loss: dict/tuple targets make a multi-head task), and the default
        # loss for the task: they are settled in the first pre-flight check.
        self._task_error: ConfigError | None = None  # why the user's own loss names no task (raised then)
        self._task: Task | None
        if isinstance(task, dict) or _per_head(metrics):  # a multi-head model: a task (and metrics) per head
            check_threshold(o.threshold)
            self._task = MultiTask(
                spec=dict(cast(dict, task) or {}), ignore_index=o.ignore_index, threshold=o.threshold
            )
        elif task is None and loss_fn is not None and not is_builtin_loss(loss_fn):
            try:
                self._task = make_task(None, loss_fn, ignore_index=o.ignore_index, threshold=o.threshold)
            except ConfigError as e:  # dict/tuple targets will make it a multi-head task (see _preflight)
                self._task, self._task_error = None, e
        else:
            self._task = make_task(task, loss_fn, ignore_index=o.ignore_index, threshold=o.threshold)
        self._loss_fn: nn.Module | None = (
            loss_fn  # None: the task's default, chosen once the output's width is known
        )
        self._metrics_spec = metrics
        # {name: metric}; settled with the task (now, or in the first pre-flight check for a BCE loss)
        # (a multi-head task's once its heads are settled by the first batch)
        self.metrics: dict[str, Any] = (
            resolve_metrics(metrics, self._task)
            if self._task is not None and not isinstance(self._task, MultiTask)
            else {}
        )
        self.callbacks = list(callbacks)
        self.scheduler = scheduler
        self.scheduler_interval = o.scheduler_interval or _default_interval(scheduler)
        self.config = config

        # Settled in _setup, once the process count and the device are known
        self.dist = distributed.DistInfo()
        self.strategy: SingleProcess = SingleProcess()
        self.amp = Precision("fp32", torch.device("cpu"))
        self._train_model: nn.Module = model
        self._eval_model: nn.Module = model
        self._set_up = False

        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.state = LoopState(monitor=o.monitor or "", mode=o.mode or "max")  # saved in last.pt
        self.checkpoints = Checkpoints(self)  # the run folder's files: best.pt, last.pt, resume
        self.guard = Guard(self)  # non-finite losses and weights, signals
        self._train_loader: Loader | None = None  # fit's, set before its first step
        self.val_loader: Loader | None = None
        self._train_metrics: MetricSet | None = None
        self._val_metrics: MetricSet | None = None
        self.pending_rng: dict | None = None  # a mid-epoch resume's RNG state, set once the epoch is redrawn
        self.epoch_started = 0.0  # perf_counter at the epoch's start (less the seconds run before a resume)
        self.row_started = 0.0  # perf_counter at the previous row (val_every_steps: a row's seconds)
        self.plan = StepPlan(self.options)  # when steps, rows, saves and the end are due
        # one epoch's working state (see _train_epoch)
        self._exact: tuple[Callable[[torch.Tensor], Any], bool] | None = (
            None  # (weigh, across_ranks), or None
        )
        self._group_batches = 0  # real batches (every rank's) in this accumulation group so far
        self._weigh: Any = None
        self._bar: ProgressBar | None = None
        # DataFrames: the columns, categories and class names learnt from fit's training frame (or read
        # from the checkpoint that test/predict load); saved in every checkpoint. None: no frame seen.
        self.table: tabular.TableEncoding | None = None

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
    def best_step(self) -> int | None:
        return self.state.best_step

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

    # What the first batch settles (see _preflight) and what fit sets before its first step: read after that.

    @property
    def task(self) -> Task:
        return _settled(self._task, "task", "the model's first output (a BCE loss: binary or multilabel)")

    @property
    def loss_fn(self) -> nn.Module:
        return _settled(self._loss_fn, "loss_fn", "the task's default loss, once the model's output is known")

    @property
    def train_loader(self) -> Loader:
        return _settled(self._train_loader, "train_loader", "fit")

    @property
    def train_metrics(self) -> MetricSet:
        return _settled(self._train_metrics, "train_metrics", "fit")

    @property
    def val_metrics(self) -> MetricSet:
        return _settled(self._val_metrics, "val_metrics", "fit")

    @property
    def max_epochs(self) -> int:
        return self.options.max_epochs

    # ------------------------------------------------------------------------------------------
    # Paths and reporting

    @property
    def out_dir(self) -> str:
        return self.options.out_dir

    @property
    def best_path(self) -> str:
        return os.path.join(self.out_dir, "best.pt")

    @property
    def last_path(self) -> str:
        return os.path.join(self.out_dir, "last.pt")

    def log(self, message: str) -> None:
        """The one reporting path: rank 0 prints; beside a live progress bar, above it."""
        # Before fit joins the process group, self.dist is every rank's default (rank 0): RANK decides.
        if not (self.dist.is_main and is_main_process()):
            return
        message = shown_line(message)  # it may quote a file's text (a column, a path): no terminal escapes
        if self._bar is not None and self._bar.bar is not None:
            self._bar.bar.write(message, file=sys.stdout)
        else:
            print(message, flush=True)

    # ------------------------------------------------------------------------------------------
    # Public entry points

    @holds_run_folder  # one writer per run folder, released on any exit
    def fit(
        self, train_data: Any, val_data: Any = None, *, resume: bool = False, target: str | None = None
    ) -> list[dict]:
        """Train for ``max_epochs``, validating after each epoch; return the per-epoch history.

        Args:
            train_data: a ``DataLoader``, a map-style ``Dataset``, an ``IterableDataset`` (a stream: an epoch
                is one pass over it, each rank reading its own share; see :class:`~trainval.data.StreamLoader`),
                or in-memory ``(X, y)`` (``X`` a tensor/array, a tuple or a dict of them). A pandas
                ``DataFrame`` of features with a ``Series`` target, ``(df[features], df["label"])``, or a whole
                ``DataFrame`` with ``target="label"``: its column names, the categories of its text columns
                (one-hot encoded) and the class names of a text target are learnt here (``trainer.table``),
                saved in every checkpoint and applied by validate/test/predict, which take columns by name.
            val_data: the same kinds, or ``None`` (then ``monitor`` must be a train metric).
            resume: continue from ``out_dir/last.pt`` exactly where it stopped (mid-epoch too).
            target: the target column of DataFrame data (``train_data`` and ``val_data``).
        """
        self._setup()
        train_data = self._from_frame(train_data, target, "train", learn=True)
        val_data = self._from_frame(val_data, target, "val") if val_data is not None else None
        self._settle_fit(train_data, val_data)  # loaders, pre-flight, monitor, metric sets: before any step
        self._start_run(resume)  # the run folder claimed; last.pt restored, or the seeds set
        callbacks = self._fit_callbacks()
        modes = _module_modes(self.model)
        try:
            with self.guard.handlers():
                for cb in callbacks:
                    cb.on_fit_start(self)
                self.row_started = time.perf_counter() - self.state.row_seconds
                while (
                    self.epoch < self.max_epochs
                    and not self.should_stop
                    and not self.plan.steps_done(self.global_step)
                ):
                    self._run_epoch(callbacks)
                self.checkpoints.wait()  # the last save is on disk before the run ends (its error raises here)
                max_steps = self.options.max_steps
                if max_steps is not None and not self.should_stop and self.global_step < max_steps:
                    self.log(
                        f"max_epochs={self.max_epochs} ended the run at step {self.global_step}, before "
                        f"max_steps={max_steps}: raise max_epochs (CLI train.epochs) to train for more steps."
                    )
                for cb in callbacks:
                    cb.on_fit_end(self)
        except BaseException:
            self.checkpoints.wait_quietly()  # no write left running behind the error; the first error wins
            raise
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
            _restore_module_modes(self.model, modes)
        distributed.barrier()
        return self.history

    def _settle_fit(self, train_data: Any, val_data: Any) -> None:
        if val_data is None and (self.options.monitor or "").startswith("val_"):
            raise ConfigError(
                f"monitor={self.options.monitor!r} needs validation data: pass val_data, "
                "or monitor a train metric (e.g. 'train_loss')."
            )
        self._train_loader = self._make_loader(train_data, train=True, name="train")
        self.val_loader = (
            self._make_loader(val_data, train=False, name="val") if val_data is not None else None
        )
        self._preflight(self.train_loader, "train", labelled=True)
        if self.val_loader is not None:
            self._preflight(self.val_loader, "val", labelled=True)
        self._choose_monitor(has_val=self.val_loader is not None)
        self._train_metrics = self._metric_set(
            self.train_loader.num_batches or 64
        )  # a stream's may be unknown
        self._weigh = loss_weight_fn(self.loss_fn, self.task)  # what each batch's mean loss was divided by
        val_batches = (self.val_loader.num_batches or 64) if self.val_loader is not None else 1
        self._val_metrics = self._metric_set(val_batches)

    def _start_run(self, resume: bool) -> None:
        if not resume and distributed.elastic_restart_count() > 0:
            # torchrun restarted the workers after a failure: continue from last.pt (rank 0's view decides)
            resume = distributed.broadcast_object(os.path.exists(self.last_path))
        last = self.checkpoints.prepare_run_folder(resume)
        if last is not None:
            self.checkpoints.restore(last)
            self.log(f"resuming from {self.last_path} (epoch {self.epoch}, batch {self.batch_in_epoch})")
            if self.dist.is_main and self.history:  # a row a crash cut from metrics.csv comes back
                write_metrics_csv(os.path.join(self.out_dir, "metrics.csv"), self.history)
        else:
            seed_everything(
                self.options.seed + self.dist.rank
            )  # model randomness (dropout, workers): per rank
            self.generator.manual_seed(self.options.seed)  # the shuffling permutation: shared by every rank
        self.checkpoints.tidy_top_k()

    def _fit_callbacks(self) -> list[Callback]:
        """The progress bar first; the user's; on rank 0 the summary (it records the columns the user's
        callbacks add to a row) and the curves plot last."""
        main = self.dist.is_main
        self._bar = ProgressBar() if (self.options.progress and main) else None
        return [
            *([self._bar] if self._bar else []),
            *self.callbacks,
            *([RunSummary()] if main else []),
            *([Curves()] if self.options.plot and main else []),
        ]

    def validate(
        self,
        val_data: Any,
        ckpt: str | None = None,
        *,
        target: str | None = None,
        threshold: float | None = None,
    ) -> dict:
        """``{"val_loss", "val_<metric>", ...}`` on ``val_data`` with the current weights (or ``ckpt``);
        ``target``: the target column of a DataFrame; ``threshold``: binary/multilabel, for this call only (as
        :meth:`test`)."""
        return self._score(self._from_frame(val_data, target, "val", ckpt=ckpt), ckpt, "val", threshold)

    def test(
        self,
        test_data: Any,
        ckpt: str | None = "best",
        *,
        target: str | None = None,
        threshold: float | None = None,
    ) -> dict:
        """Reload ``best.pt`` (or ``ckpt``), then ``{"test_loss", "test_<metric>", ...}`` on ``test_data``.

        For a multiclass task the confusion matrix (rows: true class, columns: predicted) is also
        written to ``out_dir/confusion_matrix.csv`` when the run folder exists. The metrics of the run's
        own ``best``/``last`` checkpoint also go into its ``summary.json``.

        Args:
            target: the target column of a DataFrame (an unknown class name there is refused, naming it).
            threshold: binary/multilabel (every such head of a multi-head model): the probability above which
                a prediction is 1, for this call only (default: the Trainer's ``threshold``); recorded in the
                result as ``test_threshold`` (and so in summary.json and the CLI's test.json).
        """
        metrics = self._score(self._from_frame(test_data, target, "test", ckpt=ckpt), ckpt, "test", threshold)
        if self.dist.is_main and ckpt in ("best", "last"):
            record_test(self.out_dir, metrics)
        return metrics

    def predict(self, inputs: Any, ckpt: str | None = "best", *, threshold: float | None = None) -> Any:
        """Predictions from ``best.pt`` (or ``ckpt``), input order, on the CPU; targets are ignored.

        Class ids (multiclass: one per sample, or per position for dense outputs), 0/1 (binary),
        multi-hot rows (multilabel, ``threshold``), or the outputs (regression); a multi-head model's as a
        dict by head. A DataFrame's columns are taken by name (others are ignored);
        ``trainer.table.decode_classes(ids)`` gives class names. ``threshold``: binary/multilabel, for this call
        only (default: the Trainer's).
        """
        raw = self._predict_outputs(
            self._from_frame(inputs, None, "predict", ckpt=ckpt, labelled=False), ckpt
        )
        with self._threshold(threshold):
            return self.task.predict(raw)

    def predict_proba(self, inputs: Any, ckpt: str | None = "best") -> torch.Tensor:
        """Class probabilities: ``[N, C, *]`` (multiclass, softmax), ``[N]`` (binary, the positive class),
        ``[N, K]`` (multilabel, sigmoid); input order, on the CPU."""
        raw = self._predict_outputs(
            self._from_frame(inputs, None, "predict", ckpt=ckpt, labelled=False), ckpt
        )
        return self.task.proba(raw)  # the regression task refuses, in one clear sentence

    # ------------------------------------------------------------------------------------------
    # Per-batch steps: override these in a subclass to change what one batch does

    def forward(self, model: nn.Module, inputs: Any) -> Any:
        """``model(x)``, ``model(*x)`` or ``model(**x)``; the prediction out of a tuple or dict output.

        A multi-head model (dict or tuple targets) keeps its whole output: the loss and the heads' metrics
        take their parts of it.
        """
        if isinstance(inputs, torch.Tensor):
            out = model(inputs)
        elif isinstance(inputs, Mapping):
            out = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            out = model(*inputs)
        else:
            out = model(inputs)
        if isinstance(out, torch.Tensor) or isinstance(self._task, MultiTask):
            return out
        if isinstance(out, Mapping):
            if self.options.output_key in out:
                return out[self.options.output_key]
            raise DataError(
                f"the model returned a dict with keys {list(out)}; trainval takes the prediction from "
                f"'{self.options.output_key}' (set output_key= to one of them)."
            )
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            return out[0]
        raise DataError(
            f"the model returned {describe(out)}; trainval needs a tensor, a tuple whose first "
            f"element is the prediction, or a dict with it under '{self.options.output_key}'."
        )

    def train_step(self, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        """Forward and loss for one training batch (training mode, autograd on): ``(loss, output)``.

        ``loss_fn(output, y)``; for dict/tuple targets (a multi-head model) ``output`` and ``y`` are whole.
        """
        with self.amp.autocast():
            output = self.forward(self._train_model, x)
            loss = self.loss_fn(*self.task.loss_inputs(output, y))
        return loss, output

    def eval_step(self, x: Any, y: Any) -> tuple[torch.Tensor, Any]:
        """Forward and loss for one evaluation batch (eval mode, no autograd): ``(loss, output)``."""
        with self.amp.autocast():
            output = self.forward(self._eval_model, x)
            loss = self.loss_fn(*self.task.loss_inputs(output, y))
        return loss, output

    def predict_step(self, x: Any) -> Any:
        """The model's output for one batch of inputs (eval mode, no autograd)."""
        with self.amp.autocast():
            return self.forward(self._eval_model, x)

    # ------------------------------------------------------------------------------------------
    # One epoch

    def _run_epoch(self, callbacks: list[Callback]) -> None:
        epoch = self.epoch + 1
        # a resumed epoch counts the seconds it had run before the interruption
        start = self.state.epoch_start
        done_before = start.get("seconds", 0.0) if (self.batch_in_epoch and start) else 0.0
        self.epoch_started = time.perf_counter() - done_before
        lrs = [group["lr"] for group in self.optimizer.param_groups]  # before this epoch's scheduler steps
        self._train_model.train()
        for cb in callbacks:  # after train(): a callback may freeze modules or put some in eval mode
            cb.on_epoch_start(self, epoch)
        if self.options.eval_frozen_batchnorm:
            _eval_frozen_batchnorm(self.model)
        if not self._train_epoch(epoch, callbacks):
            return  # max_steps reached (or a stop decided at a row) inside the epoch: its row and last.pt are written
        if self.plan.row_due(self.global_step, self.epoch, at_epoch_end=True):
            self._end_interval(
                epoch, callbacks, lrs if self.options.val_every_steps is None else None, epoch_end=True
            )
        else:  # val_every_steps: no row at this epoch's end; last.pt holds the train metrics since the last one
            self._step_scheduler_at(None, epoch_end=True)
            self.state.epoch, self.state.batch_in_epoch, self.state.epoch_start = epoch, 0, None
            if self.dist.enabled:  # every rank must agree, or the next collective hangs
                self.should_stop = bool(distributed.all_reduce_max(int(self.should_stop)))
            self.checkpoints.save_last(with_metrics=True)
        self.guard.end_of_epoch(epoch)

    def _end_interval(
        self, epoch: int, callbacks: list[Callback], lrs: list[float] | None, epoch_end: bool
    ) -> None:
        """The end of an evaluation interval (an epoch, or ``val_every_steps`` optimizer steps): one row.

        The train metrics since the previous row (then reset), validation, the scheduler, the log line,
        best.pt and top-k files, the callbacks' ``on_epoch_end`` (which may stop the run: every rank agrees),
        and last.pt with metrics.csv. ``epoch_end``: the epoch is over (else the row is inside it, at
        ``global_step``); ``lrs``: the learning rates the row shows (default: the current ones).
        """
        if not epoch_end:  # (the epoch's end checked these at the end of _train_epoch)
            self.guard.raise_if_nonfinite(epoch)
            self.guard.raise_if_weights_nonfinite(epoch)
        train, _ = self.train_metrics.compute()  # a sync point: once per row
        self.train_metrics.reset(self.train_loader.num_batches or 64)  # the next row's batches start here
        row: dict[str, Any] = {
            "epoch": epoch,
            "step": self.global_step,
            **{f"train_{k}": v for k, v in train.items()},
        }
        with self._evaluation_weights(callbacks):  # e.g. EMA's averaged weights, for validation and best.pt
            if self.val_loader is not None:
                val, count = self._evaluate(self.val_loader, self.val_metrics)
                self._check_count(count, self.val_loader, "validation")
                row.update({f"val_{k}": v for k, v in val.items()})
            lrs = lrs if lrs is not None else [group["lr"] for group in self.optimizer.param_groups]
            row["lr"] = lrs[0]  # param group 0; lr_1, lr_2... for the others
            row.update({f"lr_{i}": lr for i, lr in enumerate(lrs[1:], start=1)})
            self._step_scheduler_at(row, epoch_end)
            if epoch_end:
                self.state.epoch, self.state.batch_in_epoch, self.state.epoch_start = epoch, 0, None
            else:
                self.epoch_record()["seconds"] = time.perf_counter() - self.epoch_started
            by_epoch = epoch_end and self.options.val_every_steps is None
            self.log(self._epoch_line(epoch, row) if by_epoch else self._step_line(row))
            # the weights are finite: checked at the end of _train_epoch or above
            self.checkpoints.save_best_and_top_k(row[self.monitor], epoch)
        now = time.perf_counter()
        row["seconds"] = round(
            now - (self.epoch_started if self.options.val_every_steps is None else self.row_started), 4
        )
        self.row_started = now
        self.history.append(row)
        for cb in callbacks:
            cb.on_epoch_end(self, row)  # may add columns to the row: metrics.csv and the plot show them
        if self.dist.enabled:  # every rank must agree, or the next collective hangs
            self.should_stop = bool(distributed.all_reduce_max(int(self.should_stop)))
        self.checkpoints.save_last(with_metrics=True)

    def _step_line(self, row: dict) -> str:
        """``[step 000200/001000] Train ... | Val ...``: a row at an optimizer step (val_every_steps, max_steps)."""
        total = self.plan.total_steps(self.train_loader.num_batches)
        of = f"/{total:06d}" if total else ""
        return f"[step {row['step']:06d}{of}]" + self._epoch_line(row["epoch"], row).split("]", 1)[1]

    @contextlib.contextmanager
    def _evaluation_weights(self, callbacks: list[Callback]) -> Iterator[None]:
        """The weights validation and best.pt see: callbacks may swap theirs in (EMA) and back after."""
        entered: list[Callback] = []
        try:
            for cb in callbacks:
                cb.on_validation_start(self)
                entered.append(cb)
            yield
        finally:
            for cb in reversed(entered):
                cb.on_validation_end(self)

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

    def _train_epoch(self, epoch: int, callbacks: list[Callback]) -> bool:
        """One pass over the training data (from ``batch_in_epoch`` on a resume); rows at ``val_every_steps``.

        Returns False where the run ends inside the epoch (``max_steps``, or a stop decided at a row),
        True once the epoch is done. No host sync per batch: the loss and metrics stay on the device.
        """
        steps = self._epoch_steps(epoch)  # resume position, sampler state, each batch's weight (plan)
        loader, metrics, task, plan = self.train_loader, self.train_metrics, self.task, self.plan
        batches = (
            None if loader.is_stream else loader.num_batches
        )  # a stream's length is learnt by reading it
        on_batch = [cb for cb in callbacks if type(cb).on_train_batch_end is not Callback.on_train_batch_end]
        self.guard.start_epoch()
        self._group_batches, stand_in, first = 0, None, True
        for step in steps:
            i, x, y = self.state.batch_in_epoch, step.x, step.y
            boundary = plan.boundary(i, step)  # (a stream's last step is known once the next batch is read)
            group = plan.group_size(i, batches)
            with self.strategy.no_sync(
                self._train_model, sync=boundary
            ):  # DDP: all-reduce on the boundary only
                if x is None or y is None:  # this rank's stream share ran out before the others'
                    stand_in = stand_in or self._stand_in(loader)
                    self._stand_in_step(*stand_in)
                else:
                    loss, output = self.train_step(x, y)
                    if first:  # the first batch's loss (free: no host sync), after on_epoch_start's freezing
                        check_loss_value(loss, True, self.model, self.optimizer)
                        first = False
                    self.amp.backward(_share(loss, step.scale, group))  # of the accumulation group's step
            self._group_batches += step.batches  # real batches (every rank's) in this accumulation group
            if boundary:
                self._optimizer_step(group, callbacks)
            if (
                x is not None and y is not None
            ):  # padding (repeats that even out the ranks' shards) not counted
                size = first_len(y)
                real = loader.unpadded(i, size)
                weight = step.weight if step.weight is not None and real == size else None
                if real < size:
                    loss, output, y = self._unpadded_part(output, y, real)
                metrics.update(
                    loss,
                    self._weigh(y) if weight is None else weight,
                    task.outputs(_detached(output), y),
                    real,
                )
            self.state.batch_in_epoch = i + 1
            for cb in on_batch:
                cb.on_train_batch_end(self, i)
            if boundary and not self._after_optimizer_step(epoch, step, callbacks):
                return False
        self.guard.raise_if_nonfinite(epoch)
        self.guard.raise_if_weights_nonfinite(epoch)  # the last step's update, which no loss has seen yet
        return True

    def _epoch_steps(self, epoch: int) -> Iterator[Step]:
        """The epoch's steps: from its start, or (a mid-epoch resume) redrawn from its start state with the
        batches already done skipped (a stream re-reads them), then the RNG state saved at the interruption.

        With exact accumulation (a loss whose denominator trainval knows) the plan reads each group ahead
        and sets every step's ``scale``; otherwise (one process without accumulation, or the user's own loss)
        the loop keeps the mean of the group's batch means.
        """
        loader = self.train_loader
        loader.set_epoch(epoch - 1)  # a stream's own shuffling, like DistributedSampler.set_epoch (from 0)
        lockstep = self.dist.enabled  # a stream's shares may differ by a batch or more: count per step
        if self.batch_in_epoch > 0:
            start = self.epoch_record()
            set_rng_state(start["rng"])
            self.generator.set_state(start["generator"])
            if start.get("loader") is not None:  # a user sampler's own generators (absent: an older last.pt)
                loader.load_state_dict(start["loader"])
            steps = loader.steps(self.batch_in_epoch, lockstep)
            assert self.pending_rng is not None  # restored with the epoch's position (Checkpoints.restore)
            set_rng_state(self.pending_rng)
        else:
            start = {
                "rng": rng_state(),
                "generator": self.generator.get_state(),
                "loader": loader.state_dict(),
            }
            self.state.epoch_start = start
            steps = loader.steps(0, lockstep)
        self.pending_rng = None  # (the train metrics are reset after each row: they may span epochs)
        self._exact = self.plan.exact_weighting(self.loss_fn, self.task, loader, self.dist.world_size)
        if self._exact is not None:
            weigh, across_ranks = self._exact
            steps = self.plan.weighted(
                steps, self.batch_in_epoch, weigh, across_ranks, self.dist.world_size, self.device
            )
        return steps

    def _optimizer_step(self, group: int, callbacks: list[Callback]) -> None:
        """At an accumulation boundary: the optimizer step (clipping, the scaler), the per-step scheduler,
        ``global_step``, and the callbacks that follow every step (EMA's update: device work only)."""
        world = self.dist.world_size
        if self._exact is None and self._group_batches != world * group:
            # the mean of batch means: a stream's last steps held fewer batches than a full step
            self._scale_gradients(world * group / self._group_batches)
        self._group_batches = 0
        self.amp.step(self.optimizer, self.options.grad_clip, self.strategy.clip_grad_norm, self.model)
        if self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler(self.scheduler)
        self.state.global_step += 1
        for cb in callbacks:
            if type(cb).on_optimizer_step is not Callback.on_optimizer_step:
                cb.on_optimizer_step(self)

    def _after_optimizer_step(self, epoch: int, step: Step, callbacks: list[Callback]) -> bool:
        """The guard's polls (a signal stops here), then a row (val_every_steps, max_steps) or a mid-epoch
        last.pt when due. False: the run ends inside this epoch."""
        self.guard.after_step(epoch, step.last)  # rate-limited host reads
        if step.last:
            return True  # the epoch's end (in _run_epoch) writes its row and last.pt
        if self.plan.row_due(self.global_step, self.epoch, at_epoch_end=False):
            self._end_interval(epoch, callbacks, None, epoch_end=False)
            return not (self.plan.steps_done(self.global_step) or self.should_stop)
        if self.plan.checkpoint_due(self.global_step):
            self.checkpoints.save_mid_epoch(epoch)
        return True

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
                f"its batches per epoch (CLI: scheduler.steps_per_epoch). ({e})"
            ) from None

    def _stand_in(self, loader: Loader) -> tuple[Any, Any]:
        """The stream's first samples on the device: what a rank whose share ran out computes on."""
        x, y = loader.sample_batch()
        x = tree_map(lambda t: t.to(self.device), x)
        return x, (None if y is None else self.task.cast_target(tree_map(lambda t: t.to(self.device), y)))

    def _stand_in_step(self, x: Any, y: Any) -> None:
        """A training step without a batch of this rank's own: the forward and backward of a zero loss.

        The other ranks' gradient collectives (DDP's all-reduce, FSDP's gathers and reduce-scatters) need
        this rank's part; it adds zeros. Every module runs in eval mode (no BatchNorm statistics, no dropout
        draws from samples that were trained on already), so nothing is counted twice; the gradients are
        rescaled to the mean over the real batches at the optimizer step.
        """
        assert y is not None  # a training stream is labelled (checked by the pre-flight)
        with self._evaluating(grad=True):
            loss, _ = self.train_step(x, y)
            self.amp.backward(loss * 0.0)

    def _scale_gradients(self, factor: float) -> None:
        """Gradients times ``factor``: the mean over the step's real batches where some ranks had none
        (a stream's last steps; DDP and FSDP divide by the number of ranks). Once per epoch at most."""
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    def _unpadded_part(self, output: Any, y: Any, real: int) -> tuple[torch.Tensor, Any, Any]:
        """The loss, output and target of a padded batch's first ``real`` samples (the rest are repeats).

        Only the last batch or two of an epoch on some ranks; the loss is recomputed for the metrics
        alone (no autograd), with weight 0 when the whole batch is padding. No host sync.
        """
        output, y = tree_map(lambda t: t.detach()[:real], output), tree_map(lambda t: t[:real], y)
        if real == 0:
            return torch.zeros((), device=self.device), output, y
        with torch.no_grad():
            return self.loss_fn(*self.task.loss_inputs(output, y)), output, y

    def _step_scheduler_at(self, row: dict | None, epoch_end: bool) -> None:
        """An epoch-interval scheduler steps at each epoch's end; ReduceLROnPlateau at each row instead
        (with val_every_steps: every evaluation, its patience counting evaluations), with the monitored value."""
        if self.scheduler is None or self.scheduler_interval != "epoch":
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            if row is not None:
                value = row.get(self.monitor)
                self.scheduler.step(value if value is not None else row["train_loss"])
        elif epoch_end:
            self.scheduler.step()

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
                if step.x is None or step.y is None:  # (y: evaluation data is labelled, see _preflight)
                    stand_in = stand_in or self._stand_in(loader)
                    self.predict_step(stand_in[0])
                    continue
                loss, output = self.eval_step(step.x, step.y)
                if first:
                    check_loss_value(loss, False, self.model, self.optimizer)
                    first = False
                metrics.update(loss, weigh(step.y), task.outputs(output, step.y), first_len(step.y))
        return metrics.compute()  # all-reduced over ranks: each sample counted once

    @contextlib.contextmanager
    def _threshold(self, threshold: float | None) -> Iterator[None]:
        """The task's (each head's) ``threshold`` set for one call, and restored after."""
        if threshold is None:
            yield
            return
        check_threshold(threshold)
        tasks = [self.task, *getattr(self.task, "tasks", {}).values()]
        saved = [t.threshold for t in tasks]
        self.task.set_threshold(threshold)
        try:
            yield
        finally:
            for t, value in zip(tasks, saved):
                t.threshold = value

    def _score(self, data: Any, ckpt: str | None, prefix: str, threshold: float | None = None) -> dict:
        """validate/test: reload ``ckpt``, then the loss and every metric on ``data`` (at ``threshold``)."""
        self._setup()
        loader = self._make_loader(data, train=False, name=prefix)
        self._preflight(loader, prefix, labelled=True)
        self.checkpoints.load_weights(ckpt)
        self._resolve_metrics()
        confusion = prefix == "test" and self.task.name == "multiclass"
        extra = {"__confusion": confusion_metric()} if confusion else {}
        metric_set = MetricSet(
            {**self.metrics, **extra}, self._num_outputs(), self.device, loader.num_batches or 64
        )
        with self._threshold(threshold):
            values, count = self._evaluate(loader, metric_set)
        self._check_count(count, loader, prefix)
        if confusion:
            cm = metric_set.state_of("confusion")  # summed over ranks: every rank takes part
            if cm is not None and self.dist.is_main and os.path.isdir(self.out_dir):
                _write_confusion(os.path.join(self.out_dir, "confusion_matrix.csv"), cm)
        result = {f"{prefix}_{k}": v for k, v in values.items() if not k.startswith("__")}
        if threshold is not None:  # what gave these metrics, recorded with them
            result[f"{prefix}_threshold"] = float(threshold)
        return result

    def _predict_outputs(self, inputs: Any, ckpt: str | None) -> Any:
        """The model's outputs for every input, in input order, gathered on the CPU of every rank (a multi-head
        model's: each head's, in its dict or tuple)."""
        self._setup()
        loader = self._make_loader(inputs, train=False, name="predict", labelled=False, positions=True)
        self._preflight(loader, "predict", labelled=False)
        self.checkpoints.load_weights(ckpt)
        outputs, stand_in, none = [], None, None  # none: no rows, shaped like the outputs
        with self._evaluating():
            for step in loader.steps(0, lockstep=self.strategy.forward_is_collective):
                if step.x is None:  # this rank's shard ran out: a forward for the others' gathers (FSDP)
                    stand_in = stand_in or self._stand_in(loader)
                    none = tree_map(_no_rows, self.predict_step(stand_in[0]))
                    continue
                outputs.append(tree_map(_as_float, self.predict_step(step.x)))
            if not outputs and none is None and not self.strategy.forward_is_collective:
                # a rank with no rows: their shape
                none = tree_map(_no_rows, self.predict_step(self._stand_in(loader)[0]))
        if not outputs:
            assert none is not None  # a stand-in forward gave the outputs' shape (above)
            outputs = [none]
        local = _concatenated(outputs)  # one device-to-host copy (per head)
        if isinstance(
            loader, StreamLoader
        ):  # rows back in stream order (see StreamLoader.positions), on every rank
            positions = loader.positions()
            return tree_map(lambda t: distributed.gather_by_position(t, positions), local)
        if not self.dist.enabled:
            return local
        size = loader.dataset_size
        assert size is not None  # sharded over ranks by position: a map-style data set's length
        result = distributed.broadcast_object(tree_map(lambda t: distributed.gather_in_order(t, size), local))
        assert result is not None  # every rank holds rank 0's rows now
        return result

    def _check_count(self, count: int, loader: Loader, what: str) -> None:
        if loader.is_stream and count == 0:  # the count is over every rank: all of them raise
            raise DataError(
                f"the {what} stream yielded no samples; its __iter__ must start a new pass over the "
                "data every time it is called."
            )
        expected = loader.dataset_size
        if expected is not None and count != expected:
            raise RuntimeError(f"{what} counted {count} samples but the data set holds {expected}")

    # ------------------------------------------------------------------------------------------
    # Set-up: device, processes, data, task, metrics (all settled before the first step)

    def _setup(self) -> None:
        if self._set_up:
            return
        if distributed.launched_by_torchrun():
            self.dist = distributed.setup(
                self.device if self.options.device is not None else None, self.options.dist_timeout
            )
            if self.options.device is None:
                self.device = distributed.default_device(self.dist.local_rank)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(self.device)!r} was asked for but CUDA is not available; use 'cpu'."
            )
        self.amp = Precision(self.options.precision, self.device)
        if not materialize.on_meta(
            self.model
        ):  # a model on meta: the strategy materialises it (FSDP: shards)
            self.model.to(self.device)
        if isinstance(self._loss_fn, nn.Module):
            self._loss_fn.to(self.device)  # class weights, pos_weight
        self.strategy = make_strategy(
            self.options.strategy,
            distributed_on=self.dist.enabled,
            sync_batchnorm=self.options.sync_batchnorm,
        )
        self._train_model, self._eval_model = self.strategy.wrap(
            self.model, self.optimizer, self.device, _compiled if self.options.compile else _as_is
        )
        self._set_up = True

    def _make_loader(
        self, data: Any, *, train: bool, name: str, labelled: bool = True, positions: bool = False
    ) -> Loader:
        return make_loader(
            data,
            train=train,
            batch_size=self.options.batch_size
            if train
            else (self.options.eval_batch_size or self.options.batch_size),
            generator=self.generator,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            labelled=labelled,
            target_key=self.options.target_key,
            num_workers=self.options.num_workers,
            check_inputs=self.options.check_inputs,
            place=self._place,
            name=name,
            positions=positions,
            model=self.model,
        )

    def _from_frame(
        self,
        data: Any,
        target: str | None,
        name: str,
        *,
        learn: bool = False,
        ckpt: str | None = None,
        labelled: bool = True,
    ) -> Any:
        """DataFrame data as ``(X, y)`` arrays through ``self.table`` (learnt here by fit's training data,
        else read from ``ckpt`` when this Trainer has not seen a frame); other data passes through."""
        tabular.check_not_frame(data, target)
        if not tabular.holds_frame(data):
            return data
        if learn:
            self.table = None
        elif self.table is None and ckpt is not None:
            self.table = self.checkpoints.table(ckpt)
        if not learn and self.table is None:
            raise DataError(
                f"{name} data is a DataFrame, but this model was not trained on one (no columns recorded "
                "in the Trainer or its checkpoint); pass arrays, or fit on a DataFrame."
            )
        classify = self._task is None or self._task.is_classification
        arrays, self.table = tabular.frame_arrays(data, target, self.table, classify, name, labelled)
        return arrays

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        """In-memory data on the GPU when it fits (or in pinned memory for non_blocking copies)."""
        if self.device.type != "cuda":
            return t
        keep = self.options.on_device
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
        if y is not None and is_structured(y) or isinstance(self._task, MultiTask):
            self._settle_heads(y, name)
        with self._evaluating():
            try:
                out = self.forward(self.model, x)
            except TrainvalError:
                raise
            except Exception as e:  # noqa: BLE001 - the user's model or data; say which, in one line
                raise DataError(
                    f"the model failed on a {name} batch of inputs {describe(x)}: "
                    f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                ) from None
        if not isinstance(out, torch.Tensor) and not isinstance(self._task, MultiTask):
            raise DataError(
                f"the model's output for a {name} batch is {describe(out)}; trainval needs a tensor."
            )
        if self._task is None and self._task_error is not None:  # the user's own loss, one target: no task
            raise self._task_error
        if self._task is None:  # a BCE loss: one logit per sample is binary, several are multilabel
            assert self._loss_fn is not None  # (make_task leaves the task open only for a given BCE loss)
            self._task = task_for_output(
                self._loss_fn, out, self.options.ignore_index, self.options.threshold
            )
        if labelled and y is None:
            raise DataError(
                f"{name} data has no targets; targets are needed to train, validate or test "
                f"(use predict for unlabelled inputs; dict batches hold them under '{self.options.target_key}')."
            )
        self.task.check_output(out, y, name)
        if self._loss_fn is None:  # binary: BCE for one logit, cross-entropy for two
            self._loss_fn = self.task.default_loss().to(self.device)
        if not labelled:
            return
        if isinstance(loader, TensorLoader) and loader.y is not None:  # (its sample batch had targets: above)
            loader.y = self.task.prepare_targets(loader.y, name)
            if name == "train":
                check_training_data(loader, self.task, self.model, self.options.batch_size)
        elif isinstance(loader, DataLoaderAdapter):
            self.task.prepare_targets(y, name)
            loader.target_transform = self.task.cast_target
            self.task.expect_ignored()  # later batches may hold ignored targets: mask them

    def _settle_heads(self, y: Any, name: str) -> None:
        """Dict/tuple targets: a multi-head task, whose loss is the user's own ``loss_fn(outputs, targets)``."""
        loss = self._loss_fn
        if loss is None or is_builtin_loss(loss):
            what = (
                "no loss_fn" if loss is None else f"loss_fn {getattr(loss, '__name__', type(loss).__name__)}"
            )
            raise ConfigError(
                f"the {name} targets are {describe(y)} (several heads) and the Trainer has {what}; pass a "
                "loss_fn(outputs, targets) of your own that combines the heads (it gets the model's whole "
                "output and the whole target)."
            )
        if self._task is not None and not isinstance(self._task, MultiTask):
            raise ConfigError(
                f"the {name} targets are {describe(y)} (several heads) but task={self._task.name!r} names one; "
                "give a task per head (task={'head': 'multiclass', ...}) or leave task out to infer each head's."
            )
        if self._task is None:
            self._task = MultiTask(
                spec={}, ignore_index=self.options.ignore_index, threshold=self.options.threshold
            )

    def _resolve_metrics(self) -> None:
        if not self.metrics:
            self.metrics = resolve_metrics(self._metrics_spec, self.task)

    def _metric_set(self, capacity: int) -> MetricSet:
        self._resolve_metrics()
        return MetricSet(self.metrics, self._num_outputs(), self.device, capacity)

    def _num_outputs(self) -> int:
        """The model's output width, learnt by the pre-flight check (``Task.check_output``)."""
        width = self.task.num_outputs
        assert width is not None  # set by the pre-flight check, which runs before any metric set is made
        return width

    def epoch_record(self) -> dict:
        """The running epoch's start record (its RNG states, sampler state, seconds before a resume)."""
        start = self.state.epoch_start
        assert start is not None  # set when the epoch starts (_train_epoch), or restored by a resume
        return start

    def _choose_monitor(self, has_val: bool) -> None:
        """The monitored column, checked against the metrics; its direction from the metric."""
        self._resolve_metrics()
        split = "val" if has_val else "train"
        monitor = self.options.monitor or f"{split}_{next(iter(self.metrics), 'loss')}"
        if not has_val and not self.options.monitor:
            self.log(
                f"no validation data: monitoring {monitor}, so best.pt is the best epoch on the training data "
                "(pass val_data, or set monitor=)."
            )
        names = ["loss", *self.metrics]
        short = monitor.split("_", 1)[1]
        if short not in names:
            raise ConfigError(
                f"monitor {monitor!r} is not a column of this run; choose one of "
                f"{', '.join(f'{s}_{n}' for s in (('val', 'train') if has_val else ('train',)) for n in names)}."
            )
        self.state.monitor = monitor
        self.state.mode = self.options.mode or metric_direction(monitor, self.metrics)


# help(Trainer) and IDEs list every option with its default and meaning
Trainer.__init__.__signature__ = signature_with_options(Trainer.__init__)  # type: ignore[attr-defined]
Trainer.__doc__ = (Trainer.__doc__ or "").replace("    {options}", option_docs())


# ----------------------------------------------------------------------------------------------
# Helpers


def _share(loss: torch.Tensor, scale: torch.Tensor | float | None, group: int) -> torch.Tensor:
    """What one micro-batch's mean loss contributes to its accumulation group's step: ``loss * scale`` (exact:
    its summed loss over the group's weight, times the ranks DDP/FSDP average over), else the mean of the
    group's batch means (``loss / group``; ``loss`` itself without accumulation)."""
    if isinstance(scale, torch.Tensor):
        return loss * scale.to(loss.dtype)
    if scale is not None:
        return loss * scale
    return loss / group if group > 1 else loss


def _per_head(metrics: Any) -> bool:
    """``metrics={"cls": [...], "reg": [...]}``: a list of metrics per head (a multi-head model)."""
    return (
        isinstance(metrics, dict)
        and bool(metrics)
        and all(isinstance(v, (list, tuple, dict)) for v in metrics.values())
    )


def _detached(output: Any) -> Any:
    return output.detach() if isinstance(output, torch.Tensor) else tree_map(torch.Tensor.detach, output)


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t.float()


def _no_rows(t: torch.Tensor) -> torch.Tensor:
    return t.float()[:0]


def _concatenated(outputs: list[Any]) -> Any:
    """The batches' outputs, concatenated on the CPU: a tensor, or a dict/tuple of them (each head's)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs).cpu()
    if isinstance(first, Mapping):
        return {k: _concatenated([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(_concatenated([o[i] for o in outputs]) for i in range(len(first)))
    return first


def _compiled(model: nn.Module) -> nn.Module:
    return cast(
        nn.Module, torch.compile(model)
    )  # an OptimizedModule: an nn.Module that runs the compiled graph


def _as_is(model: nn.Module) -> nn.Module:
    return model


def _settled(value: _T | None, name: str, by: str) -> _T:
    """``value``, once settled; before that, an AttributeError saying what settles it."""
    if value is None:
        raise AttributeError(f"Trainer.{name} is not known yet: it is settled by {by}.")
    return value


def _default_interval(scheduler: Any) -> str:
    per_step = (torch.optim.lr_scheduler.OneCycleLR, torch.optim.lr_scheduler.CyclicLR)
    return "step" if isinstance(scheduler, per_step) else "epoch"


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def _restore_module_modes(model: nn.Module, modes: list[tuple[nn.Module, bool]]) -> None:
    for m, training in modes:
        m.training = training


def _eval_frozen_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen keep their running statistics (eval mode)."""
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, BATCHNORM) and params and not any(p.requires_grad for p in params):
            m.eval()


def _write_confusion(path: str, cm: torch.Tensor) -> None:
    """``confusion_matrix.csv``: one row per true class, one column per predicted class (counts)."""
    counts = cm.round().long().tolist()
    lines = ["true\\pred," + ",".join(str(c) for c in range(len(counts)))]
    lines += [f"{r}," + ",".join(str(v) for v in row) for r, row in enumerate(counts)]
    data = ("\n".join(lines) + "\n").encode()
    atomic_write(path, lambda f: f.write(data), "confusion matrix")
