"""One training epoch: trainval's in-memory TensorLoader vs DataLoader(TensorDataset).

The homework-shaped MLP (429 -> 1024 -> 512 -> 128 -> 39, BatchNorm + Dropout), batch 512, 200k
synthetic samples. Both sides run the same loop (forward, loss, backward, step, zero_grad), alternating,
and the medians are compared in one run.

    .venv/bin/python benchmarks/fast_path.py [--samples 200000] [--repeats 5] [--tiny]

``--tiny`` uses a small MLP (32 -> 64 -> 10, batch 64), where the data path dominates.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainval.data import TensorLoader


def mlp(tiny: bool) -> nn.Module:
    if tiny:
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    sizes = [429, 1024, 512, 128]
    layers: list[nn.Module] = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(0.25)]
    layers.append(nn.Linear(128, 39))
    return nn.Sequential(*layers)


def epoch(model, opt, loader) -> float:
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def data_only(loader) -> float:
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    d, c, batch = (32, 10, 64) if args.tiny else (429, 39, 512)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(args.samples, d, generator=g)
    y = torch.randint(0, c, (args.samples,), generator=g)
    torch.manual_seed(0)
    model = mlp(args.tiny)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loaders = {
        "TensorLoader": TensorLoader(X, y, batch, shuffle=True, generator=torch.Generator().manual_seed(0)),
        "DataLoader(TensorDataset)": DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=True),
    }
    epoch(model, opt, loaders["TensorLoader"])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in loaders}
    for _ in range(args.repeats):
        for name, loader in loaders.items():  # alternate A/B
            times[name].append(epoch(model, opt, loader))
    fast = statistics.median(times["TensorLoader"])
    slow = statistics.median(times["DataLoader(TensorDataset)"])
    print(f"workload: {'tiny MLP 32-64-10, batch 64' if args.tiny else 'MLP 429-1024-512-128-39 (BN+Dropout), batch 512'}, "
          f"{args.samples} samples, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        print(f"  {name:28s} median epoch {statistics.median(ts):.3f} s  (runs: {', '.join(f'{t:.3f}' for t in ts)})")
    print(f"  ratio DataLoader / TensorLoader (whole epoch): {slow / fast:.2f}x")
    data = {name: statistics.median(data_only(loader) for _ in range(args.repeats)) for name, loader in loaders.items()}
    for name, t in data.items():
        print(f"  {name:28s} data path alone {t:.3f} s per epoch")
    print(f"  ratio DataLoader / TensorLoader (data path alone): "
          f"{data['DataLoader(TensorDataset)'] / data['TensorLoader']:.1f}x")


if __name__ == "__main__":
    main()
