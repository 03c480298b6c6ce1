"""The loop's own per-batch cost: ``fit`` for 2 epochs of 1,563 tiny batches on one thread, best of 3.

    python benchmarks/loop_overhead.py            # seconds for the current src
    PYTHONPATH=OTHER/src python benchmarks/loop_overhead.py   # another checkout's, to compare

The model is so small that the time is mostly Python in the loop (per-batch calls, property reads): a
change that adds a few microseconds per batch shows here first. Run both versions alternately on a quiet
machine; compare.py --paired gives the ratio against a hand-written loop.
"""

from __future__ import annotations

import tempfile
import time

import torch
from torch import nn

import trainval


def fit_seconds(X: torch.Tensor, y: torch.Tensor, Xv: torch.Tensor, yv: torch.Tensor, epochs: int) -> float:
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    trainer = trainval.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.01), max_epochs=epochs,
                               batch_size=64, out_dir=tempfile.mkdtemp(), progress=False, plot=False)
    started = time.perf_counter()
    trainer.fit((X, y), (Xv, yv))
    return time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    X, y = torch.randn(100_000, 32), torch.randint(0, 10, (100_000,))
    Xv, yv = torch.randn(20_000, 32), torch.randint(0, 10, (20_000,))
    fit_seconds(X, y, Xv, yv, 1)  # warm-up
    best = min(fit_seconds(X, y, Xv, yv, 2) for _ in range(3))
    print(f"trainval {trainval.__file__}: fit of 2 epochs, best of 3: {best:.3f} s")


if __name__ == "__main__":
    main()
