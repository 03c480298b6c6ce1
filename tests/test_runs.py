"""Self-describing run folders: summary.json (API and CLI), `trainval runs`, load_model, standardisation,
the learning-rate columns and panel."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import make_blobs, run_cli, tiny_mlp
from trainval import Trainer, load_model
from trainval.app import preprocess, runs
from trainval.errors import ConfigError

COMMON = ["model.name=mlp", "model.hidden=[32]", "train.progress=false", "train.batch_size=128"]


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_api_run_writes_summary_lr_of_every_group_and_test_metrics(tmp_path):
    X, y = make_blobs(n=90)
    model = tiny_mlp()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                           {"params": model[2].parameters(), "lr": 0.01}], momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    trainer = Trainer(model, opt, max_epochs=3, out_dir=str(tmp_path / "api"), progress=False, scheduler=sched,
                      batch_size=32, seed=3)
    trainer.fit((X[:60], y[:60]), (X[60:], y[60:]))
    folder = tmp_path / "api"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 3 and summary["max_epochs"] == 3
    assert summary["monitor"] == "val_acc" and summary["best_epoch"] == trainer.best_epoch
    assert summary["best_value"] == trainer.best_value and summary["train_samples"] == 60 and summary["val_samples"] == 30
    assert summary["trainer"]["optimizer"] == "SGD" and summary["trainer"]["scheduler"] == "StepLR"
    assert summary["trainer"]["param_groups"] == 2 and summary["trainer"]["seed"] == 3
    assert summary["trainer"]["optimizer_args"]["momentum"] == 0.9 and summary["versions"]["torch"]
    assert summary["final"]["val_acc"] == trainer.history[-1]["val_acc"] and "test" not in summary

    rows = read_csv(folder / "metrics.csv")
    assert list(rows[0])[-3:] == ["lr", "lr_1", "seconds"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.025, 0.0125])
    assert [float(r["lr_1"]) for r in rows] == pytest.approx([0.01, 0.005, 0.0025])
    assert (folder / "curves.png").stat().st_size > 0

    metrics = trainer.test((X[60:], y[60:]))
    assert json.loads((folder / "summary.json").read_text())["test"] == metrics
    record = runs.find_runs(str(tmp_path))[0]
    assert record["name"] == "api" and record["status"] == "finished" and record["test"] == metrics

    with pytest.raises(ConfigError, match="records no model config"):
        load_model(str(folder))  # a Python API run: no config to rebuild the model from
    reloaded = load_model(str(folder), model=tiny_mlp(seed=99))
    assert not reloaded.training
    with torch.no_grad():
        assert torch.equal(reloaded(X[60:]).argmax(1), trainer.predict(X[60:]))


def test_plot_curves_lr_panel_is_drawn(tmp_path):
    from trainval.loop.callbacks import plot_curves

    history = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "lr": 0.1 / e, "lr_1": 0.01} for e in (1, 2, 3)]
    with_lr, without = tmp_path / "a.png", tmp_path / "b.png"
    plot_curves(str(with_lr), history, "val_loss", 3)
    plot_curves(str(without), [{k: v for k, v in r.items() if not k.startswith("lr")} for r in history], "val_loss", 3)
    import matplotlib.image

    # one panel (loss) without learning rates; two side by side with them
    assert matplotlib.image.imread(str(with_lr)).shape[1] > 1.5 * matplotlib.image.imread(str(without)).shape[1]


def _runs_json(folder) -> dict:
    proc = run_cli("runs", str(folder), "--format", "json", check=True)
    return {r["name"]: r for r in json.loads(proc.stdout)}


def test_cli_runs_table_sort_plot_and_running_then_killed(tmp_path):
    out = tmp_path / "runs"
    for name, epochs in (("small", 1), ("big", 2)):
        run_cli("fit", *COMMON, f"train.epochs={epochs}", f"run.name={name}", f"run.out_dir={out}", check=True)
    for name in ("small", "big"):
        cfg = (out / name / "config.yaml").read_text()
        assert "resolved:" in cfg and (out / name / runs.runfolder.MARKER).exists()
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["test"]["test_acc"] > 0 and summary["wall_seconds"] > 0

    # a live run: its folder's lock says so; once killed (no chance to write anything), it is interrupted
    proc = subprocess.Popen([sys.executable, "-m", "trainval", "fit", *COMMON, "train.epochs=500", "run.name=live",
                             f"run.out_dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        metrics = out / "live" / "metrics.csv"  # more epochs than "big" (2), for the sort by epochs below
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 4):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.2)
        listed = _runs_json(out)
        assert listed["live"]["status"] == "running" and listed["small"]["status"] == "finished"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads((out / "live" / "summary.json").read_text())["status"] == "running"  # what the file says
    listed = _runs_json(out)
    assert listed["live"]["status"] == "interrupted" and listed["live"]["max_epochs"] == 500

    table = run_cli("runs", str(out), "--sort", "best", check=True).stdout.splitlines()
    assert table[0].split()[:4] == ["run", "status", "epochs", "monitor"]
    names = [line.split()[0] for line in table[1:]]
    best = sorted(listed.values(), key=lambda r: -r["best_value"])
    assert names == [r["name"] for r in best]
    by_epochs = run_cli("runs", str(out), "--sort", "epochs", "--reverse", check=True).stdout.splitlines()
    assert by_epochs[1].split()[0] == "live" and by_epochs[-1].split()[0] == "small"
    bad = run_cli("runs", str(out), "--sort", "nonsense")
    assert bad.returncode == 2 and bad.stderr.startswith("trainval: error: --sort nonsense") and "test_acc" in bad.stderr

    plotted = run_cli("runs", str(out), "--plot", check=True)
    assert f"wrote {out / 'runs.png'}" in plotted.stdout and (out / "runs.png").stat().st_size > 1000
    run_cli("runs", str(out), "--plot", check=True)  # its own plot: replaced
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"not trainval's")
    refused = run_cli("runs", str(out), "--plot", str(foreign))
    assert refused.returncode == 2 and "not written by" in refused.stderr and foreign.read_bytes() == b"not trainval's"


def test_interrupted_by_sigint_is_listed_as_interrupted(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "trainval", "fit", *COMMON, "train.epochs=500", "run.name=stopped",
                             f"run.out_dir={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "stopped" / "metrics.csv").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGINT" in err
    record = runs.find_runs(str(out))[0]
    assert record["status"] == "interrupted" and 1 <= record["epochs"] < 500


def test_predict_from_the_run_folder_alone_with_standardisation_equals_load_model(tmp_path):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = (X * 40 + 300).astype(np.float32)  # far from standardised: the statistics matter
    train, new = tmp_path / "train.npz", tmp_path / "new.npz"
    np.savez(train, x=X[:1500], y=y[:1500])
    np.savez(new, x=X[1500:])
    out = tmp_path / "runs"
    run_cli("fit", *COMMON, "data.source=npz", f"data.train={train}", "data.standardize=true", "train.epochs=2",
            "run.name=std", f"run.out_dir={out}", check=True)
    folder = out / "std"
    stats = json.loads((folder / "standardize.json").read_text())
    assert stats["shape"] == [64] and stats["samples"] < 1500  # fitted on the training split only
    assert not (folder / "standardize.pkl").exists()
    other = tmp_path / "other.npz"
    np.savez(other, x=X[:1500] * 2, y=y[:1500])
    refused = run_cli("fit", *COMMON, "data.source=npz", f"data.train={other}", "data.standardize=true",
                      "run.name=std", f"run.out_dir={out}")
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert json.loads((folder / "standardize.json").read_text()) == stats  # a refused fit leaves the run alone
    os.remove(train)  # the training file is needed to train, not to predict

    preds = tmp_path / "preds.csv"
    run_cli("predict", str(folder), f"data.test={new}", "--out", str(preds), check=True)
    classes = np.array([int(r["Class"]) for r in read_csv(preds)])
    assert len(classes) == len(X) - 1500

    model = load_model(str(folder))
    assert not model.training and next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        logits = model(torch.from_numpy(preprocess.apply(stats, X[1500:])))
        raw = model(torch.from_numpy(X[1500:]))
    assert np.array_equal(logits.argmax(1).numpy(), classes)
    assert not np.array_equal(raw.argmax(1).numpy(), classes)  # control: without the statistics they differ
    assert (classes == y[1500:]).mean() > 0.3  # learnt something (chance: 0.1)

    labelled = tmp_path / "labelled.npz"
    np.savez(labelled, x=X[1500:], y=y[1500:])
    tested = run_cli("test", str(folder), f"data.test={labelled}", check=True)
    scored = json.loads((folder / "test.json").read_text())
    assert scored["test_acc"] == pytest.approx((classes == y[1500:]).mean()) and "Test Acc" in tested.stdout
    assert json.loads((folder / "summary.json").read_text())["test"]["test_acc"] == scored["test_acc"]

    os.remove(folder / "standardize.json")
    missing = run_cli("predict", str(folder), f"data.test={new}", "--out", str(preds))
    assert missing.returncode == 2 and "standardize.json does not exist" in missing.stderr


def test_load_model_imports_code_only_when_trusted(tmp_path):
    planted = tmp_path / "planted_module.py"
    flag = tmp_path / "imported"
    planted.write_text(f"open({str(flag)!r}, 'w').close()\n"
                       "import torch\n"
                       "class Net(torch.nn.Sequential):\n"
                       "    def __init__(self, in_features, num_classes):\n"
                       "        super().__init__(torch.nn.Flatten(), torch.nn.Linear(in_features, num_classes))\n")
    out = tmp_path / "runs"
    run_cli("fit", "model.name=planted_module:Net", "train.epochs=1", "train.progress=false", "run.name=r",
            f"run.out_dir={out}", env={"PYTHONPATH": str(tmp_path)}, check=True)
    folder = out / "r"
    os.remove(flag)  # fit imported it (the user's own code)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="trust_code=True"):
            load_model(str(folder))
        assert not flag.exists()
        model = load_model(str(folder), trust_code=True)
        assert flag.exists() and type(model).__name__ == "Net" and not model.training  # control: trusted, it runs
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("planted_module", None)
    os.remove(flag)
    refused = run_cli("predict", str(folder), cwd=str(tmp_path), env={"PYTHONPATH": str(tmp_path)})
    assert refused.returncode == 2 and "--trust-code" in refused.stderr and not flag.exists()

    # a config.yaml edited to name other code than its checkpoint recorded: compared, refused, not imported
    text = (folder / "config.yaml").read_text().replace("planted_module:Net", "planted_module:Other")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(Exception, match="another model"):
        load_model(str(folder), trust_code=True)
    assert not flag.exists()
