"""save_top_k (the k best evaluations as weights_only files) and trainval.EMA (an exponential moving average of
the weights), each checked against a hand computation, a resume, an injected crash and the CLI."""

from __future__ import annotations

import copy
import json
import os
import re
import signal

import pytest
import torch
from conftest import DEVICE, make_blobs, run_cli, tiny_mlp
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import trainval.checkpoint as checkpoint_module
from trainval import EMA, Callback, Trainer
from trainval.checkpoint import TOP_K_FILE, top_k_name
from trainval.errors import CheckpointError, ConfigError, Interrupted

# ----------------------------------------------------------------------------------------------
# save_top_k


class Jolt(Callback):
    """At the start of the given epochs the learning rate is 10x for that epoch: the validation loss jumps up,
    so the k best are not simply the last k."""

    def __init__(self, epochs):
        self.epochs = set(epochs)

    def on_epoch_start(self, trainer, epoch):
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.2 if epoch in self.epochs else 0.05


def _topk_trainer(folder, epochs, k=2, callbacks=(), **kw):
    model = tiny_mlp()
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=epochs,
                   out_dir=str(folder), batch_size=16, progress=False, plot=False, monitor="val_loss", seed=3,
                   save_top_k=k, callbacks=[Jolt({2, 4}), *callbacks], device=DEVICE, **kw)


def _data():
    X, y = make_blobs(n=141, seed=1, spread=2.0)
    return (X[:96], y[:96]), (X[96:], y[96:])


def _top_k_files(folder):
    return sorted(f for f in os.listdir(folder) if TOP_K_FILE.fullmatch(f))


def _expected_top_k(history, k, steps_per_epoch=6):
    rows = sorted(history, key=lambda r: (r["val_loss"], r["epoch"]))[:k]  # min; ties: the earlier first
    return [top_k_name(r["epoch"], r["epoch"] * steps_per_epoch, "val_loss", r["val_loss"]) for r in rows]


def test_save_top_k_keeps_exactly_the_k_best_loadable_files(tmp_path):
    train, val = _data()
    tr = _topk_trainer(tmp_path / "run", epochs=6)
    history = tr.fit(train, val)
    losses = [r["val_loss"] for r in history]
    # the control: the monitored values are not monotonic, so the 2 best are not the last 2 (removal is ordered)
    assert sorted(losses, reverse=True) != losses
    expected = _expected_top_k(history, 2)
    assert [e["file"] for e in tr.state.top_k] == expected
    assert _top_k_files(tmp_path / "run") == sorted(expected)
    assert {r["epoch"] for r in history if top_k_name(r["epoch"], r["epoch"] * 6, "val_loss", r["val_loss"])
            in expected} != {5, 6}
    for name in expected:
        saved = torch.load(tmp_path / "run" / name, weights_only=True)  # a plain checkpoint
        row = history[saved["epoch"] - 1]
        assert saved["value"] == row["val_loss"] and saved["step"] == saved["epoch"] * 6
        model = tiny_mlp()
        model.load_state_dict(saved["model"])
        check = Trainer(model, max_epochs=1, out_dir=str(tmp_path / "check"), batch_size=16, progress=False,
                        plot=False, device=DEVICE)
        assert check.validate(val)["val_loss"] == pytest.approx(row["val_loss"], abs=1e-6)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    first = torch.load(tmp_path / "run" / expected[0], weights_only=True)
    assert best["epoch"] == first["epoch"] == tr.best_epoch
    assert all(torch.equal(best["model"][k], v) for k, v in first["model"].items())


