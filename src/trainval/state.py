"""The loop's own state (what ``last.pt`` carries besides model/optimizer) and the global RNG states.

:class:`LoopState` is one object with ``state_dict``/``load_state_dict``, like an optimizer, so that
what is saved and what is restored cannot drift apart.
"""

from __future__ import annotations

import numbers
import random
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch

from trainval.errors import ConfigError
from trainval.untrusted import shown_repr

# The seeds every generator takes: torch's take a 64-bit integer (signed or not); a signed one leaves room
# for the ``seed + rank`` of each process. NumPy's is taken modulo 2**32.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


@dataclass
class LoopState:
    """Where the loop is and what it has seen: everything here resumes exactly from ``last.pt``."""

    epoch: int = 0                      # completed epochs
    batch_in_epoch: int = 0             # batches done in the epoch in progress
    global_step: int = 0                # optimizer steps
    history: list[dict] = field(default_factory=list)  # one row of metrics per completed epoch
    best_value: float | None = None     # of the monitored metric
    best_epoch: int | None = None
    monitor: str = ""                   # e.g. "val_acc"; its direction in ``mode``
    mode: str = "max"
    should_stop: bool = False
    epoch_start: dict | None = None     # RNG states at the start of the epoch in progress (mid-epoch resume)

    def improved(self, value: float | None) -> bool:
        """Is ``value`` of the monitored metric better than the best so far (NaN never is)?"""
        if value is None or value != value or value in (float("inf"), float("-inf")):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.mode == "max" else value < self.best_value

    def state_dict(self) -> dict:
        state = asdict(self)
        state["history"] = [dict(row) for row in self.history]
        return state

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])
        self.history = [dict(row) for row in self.history]


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as a plain int, or a ConfigError naming the range every generator accepts."""
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and SEED_MIN <= int(seed) <= SEED_MAX:
        return int(seed)  # a NumPy integer too (torch's generators take only a Python int)
    raise ConfigError(f"{name} must be an integer from -2**63 to 2**63 - 1, got {shown_repr(seed)}; pick a seed in that range "
                      "(e.g. 0).")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as tensors and plain containers (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
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
