"""A training script for the distributed tests; run directly (1 process) or under torchrun.

Usage: [torchrun --nproc_per_node=N] ddp_child.py OUT_DIR JSON_OPTIONS
Options: batch (per process), epochs, kill_rank + kill_step (SIGKILL that rank at that optimizer step
on the first attempt only), every (checkpoint_every_steps), metrics (names), binary (a one-logit BCE model
on "is the class id even"), dropout (p of a Dropout on the inputs; its first masks -> masks.<rank>.pt), strategy ("auto", "ddp", "fsdp"), batchnorm, sync_batchnorm, accumulate (accumulate_steps), resume, stop_after (epochs of this run: fit up to it,
then resume to ``epochs`` in a second Trainer of the same process), async (async_save), die_before_commit
resume_strategy (the
strategy of the resuming Trainer), die_before_commit (SIGKILL rank 0 on the first attempt when its N-th sharded last.pt has every shard written but is not yet
pointed to; the shard folder's name goes to OUT_DIR/stray.txt), block_shards (from the end of epoch 1 on,
DCP's shard file writes fail with ENOSPC), term_rank + term_epoch
(that rank alone sends itself SIGTERM at the end of that epoch), ema (an EMA decay: every rank writes
OUT_DIR/ema.<rank>.pt with its average, a hand AveragedModel's and, on rank 0, the last epoch's val_loss and the
hand average's), top_k (save_top_k), adam (Adam instead of SGD with momentum), onecycle (a OneCycleLR
stepped per optimizer step, planned for onecycle["epochs"] epochs on onecycle.get("world", this run's) processes).
Rank 0 writes OUT_DIR/predictions.pt; every rank writes OUT_DIR/done.<rank> when its work is done.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import torch
from torch import nn

from trainval import EMA, Callback, Trainer, distributed, seed_everything


def data(n, seed):
    centers = torch.randn(5, 12, generator=torch.Generator().manual_seed(0)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    return centers[y] + torch.randn(n, 12, generator=g), y


def make_model(binary=False, blocks=False, dropout=0.0, batchnorm=False):
    if blocks:
        return Blocks()
    if batchnorm:
        return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 1 if binary else 5))
    layers = [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 1 if binary else 5))


class Blocks(nn.Module):
    """Layers in an nn.ModuleList: FSDP's default makes each its own unit (gathered for its forward only)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 32), nn.Linear(32, 32)])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def record_dropout_masks(model, rank, out_dir, count=2):
    """Save the first ``count`` training dropout masks of this rank to OUT_DIR/masks.<rank>.pt."""
    masks = []

    def hook(module, inputs, output):
        if module.training and len(masks) < count:
            masks.append(output == 0)
            if len(masks) == count:
                torch.save(masks, os.path.join(out_dir, f"masks.{rank}.pt"))

    model[0].register_forward_hook(hook)


class KillOnce(Callback):
    def __init__(self, rank, step):
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, batch_index):
        if (trainer.dist.rank == self.rank and trainer.global_step == self.step
                and distributed.elastic_restart_count() == 0):
            os.kill(os.getpid(), signal.SIGKILL)


class HandEMA(Callback):
    """A hand ``AveragedModel`` with torch's EMA rule, updated from this rank's model after each optimizer step."""

    def __init__(self, model, decay):
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))

    def on_optimizer_step(self, trainer):
        self.swa.update_parameters(trainer.model)


class BlockShards(Callback):
    """From the end of epoch 1 on, every shard file write fails with ENOSPC (a full disk), inside DCP's
    own writer, which async_save runs in the background. (A file named last.shards no longer reaches the
    background write: it is refused before the save starts.)"""

    def on_epoch_end(self, trainer, row):
        if trainer.epoch == 1:
            import errno

            from torch.distributed.checkpoint import FileSystemWriter

            def full_disk(self, plan, planner):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            FileSystemWriter.write_data = full_disk


class TermOnce(Callback):
    """SIGTERM to this one rank at the end of an epoch: the others have not got it."""

    def __init__(self, rank, epoch):
        self.rank, self.epoch = rank, epoch

    def on_epoch_end(self, trainer, row):
        if trainer.dist.rank == self.rank and trainer.epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


def die_before_commit(out_dir, n):
    from trainval.checkpoint import sharded

    seen = []

    def hook(folder):
        seen.append(folder)
        if len(seen) == n and distributed.elastic_restart_count() == 0:
            with open(os.path.join(out_dir, "stray.txt"), "w") as f:
                f.write(os.path.basename(folder))
            os.kill(os.getpid(), signal.SIGKILL)

    sharded._before_commit_hook = hook


