"""Checkpoints of a fit: the run folder's claim, best.pt, last.pt (whole or sharded, in the background), resume.

:class:`Checkpoints` is the loop's one owner of what is saved and restored:

- :meth:`Checkpoints.app_state` is the one list of what ``last.pt`` holds (model, optimizer, scheduler, scaler,
  random generators per rank, the loop state, the training metrics' running sums mid-epoch, callbacks' states);
  :meth:`Checkpoints.restore` is its inverse, with the checks that make a resume exact or refuse it clearly;
- :meth:`Checkpoints.save_best_and_top_k` writes ``best.pt`` and the ``save_top_k`` best files (weights only,
  synchronously), :meth:`Checkpoints.save_last`
  writes ``last.pt`` and ``metrics.csv`` after it (at most one write in flight with ``async_save``);
- :meth:`Checkpoints.load_weights` reloads ``best``/``last``/a path for test and predict.

The file formats and their safe reading live in :mod:`trainval.checkpoint` and :mod:`trainval.checkpoint.sharded`.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import TYPE_CHECKING, Any

import yaml

from trainval import distributed
from trainval.checkpoint import (
    BackgroundWriter,
    load_checkpoint,
    remove_top_k_files,
    save_checkpoint,
    sharded,
    snapshot,
    stray_top_k_files,
    versions,
)
from trainval.data.tabular import TableEncoding
from trainval.errors import CheckpointError, ConfigError, RunFolderError
from trainval.fsio import atomic_write
from trainval.loop.callbacks import write_metrics_csv
from trainval.run import runfolder
from trainval.state import check_last, rng_state, seed_everything, set_rng_state
from trainval.untrusted import shown

if TYPE_CHECKING:
    from trainval.loop.trainer import Trainer


class Checkpoints:
    def __init__(self, trainer: Trainer):
        self.t = trainer
        self.writes = BackgroundWriter()  # last.pt writes: at most one in flight (async_save)
        self.save_group: Any = None  # the process group of background sharded saves, made on first use
        self.fallen: list[str] = []  # top-k files pushed out: removed once last.pt records the new set

    def save_best_and_top_k(self, value: float | None, epoch: int) -> None:
        """best.pt when ``value`` improved; a top-k file when it is among the ``save_top_k`` best.

        The weights are finite (checked at the end of the training epoch). Under FSDP the state dict is a
        collective: every rank takes the same decisions (``value`` is all-reduced) and takes part; rank 0 writes.
        """
        t = self.t
        k = t.options.save_top_k
        improved = t.state.improved(value)
        keep = k is not None and t.state.enters_top_k(value, k)
        if not (improved or keep):
            return
        if improved:
            t.state.best_value, t.state.best_epoch, t.state.best_step = value, epoch, t.global_step
        state = {**self.best_state(epoch), "value": value}
        if improved:
            if t.dist.is_main:
                save_checkpoint(state, t.best_path, "best checkpoint")
            t.log(f"saving best model ({t.monitor} {value:.4f}) -> {t.best_path}")
        if keep and k is not None and value is not None:
            name, fallen = t.state.add_top_k(epoch, t.global_step, value, k)
            if t.dist.is_main:
                save_checkpoint(
                    {**state, "step": t.global_step}, os.path.join(t.out_dir, name), "top-k checkpoint"
                )
            self.fallen += fallen  # removed after last.pt lists the new set (save_last)

    def tidy_top_k(self) -> None:
        """Top-k files that this run's set does not list are removed (rank 0): after a resume, files written
        after last.pt (their evaluation runs again) or pushed out just before a crash; in a new fit, a replaced
        run's. Every rank then holds rank 0's set of the files that exist (they decide the same saves)."""
        t = self.t
        if t.dist.is_main and os.path.isdir(t.out_dir):
            kept = {e["file"] for e in t.state.top_k}
            remove_top_k_files(t.out_dir, stray_top_k_files(t.out_dir, kept))
            gone = [
                e["file"] for e in t.state.top_k if not os.path.isfile(os.path.join(t.out_dir, e["file"]))
            ]
            if gone:
                t.log(f"top-k checkpoints missing from {t.out_dir} (no longer kept): {', '.join(gone)}")
                t.state.top_k = [e for e in t.state.top_k if e["file"] not in gone]
        if t.dist.enabled:
            t.state.top_k = distributed.broadcast_object(t.state.top_k)

    def prepare_run_folder(self, resume: bool) -> dict | None:
        """Claim the run folder and check it; with ``resume``, the last.pt every rank agreed on."""
        t = self.t
        if t.dist.is_main:  # under the run folder's lock (see fit)
            runfolder.claim(t.out_dir, resume)
            runfolder.remove_own_temp_files(t.out_dir)  # temp files of writes cut short by a kill
            sharded.remove_stale(t.out_dir)  # shard folders no last.pt points to (a save cut short)
        distributed.barrier()
        last = self.agree_on_last() if resume else None  # first: a stale copy on one node is named as such
        if t.dist.enabled:
            runfolder.check_shared(t.out_dir, t.dist.rank)
        # A run exists once its first last.pt does. best.pt is written just before last.pt, so a
        # best.pt alone is a fit stopped inside its first epoch's saves: nothing to resume, and
        # starting over loses nothing.
        if resume:
            pass  # last.pt was read and agreed on above
        elif not t.options.overwrite and os.path.exists(t.last_path):
            raise RunFolderError(
                f"{t.out_dir} already holds a run (last.pt); resume it, "
                "choose another folder, or allow overwriting it (run.overwrite=true, "
                "Trainer(overwrite=True))."
            )
        elif os.path.exists(t.best_path) and not os.path.exists(t.last_path):
            t.log(
                f"{t.best_path} has no last.pt beside it (a fit stopped before its first epoch was "
                "saved): starting over."
            )
        if t.config is not None and t.dist.is_main:
            text = yaml.safe_dump({**t.config, "versions": versions()}, sort_keys=False).encode()
            atomic_write(os.path.join(t.out_dir, "config.yaml"), lambda f: f.write(text), "config")
        return last

    def agree_on_last(self) -> dict:
        """last.pt, read by every rank, after all of them agree it is the same file (a collective).

        Epoch, step and a content hash per rank are compared on every rank, so that a disagreement (a
        missing or stale copy on one node) is one clear error everywhere instead of ranks training from
        different states.
        """
        t = self.t
        state, seen, refused = None, "no last.pt", None
        if os.path.exists(t.last_path):
            try:
                state = load_checkpoint(
                    t.last_path, map_location="cpu"
                )  # not N full copies on the GPUs (FSDP)
                try:
                    check_last(state, t.last_path)  # its fields are data from a file, checked before any use
                except CheckpointError as e:
                    state, refused = None, e
                    raise
                loop = state.get("loop") or {}
                seen = f"epoch {state.get('epoch')}, step {loop.get('global_step')}, sha256 {sharded.sha256_file(t.last_path)[:12]}"
                if "shards" in state:  # every rank must see the complete folder last.pt points to
                    sharded.verify(state["shards"], t.last_path)
                    seen += f", shards {sharded.pointed_folder(state)}"
            except CheckpointError as e:
                seen = f"unreadable ({e})"
        views = distributed.all_gather_objects(seen)
        if len(set(views)) > 1:
            each = "; ".join(f"rank {r}: {v}" for r, v in enumerate(views))
            raise CheckpointError(
                f"cannot resume: the processes see different last.pt files in {t.out_dir} ({each}). "
                "Every process must resume from the same checkpoint: put the run folder on a file "
                "system every node mounts."
            )
        if refused is not None:
            raise refused
        if state is None:
            if seen != "no last.pt":
                raise CheckpointError(f"cannot resume from {t.last_path}: {seen}.")
            raise CheckpointError(
                f"cannot resume: no last.pt in {t.out_dir} (no epoch was saved there); "
                "start without resume to train from the beginning."
            )
        return state

    def best_state(self, epoch: int) -> dict:
        """best.pt (and a top-k file): the weights, and the row they were chosen at (under FSDP a collective)."""
        t = self.t
        return {
            "model": t.strategy.model_state_dict(t.model),
            "epoch": epoch,
            "step": t.global_step,
            "task": t.task.name,
            "monitor": t.monitor,
            "value": t.best_value,
            "config": t.config,
            "table": None if t.table is None else t.table.state_dict(),  # a DataFrame's columns
            "versions": versions(),
        }

    def app_state(self) -> dict:
        """Everything a resumed run needs to continue bit for bit."""
        t = self.t
        pending = bool(t.train_metrics.sizes)  # batches since the last row (mid-epoch, or val_every_steps)
        t.state.row_seconds = (
            max(0.0, time.perf_counter() - t.row_started) if t.options.val_every_steps else 0.0
        )
        # Each rank's own random streams and running sums; rank 0 gets every rank's (a collective).
        own = {
            "rng": rng_state(),
            "epoch_start_rng": (t.state.epoch_start or {}).get("rng"),
            "train_metrics": t.train_metrics.state_dict() if pending else None,
        }
        whole = not t.strategy.sharded_checkpoint  # sharded: model and optimizer go to the shards
        return {
            **({"model": t.strategy.model_state_dict(t.model)} if whole else {}),
            "epoch": t.epoch,
            "task": t.task.name,
            "loop": t.state.state_dict(),
            **({"optimizer": t.strategy.optimizer_state_dict(t.model, t.optimizer)} if whole else {}),
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "scaler": t.amp.state_dict(),
            "rng": own["rng"],
            "generator": t.generator.get_state(),
            "loader": t.train_loader.state_dict(),  # a user sampler's own generators
            "global_batch": self.global_batch(t.dist.world_size),  # told at a resume on another count
            "train_metrics": own["train_metrics"],
            "ranks": distributed.gather_objects(own),
            "callbacks": [cb.state_dict() for cb in t.callbacks],
            "config": t.config,
            "table": None if t.table is None else t.table.state_dict(),  # a DataFrame's columns
            "versions": versions(),
        }

    def restore(self, state: dict) -> None:
        t = self.t
        needed = ("optimizer" if "shards" not in state else "shards", "rng", "generator", "loop")
        missing = [k for k in needed if k not in state]
        if missing:
            raise CheckpointError(
                f"{t.last_path} cannot be resumed from: it lacks {', '.join(missing)} "
                "(a weights-only checkpoint, or one written by an older trainval)."
            )
        saved = state["loop"]
        if (saved["monitor"], saved["mode"]) != (t.monitor, t.mode):
            raise ConfigError(
                f"{t.last_path} was monitoring {shown(saved['monitor'])} ({saved['mode']}); this run monitors "
                f"{t.monitor} ({t.mode}). Its best value cannot be compared: resume with the same "
                "monitor, or start a new run."
            )
        if state.get("task", t.task.name) != t.task.name:
            raise ConfigError(f"{t.last_path} was a {shown(state['task'])} run; this one is {t.task.name}.")
        written_by = len(state.get("ranks") or []) or None
        pending = any(
            r.get("train_metrics") is not None for r in state.get("ranks") or []
        )  # since the last row
        if (saved.get("batch_in_epoch", 0) > 0 or pending) and written_by and written_by != t.dist.world_size:
            # each rank's shard of the epoch, and so what was done, depends on the number of processes
            where = (
                f"in the middle of epoch {state.get('epoch', 0) + 1}"
                if saved.get("batch_in_epoch", 0) > 0
                else "between two validations (val_every_steps)"
            )
            raise CheckpointError(
                f"{t.last_path} was saved {where} by {written_by} "
                f"process{'es' if written_by > 1 else ''}; this run has {t.dist.world_size}. The samples already "
                f"trained since are known only for {written_by}: resume with {written_by} "
                f"(--nproc {written_by}), then change the number of processes at an epoch's end."
            )
        # At an epoch's end any number of processes may resume; the optimizer state is converted (see
        # strategies.optimizer_state_by_name), and a scheduler that plans optimizer steps is re-planned.
        resized = written_by is not None and written_by != t.dist.world_size
        replan = (
            resized
            and t.scheduler is not None
            and t.scheduler_interval == "step"
            and state.get("scheduler") is not None
        )
        if "shards" in state:  # each rank reads the pieces of its own shards (a collective)
            shards = t.strategy.sharded_state_dict(t.model, t.optimizer)
            sharded.load(shards, state["shards"], t.last_path)
            t.strategy.load_sharded_state_dict(t.model, t.optimizer, shards)
        else:
            t.strategy.load_model_state_dict(t.model, state["model"], t.last_path)
        saved_keys = {k for g in state.get("optimizer", {}).get("param_groups", []) for k in g}
        foreign = sorted(saved_keys - {k for g in t.optimizer.param_groups for k in g})
        try:
            if foreign:  # loading would succeed, then the first step fail (e.g. Adam's state into SGD)
                raise ValueError(f"it has settings this optimizer lacks: {', '.join(foreign)}")
            if "shards" not in state:
                t.strategy.load_optimizer_state_dict(t.model, t.optimizer, state["optimizer"])
            if t.scheduler is not None and state.get("scheduler") is not None and not replan:
                t.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, TypeError) as e:  # another optimizer or scheduler than last.pt's
            raise CheckpointError(
                f"{t.last_path} cannot be resumed with this optimizer/scheduler: its saved "
                f"state does not fit ({type(e).__name__}: {e}). Resume with the ones it was "
                "trained with."
            ) from None
        t.amp.load_state_dict(state.get("scaler"))
        t.state.load_state_dict(saved, t.last_path)
        if resized:
            assert written_by is not None
            notice = self.process_count_notice(state, written_by)
            if replan:
                notice += self.replan_scheduler(state.get("scheduler"), written_by)
            t.log(notice + ".")
        for cb, cb_state in zip(t.callbacks, state.get("callbacks", [])):
            cb.load_state_dict(cb_state)
        try:
            t.generator.set_state(state["generator"])
            if state.get("loader") is not None:  # (absent: a last.pt from before samplers were honoured)
                t.train_loader.load_state_dict(state["loader"])
            own = self.own_state(state)
            set_rng_state(own["rng"])
        except (
            KeyError,
            IndexError,
            TypeError,
            ValueError,
            RuntimeError,
        ) as e:  # check_last saw their types only
            raise CheckpointError(
                f"{t.last_path} cannot be resumed from: its random generators' states are not "
                f"ones trainval saved ({type(e).__name__}: {shown(str(e))}); start a new run, or "
                "resume from a last.pt that trainval wrote."
            ) from None
        if t.batch_in_epoch > 0:
            t.epoch_record()["rng"] = own["epoch_start_rng"]
            t.pending_rng = own["rng"]
        if (
            own.get("train_metrics") is not None
        ):  # the batches since the last row (mid-epoch, val_every_steps)
            t.train_metrics.load_state_dict(own["train_metrics"], t.train_loader.num_batches)

    def global_batch(self, world: int) -> int | None:
        """Samples per optimizer step over every process: the per-process batch x ``world`` x accumulate_steps
        (``None``: a loader whose batches are not of one size, e.g. a user's batch sampler)."""
        t = self.t
        batch = getattr(t.train_loader, "batch_size", None)
        return batch * world * t.options.accumulate_steps if isinstance(batch, int) else None

    def process_count_notice(self, state: dict, written_by: int) -> str:
        """The line that says a resume runs on another number of processes than last.pt's, and what changed."""
        t = self.t
        world = t.dist.world_size
        saved = state.get("global_batch")  # (absent from a last.pt of an older trainval)
        was = saved if isinstance(saved, int) and not isinstance(saved, bool) else None
        now = self.global_batch(world)
        if was is None and now is not None:  # the same per-process batch, on written_by processes
            was = now // world * written_by
        head = (
            f"resuming on {world} process{'es' if world > 1 else ''} where {t.last_path} was written by "
            f"{written_by}"
        )
        if now is None or was is None:
            return f"{head}: the global batch (samples per optimizer step) is now {world}/{written_by} of what it was"
        if now == was:
            return f"{head}: the global batch stays {now}"
        return f"{head}: the global batch is now {now}, was {was}"

    def replan_scheduler(self, saved: Any, written_by: int) -> str:
        """A scheduler stepped per optimizer step, at a resume on another number of processes (at an epoch's
        end): its plan in steps was laid out for the old number of steps per epoch, so the one this run built
        is kept (its steps laid out for this run's loader) and moved to where a run of this size stands after
        the epochs done. Refused where that cannot be known (a stream) or the plan is too short. Returns the
        notice's clause."""
        t = self.t
        name = type(t.scheduler).__name__
        batches = t.train_loader.num_batches
        if t.train_loader.is_stream or not batches:
            raise ConfigError(
                f"{t.last_path} was written by {written_by} processes, this run has {t.dist.world_size}: the "
                f"{name} scheduler plans optimizer steps, and a stream's steps per epoch on "
                f"{t.dist.world_size} are not known to re-plan it; resume with {written_by} (--nproc "
                f"{written_by}), or use a scheduler stepped per epoch."
            )
        per_epoch = math.ceil(batches / t.options.accumulate_steps)
        position = t.epoch * per_epoch  # an uninterrupted run of this size, after the epochs done
        remaining = per_epoch * max(0, t.max_epochs - t.epoch)
        if t.options.max_steps is not None:
            remaining = min(remaining, max(0, t.options.max_steps - t.global_step))
        total = getattr(t.scheduler, "total_steps", None)  # OneCycleLR's plan (others do not say theirs)
        if isinstance(total, int) and position + remaining > total:
            raise ConfigError(
                f"{t.last_path} was written by {written_by} processes, this run has {t.dist.world_size} "
                f"({per_epoch} optimizer steps per epoch): the {name} scheduler plans {total} steps, but the "
                f"{t.epoch} epoch{'s' if t.epoch != 1 else ''} done and the {remaining} steps left take "
                f"{position + remaining} at this size. Build it for this run's steps (total_steps = steps per epoch on {t.dist.world_size} "
                f"processes x epochs; the CLI does), or resume with {written_by} (--nproc {written_by})."
            )
        with (
            warnings.catch_warnings()
        ):  # no optimizer step is taken here: torch's order warning does not apply
            warnings.simplefilter("ignore")
            for _ in range(position):
                t.scheduler.step()
        old = saved.get("last_epoch") if isinstance(saved, dict) else None
        was = f", was step {old}" if isinstance(old, int) and not isinstance(old, bool) else ""
        of = f" of {total}" if isinstance(total, int) else ""
        return (
            f"; the {name} schedule is re-planned for {per_epoch} steps per epoch and continues "
            f"at step {position}{of}{was}"
        )

    def own_state(self, state: dict) -> dict:
        """This rank's random streams and running sums from last.pt (``ranks``, one entry per rank)."""
        t = self.t
        ranks = state.get("ranks")
        if ranks and len(ranks) == t.dist.world_size:
            return ranks[t.dist.rank]
        # Written by another number of processes (or a trainval before per-rank state): rank 0's, and on
        # the other ranks fresh streams of their own.
        if t.dist.rank > 0:
            seed_everything(hash((t.options.seed, t.dist.rank, t.global_step)) % 2**31)
            return {
                "rng": rng_state(),
                "epoch_start_rng": rng_state(),
                "train_metrics": state.get("train_metrics"),
            }
        start = (state["loop"].get("epoch_start") or {}).get("rng")
        return {"rng": state["rng"], "epoch_start_rng": start, "train_metrics": state.get("train_metrics")}

    def table(self, ckpt: str) -> TableEncoding | None:
        """The DataFrame columns, categories and classes recorded in ``ckpt`` (None: it records none)."""
        path = {"best": self.t.best_path, "last": self.t.last_path}.get(ckpt, ckpt)
        if not os.path.exists(path):
            return None  # load_weights says what is missing
        state = load_checkpoint(path, map_location="cpu").get("table")
        return None if state is None else TableEncoding.from_state(state, path)

    def load_weights(self, ckpt: str | None) -> None:
        t = self.t
        if ckpt is None:
            return
        path = {"best": t.best_path, "last": t.last_path}.get(ckpt, ckpt)
        self.writes.wait()  # a background write of last.pt ends first
        distributed.barrier()  # rank 0 may still be writing it
        if ckpt == "best" and not os.path.exists(path):
            raise CheckpointError(
                f"no best.pt in {t.out_dir}: run fit first, or pass ckpt=None to use the current weights."
            )
        state = load_checkpoint(path, map_location="cpu")
        t.strategy.load_model_state_dict(
            t.model, sharded.model_weights(state, path), path
        )  # shards: put together

    def save_mid_epoch(self, epoch: int) -> None:
        """last.pt inside an epoch: never from non-finite weights; with the seconds run so far."""
        t = self.t
        t.guard.raise_if_nonfinite(epoch)
        t.guard.raise_if_weights_nonfinite(epoch)
        t.epoch_record()["seconds"] = time.perf_counter() - t.epoch_started
        self.save_last()

    def save_last(self, with_metrics: bool = False) -> None:
        """Write last.pt (and metrics.csv after it): whole from rank 0, or sharded by every rank.

        A sharded save (FSDP) writes each rank's shards into a fresh folder, then rank 0 points last.pt at
        it (see :mod:`trainval.checkpoint.sharded`). With ``async_save`` the state is copied now and written by a
        background thread; the previous write is waited for first (at most one in flight).
        """
        t = self.t
        self.writes.wait()  # a failed background write raises here, before anything new is written
        fallen, self.fallen = self.fallen, []
        state = self.app_state()  # a collective under FSDP and on several processes
        if t.strategy.sharded_checkpoint:
            if t.options.async_save and self.save_group is None:
                self.save_group = (
                    sharded.async_group()
                )  # a collective, once: saves leave training's group alone
            shards = t.strategy.sharded_state_dict(t.model, t.optimizer)
            write = sharded.write(
                shards,
                state if t.dist.is_main else None,
                t.out_dir,
                background=t.options.async_save,
                group=self.save_group,
            )
        elif t.dist.is_main:
            if t.options.async_save:
                state = snapshot(state)  # copies: the next optimizer steps must not change what is written

            def write() -> None:
                save_checkpoint(state, t.last_path, "last checkpoint")
                sharded.remove_stale(t.out_dir, keep="")  # a sharded last.pt's folders, once it is replaced
        else:
            return
        if fallen and t.dist.is_main:
            saved = write

            def write() -> None:
                saved()
                remove_top_k_files(t.out_dir, fallen)  # only now: last.pt lists the new set

        if with_metrics and t.dist.is_main:
            rows, whole = [dict(row) for row in t.history], write

            def write() -> None:
                whole()
                write_metrics_csv(os.path.join(t.out_dir, "metrics.csv"), rows)  # never ahead of last.pt

        self.writes.run(write, t.last_path, background=t.options.async_save)

    def wait(self) -> None:
        """The write in flight, if any, is on disk (its error raises here)."""
        self.writes.wait()

    def wait_quietly(self) -> None:
        t = self.t
        try:
            self.writes.wait()
        except CheckpointError as e:
            t.log(f"error: {e}")  # another error is on its way out; this one is reported, not lost
