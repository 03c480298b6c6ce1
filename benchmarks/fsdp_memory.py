"""Peak GPU memory per rank: DDP vs FSDP (vs FSDP with CPU offload), on a model sized to show it.

    python benchmarks/fsdp_memory.py --strategy fsdp [--offload]                 # one GPU
    torchrun --standalone --nproc_per_node=N benchmarks/fsdp_memory.py --strategy ddp   # N GPUs

Blocks of ``Linear(width, width)`` in an ``nn.ModuleList`` (FSDP's default units), trained with AdamW
for one short epoch. Each rank prints one line: ``memory strategy=... rank=... params_m=... peak_gib=...``
(``torch.cuda.max_memory_allocated``: weights, gradients, optimizer state and activations).
With DDP every rank holds 4 copies of the weights' size (weights, gradients, Adam's two moments);
with FSDP over N ranks about 4/N of it, plus one gathered unit at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch import nn

from trainval import Trainer, distributed
from trainval.loop.strategies import FSDPStrategy


class Blocks(nn.Module):
    def __init__(self, width: int, depth: int, classes: int = 10):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", choices=("ddp", "fsdp"), default="fsdp")
    p.add_argument("--offload", action="store_true", help="FSDP with CPU offload")
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=8)  # 8 x 4096^2: 134M parameters, 0.54 GB in fp32
    p.add_argument("--samples", type=int, default=512)
    args = p.parse_args()
    torch.manual_seed(0)
    model = Blocks(args.width, args.depth)
    strategy = FSDPStrategy(cpu_offload=args.offload) if args.strategy == "fsdp" else "ddp"
    X = torch.randn(args.samples, args.width)
    y = torch.randint(0, 10, (args.samples,))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-4), strategy=strategy, max_epochs=1,
                          batch_size=32, out_dir=os.path.join(out, "run"), monitor="train_loss", progress=False,
                          plot=False, check_inputs=False)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.fit((X, y))
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")  # nan: a CPU dry run
    name = args.strategy + ("+offload" if args.offload else "")
    params = sum(p.numel() for p in Blocks(args.width, args.depth).parameters()) / 1e6
    print(f"memory strategy={name} rank={trainer.dist.rank} world={trainer.dist.world_size} "
          f"params_m={params:.0f} peak_gib={peak:.2f} " + json.dumps({"loss": trainer.history[-1]["train_loss"]}),
          flush=True)


if __name__ == "__main__":
    distributed.run_and_exit(main)
