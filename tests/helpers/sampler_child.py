"""A training script with a DataLoader's own sampler, for tests/test_loop_sampler.py; run under torchrun.

Usage: torchrun --nproc_per_node=N sampler_child.py OUT_DIR JSON_OPTIONS
Options: epochs, batch, n (samples), num_samples (the sampler's draws per epoch), batches ("sampler": a
WeightedRandomSampler; "batch_sampler": a custom batch_sampler of random batches), stop_after (epochs of a
first fit; a fresh model and Trainer resume it to ``epochs`` in the same process), every
(checkpoint_every_steps), kill_rank + kill_step (SIGKILL that rank at that optimizer step on the first attempt).
Each rank writes OUT_DIR/seen.<rank>.json (per epoch: the sample ids it trained on, in order, from the last
attempt), OUT_DIR/draws.<rank>.json (per epoch: the sampler's draw lists as the sampler yielded them), and
OUT_DIR/done.<rank>; rank 0 writes OUT_DIR/result.pt (weights and history).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from ddp_child import KillOnce  # (this script's folder is on sys.path)
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset, WeightedRandomSampler

from trainval import Callback, Trainer, distributed, seed_everything


class Recorder(WeightedRandomSampler):
    """A WeightedRandomSampler that remembers every draw list it yields (what the test compares with)."""

    draws: list[list[int]] = []

    def __iter__(self):
        drawn = list(super().__iter__())
        Recorder.draws.append(drawn)
        return iter(drawn)


class RandomBatches(Sampler):
    """A custom batch_sampler: ``count`` batches of 3 to 5 random sample ids (global RNG), recorded."""

    draws: list[list[list[int]]] = []

    def __init__(self, n, count):
        self.n, self.count = n, count

    def __iter__(self):
        sizes = torch.randint(3, 6, (self.count,)).tolist()
        batches = [torch.randint(0, self.n, (k,)).tolist() for k in sizes]
        RandomBatches.draws.append(batches)
        return iter(batches)

    def __len__(self):
        return self.count


class Probe(nn.Module):
    """Column 0 of the inputs is the sample's id; training forwards record the ids they see."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.seen: list[int] = []

    def forward(self, x):
        if self.training:
            self.seen.extend(x[:, 0].long().tolist())
        return self.net(x[:, 1:])


class Record(Callback):
    """Each epoch's trained ids (this rank's), written at every epoch's end."""

    def __init__(self, out_dir, rank):
        self.out_dir, self.rank, self.epochs = out_dir, rank, {}

    def on_epoch_start(self, trainer, epoch):
        if trainer.batch_in_epoch == 0:
            trainer.model.seen.clear()

    def on_epoch_end(self, trainer, row):
        self.epochs[trainer.epoch] = list(trainer.model.seen)
        with open(os.path.join(self.out_dir, f"seen.{self.rank}.json"), "w") as f:
            json.dump(self.epochs, f)


def main():
    out_dir, opts = sys.argv[1], json.loads(sys.argv[2])
    rank = int(os.environ.get("RANK", 0))
    n = opts.get("n", 40)
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 4, generator=g)], dim=1)
    y = (X[:, 1] > 0).long()
    weights = torch.ones(n)
    weights[:4] = 10.0
    if opts.get("batches", "sampler") == "batch_sampler":
        def loader():
            return DataLoader(TensorDataset(X, y), batch_sampler=RandomBatches(n, opts.get("num_batches", 7)))
        recorded = RandomBatches.draws
    else:
        def loader():
            return DataLoader(TensorDataset(X, y), batch_size=opts.get("batch", 4),
                              sampler=Recorder(weights, opts.get("num_samples", 21), replacement=True))
        recorded = Recorder.draws
    record = Record(out_dir, rank)
    callbacks = [record] + ([KillOnce(opts["kill_rank"], opts["kill_step"])] if "kill_rank" in opts else [])

    def make_trainer(epochs):
        seed_everything(123)  # a resumed run must not depend on the fresh model's initial weights
        model = Probe()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_epochs=epochs, out_dir=out_dir,
                       seed=7, progress=False, plot=False, callbacks=callbacks, monitor="train_loss",
                       checkpoint_every_steps=opts.get("every"), device="cpu",
                       overwrite=distributed.elastic_restart_count() == 0)

    epochs = opts.get("epochs", 2)
    if "stop_after" in opts:
        make_trainer(opts["stop_after"]).fit(loader())
        trainer = make_trainer(epochs)
        trainer.fit(loader(), resume=True)
    else:
        trainer = make_trainer(epochs)
        trainer.fit(loader(), resume=distributed.elastic_restart_count() > 0)
    with open(os.path.join(out_dir, f"draws.{rank}.json"), "w") as f:
        json.dump(recorded, f)
    if rank == 0:
        torch.save({"model": trainer.model.state_dict(), "history": trainer.history},
                   os.path.join(out_dir, "result.pt"))
    with open(os.path.join(out_dir, f"done.{rank}"), "w") as f:
        f.write("done")


if __name__ == "__main__":
    distributed.run_and_exit(main)
