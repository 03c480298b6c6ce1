"""Step-based training: ``max_steps`` and ``val_every_steps`` (rows, best.pt, early stopping, exact resume, CLI)."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import signal

import pytest
import torch
from conftest import DEVICE, make_blobs, run_cli, tiny_mlp
from torch import nn

from trainval import Callback, EarlyStopping, Trainer
from trainval.errors import ConfigError, Interrupted

N, BATCH = 100, 16  # 7 batches per epoch: 6 of 16 and one of 4


def read_rows(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def hand_loop(model, X, y, *, steps, acc, seed, lr):
    """The notes' loop in plain PyTorch, stopped after ``steps`` optimizer steps; trainval's shuffling
    (one randperm per epoch from a generator seeded with ``seed``) and its accumulation (the mean over a
    group; the epoch's last group may be short)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    batches = math.ceil(len(X) / BATCH)
    done = 0
    model.train()
    while done < steps:
        perm = torch.randperm(len(X), generator=g).to(X.device)
        for i in range(batches):
            idx = perm[i * BATCH : (i + 1) * BATCH]
            group = min(acc, batches - (i // acc) * acc)
            loss = loss_fn(model(X.index_select(0, idx)), y.index_select(0, idx))
            (loss / group if acc > 1 else loss).backward()
            if (i + 1) % acc == 0 or i == batches - 1:
                opt.step()
                opt.zero_grad(set_to_none=True)
                done += 1
                if done == steps:
                    return model
    return model


@pytest.mark.parametrize("acc, steps", [(1, 10), (2, 10)])
def test_max_steps_stops_at_exactly_n_optimizer_steps(tmp_path, acc, steps):
    """10 steps end inside epoch 2 (7 steps per epoch) or epoch 3 (4 per epoch with accumulate_steps=2)."""
    X, y = make_blobs(n=N)
    init = tiny_mlp()
    reference = hand_loop(copy.deepcopy(init).to(DEVICE), X.to(DEVICE), y.to(DEVICE), steps=steps, acc=acc, seed=7,
                          lr=0.05)
    model = copy.deepcopy(init)
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=20, max_steps=steps,
                 accumulate_steps=acc, seed=7, out_dir=str(tmp_path), batch_size=BATCH, progress=False, plot=False,
                 device=DEVICE)
    history = tr.fit((X, y), (X, y))
    assert tr.global_step == steps and tr.epoch == (1 if acc == 1 else 2) and tr.batch_in_epoch > 0  # mid-epoch
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference.state_dict()[k]), k
    # one step more or less gives other weights: the comparison can fail
    other = hand_loop(copy.deepcopy(init).to(DEVICE), X.to(DEVICE), y.to(DEVICE), steps=steps + 1, acc=acc, seed=7,
                      lr=0.05)
    assert not torch.equal(other.state_dict()["0.weight"], reference.state_dict()["0.weight"])
    # the run ends with a validation row at that step, and a last.pt that says where it stopped
    assert [r["step"] for r in history] == ([7, 10] if acc == 1 else [4, 8, 10])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["loop"]["global_step"] == steps and last["loop"]["history"][-1]["step"] == steps
    assert [int(r["step"]) for r in read_rows(tmp_path)] == [r["step"] for r in history]


def test_max_epochs_still_ends_the_run_before_max_steps(tmp_path):
    X, y = make_blobs(n=N)
    tr = Trainer(tiny_mlp(), max_epochs=2, max_steps=1000, out_dir=str(tmp_path), batch_size=BATCH, progress=False,
                 plot=False)
    history = tr.fit((X, y), (X, y))
    assert [(r["epoch"], r["step"]) for r in history] == [(1, 7), (2, 14)] and tr.global_step == 14


def test_val_every_steps_rows_csv_and_best_checkpoint(tmp_path):
    X, y = make_blobs(n=N, spread=2.0)  # overlapping blobs: val_loss goes up and down
    Xv, yv = make_blobs(n=60, spread=2.0, seed=1)
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), max_epochs=3, val_every_steps=4,
                 monitor="val_loss", out_dir=str(tmp_path), batch_size=BATCH, progress=False, device=DEVICE)
    history = tr.fit((X, y), (Xv, yv))
    # rows every 4 steps and one at the run's end (21 steps); none at the epochs' ends (7, 14)
    assert [r["step"] for r in history] == [4, 8, 12, 16, 20, 21]
    assert [r["epoch"] for r in history] == [1, 2, 2, 3, 3, 3]  # the epoch each row falls in
    assert all(isinstance(r["val_loss"], float) and isinstance(r["train_loss"], float) for r in history)
    rows = read_rows(tmp_path)
    assert list(rows[0])[:2] == ["epoch", "step"]
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20, 21]
    assert [float(r["val_loss"]) for r in rows] == [r["val_loss"] for r in history]
    best_row = min(history, key=lambda r: r["val_loss"])
    assert best_row is not history[-1], "choose data where the best row is not simply the last one"
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert (best["step"], best["epoch"], best["value"]) == (best_row["step"], best_row["epoch"], best_row["val_loss"])
    assert (tr.best_step, tr.best_epoch, tr.best_value) == (best_row["step"], best_row["epoch"], best_row["val_loss"])
    # best.pt holds the weights of that row: validating them gives its val_loss again
    assert tr.validate((Xv, yv), ckpt="best")["val_loss"] == pytest.approx(best_row["val_loss"], rel=1e-6)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["steps"], summary["best_step"], summary["val_every_steps"]) == (21, best_row["step"], 4)
    assert (tmp_path / "curves.png").exists()


