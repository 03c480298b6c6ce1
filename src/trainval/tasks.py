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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    ``mask``: ``[N]`` bool, False where the target equals ``ignore_index`` (always a tensor: all True when
    nothing is ignored, made on first use). ``given_mask``: the same, or ``None`` when nothing is ignored (the
    built-in metrics' fast path). ``pred`` and ``scores`` are computed on first use, so a metric that needs
    neither costs nothing.
    """

    __slots__ = ("task", "output", "target", "given_mask", "_mask", "_pred", "_scores")

    def __init__(self, task: Task, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
        self.task, self.output, self.target, self.given_mask = task, output, target, mask
        self._mask: torch.Tensor | None = mask
        self._pred: torch.Tensor | None = None
        self._scores: torch.Tensor | None = None

    @property
    def masked(self) -> bool:
        """Did the batch carry a mask (some targets may be ignored)?"""
        return self.given_mask is not None

    @property
    def mask(self) -> torch.Tensor:
        if self._mask is None:  # nothing ignored: every sample counts (a device op, on first use only)
            self._mask = torch.ones(self.target.shape[0], dtype=torch.bool, device=self.target.device)
        return self._mask

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

    def expect_ignored(self) -> None:
        """Later batches may hold ``ignore_index`` targets (a Dataset's, not read ahead): mask them."""
        if self.ignore_index is not None:
            self.masking = True

    def set_threshold(self, threshold: float) -> None:
        """The probability above which a binary/multilabel prediction is 1 (for one test or predict call)."""
        self.threshold = threshold

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
    check_threshold(threshold)
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


def check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"threshold must lie strictly between 0 and 1, got {threshold!r}.")


def is_builtin_loss(loss_fn: object) -> bool:
    """One of torch's own losses (a module of ``torch.nn`` or a ``torch.nn.functional`` function), which takes
    one output and one target; anything else is the user's own."""
    module = (
        type(loss_fn).__module__ if isinstance(loss_fn, nn.Module) else getattr(loss_fn, "__module__", "")
    )
    return str(module or "").startswith("torch.")


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
    return first_len  # a mean over samples; a dict/tuple target's batch size is its first tensor's length


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


# --------------------------------------------------------------------------------------------------
# Several heads: dict or tuple targets


def is_structured(x: object) -> bool:
    """A tuple/list or dict target (several heads), as opposed to one tensor."""
    return isinstance(x, (tuple, list, Mapping))


def first_len(x: object) -> int:
    """The batch size of a tensor, or of a tuple/dict of them (its first tensor's length)."""
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, Mapping):
        return first_len(next(iter(x.values())))
    if isinstance(x, (tuple, list)):
        return first_len(x[0])
    raise TypeError(f"not a tensor, tuple or dict: {type(x).__name__}")


class HeadOutputs:
    """One batch of a multi-head model as metrics see it: ``heads[name]`` is that head's :class:`BatchOutputs`."""

    __slots__ = ("heads", "masked")

    def __init__(self, heads: dict[str, BatchOutputs]):
        self.heads = heads
        self.masked = any(out.masked for out in heads.values())


def infer_head_task(output: torch.Tensor, target: torch.Tensor) -> str | None:
    """A head's task from its output and target: float targets are regression; integer targets are class ids
    (multiclass) for ``[B, C, *]`` logits with ``C >= 2``, 0/1 (binary) for one logit per sample, multi-hot
    rows (multilabel) for a ``[B, K]`` target of the output's shape. ``None``: it cannot tell."""
    if target.is_floating_point():
        return "regression"
    if target.is_complex() or output.dim() == 0:
        return None
    B = output.shape[0]
    if output.dim() == 1 or (output.dim() == 2 and output.shape[1] == 1):
        return "binary" if target.numel() == B else None
    if output.dim() == 2 and target.dim() == 2 and list(target.shape) == list(output.shape):
        return "multilabel"
    if output.shape[1] >= 2 and (
        list(target.shape) == [B, *output.shape[2:]] or (output.dim() == 2 and list(target.shape) == [B, 1])
    ):
        return "multiclass"
    return None


