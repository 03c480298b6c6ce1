"""The Trainer's plain-valued options, each declared once: type, default, check, meaning, CLI key.

:class:`TrainerOptions` is the one declaration. Everything else derives from it:

- ``Trainer(...)`` passes its keyword arguments through it (the checks run in ``__post_init__``);
- the config schema (:data:`trainval.app.config.SCHEMA`) takes the keys named by ``cli`` from it, with their
  type, bounds, choices and description, so the README's reference table follows;
- ``trainval fit`` builds the Trainer with :func:`from_config`;
- ``fit --resume`` reads what may change from ``resume`` (see :data:`trainval.app.config.RESUME_MAY_CHANGE`);
- the run summary records :func:`plain` of them.

Objects (the model, optimizer, loss, task, metrics, callbacks, scheduler, strategy, config) are
arguments of ``Trainer`` itself: they are not plain values and have no CLI key of their own.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

from trainval.errors import ConfigError
from trainval.untrusted import shown_repr

PRECISIONS = ("fp32", "bf16", "fp16")

# The seeds every generator takes: torch's take a 64-bit integer (signed or not); a signed one leaves room
# for the ``seed + rank`` of each process. NumPy's is taken modulo 2**32.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as a plain int, or a ConfigError naming the range every generator accepts."""
    if (
        isinstance(seed, numbers.Integral)
        and not isinstance(seed, bool)
        and SEED_MIN <= int(seed) <= SEED_MAX
    ):
        return int(seed)  # a NumPy integer too (torch's generators take only a Python int)
    raise ConfigError(
        f"{name} must be an integer from -2**63 to 2**63 - 1, got {shown_repr(seed)}; pick a seed in that range "
        "(e.g. 0)."
    )


@dataclass(frozen=True)
class Key:
    """One config key: ``kind`` is int, float, bool, str, list[int], list[str] or dict."""

    kind: str
    default: Any
    doc: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = False
    open_choices: bool = False  # besides ``choices``, a 'module:Name' import string is allowed
    extra: dict = field(default_factory=dict)


