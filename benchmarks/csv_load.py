"""CSV load time and peak memory: the Python reader (before pyarrow), the fast reader, and the same data as npz.

    .venv/bin/python benchmarks/csv_load.py [rows] [features]   (default 100000 x 50 + a label: 46 MB)

Then the same data through a whole `trainval fit` (one epoch of the built-in MLP, test and predictions included),
from the CSV and from the npz, each a fresh `trainval` process: what a user waits for.

Each reader runs in a fresh process, so that its peak RSS (ru_maxrss) is its own; the figures include the
interpreter with torch and trainval imported (the baseline line).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

CHILD = r"""
import json, resource, sys, time
import trainval.data as data
path, how = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if how == "python":
    data._csv_fast = lambda *a: None  # the Python reader alone (today's reader before the fast path)
if how == "npz":
    s = data.load_npz(path)
elif how != "baseline":
    s = data.load_csv(path)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "baseline_mb": base / 1024}))
"""


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    cols = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, cols))
    y = rng.integers(0, 3, rows)
    with tempfile.TemporaryDirectory() as tmp:
        csv_path, npz_path = os.path.join(tmp, "d.csv"), os.path.join(tmp, "d.npz")
        header = ",".join([f"f{i}" for i in range(cols)] + ["label"])
        np.savetxt(
            csv_path,
            np.column_stack([X, y]),
            fmt=["%.6g"] * cols + ["%d"],
            delimiter=",",
            header=header,
            comments="",
        )
        np.savez(npz_path, x=X.astype(np.float32), y=y)
        print(
            f"{rows} x {cols + 1}: CSV {os.path.getsize(csv_path) / 1e6:.1f} MB, "
            f"npz {os.path.getsize(npz_path) / 1e6:.1f} MB"
        )
        for how, path in (
            ("baseline", csv_path),
            ("python", csv_path),
            ("fast", csv_path),
            ("npz", npz_path),
        ):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, path, how], capture_output=True, text=True, check=True
            )
            r = json.loads(out.stdout)
            print(
                f"{how:9s} load {r['seconds']:6.2f} s   peak RSS {r['peak_mb']:7.0f} MB "
                f"(imports alone {r['baseline_mb']:.0f} MB)"
            )
        trainval = os.path.join(os.path.dirname(sys.executable), "trainval")
        for source, path in (("csv", csv_path), ("npz", npz_path)):
            start = time.perf_counter()
            subprocess.run(
                [trainval, "fit", f"data.source={source}", f"data.train={path}", "model.name=mlp",
                 "train.epochs=1", "train.progress=false", "log.plot=false", f"run.out_dir={tmp}",
                 f"run.name={source}"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            print(f"fit {source:5s} {time.perf_counter() - start:6.2f} s (one epoch, a fresh trainval process)")


if __name__ == "__main__":
    main()