def test_save_top_k_resume_continues_the_same_set(tmp_path):
    train, val = _data()
    whole = _topk_trainer(tmp_path / "whole", epochs=6)
    whole.fit(train, val)
    _topk_trainer(tmp_path / "cut", epochs=4).fit(train, val)
    resumed = _topk_trainer(tmp_path / "cut", epochs=6)
    resumed.fit(train, val, resume=True)
    assert resumed.state.top_k == whole.state.top_k
    assert _top_k_files(tmp_path / "cut") == _top_k_files(tmp_path / "whole")
    for name in _top_k_files(tmp_path / "whole"):
        a = torch.load(tmp_path / "whole" / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "cut" / name, weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


class Crash(BaseException):
    """A kill at that very point (not an error that trainval handles)."""


def _good_top_k_files(folder):
    good = []
    for name in _top_k_files(folder):
        state = torch.load(os.path.join(folder, name), weights_only=True)
        model = tiny_mlp()
        model.load_state_dict(state["model"])
        good.append(name)
    return good


@pytest.mark.parametrize("where", ["remove", "replace"])
def test_save_top_k_crash_between_write_and_removal_keeps_k_files(tmp_path, monkeypatch, where):
    train, val = _data()
    whole = _topk_trainer(tmp_path / "whole", epochs=6)
    whole.fit(train, val)
    real_remove, real_replace = os.remove, os.replace
    calls = {"n": 0}

    def remove(path, *a, **k):  # the first removal of a top-k file that fell out: killed right there
        if TOP_K_FILE.fullmatch(os.path.basename(path)):
            calls["n"] += 1
            raise Crash(path)
        return real_remove(path, *a, **k)

    def replace(src, dst, *a, **k):  # the 4th top-k file's rename fails (a full disk): an error out of fit
        if TOP_K_FILE.fullmatch(os.path.basename(dst)):
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst, *a, **k)

    if where == "remove":
        monkeypatch.setattr(checkpoint_module.os, "remove", remove)
        with pytest.raises(Crash):
            _topk_trainer(tmp_path / "cut", epochs=6).fit(train, val)
    else:
        monkeypatch.setattr(checkpoint_module.os, "replace", replace)
        with pytest.raises(CheckpointError, match="top-k checkpoint"):
            _topk_trainer(tmp_path / "cut", epochs=6).fit(train, val)
    monkeypatch.undo()
    assert len(_good_top_k_files(tmp_path / "cut")) >= 2  # never fewer than k good files
    resumed = _topk_trainer(tmp_path / "cut", epochs=6)
    resumed.fit(train, val, resume=True)
    assert resumed.state.top_k == whole.state.top_k
    assert _top_k_files(tmp_path / "cut") == _top_k_files(tmp_path / "whole")  # no stray file left


def test_save_top_k_overwrite_removes_the_replaced_runs_files(tmp_path):
    train, val = _data()
    _topk_trainer(tmp_path / "run", epochs=3, k=3).fit(train, val)
    old = _top_k_files(tmp_path / "run")
    assert len(old) == 3
    tr = _topk_trainer(tmp_path / "run", epochs=2, k=1, overwrite=True)
    history = tr.fit(train, val)
    assert _top_k_files(tmp_path / "run") == _expected_top_k(history, 1)


