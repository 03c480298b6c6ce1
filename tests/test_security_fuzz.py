"""Issue 12: a fuzz test over config values and CSV contents through the real ``trainval fit``.

Every input must end in success or in one ``trainval: error:`` line with exit code 1 or 2: never a
traceback, and never a changed file outside the run folder.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import yaml
from conftest import run_cli
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainval.app.config import SCHEMA

SETTINGS = settings(
    max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)

ODD_STRINGS = [
    "",
    " ",
    "..",
    "../x",
    "a/b",
    "/abs",
    "~",
    "~/r",
    "nosuch_mod_xyz:Thing",
    "json:Nope",
    "x" * 300,
    "caf\u00e9",
    "mlp",
    "cnn",
    "sgd",
    "adamw",
    "cosine",
    "onecycle",
    "plateau",
    "val_loss",
    "max",
    "cpu",
]
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 1000),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(ODD_STRINGS),
    st.lists(st.integers(-2, 64), max_size=3),
    st.lists(st.one_of(st.floats(-1, 2), st.just(float("nan"))), max_size=3),
    st.dictionaries(st.sampled_from(["a", "width"]), st.integers(0, 9), max_size=2),
)
# Keys whose fuzzing only costs time (many epochs, torch.compile, worker processes) are left out.
SLOW_KEYS = {
    "train.epochs",
    "train.compile",
    "data.num_workers",
    "data.train",
    "data.source",
    "data.factory",
    "log.tensorboard",
    "train.progress",
    "run.out_dir",  # '/abs' or '~/r' would write outside the test's folder
    "log.mlflow_uri",  # the same: a tracking store where the user says (tests/test_trackers.py)
    "log.wandb",  # W&B's own online login and network timeouts (tests/test_trackers.py)
    "log.wandb_mode",
}
# log.mlflow stays: its default store is trainval's own, beside the run folders (see _snapshot)
OWN_BESIDE_RUNS = {os.path.join("runs", "mlflow.db"), os.path.join("runs", "mlartifacts")}
FUZZ_KEYS = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys if f"{s}.{k}" not in SLOW_KEYS]

ROWS = 40


def _base(folder: str) -> dict:
    lines = ["f1,f2,label"] + [f"{(r % 5) * 0.5},{(r % 3) * 1.5},{r % 2}" for r in range(ROWS)]
    with open(os.path.join(folder, "data.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {
        "data": {"source": "csv", "train": "data.csv"},
        "model": {"name": "mlp", "hidden": [8]},
        "train": {"epochs": 1, "batch_size": 16, "progress": False, "device": "cpu"},
        "run": {"out_dir": "runs", "name": "r"},
        "log": {"plot": False},
    }


def _snapshot(folder: str) -> dict:
    """Every file outside runs/<run folders> with its bytes, plus a user's files placed inside runs/."""
    seen = {}
    for root, dirs, files in os.walk(folder):
        rel = os.path.relpath(root, folder)
        if rel == "home" or rel in OWN_BESIDE_RUNS or (
            rel.split(os.sep)[0] == "runs" and rel not in ("runs", os.path.join("runs", "user"))
        ):
            dirs[:] = []
            continue
        for name in files:
            if os.path.join(rel, name) in OWN_BESIDE_RUNS:
                continue
            with open(os.path.join(root, name), "rb") as f:
                seen[os.path.join(rel, name)] = f.read()
    return seen


def _check(proc, before: dict, folder: str) -> None:
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    if proc.returncode != 0:
        assert proc.returncode in (1, 2), out
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and err.startswith("trainval: error: "), err
    assert _snapshot(folder) == before, "a file outside the run folder changed"


def _prepare(folder: str) -> dict:
    cfg = _base(folder)
    os.makedirs(os.path.join(folder, "runs", "user"))
    os.makedirs(os.path.join(folder, "home"))  # HOME: caches of matplotlib and torch may go there
    for name in ("config.yaml", "summary.json", "keep.tmp", ".keep.tmp"):
        with open(os.path.join(folder, "runs", "user", name), "w") as f:
            f.write("the user's\n")
    with open(os.path.join(folder, "runs", ".notes.tmp"), "w") as f:
        f.write("the user's\n")
    return cfg


@pytest.mark.slow
@SETTINGS
@given(st.dictionaries(st.sampled_from(FUZZ_KEYS), VALUES, min_size=1, max_size=3))
@example({"log.mlflow": True, "run.name": "caf\u00e9"})  # whatever a Hypothesis release draws, this one runs
def test_fuzz_config_values(changes):
    with tempfile.TemporaryDirectory() as folder:
        cfg = _prepare(folder)
        for path, value in changes.items():
            section, key = path.split(".")
            cfg.setdefault(section, {})[key] = value
        with open(os.path.join(folder, "c.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, allow_unicode=True)
        before = _snapshot(folder)
        _check(
            run_cli("fit", "c.yaml", cwd=folder, timeout=300, env={"HOME": os.path.join(folder, "home")}),
            before,
            folder,
        )


CELLS = st.sampled_from(
    ["1", "0.5", "-2", "nan", "inf", "", "abc", '"2"', '"1,5"', "1e309", " 3 ", "0", "1", "caf\u00e9"]
)
HEADERS = st.lists(
    st.sampled_from(["f1", "f2", "f3", "label", '"f1"', "\ufefff1", " f2 ", "label "]), min_size=1, max_size=4
)


@pytest.mark.slow
@SETTINGS
@given(
    HEADERS,
    st.lists(st.lists(CELLS, min_size=0, max_size=5), min_size=0, max_size=30),
    st.sampled_from(["utf-8", "latin-1", "utf-8-sig"]),
    st.sampled_from([None, ["f1"], ["f1", "f2"]]),
)
def test_fuzz_csv_contents(header, rows, encoding, features):
    with tempfile.TemporaryDirectory() as folder:
        cfg = _prepare(folder)
        cfg["data"]["features"] = features
        lines = [",".join(header)] + [",".join(row) for row in rows]
        with open(os.path.join(folder, "data.csv"), "wb") as f:
            f.write(("\n".join(lines) + "\n").encode(encoding, errors="replace"))
        with open(os.path.join(folder, "c.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        before = _snapshot(folder)
        _check(
            run_cli(
                "fit",
                "c.yaml",
                "data.test_split=0",
                cwd=folder,
                timeout=300,
                env={"HOME": os.path.join(folder, "home")},
            ),
            before,
            folder,
        )
