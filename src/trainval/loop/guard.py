"""The guard: a non-finite loss or weights, and SIGINT/SIGTERM, turned into a clean stop.

The loop calls :meth:`Guard.after_step` after every optimizer step. Host reads are rate-limited: by time on
one process (``Trainer.poll_interval_s``), every 32 optimizer steps on several, where all ranks must take the
same decision at the same step (one all-reduce of two flags). A signal finishes the step, saves ``last.pt``
and raises :class:`~trainval.errors.Interrupted`; a non-finite loss raises
:class:`~trainval.errors.NonFiniteLossError` before anything from the epoch is saved.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from trainval import distributed, notebook
from trainval.errors import Interrupted, NonFiniteLossError

if TYPE_CHECKING:
    from trainval.loop.trainer import Trainer

POLL_EVERY_STEPS = 32  # on several processes: a collective, at the same step on every rank


class Guard:
    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.stop_signal: int | None = None  # this process's, or another rank's once agreed on
        self._next_poll = 0.0

    # ------------------------------------------------------------------------------------------
    # Signals

    @contextlib.contextmanager
    def handlers(self) -> Iterator[None]:
        """First SIGINT/SIGTERM: finish the step, save last.pt, stop. A second SIGINT: exit at once (inside
        IPython, a Jupyter kernel or Colab: raise ``KeyboardInterrupt``, so that the kernel lives on).

        A repeated SIGTERM changes nothing: schedulers send it to every process of a job (SLURM's
        ``scancel`` reaches the workers besides torchrun's forwarded one), and the stop is under way.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        received: list[int] = []  # by this process (self.stop_signal may be another rank's, agreed on)

        def handler(signum: int, frame: Any) -> None:
            if received:
                if signum == signal.SIGINT:  # a user's second Ctrl-C
                    if notebook.in_ipython():  # the process is the user's kernel: leave fit, not the kernel
                        raise KeyboardInterrupt
                    distributed.exit_process(128 + signum)  # checkpoints are atomic: nothing is corrupted
                return
            received.append(signum)
            self.stop_signal = self.stop_signal or signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        self.stop_signal = None
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------------------------------
    # Polls

    def start_epoch(self) -> None:
        self._next_poll = time.monotonic() + self.trainer.poll_interval_s

    def after_step(self, epoch: int, last: bool) -> None:
        """After an optimizer step: the rate-limited non-finite check and a signal's stop (mid-epoch: last.pt of
        this step, then Interrupted; at the epoch's last step the stop waits for the epoch's row and last.pt)."""
        t = self.trainer
        if t.dist.enabled:
            if t.global_step % POLL_EVERY_STEPS == 0:
                self._poll_distributed(epoch, last)
            return
        if time.monotonic() >= self._next_poll:
            self.raise_if_nonfinite(epoch)  # a sync point, rate-limited by time
            self._next_poll = time.monotonic() + t.poll_interval_s
        if self.stop_signal is not None and not last:  # at the epoch's last step: its end saves, then stops
            self.interrupt(epoch, mid_epoch=True)

    def end_of_epoch(self, epoch: int) -> None:
        """After the row is saved: a signal any rank received stops every rank together."""
        stop = self.stop_signal
        if self.trainer.dist.enabled:  # a signal may reach one rank an instant before the others
            stop = distributed.all_reduce_max(stop or 0) or None
        if stop is not None:
            self.stop_signal = stop
            self.interrupt(epoch, mid_epoch=False)

    def raise_if_nonfinite(self, epoch: int) -> None:
        t = self.trainer
        bad = t.train_metrics.first_nonfinite()  # a sync point
        if bad is not None:
            value = t.train_metrics.losses[bad].item()
            total = t.train_loader.num_batches
            raise NonFiniteLossError(
                f"training loss became {value} at epoch {epoch}, step {bad + 1}{f' of {total}' if total else ''}; "
                f"training stopped and nothing from this epoch was saved (the last good checkpoint is "
                f"{t.last_path}). Lower the learning rate, clip gradients or check the data."
            )

    def raise_if_weights_nonfinite(self, epoch: int) -> None:
        """The weights after the epoch's (or a mid-epoch save's) last step: a loss is computed before its step,
        so the losses alone never see the last update. A sync point (under FSDP a collective): once per
        epoch and per mid-epoch save, before last.pt is written."""
        t = self.trainer
        if not t.strategy.all_finite(t.model):
            raise NonFiniteLossError(
                f"the model's weights became non-finite at epoch {epoch} (step {t.global_step}) although every "
                "training loss was finite: an optimizer step (or a callback) made them NaN or Inf after the last loss "
                "was computed (a non-finite learning rate from the scheduler, an overflow). Training stopped and "
                f"nothing from this epoch was saved (the last good checkpoint is {t.last_path}). Check the "
                "scheduler, lower the learning rate or clip gradients."
            )

    def _poll_distributed(self, epoch: int, last: bool) -> None:
        metrics = self.trainer.train_metrics
        k = len(metrics.sizes)
        flags = torch.stack(
            [
                (~torch.isfinite(metrics.losses[:k])).any().to(torch.int64),
                torch.tensor(self.stop_signal or 0, device=metrics.losses.device),
            ]
        )
        if dist.get_backend() != "nccl":
            flags = flags.cpu()
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        nonfinite, signum = flags.tolist()
        if nonfinite:
            self.raise_if_nonfinite(epoch)
            raise NonFiniteLossError(f"training loss became non-finite on another rank at epoch {epoch}.")
        if signum:
            self.stop_signal = int(signum)
            if (
                not last
            ):  # at the epoch's last step: its end writes the row and last.pt, then stops (end_of_epoch)
                self.interrupt(epoch, mid_epoch=True)

    def interrupt(self, epoch: int, mid_epoch: bool) -> None:
        t = self.trainer
        if mid_epoch:
            t.checkpoints.save_mid_epoch(epoch)
        t.checkpoints.wait()  # "last.pt is saved" below must be true
        distributed.barrier()
        assert self.stop_signal is not None  # set by the handler, or agreed on by the ranks
        name = signal.Signals(self.stop_signal).name
        where = f"epoch {epoch}, batch {t.batch_in_epoch}" if mid_epoch else f"the end of epoch {epoch}"
        raise Interrupted(
            f"stopped by {name} at {where}; {t.last_path} is saved. Resume with "
            "`trainval fit CONFIG --resume` or Trainer.fit(..., resume=True).",
            self.stop_signal,
        )
