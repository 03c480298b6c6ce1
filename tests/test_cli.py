"""The command line, run as a real subprocess: fit -> test -> predict, resume, and bad configs."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, run_cli

from trainval.app import config

HELPERS = os.path.join(REPO, "tests", "helpers")


def gen(script, *args):
    subprocess.run([sys.executable, os.path.join(REPO, "examples", script), *args], check=True, capture_output=True)


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_version_and_help():
    from trainval import __version__

    v = run_cli("--version", check=True)
    assert v.stdout.strip() == f"trainval {__version__}"
    h = run_cli("fit", "--help", check=True)
    assert "examples:" in h.stdout and "--resume" in h.stdout and "--nproc" in h.stdout
    for cmd in ("test", "predict"):
        assert "examples:" in run_cli(cmd, "--help", check=True).stdout


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("trainval", path=os.path.dirname(sys.executable))
    assert exe, "the trainval console script is not installed beside this Python"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("trainval ")
    # like `python -m trainval`, the console script imports factories and models from the current folder
    shutil.copy(os.path.join(HELPERS, "user_factory.py"), tmp_path / "my_factory.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fit = subprocess.run([exe, "fit", "data.source=factory", "data.factory=my_factory:arrays", "model.name=mlp",
                          "train.epochs=1", f"run.out_dir={tmp_path}/runs", "train.progress=false"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert fit.returncode == 0, fit.stderr
    assert "Test Acc:" in fit.stdout


@pytest.mark.slow
def test_npz_fit_predict_and_unlabelled_test(tmp_path):
    data = tmp_path / "data"
    gen("make_phoneme_data.py", "--out", str(data), "--train", "1500", "--test", "200")
    common = [os.path.join(REPO, "examples", "phoneme_mlp.yaml"), f"data.train={data}/phoneme_train.npz",
              f"data.test={data}/phoneme_test.npz", f"run.out_dir={tmp_path}/runs", "train.epochs=2",
              "model.hidden=[64]", "train.batch_size=128"]
    fit = run_cli("fit", *common, cwd=str(tmp_path), check=True)
    assert "[002/002]" in fit.stdout and "wrote 200 predictions" in fit.stdout
    run = tmp_path / "runs" / "phoneme_mlp"
    for name in ("config.yaml", "best.pt", "last.pt", "metrics.csv", "curves.png", "summary.json", "predictions.csv"):
        assert (run / name).exists(), name
    rows = read_csv(run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    resolved = config.load(str(run / "config.yaml"))
    assert resolved["model"]["hidden"] == [64]
    assert "versions:" in (run / "config.yaml").read_text() and "torch:" in (run / "config.yaml").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] in (1, 2) and summary["train_samples_per_second"] > 0 and "test" not in summary

    refused = run_cli("test", *common, cwd=str(tmp_path))
    assert refused.returncode == 1 and "has no labels" in refused.stderr and "trainval predict" in refused.stderr

    out = tmp_path / "preds.csv"
    pred = run_cli("predict", *common, "--proba", "--out", str(out), cwd=str(tmp_path), check=True)
    assert "wrote 200 predictions" in pred.stdout
    rows = read_csv(out)
    assert list(rows[0])[:2] == ["Id", "Class"] and len(rows[0]) == 2 + 39 and len(rows) == 200
    assert abs(sum(float(rows[0][f"prob_{c}"]) for c in range(39)) - 1) < 1e-3
    assert all(int(r["Class"]) == max(range(39), key=lambda c: float(r[f"prob_{c}"])) for r in rows[:20])

    missing = run_cli("predict", *common, "--out", str(tmp_path / "nope" / "p.csv"), cwd=str(tmp_path))
    assert missing.returncode == 2 and "nope" in missing.stderr and "does not exist" in missing.stderr


@pytest.mark.slow
def test_csv_fit_test_predict_and_resume(tmp_path):
    csv_path = tmp_path / "tab.csv"
    gen("make_tabular_csv.py", "--out", str(csv_path), "--rows", "400")
    common = [os.path.join(REPO, "examples", "tabular.csv.yaml"), f"data.train={csv_path}", f"run.out_dir={tmp_path}/runs"]
    fit = run_cli("fit", *common, "train.epochs=2", "scheduler.name=step", cwd=str(tmp_path), check=True)
    assert "Test Acc: " in fit.stdout
    run = tmp_path / "runs" / "tabular"
    assert len(read_csv(run / "metrics.csv")) == 2

    resumed = run_cli("fit", *common, "train.epochs=4", "scheduler.name=step", "--resume", cwd=str(tmp_path), check=True)
    assert "resuming from" in resumed.stdout and "[003/004]" in resumed.stdout and "[001/004]" not in resumed.stdout
    rows = read_csv(run / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]

    test = run_cli("test", *common, "--ckpt", "last", cwd=str(tmp_path), check=True)
    assert "Test Acc: " in test.stdout and "last.pt" in test.stdout
    saved = json.loads((run / "test.json").read_text())
    assert 0 <= saved["test_acc"] <= 1 and saved["checkpoint"].endswith("last.pt")
    assert json.loads((run / "summary.json").read_text())["test"]["test_acc"] == saved["test_acc"]

    pred = run_cli("predict", *common, cwd=str(tmp_path), check=True)
    rows = read_csv(run / "predictions.csv")
    assert list(rows[0]) == ["Id", "Class"] and len(rows) == 61 and "wrote 61 predictions" in pred.stdout  # 15% of 400

    # a new file's columns are taken by name, as fit recorded them: another order gives the same predictions
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    assert "features" in (run / "config.yaml").read_text()
    (tmp_path / "reversed.csv").write_text("\n".join(",".join(line.split(",")[::-1]) for line in lines) + "\n")
    outs = {}
    for name in ("tab.csv", "reversed.csv"):
        run_cli("predict", *common, f"data.test={tmp_path / name}", "--out", str(tmp_path / f"p-{name}"),
                cwd=str(tmp_path), check=True)
        outs[name] = read_csv(tmp_path / f"p-{name}")
    assert outs["tab.csv"] == outs["reversed.csv"] and len(outs["tab.csv"]) == 400
    (tmp_path / "renamed.csv").write_text("\n".join([",".join(f"x{i}" for i in range(len(header))), *lines[1:]]) + "\n")
    proc = run_cli("predict", *common, f"data.test={tmp_path / 'renamed.csv'}", "--out", str(tmp_path / "p.csv"),
                   cwd=str(tmp_path))
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.startswith("trainval: error: ") and len(err.splitlines()) == 1, err
    assert f"feature columns not found: {header[0]}" in err and not (tmp_path / "p.csv").exists()
    proc = run_cli("test", *common, "--ckpt", "nope.pt", cwd=str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "trainval: error: checkpoint not found: nope.pt (--ckpt takes best, last or the path of a .pt file).")


def test_factory_data_and_user_model(tmp_path):
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["data.source=factory", "data.factory=user_factory:arrays", "model.name=user_factory:TinyNet",
              "model.kwargs={width: 12}", f"run.out_dir={tmp_path}", "run.name=f", "train.epochs=2"]
    proc = run_cli("fit", *common, cwd=str(tmp_path), env=env, check=True)
    assert "Test Acc:" in proc.stdout
    # Datasets cannot size a built-in model; a module:Class model that knows its sizes trains on them
    ds = run_cli("fit", *common[:1], "data.factory=user_factory:blobs", "model.name=mlp", "run.name=g",
                 f"run.out_dir={tmp_path}", cwd=str(tmp_path), env=env)
    assert ds.returncode == 2 and "'module:Class' model" in ds.stderr
    ok = run_cli("fit", *common[:1], "data.factory=user_factory:blobs", common[2],
                 "model.kwargs={width: 12, in_features: 5, num_classes: 3}", "scheduler.name=onecycle",
                 f"run.out_dir={tmp_path}", "run.name=h", "train.epochs=2", cwd=str(tmp_path), env=env, check=True)
    assert "Test Acc:" in ok.stdout and "wrote 30 predictions" in ok.stdout
    with open(tmp_path / "h" / "summary.json") as f:
        assert json.load(f)["train_samples"] == 90  # the Dataset's samples, not len((train, val))
    broken = run_cli("fit", "data.source=factory", "data.factory=user_factory:broken", cwd=str(tmp_path), env=env)
    assert broken.returncode == 2 and "the database is down" in broken.stderr


BAD_CONFIGS = [
    (["train.epoch=5"], "unknown key 'train.epoch' (did you mean 'train.epochs'?)"),
    (["optimizer.lr=0.1"], "unknown key 'optimizer.lr' (did you mean 'optim.lr'?)"),
    (["train.epochs=abc"], "train.epochs must be an integer, got 'abc'"),
    (["train.epochs=0"], "train.epochs must be at least 1, got 0"),
    (["optim.lr=-1"], "optim.lr must be at least 0, got -1"),
    (["optim.name=rmsprop"], "optim.name must be one of sgd, adam, adamw, got 'rmsprop'"),
    (["train.precision=fp8"], "train.precision must be one of fp32, bf16, fp16"),
    (["data.val_split=2"], "data.val_split must be at most 0.9, got 2"),
    (["model.hidden=[a, b]"], "model.hidden must be a list of ints"),
    (["nokey"], "config file not found: nokey"),
    (["missing.yaml"], "config file not found: missing.yaml"),
    (["data.source=npz", "data.train=nope.npz"], "data file not found: nope.npz"),
    (["data.source=npz"], "data.train (the training file) is not set"),
    (["model.name=nosuchmodule_xyz:Net"], "model.name 'nosuchmodule_xyz:Net': cannot import module 'nosuchmodule_xyz' (ModuleNotFoundError"),
    (["model.name=json:Nope"], "model.name 'json:Nope': module 'json' has no attribute 'Nope'"),
    (["model.name=mlpp"], "model.name must be one of mlp, cnn, or a 'module:Class' import string, got 'mlpp'"),
    (["train.monitor=val_acc", "data.val_split=0"], "no validation data"),
    (["train.device=cuda:0"] if not __import__("torch").cuda.is_available() else ["train.device=tpu"], "device"),
]


@pytest.mark.parametrize("args, words", BAD_CONFIGS, ids=[" ".join(a) for a, _ in BAD_CONFIGS])
def test_bad_config_is_one_clear_line_with_exit_2(tmp_path, args, words):
    proc = run_cli("fit", *args, "train.epochs=1", cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trainval: error: "), err
    assert words in err, err
    assert "Traceback" not in proc.stderr


def test_bad_yaml_files(tmp_path):
    cases = {
        "syntax.yaml": ("train:\n  epochs: [1, 2\n", "not valid YAML at line"),
        "unknown.yaml": ("train:\n  epochz: 3\n", "unknown.yaml: unknown key 'train.epochz' (did you mean 'train.epochs'?)"),
        "section.yaml": ("trian:\n  epochs: 3\n", "unknown key 'trian.epochs' (did you mean 'train.epochs'?)"),
        "notmap.yaml": ("train: 5\n", "section 'train' must be a mapping"),
        "toplist.yaml": ("- 1\n- 2\n", "the top level must be a mapping"),
    }
    for name, (text, words) in cases.items():
        (tmp_path / name).write_text(text)
        proc = run_cli("fit", name, cwd=str(tmp_path))
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr)


def test_bad_data_files_exit_1_naming_row_and_column(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n" + "1,1,0\n" * 20)
    proc = run_cli("fit", "data.source=csv", "data.train=bad.csv", "model.name=mlp", cwd=str(tmp_path))
    assert proc.returncode == 1 and "bad.csv: row 3, column 'b': 'oops' is not a number" in proc.stderr
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n")
    proc = run_cli("fit", "data.source=csv", "data.train=nolabel.csv", "model.name=mlp", cwd=str(tmp_path))
    assert proc.returncode == 1 and "no label column 'label'" in proc.stderr
    import numpy as np

    X = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    X[3, 1] = np.inf
    np.savez(tmp_path / "inf.npz", x=X, y=np.arange(60) % 2)
    proc = run_cli("fit", "data.source=npz", "data.train=inf.npz", "model.name=mlp", "data.test_split=0", cwd=str(tmp_path))
    assert proc.returncode == 1 and "NaN or Inf (first at row" in proc.stderr and "Traceback" not in proc.stderr


def test_cnn_on_feature_vectors_is_a_config_error(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((30, 4), np.float32), y=np.arange(30) % 2)
    proc = run_cli("fit", "data.source=npz", "data.train=d.npz", "model.name=cnn", cwd=str(tmp_path))
    assert proc.returncode == 2 and "Use model.name=mlp" in proc.stderr


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    run_cli("fit", "train.epochs=1", "log.tensorboard=true", "log.plot=false", f"run.out_dir={tmp_path}", check=True)
    tb = tmp_path / "digits" / "tb"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tb))


def test_progress_is_plain_lines_when_not_a_terminal():
    from conftest import make_blobs, tiny_mlp

    from trainval.loop.callbacks import ProgressBar

    X, y = make_blobs(n=64)
    stream = io.StringIO()
    bar = ProgressBar(line_s=0.0, stream=stream)
    import tempfile

    from trainval import Trainer

    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(tiny_mlp(), max_epochs=1, out_dir=d, batch_size=16, progress=False, plot=False, callbacks=[bar])
        tr.fit((X, y), (X, y))
    text = stream.getvalue()
    assert "\r" not in text and "epoch 1/1 batch 4/4 loss" in text


def test_readme_config_reference_matches_schema():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert config.reference_table() in readme, "regenerate the README table: python scripts/update_readme_table.py"


def test_examples_are_valid_configs():
    for name in ("digits.yaml", "phoneme_mlp.yaml", "tabular.csv.yaml", "regression.yaml"):
        config.load(os.path.join(REPO, "examples", name))


@pytest.mark.slow
def test_regression_example_fit_test_predict(tmp_path):
    """examples/regression.yaml: two CSV target columns, an MLP sized to them, metrics against scikit-learn."""
    from sklearn.metrics import r2_score

    csv_path = tmp_path / "diabetes.csv"
    gen("make_regression_csv.py", "--out", str(csv_path))
    common = [os.path.join(REPO, "examples", "regression.yaml"), f"data.train={csv_path}", f"run.out_dir={tmp_path}/runs",
              "train.epochs=5"]
    fit = run_cli("fit", *common, cwd=str(tmp_path), check=True)
    assert "Test mse:" in fit.stdout and "r2:" in fit.stdout and "wrote 67 predictions" in fit.stdout
    run = tmp_path / "runs" / "regression"
    rows = read_csv(run / "predictions.csv")
    assert list(rows[0]) == ["Id", "progression", "bmi"] and len(rows) == 67
    header = read_csv(run / "metrics.csv")[0]
    assert {"train_r2", "val_r2", "val_mse", "val_rmse", "val_mae"} <= set(header)
    test = run_cli("test", *common, cwd=str(tmp_path), check=True)
    result = json.loads((run / "test.json").read_text())
    # the test split is the seeded split of the same file: rebuild it and score predictions.csv with sklearn
    from trainval.app import config as cfg_mod
    from trainval.app.workflow import load_splits

    cfg = cfg_mod.load(common[0], [f"data.train={csv_path}"])
    truth = load_splits(cfg).test.y
    pred = np.array([[float(r["progression"]), float(r["bmi"])] for r in rows])
    assert result["test_r2"] == pytest.approx(r2_score(truth, pred), abs=1e-5)  # the CSV holds 8 digits
    assert "Test mse:" in test.stdout
    # predict replaces its own regression predictions.csv (Id,<target names>) without --force
    again = run_cli("predict", *common, cwd=str(tmp_path), check=True)
    assert "wrote 67 predictions" in again.stdout and read_csv(run / "predictions.csv") == rows


@pytest.mark.slow
def test_multilabel_csv_and_binary_npz(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 4))
    Y = (X[:, :3] + 0.3 * rng.normal(size=(300, 3)) > 0).astype(int)
    path = tmp_path / "ml.csv"
    with open(path, "w") as f:
        f.write("a,b,c,d,t0,t1,t2\n")
        for x, y in zip(X, Y):
            f.write(",".join(f"{v:.5f}" for v in x) + "," + ",".join(map(str, y)) + "\n")
    fit = run_cli("fit", "data.source=csv", f"data.train={path}", "data.label=[t0, t1, t2]", "task.name=multilabel",
                  "task.metrics=[f1_micro, f1_macro, exact_match]", "model.name=mlp", "model.hidden=[16]",
                  "train.epochs=3", f"run.out_dir={tmp_path}/runs", "run.name=ml", cwd=str(tmp_path), check=True)
    assert "Test f1_micro:" in fit.stdout
    rows = read_csv(tmp_path / "runs" / "ml" / "predictions.csv")
    assert list(rows[0]) == ["Id", "label_0", "label_1", "label_2"] and {rows[0]["label_0"]} <= {"0", "1"}
    # predict replaces its own multilabel predictions.csv without --force
    run_cli("predict", str(tmp_path / "runs" / "ml"), "--proba", cwd=str(tmp_path), check=True)
    again = read_csv(tmp_path / "runs" / "ml" / "predictions.csv")
    assert list(again[0]) == ["Id", "label_0", "label_1", "label_2", "prob_0", "prob_1", "prob_2"]
    assert [{k: r[k] for k in rows[0]} for r in again] == rows
    np.savez(tmp_path / "bin.npz", x=X.astype(np.float32), y=(X[:, 0] > 0).astype(np.float32))
    fit = run_cli("fit", "data.source=npz", f"data.train={tmp_path}/bin.npz", "task.name=binary",
                  "task.metrics=[acc, auroc]", "train.monitor=val_auroc", "model.name=mlp", "train.epochs=3",
                  f"run.out_dir={tmp_path}/runs", "run.name=bin", cwd=str(tmp_path), check=True)
    assert "Test Acc:" in fit.stdout and "auroc:" in fit.stdout
    pred = run_cli("predict", "data.source=npz", f"data.train={tmp_path}/bin.npz", "task.name=binary",
                   "model.name=mlp", f"run.out_dir={tmp_path}/runs", "run.name=bin", "--proba",
                   "--out", str(tmp_path / "p.csv"), cwd=str(tmp_path), check=True)
    rows = read_csv(tmp_path / "p.csv")
    assert list(rows[0]) == ["Id", "Class", "prob_1"] and (rows[0]["Class"] == "1") == (float(rows[0]["prob_1"]) > 0.5)
    assert "wrote 45 predictions" in pred.stdout
    np.savez(tmp_path / "wide.npz", x=np.zeros((5, 6), dtype=np.float32))  # 6 features, the model takes 4
    proc = run_cli("predict", str(tmp_path / "runs" / "bin"), f"data.test={tmp_path}/wide.npz", "--out",
                   str(tmp_path / "w.csv"), cwd=str(tmp_path))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"trainval: error: the test data ({tmp_path}/wide.npz) has samples of shape [6], but the run's model was "
        "trained on samples of shape [4] (config.yaml, resolved.in_shape); give data shaped like the training data."]


def test_bad_task_configs_are_one_line(tmp_path):
    cases = [
        (["task.name=ranking"], "task.name must be one of multiclass, binary, multilabel, regression"),
        (["task.metrics=[f1]"], "unknown metric 'f1' for task multiclass"),
        (["train.monitor=val_f1_macro"], "monitor 'val_f1_macro' is not a column of this run"),
        (["train.monitor=accuracy"], "train.monitor must be val_<metric>"),
        (["task.class_weights=[1, 2]"], "task.class_weights has 2 weights but the model has 10 classes"),
        (["task.loss=mse"], "loss MSELoss does not fit task 'multiclass'; use CrossEntropyLoss, NLLLoss"),
    ]
    for overrides, message in cases:
        proc = run_cli("fit", *overrides, "train.epochs=1", f"run.out_dir={tmp_path}", cwd=str(tmp_path))
        assert proc.returncode in (1, 2), (overrides, proc.stderr)
        assert message in proc.stderr, (overrides, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_text_example_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "text_classifier.py"), "--epochs", "2",
                           "--out", str(tmp_path / "text")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Test F1 (macro):" in proc.stdout and (tmp_path / "text" / "best.pt").exists()


def test_launcher_flags_are_checked_in_one_line(tmp_path):
    cases = [(["--nnodes", "2", "--nproc", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
             (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1"], "--node-rank must be between 0 and 1"),
             (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts must be 0 or more")]
    for flags, message in cases:
        proc = run_cli("fit", *flags, cwd=str(tmp_path))
        assert proc.returncode == 2 and proc.stderr.startswith(f"trainval: error: {message}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was started or written


def test_flags_and_overrides_in_any_order(tmp_path, capsys):
    """`test CONFIG k=v --trust-code --ckpt last k2=v`: overrides after a flag count (argparse alone refused
    them: "unrecognized arguments: k2=v"), in the order given; unknown flags are still refused."""
    from trainval.app.cli import build_parser, parse_arguments

    args = parse_arguments(build_parser(), ["test", "cfg.yaml", "a=1", "--trust-code", "--ckpt", "last", "b=2"])
    assert (args.args, args.ckpt, args.trust_code) == (["cfg.yaml", "a=1", "b=2"], "last", True)
    args = parse_arguments(build_parser(), ["fit", "a=1", "--nproc", "2", "b=2", "--resume", "c=3"])
    assert (args.args, args.nproc, args.resume) == (["a=1", "b=2", "c=3"], 2, True)
    with pytest.raises(SystemExit) as refused:
        parse_arguments(build_parser(), ["test", "cfg.yaml", "--ckpt", "last", "b=2", "--bogus"])
    assert refused.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a command without overrides takes no extra positionals
        parse_arguments(build_parser(), ["runs", "runs", "--sort", "name", "extra"])

    csv_path = tmp_path / "tab.csv"
    gen("make_tabular_csv.py", "--out", str(csv_path), "--rows", "200")
    cfg = os.path.join(REPO, "examples", "tabular.csv.yaml")
    run_cli("fit", cfg, f"data.train={csv_path}", f"run.out_dir={tmp_path}/runs", "train.epochs=1",
            "train.progress=false", "log.plot=false", cwd=str(tmp_path), check=True)
    # run.out_dir comes after the flags: without it the run folder is not found
    test = run_cli("test", cfg, f"data.train={csv_path}", "--trust-code", "--ckpt", "last", f"run.out_dir={tmp_path}/runs",
                   cwd=str(tmp_path), check=True)
    assert "Test Acc: " in test.stdout and "last.pt" in test.stdout
    out = tmp_path / "preds.csv"
    base = ["predict", cfg, f"data.train={csv_path}", "--ckpt", "last", f"run.out_dir={tmp_path}/runs", "--out", str(out)]
    control = run_cli(*base, cwd=str(tmp_path), check=True)
    assert "wrote 31 predictions" in control.stdout  # 15% of 200, rounded up
    late = run_cli(*base, "data.test_split=0.3", "--proba", cwd=str(tmp_path), check=True)
    rows = read_csv(out)
    assert "wrote 61 predictions" in late.stdout and len(rows) == 61 and "prob_0" in rows[0], late.stdout
