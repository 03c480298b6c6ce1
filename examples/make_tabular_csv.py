"""A small generated CSV for the tabular example: 8 numeric features and a `label` column (3 classes).

    python examples/make_tabular_csv.py [--out examples/data/tabular.csv] [--rows 1500]
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tabular.csv"))
    ap.add_argument("--rows", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    centers = rng.normal(0, 2.0, size=(3, 8))
    y = rng.integers(0, 3, size=args.rows)
    x = centers[y] + rng.normal(0, 1.0, size=(args.rows, 8))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"f{i}" for i in range(8)] + ["label"])
        for row, label in zip(x, y):
            w.writerow([f"{v:.5f}" for v in row] + [int(label)])
    print(f"wrote {args.rows} rows to {args.out}")


if __name__ == "__main__":
    main()
