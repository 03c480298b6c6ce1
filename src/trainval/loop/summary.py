"""The run summary as a callback: ``summary.json`` kept current during ``fit`` (see :mod:`trainval.run.summary`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainval.checkpoint import unwrap_model, versions
from trainval.loop.callbacks import Callback
from trainval.run.summary import now, plain, read_summary, write_summary

if TYPE_CHECKING:
    from trainval.loop.trainer import Trainer


def trainer_arguments(trainer: Trainer) -> dict:
    """The Trainer's arguments that can be written as plain values; objects by their class name."""
    model = unwrap_model(trainer.model)
    opt = trainer.optimizer
    args = {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "optimizer": type(opt).__name__,
        "optimizer_args": {
            k: v for k, v in ((k, plain(v)) for k, v in opt.defaults.items()) if v is not None
        },
        "param_groups": len(opt.param_groups),
        "loss_fn": type(trainer.loss_fn).__name__ if trainer.loss_fn is not None else None,
        "scheduler": type(trainer.scheduler).__name__ if trainer.scheduler is not None else None,
        "scheduler_interval": trainer.scheduler_interval,
        "task": trainer.task.name if trainer.task is not None else None,
        "metrics": list(trainer.metrics),
        "callbacks": [type(cb).__name__ for cb in trainer.callbacks],
        "device": str(trainer.device),
    }
    for name in (
        "max_epochs",
        "max_steps",
        "val_every_steps",
        "seed",
        "batch_size",
        "eval_batch_size",
        "grad_clip",
        "accumulate_steps",
        "precision",
        "compile",
        "checkpoint_every_steps",
        "async_save",
        "save_top_k",
        "on_device",
        "num_workers",
        "overwrite",
        "plot",
    ):
        args[name] = plain(getattr(trainer.options, name, None))
    args["eval_batch_size"] = args["eval_batch_size"] or args["batch_size"]
    return args


class RunSummary(Callback):
    """Keeps ``summary.json`` current: written at the start of ``fit``, after each epoch and at the end.

    The Trainer adds it on rank 0 after the user's callbacks, so that the columns they add to a row
    are in ``final`` too.
    """

    def __init__(self) -> None:
        self.started: str | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        previous = (
            read_summary(trainer.out_dir) if trainer.epoch > 0 else None
        )  # a resumed run keeps its start
        self.started = (previous or {}).get("started") or now()
        self._write(trainer, "running")

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        self._write(trainer, "running")

    def on_fit_end(self, trainer: Trainer) -> None:
        self._write(trainer, "finished")

    def _write(self, trainer: Trainer, status: str) -> None:
        history = trainer.history
        train_loader, val_loader = trainer.train_loader, trainer.val_loader
        summary = {
            "made_by": "trainval",
            "status": status,
            "started": self.started,
            "updated": now(),
            "epochs": trainer.epoch,  # epochs done (with val_every_steps, rows are not epochs)
            "max_epochs": trainer.max_epochs,
            "monitor": trainer.monitor,
            "mode": trainer.mode,
            "best_epoch": trainer.best_epoch,
            "steps": trainer.global_step,
            "max_steps": trainer.options.max_steps,
            "val_every_steps": trainer.options.val_every_steps,
            "best_step": trainer.best_step,
            "best_value": plain(trainer.best_value),
            "final": {k: plain(v) for k, v in history[-1].items()} if history else {},
            "train_samples": getattr(train_loader, "dataset_size", None),
            "val_samples": getattr(val_loader, "dataset_size", None) if val_loader is not None else None,
            "seconds": round(sum(r.get("seconds", 0.0) for r in history), 3),
            "versions": versions(),
            "trainer": trainer_arguments(trainer),
        }
        write_summary(trainer.out_dir, summary)
