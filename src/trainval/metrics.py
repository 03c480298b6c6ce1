"""Metrics kept on the device, exact, reduced once per epoch.

Per step the loop writes the batch's mean loss and its weight into preallocated buffers and adds the
batch to each metric's *state*: a small float64 tensor of sums (correct counts, a confusion matrix,
per-label true/false positives, sums of squared errors...). Device operations only: no ``.item()``, no
host sync. At the end of the epoch every state sits in one flat buffer, so one all-reduce (when several
processes train) and one device-to-host copy give every metric exactly, whatever the batch size and the
number of processes. Metrics that need every score (AUROC) keep their rows and gather them once per epoch.

Writing your own sync-free metric (the protocol the built-ins follow)::

    class MeanAbsLogit:
        name = "mean_abs_logit"            # columns train_mean_abs_logit, val_mean_abs_logit, ...
        higher_is_better = False           # the direction when it is the monitored metric
        def state_shape(self, num_outputs):
            return (2,)                    # float64 zeros at the start of each epoch
        def update(self, state, out):      # out: trainval.tasks.BatchOutputs; device ops only
            state[0].add_(out.output.abs().sum())  # (add_ on a view: no copy back, unlike +=)
            state[1].add_(out.output.numel())
        def compute(self, state):          # a CPU tensor, summed over batches and processes
            return float(state[0] / state[1])

    Trainer(..., metrics=["acc", MeanAbsLogit()])

A plain function ``fn(pred, target) -> float`` is a metric too (:class:`FunctionMetric`): its predictions and
targets are kept on the device and gathered once per epoch, and it is called once per epoch on all of them.

Metrics with the same ``state_key`` share one state (the built-in F1/precision/recall/balanced accuracy/
mIoU share one confusion matrix). A ``torchmetrics.Metric`` object is accepted too; it keeps its own state
and synchronises where torchmetrics does.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist

from trainval import distributed
from trainval.errors import ConfigError
from trainval.tasks import BatchOutputs, HeadOutputs, MultiTask, Task


@runtime_checkable
class Metric(Protocol):
    """A metric as a sum over samples: a state of float64 sums, updated per batch on the device."""

    name: str
    higher_is_better: bool

    def state_shape(self, num_outputs: int) -> tuple[int, ...]: ...
    def update(self, state: torch.Tensor, out: BatchOutputs) -> None: ...
    def compute(self, state: torch.Tensor) -> float: ...


# --------------------------------------------------------------------------------------------------
# Statistics: the shared states behind the built-in metrics


class _Stat:
    key = ""

    def shape(self, num_outputs: int) -> tuple[int, ...]:
        raise NotImplementedError

    def update(self, state: torch.Tensor, out: BatchOutputs) -> None:
        raise NotImplementedError


def _count_hits(state: torch.Tensor, hit: torch.Tensor, mask: torch.Tensor | None) -> None:
    """``state += [hits, count]`` over the predictions the mask keeps: one per sample, or one per position of a
    dense target (segmentation), whose number the host knows from the shape (no sync)."""
    if mask is None:
        state[0].add_(hit.sum())
        state[1].add_(hit.numel())
    else:
        state[0].add_((hit & mask).sum())
        state[1].add_(mask.sum())


class _Correct(_Stat):
    """``[correct, count]`` of exact predictions (class ids, or 0/1)."""

    key = "correct"

    def shape(self, num_outputs):
        return (2,)

    def update(self, state, out):
        _count_hits(state, out.pred == out.target, out.given_mask)


class _TopK(_Stat):
    def __init__(self, k: int):
        self.k, self.key = k, f"top{k}"

    def shape(self, num_outputs):
        if self.k > num_outputs:
            raise ConfigError(
                f"metric top{self.k}_acc needs at least {self.k} classes; the model has {num_outputs}."
            )
        return (2,)

    def update(self, state, out):
        top = out.scores.topk(self.k, dim=1).indices
        _count_hits(state, (top == out.target.unsqueeze(1)).any(dim=1), out.given_mask)


class _Confusion(_Stat):
    """``C x C`` counts, rows = true class, columns = predicted class."""

    key = "confusion"

    def __init__(self):
        self._cached: torch.Tensor | None = None

    def shape(self, num_outputs):
        return (num_outputs, num_outputs)

    def _ones(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``n`` ones, reused from step to step (read only)."""
        ones = self._cached
        if ones is None or len(ones) < n or ones.device != like.device or ones.dtype != like.dtype:
            ones = self._cached = torch.ones(max(n, 64), dtype=like.dtype, device=like.device)
        return ones[:n]

    def update(self, state, out):
        C = state.shape[0]
        idx = out.target * C + out.pred
        mask = out.given_mask
        if mask is None:
            weights = self._ones(len(idx), state)
        else:
            idx = idx * mask  # ignored targets add 0 at cell 0
            weights = mask.to(state.dtype)
        state.view(-1).index_add_(0, idx, weights)  # no sync (bincount would read the max on the host)


