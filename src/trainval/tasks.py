"""Tasks: what a model's output and a batch's target mean, in one small object the loop calls.

Everything the loop used to assume about multi-class classification lives here, once per kind of task:

=============== ======================== =========================== =================================
task            model output             target                      predictions
=============== ======================== =========================== =================================
``multiclass``  logits ``[B, C, *]``     class ids ``[B, *]``        class ids (argmax over dim 1)
``binary``      one logit ``[B]``/       0/1 ``[B]``                 0/1 (logit > logit(threshold),
                ``[B, 1]``, or two                                   or argmax of two)
``multilabel``  logits ``[B, K]``        multi-hot ``[B, K]``        multi-hot (sigmoid > threshold)
``regression``  the target's shape       floats                      the outputs
=============== ======================== =========================== =================================

A ``[B, 1]`` output with a ``[B]`` target (or the reverse) is matched by reshaping, never broadcast.
When ``Trainer(task=...)`` is not given the task is inferred from the loss (:func:`infer_task`).

Per batch a task does device work only (reshapes, an argmax, a comparison): no host sync. Checks
that read values (label ranges, integer-ness) run once, before the first step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from trainval.errors import ConfigError, DataError

TASKS = ("multiclass", "binary", "multilabel", "regression")
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_BCE_LOSSES = (nn.BCEWithLogitsLoss, nn.BCELoss)
_REGRESSION_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
# Losses whose mean is over every element of the target (so the weight of a batch is its numel).
_ELEMENTWISE_LOSSES = _BCE_LOSSES + _REGRESSION_LOSSES
# torch.nn.functional losses passed as plain functions
_FUNCTIONAL_TASKS = {
    "cross_entropy": "multiclass",
    "nll_loss": "multiclass",
    "mse_loss": "regression",
    "l1_loss": "regression",
    "smooth_l1_loss": "regression",
    "huber_loss": "regression",
}


class BatchOutputs:
    """One batch as metrics see it, in the task's normal form (flat over samples and positions).

    ``target``: multiclass/binary ``[N]`` long, multilabel ``[N, K]`` long, regression ``[N, D]`` float.
    ``pred``: the same shape as ``target``. ``scores``: multiclass ``[N, C]`` logits, binary ``[N]``
    positive-class probabilities, multilabel ``[N, K]`` probabilities, regression ``[N, D]``.
    ``mask``: ``[N]`` bool, False where the target equals ``ignore_index``; ``None`` when nothing is ignored.
    ``pred`` and ``scores`` are computed on first use, so a metric that needs neither costs nothing.
    """

    __slots__ = ("task", "output", "target", "mask", "_pred", "_scores")

    def __init__(self, task: Task, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        self.task, self.output, self.target, self.mask = task, output, target, mask
        self._pred: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None

    @property
    def pred(self) -> torch.Tensor:  # (a plain lazy property: functools.cached_property takes a lock)
        if self._pred is None:
            self._pred = self.task.metric_pred(self.output)
        return self._pred

    @property
    def scores(self) -> torch.Tensor:
        if self._scores is None:
            self._scores = self.task.metric_scores(self.output)
        return self._scores


@dataclass
class Task:
    """Base of the four tasks. ``num_outputs`` is learned from the model in the pre-flight check."""

    name: ClassVar[str] = "task"
    default_metrics: ClassVar[tuple[str, ...]] = ()
    ignore_index: int | None = None
    threshold: float = 0.5
    num_outputs: int | None = None
    masking: bool = False  # compute a mask for ignore_index targets (only when they can occur)

    # -- before the first step ------------------------------------------------------------------
    def default_loss(self) -> nn.Module:
        raise NotImplementedError

    def check_output(self, output: torch.Tensor, target: torch.Tensor | None, what: str) -> None:
        """Shapes of a sample batch's output (and target); sets ``num_outputs``."""
        raise NotImplementedError

    def prepare_targets(self, y: torch.Tensor, what: str) -> torch.Tensor:
        """Validate a whole split's targets (reads values: once, before training) and cast them."""
        return self.cast_target(y)

    def cast_target(self, y: torch.Tensor) -> torch.Tensor:
        """The dtype the loss wants; per batch for Dataset inputs (a cast, no sync)."""
        return y

    # -- per step (device work only) ------------------------------------------------------------
    def loss_inputs(self, output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return output, target

    def outputs(self, output: torch.Tensor, target: torch.Tensor) -> BatchOutputs:
        raise NotImplementedError

    def metric_pred(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metric_scores(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- predict -----------------------------------------------------------------------------------
    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Predictions in the target's form: class ids, 0/1, multi-hot rows, or values."""
        raise NotImplementedError

    def proba(self, output: torch.Tensor) -> torch.Tensor:
        raise DataError(f"predict_proba is for classification tasks; this run's task is {self.name}.")

    @property
    def is_classification(self) -> bool:
        return self.name != "regression"


def _shape(t) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _first_bad(bad: torch.Tensor) -> int:
    return int(bad.reshape(len(bad), -1).any(dim=1).nonzero()[0, 0])


class Multiclass(Task):
    """Logits ``[B, C, *]``, integer targets ``[B, *]``: classifiers, segmentation, sequence tagging."""

    name = "multiclass"
    default_metrics = ("acc",)

    def default_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss(ignore_index=self.ignore_index if self.ignore_index is not None else -100)

    def check_output(self, output, target, what):
        if output.dim() < 2 or output.shape[1] < 2:
            raise DataError(
                f"the model's output for a {what} batch is {_shape(output)}; a multiclass model "
                "must output logits [B, C, *] with C >= 2 classes (for one logit, use task='binary')."
            )
        self.num_outputs = output.shape[1]
        if target is not None:
            expected = [output.shape[0], *output.shape[2:]]
            if list(target.shape) != expected and not (
                target.dim() == 2 and target.shape[1] == 1 and output.dim() == 2
            ):
                raise DataError(
                    f"{what} targets have shape {_shape(target)} but the model's logits {_shape(output)} "
                    f"need class ids of shape {expected} (one per sample"
                    f"{' and position' if output.dim() > 2 else ''})."
                )

    def prepare_targets(self, y, what):
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.is_floating_point():
            bad = ~torch.isfinite(y) | (y != torch.round(y))
            if bool(bad.any()):
                i = _first_bad(bad)
                raise DataError(
                    f"{what} targets must be integer class ids; sample {i} has label "
                    f"{y[i].tolist()!r}. (Float targets? Use task='regression'.)"
                )
        elif y.dtype == torch.bool or y.is_complex():
            raise DataError(f"{what} targets must be integer class ids, got dtype {y.dtype}.")
        y = y.long()
        if self.num_outputs is not None and y.numel():
            valid = (
                y != self.ignore_index
                if self.ignore_index is not None
                else torch.ones_like(y, dtype=torch.bool)
            )
            bad = valid & ((y < 0) | (y >= self.num_outputs))
            if bool(bad.any()):
                i = _first_bad(bad)
                label = int(y.reshape(len(y), -1)[i][bad.reshape(len(y), -1)[i]][0])
                ignored = f" (or {self.ignore_index}, ignored)" if self.ignore_index is not None else ""
                raise DataError(
                    f"{what} labels must lie in [0, {self.num_outputs}){ignored} for a model with "
                    f"{self.num_outputs} outputs; sample {i} has label {label}."
                )
            if self.ignore_index is not None and bool((~valid).any()):
                self.masking = True
        return y

    def cast_target(self, y):
        if y.dim() == 2 and y.shape[1] == 1 and self.num_outputs is not None:
            y = y[:, 0]
        return y.long()

    def outputs(self, output, target):
        flat = target if target.dim() == 1 else target.reshape(-1)
        return BatchOutputs(self, output, flat, (flat != self.ignore_index) if self.masking else None)

    def metric_pred(self, output):
        pred = output.argmax(dim=1)
        return pred if pred.dim() == 1 else pred.reshape(-1)

    def metric_scores(self, output):
        return output.movedim(1, -1).reshape(-1, output.shape[1]) if output.dim() > 2 else output

    def predict(self, output):
        return output.argmax(dim=1)

    def proba(self, output):
        return output.float().softmax(dim=1)


class Binary(Task):
    """One logit per sample (``[B]`` or ``[B, 1]``, with a BCE loss) or two (with cross-entropy)."""

    name = "binary"
    default_metrics = ("acc",)
    two_logits: bool = False

    def default_loss(self) -> nn.Module:
        return nn.CrossEntropyLoss() if self.two_logits else nn.BCEWithLogitsLoss()

    def check_output(self, output, target, what):
        B = output.shape[0] if output.dim() else 0
        if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
            self.two_logits = False
        elif output.dim() == 2 and output.shape[1] == 2:
            self.two_logits = True
        else:
            raise DataError(
                f"the model's output for a {what} batch is {_shape(output)}; a binary model outputs "
                "one logit per sample ([B] or [B, 1]) or two ([B, 2])."
            )
        self.num_outputs = 1
        if target is not None and target.numel() != B:
            raise DataError(
                f"{what} targets have shape {_shape(target)}; a binary task needs one 0/1 target per "
                f"sample ([{B}] or [{B}, 1])."
            )

    def prepare_targets(self, y, what):
        y = y.reshape(len(y), -1) if y.dim() > 1 else y
        if y.dim() == 2 and y.shape[1] != 1:
            raise DataError(
                f"{what} targets have shape {_shape(y)}; a binary task needs one 0/1 target per sample. "
                "(Several 0/1 columns? Use task='multilabel'.)"
            )
        if y.is_complex():
            raise DataError(f"{what} targets must be 0 or 1, got dtype {y.dtype}.")
        if y.numel():
            bad = (y != 0) & (y != 1)
            if bool(bad.any()):
                i = _first_bad(bad)
                raise DataError(
                    f"{what} targets of a binary task must be 0 or 1; sample {i} has "
                    f"{y.reshape(-1)[i].tolist()!r}."
                )
        return self.cast_target(y)

    def cast_target(self, y):
        y = y.reshape(-1)
        return y.long() if self.two_logits else y.float()

    def loss_inputs(self, output, target):
        return (output, target) if self.two_logits else (output.reshape(target.shape), target)

    def outputs(self, output, target):
        return BatchOutputs(self, output, target.reshape(-1).long(), None)

    def metric_pred(self, output):
        return self.predict(output)

    def metric_scores(self, output):
        return self.proba(output)

    def predict(self, output):
        if self.two_logits:
            return output.argmax(dim=1)
        return (output.reshape(-1) > _logit(self.threshold)).long()

    def proba(self, output):
        """The positive class's probability, ``[N]``."""
        if self.two_logits:
            return output.float().softmax(dim=1)[:, 1]
        return output.float().reshape(-1).sigmoid()


class Multilabel(Task):
    """Logits ``[B, K]``, multi-hot targets ``[B, K]``: K independent yes/no labels per sample."""

    name = "multilabel"
    default_metrics = ("f1_micro",)

    def default_loss(self) -> nn.Module:
        return nn.BCEWithLogitsLoss()

    def check_output(self, output, target, what):
        if output.dim() != 2:
            raise DataError(
                f"the model's output for a {what} batch is {_shape(output)}; a multilabel model "
                "outputs logits [B, K]."
            )
        self.num_outputs = output.shape[1]
        if target is not None and list(target.shape) != list(output.shape):
            raise DataError(
                f"{what} targets have shape {_shape(target)} but the model's logits are {_shape(output)}; "
                "a multilabel task needs multi-hot targets of the logits' shape."
            )

    def prepare_targets(self, y, what):
        if y.dim() != 2:
            raise DataError(
                f"{what} targets have shape {_shape(y)}; a multilabel task needs multi-hot rows [N, K]."
            )
        if y.is_complex():
            raise DataError(f"{what} targets must be 0 or 1, got dtype {y.dtype}.")
        if self.num_outputs is not None and y.shape[1] != self.num_outputs:
            raise DataError(
                f"{what} targets have {y.shape[1]} labels per sample but the model outputs "
                f"{self.num_outputs} logits."
            )
        if y.numel():
            bad = (y != 0) & (y != 1)
            if bool(bad.any()):
                i = _first_bad(bad)
                raise DataError(
                    f"{what} multilabel targets must be 0 or 1; sample {i} has {y[i].tolist()!r}."
                )
        return y.float()

    def cast_target(self, y):
        return y.float()

    def outputs(self, output, target):
        return BatchOutputs(self, output, target.long(), None)

    def metric_pred(self, output):
        return self.predict(output)

    def metric_scores(self, output):
        return self.proba(output)

    def predict(self, output):
        return (output > _logit(self.threshold)).long()

    def proba(self, output):
        return output.float().sigmoid()


class Regression(Task):
    """Outputs of the targets' shape (``[B, 1]`` output with ``[B]`` targets is matched, never broadcast)."""

    name = "regression"
    default_metrics = ("mse", "mae")

    def default_loss(self) -> nn.Module:
        return nn.MSELoss()

    def check_output(self, output, target, what):
        if output.dim() == 0:
            raise DataError(
                f"the model's output for a {what} batch is a scalar; a regression model outputs one "
                "value (or one row of values) per sample."
            )
        self.num_outputs = max(1, math.prod(output.shape[1:]))
        if target is not None and output.numel() != target.numel():
            raise DataError(
                f"{what} targets have shape {_shape(target)} but the model's output is {_shape(output)}; "
                "a regression model must output one value per target value."
            )
        if target is not None and output.shape != target.shape and not _matched(output.shape, target.shape):
            raise DataError(
                f"{what} targets have shape {_shape(target)} but the model's output is {_shape(output)}; "
                "give targets of the output's shape."
            )

    def prepare_targets(self, y, what):
        if y.is_complex() or y.dtype == torch.bool:
            raise DataError(f"{what} targets must be real numbers, got dtype {y.dtype}.")
        y = y.float() if not y.is_floating_point() or y.dtype == torch.float64 else y
        if y.numel() and not bool(torch.isfinite(y).all()):
            i = _first_bad(~torch.isfinite(y))
            raise DataError(f"{what} targets contain NaN or Inf (first at sample {i}).")
        return y

    def cast_target(self, y):
        return (
            y.float()
            if y.dtype != torch.float32 and y.dtype in (torch.float64, torch.int64, torch.int32)
            else y
        )

    def loss_inputs(self, output, target):
        return (output if output.shape == target.shape else output.reshape(target.shape)), target

    def outputs(self, output, target):
        n = target.shape[0]
        return BatchOutputs(self, output.reshape(n, -1), target.reshape(n, -1), None)

    def metric_pred(self, output):
        return output

    def metric_scores(self, output):
        return output

    def predict(self, output):
        return output


def _matched(a: torch.Size, b: torch.Size) -> bool:
    """``[B, 1]`` vs ``[B]`` (either way round): the one mismatch that is matched, not broadcast."""
    return (len(a) == 2 and a[1] == 1 and list(b) == [a[0]]) or (
        len(b) == 2 and b[1] == 1 and list(a) == [b[0]]
    )


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


_CLASSES = {"multiclass": Multiclass, "binary": Binary, "multilabel": Multilabel, "regression": Regression}


def make_task(
    task: str | Task | None,
    loss_fn: nn.Module | None,
    *,
    ignore_index: int | None = None,
    threshold: float = 0.5,
) -> Task | None:
    """The Task for ``task`` (a name or an object), or the one the loss implies; ``None`` if that waits
    for the model's output width (a BCE loss: binary or multilabel)."""
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must lie strictly between 0 and 1, got {threshold!r}.")
    if isinstance(task, Task):
        return task
    if task is None:
        task = infer_task(loss_fn)
        if task is None:
            return None
    if task not in _CLASSES:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}.")
    _check_loss_fits(task, loss_fn)
    if ignore_index is None and isinstance(loss_fn, _CLASS_LOSSES):
        ignore_index = loss_fn.ignore_index
    if ignore_index is None and task == "multiclass":
        ignore_index = -100  # CrossEntropyLoss's default
    return _CLASSES[task](ignore_index=ignore_index if task == "multiclass" else None, threshold=threshold)


_FITS = {
    "multiclass": _CLASS_LOSSES,
    "binary": _CLASS_LOSSES + _BCE_LOSSES,
    "multilabel": _BCE_LOSSES,
    "regression": _REGRESSION_LOSSES,
}


def _check_loss_fits(task: str, loss_fn: nn.Module | None) -> None:
    """A built-in loss made for another task (MSE on class ids...) is refused before it broadcasts wrongly."""
    known = _CLASS_LOSSES + _BCE_LOSSES + _REGRESSION_LOSSES
    if isinstance(loss_fn, known) and not isinstance(loss_fn, _FITS[task]):
        fitting = ", ".join(c.__name__ for c in _FITS[task])
        raise ConfigError(
            f"loss {type(loss_fn).__name__} does not fit task {task!r}; use {fitting} "
            f"(or the task the loss is made for)."
        )


def infer_task(loss_fn: nn.Module | None) -> str | None:
    """multiclass for CrossEntropy/NLL (and no loss), regression for MSE/L1/SmoothL1/Huber; ``None`` for
    BCE (binary or multilabel, by the output's width); an error naming ``task=`` for anything else."""
    functional = getattr(loss_fn, "__name__", None) if not isinstance(loss_fn, nn.Module) else None
    if functional in _FUNCTIONAL_TASKS:
        return _FUNCTIONAL_TASKS[functional]
    if loss_fn is None or isinstance(loss_fn, _CLASS_LOSSES):
        return "multiclass"
    if isinstance(loss_fn, _REGRESSION_LOSSES):
        return "regression"
    if isinstance(loss_fn, _BCE_LOSSES) or functional in (
        "binary_cross_entropy",
        "binary_cross_entropy_with_logits",
    ):
        return None
    raise ConfigError(
        f"cannot tell the task from the loss {type(loss_fn).__name__}; pass "
        f"task='multiclass', 'binary', 'multilabel' or 'regression' to the Trainer."
    )


def task_for_output(loss_fn: nn.Module, output: torch.Tensor, ignore_index, threshold) -> Task:
    """A BCE loss: one logit per sample is binary, several are multilabel."""
    width = 1 if output.dim() == 1 else math.prod(output.shape[1:])
    task = make_task(
        "binary" if width == 1 else "multilabel", loss_fn, ignore_index=ignore_index, threshold=threshold
    )
    assert task is not None  # a named task is never deferred
    return task


def check_loss(loss_fn: nn.Module) -> None:
    """The epoch loss is exact for mean-reduced losses; other reductions are refused up front."""
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction != "mean":
        raise ConfigError(
            f"loss_fn {type(loss_fn).__name__} has reduction={reduction!r}; trainval needs a loss that "
            "returns the batch mean (reduction='mean'), from which it keeps exact epoch means."
        )


def loss_weight_fn(loss_fn: nn.Module, task: Task) -> Callable[[torch.Tensor], torch.Tensor | int]:
    """``weigh(target)``: what a batch's mean loss was divided by, so that ``sum(mean * weight) /
    sum(weight)`` over an epoch equals the loss of the whole split at once (class weights, ignore_index,
    label smoothing and pos_weight included). A device scalar or an int; no sync. Chosen once per epoch,
    so that the step pays for no type checks.

    Torch's built-in losses: cross-entropy/NLL divide by the summed class weights of the non-ignored
    targets; the element-wise losses (BCE, MSE, L1, ...) by the number of elements. Any other loss is
    taken to be a mean over samples (weight = batch size).
    """
    if isinstance(loss_fn, _CLASS_LOSSES):
        weight, ignore = loss_fn.weight, loss_fn.ignore_index

        def weigh_classes(target):
            if target.is_floating_point():  # class probabilities: a mean over samples (and positions)
                return target.numel() // target.shape[1] if target.dim() > 1 else target.numel()
            if weight is None:
                return (target != ignore).sum() if task.masking else target.numel()
            valid = target != ignore
            return (weight[target * valid] * valid).sum()  # ignored targets index class 0, weighted 0

        return weigh_classes
    if isinstance(loss_fn, _ELEMENTWISE_LOSSES):
        return torch.Tensor.numel
    return lambda target: target.shape[0]


def exact_weight_fn(
    loss_fn: nn.Module, task: Task
) -> tuple[Callable[[torch.Tensor], torch.Tensor | int] | None, bool]:
    """``(weigh, by_value)`` for exact gradient accumulation: a micro-batch's mean loss times its weight is
    its summed loss, which the loop divides by the whole group's weight (every micro-batch, every rank).

    ``weigh`` is :func:`loss_weight_fn`'s for torch's built-in losses, whose denominator trainval knows
    (cross-entropy/NLL: the summed class weights of the non-ignored targets; BCE, MSE, L1, SmoothL1,
    Huber: the elements); ``None`` for any other loss (its denominator is unknown: the loop keeps the mean
    of the micro-batch means). ``by_value``: a batch's weight depends on its targets' values
    (``ignore_index``, class weights), not only on its shape, so ranks' weights differ even for equal shapes.
    """
    if isinstance(loss_fn, _CLASS_LOSSES):
        return loss_weight_fn(loss_fn, task), loss_fn.weight is not None or task.masking
    if isinstance(loss_fn, _ELEMENTWISE_LOSSES):
        return loss_weight_fn(loss_fn, task), False
    return None, False