def option(
    default: Any,
    doc: str,
    kind: str,
    *,
    cli: str | None = None,
    cli_doc: str | None = None,
    cli_default: Any = ...,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple | None = None,
    positive: bool = False,
    resume: str | None = None,
    unit: str | None = None,
) -> Any:
    """A :class:`TrainerOptions` field: its default, its meaning (``doc``), its check and its CLI key.

    ``kind``: int, float, bool or str (``Optional`` when the default is None); ``positive``: > 0 (the
    Trainer's check; ``minimum`` is the CLI's bound where they differ); ``cli``: ``section.key`` of the
    config file, ``cli_doc`` its line in the README's table (default: ``doc``), ``cli_default`` its default
    where it is not the Trainer's; ``resume``: why ``fit --resume`` may change the key (absent: it may not);
    ``unit``: what the number counts, in the message of a wrong value.
    """
    meta = {
        "doc": doc,
        "kind": kind,
        "cli": cli,
        "cli_doc": cli_doc or doc,
        "cli_default": default if cli_default is ... else cli_default,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "positive": positive,
        "resume": resume,
        "unit": unit,
    }
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainerOptions:
    """The plain-valued options of :class:`~trainval.loop.trainer.Trainer`, each declared once."""

    max_epochs: int = option(
        20,
        "epochs to train (a resumed run continues up to this number)",
        "int",
        cli="train.epochs",
        cli_doc="epochs to train",
        cli_default=30,
        minimum=1,
        positive=True,
        resume="train for more (or as many) epochs; refused with a cosine or onecycle schedule, whose shape "
        "depends on the number of epochs",
    )
    max_steps: int | None = option(
        None,
        "stop after this many optimizer steps (with ``max_epochs``, whichever comes first); a run that reaches "
        "it inside an epoch ends with a validation row at that step and a ``last.pt``",
        "int",
        cli="train.max_steps",
        cli_doc="stop after this many optimizer steps (with epochs, whichever comes first)",
        minimum=1,
        positive=True,
        unit="optimizer steps",
        resume="train for more (or as many) steps; refused with a onecycle schedule, whose shape depends on it",
    )
    val_every_steps: int | None = option(
        None,
        "validate, log a row, choose ``best.pt`` and let callbacks (early stopping) decide every this many "
        "optimizer steps, and once more at the run's end, instead of at each epoch's end. A row reports the "
        "training metrics of the batches since the previous row. ``EarlyStopping``'s and ReduceLROnPlateau's "
        "patience then count evaluations; other epoch-interval schedulers still step per epoch. Every row "
        "carries ``step``, the optimizer steps done at that row",
        "int",
        cli="train.val_every_steps",
        cli_doc="validate, log a row, pick best.pt and early-stop every N optimizer steps (and at the end) instead of "
        "per epoch",
        minimum=1,
        positive=True,
        unit="optimizer steps",
    )
    out_dir: str = option(
        "runs/exp",
        "run folder for ``best.pt``, ``last.pt``, ``metrics.csv``, ``curves.png`` and ``summary.json`` "
        "(see :class:`~trainval.app.runs.RunSummary`)",
        "str",
    )
    seed: int = option(
        0,
        "seeds the trainer's shuffling generator (the same on every process: one shared permutation) and, at the "
        "start of ``fit``, Python/NumPy/torch with ``seed + rank`` (each process draws its own dropout masks and "
        "DataLoader worker seeds)",
        "int",
        cli="train.seed",
        cli_doc="seed of Python, NumPy, torch and the shuffling",
        minimum=SEED_MIN,
        maximum=SEED_MAX,
    )
    monitor: str | None = option(
        None,
        "the metric that picks ``best.pt``: ``val_<metric>``, ``train_<metric>`` or ``*_loss`` (default: "
        "``val_`` + the first metric, ``train_`` without validation data)",
        "str",
        cli="train.monitor",
        cli_doc="metric that picks best.pt: `val_<metric>`, `train_<metric>` or `*_loss` (default: val_ + the first "
        "metric)",
    )
    mode: str | None = option(
        None,
        "``max`` or ``min``: overrides the direction the monitored metric implies (min for losses)",
        "str",
        cli="train.mode",
        cli_doc="`max` or `min` (default: the metric's direction; min for losses)",
        choices=("max", "min"),
    )
    batch_size: int = option(
        64,
        "samples per batch, per process",
        "int",
        cli="train.batch_size",
        cli_doc="batch size per process",
        minimum=1,
        positive=True,
    )
    eval_batch_size: int | None = option(
        None,
        "samples per evaluation batch (default: ``batch_size``)",
        "int",
        cli="train.eval_batch_size",
        cli_doc="evaluation batch size (default: batch_size)",
        minimum=1,
        positive=True,
    )
    ignore_index: int | None = option(
        None,
        "multiclass: targets with this value are left out of the loss's mean and every metric (default: the "
        "loss's own ``ignore_index``, -100 for cross-entropy)",
        "int",
        cli="task.ignore_index",
        cli_doc="multiclass: targets with this value count in no loss and no metric (default -100)",
    )
    threshold: float = option(
        0.5,
        "binary/multilabel: probability above which a prediction is 1",
        "float",
        cli="task.threshold",
        minimum=0.0,
        maximum=1.0,
    )
    target_key: str = option("labels", "the target's key in dict batches", "str")
    output_key: str = option(
        "logits",
        "the prediction's key in dict model outputs (a tuple output's first element is the prediction)",
        "str",
    )
    eval_frozen_batchnorm: bool = option(
        True,
        "run BatchNorm layers whose parameters are all frozen in eval mode while training, so their running "
        "statistics stay as loaded (Keras' rule)",
        "bool",
    )
    progress: bool = option(
        True,
        "a progress bar on a terminal, bounded-rate progress lines otherwise (rank 0)",
        "bool",
        cli="train.progress",
        cli_doc="progress bar (terminal) or bounded-rate progress lines",
        resume="display only",
    )
    device: Any = option(
        None,
        "``cpu``, ``cuda``, ``cuda:1``... (default: CUDA if available; ``LOCAL_RANK`` under torchrun)",
        "str",
        cli="train.device",
        cli_doc="`cpu`, `cuda`, `cuda:1`... (default: CUDA if available)",
    )
    scheduler_interval: str | None = option(
        None,
        "``step`` or ``epoch``: when the scheduler steps (default: per step for OneCycleLR/CyclicLR, per epoch "
        "otherwise; ReduceLROnPlateau gets the monitored value)",
        "str",
        choices=("step", "epoch"),
    )
    grad_clip: float | None = option(
        None,
        "clip the global gradient norm to this value (> 0)",
        "float",
        cli="train.grad_clip",
        cli_doc="clip the gradient norm to this value",
        minimum=0.0,
        positive=True,
    )
    accumulate_steps: int = option(
        1,
        "micro-batches per optimizer step (gradient accumulation), equal to one batch that many times larger: "
        "each micro-batch's mean loss is weighted by its share of the group's count (samples; non-ignored "
        "targets or their class weights for cross-entropy/NLL; elements for BCE, MSE, L1, SmoothL1, Huber) over "
        "the whole group and every rank, a short last group and a stream's included (the group is read ahead: "
        "up to this many batches held on the device). A ``loss_fn`` of your own (not one of those) keeps the "
        "mean of the micro-batch means: its denominator is unknown",
        "int",
        cli="train.accumulate_steps",
        cli_doc="batches per optimizer step (gradient accumulation)",
        minimum=1,
        positive=True,
    )
    precision: str = option(
        "fp32",
        "``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + grad scaler, CUDA)",
        "str",
        cli="train.precision",
        cli_doc="`fp32`, `bf16` (autocast) or `fp16` (autocast + grad scaler, CUDA)",
        choices=PRECISIONS,
    )
    compile: bool = option(
        False,
        "run the model through ``torch.compile`` (checkpoints stay loadable into a plain model)",
        "bool",
        cli="train.compile",
        cli_doc="run the model through torch.compile",
    )
    checkpoint_every_steps: int | None = option(
        None,
        "also write ``last.pt`` every this many optimizer steps inside an epoch",
        "int",
        cli="train.checkpoint_every_steps",
        cli_doc="also write last.pt every N optimizer steps",
        minimum=1,
        positive=True,
        resume="how often last.pt is written",
    )
    async_save: bool = option(
        False,
        "write ``last.pt`` in the background: its state is copied to CPU memory, then training goes on while a "
        "thread writes it (DCP's ``async_save`` for a sharded last.pt). At most one write is in flight; ``fit`` "
        "waits for it before the next one, at its end, on a stop and on errors, and a failed write raises "
        ":class:`~trainval.errors.CheckpointError` from ``fit``. ``best.pt`` is always written synchronously",
        "bool",
        cli="train.async_save",
        cli_doc="write last.pt in a background thread from a CPU copy of the state (training goes on meanwhile)",
        resume="how last.pt is written, not what it holds",
    )
    save_top_k: int | None = option(
        None,
        "also keep the ``k`` best evaluations (by ``monitor``) as plain checkpoints in ``out_dir``, named "
        '``epoch003-step120-val_acc_0.9312.pt`` (``torch.load(..., weights_only=True)["model"]``, like best.pt, '
        "which stays the best). A new one is written atomically before the one it pushes out is removed, and "
        "that removal waits until last.pt records the new set, so a crash at any point leaves at least ``k`` of "
        "them; a resumed run continues the set of its last.pt (files of that form which the set does not list "
        "are removed: written after last.pt, their evaluation runs again), and a new fit into the folder "
        "(``overwrite``) removes the replaced run's",
        "int",
        cli="train.save_top_k",
        cli_doc="also keep the k best evaluations as `epoch003-step120-val_acc_0.9312.pt` files (default: best.pt only)",
        minimum=1,
        positive=True,
        unit="the number of best checkpoints to keep",
    )
    check_inputs: bool = option(
        True,
        "refuse NaN/Inf in in-memory features before training",
        "bool",
        cli="data.check_inputs",
        cli_doc="refuse NaN/Inf features before training",
    )
    on_device: bool | None = option(
        None,
        "keep in-memory data wholly on the GPU (default: when it takes under 1/4 of free memory)",
        "bool",
        cli="data.on_device",
        cli_doc="keep in-memory data on the GPU (default: when it fits)",
        resume="placement only",
    )
    num_workers: int = option(
        0,
        "DataLoader workers for Datasets (map-style or streams) given without a DataLoader",
        "int",
        cli="data.num_workers",
        cli_doc="DataLoader workers for Dataset inputs",
        minimum=0,
        resume="loading only",
    )
    overwrite: bool = option(
        False,
        "allow ``fit`` into an ``out_dir`` that already holds a run",
        "bool",
        cli="run.overwrite",
        cli_doc="allow a new fit into a folder that holds a run",
        resume="not used by resume",
    )
    plot: bool = option(
        True,
        "write ``curves.png`` at the end of ``fit``",
        "bool",
        cli="log.plot",
        cli_doc="write curves.png",
        resume="logging only",
    )
    strategy: Any = option(
        "auto",
        "``auto`` (DDP on several processes), ``ddp``, ``fsdp`` (FSDP2: parameters, gradients and optimizer "
        "state sharded over the processes), or a :mod:`trainval.loop.strategies` object (e.g. "
        "``FSDPStrategy(param_dtype=torch.bfloat16, cpu_offload=True)``)",
        "str",
        cli="train.strategy",
        cli_doc="several processes: `ddp` (a replica per process), `fsdp` (FSDP2: weights, gradients and optimizer "
        "state sharded), `auto` (ddp)",
        choices=("auto", "ddp", "fsdp"),
        resume="any strategy reads last.pt, whole or sharded (fsdp's shards are put together or re-split on load)",
    )
    sync_batchnorm: bool = option(
        False,
        "BatchNorm statistics over every process's batch (``SyncBatchNorm``; DDP on CUDA)",
        "bool",
        cli="train.sync_batchnorm",
        cli_doc="BatchNorm statistics over every process's batch (SyncBatchNorm; DDP on CUDA)",
    )
    dist_timeout: float | None = option(
        None,
        "seconds a collective waits for the other processes before the run fails (default: the "
        "``TRAINVAL_DIST_TIMEOUT`` environment variable, or 300)",
        "float",
        cli="train.dist_timeout",
        cli_doc="seconds a collective waits for the other processes before the run fails (default: env "
        "TRAINVAL_DIST_TIMEOUT, or 300)",
        minimum=1.0,
        positive=True,
        resume="how long collectives wait only",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "seed", check_seed(self.seed))  # a NumPy integer becomes a plain int
        object.__setattr__(self, "out_dir", str(self.out_dir))  # a pathlib.Path too
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f)
        if self.monitor is not None and not re.fullmatch(r"(train|val)_\w+", str(self.monitor)):
            raise ConfigError(
                f"monitor must be 'val_<metric>', 'train_<metric>', 'val_loss' or 'train_loss', "
                f"got {self.monitor!r}."
            )