class _BinaryCounts(_Stat):
    """``[tp, fp, fn, tn]``."""

    key = "binary_counts"

    def shape(self, num_outputs):
        return (4,)

    def update(self, state, out):
        p, t = out.pred.bool(), out.target.bool()
        state[0].add_((p & t).sum())
        state[1].add_((p & ~t).sum())
        state[2].add_((~p & t).sum())
        state[3].add_((~p & ~t).sum())


class _LabelCounts(_Stat):
    """Per label ``[tp, fp, fn]`` (``[3, K]``) and exact-match ``[matches, count]`` in a last column pair."""

    key = "label_counts"

    def shape(self, num_outputs):
        return (3, num_outputs + 2)

    def update(self, state, out):
        p, t = out.pred.bool(), out.target.bool()
        K = p.shape[1]
        state[0, :K].add_((p & t).sum(dim=0))
        state[1, :K].add_((p & ~t).sum(dim=0))
        state[2, :K].add_((~p & t).sum(dim=0))
        state[0, K].add_((p == t).all(dim=1).sum())
        state[0, K + 1].add_(p.shape[0])


class _RegressionSums(_Stat):
    """Per output ``[sum sq. error, sum abs. error, sum y, sum y^2, count]`` (``[5, D]``)."""

    key = "regression_sums"

    def shape(self, num_outputs):
        return (5, num_outputs)

    def update(self, state, out):
        y, err = out.target.to(state.dtype), out.pred.to(state.dtype) - out.target.to(state.dtype)
        state[0].add_(err.square().sum(dim=0))
        state[1].add_(err.abs().sum(dim=0))
        state[2].add_(y.sum(dim=0))
        state[3].add_(y.square().sum(dim=0))
        state[4].add_(y.shape[0])


class BuiltinMetric:
    """A named function of one shared statistic."""

    def __init__(self, name: str, higher_is_better: bool, stat: _Stat, fn: Callable[[np.ndarray], float]):
        self.name, self.higher_is_better, self._stat, self._fn = name, higher_is_better, stat, fn
        self.state_key = stat.key

    def state_shape(self, num_outputs: int) -> tuple[int, ...]:
        return self._stat.shape(num_outputs)

    def update(self, state: torch.Tensor, out: BatchOutputs) -> None:
        self._stat.update(state, out)

    def compute(self, state: torch.Tensor) -> float:
        return float(self._fn(state.numpy()))

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


