"""Training on streams (IterableDatasets) for the distributed tests; run directly (1 process) or under torchrun.

Usage: [torchrun --nproc_per_node=N] stream_child.py OUT_DIR JSON_OPTIONS
Options: n_train, n_val, batch, eval_batch, epochs, strategy ("auto", "fsdp"), workers (DataLoader
num_workers), blocks (rank 0 gets the first ``blocks`` fraction of each stream through the dataset's own
``split_by_rank``: shares that differ by several batches; default: trainval's round-robin split),
accumulate (accumulate_steps).

Every sample is ``{"x": features, "id": its index in the stream, "labels": class}``; the model records the
ids it trains on (training mode, autograd on), so a test can check that each is trained on once per epoch.
Rank r writes OUT_DIR/ids.<r>.json ({"epochs": [[ids of epoch 1], ...], "set_epoch": [calls]}); rank 0
writes OUT_DIR/result.pt (history, test metrics, predictions, labels); every rank writes OUT_DIR/done.<r>.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from trainval import Callback, Trainer, distributed, seed_everything


def data(n, seed):
    centers = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    return centers[y] + 1.5 * torch.randn(n, 12, generator=g), y


class Stream(IterableDataset):
    """Samples in a fixed order; ``set_epoch`` calls are recorded (they must reach this object)."""

    def __init__(self, X, y):
        self.X, self.y, self.set_epoch_calls = X, y, []

    def __iter__(self):
        for i in range(len(self.y)):
            yield {"x": self.X[i], "id": torch.tensor(i), "labels": self.y[i]}

    def set_epoch(self, epoch):
        self.set_epoch_calls.append(epoch)


class BlockStream(Stream):
    """A stream that splits itself: rank 0 reads the first ``fraction`` of it, the others share the rest."""

    def __init__(self, X, y, fraction, ids=None):
        super().__init__(X, y)
        self.fraction, self.ids = fraction, ids if ids is not None else list(range(len(y)))

    def split_by_rank(self, rank, world_size):
        cut = round(len(self.ids) * self.fraction) if world_size > 1 else len(self.ids)
        mine = self.ids[:cut] if rank == 0 else self.ids[cut:][rank - 1 :: world_size - 1]
        share = BlockStream(self.X, self.y, self.fraction, mine)
        share.set_epoch_calls = self.set_epoch_calls  # one record for the test
        return share

    def __iter__(self):
        info = get_worker_info()
        ids = self.ids if info is None else self.ids[info.id :: info.num_workers]
        for i in ids:
            yield {"x": self.X[i], "id": torch.tensor(i), "labels": self.y[i]}


class Net(nn.Module):
    """Layers in an nn.ModuleList (FSDP units); records the stream ids it trains on."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 32), nn.Linear(32, 32)])
        self.head = nn.Linear(32, 5)
        self.seen: list[int] = []

    def forward(self, x, id=None):
        if self.training and torch.is_grad_enabled() and id is not None:
            self.seen += id.tolist()
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class RecordIds(Callback):
    def __init__(self, model):
        self.model, self.epochs = model, []

    def on_epoch_start(self, trainer, epoch):
        self.model.seen = []

    def on_epoch_end(self, trainer, row):
        self.epochs.append(list(self.model.seen))


def main():
    out_dir, opts = sys.argv[1], json.loads(sys.argv[2])
    seed_everything(0)
    model = Net()
    Xt, yt = data(opts.get("n_train", 101), 1)
    Xv, yv = data(opts.get("n_val", 45), 2)
    if "blocks" in opts:
        train, val = BlockStream(Xt, yt, opts["blocks"]), BlockStream(Xv, yv, opts["blocks"])
    else:
        train, val = Stream(Xt, yt), Stream(Xv, yv)
    workers = opts.get("workers", 0)
    train_data = DataLoader(train, batch_size=opts.get("batch", 8), num_workers=workers) if workers else train
    record = RecordIds(model)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=opts.get("epochs", 2),
                      strategy=opts.get("strategy", "auto"), accumulate_steps=opts.get("accumulate", 1),
                      metrics=["acc", "f1_macro"], out_dir=out_dir, seed=1, batch_size=opts.get("batch", 8),
                      eval_batch_size=opts.get("eval_batch", 4), num_workers=workers, progress=False, plot=False,
                      callbacks=[record], overwrite=True)
    trainer.fit(train_data, val)
    test = trainer.test(val)
    preds = trainer.predict(val)
    rank = trainer.dist.rank
    with open(os.path.join(out_dir, f"ids.{rank}.json"), "w") as f:
        json.dump({"epochs": record.epochs, "set_epoch": train.set_epoch_calls}, f)
    if rank == 0:
        torch.save({"history": trainer.history, "test": test, "preds": preds, "y": yv, "strategy": trainer.strategy.name},
                   os.path.join(out_dir, "result.pt"))
    with open(os.path.join(out_dir, f"done.{rank}"), "w") as f:
        f.write(json.dumps({"world": trainer.dist.world_size, "n_preds": len(preds)}))


if __name__ == "__main__":
    distributed.run_and_exit(main)
