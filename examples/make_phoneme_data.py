"""Synthetic data in the shape of the phoneme-classification homework: 429 features, 39 classes.

    python examples/make_phoneme_data.py [--out examples/data] [--train 20000] [--test 4000]

Writes ``phoneme_train.npz`` (arrays ``x`` float32 [N, 429], ``y`` int64 [N]) and
``phoneme_test.npz`` (``x`` only: the labels are what you predict).
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def make(n: int, rng: np.random.Generator, centers: np.ndarray):
    y = rng.integers(0, len(centers), size=n)
    # 11 frames of 39 coefficients; neighbouring frames share the phoneme's centre, plus noise
    x = centers[y] + rng.normal(0.0, 5.0, size=(n, centers.shape[1]))
    return x.astype(np.float32), y.astype(np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    centers = np.repeat(rng.normal(0.0, 1.0, size=(39, 39)), 11, axis=1) * 0.5
    os.makedirs(args.out, exist_ok=True)
    x, y = make(args.train, rng, centers)
    np.savez(os.path.join(args.out, "phoneme_train.npz"), x=x, y=y)
    xt, _ = make(args.test, rng, centers)
    np.savez(os.path.join(args.out, "phoneme_test.npz"), x=xt)
    print(f"wrote {args.train} training and {args.test} test samples (429 features, 39 classes) to {args.out}")


if __name__ == "__main__":
    main()
