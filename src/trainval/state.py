"""The loop's own state (what ``last.pt`` carries besides model/optimizer) and the global RNG states.

:class:`LoopState` is one object with ``state_dict``/``load_state_dict``, like an optimizer, so that
what is saved and what is restored cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from trainval.errors import CheckpointError
from trainval.options import SEED_MAX, SEED_MIN, check_seed  # noqa: F401 - re-exported: the seed's range
from trainval.untrusted import shown_repr

# ``epoch003-step120-val_acc_0.9312.pt``: no '=' or ':' (awkward in shells, config overrides and on Windows),
# sorted by epoch in a listing. Only names of this form are ever removed by trainval.
TOP_K_FILE = re.compile(r"epoch\d{3,}-step\d+-(?:train|val)_\w+_[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?)\.pt")


def top_k_name(epoch: int, step: int, monitor: str, value: float) -> str:
    """The file name of a top-k checkpoint: epoch, optimizer step, and the monitored value (6 significant digits)."""
    return f"epoch{epoch:03d}-step{step}-{monitor}_{value:.6g}.pt"


@dataclass
class LoopState:
    """Where the loop is and what it has seen: everything here resumes exactly from ``last.pt``."""

    epoch: int = 0  # completed epochs
    batch_in_epoch: int = 0  # batches done in the epoch in progress
    global_step: int = 0  # optimizer steps
    history: list[dict] = field(
        default_factory=list
    )  # one row of metrics per evaluation (epoch, or val_every_steps)
    best_value: float | None = None  # of the monitored metric
    best_epoch: int | None = None  # the epoch of the best row (the one in progress, for a row inside it)
    best_step: int | None = None  # the optimizer steps done at the best row
    monitor: str = ""  # e.g. "val_acc"; its direction in ``mode``
    mode: str = "max"
    should_stop: bool = False
    epoch_start: dict | None = None  # RNG states at the start of the epoch in progress (mid-epoch resume)
    # save_top_k: the kept files, best first: {"file", "epoch", "step", "value"} (the file name follows from
    # the other three, see top_k_name below). Ties: the earlier evaluation stays ahead.
    top_k: list[dict] = field(default_factory=list)
    row_seconds: float = 0.0  # seconds since the previous row at the save (val_every_steps rows' time)

    def improved(self, value: float | None) -> bool:
        """Is ``value`` of the monitored metric better than the best so far (NaN never is)?"""
        if value is None or value != value or value in (float("inf"), float("-inf")):
            return False
        if self.best_value is None:
            return True
        return self._better(value, self.best_value)

    def _better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than

    def enters_top_k(self, value: float | None, k: int) -> bool:
        """Would ``value`` be among the ``k`` best evaluations kept (a finite value strictly better than the
        k-th kept one, or fewer than k kept)?"""
        if value is None or value != value or value in (float("inf"), float("-inf")):
            return False
        return len(self.top_k) < k or self._better(value, self.top_k[k - 1]["value"])

    def add_top_k(self, epoch: int, step: int, value: float, k: int) -> tuple[str, list[str]]:
        """Keep the evaluation ``(epoch, step, value)``: its file name, and the names of the files that fell out."""
        entry: dict[str, Any] = {
            "file": top_k_name(epoch, step, self.monitor, value),
            "epoch": epoch,
            "step": step,
            "value": value,
        }
        at = next((i for i, e in enumerate(self.top_k) if self._better(value, e["value"])), len(self.top_k))
        kept = [e for e in self.top_k if e["file"] != entry["file"]]  # the same evaluation again: replaced
        kept.insert(min(at, len(kept)), entry)
        self.top_k, fallen = kept[:k], kept[k:]
        return entry["file"], [e["file"] for e in fallen]

    def state_dict(self) -> dict:
        state = asdict(self)
        state["history"] = [dict(row) for row in self.history]
        return state

    def load_state_dict(self, state: dict, path: str = "last.pt") -> None:
        """Restore from ``state`` (a checkpoint's ``loop``), checked first (:func:`check_loop`)."""
        checked = check_loop(state, path)
        for f in fields(self):
            if f.name in checked:
                setattr(self, f.name, checked[f.name])
        self.history = [dict(row) for row in self.history]
        self.top_k = [dict(e) for e in self.top_k]


# ----------------------------------------------------------------------------------------------
# What a checkpoint says about the loop is read from a file: every field is checked where it is read.

_COUNT_MAX = 2**63 - 1  # what a step or epoch counter can be (torch's int64)
_REDO = "start a new run, or resume from a last.pt that trainval wrote"


def _bad(path: str, name: str, value: object, expected: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a checkpoint trainval wrote: its {name} is {shown_repr(value)}, not "
        f"{expected}; {_REDO}."
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _COUNT_MAX


def checkpoint_epoch(state: dict, path: str) -> int | None:
    """The completed epochs a loaded checkpoint records (``None``: a bare state_dict, which records none)."""
    epoch = state.get("epoch")
    if epoch is not None and not _is_count(epoch):
        raise _bad(path, "epoch", epoch, "a whole number >= 0")
    return epoch


def check_loop(loop: object, path: str) -> dict:
    """A checkpoint's ``loop`` (what :meth:`LoopState.state_dict` wrote), every field checked.

    Fields that are absent keep their defaults, except ``monitor`` and ``mode``, which resuming compares.
    Each wrong field is one :class:`CheckpointError` naming ``path``, the field and its value.
    """
    if not isinstance(loop, dict):
        raise _bad(path, "loop", loop, "a dict of the loop's state")
    for name in ("monitor", "mode"):
        if name not in loop:
            raise CheckpointError(
                f"{path} is not a checkpoint trainval wrote: it lacks loop.{name}; {_REDO}."
            )
    for name in ("epoch", "batch_in_epoch", "global_step"):
        if name in loop and not _is_count(loop[name]):
            raise _bad(path, f"loop.{name}", loop[name], "a whole number >= 0")
    best_epoch = loop.get("best_epoch")
    if best_epoch is not None and not (_is_count(best_epoch) and best_epoch <= loop.get("epoch", 0) + 1):
        raise _bad(
            path, "loop.best_epoch", best_epoch, "None or an epoch done or in progress (0 to loop.epoch + 1)"
        )
    best_step = loop.get("best_step")
    if best_step is not None and not (_is_count(best_step) and best_step <= loop.get("global_step", 0)):
        raise _bad(
            path, "loop.best_step", best_step, "None or an optimizer step done (0 to loop.global_step)"
        )
    if not _finite_seconds(loop.get("row_seconds", 0.0)):
        raise _bad(path, "loop.row_seconds", loop["row_seconds"], "a number of seconds >= 0")
    best_value = loop.get("best_value")
    if best_value is not None and not (
        isinstance(best_value, numbers.Real)
        and not isinstance(best_value, bool)
        and math.isfinite(best_value)
    ):
        raise _bad(path, "loop.best_value", best_value, "None or a finite number")
    if not isinstance(loop["monitor"], str):
        raise _bad(path, "loop.monitor", loop["monitor"], "a metric's name")
    if loop["mode"] not in ("max", "min"):
        raise _bad(path, "loop.mode", loop["mode"], "'max' or 'min'")
    if "should_stop" in loop and not isinstance(loop["should_stop"], bool):
        raise _bad(path, "loop.should_stop", loop["should_stop"], "True or False")
    history = loop.get("history", [])
    if not isinstance(history, list):
        raise _bad(path, "loop.history", history, "a list of rows of metrics")
    for i, row in enumerate(history):
        if (
            not isinstance(row, dict)
            or not (_is_count(row.get("epoch")) and row["epoch"] >= 1)
            or not (row.get("step") is None or _is_count(row["step"]))
        ):
            raise _bad(
                path, f"loop.history[{i}]", row, "a dict of one row's metrics with its epoch (>= 1) and step"
            )
    start = loop.get("epoch_start")
    if start is not None and not (isinstance(start, dict) and _finite_seconds(start.get("seconds", 0.0))):
        raise _bad(
            path, "loop.epoch_start", start, "None or a dict of the epoch in progress (its seconds >= 0)"
        )
    top_k = loop.get("top_k", [])
    if not isinstance(top_k, list):
        raise _bad(path, "loop.top_k", top_k, "a list of the kept top-k checkpoints")
    for i, e in enumerate(top_k):  # the file names are removed later: each must be the one its fields give
        ok = (
            isinstance(e, dict)
            and _is_count(e.get("epoch"))
            and _is_count(e.get("step"))
            and isinstance(e.get("value"), numbers.Real)
            and not isinstance(e.get("value"), bool)
            and math.isfinite(e["value"])
            and isinstance(loop["monitor"], str)
            and e.get("file") == top_k_name(e["epoch"], e["step"], loop["monitor"], float(e["value"]))
        )
        if not ok:
            raise _bad(
                path,
                f"loop.top_k[{i}]",
                e,
                "a kept top-k checkpoint ({'file', 'epoch', 'step', 'value'}, its "
                "file named after the other three)",
            )
    checked = dict(loop)
    if best_value is not None:
        checked["best_value"] = float(best_value)
    return checked


def _finite_seconds(value: object) -> bool:
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and float(value) >= 0
    )


def check_last(state: dict, path: str) -> dict:
    """A loaded ``last.pt`` whose loop fields are all checked: its ``epoch``, its ``loop`` (:func:`check_loop`),
    that the two agree, and the containers resuming reads (``task``, ``ranks``, ``callbacks``, the optimizer's,
    scheduler's, scaler's and random generators' states, by their types).

    A ``loop`` that is absent is left to the caller, which names what the checkpoint lacks.
    """
    epoch = checkpoint_epoch(state, path)
    if "loop" in state:
        loop = check_loop(state["loop"], path)
        if epoch is None:
            raise _bad(path, "epoch", epoch, "a whole number >= 0")
        if loop.get("epoch", epoch) != epoch:
            raise CheckpointError(
                f"{path} is not a checkpoint trainval wrote: its epoch ({epoch}) and loop.epoch "
                f"({loop['epoch']}) differ; {_REDO}."
            )
    if "task" in state and not isinstance(state["task"], str):
        raise _bad(path, "task", state["task"], "a task's name")
    if state.get("ranks") is not None and not (
        isinstance(state["ranks"], list) and all(isinstance(r, dict) for r in state["ranks"])
    ):
        raise _bad(path, "ranks", state["ranks"], "a list of each process's state")
    if "callbacks" in state and not (isinstance(state["callbacks"], list)):
        raise _bad(path, "callbacks", state["callbacks"], "a list of the callbacks' states")
    for name, expected in (
        ("optimizer", "the optimizer's state_dict"),
        ("rng", "the random generators' states"),
    ):
        if name in state and not isinstance(state[name], dict):
            raise _bad(path, name, state[name], expected)
    for name in ("scheduler", "scaler", "train_metrics"):
        if state.get(name) is not None and not isinstance(state[name], dict):
            raise _bad(path, name, state[name], "a state_dict or None")
    generator = state.get("generator")
    if "generator" in state and not _is_generator_state(generator):
        raise _bad(path, "generator", generator, "the shuffling generator's state (a uint8 tensor)")
    for name, loader in (
        ("loader", state.get("loader")),
        ("loop.epoch_start.loader", ((state.get("loop") or {}).get("epoch_start") or {}).get("loader")),
    ):
        generators = loader.get("generators", []) if isinstance(loader, dict) else None
        if loader is not None and not (
            isinstance(generators, list) and all(map(_is_generator_state, generators))
        ):
            raise _bad(
                path, name, loader, "the training sampler's generator states (a dict of uint8 tensors)"
            )
    return state


def _is_generator_state(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as tensors and plain containers (``weights_only``-loadable)."""
    np_state = np.random.get_state(
        legacy=True
    )  # (the default; numpy's stub types the no-argument call as legacy=False)
    assert isinstance(
        np_state, tuple
    )  # the global RandomState is an MT19937, whose legacy state is this tuple
    return {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
