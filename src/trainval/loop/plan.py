"""The step plan: when an optimizer step, a row (validation), a ``last.pt`` and the run's end are due.

Every answer comes from host-side integer counters (the batch index, ``global_step``, the epoch), so asking
costs no host sync. The loop asks; this module decides.
"""

from __future__ import annotations

import math

from trainval.options import TrainerOptions


class StepPlan:
    def __init__(self, options: TrainerOptions):
        self.accumulate = options.accumulate_steps
        self.max_epochs, self.max_steps = options.max_epochs, options.max_steps
        self.val_every, self.checkpoint_every = options.val_every_steps, options.checkpoint_every_steps

    # Accumulation

    def boundary(self, batch_index: int, last: bool) -> bool:
        """Does an optimizer step follow this batch? Every ``accumulate_steps`` batches, and the epoch's last."""
        return self.accumulate == 1 or (batch_index + 1) % self.accumulate == 0 or last

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
        return bool(self.checkpoint_every) and global_step % self.checkpoint_every == 0

    def total_steps(self, batches_per_epoch: int | None) -> int | None:
        """The run's optimizer steps, for the progress line: ``max_steps`` or the epochs' (a stream's may be
        unknown)."""
        total = self.max_steps
        if batches_per_epoch:
            planned = math.ceil(batches_per_epoch / self.accumulate) * self.max_epochs
            total = planned if total is None else min(total, planned)
        return total
