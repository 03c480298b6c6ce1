"""Plain-function metrics, the mask every metric gets, the monitor's fallback line, threshold per test/predict."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import task_problem
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef, mean_absolute_error
from torch import nn

from trainval import Trainer
from trainval.errors import ConfigError


def mcc(pred, target):
    return matthews_corrcoef(target.numpy(), pred.numpy())


def max_error(pred, target):
    return float((pred - target).abs().max())


max_error.higher_is_better = False


def fit(task, tmp_path, **kw):
    model, loss, X, y = task_problem(task)
    trainer = Trainer(
        model, loss_fn=loss, max_epochs=3, batch_size=16, out_dir=str(tmp_path / "run"), progress=False, **kw
    )
    trainer.fit((X[:80], y[:80]), (X[80:], y[80:]))
    return trainer, X[80:], y[80:]


def test_a_plain_function_metric_is_called_on_every_sample_and_equals_sklearn(tmp_path):
    """Before: `metric <function mcc> is neither a built-in name nor an object with ...`."""
    trainer, X, y = fit("multiclass", tmp_path, metrics=["acc", mcc], monitor="val_mcc")
    assert trainer.mode == "max" and "val_mcc" in trainer.history[-1]
    metrics = trainer.test((X, y))
    pred = trainer.predict(X)
    assert metrics["test_mcc"] == pytest.approx(matthews_corrcoef(y.numpy(), pred.numpy()), abs=1e-12)
    assert metrics["test_acc"] == accuracy_score(y.numpy(), pred.numpy())


def test_a_function_metric_of_values_keeps_its_direction(tmp_path):
    trainer, X, y = fit(
        "regression", tmp_path, metrics={"worst": max_error, "mae": "mae"}, monitor="val_worst"
    )
    assert trainer.mode == "min"
    metrics = trainer.test((X, y))
    pred = trainer.predict(X).double()
    assert metrics["test_worst"] == pytest.approx(float((pred - y.double()).abs().max()), rel=1e-6)
    assert metrics["test_mae"] == pytest.approx(
        mean_absolute_error(y.double().numpy(), pred.numpy()), rel=1e-6
    )


def test_a_function_metric_leaves_ignored_targets_out(tmp_path):
    model, loss, X, y = task_problem("multiclass")
    y = y.clone()
    y[::4] = -100  # ignored
    seen = []

    def count(pred, target):
        seen.append(len(target))
        return float((pred == target).double().mean())

    trainer = Trainer(
        model,
        loss_fn=loss,
        metrics=["acc", count],
        max_epochs=1,
        out_dir=str(tmp_path / "run"),
        progress=False,
    )
    trainer.fit((X, y))
    kept = y != -100
    metrics = trainer.validate((X, y))
    assert seen[-1] == int(kept.sum())
    pred = trainer.predict(X)
    assert metrics["val_count"] == pytest.approx(
        accuracy_score(y[kept].numpy(), pred[kept].numpy()), abs=1e-12
    )
    assert metrics["val_acc"] == metrics["val_count"]


class Kept:
    """A protocol metric that counts the samples its mask keeps: ``target[mask]``, as a user writes it."""

    name, higher_is_better = "kept", True

    def state_shape(self, num_outputs):
        return (1,)

    def update(self, state, out):
        state[0].add_(out.target[out.mask].shape[0])

    def compute(self, state):
        return float(state[0])


def test_the_mask_a_metric_gets_is_always_a_tensor(tmp_path):
    """Before: the mask was None when nothing was ignored, and target[None] counted 1 row per batch."""
    trainer, X, y = fit("binary", tmp_path, metrics=["acc", Kept()])
    assert trainer.history[-1]["train_kept"] == 80.0 and trainer.history[-1]["val_kept"] == len(y)


def test_a_metric_that_is_neither_is_one_clear_error():
    with pytest.raises(ConfigError, match="neither a built-in name, a function"):
        Trainer(nn.Linear(2, 3), metrics=[42])


def test_monitoring_a_training_metric_without_validation_data_says_so_once(tmp_path, capsys):
    model, loss, X, y = task_problem("multiclass")
    Trainer(model, loss_fn=loss, max_epochs=2, out_dir=str(tmp_path / "a"), progress=False).fit((X, y))
    out = capsys.readouterr().out
    assert (
        out.count(
            "no validation data: monitoring train_acc, so best.pt is the best epoch on the training data"
        )
        == 1
    )
    model, loss, X, y = task_problem("multiclass")
    Trainer(model, loss_fn=loss, max_epochs=1, out_dir=str(tmp_path / "b"), progress=False).fit(
        (X, y), (X, y)
    )
    Trainer(
        model, loss_fn=loss, max_epochs=1, out_dir=str(tmp_path / "c"), progress=False, monitor="train_loss"
    ).fit((X, y))
    assert (
        "no validation data" not in capsys.readouterr().out
    )  # with validation, or a monitor chosen: no line


def test_threshold_for_one_test_or_predict_call_is_applied_recorded_and_restored(tmp_path):
    """Before: test() took no threshold, and setting trainer.threshold after construction changed nothing."""
    trainer, X, y = fit("binary", tmp_path, metrics=["acc", "f1"])
    proba = trainer.predict_proba(X)
    default = trainer.test((X, y))
    high = trainer.test((X, y), threshold=0.7)
    at_07 = (proba > 0.7).long()
    assert torch.equal(trainer.predict(X, threshold=0.7), at_07)
    assert high["test_acc"] == accuracy_score(y.numpy(), at_07.numpy())
    assert high["test_f1"] == pytest.approx(f1_score(y.numpy(), at_07.numpy()), abs=1e-12)
    assert high["test_threshold"] == 0.7 and "test_threshold" not in default
    assert default["test_acc"] == accuracy_score(y.numpy(), (proba > 0.5).long().numpy())
    assert at_07.sum() < (proba > 0.5).sum()  # the two thresholds differ on this data: the check bites
    assert trainer.test((X, y)) == default and torch.equal(
        trainer.predict(X), (proba > 0.5).long()
    )  # restored
    with open(os.path.join(trainer.out_dir, "summary.json")) as f:
        assert json.load(f)["test"] == pytest.approx(default)  # the last call's, as it was run
    trainer.test((X, y), threshold=0.7)
    with open(os.path.join(trainer.out_dir, "summary.json")) as f:
        assert json.load(f)["test"]["test_threshold"] == 0.7
    with pytest.raises(ConfigError, match="threshold must lie strictly between 0 and 1"):
        trainer.test((X, y), threshold=1.5)
