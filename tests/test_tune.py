"""`trainval tune` / `trainval.tune` on Optuna: trials as run folders, the sqlite study, pruning, best.yaml,
workers sharing one study."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import run_cli
from trainval.errors import ConfigError

optuna = pytest.importorskip("optuna")

FIXED = ["model.name=mlp", "model.hidden=[16]", "train.epochs=3", "train.batch_size=128"]
SPACE = {"optim.lr": "loguniform(1e-4, 3e-2)", "model.dropout": "uniform(0, 0.3)"}


def _storage(folder) -> str:
    return "sqlite:///" + os.path.join(str(folder), "study.db")


def test_tune_four_trials_best_yaml_reproduces_the_best_trial(tmp_path, capsys):
    import trainval

    result = trainval.tune(None, [*FIXED, f"run.out_dir={tmp_path}", "run.name=search"], SPACE, trials=4)
    folder = tmp_path / "search"
    study = optuna.load_study(study_name="search", storage=_storage(folder))
    states = [t.state for t in study.trials]
    assert len(states) == 4 and set(states) <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert {t.number for t in study.trials} == {0, 1, 2, 3}
    for t in study.trials:  # every trial an ordinary run folder with its own summary
        summary = json.loads((folder / "trials" / f"{t.number:04d}" / "summary.json").read_text())
        assert summary["status"] == "finished"
        assert summary["trainer"]["optimizer_args"]["lr"] == pytest.approx(t.params["optim.lr"])
        if t.state == optuna.trial.TrialState.PRUNED:  # Optuna records a pruned trial's last reported value
            assert summary["epochs"] < 3 and summary["pruned"] is True  # never pruned at the last epoch
            assert "test" not in summary and not (folder / "trials" / f"{t.number:04d}" / "predictions.csv").exists()
            assert summary["best_value"] == max(t.intermediate_values.values())  # val_acc: the best is the max
        else:
            assert summary["best_value"] == t.value
    out = capsys.readouterr().out
    best = study.best_trial  # the table: one row per trial, in order, the best one (any of them) starred
    rows = [line.split()[:2] for line in out.splitlines() if re.match(r"^\d+( \*)?\s", line)]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert [r[0] for r in rows if r[1] == "*"] == [str(best.number)]
    assert "best trial written to" in out
    assert result["best_yaml"] == str(folder / "best.yaml") and len(result["trials"]) == 4

    text = (folder / "best.yaml").read_text()
    assert text.startswith(f"# trainval tune: trial {best.number} ")
    fit = run_cli("fit", str(folder / "best.yaml"), "train.progress=false", cwd=str(tmp_path), check=True)
    rerun = tmp_path / "search-best"
    summary = json.loads((rerun / "summary.json").read_text())
    trial_summary = json.loads((folder / "trials" / f"{best.number:04d}" / "summary.json").read_text())
    assert summary["best_value"] == best.value and summary["best_epoch"] == trial_summary["best_epoch"]
    assert summary["test"] == trial_summary["test"] and "Test Acc" in fit.stdout

    # the runs table lists the trials and the refit
    listed = json.loads(run_cli("runs", str(tmp_path), "--format", "json", check=True).stdout)
    assert sorted(r["name"] for r in listed) == ["search-best", *(f"search/trials/{n:04d}" for n in range(4))]
    statuses = {r["name"]: r["status"] for r in listed}
    for t in study.trials:
        pruned = t.state == optuna.trial.TrialState.PRUNED
        assert statuses[f"search/trials/{t.number:04d}"] == ("pruned" if pruned else "finished")


@pytest.mark.slow
def test_two_workers_share_one_study_and_a_rerun_continues_it(tmp_path):
    args = [sys.executable, "-m", "trainval", "tune", "--trials", "2", *FIXED, f"run.out_dir={tmp_path}",
            "run.name=shared", "optim.lr=loguniform(1e-4,3e-2)", "--pruner", "none"]
    workers = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=300) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    folder = tmp_path / "shared"
    study = optuna.load_study(study_name="shared", storage=_storage(folder))
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert sorted(os.listdir(folder / "trials")) == ["0000", "0001", "0002", "0003"]
    # each worker ran two of them
    ran = [sorted(int(line.split()[1].rstrip(":")) for line in out.splitlines() if line.startswith("trial ") and ":" in line.split()[1])
           for out, _ in outputs]
    assert sorted(ran[0] + ran[1]) == [0, 1, 2, 3] and all(len(r) == 2 for r in ran)

    again = run_cli("tune", "--trials", "1", *FIXED, f"run.out_dir={tmp_path}", "run.name=shared",
                    "optim.lr=loguniform(1e-4,3e-2)", check=True)
    assert "trial 4:" in again.stdout
    assert len(optuna.load_study(study_name="shared", storage=_storage(folder)).trials) == 5


@pytest.mark.parametrize("space, words", [
    ({"optim.lrr": "uniform(0,1)"}, "unknown key 'optim.lrr'"),
    ({"optim.lr": "uniform(1,0)"}, "low end must be below the high end"),
    ({"optim.lr": "loguniform(0,1)"}, "needs 0 < a < b"),
    ({"train.epochs": "int(0,3)"}, "train.epochs must be at least 1"),
    ({"optim.name": "choice(adam,rmsprop)"}, "optim.name must be one of"),
    ({}, "nothing to search"),
])
def test_bad_search_spaces_are_config_errors(tmp_path, space, words):
    import trainval

    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        trainval.tune(None, [f"run.out_dir={tmp_path}"], space, trials=1)
    assert not (tmp_path / "digits").exists()  # refused before anything was written


def test_cli_tune_errors_are_one_line(tmp_path):
    bad = run_cli("tune", "--trials", "2", "optim.lr=normal(0,1)", f"run.out_dir={tmp_path}")
    assert bad.returncode == 2 and "unknown search space normal(...)" in bad.stderr
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "notes.txt").write_text("mine")
    taken = run_cli("tune", "--trials", "1", "optim.lr=uniform(0.001,0.01)", f"run.out_dir={tmp_path}")
    assert taken.returncode == 2 and "was not made by `trainval tune`" in taken.stderr
    assert taken.stderr.count("\n") == 1


@pytest.mark.parametrize("pruner, epochs, max_epochs", [("threshold", 1, 4), ("none", 4, 4), ("threshold", 1, 1)])
def test_pruning_callback_stops_the_fit_when_the_pruner_says_so(tmp_path, pruner, epochs, max_epochs):
    from tests.conftest import make_blobs, tiny_mlp
    from trainval import Trainer
    from trainval.app.tuning import PruningCallback

    # a threshold no accuracy reaches prunes at the first report; the control never prunes
    chosen = optuna.pruners.ThresholdPruner(lower=1.5) if pruner == "threshold" else optuna.pruners.NopPruner()
    study = optuna.create_study(direction="maximize", pruner=chosen)
    trial = study.ask()
    callback = PruningCallback(trial)
    X, y = make_blobs(n=60)
    history = Trainer(tiny_mlp(), max_epochs=max_epochs, out_dir=str(tmp_path / "r"), progress=False,
                      callbacks=[callback]).fit((X[:40], y[:40]), (X[40:], y[40:]))
    # the last epoch is reported but never pruned: the trial has finished (1 of 1 epochs)
    assert len(history) == epochs and callback.pruned == (pruner == "threshold" and max_epochs > 1)
    reported = study.trials[0].intermediate_values
    assert sorted(reported) == list(range(1, epochs + 1))
    assert reported[epochs] == history[-1]["val_acc"]


@pytest.mark.parametrize("prune", [True, False])
def test_a_pruned_trial_skips_its_test_and_predictions(tmp_path, prune):
    from trainval.app import config, workflow
    from trainval.app.tuning import PruningCallback

    chosen = optuna.pruners.ThresholdPruner(lower=1.5) if prune else optuna.pruners.NopPruner()
    trial = optuna.create_study(direction="maximize", pruner=chosen).ask()
    cfg = config.load(None, [*FIXED, f"run.out_dir={tmp_path}", "run.name=t", "train.progress=false"])
    pruning = PruningCallback(trial)
    summary = workflow.fit(cfg, callbacks=[pruning], test_if=lambda: not pruning.pruned)
    assert pruning.pruned is prune and summary["epochs"] == (1 if prune else 3)
    assert ("test" in summary) is (not prune)  # the control tests and predicts as every fit does
    assert (tmp_path / "t" / "predictions.csv").exists() is (not prune)
    assert (tmp_path / "t" / "best.pt").exists()  # the pruned run folder keeps what it trained
