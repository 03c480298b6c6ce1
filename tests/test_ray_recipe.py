"""examples/ray_train.py on a local Ray cluster (2 CPU workers): the run folder equals a torchrun --nproc 2 run's."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO, run_cli

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

RECIPE = os.path.join(REPO, "examples", "ray_train.py")
ARGS = ["train.epochs=2", "train.batch_size=32", "log.plot=false"]


def _ray_recipe(*args: str, cwd: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """The recipe in a process session of its own: on a timeout, it and the Ray processes it started go."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, RECIPE, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"the Ray recipe ran past {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_ray_train_recipe_equals_a_torchrun_run(tmp_path):
    ray_run = _ray_recipe(
        *ARGS,
        f"run.out_dir={tmp_path / 'ray'}",
        "--workers",
        "2",
        "--storage",
        str(tmp_path / "ray_results"),
        cwd=str(tmp_path),
    )
    assert ray_run.returncode == 0, ray_run.stdout[-6000:]
    assert f"run folder {tmp_path / 'ray' / 'digits'}" in ray_run.stdout
    torchrun = run_cli(
        "fit",
        *ARGS,
        f"run.out_dir={tmp_path / 'torchrun'}",
        "--nproc",
        "2",
        cwd=str(tmp_path),
        env={"OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stdout + torchrun.stderr

    ray_dir, ref_dir = tmp_path / "ray" / "digits", tmp_path / "torchrun" / "digits"
    for name in ("best.pt", "last.pt", "metrics.csv", "predictions.csv", "summary.json", "config.yaml"):
        assert (ray_dir / name).is_file(), name
    rows = _rows(ray_dir / "metrics.csv")
    assert len(rows) == 2 and rows == _rows(ref_dir / "metrics.csv")  # two ranks: the same sums as torchrun's
    assert float(rows[-1]["val_acc"]) > 0.8
    assert (ray_dir / "predictions.csv").read_text() == (ref_dir / "predictions.csv").read_text()
    ray_best = torch.load(ray_dir / "best.pt", weights_only=True)["model"]
    ref_best = torch.load(ref_dir / "best.pt", weights_only=True)["model"]
    assert ray_best.keys() == ref_best.keys() and all(torch.equal(ray_best[k], ref_best[k]) for k in ref_best)
    # the control: a one-process run of the same config is another run (different batches per step)
    one = run_cli(
        "fit", *ARGS, f"run.out_dir={tmp_path / 'one'}", cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1"}
    )
    assert one.returncode == 0, one.stdout + one.stderr
    assert _rows(tmp_path / "one" / "digits" / "metrics.csv") != rows