def test_early_stopping_counts_evaluations(tmp_path, capsys):
    """lr 0: the weights never change, so val_loss never improves after the first row; patience 2 stops the
    run at the third row (step 6, inside the first epoch), not after two epochs."""
    X, y = make_blobs(n=N)
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_epochs=5, val_every_steps=2,
                 monitor="val_loss", callbacks=[EarlyStopping(patience=2)], out_dir=str(tmp_path), batch_size=BATCH,
                 progress=False, plot=False)
    history = tr.fit((X, y), (X, y))
    assert [r["step"] for r in history] == [2, 4, 6] and tr.global_step == 6 and tr.epoch == 0
    assert tr.best_step == 2 and tr.should_stop
    assert "has not improved for 2 evaluations" in capsys.readouterr().out
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["loop"]["global_step"] == 6 and last["loop"]["should_stop"] is True


def test_reduce_lr_on_plateau_steps_at_each_evaluation(tmp_path):
    X, y = make_blobs(n=N)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-9)  # too small to move val_loss by its threshold (1e-4)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0, eps=0.0)
    tr = Trainer(model, opt, scheduler=sched, max_epochs=1, val_every_steps=2, monitor="val_loss",
                 out_dir=str(tmp_path), batch_size=BATCH, progress=False, plot=False)
    history = tr.fit((X, y), (X, y))
    assert [r["step"] for r in history] == [2, 4, 6, 7]
    # the lr each row shows is the one in force at its step; patience 0: halved at each evaluation after the first
    assert [r["lr"] for r in history] == [1e-9, 1e-9, 5e-10, 2.5e-10]


def test_row_train_metrics_are_those_of_the_batches_since_the_previous_row(tmp_path):
    """lr 0 keeps the weights: each row's train loss and accuracy are the exact means over the samples of the
    batches since the previous row, across an epoch's end (the row at step 9 holds epoch 1's last batch of 4
    and epoch 2's first two batches)."""
    X, y = make_blobs(n=N)
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_epochs=2, val_every_steps=3, seed=5,
                 out_dir=str(tmp_path), batch_size=BATCH, progress=False, plot=False)
    history = tr.fit((X, y), (X, y))
    assert [r["step"] for r in history] == [3, 6, 9, 12, 14]
    g = torch.Generator().manual_seed(5)
    perms = [torch.randperm(N, generator=g) for _ in range(2)]
    batches = [p[i : i + BATCH] for p in perms for i in range(0, N, BATCH)]  # 14 batches, one per step
    with torch.no_grad():
        bounds = [0, 3, 6, 9, 12, 14]
        for row, a, b in zip(history, bounds, bounds[1:]):
            idx = torch.cat(batches[a:b])
            logits = model(X[idx])
            assert row["train_loss"] == pytest.approx(nn.CrossEntropyLoss()(logits, y[idx]).item(), rel=1e-6)
            assert row["train_acc"] == pytest.approx((logits.argmax(1) == y[idx]).sum().item() / len(idx), abs=1e-12)
        # the control: the mean over the whole epoch differs, so the check can tell them apart
        whole = nn.CrossEntropyLoss()(model(X[torch.cat(batches[7:14])]), y[torch.cat(batches[7:14])]).item()
        assert abs(whole - history[3]["train_loss"]) > 1e-4


# ------------------------------------------------------------------------------------------------
# Exact resume killed between two validations


class StopAt(Callback):
    """At optimizer step ``at``: SIGINT to this process (the graceful stop), or an error (a crash)."""

    def __init__(self, at, how):
        self.at, self.how, self.fired = at, how, False

    def on_train_batch_end(self, trainer, batch_index):
        if self.fired or trainer.global_step != self.at:
            return
        self.fired = True
        if self.how == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
        else:
            raise RuntimeError("crash")