@pytest.mark.parametrize("k", [0, -1, 1.5, True])
def test_save_top_k_must_be_a_positive_integer(tmp_path, k):
    with pytest.raises(ConfigError, match="save_top_k must be a positive integer"):
        Trainer(tiny_mlp(), save_top_k=k, out_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------------
# EMA


def _hand_ema_loop(model, X, y, epochs, batch_size, seed, lr, decay, accumulate=1, per_batch=False):
    """The loop in plain PyTorch with a hand AveragedModel updated after every optimizer step (or batch)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    per_epoch = []
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g)
        starts = list(range(0, len(X), batch_size))
        for b, i in enumerate(starts):
            idx = perm[i : i + batch_size]
            (loss_fn(model(X[idx]), y[idx]) / accumulate).backward()
            if (b + 1) % accumulate == 0 or b == len(starts) - 1:
                opt.step()
                opt.zero_grad(set_to_none=True)
                if not per_batch:
                    swa.update_parameters(model)
            if per_batch:
                swa.update_parameters(model)
        per_epoch.append(copy.deepcopy(swa.module))
    return model, swa, per_epoch


def _ema_trainer(folder, model, epochs, decay=0.9, accumulate=1, callbacks=(), **kw):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=epochs, seed=7,
                   out_dir=str(folder), batch_size=16, progress=False, plot=False, accumulate_steps=accumulate,
                   callbacks=[*callbacks, EMA(decay)], monitor="val_loss", **kw)


def _val_loss(model, X, y):
    model.eval()
    with torch.no_grad():
        return nn.CrossEntropyLoss()(model(X), y).item()


class EpochSnapshots(Callback):
    """The EMA weights and the model's buffers at each epoch's end."""

    def __init__(self, ema):
        self.ema, self.epochs = ema, {}

    def on_epoch_end(self, trainer, row):
        averaged = dict(zip(self.ema._names, (a.detach().clone() for a in self.ema.averaged)))
        buffers = {k: b.detach().clone() for k, b in trainer.model.named_buffers()}
        self.epochs[row["epoch"]] = {**averaged, **buffers}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_equals_a_hand_averaged_model_updated_per_optimizer_step(tmp_path, accumulate):
    X, y = make_blobs(n=141, spread=2.0)
    (X, y), (Xv, yv) = (X[:96], y[:96]), (X[96:], y[96:])  # 6 batches of 16: full accumulation groups
    init = tiny_mlp(batchnorm=True)
    hand, swa, per_epoch = _hand_ema_loop(copy.deepcopy(init), X, y, epochs=3, batch_size=16, seed=7, lr=0.05,
                                          decay=0.9, accumulate=accumulate)
    model = copy.deepcopy(init)
    tr = _ema_trainer(tmp_path, model, epochs=3, accumulate=accumulate)
    ema = tr.callbacks[-1]
    snaps = EpochSnapshots(ema)
    tr.callbacks.append(snaps)
    history = tr.fit((X, y), (Xv, yv))
    assert ema.updates == 3 * 6 // accumulate
    averaged = dict(zip(ema._names, ema.averaged))
    assert set(averaged) == {n for n, _ in model.named_parameters()}  # parameters only: buffers are the model's
    for name, p in swa.module.named_parameters():
        assert torch.allclose(averaged[name].cpu(), p, rtol=0, atol=1e-6), name
    # the model holds the training weights after fit (swapped back after every validation)
    for (name, a), b in zip(model.named_parameters(), hand.parameters()):
        assert torch.allclose(a.detach().cpu(), b, rtol=0, atol=1e-6), name
    # validation reported the averaged model's loss (with the model's own BatchNorm statistics)...
    for row, module in zip(history, per_epoch):
        assert row["val_loss"] == pytest.approx(_val_loss(module, Xv, yv), abs=1e-6)
    # ... not the training weights' (the control: EMA and training weights differ enough to tell apart)
    assert abs(history[-1]["val_loss"] - _val_loss(copy.deepcopy(hand), Xv, yv)) > 1e-4
    # best.pt holds the averaged weights and the buffers of its epoch; test() reloads it
    best = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    snap = snaps.epochs[tr.best_epoch]
    assert set(best) == set(snap) and all(torch.equal(best[k], snap[k].cpu()) for k in best)
    assert tr.test((Xv, yv))["test_loss"] == pytest.approx(history[tr.best_epoch - 1]["val_loss"], abs=1e-6)
    if accumulate == 2:  # the control: an average updated per batch is another one
        _, per_batch, _ = _hand_ema_loop(copy.deepcopy(init), X, y, epochs=3, batch_size=16, seed=7, lr=0.05,
                                         decay=0.9, accumulate=2, per_batch=True)
        diff = max((averaged[n].cpu() - p).abs().max().item() for n, p in per_batch.module.named_parameters())
        assert diff > 1e-4


class StopAt(Callback):
    """SIGINT to this process at the given optimizer step: last.pt is saved there (mid-epoch), fit stops."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, batch_index):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def test_ema_resume_is_bit_identical(tmp_path):
    X, y = make_blobs(n=145, spread=2.0)
    (X, y), (Xv, yv) = (X[:100], y[:100]), (X[100:], y[100:])
    whole_model = tiny_mlp(dropout=0.2)
    whole = _ema_trainer(tmp_path / "whole", whole_model, epochs=4)
    whole.fit((X, y), (Xv, yv))

    cut_model = tiny_mlp(dropout=0.2)
    with pytest.raises(Interrupted):  # step 10: inside epoch 2 (7 steps per epoch)
        _ema_trainer(tmp_path / "cut", cut_model, epochs=4, callbacks=[StopAt(10)]).fit((X, y), (Xv, yv))
    fresh = tiny_mlp(dropout=0.2, seed=99)  # the resumed run must not depend on these weights
    resumed = _ema_trainer(tmp_path / "cut", fresh, epochs=4, callbacks=[StopAt(-1)])  # the same callbacks
    resumed.fit((X, y), (Xv, yv), resume=True)
    a, b = whole.callbacks[-1], resumed.callbacks[-1]
    assert a.updates == b.updates == 28
    assert all(torch.equal(x, z) for x, z in zip(a.averaged, b.averaged))
    assert all(torch.equal(x, z) for x, z in zip(whole_model.state_dict().values(), fresh.state_dict().values()))
    assert [r["val_loss"] for r in whole.history] == [r["val_loss"] for r in resumed.history]
    best_a = torch.load(tmp_path / "whole" / "best.pt", weights_only=True)["model"]
    best_b = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best_a[k], best_b[k]) for k in best_a)
    # the control: the average is not the weights (its equality is not implied by theirs)
    assert not any(torch.equal(x, z) for x, z in zip(a.averaged, whole_model.parameters()))


def test_ema_resume_without_saved_average_is_refused(tmp_path):
    X, y = make_blobs(n=64)
    model = tiny_mlp()
    Trainer(model, max_epochs=1, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False).fit((X, y))
    tr = Trainer(tiny_mlp(), max_epochs=2, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False,
                 callbacks=[EMA(0.9)])
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        tr.fit((X, y), resume=True)


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, float("nan"), True, "0.9"])
def test_ema_decay_must_be_between_0_and_1(decay):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        EMA(decay)


