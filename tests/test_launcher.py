"""`trainval fit --nproc 2` as a user runs it, signalled and killed: real launcher, torchrun and workers.

The launcher is the one process a user (or a scheduler) signals. SIGTERM to it alone must stop every
process it started, with last.pt saved and the resume hint said once; SIGKILL must not leave torchrun
and the workers training on unattended; a second SIGINT stops at once; a signal after the work is done
changes nothing. Every wait polls with a generous deadline: the machine may be loaded.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import REPO, run_cli

pytestmark = pytest.mark.slow
SLOW_MODEL = os.path.join(REPO, "tests", "helpers", "slow_model.py")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def make_config(folder, epochs=500, sleep=0.0) -> str:
    """A tiny CSV run (160 rows, 3 classes, an 8-unit MLP): an epoch takes a fraction of a second,
    or ``sleep`` seconds per training step (the SlowMLP of tests/helpers)."""
    import numpy as np

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 160)
    X = rng.normal(0, 2.0, (3, 4))[y] + rng.normal(0, 1.0, (160, 4))
    with open(folder / "data.csv", "w") as f:
        f.write("a,b,c,d,label\n" + "".join(f"{','.join(f'{v:.4f}' for v in row)},{c}\n" for row, c in zip(X, y)))
    model = (f"{{name: 'slow_model:SlowMLP', kwargs: {{sleep: {sleep}}}}}" if sleep else "{name: mlp, hidden: [8]}")
    if sleep:
        shutil.copy(SLOW_MODEL, folder / "slow_model.py")
    (folder / "run.yaml").write_text(
        f"data: {{source: csv, train: data.csv, label: label, val_split: 0.2, test_split: 0.2}}\n"
        f"model: {model}\n"
        f"train: {{epochs: {epochs}, batch_size: 16, progress: false}}\n"
        "log: {plot: false}\nrun: {name: job, out_dir: runs}\n")
    return "run.yaml"


class Launcher:
    """``trainval fit CONFIG --nproc 2 ...`` in ``folder``, its stdout read line by line in a thread."""

    def __init__(self, folder, *args, env=None, new_session=False):
        (folder / "tmp").mkdir(exist_ok=True)  # the launcher's temporary folder (a SIGKILLed one leaves it)
        env = {"TMPDIR": str(folder / "tmp"), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "trainval", "fit", *args, "--nproc", "2"], cwd=folder,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**ENV, **env}, start_new_session=new_session)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, prefix: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"no line starting with {prefix!r}; stdout: {''.join(self.stdout)[-2000:]}; "
                                     f"exit {self.proc.poll()}")
            self.stdout.append(line)
            if line.startswith(prefix):
                return

    def finish(self, timeout: float = 180) -> tuple[int, str, str]:
        err = self.proc.stderr.read() if self.proc.wait(timeout=timeout) is not None else ""
        self._reader.join(timeout=30)
        while not self.lines.empty():
            line = self.lines.get()
            if line is not None:
                self.stdout.append(line)
        return self.proc.returncode, "".join(self.stdout), err


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren...), from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError):
                pass
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        todo += children
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its (dead) parent to reap it."""
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def wait_until_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


