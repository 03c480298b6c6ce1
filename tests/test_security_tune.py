"""Issue 18, `trainval tune` and trackers: a bad --storage URL, searches tune would ignore or resolve
silently, a SIGKILLed trial left `running`, an unreachable MLflow server. Every case is one line, fast."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli
from trainval.errors import ConfigError

optuna = pytest.importorskip("optuna")

FIXED = ["model.name=mlp", "model.hidden=[16]", "train.epochs=1", "train.batch_size=256"]
SPACE = {"optim.lr": "loguniform(1e-4,1e-2)"}


def _table(stdout: str) -> dict[int, str]:
    """The trials table that `trainval tune` prints: trial number -> state."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^(\d+)(?: \*)?\s+(\w+)\s", stdout, re.MULTILINE)}


# 1. --storage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, words", [
    ("notaurl", "not a database URL"),
    ("foo://bar", "unknown database kind 'foo'"),
    ("sqlite:///{tmp}/no/such/dir/x.db", "cannot open the database"),
    ("postgresql://u:s3cret@127.0.0.1:1/db", "driver"),  # psycopg2 is not installed here
    ("mysql+pymysql://u:s3cret@127.0.0.1:1/db", "driver"),
])
def test_a_bad_storage_url_is_one_config_error_naming_it(tmp_path, url, words):
    import trainval

    url = url.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as raised:
        trainval.tune(None, [*FIXED, f"run.out_dir={tmp_path}"], SPACE, trials=1, storage=url)
    message = str(raised.value)
    assert message.startswith("--storage ") and words in message and "\n" not in message
    assert "s3cret" not in message  # a password in the URL is not printed
    assert url.split("://")[0] in message
    assert not (tmp_path / "digits").exists()  # refused before the tuning folder is made


def test_a_refused_database_port_is_one_line(tmp_path):
    pytest.importorskip("psycopg2")  # only where a PostgreSQL driver is installed; loopback, closed port
    import trainval

    with pytest.raises(ConfigError, match="--storage .*cannot connect"):
        trainval.tune(None, [*FIXED, f"run.out_dir={tmp_path}"], SPACE, trials=1,
                      storage="postgresql://u@127.0.0.1:1/db")


def test_cli_bad_storage_is_one_line_without_traceback(tmp_path):
    long = "foo://" + "\x1b[2J" + "x" * 5000
    bad = run_cli("tune", "--trials", "1", "optim.lr=loguniform(1e-4,1e-2)", f"run.out_dir={tmp_path}",
                  "--storage", long)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("trainval: error: --storage ")
    assert "\x1b" not in bad.stderr and len(bad.stderr) < 1000  # the value bounded and terminal-safe


# 2. searches tune would ignore, or resolve one way silently ------------------------------------------------


@pytest.mark.parametrize("key, value", [("run.name", "choice(a,b)"), ("run.out_dir", "choice(x,y)"),
                                        ("run.overwrite", "choice(true,false)")])
def test_a_search_on_a_key_tune_sets_itself_is_refused(tmp_path, key, value):
    import trainval

    with pytest.raises(ConfigError, match=f"cannot search {re.escape(key)}"):
        trainval.tune(None, [*FIXED, f"run.out_dir={tmp_path}"], {key: value, **SPACE}, trials=1)
    assert not os.listdir(tmp_path)


def test_a_fixed_value_and_a_search_on_one_key_are_refused(tmp_path):
    import trainval

    with pytest.raises(ConfigError, match=r"optim\.lr is given both as a fixed value \(optim\.lr=0\.1\) and as "
                                          r"a search"):
        trainval.tune(None, [*FIXED, f"run.out_dir={tmp_path}", "optim.lr=0.1"], SPACE, trials=1)
    assert not os.listdir(tmp_path)
    # the CLI: one line naming the key
    bad = run_cli("tune", "--trials", "1", "optim.lr=0.1", "optim.lr=loguniform(1e-4,1e-2)", f"run.out_dir={tmp_path}")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "optim.lr" in bad.stderr
    assert not os.listdir(tmp_path)


