"""Precision: autocast for the forward, backward, and the optimizer step (clip, grad scaler, zero_grad).

``fp32`` is the same object with nothing switched on (nanoGPT's rule: a disabled feature is a no-op, never an
``if`` in the loop): its ``autocast()`` is a null context, its scaler is torch's disabled ``GradScaler``, whose
``scale`` returns the loss and whose ``step`` calls ``optimizer.step()``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from trainval.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """One run's arithmetic: ``autocast()`` around forwards, ``backward(loss)``, ``step(optimizer)``."""

    def __init__(self, name: str, device: torch.device):
        if name == "fp16" and device.type != "cuda":
            raise ConfigError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU.")
        self.name, self.device_type = name, device.type
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler: a no-op)
        self.scaler = torch.amp.GradScaler(device.type if name == "fp16" else "cpu", enabled=name == "fp16")

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=_DTYPES[self.name])

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(
        self, optimizer: torch.optim.Optimizer, clip: float | None, clip_fn: Any, model: nn.Module
    ) -> None:
        """``optimizer.step()``, then ``zero_grad(set_to_none=True)``: never between backward and step.

        ``clip``: the largest global gradient norm, applied by ``clip_fn(model, clip)`` (the strategy's: under
        FSDP the norm is over every rank's shards) after the scaler unscales the gradients.
        """
        if clip:
            self.scaler.unscale_(optimizer)  # a no-op when disabled
            clip_fn(model, clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler.is_enabled() else None

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(state)
