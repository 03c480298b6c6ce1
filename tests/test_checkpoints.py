"""Crash-safe checkpoints, exact resume, graceful stop, disk faults and safe loading."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, make_blobs, tiny_mlp
from torch import nn

from trainval import Trainer
from trainval import checkpoint as ckpt_mod
from trainval.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from trainval.errors import CheckpointError

CHILD = os.path.join(REPO, "tests", "helpers", "train_child.py")


def child(out_dir, timeout=120, **opts) -> subprocess.CompletedProcess:
    """train_child.py in a fresh interpreter."""
    return subprocess.run([sys.executable, CHILD, str(out_dir), json.dumps(opts)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    """The same train_child, forked from a process that has imported torch already (helpers/zygote.py):
    real processes, real kills and signals, without 2.5 s of imports each."""
    from helpers.zygote import Zygote

    z = Zygote(str(tmp_path_factory.mktemp("zygote-logs")))
    yield z
    z.close()


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_bits(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def metric_rows(folder):
    import csv

    with open(os.path.join(folder, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL


@pytest.mark.slow
def test_resume_after_kill_is_bit_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert child(ref, epochs=4).returncode == 0
    killed = child(cut, epochs=4, kill_epoch_end=3)
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(cut / "last.pt", weights_only=True)["epoch"] == 2
    resumed = child(cut, epochs=4, resume=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_bits(weights(ref / "last.pt"), weights(cut / "last.pt"))
    assert_same_bits(weights(ref / "best.pt"), weights(cut / "best.pt"))
    assert metric_rows(ref) == metric_rows(cut) and len(metric_rows(ref)) == 4


@pytest.mark.slow
def test_mid_epoch_resume_is_bit_identical(tmp_path, zygote):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert zygote.run(ref, epochs=3, every=5).returncode == 0
    killed = zygote.run(cut, epochs=3, every=5, kill_batch=23)  # epoch 2 (13 batches per epoch), after step 20's save
    assert killed.returncode == -signal.SIGKILL
    state = torch.load(cut / "last.pt", weights_only=True)
    assert (state["epoch"], state["loop"]["batch_in_epoch"]) == (1, 7)
    resumed = zygote.run(cut, epochs=3, every=5, resume=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_bits(weights(ref / "last.pt"), weights(cut / "last.pt"))
    assert metric_rows(ref) == metric_rows(cut)
    ref_state, cut_state = (torch.load(p / "last.pt", weights_only=True) for p in (ref, cut))
    for group_ref, group_cut in zip(ref_state["optimizer"]["state"].values(), cut_state["optimizer"]["state"].values()):
        assert torch.equal(group_ref["exp_avg"], group_cut["exp_avg"])


def _load_all(folder) -> dict:
    """Every complete checkpoint in ``folder``, loaded (raises if one is unreadable)."""
    return {name: load_checkpoint(str(folder / name)) for name in ("last.pt", "best.pt") if (folder / name).exists()}


def _partial_writes(folder) -> list[str]:
    return sorted(f for f in os.listdir(folder) if f.endswith(".tmp"))


@pytest.mark.slow
def test_sigkill_inside_each_write_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, zygote):
    """18 kills, each right inside the N-th checkpoint write of a fresh run (mid-epoch and epoch-end writes).

    Each must leave exactly one partial temp file beside an intact last.pt from the write before it,
    and resuming from that last.pt must end bit-identical to a run that was never killed.
    """
    ref = tmp_path / "ref"
    assert zygote.run(ref, epochs=2, every=1).returncode == 0
    started = time.perf_counter()
    for n in range(1, 19):
        folder = tmp_path / f"kill{n}"
        proc = zygote.run(folder, epochs=2, every=1, kill_in_write=n)
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        # the kill came inside a write: its temp file is there, half-written and unreadable
        partial = _partial_writes(folder)
        assert len(partial) == 1 and partial[0].startswith((".trainval-last.pt.", ".trainval-best.pt.")), partial
        with pytest.raises(CheckpointError):
            load_checkpoint(str(folder / partial[0]))
        saved = _load_all(folder)
        if n == 1:
            assert saved == {}  # killed inside the very first write: nothing to resume from
            continue
        # every=1 writes last.pt after each of the 12 first steps (13 batches per epoch): the write
        # before the N-th is step N-1's, and every complete write holds a state the run really reached
        state = saved["last.pt"]
        if n <= 13:
            assert (state["epoch"], state["loop"]["batch_in_epoch"], state["loop"]["global_step"]) == (0, n - 1, n - 1)
        else:
            assert n - 3 <= state["loop"]["global_step"] <= n - 2
        resumed = zygote.run(folder, epochs=2, every=1, resume=True)
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert f"(epoch {state['epoch']}, batch {state['loop']['batch_in_epoch']})" in resumed.stdout
        assert not _partial_writes(folder)  # the resumed run removed the leftover
        assert_same_bits(weights(ref / "last.pt"), weights(folder / "last.pt"))
        assert_same_bits(weights(ref / "best.pt"), weights(folder / "best.pt"))
        assert metric_rows(ref) == metric_rows(folder)
    print(f"18 kills inside writes, 17 exact resumes: {time.perf_counter() - started:.1f} s")


@pytest.mark.slow
def test_sigkill_at_many_moments_then_resume_ends_where_an_unbroken_run_does(tmp_path, zygote):
    """18 kills at other moments of training (batches, evaluations, writes), every other run resuming.

    Whatever a kill leaves must load; a resumed run must start from the last.pt it found; and the run,
    finished after the last kill, must end bit-identical to one that was never killed.
    """
    folder, ref = tmp_path / "run", tmp_path / "ref"
    opts = {"epochs": 60, "every": 2}  # a run resumes at most once: two runs of up to 0.85 s stay far from the end
    started = time.perf_counter()
    resumes = cut_writes = 0
    for i in range(18):
        found = _load_all(folder) if folder.exists() else {}
        resume = "last.pt" in found and i % 2 == 0
        p = zygote.start(folder, **opts, resume=resume, ready_after=3)
        before_ready = p.wait_for_line("READY")
        # READY after 3 batches: this process has written last.pt once (every=2), so each later run
        # finds one; then 0 to 0.85 s more of training: batches, evaluations and writes
        time.sleep(0.05 * i)
        p.kill()
        assert p.wait() == -signal.SIGKILL, p.stdout  # the kill came before the run ended by itself
        resumed_line = [ln for ln in before_ready if ln.startswith("resuming from")]
        if resume:
            last = found["last.pt"]
            assert resumed_line and f"(epoch {last['epoch']}, batch {last['loop']['batch_in_epoch']})" in resumed_line[0]
            resumes += 1
        else:
            assert not resumed_line
        cut_writes += len(_partial_writes(folder))
        _load_all(folder)  # raises if the kill left an unreadable checkpoint
    assert resumes == 8  # runs 2, 4, ..., 16
    finished = zygote.run(folder, resume=True, timeout=300, **opts)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert zygote.run(ref, timeout=300, **opts).returncode == 0
    assert_same_bits(weights(ref / "last.pt"), weights(folder / "last.pt"))
    assert_same_bits(weights(ref / "best.pt"), weights(folder / "best.pt"))
    assert metric_rows(ref) == metric_rows(folder) and len(metric_rows(ref)) == 60
    print(f"18 kills ({cut_writes} inside a write), {resumes} resumes, {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------------------------
# Graceful stop


def _signal_after_ready(zygote, folder, sig, second=None, **opts):
    p = zygote.start(folder, **{"epochs": 100, "sleep": 0.01, "ready_after": 30, **opts})
    p.wait_for_line("READY")
    p.send_signal(sig)
    if second is not None:
        p.send_signal(second)
    p.wait(timeout=60)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_and_exits_with_its_code(tmp_path, zygote, sig, code):
    rc, out, err = _signal_after_ready(zygote, tmp_path, sig)
    assert rc == code, out + err
    assert "last.pt is saved. Resume with" in out
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["epoch"] * 13 + state["loop"]["batch_in_epoch"] >= 30  # it saved the step it had reached


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identical(tmp_path, zygote):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert zygote.run(ref, epochs=4).returncode == 0
    rc, out, _ = _signal_after_ready(zygote, cut, signal.SIGINT, epochs=4)
    assert rc == 130, out
    resumed = zygote.run(cut, epochs=4, resume=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_same_bits(weights(ref / "last.pt"), weights(cut / "last.pt"))
    assert metric_rows(ref) == metric_rows(cut)


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path, zygote):
    # READY comes after batch 30 (epoch 3; last.pt was written at the end of epoch 2); the child then stays
    # 30 s inside that batch's callback. The first SIGINT only asks the loop to stop after this step,
    # which the graceful path would do after the 30 s, saving last.pt mid-epoch and saying so. The
    # second SIGINT must end the process at once, with 130, without reaching that save.
    p = zygote.start(tmp_path, epochs=100, ready_after=30, hold=30)
    p.wait_for_line("READY")
    before = (tmp_path / "last.pt").read_bytes()
    p.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the first one is handled by now (two pending SIGINTs would merge into one)
    assert p.poll() is None, "the first SIGINT alone must not end the step"
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=60)
    elapsed, out = time.monotonic() - sent, p.stdout
    assert p.returncode == 130, out
    assert elapsed < 5, f"{elapsed:.1f} s from the second SIGINT to the exit: it finished the step"
    assert "last.pt is saved" not in out and "DONE" not in out, out
    assert (tmp_path / "last.pt").read_bytes() == before  # no save after the signals
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert (state["epoch"], state["loop"]["batch_in_epoch"]) == (2, 0)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # it was not cut inside a write
    load_checkpoint(str(tmp_path / "best.pt"))


# ------------------------------------------------------------------------------------------------
# Disk faults


@pytest.mark.parametrize("err, words", [(errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied"),
                                        (errno.EROFS, "Read-only file system")])
def test_write_failure_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, err, words):
    X, y = make_blobs(n=64)
    model = tiny_mlp()
    calls = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 2's first write (best.pt or last.pt): after epoch 1 wrote both
            raise OSError(err, os.strerror(err))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    tr = Trainer(model, max_epochs=3, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False, monitor="train_loss")
    with pytest.raises(CheckpointError) as info:
        tr.fit((X, y))
    message = str(info.value)
    assert str(tmp_path) in message and words in message and "intact" in message
    monkeypatch.setattr(torch, "save", real_save)
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(str(tmp_path / name))["epoch"] == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp file left behind
    out = capsys.readouterr().out
    assert "[002/003]" in out and "[003/003]" not in out  # training stopped at the failed write


def test_unwritable_folder_named_in_error(tmp_path, monkeypatch):
    import tempfile

    def no_access(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", no_access)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*x\.pt: Permission denied"):
        save_checkpoint({"model": {}, "epoch": 0}, str(tmp_path / "x.pt"))


def test_write_fault_in_the_middle_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, str(path))

    def boom(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_write_hook", boom)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, str(path))
    assert load_checkpoint(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


# ------------------------------------------------------------------------------------------------
# Safe loading


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_checkpoint_is_refused_and_its_code_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "epoch": 1, "payload": Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*could run code"):
        load_checkpoint(str(path))
    assert not marker.exists()
    # and through the Trainer too
    tr = Trainer(tiny_mlp(), out_dir=str(tmp_path), progress=False)
    with pytest.raises(CheckpointError, match="refusing to load"):
        tr.predict(torch.zeros(2, 6), ckpt=str(path))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_one_clear_error(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": tiny_mlp().state_dict(), "epoch": 3}, str(path))
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"cannot read checkpoint .*last\.pt"):
        load_checkpoint(str(path))


def test_other_architecture_lists_missing_unexpected_and_shapes(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint({"model": tiny_mlp(hidden=16).state_dict(), "epoch": 1}, str(path))
    other = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3), nn.Linear(3, 3))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, load_checkpoint(str(path))["model"], str(path))
    msg = str(info.value)
    assert "missing keys: 3.weight, 3.bias" in msg
    assert "shape mismatches: 0.weight: checkpoint [16, 6] vs model [8, 6]" in msg
    assert "m.pt does not fit this model" in msg
    with pytest.raises(CheckpointError, match="unexpected keys: 2.weight, 2.bias, 3.weight"):
        load_model_weights(nn.Sequential(nn.Linear(6, 16), nn.ReLU()), {**tiny_mlp().state_dict(), "3.weight": torch.ones(1)}, "x")


def test_resume_without_last_pt_is_a_clear_error(tmp_path):
    X, y = make_blobs(n=20)
    with pytest.raises(CheckpointError, match="no last.pt"):
        Trainer(tiny_mlp(), out_dir=str(tmp_path), progress=False).fit((X, y), (X, y), resume=True)


def test_checkpoint_reloads_without_trainval_and_strips_wrappers(tmp_path):
    X, y = make_blobs(n=40)
    model = tiny_mlp()
    Trainer(model, max_epochs=1, out_dir=str(tmp_path), progress=False, plot=False).fit((X, y), (X, y))
    state = torch.load(tmp_path / "best.pt", weights_only=True, map_location="cpu")
    plain = tiny_mlp(seed=5)
    plain.load_state_dict(state["model"])  # no "module." or "_orig_mod." prefixes
    assert state["epoch"] == 1


def test_resume_writes_back_a_metrics_row_a_crash_kept_from_metrics_csv(tmp_path):
    """metrics.csv follows last.pt (in the background with async_save): a kill between the two leaves the
    file a row short. Resuming, even a finished run, writes last.pt's history back."""
    X, y = make_blobs(n=80)

    def fit(resume):
        return Trainer(tiny_mlp(), max_epochs=2, out_dir=str(tmp_path), batch_size=16, progress=False,
                       plot=False, async_save=True).fit((X[:60], y[:60]), (X[60:], y[60:]), resume=resume)

    fit(False)
    path = tmp_path / "metrics.csv"
    whole = path.read_text()
    lines = whole.splitlines(keepends=True)
    assert len(lines) == 3
    path.write_text("".join(lines[:2]))  # as if killed between last.pt and metrics.csv at the last epoch
    history = fit(True)
    assert len(history) == 2 and path.read_text() == whole


@pytest.mark.slow
def test_a_repeated_sigterm_keeps_the_graceful_stop(tmp_path, zygote):
    """Schedulers send SIGTERM to every process of a job (SLURM's scancel reaches a worker besides the
    one torchrun forwards): the second SIGTERM must not turn the graceful stop into an exit without save.
    The control is test_second_sigint_exits_at_once."""
    rc, out, err = _signal_after_ready(zygote, tmp_path, signal.SIGTERM, second=signal.SIGTERM)
    assert rc == 143, out + err
    assert "last.pt is saved. Resume with" in out
    state = load_checkpoint(str(tmp_path / "last.pt"))
    assert state["epoch"] * 13 + state["loop"]["batch_in_epoch"] >= 30  # the step it had reached, not an older one
