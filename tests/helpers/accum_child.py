"""Exact accumulation across ranks: a float64 token tagger trained with ignore_index targets.

Usage: [torchrun --nproc_per_node=N] accum_child.py OUT_DIR JSON_OPTIONS
Options: batch (per process), accumulate (accumulate_steps), epochs, n (samples), strategy, user_loss (a loss trainval
cannot see the denominator of: cross-entropy wrapped in a plain module, so the mean of micro-batch means).
Rank 0 writes OUT_DIR/weights.pt (the final weights); every rank writes OUT_DIR/done.<rank>.
The test imports ``data``, ``Tagger`` and ``run`` to train the 1-process reference in its own process.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from trainval import Trainer, distributed

VOCAB, LENGTH, CLASSES = 11, 6, 4


def data(n: int = 16):
    """Token ids ``[n, 6]`` and tags ``[n, 6]``: sample i keeps its first ``1 + (i**3 + i) % 6`` tags, the rest are
    -100 (ignored), so batches (and ranks) hold very different numbers of counted targets."""
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    y = torch.randint(0, CLASSES, (n, LENGTH), generator=g)
    for i in range(n):
        y[i, 1 + (i**3 + i) % LENGTH :] = -100
    return X, y


class Tagger(nn.Module):
    """Embedding -> tanh -> per-token logits ``[B, C, T]``, in float64 (comparisons to 1e-6 stay tight)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 8, dtype=torch.float64)
        self.head = nn.Linear(8, CLASSES, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x))).transpose(1, 2).contiguous()  # (FSDP2 warns of a view)


class UserLoss(nn.Module):
    """Cross-entropy behind a plain module: trainval cannot know what its mean divides by."""

    def __init__(self):
        super().__init__()
        self.ce = nn.CrossEntropyLoss()

    def forward(self, output, target):
        return self.ce(output, target)


def run(out_dir: str, *, batch: int, accumulate: int = 1, epochs: int = 2, n: int = 16, user_loss: bool = False,
        strategy: str = "auto", device: str = "cpu") -> dict:
    """The final weights (a collective under FSDP: every rank calls it; rank 0 gets them whole)."""
    model = Tagger()
    X, y = data(n)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9),
                      UserLoss() if user_loss else None, task="multiclass" if user_loss else None,
                      max_epochs=epochs, batch_size=batch, accumulate_steps=accumulate, seed=7, out_dir=out_dir,
                      monitor="train_loss", metrics=["acc"], progress=False, plot=False, device=device,
                      strategy=strategy)
    trainer.fit((X, y))
    return trainer.strategy.model_state_dict(trainer.model)


def main():
    out_dir, opts = sys.argv[1], json.loads(sys.argv[2])
    weights = run(out_dir, **opts)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        torch.save({k: v.detach().cpu() for k, v in weights.items()}, os.path.join(out_dir, "weights.pt"))
    with open(os.path.join(out_dir, f"done.{rank}"), "w") as f:
        f.write("done")


if __name__ == "__main__":
    distributed.run_and_exit(main)