@dataclass
class MultiTask(Task):
    """A model with several heads, trained on dict (or tuple) targets with the user's own combined loss.

    The loss gets the model's whole output and the whole target: ``loss_fn(outputs, targets)``. Each target
    head (a dict key, or a tuple position named ``"0"``, ``"1"``...) is scored against the model's output of
    the same key (position) by its own task, given per head (``task={"cls": "multiclass", ...}``) or inferred
    from the first batch (:func:`infer_head_task`); a head the model has no output for is not scored.
    ``spec``: the given per-head tasks (names, Task objects or ``None``); ``tasks``: the settled ones.
    """

    name: ClassVar[str] = "multitask"
    spec: dict[str, str | Task | None] = field(default_factory=dict)
    tasks: dict[str, Task] = field(default_factory=dict)
    keyed: bool = True  # dict targets (else tuple positions)

    def __post_init__(self) -> None:
        for head, kind in self.spec.items():
            if isinstance(kind, str) and kind not in _CLASSES:
                raise ConfigError(f"task for head {head!r} must be one of {', '.join(TASKS)}, got {kind!r}.")

    @property
    def default_metrics(self) -> dict[str, tuple[str, ...]]:  # type: ignore[override]
        return {head: task.default_metrics for head, task in self.tasks.items()}

    def _key(self, head: str) -> str | int:
        return head if self.keyed else int(head)

    def _part(self, x: object, head: str) -> torch.Tensor | None:
        """The head's tensor in a dict/tuple output or target (None where it has none)."""
        key = self._key(head)
        if isinstance(x, Mapping):
            value = x.get(key)
        elif isinstance(x, (tuple, list)) and isinstance(key, int) and key < len(x):
            value = x[key]
        else:
            value = None
        return value if isinstance(value, torch.Tensor) else None

    def heads_of(self, target: object, what: str) -> list[str]:
        """The heads of a dict/tuple target (checked: names usable in column names)."""
        if isinstance(target, Mapping):
            self.keyed, heads = True, [str(k) for k in target]
        elif isinstance(target, (tuple, list)):
            self.keyed, heads = False, [str(i) for i in range(len(target))]
        else:
            raise DataError(
                f"{what} targets are {_shape(target)}, but task or metrics are given per head "
                f"({', '.join(map(repr, self.spec))}): give targets as a dict of the heads' tensors."
            )
        for head in heads:
            if not head.replace("_", "a").isalnum() or not head.isascii():
                raise DataError(
                    f"{what} target head {head!r} must be named with letters, digits and _ (it names "
                    "metric columns, like val_<head>_acc)."
                )
        unknown = [h for h in self.spec if h not in heads]
        if unknown:
            raise DataError(
                f"task names head {unknown[0]!r}, but the {what} targets' heads are {heads}; name the heads "
                "as the targets do."
            )
        return heads

    def check_output(self, output, target, what):
        """Settles each head's task from the first batch; checks every head's output against its target."""
        if target is None:  # predict: the heads settled by fit (or given per head)
            for head, given in self.spec.items():
                if head not in self.tasks and given is not None:
                    made = (
                        given if isinstance(given, Task) else make_task(given, None, threshold=self.threshold)
                    )
                    assert made is not None  # a named task is never deferred
                    self.tasks[head] = made
            for head, settled in self.tasks.items():
                out = self._part(output, head)
                if out is None:
                    raise DataError(f"the model's output for a {what} batch has no head {head!r}.")
                settled.check_output(out, None, f"{what} '{head}'")
            self.num_outputs = 1
            return
        for head in self.heads_of(target, what):
            out, y = self._part(output, head), self._part(target, head)
            if y is None:
                raise DataError(f"{what} target head {head!r} is not a tensor ({_shape(target)}).")
            given = self.spec.get(head)
            if out is None:
                if given is not None:
                    keys = list(output) if isinstance(output, Mapping) else _shape(output)
                    raise DataError(
                        f"task names head {head!r}, but the model's output has no {head!r} ({keys}); the "
                        "model's dict (tuple) output must hold each scored head under the target's key "
                        "(position)."
                    )
                continue  # the loss may use it; no metric can
            task = self.tasks.get(head)
            if task is None:
                if isinstance(given, Task):
                    task = given
                else:
                    kind = given if isinstance(given, str) else infer_head_task(out, y)
                    if kind is None:
                        raise DataError(
                            f"cannot tell the task of head {head!r} (output {_shape(out)}, target "
                            f"{_shape(y)} {y.dtype}); pass task={{{head!r}: 'multiclass'}} (or 'binary', "
                            "'multilabel', 'regression')."
                        )
                    made = make_task(kind, None, ignore_index=self.ignore_index, threshold=self.threshold)
                    assert made is not None  # a named task is never deferred
                    task = made
                self.tasks[head] = task
            task.check_output(out, y, f"{what} '{head}'")
        self.num_outputs = 1  # (each head's metrics size themselves by its own task)

    def _map(self, target, fn):
        parts = {head: fn(task, self._part(target, head)) for head, task in self.tasks.items()}
        if isinstance(target, Mapping):
            return {k: parts.get(str(k), v) for k, v in target.items()}
        return type(target)(parts.get(str(i), v) for i, v in enumerate(target))

    def prepare_targets(self, y, what):
        return self._map(y, lambda task, t: task.prepare_targets(t, f"{what} '{task_head(self, task)}'"))

    def cast_target(self, y):
        return self._map(y, lambda task, t: task.cast_target(t))

    def expect_ignored(self) -> None:
        for task in self.tasks.values():
            task.expect_ignored()

    def loss_inputs(self, output, target):
        return output, target  # the whole output and the whole target: the user's loss combines the heads

    def outputs(self, output, target):
        heads = {
            head: task.outputs(self._part(output, head), self._part(target, head))  # type: ignore[arg-type]
            for head, task in self.tasks.items()
        }
        if any(out.masked for out in heads.values()):
            for out in heads.values():  # counts come from the device for every head then
                if not out.masked:
                    out.given_mask = out.mask
        return HeadOutputs(heads)

    def set_threshold(self, threshold: float) -> None:
        self.threshold = threshold
        for task in self.tasks.values():
            task.set_threshold(threshold)

    def predict(self, output):
        """Each scored head's predictions (a dict by head name); other heads' outputs as they are."""
        return {
            head: (self.tasks[head].predict(out) if head in self.tasks else out)
            for head, out in _named_parts(output).items()
        }

    def proba(self, output):
        """Each classification head's probabilities (a dict by head name)."""
        return {
            head: self.tasks[head].proba(out)
            for head, out in _named_parts(output).items()
            if head in self.tasks and self.tasks[head].is_classification
        }

    @property
    def is_classification(self) -> bool:
        return False


def task_head(multi: MultiTask, task: Task) -> str:
    return next(head for head, t in multi.tasks.items() if t is task)


def _named_parts(output: object) -> dict[str, torch.Tensor]:
    if isinstance(output, Mapping):
        return {str(k): v for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return {str(i): v for i, v in enumerate(output)}
    raise DataError(f"a multi-head model's output must be a dict or a tuple, got {_shape(output)}.")
