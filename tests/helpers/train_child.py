"""A training process for fault-injection tests; the test kills or signals it.

Usage: python train_child.py OUT_DIR JSON_OPTIONS, or forked by zygote.py (the same ``run``, without
the 2.5 s of imports).
Options: epochs, resume, every (checkpoint_every_steps), kill_epoch_end (SIGKILL itself at the end of
that epoch, before last.pt is written), kill_batch (SIGKILL itself after that global batch count),
kill_in_write (SIGKILL itself inside the N-th checkpoint write, 1-based), sleep (seconds per batch),
ready_after (print READY after that many batches, for signal tests), hold (then stay that many seconds
inside that batch's callback, where a signal finds the loop between two steps).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch
from torch import nn

from trainval import Callback, Trainer, seed_everything
from trainval import checkpoint as ckpt_mod
from trainval.errors import TrainvalError


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 10, generator=g) * 2
    y = torch.arange(n) % 4
    return centers[y] + torch.randn(n, 10, generator=g), y


class Faults(Callback):
    def __init__(self, opts):
        self.opts, self.batches = opts, 0

    def on_train_batch_end(self, trainer, batch_index):
        self.batches += 1
        if self.opts.get("sleep"):
            time.sleep(self.opts["sleep"])
        if self.opts.get("ready_after") == self.batches:
            print("READY", flush=True)
            if self.opts.get("hold"):
                time.sleep(self.opts["hold"])  # signal handlers run during the sleep, which then goes on
        if self.opts.get("kill_batch") == trainer.global_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_epoch_end(self, trainer, row):
        if self.opts.get("kill_epoch_end") == row["epoch"]:
            os.kill(os.getpid(), signal.SIGKILL)


def run(out_dir: str, opts: dict) -> None:
    if opts.get("kill_in_write"):
        count = {"n": 0}

        def hook(tmp_path):
            count["n"] += 1
            if count["n"] == opts["kill_in_write"]:
                os.kill(os.getpid(), signal.SIGKILL)

        ckpt_mod._write_hook = hook  # called once inside every checkpoint write
    seed_everything(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    # several metrics, so that the exact-resume tests cover their mid-epoch state (a confusion matrix...)
    trainer = Trainer(model, opt, metrics=["acc", "f1_macro", "top2_acc"], max_epochs=opts.get("epochs", 4),
                      out_dir=out_dir, seed=3, batch_size=16,
                      progress=False, plot=False, scheduler=sched, checkpoint_every_steps=opts.get("every"),
                      callbacks=[Faults(opts)], overwrite=True)
    try:
        trainer.fit(data(200, 1), data(50, 2), resume=opts.get("resume", False))
    except TrainvalError as e:
        print(f"ERROR: {e}", flush=True)
        sys.exit(getattr(e, "exit_code", 1))
    print("DONE", flush=True)


if __name__ == "__main__":
    run(sys.argv[1], json.loads(sys.argv[2]))
