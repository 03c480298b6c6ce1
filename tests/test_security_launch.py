"""Issue 18: the launcher's environment variables and the run-folder lock. Each variable torchrun sets is
read and checked in one place (trainval.launch); a bad one is one line, never a traceback; a stray RANK
neither bypasses the folder lock nor breaks a single process; the rank outcome files are written and read
only where the launcher made them; a file system without locks is one clear error."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest
from conftest import run_cli
from test_security import csv_args, one_error_line

from trainval.app.cli import _rank_outcomes, remove_stale_outcome_folders
from trainval.errors import ConfigError, RunFolderError
from trainval.run import runfolder

TWO = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
# what torchrun's agent adds to its workers' environment
TORCHRUN = {"TORCHELASTIC_RUN_ID": "trainval", "TORCHELASTIC_RESTART_COUNT": "0"}


# ------------------------------------------------------------------------------------------------
# L1-L5, L8: one line naming the variable


@pytest.mark.parametrize(
    "env, named",
    [
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "abc"}, "WORLD_SIZE='abc'"),
        ({**TWO, "LOCAL_RANK": "abc"}, "LOCAL_RANK='abc'"),
        ({**TWO, "TRAINVAL_DIST_TIMEOUT": "abc"}, "TRAINVAL_DIST_TIMEOUT='abc'"),
        ({**TWO, "TRAINVAL_DIST_TIMEOUT": "nan"}, "TRAINVAL_DIST_TIMEOUT='nan'"),
        ({**TWO, "TRAINVAL_DIST_TIMEOUT": "-1"}, "TRAINVAL_DIST_TIMEOUT='-1'"),
        ({**TWO, "MASTER_ADDR": ""}, "MASTER_ADDR"),
        ({**TWO, "MASTER_PORT": "abc"}, "MASTER_PORT='abc'"),
        ({**TWO, "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "abc", "WORLD_SIZE": "1"}, "RANK='abc'"),
        (
            {
                "RANK": "0",
                "LOCAL_RANK": "0",
                "WORLD_SIZE": "1",
                **TORCHRUN,
                "TORCHELASTIC_RESTART_COUNT": "abc",
            },
            "TORCHELASTIC_RESTART_COUNT='abc'",
        ),
    ],
    ids=[
        "world_size",
        "local_rank",
        "timeout_abc",
        "timeout_nan",
        "timeout_negative",
        "no_master_addr",
        "master_port",
        "rank_too_big",
        "rank_abc",
        "restart_count",
    ],
)
def test_a_bad_launcher_variable_is_one_line_naming_it(tmp_path, env, named):
    proc = run_cli("fit", *csv_args(tmp_path), env=env, timeout=60)
    err = one_error_line(proc, 2)
    assert named in err and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "r" / "last.pt").exists()


def test_a_stray_restart_count_outside_torchrun_is_ignored(tmp_path):
    proc = run_cli("fit", *csv_args(tmp_path), env={"TORCHELASTIC_RESTART_COUNT": "abc"}, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "runs" / "r" / "last.pt").exists()


def test_the_reader_itself():
    from trainval import launch

    assert launch.read({}) == launch.Launch()
    # issue 21: a stray RANK (alone, or not below WORLD_SIZE=1) is a partial environment: refused below
    assert launch.read({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}).is_main  # one process
    two = launch.read({**TWO, "RANK": "1", "LOCAL_RANK": "1"})
    assert (two.distributed, two.is_main, two.rank, two.local_rank, two.world_size) == (True, False, 1, 1, 2)
    assert two.restart_count == 0 and two.timeout_s == 300
    assert launch.read({**TWO, **TORCHRUN, "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 2
    assert launch.read({**TWO, "TORCHELASTIC_RESTART_COUNT": "2"}).restart_count == 0  # not torchrun's worker
    assert launch.read({"TRAINVAL_DIST_TIMEOUT": "30.5"}).timeout_s == 30.5
    for bad in (
        {"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
        {"RANK": "1"},
        {"WORLD_SIZE": "0"},
        {"RANK": "99999999999999999999"},
        {"RANK": "+1"},
        {"RANK": "\u00b2"},
        {"TRAINVAL_DIST_TIMEOUT": "inf"},
        {"TRAINVAL_DIST_TIMEOUT": "1e300"},
        {**TWO, "MASTER_PORT": "70000"},
    ):
        with pytest.raises(ConfigError):
            launch.read(bad)


# ------------------------------------------------------------------------------------------------
# L6/L7: a stray RANK is one process, which holds the lock


def test_a_stray_rank_is_refused_by_the_folder_lock(tmp_path):
    args = csv_args(tmp_path, name="lk")
    folder = str(tmp_path / "runs" / "lk")
    with runfolder.locked(folder, "fit"):  # a fit holding runs/lk (this process)
        proc = run_cli(
            "fit",
            *args,
            "run.overwrite=true",
            env={"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"},
            timeout=120,
        )
    err = one_error_line(proc, 2)
    # issue 21: RANK=1 with WORLD_SIZE=1 is an inconsistent environment, refused before the folder is touched
    assert "RANK=1 is not below WORLD_SIZE=1" in err
    assert sorted(os.listdir(folder)) == [runfolder.MARKER]
    # the lock itself still holds a real second process out
    with runfolder.locked(folder, "fit"):
        proc = run_cli("fit", *args, "run.overwrite=true", timeout=120)
    err = one_error_line(proc, 2)
    assert "is in use by another trainval process" in err and f"pid {os.getpid()}" in err
    assert sorted(os.listdir(folder)) == [runfolder.MARKER]


@pytest.mark.parametrize(
    "env",
    [{"RANK": "1", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}, {"RANK": "1"}],
    ids=["world_size_1", "no_world_size"],
)
def test_a_stray_rank_alone_is_a_single_process(tmp_path, env):
    # issue 21: a stray RANK is a partial launcher environment: one line, never a process under a rank's name
    proc = run_cli("fit", *csv_args(tmp_path), env=env, timeout=120)
    err = one_error_line(proc, 2)
    assert "RANK=1" in err and "WORLD_SIZE" in err
    assert not (tmp_path / "runs" / "r").exists()


# ------------------------------------------------------------------------------------------------
# L10-L12: the rank outcome files


def test_an_outcome_folder_outside_the_launcher_is_not_written(tmp_path):
    target = tmp_path / "f"
    target.write_text("precious\n")
    (tmp_path / "o").mkdir()
    os.symlink(target, tmp_path / "o" / "0")
    proc = run_cli(
        "test", str(tmp_path / "nosuch.yaml"), env={"TRAINVAL_RANK_ERRORS": str(tmp_path / "o")}, timeout=60
    )
    assert "nosuch.yaml" in one_error_line(proc, 2)
    assert target.read_text() == "precious\n"


def test_a_fifo_in_an_outcome_folder_never_blocks(tmp_path):
    (tmp_path / "o").mkdir()
    os.mkfifo(tmp_path / "o" / "3")
    proc = run_cli(
        "test",
        str(tmp_path / "nosuch.yaml"),
        # issue 21: a RANK alone is refused as a partial environment; rank 3 of a whole one instead
        env={
            "TRAINVAL_RANK_ERRORS": str(tmp_path / "o"),
            **TWO,
            **TORCHRUN,
            "RANK": "3",
            "LOCAL_RANK": "3",
            "WORLD_SIZE": "4",
        },
        timeout=30,
    )
    assert "nosuch.yaml" in one_error_line(proc, 2)


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_worker_never_writes_through_a_planted_rank_file(tmp_path, plant):
    """Even in torchrun's worker, with the launcher's folder: the file is created anew or not at all."""
    target = tmp_path / "f"
    target.write_text("precious\n")
    folder = tmp_path / "trainval-ranks-1-abc"
    folder.mkdir()
    if plant == "symlink":
        os.symlink(target, folder / "1")
    else:
        os.mkfifo(folder / "1")
    env = {**TWO, **TORCHRUN, "RANK": "1", "LOCAL_RANK": "1", "TRAINVAL_RANK_ERRORS": str(folder)}
    proc = run_cli("test", str(tmp_path / "nosuch.yaml"), env=env, timeout=30)
    err = one_error_line(proc, 2)
    assert err.startswith("trainval: error: [rank 1] ") and "nosuch.yaml" in err
    assert target.read_text() == "precious\n"


def test_a_worker_records_its_outcome_in_the_launchers_folder(tmp_path):
    """The control case: torchrun's worker, the launcher's folder: the error goes to the file, not stderr."""
    folder = tmp_path / "trainval-ranks-1-abc"
    folder.mkdir()
    env = {**TWO, **TORCHRUN, "RANK": "1", "LOCAL_RANK": "1", "TRAINVAL_RANK_ERRORS": str(folder)}
    proc = run_cli("test", str(tmp_path / "nosuch.yaml"), env=env, timeout=30)
    assert proc.returncode == 2 and proc.stderr == "", proc.stderr
    code, message = _rank_outcomes(str(folder))[1]
    assert code == 2 and "nosuch.yaml" in message
    # without TORCHELASTIC_RUN_ID (not torchrun's worker) the error is printed
    env.pop("TORCHELASTIC_RUN_ID")
    os.unlink(folder / "1")
    proc = run_cli("test", str(tmp_path / "nosuch.yaml"), env=env, timeout=30)
    assert "nosuch.yaml" in one_error_line(proc, 2) and os.listdir(folder) == []


def test_an_escape_in_rank_never_reaches_the_terminal(tmp_path):
    proc = run_cli("test", str(tmp_path / "nosuch.yaml"), env={"RANK": "1\x1b]0;PWNED\x07"}, timeout=30)
    err = one_error_line(proc, 2)
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "RANK=" in err


def test_the_launcher_reads_only_regular_rank_files(tmp_path):
    folder = tmp_path / "trainval-ranks-1-abc"
    folder.mkdir()
    (folder / "0").write_text("2\nbad config\n")
    (tmp_path / "secret").write_text("1\nsecret\n")
    os.symlink(tmp_path / "secret", folder / "1")
    os.mkfifo(folder / "2")
    (folder / "3").write_bytes(b"1\n" + b"x" * 10**6)
    (folder / "4").write_text("garbage")
    (folder / "5").mkdir()
    (folder / "notes").write_text("1\nnot a rank\n")
    (folder / "6").write_text("1\n\x1b]0;PWNED\x07\n")

    def hung(signum, frame):
        raise TimeoutError("reading the rank outcomes blocked")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        found = _rank_outcomes(str(folder))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert found == {0: (2, "bad config"), 6: (1, "\\x1b]0;PWNED\\x07")}


# ------------------------------------------------------------------------------------------------
# L13: a planted outcome folder with an impossible pid


def test_a_planted_outcome_folder_with_a_huge_pid_is_skipped(tmp_path):
    for name in (
        "trainval-ranks-99999999999999999999-x",
        "trainval-ranks-0-x",
        "trainval-ranks-4294967296-x",
    ):
        (tmp_path / name).mkdir()
    assert remove_stale_outcome_folders(str(tmp_path)) == []
    assert len(os.listdir(tmp_path)) == 3


def test_a_planted_outcome_folder_does_not_break_nproc(tmp_path):
    temp = tmp_path / "tmp"
    (temp / "trainval-ranks-99999999999999999999-x").mkdir(parents=True)
    code = (
        "import sys, tempfile; from trainval.app import cli; "
        "cli.remove_stale_outcome_folders(tempfile.gettempdir()); print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------------------
# L15: TORCHELASTIC_RESTART_COUNT is torchrun's only, and its resume is checked like --resume


def test_a_stray_restart_count_does_not_resume(tmp_path):
    args = csv_args(tmp_path)
    run_cli("fit", *args, check=True, timeout=120)
    proc = run_cli(
        "fit",
        *args,
        "run.overwrite=true",
        "train.seed=9",
        env={"TORCHELASTIC_RESTART_COUNT": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" not in proc.stdout


def test_an_elastic_restart_checks_the_config_like_resume(tmp_path):
    args = csv_args(tmp_path)
    run_cli("fit", *args, check=True, timeout=120)
    restarted = {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        **TORCHRUN,
        "TORCHELASTIC_RESTART_COUNT": "1",
    }
    proc = run_cli("fit", *args, "train.seed=9", env=restarted, timeout=120)
    err = one_error_line(proc, 2)
    assert "cannot resume" in err and "train.seed" in err
    proc = run_cli(
        "fit", *args, "train.epochs=2", env=restarted, timeout=120
    )  # the control: same run, resumed
    assert proc.returncode == 0 and "resuming from" in proc.stdout, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# K5: a file system that refuses flock


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EBADF])
def test_a_file_system_without_locks_is_one_clear_error(tmp_path, monkeypatch, code):
    import fcntl

    def refused(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", refused)
    folder = str(tmp_path / "runs" / "nfs")
    with pytest.raises(RunFolderError) as caught:
        with runfolder.locked(folder, "fit"):
            pass
    message = str(caught.value)
    assert folder in message and errno.errorcode[code] in message and "local disk" in message
