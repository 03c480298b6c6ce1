"""Experiment trackers: an MLflow run readable with MLflow's own client; W&B offline without an account."""

from __future__ import annotations

import csv
import os

import pytest

from tests.conftest import make_blobs, run_cli, tiny_mlp
from trainval import Trainer
from trainval.errors import ConfigError

COMMON = ["model.name=mlp", "model.hidden=[16]", "train.progress=false", "train.batch_size=128"]


def _client(out_dir):
    from mlflow.tracking import MlflowClient

    return MlflowClient("sqlite:///" + os.path.join(str(out_dir), "mlflow.db"))


def test_mlflow_run_has_the_scalars_of_metrics_csv_the_config_and_best_pt(tmp_path):
    pytest.importorskip("mlflow")
    out = tmp_path / "runs"
    run_cli("fit", *COMMON, "train.epochs=1", "run.name=m", f"run.out_dir={out}", "log.mlflow=true",
            "log.artifacts=true", check=True)
    resumed = run_cli("fit", *COMMON, "train.epochs=2", "run.name=m", f"run.out_dir={out}", "log.mlflow=true",
                      "log.artifacts=true", "--resume", check=True)
    assert "resuming from" in resumed.stdout
    client = _client(out)
    experiment = client.get_experiment_by_name("trainval")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1  # the resumed fit continued the same MLflow run
    run = found[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "m"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["model.hidden"] == "[16]"
    assert run.data.tags["trainval.run_folder"] == str(out / "m")
    with open(out / "m" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for column in rows[0]:
        if column == "epoch":
            continue
        history = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], column
        assert [m.value for m in history] == pytest.approx([float(r[column]) for r in rows], rel=1e-12), column
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"best.pt", "metrics.csv"}
    assert (out / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()


def test_mlflow_logger_with_the_python_api(tmp_path):
    pytest.importorskip("mlflow")
    from trainval.loop.trackers import MLflowLogger

    X, y = make_blobs(n=60)
    uri = "sqlite:///" + str(tmp_path / "elsewhere.db")
    logger = MLflowLogger(uri, experiment="api", params={"note": "blobs", "nested": {"width": 16}})
    Trainer(tiny_mlp(), max_epochs=2, out_dir=str(tmp_path / "r"), progress=False, callbacks=[logger]).fit(
        (X[:40], y[:40]), (X[40:], y[40:]))
    from mlflow.tracking import MlflowClient

    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.params == {"note": "blobs", "nested.width": "16"} and run.data.metrics["val_acc"] >= 0
    assert not (tmp_path / "mlflow.db").exists()  # the URI given, not the default


def test_missing_tracker_package_is_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name.split(".")[0] in ("mlflow", "wandb"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_trackers)
    from trainval.loop.trackers import MLflowLogger, WandbLogger

    X, y = make_blobs(n=60)
    for logger, words in ((MLflowLogger(), "trainval[mlflow]"), (WandbLogger(), "trainval[wandb]")):
        trainer = Trainer(tiny_mlp(), max_epochs=1, out_dir=str(tmp_path / type(logger).__name__), progress=False,
                          callbacks=[logger])
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            trainer.fit((X[:40], y[:40]), (X[40:], y[40:]))


def test_wandb_offline_without_an_account(tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "runs"
    env = {"WANDB_API_KEY": "", "WANDB_SILENT": "true", "HOME": str(tmp_path)}
    run_cli("fit", *COMMON, "train.epochs=2", "run.name=w", f"run.out_dir={out}", "log.wandb=true",
            "log.wandb_mode=offline", "log.artifacts=true", env=env, check=True)
    offline = [d for d in os.listdir(out / "w" / "wandb") if d.startswith("offline-run-")]
    assert len(offline) == 1
    files = os.listdir(out / "w" / "wandb" / offline[0])
    assert any(f.endswith(".wandb") for f in files)
