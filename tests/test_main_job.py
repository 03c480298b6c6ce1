"""The main job: `trainval fit` with no arguments, on the embedded digits data, as a real subprocess."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from conftest import run_cli


@pytest.mark.slow
def test_default_fit_on_digits(tmp_path):
    proc = run_cli("fit", cwd=str(tmp_path), check=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 30 and lines[0].startswith("[001/030] Train Acc: ") and " | Val Acc: " in lines[0]
    assert "saving best model (val_acc " in proc.stdout
    run = tmp_path / "runs" / "digits"
    for name in ("best.pt", "last.pt", "metrics.csv", "predictions.csv", "curves.png", "config.yaml", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test"]["test_acc"] >= 0.97
    assert f"Test Acc: {summary['test']['test_acc']:.6f}" in proc.stdout
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert list(rows[0]) == ["Id", "Class"] and [int(r["Id"]) for r in rows] == list(range(270))
    metrics = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(metrics) == 30 and set(metrics[0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["epoch"] == summary["best_epoch"]


def test_short_default_fit_and_refusal_to_overwrite(tmp_path):
    proc = run_cli("fit", "train.epochs=2", cwd=str(tmp_path), check=True)
    assert "[002/002]" in proc.stdout
    again = run_cli("fit", "train.epochs=2", cwd=str(tmp_path))
    assert again.returncode == 2
    assert again.stderr.strip().startswith("trainval: error: runs/digits already holds a run")
    assert "Traceback" not in again.stderr
    ok = run_cli("fit", "train.epochs=1", "run.overwrite=true", cwd=str(tmp_path), check=True)
    assert "[001/001]" in ok.stdout