class TrainerOptionsArgs(TypedDict, total=False):
    """The options as ``Trainer``'s keyword arguments, for type checkers: ``**options: Unpack[TrainerOptionsArgs]``
    lets mypy and pyright check a user's option names and value types. The same names and types as
    :class:`TrainerOptions` (``tests/test_loop_core.py`` holds the two together)."""

    max_epochs: int
    max_steps: int | None
    val_every_steps: int | None
    out_dir: str | os.PathLike[str]  # made a str by TrainerOptions
    seed: int
    monitor: str | None
    mode: str | None
    batch_size: int
    eval_batch_size: int | None
    ignore_index: int | None
    threshold: float
    target_key: str
    output_key: str
    eval_frozen_batchnorm: bool
    progress: bool
    device: Any
    scheduler_interval: str | None
    grad_clip: float | None
    accumulate_steps: int
    precision: str
    compile: bool
    checkpoint_every_steps: int | None
    async_save: bool
    save_top_k: int | None
    check_inputs: bool
    on_device: bool | None
    num_workers: int
    overwrite: bool
    plot: bool
    strategy: Any
    sync_batchnorm: bool
    dist_timeout: float | None


def _check(name: str, value: Any, f: dataclasses.Field) -> None:
    """The Trainer's check of one option: its type, its sign, its choices (one clear sentence)."""
    meta = f.metadata
    if value is None and f.default is None:
        return
    if name in ("device", "strategy"):  # these two also take objects: checked where they are used
        return
    kind = meta["kind"]
    expected = {"int": "an integer", "float": "a finite number", "bool": "True or False", "str": "a string"}[
        kind
    ]
    if meta["positive"]:
        expected = "a positive integer" if kind == "int" else "a positive number"
    if meta["unit"]:
        expected += f" ({meta['unit']})"
    if f.default is None:
        expected += " or None"
    wrong = ConfigError(f"{name} must be {expected}, got {shown_repr(value)}.")
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise wrong
    if kind == "float" and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    ):
        raise wrong
    if (kind == "bool" and not isinstance(value, bool)) or (kind == "str" and not isinstance(value, str)):
        raise wrong
    if meta["positive"] and value <= 0:
        raise wrong
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(
            f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {shown_repr(value)}."
        )


