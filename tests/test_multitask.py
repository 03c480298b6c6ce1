"""Multi-head models: dict/tuple targets, the whole output and target to the loss, metrics per head.

A two-head model (class ids and a value per sample, ``tests/helpers/multihead.py``) is trained through the
Python API on every kind of data, through the CLI (``model.name: module:Class`` with ``--trust-code``), and
under 1 and 2 gloo processes; its per-head metrics are compared with scikit-learn on the run's own predictions.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    matthews_corrcoef,
    mean_absolute_error,
    mean_squared_error,
)
from test_distributed import torchrun, torchrun_ok
from torch import nn
from torch.utils.data import DataLoader

from trainval import Trainer
from trainval.errors import ConfigError, DataError

HELPERS = os.path.join(REPO, "tests", "helpers")
sys.path.insert(0, HELPERS)
import multihead  # noqa: E402


def sklearn_metrics(predictions: dict, y: dict) -> dict:
    cls, reg = predictions["cls"].numpy(), predictions["reg"].numpy().astype(np.float64)
    return {
        "cls_acc": accuracy_score(y["cls"].numpy(), cls),
        "cls_f1_macro": f1_score(y["cls"].numpy(), cls, average="macro"),
        "reg_mae": mean_absolute_error(y["reg"].numpy().astype(np.float64), reg),
    }


def assert_matches_sklearn(metrics: dict, predictions: dict, y: dict, prefix: str) -> None:
    expected = sklearn_metrics(predictions, y)
    assert metrics[f"{prefix}_cls_acc"] == expected["cls_acc"]  # counts: exact
    assert metrics[f"{prefix}_cls_f1_macro"] == pytest.approx(expected["cls_f1_macro"], abs=1e-12)
    assert metrics[f"{prefix}_reg_mae"] == pytest.approx(expected["reg_mae"], rel=1e-6)


def data_of(kind: str, X, y):
    if kind == "memory":
        return X, y
    if kind == "dataset":
        return multihead.Pairs(X, y)
    if kind == "dataloader":
        return DataLoader(multihead.Pairs(X, y), batch_size=16)
    return multihead.Stream(X, y)


@pytest.mark.parametrize("kind", ["memory", "dataset", "dataloader", "stream"])
def test_two_head_model_trains_on_dict_targets_of_every_data_kind(tmp_path, kind):
    """Before: a dict target raised `Could not infer dtype of dict` (Datasets) or was refused (in memory)."""
    torch.manual_seed(0)
    data = multihead.arrays()
    multihead.LOSS_CALLS.clear()
    trainer = Trainer(
        multihead.TwoHead(),
        loss_fn=multihead.combined_loss,
        metrics={"cls": ["acc", "f1_macro"], "reg": ["mae"]},
        max_epochs=3,
        batch_size=16,
        out_dir=str(tmp_path / "run"),
        progress=False,
        monitor="val_cls_acc",
    )
    history = trainer.fit(data_of(kind, *data["train"]), data_of(kind, *data["val"]))
    assert set(multihead.LOSS_CALLS) == {("dict", "dict")}  # the loss saw the whole output and target
    assert {"train_cls_acc", "train_cls_f1_macro", "train_reg_mae", "val_cls_acc", "val_reg_mae"} <= set(
        history[-1]
    )
    X, y = data["test"]
    metrics = trainer.test(data_of(kind, X, y))
    assert set(metrics) == {"test_loss", "test_cls_acc", "test_cls_f1_macro", "test_reg_mae"}
    predictions = trainer.predict(X)  # best.pt, as test used
    assert predictions["cls"].dtype == torch.int64 and predictions["reg"].shape == (len(X),)
    assert_matches_sklearn(metrics, predictions, y, "test")
    # the test loss is the combined loss over the whole split at once (a mean over samples)
    with torch.no_grad():
        outputs = trainer.model(X)
    assert metrics["test_loss"] == pytest.approx(float(multihead.combined_loss(outputs, y)), rel=1e-5)


def test_tuple_targets_and_outputs_name_heads_by_position_and_infer_each_task(tmp_path):
    torch.manual_seed(0)
    data = multihead.arrays()
    as_tuple = {k: (X, (y["cls"], y["reg"])) for k, (X, y) in data.items()}
    trainer = Trainer(
        multihead.TupleTwoHead(),
        loss_fn=multihead.tuple_loss,
        max_epochs=2,
        batch_size=16,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    history = trainer.fit(as_tuple["train"], as_tuple["val"])
    assert {h: t.name for h, t in trainer.task.tasks.items()} == {"0": "multiclass", "1": "regression"}
    # each head's default metrics: acc for the classes, mse and mae for the values; monitored: the first
    assert {"val_0_acc", "val_1_mse", "val_1_mae"} <= set(history[-1]) and trainer.monitor == "val_0_acc"
    X, (y_cls, y_reg) = as_tuple["test"]
    metrics = trainer.test(as_tuple["test"])
    predictions = trainer.predict(X)
    assert metrics["test_0_acc"] == accuracy_score(y_cls.numpy(), predictions["0"].numpy())
    assert metrics["test_1_mse"] == pytest.approx(
        mean_squared_error(y_reg.double().numpy(), predictions["1"].double().numpy()), rel=1e-6
    )


def test_tasks_given_per_head_and_a_binary_head_inferred_from_one_logit(tmp_path):
    torch.manual_seed(0)
    X, y = multihead.make(80, 0)
    y = {"cls": y["cls"], "flag": (y["reg"] > 0).long()}  # integer 0/1 with one logit: binary

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls, self.flag = nn.Linear(5, 3), nn.Linear(5, 1)

        def forward(self, x):
            return {"cls": self.cls(x), "flag": self.flag(x)}

    def loss(out, target):
        return nn.functional.cross_entropy(
            out["cls"], target["cls"]
        ) + nn.functional.binary_cross_entropy_with_logits(out["flag"].squeeze(1), target["flag"].float())

    inferred = Trainer(Heads(), loss_fn=loss, max_epochs=1, out_dir=str(tmp_path / "a"), progress=False)
    inferred.fit((X, y))
    assert {h: t.name for h, t in inferred.task.tasks.items()} == {"cls": "multiclass", "flag": "binary"}
    given = Trainer(
        Heads(),
        loss_fn=loss,
        task={"cls": "multiclass", "flag": "binary"},
        metrics={"flag": ["acc", "f1", "auroc"]},
        max_epochs=1,
        out_dir=str(tmp_path / "b"),
        progress=False,
    )
    history = given.fit((X, y))
    assert {"train_flag_acc", "train_flag_f1", "train_flag_auroc"} <= set(
        history[-1]
    ) and "train_cls_acc" not in history[-1]
    predictions = given.predict(X, ckpt="last")
    assert set(predictions["flag"].unique().tolist()) <= {0, 1} and predictions["flag"].shape == (80,)


def test_a_per_head_metric_may_be_monitored_with_its_own_direction(tmp_path):
    torch.manual_seed(0)
    data = multihead.arrays()
    trainer = Trainer(
        multihead.TwoHead(),
        loss_fn=multihead.combined_loss,
        metrics={"cls": ["acc"], "reg": ["mae"]},
        max_epochs=4,
        batch_size=16,
        out_dir=str(tmp_path / "run"),
        progress=False,
        monitor="val_reg_mae",
    )
    history = trainer.fit(data["train"], data["val"])
    assert trainer.mode == "min"  # an error: lower is better
    maes = [row["val_reg_mae"] for row in history]
    assert trainer.best_epoch == 1 + int(np.argmin(maes)) and trainer.best_value == min(maes)


def test_plain_tensor_targets_keep_the_output_key_rule(tmp_path):
    """A dict output with a plain target: the prediction under output_key, the loss as before."""
    X, y = multihead.make(60, 0)
    trainer = Trainer(
        multihead.TwoHead(),
        loss_fn=nn.CrossEntropyLoss(),
        output_key="cls",
        max_epochs=1,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    history = trainer.fit((X, y["cls"]))
    assert trainer.task.name == "multiclass" and "train_acc" in history[-1]


@pytest.mark.parametrize(
    "make, error, message",
    [
        (
            lambda out: Trainer(multihead.TwoHead(), out_dir=out, max_epochs=1, progress=False),
            ConfigError,
            "several heads\\) and the Trainer has no loss_fn; pass a loss_fn\\(outputs, targets\\) of your own",
        ),
        (
            lambda out: Trainer(
                multihead.TwoHead(), out_dir=out, loss_fn=nn.CrossEntropyLoss(), max_epochs=1, progress=False
            ),
            ConfigError,
            "has loss_fn CrossEntropyLoss; pass a loss_fn\\(outputs, targets\\)",
        ),
        (
            lambda out: Trainer(
                multihead.TwoHead(),
                out_dir=out,
                loss_fn=multihead.combined_loss,
                task="multiclass",
                max_epochs=1,
                progress=False,
            ),
            ConfigError,
            "task='multiclass' names one; give a task per head",
        ),
        (
            lambda out: Trainer(
                multihead.TwoHead(),
                out_dir=out,
                loss_fn=multihead.combined_loss,
                metrics={"size": ["acc"]},
                max_epochs=1,
                progress=False,
            ),
            ConfigError,
            "metrics name head 'size'",
        ),
        (
            lambda out: Trainer(
                multihead.TwoHead(),
                out_dir=out,
                loss_fn=multihead.combined_loss,
                task={"cls": "ranking"},
                max_epochs=1,
                progress=False,
            ),
            ConfigError,
            "task for head 'cls' must be one of",
        ),
    ],
)
def test_multi_head_mistakes_are_one_clear_error(tmp_path, make, error, message):
    X, y = multihead.make(40, 0)
    with pytest.raises(error, match=message):
        make(str(tmp_path / "run")).fit((X, y))


def test_a_head_whose_task_cannot_be_told_names_task_per_head(tmp_path):
    X, y = multihead.make(40, 0)
    y = {"cls": y["cls"], "reg": torch.zeros(40, 3, dtype=torch.long)}  # integer [B, 3] vs output [B]
    with pytest.raises(DataError, match="cannot tell the task of head 'reg'.*task=\\{'reg': 'multiclass'\\}"):
        Trainer(
            multihead.TwoHead(),
            loss_fn=lambda o, t: o["cls"].sum(),
            max_epochs=1,
            progress=False,
            out_dir=str(tmp_path / "run"),
        ).fit((X, y))


# ------------------------------------------------------------------------------------------------
# The command line: model.name module:Class, task.loss module:function, --trust-code


def test_cli_trains_a_two_head_model_with_its_own_loss_and_metrics_per_head(tmp_path):
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = [
        "data.source=factory",
        "data.factory=multihead:arrays",
        "model.name=multihead:TwoHead",
        "task.loss=multihead:combined_loss",
        "task.metrics={cls: [acc, f1_macro], reg: [mae]}",
        f"run.out_dir={tmp_path}",
        "run.name=r",
        "train.epochs=3",
        "train.batch_size=16",
        "log.plot=false",
        "train.monitor=val_reg_mae",
    ]
    proc = run_cli("fit", *common, cwd=str(tmp_path), env=env, check=True)
    assert "[003/003] Train cls_acc:" in proc.stdout and "Test cls_acc:" in proc.stdout
    folder = tmp_path / "r"
    with open(folder / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert {"val_cls_acc", "val_cls_f1_macro", "val_reg_mae", "train_reg_mae"} <= set(header)
    with open(folder / "summary.json") as f:
        test = json.load(f)["test"]
    with open(folder / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    predictions = {
        "cls": torch.tensor([int(r["cls"]) for r in rows]),
        "reg": torch.tensor([float(r["reg"]) for r in rows], dtype=torch.float64),
    }
    assert_matches_sklearn(test, predictions, multihead.arrays()["test"][1], "test")
    # `trainval test` later imports the loss only with --trust-code, then gives the same metrics
    refused = run_cli("test", str(folder / "config.yaml"), cwd=str(tmp_path), env=env)
    assert refused.returncode == 2 and "task.loss=multihead:combined_loss" in refused.stderr
    again = run_cli(
        "test", str(folder / "config.yaml"), "--trust-code", cwd=str(tmp_path), env=env, check=True
    )
    assert "Test cls_acc:" in again.stdout
    with open(folder / "test.json") as f:
        assert {k: v for k, v in json.load(f).items() if k.startswith("test_")} == pytest.approx(test)


# ------------------------------------------------------------------------------------------------
# 1 and 2 gloo processes


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_per_head_metrics_equal_sklearn_under_one_and_two_processes(tmp_path, nproc):
    child = os.path.join(HELPERS, "multihead.py")
    env = {"OMP_NUM_THREADS": "1"}
    if nproc == 1:
        proc = subprocess.run(
            [sys.executable, child, str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=240,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    else:
        proc = torchrun([child, str(tmp_path)], nproc=nproc, env=env)
        assert torchrun_ok(proc, str(tmp_path), nproc), proc.stdout + proc.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    y = multihead.arrays()["test"][1]
    assert len(result["predictions"]["cls"]) == len(y["cls"])  # each test sample once, in order
    assert_matches_sklearn(result["metrics"], result["predictions"], y, "test")
    assert result["metrics"]["test_reg_mse"] == pytest.approx(
        mean_squared_error(y["reg"].double().numpy(), result["predictions"]["reg"].double().numpy()), rel=1e-6
    )
    assert result["metrics"]["test_cls_mcc"] == pytest.approx(
        matthews_corrcoef(y["cls"].numpy(), result["predictions"]["cls"].numpy()), abs=1e-12
    )
    assert result["mode"] == "min"