def test_ema_update_has_no_host_sync(tmp_path, monkeypatch):
    ema = EMA(0.5)
    model = tiny_mlp()

    class T:
        pass

    t = T()
    t.model, t.global_step, t.last_path = model, 0, "last.pt"
    ema.on_fit_start(t)
    reads = []
    for name in ("item", "tolist", "__bool__", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    for _ in range(3):
        ema.on_optimizer_step(t)
    monkeypatch.undo()
    assert reads == [] and ema.updates == 3


# ----------------------------------------------------------------------------------------------
# 2 processes (DDP, gloo): every rank holds the same average, equal to AveragedModel's


@pytest.mark.slow
def test_ema_under_ddp_equals_a_hand_averaged_model_on_every_rank(tmp_path):
    from test_distributed import run_child

    run_child(tmp_path / "ddp", 2, batch=8, epochs=2, ema=0.9, top_k=2)
    ranks = [torch.load(tmp_path / "ddp" / f"ema.{r}.pt", weights_only=True) for r in range(2)]
    for name, t in ranks[0]["averaged"].items():
        assert torch.equal(t, ranks[1]["averaged"][name]), name  # every rank: the same average
        assert torch.allclose(t, ranks[0]["hand"][name], rtol=0, atol=1e-6), name
    assert ranks[0]["updates"] == 2 * 6  # 96 samples / (2 x 8) per step, 2 epochs
    # validation reported the averaged weights' loss (rank 0 validated the hand average on the whole set)
    assert ranks[0]["val_loss"] == pytest.approx(ranks[0]["hand_val_loss"], abs=1e-6)
    files = _top_k_files(tmp_path / "ddp")
    assert len(files) == 2  # rank 0 wrote them, once


# ----------------------------------------------------------------------------------------------
# CLI


def _cli_config(tmp_path, **train):
    cfg = {"data": {"source": "digits"}, "model": {"name": "mlp", "hidden": [16]},
           "train": {"epochs": 3, "batch_size": 128, "progress": False, "device": "cpu", **train},
           "run": {"out_dir": str(tmp_path), "name": "r"}, "log": {"plot": False}}
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cli_save_top_k_and_ema_decay(tmp_path):
    cfg = _cli_config(tmp_path)
    proc = run_cli("fit", cfg, "train.save_top_k=2", "train.ema_decay=0.99")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = tmp_path / "r"
    files = _top_k_files(folder)
    assert len(files) == 2 and all(re.fullmatch(r"epoch\d{3}-step\d+-val_acc_[0-9.]+\.pt", f) for f in files)
    last = torch.load(folder / "last.pt", weights_only=True)
    ema_state = next(s for s in last["callbacks"] if "averaged" in s)
    assert ema_state["decay"] == 0.99 and ema_state["updates"] > 0
    summary = json.loads((folder / "summary.json").read_text())
    assert "EMA" in summary["trainer"]["callbacks"] and summary["trainer"]["save_top_k"] == 2


@pytest.mark.parametrize("override, key", [("train.ema_decay=1.0", "train.ema_decay"), ("train.ema_decay=0", "train.ema_decay"),
                                           ("train.save_top_k=0", "train.save_top_k")])
def test_cli_invalid_top_k_and_decay_are_one_clear_line(tmp_path, override, key):
    proc = run_cli("fit", _cli_config(tmp_path), override)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and key in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_ema_under_fsdp_resumes_bit_identical_and_equals_ddp(tmp_path):
    from test_distributed import run_child

    opts = dict(batch=8, epochs=2, blocks=True, ema=0.9, top_k=2)
    run_child(tmp_path / "fsdp", 2, strategy="fsdp", **opts)
    run_child(tmp_path / "cut", 2, strategy="fsdp", stop_after=1, **opts)  # a fresh model and Trainer resume
    run_child(tmp_path / "ddp", 2, strategy="ddp", **opts)
    fsdp = [torch.load(tmp_path / "fsdp" / f"ema.{r}.pt", weights_only=True) for r in range(2)]
    cut = torch.load(tmp_path / "cut" / "ema.0.pt", weights_only=True)
    ddp = torch.load(tmp_path / "ddp" / "ema.0.pt", weights_only=True)
    assert fsdp[0]["updates"] == cut["updates"] == 12
    for name, t in fsdp[0]["averaged"].items():  # each rank averaged its shards; gathered, they are the whole
        assert torch.equal(t, fsdp[1]["averaged"][name]) and torch.equal(t, cut["averaged"][name]), name
        assert torch.allclose(t, ddp["averaged"][name], rtol=0, atol=1e-6), name
    assert fsdp[0]["val_loss"] == cut["val_loss"]
    assert _top_k_files(tmp_path / "fsdp") == _top_k_files(tmp_path / "cut") and len(_top_k_files(tmp_path / "cut")) == 2