def make_options(given: Mapping[str, Any]) -> TrainerOptions:
    """``TrainerOptions(**given)``; an unknown name is one clear sentence with the closest option."""
    names = [f.name for f in fields()]
    unknown = [k for k in given if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; the options are {', '.join(names)}"
        raise ConfigError(f"Trainer got an unknown option {unknown[0]!r}{hint}.")
    return TrainerOptions(**given)


def signature_with_options(init: Any) -> inspect.Signature:
    """``init``'s signature with ``**options`` spelled out: each option, keyword-only, with its default."""
    signature = inspect.signature(init)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in fields()
    ]
    return signature.replace(parameters=params)


def docs(indent: str = "        ") -> str:
    """The options as a docstring's ``name: meaning`` lines (the Trainer's "Options" section)."""
    lines = []
    for f in fields():
        words, line = f"{f.name}: {f.metadata['doc']}.".split(" "), indent
        for word in words:
            if len(line) + len(word) > 110 and line.strip():
                lines.append(line.rstrip())
                line = indent + "    "
            line += word + " "
        lines.append(line.rstrip())
    return "\n".join(lines)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainerOptions)


def cli_keys() -> dict[str, Key]:
    """``{"section.key": Key}`` for every option the config file sets (the CLI's defaults and bounds)."""
    keys = {}
    for f in fields():
        m = f.metadata
        if m["cli"] is None:
            continue
        default = m["cli_default"]
        keys[m["cli"]] = Key(
            m["kind"],
            default,
            m["cli_doc"],
            choices=m["choices"],
            minimum=m["minimum"],
            maximum=m["maximum"],
            nullable=default is None,
        )
    return keys


def resume_may_change() -> dict[str, str]:
    """``{"section.key": why}`` for the options a resumed run may change."""
    return {
        f.metadata["cli"]: f.metadata["resume"]
        for f in fields()
        if f.metadata["cli"] and f.metadata["resume"]
    }


def from_config(cfg: dict) -> dict[str, Any]:
    """The Trainer's keyword arguments for the options a config sets."""
    out = {}
    for f in fields():
        path = f.metadata["cli"]
        if path is not None:
            section, _, key = path.partition(".")
            out[f.name] = cfg[section][key]
    return out


def plain(options: TrainerOptions) -> dict[str, Any]:
    """The options as plain values (for summary.json and trackers); objects by their class name."""
    out = {}
    for f in fields():
        value = getattr(options, f.name)
        out[f.name] = (
            value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__
        )
    return out