def _div(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(
        a, b, out=np.zeros_like(a), where=b != 0
    )  # 0 where undefined, as scikit-learn's zero_division


def _mean(values) -> float:
    values = np.asarray(values)
    return float(values.mean()) if values.size else float("nan")


def _confusion_parts(cm):
    tp = np.diag(cm)
    return tp, cm.sum(axis=0) - tp, cm.sum(axis=1) - tp, cm.sum(axis=1)


def _f1(tp, fp, fn):
    return _div(2 * tp, 2 * tp + fp + fn)


def _present(cm):
    # scikit-learn averages over the labels that occur in the targets or the predictions
    return (cm.sum(axis=0) + cm.sum(axis=1)) > 0


def _cm_f1_macro(cm):
    tp, fp, fn, _ = _confusion_parts(cm)
    return _mean(_f1(tp, fp, fn)[_present(cm)])


def _cm_f1_weighted(cm):
    tp, fp, fn, support = _confusion_parts(cm)
    return float(_div((_f1(tp, fp, fn) * support).sum(), support.sum()))


def _cm_precision_macro(cm):
    tp, fp, _, _ = _confusion_parts(cm)
    return _mean(_div(tp, tp + fp)[_present(cm)])


def _cm_recall_macro(cm):
    tp, _, fn, _ = _confusion_parts(cm)
    return _mean(_div(tp, tp + fn)[_present(cm)])


def _cm_balanced_acc(cm):
    tp, _, _, support = _confusion_parts(cm)
    return _mean(_div(tp, support)[support > 0])


def _cm_miou(cm):
    tp, fp, fn, _ = _confusion_parts(cm)
    union = tp + fp + fn
    return _mean(_div(tp, union)[union > 0])


def _cm_acc(cm):
    return float(_div(np.trace(cm), cm.sum()))


def _r2(s):
    sse, _, sy, sy2, n = s
    sst = sy2 - sy * sy / np.maximum(n, 1)
    r2 = np.where(sst > 0, 1 - _div(sse, sst), np.where(sse == 0, 1.0, 0.0))  # scikit-learn's force_finite
    return float(r2.mean())


def _auroc(rows: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN when one class is missing."""
    scores, target = rows[:, 0], rows[:, 1] > 0.5
    pos, neg = int(target.sum()), int((~target).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average rank of each run of equal scores
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(scores)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[target].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


class AUROC:
    """Exact binary ROC AUC. It keeps every sample's score (8 bytes x 2 per sample, on the device) and
    gathers them once per epoch."""

    name, higher_is_better, reduction = "auroc", True, "cat"

    def rows(self, out: BatchOutputs) -> torch.Tensor:
        return torch.stack([out.scores.to(torch.float64), out.target.to(torch.float64)], dim=1)

    def compute(self, rows: torch.Tensor) -> float:
        return _auroc(rows.numpy())


class FunctionMetric:
    """A plain function ``fn(pred, target) -> float``, called once per epoch on every sample of the split.

    Each batch's predictions, targets and mask are kept on the device as float64 rows (``8 * (2 * D + 1)``
    bytes per sample, ``D`` the prediction's width: 1 for class ids and 0/1), no host sync per batch; at the
    epoch's end the rows are gathered once across processes (each sample once) and ``fn`` gets CPU tensors in
    the task's form, ignored targets left out: class ids or 0/1 ``[N]`` (long), multi-hot rows ``[N, K]``
    (long), values ``[N]`` or ``[N, D]`` (float64). Its cost is the rows' memory and one call of ``fn`` per
    split and epoch. Higher is better unless the function has ``higher_is_better = False``.
    """

    reduction = "cat"

    def __init__(self, name: str, fn: Callable[..., Any], task: str):
        self.name, self.fn, self.task = name, fn, task
        self.higher_is_better = bool(getattr(fn, "higher_is_better", True))

    def _width(self, num_outputs: int) -> int:
        return num_outputs if self.task in ("multilabel", "regression") else 1

    def empty_rows(self, num_outputs: int, device: torch.device) -> torch.Tensor:
        return torch.zeros((0, 2 * self._width(num_outputs) + 1), dtype=torch.float64, device=device)

    def rows(self, out: BatchOutputs) -> torch.Tensor:
        n = out.target.shape[0]
        return torch.cat(
            [
                out.pred.reshape(n, -1).to(torch.float64),
                out.target.reshape(n, -1).to(torch.float64),
                out.mask.reshape(n, 1).to(torch.float64),
            ],
            dim=1,
        )

    def compute(self, rows: torch.Tensor) -> float:
        width = (rows.shape[1] - 1) // 2
        rows = rows[rows[:, -1] > 0.5]  # ignored targets left out
        pred, target = rows[:, :width], rows[:, width : 2 * width]
        if self.task != "regression":
            pred, target = pred.round().long(), target.round().long()
        if width == 1:
            pred, target = pred[:, 0], target[:, 0]
        try:
            return float(self.fn(pred, target))
        except Exception as e:  # noqa: BLE001 - the user's function; say which, in one line
            raise ConfigError(
                f"metric {self.name!r} ({getattr(self.fn, '__name__', 'a function')}(pred, target)) raised "
                f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from None

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


def _builtin(task: str, name: str) -> Any:
    correct, confusion = _Correct(), _Confusion()
    cm_metrics = {
        "f1_macro": _cm_f1_macro,
        "f1_micro": _cm_acc,
        "f1_weighted": _cm_f1_weighted,
        "precision_macro": _cm_precision_macro,
        "recall_macro": _cm_recall_macro,
        "balanced_acc": _cm_balanced_acc,
        "miou": _cm_miou,
    }
    if task == "multiclass":
        if name == "acc":
            return BuiltinMetric("acc", True, correct, lambda s: _div(s[0], s[1]))
        m = re.fullmatch(r"top(\d+)_acc", name)
        if m and int(m.group(1)) >= 1:
            return BuiltinMetric(name, True, _TopK(int(m.group(1))), lambda s: _div(s[0], s[1]))
        if name in cm_metrics:
            return BuiltinMetric(name, True, confusion, cm_metrics[name])
    elif task == "binary":
        counts = _BinaryCounts()
        fns = {
            "acc": lambda s: _div(s[0] + s[3], s.sum()),
            "f1": lambda s: _f1(s[0], s[1], s[2]),
            "precision": lambda s: _div(s[0], s[0] + s[1]),
            "recall": lambda s: _div(s[0], s[0] + s[2]),
        }
        if name in fns:
            return BuiltinMetric(name, True, counts, fns[name])
        if name == "auroc":
            return AUROC()
    elif task == "multilabel":
        labels = _LabelCounts()
        fns = {
            "f1_micro": lambda s: _f1(s[0, :-2].sum(), s[1, :-2].sum(), s[2, :-2].sum()),
            "f1_macro": lambda s: _mean(_f1(s[0, :-2], s[1, :-2], s[2, :-2])),
            "exact_match": lambda s: _div(s[0, -2], s[0, -1]),
        }
        if name in fns:
            return BuiltinMetric(name, True, labels, fns[name])
    elif task == "regression":
        sums = _RegressionSums()
        fns = {
            "mse": lambda s: _mean(_div(s[0], s[4])),
            "rmse": lambda s: _mean(np.sqrt(_div(s[0], s[4]))),
            "mae": lambda s: _mean(_div(s[1], s[4])),
            "r2": _r2,
        }
        if name in fns:
            return BuiltinMetric(name, name == "r2", sums, fns[name])
    return None


BUILTIN_METRICS = {
    "multiclass": (
        "acc",
        "top{k}_acc",
        "f1_macro",
        "f1_micro",
        "f1_weighted",
        "precision_macro",
        "recall_macro",
        "balanced_acc",
        "miou",
    ),
    "binary": ("acc", "f1", "precision", "recall", "auroc"),
    "multilabel": ("f1_micro", "f1_macro", "exact_match"),
    "regression": ("mse", "rmse", "mae", "r2"),
}


def confusion_metric() -> BuiltinMetric:
    """The multiclass confusion matrix as a metric state (what ``test()`` writes to the run folder)."""
    return BuiltinMetric("confusion", True, _Confusion(), lambda s: float("nan"))


class TorchmetricsMetric:
    """A ``torchmetrics.Metric``, fed the task's scores and targets; its state and sync are its own."""

    reduction = "own"

    def __init__(self, name: str, metric: Any):
        self.name, self.metric = name, metric
        self.higher_is_better = bool(getattr(metric, "higher_is_better", True))

    def reset(self) -> None:
        self.metric.reset()

    def update(self, out: BatchOutputs) -> None:
        scores, target = out.scores, out.target
        if out.masked:  # boolean indexing: a sync, as torchmetrics' own ignore_index handling
            scores, target = scores[out.mask], target[out.mask]
        self.metric.to(scores.device)
        self.metric.update(scores, target)

    def compute(self) -> float:
        return float(self.metric.compute())


def _is_torchmetrics(obj: Any) -> bool:
    return any(c.__module__.startswith("torchmetrics") for c in type(obj).__mro__)


class HeadMetric:
    """One head's metric in a multi-head model: the metric, fed that head's outputs (:class:`HeadOutputs`).

    Its column is ``<split>_<head>_<name>``; its state is its own (built-ins share one state per head).
    """

    def __init__(self, head: str, name: str, metric: Any):
        self.head, self.name, self.metric = head, f"{head}_{name}", metric
        self.higher_is_better = bool(metric.higher_is_better)
        self.reduction = getattr(metric, "reduction", "sum")
        inner_key = getattr(metric, "state_key", None) or f"metric:{name}"
        self.state_key = f"{head}:{inner_key}"
        # a summed metric's update (a built-in's: its shared statistic's)
        self._update = getattr(metric, "_stat", metric).update if self.reduction == "sum" else None
        self.num_outputs: int | None = None  # the head's width: set by resolve_metrics

    def state_shape(self, num_outputs: int) -> tuple[int, ...]:
        assert self.num_outputs is not None  # the head's task is settled before any metric set is made
        return tuple(self.metric.state_shape(self.num_outputs))

    def update(self, state: Any, out: HeadOutputs | None = None) -> None:
        if self.reduction == "own":  # torchmetrics: update(out)
            self.metric.update(cast_heads(state).heads[self.head])
        else:
            assert self._update is not None  # (a gathered metric has rows, not update)
            self._update(state, cast_heads(out).heads[self.head])

    def rows(self, out: HeadOutputs) -> torch.Tensor:
        return self.metric.rows(cast_heads(out).heads[self.head])

    def empty_rows(self, num_outputs: int, device: torch.device) -> torch.Tensor:
        assert self.num_outputs is not None  # set by resolve_metrics
        return _empty_rows(self.metric, self.num_outputs, device)

    def reset(self) -> None:
        self.metric.reset()

    def compute(self, state: Any = None) -> float:
        return self.metric.compute() if self.reduction == "own" else self.metric.compute(state)

    def __repr__(self) -> str:
        return f"<metric {self.name}>"


def cast_heads(out: Any) -> HeadOutputs:
    return out  # (a multi-head task's outputs() gives HeadOutputs: the type BatchOutputs takes in Task's API)


def _resolve_heads(spec: Iterable | dict | None, task: MultiTask) -> dict[str, Any]:
    """Per-head metrics: ``{"cls": ["acc", ...], "reg": ["mae"]}`` -> ``{"cls_acc": HeadMetric, ...}``."""
    if spec is None:
        spec = task.default_metrics
    if not isinstance(spec, dict) or not all(isinstance(v, (list, tuple, dict)) for v in spec.values()):
        raise ConfigError(
            f"metrics of a multi-head model go per head, like {{'cls': ['acc'], 'reg': ['mae']}} (heads: "
            f"{', '.join(task.tasks)}); got {spec!r}."
        )
    out: dict[str, Any] = {}
    for head, head_spec in spec.items():
        if head not in task.tasks:
            raise ConfigError(
                f"metrics name head {head!r}, which has no scored output; heads the model outputs and the "
                f"targets hold: {', '.join(task.tasks) or 'none'}."
            )
        head_task = task.tasks[head]
        for name, metric in resolve_metrics(head_spec, head_task).items():
            wrapped = HeadMetric(head, name, metric)
            wrapped.num_outputs = head_task.num_outputs
            if wrapped.name in out:
                raise ConfigError(f"metric {wrapped.name!r} is given twice.")
            out[wrapped.name] = wrapped
    return out


def resolve_metrics(spec: Iterable | dict | None, task: Task) -> dict[str, Any]:
    """``metrics=`` (names, metric objects, or ``{name: metric}``) -> ``{name: metric}`` for ``task``; per head
    (``{head: [names...]}``) for a multi-head task."""
    if isinstance(task, MultiTask):
        return _resolve_heads(spec, task)
    if spec is None:
        spec = task.default_metrics
    items: list[tuple[str | None, Any]]
    if isinstance(spec, dict):
        items = list(spec.items())
    elif isinstance(spec, (str, bytes)):
        raise ConfigError(
            f"metrics must be a list of names or a dict, got the string {spec!r} (write [{spec!r}])."
        )
    else:
        items = [(None, m) for m in spec]
    out: dict[str, Any] = {}
    for name, m in items:
        if isinstance(m, str):
            metric = _builtin(task.name, m)
            if metric is None:
                raise ConfigError(
                    f"unknown metric {m!r} for task {task.name}; built-in metrics: "
                    f"{', '.join(BUILTIN_METRICS[task.name])}, or pass a metric object."
                )
            name = name or m
        elif _is_torchmetrics(m):
            name = name or type(m).__name__.lower()
            metric = TorchmetricsMetric(name, m)
        elif isinstance(m, Metric) or (hasattr(m, "rows") and getattr(m, "reduction", "") == "cat"):
            metric, name = m, name or m.name
        elif callable(m) and not isinstance(m, type):  # a plain function fn(pred, target) -> float
            name = str(name or getattr(m, "__name__", type(m).__name__))
            metric = FunctionMetric(name, m, task.name)
        else:
            raise ConfigError(
                f"metric {m!r} is neither a built-in name, a function (pred, target) -> float, nor an object "
                "with name, higher_is_better, state_shape, update and compute (see trainval.metrics)."
            )
        if not re.fullmatch(r"[A-Za-z0-9_]+", str(name)) or name == "loss":
            raise ConfigError(f"metric name {name!r} must be letters, digits and _ (and not 'loss').")
        if name in out:
            raise ConfigError(f"metric {name!r} is given twice.")
        out[name] = metric
    return out


def _float_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


class MetricSet:
    """The running loss and every metric of one split, for one epoch.

    Args:
        metrics: ``{name: metric}`` from :func:`resolve_metrics`.
        num_outputs: classes / labels / outputs (sizes the states).
        device: where the states live.
        capacity: expected steps in the epoch (buffers grow if needed).
    """

    def __init__(self, metrics: dict[str, Any], num_outputs: int, device: torch.device, capacity: int = 64):
        # a metric that keeps its own state (torchmetrics) gets one copy per split
        metrics = {
            name: copy.deepcopy(m) if getattr(m, "reduction", "sum") == "own" else m
            for name, m in metrics.items()
        }
        self.metrics, self.device, self.num_outputs = metrics, device, num_outputs
        self.dtype = _float_dtype(device)
        # one flat buffer for every summed state: one all-reduce and one host read per epoch
        self._layout: list[tuple[str, Any, int, tuple[int, ...]]] = []  # (key, metric, offset, shape)
        self._readers: dict[str, tuple[Any, str]] = {}  # name -> (metric, state key)
        offset = 0
        for name, m in metrics.items():
            kind = getattr(m, "reduction", "sum")
            if kind != "sum":
                continue
            key = getattr(m, "state_key", None) or f"metric:{name}"
            if not any(k == key for k, *_ in self._layout):
                shape = tuple(m.state_shape(num_outputs))
                self._layout.append((key, m, offset, shape))
                offset += int(np.prod(shape)) if shape else 1
            self._readers[name] = (m, key)
        self._size = offset
        self._gathered = {name: m for name, m in metrics.items() if getattr(m, "reduction", "sum") == "cat"}
        self._own = {name: m for name, m in metrics.items() if getattr(m, "reduction", "sum") == "own"}
        self.reset(capacity)

    def reset(self, capacity: int | None = None) -> None:
        capacity = max(1, capacity or 64)
        self.losses = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.weights = torch.zeros(
            capacity, dtype=self.dtype, device=self.device
        )  # the weights on the device
        self._host_weights: list[int | None] = []  # ... and those the host knows (None: on the device)
        self.sizes: list[int] = []
        self._masked = False  # did a batch carry a mask (ignored targets)? then counts are on the device
        self.flat = torch.zeros(self._size, dtype=self.dtype, device=self.device)
        # (update function, state view) per shared state; the built-ins' statistics are called directly
        self._states = [
            (
                getattr(m, "_stat", m).update,
                self.flat[off : off + (int(np.prod(shape)) if shape else 1)].view(shape),
            )
            for _, m, off, shape in self._layout
        ]
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in self._gathered}
        for m in self._own.values():
            m.reset()

    @property
    def count(self) -> int:
        return sum(self.sizes)

    def _grow(self) -> None:
        self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.weights = torch.cat([self.weights, torch.zeros_like(self.weights)])

    def update(self, loss: torch.Tensor, weight: torch.Tensor | int, out: BatchOutputs, size: int) -> None:
        """Add one batch: its mean ``loss``, the ``weight`` that mean was divided by, its metrics.

        No autograd is involved (detached values and counts), so no ``no_grad`` is entered here:
        entering it on every step would cost more than the writes themselves.
        """
        k = len(self.sizes)
        if k == len(self.losses):
            self._grow()
        self.losses[k] = loss.detach()
        if isinstance(weight, int):  # the common case: a count the host knows; no device write per step
            self._host_weights.append(weight)
        else:
            self.weights[k] = weight
            self._host_weights.append(None)
        self.sizes.append(size)
        self._masked = self._masked or out.masked
        for update, state in self._states:
            update(state, out)
        if self._gathered:
            for name, metric in self._gathered.items():
                self._rows[name].append(metric.rows(out).detach())
        if self._own:
            for metric in self._own.values():
                metric.update(out)

    def _batch_weights(self) -> torch.Tensor:
        """Every batch's loss weight, the host-known ones written in (one copy per call: per epoch)."""
        k = len(self.sizes)
        weights = self.weights[:k]
        known = [w for w in self._host_weights if w is not None]
        if not known:
            return weights
        host = torch.tensor([0 if w is None else w for w in self._host_weights], dtype=self.dtype)
        if len(known) == k:
            return host.to(self.device, non_blocking=True)
        on_host = torch.tensor([w is not None for w in self._host_weights])
        return torch.where(on_host.to(self.device), host.to(self.device), weights)

    def state_tensor(self, all_reduce: bool) -> torch.Tensor:
        k = len(self.sizes)
        weights = self._batch_weights()
        head = torch.stack(
            [
                (self.losses[:k].to(self.dtype) * weights).sum(),
                weights.sum(),
                torch.tensor(float(self.count), dtype=self.dtype, device=self.device),
            ]
        )
        totals = torch.cat([head, self.flat])
        if all_reduce and _distributed():
            if dist.get_backend() != "nccl":
                totals = totals.cpu()
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return totals

    def compute(self, all_reduce: bool = True) -> tuple[dict[str, float], int]:
        """``({"loss": ..., name: value, ...}, count)`` over this rank, or all ranks with ``all_reduce``.

        Note: a CPU-GPU sync point (one device-to-host copy per call, once per epoch).
        """
        totals = self.state_tensor(all_reduce).cpu()
        loss_sum, loss_weight, count = totals[:3].tolist()
        flat = totals[3:]
        states = {
            key: flat[off : off + (int(np.prod(shape)) if shape else 1)].view(shape)
            for key, _, off, shape in self._layout
        }
        values: dict[str, float] = {"loss": loss_sum / loss_weight if loss_weight else float("nan")}
        for name, metric in self.metrics.items():
            kind = getattr(metric, "reduction", "sum")
            if kind == "sum":
                values[name] = metric.compute(states[self._readers[name][1]]) if count else float("nan")
            elif kind == "cat":
                rows = self._gather_rows(name, all_reduce)
                values[name] = metric.compute(rows) if len(rows) else float("nan")
            else:
                values[name] = metric.compute() if count else float("nan")
        return values, int(count)

    def state_of(self, key: str) -> torch.Tensor | None:
        """A shared state by key (e.g. ``"confusion"``), summed over ranks (a collective when distributed)."""
        for k, _, off, shape in self._layout:
            if k == key:
                totals = self.state_tensor(True).cpu()[3:]
                return totals[off : off + int(np.prod(shape))].view(shape)
        return None

    def _gather_rows(self, name: str, all_reduce: bool) -> torch.Tensor:
        rows = self._rows[name]
        local = torch.cat(rows) if rows else _empty_rows(self._gathered[name], self.num_outputs, self.device)
        if all_reduce and _distributed():
            return distributed.gather_rows(local)
        return local.cpu()

    def first_nonfinite(self) -> int | None:
        """Index of the first batch whose loss was NaN/Inf, or None. Note: a sync point."""
        k = len(self.sizes)
        idx = (~torch.isfinite(self.losses[:k])).nonzero()
        return int(idx[0, 0]) if len(idx) else None

    def state_dict(self) -> dict:
        k = len(self.sizes)
        return {
            "losses": self.losses[:k].cpu().clone(),
            "weights": self._batch_weights().cpu().clone(),
            "sizes": list(self.sizes),
            "masked": self._masked,
            "flat": self.flat.cpu().clone(),
            "rows": {name: (torch.cat(r).cpu() if r else None) for name, r in self._rows.items()},
        }

    def load_state_dict(self, state: dict, capacity: int | None = None) -> None:
        k = len(state["sizes"])
        self.reset(max(capacity or 0, k + 1))
        self.losses[:k] = state["losses"].to(self.device)
        self.weights[:k] = state["weights"].to(self.device)
        self._host_weights = [None] * k
        self.sizes = list(state["sizes"])
        self._masked = bool(state.get("masked", False))
        self.flat.copy_(state["flat"].to(self.device))
        for name, rows in state.get("rows", {}).items():
            if name in self._rows and rows is not None:
                self._rows[name] = [rows.to(self.device)]


def _empty_rows(metric: Any, num_outputs: int, device: torch.device) -> torch.Tensor:
    """A rank's rows where it saw no batch: the shape its peers' rows have (the gather needs it)."""
    if hasattr(metric, "empty_rows"):
        return metric.empty_rows(num_outputs, device)
    return torch.zeros((0, 2), dtype=torch.float64, device=device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def metric_direction(name: str, metrics: dict[str, Any]) -> str:
    """``"max"`` or ``"min"`` for a monitored ``<split>_<name>``."""
    short = name.split("_", 1)[1]
    if short == "loss":
        return "min"
    return "max" if metrics[short].higher_is_better else "min"
