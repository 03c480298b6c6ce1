"""Running metrics kept on the device and read once per epoch.

Per batch the loop only writes two device scalars into preallocated buffers (the batch's mean loss
and its number of correct argmax predictions): no ``.item()``, no host sync. The buffers are reduced
at the end of the epoch, after one all-reduce across ranks when several processes train. Means are
exact means over samples: each batch's loss is weighted by its size, so an uneven last batch counts
for what it holds. Keeping one loss per step also names the first step whose loss was not finite.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RunningMetrics:
    """Per-batch mean loss and correct count (on the device), batch sizes (on the host)."""

    def __init__(self, device: torch.device, capacity: int = 64):
        self.device = device
        # float64 keeps sums exact enough over millions of samples; MPS has no float64.
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.reset(capacity)

    def reset(self, capacity: int | None = None) -> None:
        capacity = max(1, capacity or 64)
        self.losses = torch.zeros(capacity, dtype=torch.float32, device=self.device)
        self.correct = torch.zeros(capacity, dtype=torch.int64, device=self.device)
        self.sizes: list[int] = []

    @property
    def count(self) -> int:
        return sum(self.sizes)

    def _grow(self) -> None:
        self.losses = torch.cat([self.losses, torch.zeros_like(self.losses)])
        self.correct = torch.cat([self.correct, torch.zeros_like(self.correct)])

    def update(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Add one batch; ``loss`` is the batch mean (the usual ``reduction='mean'``).

        No autograd is involved (a detached copy and an integer count), so no ``no_grad`` is needed
        here: entering it on every step would cost more than the two writes themselves.
        """
        k = len(self.sizes)
        if k == len(self.losses):
            self._grow()
        self.losses[k] = loss.detach()
        self.correct[k] = (logits.argmax(dim=1) == y).sum()
        self.sizes.append(y.shape[0])

    def totals(self) -> torch.Tensor:
        """``[loss_sum, correct, count]`` as one device tensor (no sync)."""
        k = len(self.sizes)
        sizes = torch.tensor(self.sizes, dtype=self.dtype).to(self.device, non_blocking=True)
        return torch.stack([
            (self.losses[:k].to(self.dtype) * sizes).sum(),
            self.correct[:k].sum().to(self.dtype),
            sizes.sum(),
        ])

    def compute(self, all_reduce: bool = True) -> tuple[float, float, int]:
        """``(mean_loss, accuracy, count)`` over this rank, or over all ranks with ``all_reduce``.

        Note: a CPU-GPU sync point (one per call, once per epoch).
        """
        totals = self.totals()
        if all_reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() != "nccl":
                totals = totals.cpu()
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        loss_sum, correct, count = totals.tolist()
        if count == 0:
            return float("nan"), float("nan"), 0
        return loss_sum / count, correct / count, int(count)

    def first_nonfinite(self) -> int | None:
        """Index of the first batch whose loss was NaN/Inf, or None. Note: a sync point."""
        k = len(self.sizes)
        bad = ~torch.isfinite(self.losses[:k])
        idx = bad.nonzero()
        return int(idx[0, 0]) if len(idx) else None

    def state_dict(self) -> dict:
        k = len(self.sizes)
        return {"losses": self.losses[:k].cpu().clone(), "correct": self.correct[:k].cpu().clone(),
                "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict, capacity: int | None = None) -> None:
        k = len(state["sizes"])
        self.reset(max(capacity or 0, k + 1))
        self.losses[:k] = state["losses"].to(self.device)
        self.correct[:k] = state["correct"].to(self.device)
        self.sizes = list(state["sizes"])
