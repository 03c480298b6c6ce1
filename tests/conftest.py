"""Tiny synthetic data and tiny models shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from trainval.lint.cli import lint_source
from trainval.lint.rules import RULES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The device the loop-semantics tests train on and compute their references on: CUDA where there is
# one, like the Trainer's own default (scripts/gpu_check.sh runs them there); TRAINVAL_TEST_DEVICE forces one.
DEVICE = os.environ.get("TRAINVAL_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def make_blobs(n: int = 120, d: int = 6, classes: int = 3, seed: int = 0, spread: float = 0.6):
    """Gaussian blobs: an easy, learnable classification set as float32 X and int64 y."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 3
    y = torch.arange(n) % classes
    X = centers[y] + spread * torch.randn(n, d, generator=g)
    return X.float(), y.long()


def tiny_mlp(d: int = 6, classes: int = 3, hidden: int = 16, dropout: float = 0.0, batchnorm: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(d, hidden)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(hidden))
    layers.append(nn.ReLU())
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, classes))
    return nn.Sequential(*layers)


@pytest.fixture
def blobs():
    return make_blobs()


_zygote = None


def _cli_zygote():
    """This test worker's CLI zygote (tests/helpers/cli_zygote.py), started on first use."""
    global _zygote
    if _zygote is None:
        import atexit
        import tempfile

        sys.path.insert(0, os.path.join(REPO, "tests", "helpers"))
        from cli_zygote import CliZygote

        _zygote = CliZygote()
        _zygote.logs = tempfile.mkdtemp(prefix="trainval-cli-")
        atexit.register(_zygote.close)
    return _zygote


def run_cli(*args: str, cwd: str | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False, fresh: bool = False) -> subprocess.CompletedProcess:
    """The real ``trainval`` command in a process of its own: forked from a zygote that imported torch
    once (tests/helpers/cli_zygote.py), or with ``fresh`` (or TRAINVAL_TEST_FRESH_CLI=1) a new
    ``python -m trainval`` interpreter."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    if fresh or os.environ.get("TRAINVAL_TEST_FRESH_CLI") == "1":
        proc = subprocess.run([sys.executable, "-m", "trainval", *args], cwd=cwd, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    else:
        zygote = _cli_zygote()
        proc = zygote.run(list(args), os.path.abspath(cwd or os.getcwd()), full_env, timeout, zygote.logs)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainval {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# One small learnable problem per task, with the metrics to check (several per task) -----------------

TASK_METRICS = {
    "multiclass": ["acc", "f1_macro", "top5_acc"],
    "binary": ["acc", "f1", "auroc"],
    "multilabel": ["f1_micro", "f1_macro", "exact_match"],
    "regression": ["mse", "mae", "r2"],
}


def task_problem(task: str, n: int = 120, d: int = 8, seed: int = 0):
    """``(model, loss_fn, X, y)`` for ``task``: blobs for classification, a linear map for regression."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g)
    torch.manual_seed(seed)
    if task == "multiclass":
        y = (X[:, :3].sum(1) * 2).long().clamp(-3, 2) + 3  # 6 classes
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 6)), nn.CrossEntropyLoss(), X, y
    if task == "binary":
        y = (X[:, 0] + 0.5 * torch.randn(n, generator=g) > 0).long()
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 1)), nn.BCEWithLogitsLoss(), X, y
    if task == "multilabel":
        y = (X[:, :4] + 0.3 * torch.randn(n, 4, generator=g) > 0).long()
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 4)), nn.BCEWithLogitsLoss(), X, y
    if task == "regression":
        W = torch.randn(d, 2, generator=g)
        y = X @ W + 0.1 * torch.randn(n, 2, generator=g)
        return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 2)), nn.MSELoss(), X, y
    raise ValueError(task)


LINT_DEFAULT = {c for c, r in RULES.items() if r.default}


def lint_found(source: str) -> set[tuple[int, str]]:
    """``(line, code)`` of each finding the default lint rules report on ``source`` (dedented), read as case.py."""
    return {(f.line, f.code) for f in lint_source(textwrap.dedent(source), "case.py", LINT_DEFAULT)}


def line_of(source: str, needle: str) -> int:
    """The line number of the first line of ``source`` (dedented) that holds ``needle``."""
    lines = textwrap.dedent(source).splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)

