"""The Trainer's plain-valued options, each declared once: type, default, check, meaning, CLI key.

:class:`TrainerOptions` is the one declaration. Everything else derives from it:

- ``Trainer(...)`` passes its keyword arguments through it (the checks run in ``__post_init__``);
- the config schema (:data:`trainval.config.SCHEMA`) takes the keys named by ``cli`` from it, with their
  type, bounds, choices and description, so the README's reference table follows;
- ``trainval fit`` builds the Trainer with :func:`from_config`;
- ``fit --resume`` reads what may change from ``resume`` (see :data:`trainval.config.RESUME_MAY_CHANGE`);
- the run summary records :func:`plain` of them.

Objects (the model, optimizer, loss, task, metrics, callbacks, scheduler, strategy, config) are
arguments of ``Trainer`` itself: they are not plain values and have no CLI key of their own.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from trainval.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


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


def option(default: Any, doc: str, kind: str, *, cli: str | None = None, cli_default: Any = ...,
           minimum: float | None = None, maximum: float | None = None, choices: tuple | None = None,
           positive: bool = False, resume: str | None = None) -> Any:
    """A :class:`TrainerOptions` field: its default, its meaning (``doc``), its check and its CLI key.

    ``kind``: int, float, bool or str (``Optional`` when the default is None); ``positive``: > 0 (the
    Trainer's check; ``minimum`` is the CLI's bound where they differ); ``cli``: ``section.key`` of the
    config file; ``cli_default``: the CLI's default where it is not the Trainer's; ``resume``: why
    ``fit --resume`` may change the key (absent: it may not).
    """
    meta = {"doc": doc, "kind": kind, "cli": cli, "cli_default": default if cli_default is ... else cli_default,
            "minimum": minimum, "maximum": maximum, "choices": choices, "positive": positive, "resume": resume}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainerOptions:
    """The plain-valued options of :class:`~trainval.trainer.Trainer` (see its docstring for each)."""

    max_epochs: int = option(20, "epochs to train", "int", cli="train.epochs", cli_default=30, minimum=1,
                             positive=True, resume="train for more (or as many) epochs; refused with a cosine or "
                                                   "onecycle schedule, whose shape depends on the number of epochs")
    out_dir: str = option("runs/exp", "run folder", "str")
    seed: int = option(0, "seed of Python, NumPy, torch and the shuffling", "int", cli="train.seed",
                       minimum=-(2**63), maximum=2**63 - 1)  # state.check_seed's range
    monitor: str | None = option(None, "metric that picks best.pt: `val_<metric>`, `train_<metric>` or `*_loss` "
                                       "(default: val_ + the first metric)", "str", cli="train.monitor")
    mode: str | None = option(None, "`max` or `min` (default: the metric's direction; min for losses)", "str",
                              cli="train.mode", choices=("max", "min"))
    batch_size: int = option(64, "batch size per process", "int", cli="train.batch_size", minimum=1, positive=True)
    eval_batch_size: int | None = option(None, "evaluation batch size (default: batch_size)", "int",
                                         cli="train.eval_batch_size", minimum=1, positive=True)
    ignore_index: int | None = option(None, "multiclass: targets with this value count in no loss and no metric "
                                            "(default -100)", "int", cli="task.ignore_index")
    threshold: float = option(0.5, "binary/multilabel: probability above which a prediction is 1", "float",
                              cli="task.threshold", minimum=0.0, maximum=1.0)
    target_key: str = option("labels", "the target's key in dict batches", "str")
    output_key: str = option("logits", "the prediction's key in dict model outputs", "str")
    eval_frozen_batchnorm: bool = option(True, "frozen BatchNorm layers run in eval mode while training", "bool")
    progress: bool = option(True, "progress bar (terminal) or bounded-rate progress lines", "bool",
                            cli="train.progress", resume="display only")
    device: Any = option(None, "`cpu`, `cuda`, `cuda:1`... (default: CUDA if available)", "str", cli="train.device")
    scheduler_interval: str | None = option(None, "`step` or `epoch`", "str", choices=("step", "epoch"))
    grad_clip: float | None = option(None, "clip the gradient norm to this value", "float", cli="train.grad_clip",
                                     minimum=0.0, positive=True)
    accumulate_steps: int = option(1, "batches per optimizer step (gradient accumulation)", "int",
                                   cli="train.accumulate_steps", minimum=1, positive=True)
    precision: str = option("fp32", "`fp32`, `bf16` (autocast) or `fp16` (autocast + grad scaler, CUDA)", "str",
                            cli="train.precision", choices=PRECISIONS)
    compile: bool = option(False, "run the model through torch.compile", "bool", cli="train.compile")
    checkpoint_every_steps: int | None = option(None, "also write last.pt every N optimizer steps", "int",
                                                cli="train.checkpoint_every_steps", minimum=1, positive=True,
                                                resume="how often last.pt is written")
    async_save: bool = option(False, "write last.pt in a background thread from a CPU copy of the state (training "
                                     "goes on meanwhile)", "bool", cli="train.async_save",
                              resume="how last.pt is written, not what it holds")
    check_inputs: bool = option(True, "refuse NaN/Inf features before training", "bool", cli="data.check_inputs")
    on_device: bool | None = option(None, "keep in-memory data on the GPU (default: when it fits)", "bool",
                                    cli="data.on_device", resume="placement only")
    num_workers: int = option(0, "DataLoader workers for Dataset inputs", "int", cli="data.num_workers", minimum=0,
                              resume="loading only")
    overwrite: bool = option(False, "allow a new fit into a folder that holds a run", "bool", cli="run.overwrite",
                             resume="not used by resume")
    plot: bool = option(True, "write curves.png", "bool", cli="log.plot", resume="logging only")
    strategy: Any = option("auto", "several processes: `ddp` (a replica per process), `fsdp` (FSDP2: weights, "
                                   "gradients and optimizer state sharded), `auto` (ddp)", "str", cli="train.strategy",
                           choices=("auto", "ddp", "fsdp"),
                           resume="any strategy reads last.pt, whole or sharded (fsdp's shards are put together or "
                                  "re-split on load)")
    sync_batchnorm: bool = option(False, "BatchNorm statistics over every process's batch (SyncBatchNorm; DDP on "
                                         "CUDA)", "bool", cli="train.sync_batchnorm")
    dist_timeout: float | None = option(None, "seconds a collective waits for the other processes before the run "
                                              "fails (default: env TRAINVAL_DIST_TIMEOUT, or 300)", "float",
                                        cli="train.dist_timeout", minimum=1.0, positive=True,
                                        resume="how long collectives wait only")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check(f.name, getattr(self, f.name), f)
        if self.monitor is not None and not re.fullmatch(r"(train|val)_\w+", str(self.monitor)):
            raise ConfigError(f"monitor must be 'val_<metric>', 'train_<metric>', 'val_loss' or 'train_loss', "
                              f"got {self.monitor!r}.")


def _check(name: str, value: Any, f: dataclasses.Field) -> None:
    """The Trainer's check of one option: its type, its sign, its choices (one clear sentence)."""
    meta = f.metadata
    if value is None and f.default is None:
        return
    kind, objects = meta["kind"], name in ("device", "strategy")  # these two also take objects
    if objects:
        return  # checked where they are used: torch.device(...), make_strategy(...)
    if kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be {'a positive integer' if meta['positive'] else 'an integer'}, "
                              f"got {value!r}.")
    elif kind == "float":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigError(f"{name} must be {'a positive number' if meta['positive'] else 'a finite number'}, "
                              f"got {value!r}.")
    elif kind == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False, got {value!r}.")
    elif kind == "str" and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}.")
    if meta["positive"] and value <= 0:
        raise ConfigError(f"{name} must be a positive {'integer' if kind == 'int' else 'number'}, got {value!r}.")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}.")


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
        keys[m["cli"]] = Key(m["kind"], default, m["doc"], choices=m["choices"], minimum=m["minimum"],
                             maximum=m["maximum"], nullable=default is None)
    return keys


def resume_may_change() -> dict[str, str]:
    """``{"section.key": why}`` for the options a resumed run may change."""
    return {f.metadata["cli"]: f.metadata["resume"] for f in fields() if f.metadata["cli"] and f.metadata["resume"]}


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
        out[f.name] = value if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__
    return out
