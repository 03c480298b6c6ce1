"""An exponential moving average of the weights (EMA), as a callback: ``Trainer(..., callbacks=[EMA(0.999)])``.

The convention is ``torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
updated after every optimizer step: the first update copies the weights, each later one is
``ema = decay * ema + (1 - decay) * weights`` (``torch._foreach_lerp_``, on the device: no host sync).
Parameters are averaged; buffers (BatchNorm's running statistics) are not: evaluation uses the model's own,
as AveragedModel's default ``use_buffers=False`` does (it copies the model's buffers at every update).

Validation during ``fit`` and the ``best.pt``/top-k files use the averaged weights: they are copied into the
model for that (``on_validation_start``) and the training weights copied back after (``on_validation_end``).
``test`` and ``predict`` reload ``best.pt``, so they use them too. ``last.pt`` holds both: the training
weights as always, and the averaged ones in this callback's state (full tensors by parameter name), so a
resumed run continues bit for bit. Under DDP every rank averages its identical replica; under FSDP each rank
averages its own shards (the state gathers them, a collective, and a resume takes its shards back out of it,
under any strategy: the averages are element-wise, so their values do not depend on the sharding).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, TypeGuard

import torch

from trainval.checkpoint import unwrap_model
from trainval.errors import CheckpointError, ConfigError
from trainval.loop.callbacks import Callback
from trainval.untrusted import shown_names, shown_repr

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from trainval.loop.trainer import Trainer

__all__ = ["EMA"]


def _is_dtensor(t: torch.Tensor) -> TypeGuard[DTensor]:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter (a DTensor's local shard, a view of its storage), or the tensor."""
    return t.to_local() if _is_dtensor(t) else t


class EMA(Callback):
    """Keep an exponential moving average of the model's parameters; evaluate and save best.pt with it.

    Args:
        decay: the weight of the old average at each optimizer step, strictly between 0 and 1 (e.g. 0.999;
            an average over roughly ``1 / (1 - decay)`` steps).
    """

    def __init__(self, decay: float):
        if not (
            isinstance(decay, numbers.Real)
            and not isinstance(decay, bool)
            and math.isfinite(decay)
            and 0.0 < decay < 1.0
        ):
            raise ConfigError(
                f"EMA decay must be a number strictly between 0 and 1 (e.g. 0.999), got {shown_repr(decay)}."
            )
        self.decay: float = float(decay)
        self.updates: int = 0  # AveragedModel's n_averaged
        self.averaged: list[torch.Tensor] = []  # one per parameter, placed (and sharded) like it
        self._names: list[str] = []
        self._params: list[torch.Tensor] = []
        self._loaded: dict | None = None  # from last.pt, applied once the model's parameters are known
        self._backup: list[torch.Tensor] | None = None
        self._all_floating: bool = True  # every parameter lerp-able (set at fit start)

    # -- the hooks ---------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        named = list(unwrap_model(trainer.model).named_parameters())
        self._names, self._params = [n for n, _ in named], [p for _, p in named]
        with torch.no_grad():
            self.averaged = [p.detach().clone() for p in self._params]
        self._all_floating = all(
            p.is_floating_point() or p.is_complex() for p in self._params
        )  # (lerp's dtypes)
        loaded, self._loaded = self._loaded, None
        if loaded:
            self._load(loaded, trainer.last_path)
        elif (
            trainer.global_step > 0
        ):  # resumed from a last.pt without EMA weights: the average cannot continue
            raise CheckpointError(
                f"{trainer.last_path} holds no EMA weights (it was trained without EMA), so the average "
                "cannot continue exactly: resume without EMA, or start a new run with it."
            )
        else:
            self.updates = 0

    @torch.no_grad()
    def on_optimizer_step(self, trainer: Trainer) -> None:
        params, averaged = self._locals(self._params), self._locals(self.averaged)
        if self.updates == 0:
            torch._foreach_copy_(averaged, params)
        else:
            if self._all_floating:
                torch._foreach_lerp_(averaged, params, 1.0 - self.decay)
            else:  # get_ema_multi_avg_fn's rule for other dtypes
                for a, p in zip(averaged, params):
                    a.copy_(a * self.decay + p * (1.0 - self.decay))
        self.updates += 1  # a host counter: no sync

    @torch.no_grad()
    def on_validation_start(self, trainer: Trainer) -> None:
        if self.updates == 0:
            return  # no optimizer step yet: the weights are their own average
        params = self._locals(self._params)
        self._backup = [t.clone() for t in params]
        torch._foreach_copy_(params, self._locals(self.averaged))

    @torch.no_grad()
    def on_validation_end(self, trainer: Trainer) -> None:
        if self._backup is not None:
            torch._foreach_copy_(self._locals(self._params), self._backup)
            self._backup = None

    # -- state (in last.pt) -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """``{"decay", "updates", "averaged": {name: full tensor on the CPU}}``; under FSDP a collective."""
        full = [a.full_tensor() if _is_dtensor(a) else a for a in self.averaged]
        return {
            "decay": self.decay,
            "updates": self.updates,
            "averaged": {n: t.detach().cpu() for n, t in zip(self._names, full)},
        }

    def load_state_dict(self, state: dict) -> None:
        self._loaded = state if isinstance(state, dict) else {"invalid": state}

    def _load(self, state: dict, path: str) -> None:
        updates, decay, averaged = state.get("updates"), state.get("decay"), state.get("averaged")
        if not (
            isinstance(updates, int)
            and not isinstance(updates, bool)
            and updates >= 0
            and isinstance(decay, float)
            and isinstance(averaged, dict)
        ):
            raise CheckpointError(
                f"{path} is not a checkpoint trainval wrote: its EMA state is {shown_repr(state)}; "
                "start a new run, or resume from a last.pt that trainval wrote."
            )
        if decay != self.decay:
            raise ConfigError(
                f"{path} was averaged with EMA decay {decay!r}; this run's is {self.decay!r}: resume with "
                "the same decay, or start a new run."
            )
        names = set(self._names)
        wrong = sorted(set(averaged) ^ names) + [
            n
            for n, p in zip(self._names, self._params)
            if n in averaged
            and not (
                isinstance(averaged[n], torch.Tensor)
                and averaged[n].shape == p.shape
                and averaged[n].dtype == p.dtype
            )
        ]
        if wrong:
            raise CheckpointError(
                f"{path}'s EMA weights do not fit this model ({shown_names(wrong, 8)}): resume with "
                "the model it was trained with."
            )
        with torch.no_grad():
            for a, name in zip(self.averaged, self._names):
                full = averaged[name]
                if _is_dtensor(a):  # this rank's shard of the full tensor: no communication
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(
                        full.to(a.device), a.device_mesh, a.placements, src_data_rank=None
                    ).to_local()
                _local(a).copy_(full)
        self.updates = updates

    @staticmethod
    def _locals(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [_local(t) for t in tensors]

    def __repr__(self) -> str:
        return f"EMA(decay={self.decay})"