@pytest.fixture
def reap():
    """Pids a failing test must not leave behind (SIGKILLed at teardown)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def start_and_watch(folder, reap, *args, line="[002/", **kw) -> tuple[Launcher, list[int]]:
    """Start the launcher, wait for ``line``, and return it with torchrun's and the workers' pids."""
    launcher = Launcher(folder, *args, **kw)
    reap.append(launcher.proc.pid)
    launcher.wait_for_line(line)
    pids = descendants(launcher.proc.pid)
    reap.extend(pids)
    # torchrun and its 2 workers, all running: the checks below that they are gone can fail
    assert len(pids) >= 3 and all(alive(p) for p in pids), pids
    return launcher, pids


def last_epoch(folder) -> int:
    return torch.load(folder / "runs" / "job" / "last.pt", weights_only=True, map_location="cpu")["epoch"]


def test_sigterm_to_the_launcher_alone_stops_every_process_then_resume_finishes(tmp_path, reap):
    cfg = make_config(tmp_path)
    launcher, pids = start_and_watch(tmp_path, reap, cfg)
    launcher.proc.send_signal(signal.SIGTERM)  # the launcher's pid alone, as `kill PID` does
    code, out, err = launcher.finish()
    assert code == 143, out + err
    assert wait_until_gone(pids, 60) == [], "torchrun or a worker outlived the launcher"
    # the ranks agree to stop at an epoch's end, or at a step that is a multiple of 32 (the 11th epoch's
    # 2nd: 3 steps an epoch) when the signal reaches them late on a loaded machine
    said = re.findall(r"stopped by SIGTERM at (?:the end of epoch (\d+)|epoch (\d+), batch \d+); runs/job/last\.pt is saved",
                      err)
    assert len(said) == 1 and err.count("Resume with") == 1, err
    assert "Traceback" not in err and "SignalException" not in err, err
    stopped = last_epoch(tmp_path)  # epochs done: the one to finish is stopped + 1
    assert 2 <= stopped < 500 and said[0] in ((str(stopped), ""), ("", str(stopped + 1))), (said, stopped)
    # the folder is free (no worker holds its lock) and resumes to the end
    resumed = run_cli("fit", cfg, f"train.epochs={stopped + 1}", "--resume", "--nproc", "2", cwd=str(tmp_path),
                      env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"[{stopped + 1:03d}/{stopped + 1:03d}]" in resumed.stdout and "wrote 32 predictions" in resumed.stdout
    # said once, not once per rank
    assert resumed.stdout.count(f"resuming with train.epochs 500 -> {stopped + 1}") == 1, resumed.stdout
    assert resumed.stdout.count("resuming from") == 1, resumed.stdout


def test_sigterm_to_the_launchers_process_group_says_it_once(tmp_path, reap):
    """`kill -TERM -PGID` (a shell's job, a scheduler): torchrun runs in a group of its own, so the
    launcher alone gets the signal and forwards it once; the workers' resume hint reaches the user."""
    launcher, pids = start_and_watch(tmp_path, reap, make_config(tmp_path), new_session=True)
    group = os.getpgid(launcher.proc.pid)
    assert [p for p in pids if os.getpgid(p) == group] == []  # torchrun and the workers are out of it
    os.killpg(group, signal.SIGTERM)
    code, out, err = launcher.finish()
    assert code == 143, out + err
    assert err.count("stopped by SIGTERM") == 1 and err.count("Resume with") == 1, err
    assert wait_until_gone(pids, 60) == []


def test_sigkill_to_the_launcher_stops_torchrun_and_the_workers(tmp_path, reap):
    cfg = make_config(tmp_path)
    launcher, pids = start_and_watch(tmp_path, reap, cfg)
    launcher.proc.kill()
    launcher.finish()
    # torchrun gets SIGTERM when its parent dies (PR_SET_PDEATHSIG) and stops the workers gracefully
    assert wait_until_gone(pids, 120) == [], "torchrun or a worker trains on without its launcher"
    stopped = last_epoch(tmp_path)
    assert stopped < 500
    metrics = (tmp_path / "runs" / "job" / "metrics.csv").read_text().splitlines()
    time.sleep(2)  # nothing writes to the folder any more
    assert (tmp_path / "runs" / "job" / "metrics.csv").read_text().splitlines() == metrics
    def outcome_folders():  # torchrun and torch leave their own folders in TMPDIR too
        return [n for n in os.listdir(tmp_path / "tmp") if n.startswith("trainval-ranks-")]

    left = outcome_folders()  # the killed launcher could not remove its own
    assert len(left) == 1 and left[0].startswith(f"trainval-ranks-{launcher.proc.pid}-"), left
    resumed = run_cli("fit", cfg, f"train.epochs={stopped + 1}", "--resume", "--nproc", "2", cwd=str(tmp_path),
                      env={"OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"[{stopped + 1:03d}/{stopped + 1:03d}]" in resumed.stdout
    assert outcome_folders() == []  # the next launcher removed it, and its own


def test_only_a_dead_launchers_outcome_folder_of_rank_files_is_removed(tmp_path):
    from trainval.app.cli import remove_stale_outcome_folders

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = int(done.stdout), os.getpid()

    def folder(name, files=("0", "1")):
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("0\n\n")
        return tmp_path / name

    stale = folder(f"trainval-ranks-{dead}-abc_12")
    kept = [folder(f"trainval-ranks-{live}-abc"),  # its launcher runs
            folder(f"trainval-ranks-{dead}-notes", files=("0", "notes.txt")),  # not only rank files
            folder(f"trainval-ranks-{dead}x-abc"), folder("other")]  # other names
    (tmp_path / "other" / "0").rename(tmp_path / "target")
    linked = folder(f"trainval-ranks-{dead}-link", files=())
    os.symlink(tmp_path / "target", linked / "0")  # a link is not a rank file
    os.symlink(tmp_path / "other", tmp_path / f"trainval-ranks-{dead}-dirlink")  # nor a folder
    assert remove_stale_outcome_folders(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and all(k.is_dir() for k in [*kept, linked]) and (tmp_path / "target").exists()
    assert sorted(os.listdir(tmp_path / f"trainval-ranks-{dead}-notes")) == ["0", "notes.txt"]


def test_a_second_sigint_stops_at_once(tmp_path, reap):
    # each training step sleeps 3 s (4 steps an epoch per rank): the first SIGINT's graceful stop waits
    # for the end of the epoch, many seconds away; the second must end every process at once
    cfg = make_config(tmp_path, epochs=50, sleep=3.0)
    launcher, pids = start_and_watch(tmp_path, reap, cfg, line="[001/")
    # past epoch 1's end (its line comes before its stop check and last.pt) into epoch 2's first step
    deadline = time.monotonic() + 60
    while not ((tmp_path / "runs" / "job" / "last.pt").exists() and last_epoch(tmp_path) == 1):
        assert time.monotonic() < deadline, "no last.pt of epoch 1 after 60 s"
        time.sleep(0.05)
    time.sleep(0.5)
    launcher.proc.send_signal(signal.SIGINT)
    time.sleep(1.0)
    assert launcher.proc.poll() is None, "the first SIGINT alone must not end the epoch"
    sent = time.monotonic()
    launcher.proc.send_signal(signal.SIGINT)
    code, out, err = launcher.finish(timeout=120)
    elapsed = time.monotonic() - sent
    assert code == 130, out + err
    assert elapsed < 6, f"{elapsed:.1f} s from the second SIGINT to the exit: the workers finished the epoch"
    assert "stopped at once by a second SIGINT" in err and "is saved" not in err, err
    assert wait_until_gone(pids, 30) == []
    assert last_epoch(tmp_path) == 1  # the end of epoch 1's, not one of the interrupted epoch


def test_a_signal_after_the_work_is_done_changes_nothing(tmp_path, reap):
    """SIGINT once every worker has recorded that its work is done (torchrun may still be shutting
    down): exit 0, one line, no traceback."""
    cfg = make_config(tmp_path, epochs=2)
    launcher = Launcher(tmp_path, cfg)
    temp = tmp_path / "tmp"
    reap.append(launcher.proc.pid)
    deadline = time.monotonic() + 180
    done = []
    while len(done) < 2:  # the workers' outcome files in the launcher's folder: "0" = done
        assert launcher.proc.poll() is None and time.monotonic() < deadline, "ended before it could be signalled"
        done = [f for d in temp.glob("trainval-ranks-*") for f in d.iterdir() if f.read_text().startswith("0\n")]
        time.sleep(0.01)
    launcher.proc.send_signal(signal.SIGINT)
    code, out, err = launcher.finish()
    assert code == 0, out + err
    assert "Traceback" not in err and "had finished when SIGINT came" in err, err
    rows = (tmp_path / "runs" / "job" / "predictions.csv").read_text().splitlines()
    assert len(rows) == 33  # the header and the 32 test rows


def test_flags_and_launcher_options_between_overrides(tmp_path):
    """`fit k=v --nproc 2 k2=v`: an override after a flag reaches the workers (argparse alone refused it)."""
    cfg = make_config(tmp_path)
    proc = run_cli("fit", cfg, "train.epochs=50", "--nproc", "2", "train.epochs=1", "run.name=late",
                   cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[001/001]" in proc.stdout and (tmp_path / "runs" / "late" / "best.pt").exists()
