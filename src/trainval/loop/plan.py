"""The step plan: when an optimizer step, a row (validation), a ``last.pt`` and the run's end are due, and
what each micro-batch's loss weighs in its optimizer step.

Every "when" comes from host-side integer counters (the batch index, ``global_step``, the epoch), so asking
costs no host sync. The loop asks; this module decides.

Exact accumulation (:meth:`StepPlan.weighted`): a group of ``accumulate_steps`` micro-batches takes the step
the large batch would. Each batch's mean loss is multiplied by ``weight * world / W`` (its weight: what its
mean was divided by; ``W``: the group's weight over all its batches and ranks), so that after DDP/FSDP's mean
over the ranks the gradient is the group's summed loss over ``W``. A user's loss whose denominator trainval
cannot know keeps the mean of the micro-batch means (``1 / group``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from trainval import distributed
from trainval.data import Loader, Step, TensorLoader
from trainval.options import TrainerOptions
from trainval.tasks import Task, exact_weight_fn


class StepPlan:
    def __init__(self, options: TrainerOptions):
        self.accumulate = options.accumulate_steps
        self.max_epochs, self.max_steps = options.max_epochs, options.max_steps
        self.val_every, self.checkpoint_every = options.val_every_steps, options.checkpoint_every_steps

    # Accumulation

    def boundary(self, batch_index: int, step: Step) -> bool:
        """Does an optimizer step follow this batch? Every ``accumulate_steps`` batches, and the epoch's last
        (asked last: a stream's ``step.last`` waits for the ranks' count, which runs while the step computes)."""
        return self.accumulate == 1 or (batch_index + 1) % self.accumulate == 0 or step.last

    def group_size(self, batch_index: int, batches: int | None) -> int:
        """Batches in this batch's accumulation group: the last group of an epoch may be short (a stream's
        length is unknown until it ends: its group is rescaled then, see the loop)."""
        if batches is None:
            return self.accumulate
        return min(self.accumulate, batches - (batch_index // self.accumulate) * self.accumulate)

    # Rows, checkpoints, the end

    def steps_done(self, global_step: int) -> bool:
        return self.max_steps is not None and global_step >= self.max_steps

    def row_due(self, global_step: int, epoch_done: int, at_epoch_end: bool) -> bool:
        """Is a row (validation, best.pt, callbacks) due after this optimizer step?

        Without ``val_every_steps``: at each epoch's end, and where ``max_steps`` ends the run inside an epoch.
        With it: every ``val_every_steps`` steps, and at the run's end (``max_steps`` or the last epoch).
        ``epoch_done``: the epochs finished before the current one.
        """
        if self.steps_done(global_step):
            return True
        if self.val_every is None:
            return at_epoch_end
        return global_step % self.val_every == 0 or (at_epoch_end and epoch_done + 1 >= self.max_epochs)

    def checkpoint_due(self, global_step: int) -> bool:
        """A mid-epoch ``last.pt`` (``checkpoint_every_steps``)."""
        return self.checkpoint_every is not None and global_step % self.checkpoint_every == 0

    def total_steps(self, batches_per_epoch: int | None) -> int | None:
        """The run's optimizer steps, for the progress line: ``max_steps`` or the epochs' (a stream's may be
        unknown)."""
        total = self.max_steps
        if batches_per_epoch:
            planned = math.ceil(batches_per_epoch / self.accumulate) * self.max_epochs
            total = planned if total is None else min(total, planned)
        return total

    # What each batch's loss weighs

    def exact_weighting(
        self, loss_fn: nn.Module, task: Task, loader: Loader, world: int
    ) -> tuple[Callable[[torch.Tensor], Any], bool] | None:
        """``(weigh, across_ranks)`` when this epoch's batches are weighted exactly, else ``None``.

        ``None`` for a loss whose denominator trainval cannot know (the mean of micro-batch means, as
        documented), and where weighting changes nothing: one process without accumulation, or several
        whose batches weigh the same on every rank (a shape-only weight over in-memory data, whose padded
        shards give every rank batches of one size), where DDP's mean over ranks is exact already. A
        DataLoader's or a stream's batches (a collate may pad to each batch's longest sequence; a stream's
        last ones are short) and value-dependent weights (``ignore_index``, class weights) are all-reduced.
        """
        weigh, by_value = exact_weight_fn(loss_fn, task)
        if weigh is None:
            return None
        across_ranks = world > 1 and (self.accumulate > 1 or by_value or not isinstance(loader, TensorLoader))
        if self.accumulate == 1 and not across_ranks:
            return None
        return weigh, across_ranks

    def weighted(
        self,
        steps: Iterator[Step],
        start: int,
        weigh: Callable[[torch.Tensor], Any],
        across_ranks: bool,
        world: int,
        device: torch.device,
    ) -> Iterator[Step]:
        """The epoch's steps with ``scale`` and ``weight`` set, an accumulation group read ahead at a time.

        ``weight`` is what the batch's mean loss was divided by (:func:`~trainval.tasks.loss_weight_fn`);
        ``scale = weight * world / W`` with ``W`` the group's weight over all its batches and, with
        ``across_ranks``, all ranks (one all-reduce of one number per optimizer step, on the device: no host
        sync). A group is read whole before its first backward (at most ``accumulate_steps`` batches held on
        the device), so a short last group and a stream's, whose end is known only once read, need no
        rescaling; a rank whose stream share ran out weighs 0 there. Groups end where the loop's boundaries
        are, so a save at a boundary leaves no batch read ahead, and resume is exact.
        """
        i = start
        while True:
            group = []
            for step in steps:
                group.append(step)
                i += 1
                if i % self.accumulate == 0 or step.last:
                    break
            if not group:
                return
            weights = [0 if step.x is None or step.y is None else weigh(step.y) for step in group]
            total = sum(weights)  # a device tensor (ignore_index, class weights) or an int (shapes only)
            if across_ranks or isinstance(total, torch.Tensor):  # (ints alone: host arithmetic, no device op)
                dtype = torch.float32 if device.type == "mps" else torch.float64
                total = (
                    total.to(dtype)
                    if isinstance(total, torch.Tensor)
                    else torch.full((), float(total), dtype=dtype, device=device)
                )
                if across_ranks:
                    total = distributed.all_reduce_sum(total)
            for step, weight in zip(group, weights):
                step.scale, step.weight = weight * world / total, weight
                yield step
