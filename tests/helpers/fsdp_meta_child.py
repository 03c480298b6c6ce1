"""A torchrun child for tests/test_fsdp_meta.py: FSDP from a model built on the meta device.

argv: OUT_DIR MODE [ARG]
- ``weights``: a plain build and a meta build of the same model (same seed) are sharded by FSDPStrategy;
  rank 0 saves both gathered full state dicts (and a forward of each) to ``weights.pt``.
- ``fit``: the same Trainer run (FSDP, 2 epochs) from a plain build and from a meta build; rank 0 saves both
  histories to ``fit.pt`` (best.pt in OUT_DIR/plain and OUT_DIR/meta).
- ``rss plain|meta``: a ~300 MB (fp32) model sharded by FSDPStrategy; each rank writes its peak RSS growth
  (``resource.getrusage``, KiB on Linux) over the process's peak before the model to ``rss.<rank>.json``.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
from torch import nn

from trainval import Trainer
from trainval.loop.strategies import FSDPStrategy


class Net(nn.Module):
    """Blocks in a ModuleList (each its own FSDP unit), BatchNorm buffers, an Embedding, widths that two
    ranks cannot split evenly, and a head with one output row (rank 1's shard of it is empty)."""

    def __init__(self, d: int = 6, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(4, 5)
        self.inp = nn.Linear(d, 7)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(7, 7), nn.BatchNorm1d(7), nn.ReLU()) for _ in range(2)]
        )
        self.gate = nn.Linear(7, 1)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        h = self.inp(x) + self.embed.weight.sum() * 0.0
        for block in self.blocks:
            h = block(h)
        return self.head(h) * torch.sigmoid(self.gate(h))


class Big(nn.Module):
    def __init__(self, layers: int = 18, width: int = 2048):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(width, width, bias=False) for _ in range(layers)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def built(cls, meta: bool, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return cls(**kwargs)
    return cls(**kwargs)


def weights(out: str) -> None:
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    saved = {}
    for kind in ("plain", "meta"):
        model = built(Net, kind == "meta")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        strategy = FSDPStrategy()
        strategy.wrap(model, optimizer, torch.device("cpu"), lambda m: m)
        state = strategy.model_state_dict(model)  # a collective: full on rank 0
        model.eval()
        with torch.no_grad():
            y = model(x)  # a collective too (parameters gathered)
        local = [p.to_local() for p in model.parameters()]
        saved[kind] = {
            "state": state,
            "out": y,
            "optimizer_holds_model_params": all(
                any(p is q for q in model.parameters()) for p in optimizer.param_groups[0]["params"]
            ),
            "local_numel": sum(t.numel() for t in local),
            "is_meta": any(t.is_meta for t in local),
        }
    if dist.get_rank() == 0:
        torch.save(saved, os.path.join(out, "weights.pt"))


def fit(out: str) -> None:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(96, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    histories = {}
    for kind in ("plain", "meta"):
        model = built(Net, kind == "meta", seed=3)
        trainer = Trainer(
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-2),
            strategy=FSDPStrategy(),
            max_epochs=2,
            batch_size=16,
            seed=5,
            progress=False,
            out_dir=os.path.join(out, kind),
        )
        histories[kind] = [
            {k: v for k, v in r.items() if k != "seconds"}
            for r in trainer.fit((X[:64], y[:64]), (X[64:], y[64:]))
        ]
    if dist.get_rank() == 0:
        torch.save(histories, os.path.join(out, "fit.pt"))


def rss(out: str, kind: str) -> None:
    # First a tiny model through the same path: the imports, the mesh and gloo's buffers are not the model's
    tiny = built(Big, kind == "meta", layers=1, width=8)
    FSDPStrategy().wrap(tiny, torch.optim.SGD(tiny.parameters(), lr=0.1), torch.device("cpu"), lambda m: m)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = built(Big, kind == "meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    FSDPStrategy().wrap(model, optimizer, torch.device("cpu"), lambda m: m)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    full = sum(p.numel() * p.element_size() for p in model.parameters())  # DTensors: their full size
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    record = {"growth_kib": peak - before, "full_bytes": full, "local_bytes": local}
    with open(os.path.join(out, f"rss.{dist.get_rank()}.json"), "w") as f:
        json.dump(record, f)


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    if mode == "weights":
        weights(out)
    elif mode == "fit":
        fit(out)
    else:
        rss(out, sys.argv[3])
    dist.barrier()
    open(os.path.join(out, f"done.{dist.get_rank()}"), "w").close()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