def main():
    out_dir, opts = sys.argv[1], json.loads(sys.argv[2])
    seed_everything(0)
    binary = opts.get("binary", False)
    model = make_model(binary, opts.get("blocks", False), opts.get("dropout", 0.0), opts.get("batchnorm", False))
    if opts.get("dropout") and distributed.elastic_restart_count() == 0:
        record_dropout_masks(model, int(os.environ.get("RANK", 0)), out_dir)
    loss_fn = nn.BCEWithLogitsLoss() if binary else None
    callbacks = [KillOnce(opts["kill_rank"], opts["kill_step"])] if "kill_rank" in opts else []
    if "term_rank" in opts:
        callbacks.append(TermOnce(opts["term_rank"], opts["term_epoch"]))
    if opts.get("block_shards"):
        callbacks.append(BlockShards())
    ema = hand = None
    if "ema" in opts:
        ema = EMA(opts["ema"])  # a hand AveragedModel cannot follow FSDP's sharded parameters
        hand = HandEMA(model, opts["ema"]) if opts.get("strategy") != "fsdp" else None
        callbacks += [hand, ema] if hand else [ema]
    if "die_before_commit" in opts:
        die_before_commit(out_dir, opts["die_before_commit"])

    def make_trainer(model, epochs, strategy=opts.get("strategy", "auto")):
        if opts.get("adam"):
            optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = None
        if "onecycle" in opts:  # its steps: the planned epochs' batches per process
            world = opts["onecycle"].get("world", int(os.environ.get("WORLD_SIZE", "1")))
            per_epoch = math.ceil(math.ceil(opts.get("n_train", 96) / world) / opts["batch"])
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=0.05, total_steps=per_epoch * opts["onecycle"]["epochs"])
        return Trainer(model, optimizer, loss_fn, scheduler=scheduler,
                       metrics=opts.get("metrics"), max_epochs=epochs, strategy=strategy,
                       sync_batchnorm=opts.get("sync_batchnorm", False),
                       accumulate_steps=opts.get("accumulate", 1), async_save=opts.get("async", False),
                       out_dir=out_dir, seed=1, batch_size=opts["batch"], eval_batch_size=opts.get("eval_batch", 8),
                       progress=False, plot=False, callbacks=callbacks, checkpoint_every_steps=opts.get("every"),
                       overwrite=distributed.elastic_restart_count() == 0, save_top_k=opts.get("top_k"))

    Xv, yv = data(opts.get("n_val", 45), 2)  # 45: divisible neither by 2 nor by the batch sizes
    Xt, yt = data(opts.get("n_train", 96), 1)
    if binary:
        yt, yv = yt % 2, yv % 2
    epochs = opts.get("epochs", 3)
    if "stop_after" in opts:  # a first fit stops early; a fresh model and Trainer resume it from last.pt
        make_trainer(model, opts["stop_after"]).fit((Xt, yt), (Xv, yv))
        seed_everything(123)  # the resumed run must not depend on the fresh model's initial weights
        model = make_model(binary, opts.get("blocks", False), opts.get("dropout", 0.0), opts.get("batchnorm", False))
        trainer = make_trainer(model, epochs, opts.get("resume_strategy", opts.get("strategy", "auto")))
        trainer.fit((Xt, yt), (Xv, yv), resume=True)
    else:
        trainer = make_trainer(model, epochs)
        trainer.fit((Xt, yt), (Xv, yv), resume=opts.get("resume", False))
    rank = trainer.dist.rank
    if ema is not None:
        hand_model, hand_val_loss = (hand.swa.module, None) if hand else (None, None)
        if hand_model is not None:
            hand_model.eval()
            with torch.no_grad():
                hand_val_loss = nn.functional.cross_entropy(hand_model(Xv), yv).item()
        torch.save({"averaged": ema.state_dict()["averaged"],  # full tensors (gathered under FSDP: a collective)
                    "hand": {n: p.detach().cpu() for n, p in hand_model.named_parameters()} if hand_model else {},
                    "updates": ema.updates, "val_loss": trainer.history[-1]["val_loss"], "hand_val_loss": hand_val_loss},
                   os.path.join(out_dir, f"ema.{rank}.pt"))
    metrics = trainer.test((Xv, yv))
    preds = trainer.predict(Xv)
    probs = trainer.predict_proba(Xv)
    if rank == 0:
        torch.save({"preds": preds, "probs": probs, "test": metrics, "history": trainer.history, "y": yv,
                    "strategy": trainer.strategy.name},
                   os.path.join(out_dir, "predictions.pt"))
    with open(os.path.join(out_dir, f"done.{rank}"), "w") as f:
        f.write(json.dumps({"world": trainer.dist.world_size, "n_preds": len(preds)}))


if __name__ == "__main__":
    distributed.run_and_exit(main)