def _trainer(folder, callbacks=(), every=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))  # dropout: the RNG too
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)  # an epoch-interval scheduler
    return Trainer(model, opt, scheduler=sched, metrics=["acc", "f1_macro"], max_epochs=4, max_steps=25,
                   val_every_steps=5, checkpoint_every_steps=every, seed=3, out_dir=str(folder), batch_size=BATCH,
                   callbacks=list(callbacks), progress=False, plot=False, overwrite=True)


@pytest.mark.parametrize("how, at, every, saved_at, rows", [
    ("sigint", 8, None, 8, [5]),    # the signal's own save, between the rows at 5 and 10
    ("crash", 13, 3, 12, [5, 10]),  # checkpoint_every_steps' save at 12, between the rows at 10 and 15
    ("crash", 9, None, 7, [5]),     # the epoch's end at 7 (no row there): the train metrics since step 5 saved
])
def test_resume_killed_mid_interval_is_bit_identical(tmp_path, how, at, every, saved_at, rows):
    X, y = make_blobs(n=N, spread=1.5)
    Xv, yv = make_blobs(n=40, spread=1.5, seed=1)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_trainer = _trainer(ref, every=every)
    ref_trainer.fit((X, y), (Xv, yv))
    with pytest.raises(Interrupted if how == "sigint" else RuntimeError):
        _trainer(cut, [StopAt(at, how)], every=every).fit((X, y), (Xv, yv))
    state = torch.load(cut / "last.pt", weights_only=True)
    assert state["loop"]["global_step"] == saved_at and [r["step"] for r in state["loop"]["history"]] == rows
    assert state["train_metrics"] is not None  # the batches since the previous row
    resumed = _trainer(cut, every=every)
    resumed.fit((X, y), (Xv, yv), resume=True)
    assert resumed.global_step == ref_trainer.global_step == 25
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(p / name, weights_only=True)["model"] for p in (ref, cut))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_rows(ref)) == strip(read_rows(cut))
    assert [int(r["step"]) for r in read_rows(cut)] == [5, 10, 15, 20, 25]


def test_a_resume_that_drops_the_pending_train_metrics_would_be_caught(tmp_path, monkeypatch):
    """The control for the test above: without the train metrics since the previous row, the resumed run's
    next row differs from the uninterrupted one's."""
    X, y = make_blobs(n=N, spread=1.5)
    Xv, yv = make_blobs(n=40, spread=1.5, seed=1)
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    _trainer(ref, every=3).fit((X, y), (Xv, yv))
    with pytest.raises(RuntimeError):
        _trainer(cut, [StopAt(9, "crash")], every=3).fit((X, y), (Xv, yv))
    from trainval.metrics import MetricSet

    monkeypatch.setattr(MetricSet, "load_state_dict", lambda self, state, capacity=None: None)
    _trainer(cut, every=3).fit((X, y), (Xv, yv), resume=True)
    assert read_rows(ref)[1]["train_loss"] != read_rows(cut)[1]["train_loss"]


# ------------------------------------------------------------------------------------------------
# Options and the CLI


@pytest.mark.parametrize("name", ["max_steps", "val_every_steps"])
@pytest.mark.parametrize("value", [0, -3, 2.5, "10", True])
def test_wrong_values_are_one_config_error(tmp_path, name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be a positive integer \(optimizer steps\) or None, got "):
        Trainer(tiny_mlp(), out_dir=str(tmp_path), **{name: value})


def test_cli_fit_writes_step_rows(tmp_path):
    fit = run_cli("fit", "model.name=mlp", "model.hidden=[16]", "train.epochs=3", "train.max_steps=7",
                  "train.val_every_steps=3", "train.batch_size=256", f"run.out_dir={tmp_path}/runs", "run.name=s",
                  "train.progress=false", cwd=str(tmp_path))
    assert fit.returncode == 0, fit.stdout + fit.stderr
    assert "[step 000003/000007] Train Acc:" in fit.stdout and "[step 000007/000007]" in fit.stdout
    run = tmp_path / "runs" / "s"
    rows = read_rows(run)
    assert [int(r["step"]) for r in rows] == [3, 6, 7]  # digits: 5 steps of 256 per epoch
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainer"]["max_steps"] == 7 and summary["trainer"]["val_every_steps"] == 3
    assert torch.load(run / "last.pt", weights_only=True)["loop"]["global_step"] == 7


@pytest.mark.parametrize("arg, words", [
    ("train.max_steps=0", "train.max_steps must be at least 1, got 0"),
    ("train.val_every_steps=-2", "train.val_every_steps must be at least 1, got -2"),
    ("train.max_steps=abc", "train.max_steps must be an integer, got 'abc'"),
    ("train.val_every_steps=1.5", "train.val_every_steps must be an integer"),
])
def test_cli_wrong_step_values_are_one_clear_line(tmp_path, arg, words):
    proc = run_cli("fit", arg, "train.epochs=1", cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trainval: error: ") and words in err, err