def test_the_same_key_searched_twice_is_refused():
    from trainval.app.tuning import split_arguments

    with pytest.raises(ConfigError, match=r"optim\.lr is searched twice"):
        split_arguments(["optim.lr=uniform(0.1,0.2)", "optim.lr=loguniform(1e-4,1e-2)"])
    # the control: two different keys
    assert split_arguments(["optim.lr=uniform(0.1,0.2)", "model.dropout=uniform(0,0.5)"])[2] == {
        "optim.lr": "uniform(0.1,0.2)", "model.dropout": "uniform(0,0.5)"}


# 3. a SIGKILLed trial ------------------------------------------------------------------------------------


SLOW_MODEL = """import time
from torch import nn


class Slow(nn.Module):  # a trial that stays in its first epochs long enough to be killed
    def __init__(self, in_features, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))

    def forward(self, x):
        if self.training:
            time.sleep(0.3)
        return self.net(x)
"""


def test_a_sigkilled_trial_is_marked_failed_and_the_study_continues(tmp_path):
    from trainval.app.tuning import fail_abandoned_trials

    storage = "sqlite:///" + str(tmp_path / "s" / "study.db")
    (tmp_path / "slow_flat.py").write_text(SLOW_MODEL)
    common = [f"run.out_dir={tmp_path}", "run.name=s", "--pruner", "none", "optim.lr=loguniform(1e-4,1e-2)",
              "train.batch_size=256"]
    quick = [*common, "train.epochs=1", "model.name=mlp", "model.hidden=[16]"]
    slow = subprocess.Popen([sys.executable, "-m", "trainval", "tune", "--trials", "1", *common, "train.epochs=1000",
                             "model.name=slow_flat:Slow"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        metrics = tmp_path / "s" / "trials" / "0000" / "metrics.csv"
        deadline = time.monotonic() + 60
        while not metrics.exists():  # trial 0 is training
            assert slow.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # the control: while its worker lives, the check leaves trial 0 running
        assert fail_abandoned_trials(optuna.load_study(study_name="s", storage=storage)) == []
        assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["RUNNING"]
        assert slow.poll() is None
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    again = run_cli("tune", "--trials", "1", *quick, check=True)
    assert "trial 0: its worker is gone" in again.stdout
    assert _table(again.stdout) == {0: "fail", 1: "complete"}  # and the study goes on
    assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials] == ["FAIL", "COMPLETE"]


# 4. trackers ---------------------------------------------------------------------------------------------


def test_an_unreachable_mlflow_server_is_refused_fast_naming_the_key(tmp_path):
    pytest.importorskip("mlflow")
    started = time.monotonic()
    bad = run_cli("fit", *FIXED, f"run.out_dir={tmp_path}", "train.progress=false", "log.mlflow=true",
                  "log.mlflow_uri=http://127.0.0.1:9", timeout=120)  # a closed loopback port
    assert time.monotonic() - started < 30  # today: 4 minutes of retries
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "log.mlflow_uri" in bad.stderr and "http://127.0.0.1:9" in bad.stderr
    assert "epoch" not in bad.stdout.lower()  # before training
    assert not (tmp_path / "digits" / "best.pt").exists()


def test_the_mlflow_check_refuses_only_what_does_not_answer():
    import socket

    from trainval.loop.trackers import check_reachable

    hint = "start the MLflow server"
    with pytest.raises(ConfigError, match="log.mlflow_uri http://127.0.0.1:9: cannot connect .*; start the"):
        check_reachable("http://127.0.0.1:9", "log.mlflow_uri", hint)
    with pytest.raises(ConfigError, match=r"http://u:\*\*\*@127.0.0.1:9/x: cannot connect") as raised:
        check_reachable("http://u:s3cret@127.0.0.1:9/x", "log.mlflow_uri", hint)
    assert "s3cret" not in str(raised.value)
    # a listener that answers anything (even not HTTP) is reachable; a non-HTTP URI is not checked
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}", "log.mlflow_uri", hint)
    check_reachable("sqlite:////tmp/x.db", "log.mlflow_uri", hint)
    check_reachable("databricks", "log.mlflow_uri", hint)


def test_wandb_online_with_an_unreachable_server_is_refused_fast(tmp_path):
    pytest.importorskip("wandb")
    # W&B's server address set to a closed loopback port: nothing leaves this machine
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "x" * 40, "WANDB_DIR": str(tmp_path),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_MODE": "online"}
    started = time.monotonic()
    bad = run_cli("fit", *FIXED, f"run.out_dir={tmp_path}", "train.progress=false", "log.wandb=true",
                  "log.wandb_mode=online", env=env, timeout=200)
    assert time.monotonic() - started < 30  # today: 2 minutes of retries
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "the W&B server http://127.0.0.1:9: cannot connect" in bad.stderr and "offline" in bad.stderr
    assert not (tmp_path / "digits" / "best.pt").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
@pytest.mark.parametrize("store", ["fifo", "not a database"])
def test_an_mlflow_store_that_is_a_fifo_or_no_database_is_one_line(tmp_path, store):
    """The attacker round's T3/T4: a FIFO runs/mlflow.db stalled SQLite for minutes, then a traceback;
    a file that is no database gave sqlalchemy's traceback."""
    pytest.importorskip("mlflow")
    runs = tmp_path / "runs"
    runs.mkdir()
    if store == "fifo":
        os.mkfifo(runs / "mlflow.db")
    else:
        (runs / "mlflow.db").write_bytes(b"this is no SQLite database\n" * 100)
    proc = run_cli("fit", "model.name=mlp", "model.hidden=[8]", "train.epochs=1", "train.progress=false",
                   "log.plot=false", f"run.out_dir={runs}", "run.name=m", "log.mlflow=true", cwd=str(tmp_path),
                   timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "mlflow.db" in err and "Traceback" not in err, err
    assert ("FIFO" in err) == (store == "fifo"), err
    assert not (runs / "m" / "best.pt").exists()  # refused before training


def test_a_wandb_folder_linked_out_of_the_run_folder_is_refused(tmp_path):
    """The attacker round's T7: wandb.init(dir=run folder) wrote through a linked <run>/wandb."""
    pytest.importorskip("wandb")
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "runs" / "w"
    run.mkdir(parents=True)
    (run / ".trainval-run").write_text("{}")
    os.symlink(outside, run / "wandb")
    proc = run_cli("fit", "model.name=mlp", "model.hidden=[8]", "train.epochs=1", "train.progress=false",
                   "log.plot=false", f"run.out_dir={tmp_path / 'runs'}", "run.name=w", "log.wandb=true",
                   "log.wandb_mode=offline", cwd=str(tmp_path), timeout=120, env={"WANDB_SILENT": "true"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "wandb" in err and "symbolic link" in err, err
    assert os.listdir(outside) == []


def test_a_trial_between_its_fit_and_its_result_is_not_taken_for_abandoned(tmp_path):
    """A worker's fit releases the trial folder's lock a moment before Optuna records the result; another
    worker checking then must not mark the trial failed (its tell() would then fail: exit 1). Its live pid
    says it is not abandoned; a dead one (the control) does."""
    optuna = pytest.importorskip("optuna")
    import socket

    from trainval.app.tuning import fail_abandoned_trials

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name="s")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for number, pid in ((0, os.getpid()), (1, int(dead.stdout))):
        folder = tmp_path / f"trial{number}"
        folder.mkdir()  # not locked: the fit has ended, or its worker died
        trial = study.ask()
        for key, value in (("run_folder", str(folder)), ("host", socket.gethostname()), ("pid", pid)):
            trial.set_user_attr(key, value)
    assert fail_abandoned_trials(study) == [1]
    states = [t.state for t in study.get_trials()]
    assert states == [optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL]
