"""The loop's semantics, each proven by a test that fails when the behaviour is broken."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import DEVICE, TASK_METRICS, make_blobs, task_problem, tiny_mlp
from torch import nn

from trainval import Callback, Trainer
from trainval.errors import DataError, NonFiniteLossError


class Probe(nn.Module):
    """Records (phase marker, self.training, grad enabled) on every forward, for itself and a child."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1))
        self.child = ChildProbe(16, classes)
        self.records: list[tuple[float, bool, bool]] = []
        self.recording = False

    def forward(self, x):
        if self.recording:
            # the last feature marks the split: 0 train, 1 val, 2 test/predict
            for marker in x[:, -1].unique().tolist():
                self.records.append((marker, self.training, torch.is_grad_enabled()))
        return self.child(self.body(x))


class ChildProbe(nn.Module):
    def __init__(self, d, classes):
        super().__init__()
        self.fc = nn.Linear(d, classes)
        self.records: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.records.append((self.training, torch.is_grad_enabled()))
        return self.fc(x)


class StartRecording(Callback):
    def on_fit_start(self, trainer):
        trainer.model.recording = True


def marked(X, marker):
    X = X.clone()
    X[:, -1] = marker
    return X


def test_train_mode_with_grad_and_eval_mode_without(tmp_path):
    X, y = make_blobs(n=90)
    model = Probe()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_epochs=2, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False, callbacks=[StartRecording()])
    tr.fit((marked(X, 0), y), (marked(X, 1), y))
    tr.test((marked(X, 2), y))
    tr.predict(marked(X, 2))
    phases = {0.0: set(), 1.0: set(), 2.0: set()}
    for marker, training, grad in model.records:
        phases[marker].add((training, grad))
    assert phases[0.0] == {(True, True)}
    assert phases[1.0] == {(False, False)}
    assert phases[2.0] == {(False, False)}
    # the child module saw both modes (so it is really being switched, not left alone)
    assert set(model.child.records) == {(True, True), (False, False)}


def test_eval_restores_each_submodules_own_mode(tmp_path):
    X, y = make_blobs(n=60)
    model = Probe()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_epochs=1, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False)
    tr.fit((X, y), (X, y))
    model.train()
    model.body[1].eval()  # the user froze a BatchNorm
    before = [m.training for m in model.modules()]
    tr.validate((X, y))
    tr.test((X, y))
    tr.predict(X)
    assert [m.training for m in model.modules()] == before
    assert model.body[1].training is False and model.training is True


def test_fit_leaves_modes_as_it_found_them(tmp_path):
    X, y = make_blobs(n=60)
    model = Probe()
    model.body[1].eval()
    before = [m.training for m in model.modules()]
    Trainer(model, max_epochs=1, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False).fit((X, y), (X, y))
    assert [m.training for m in model.modules()] == before


def _plain_loop(model, X, y, placement, epochs, batch_size, seed, lr):
    """The notes' loop in plain PyTorch, with zero_grad at one of its three allowed places."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g).to(X.device)
        for i in range(0, len(X), batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = X.index_select(0, idx), y.index_select(0, idx)
            if placement == "start":
                opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            if placement == "before_backward":
                opt.zero_grad()
            loss.backward()
            opt.step()
            if placement == "after_step":
                opt.zero_grad()
    return model


def test_zero_grad_placements_and_trainval_give_identical_weights(tmp_path):
    X, y = make_blobs(n=100)
    init = tiny_mlp(dropout=0.2)
    results = {}
    for placement in ("start", "before_backward", "after_step"):
        results[placement] = _plain_loop(copy.deepcopy(init).to(DEVICE), X.to(DEVICE), y.to(DEVICE), placement,
                                         epochs=3, batch_size=16, seed=7, lr=0.05)
    model = copy.deepcopy(init)
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=3, seed=7,
                 out_dir=str(tmp_path), batch_size=16, progress=False, plot=False, monitor="train_loss", device=DEVICE)
    tr.fit((X, y))
    results["trainval"] = model
    reference = results["start"].state_dict()
    for name, m in results.items():
        for k, v in m.state_dict().items():
            assert torch.equal(v, reference[k]), f"{name}: {k} differs"
    # and training really changed the weights
    assert not torch.equal(init.state_dict()["0.weight"], reference["0.weight"].cpu())


def test_zero_grad_between_backward_and_step_would_be_caught():
    """The comparison above can fail: zeroing between backward and step leaves the weights as they were."""
    X, y = make_blobs(n=40)
    model = tiny_mlp()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.CrossEntropyLoss()(model(X), y)
    loss.backward()
    opt.zero_grad()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_epoch_metrics_are_exact_means_over_samples(tmp_path):
    X, y = make_blobs(n=10)
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), max_epochs=1, out_dir=str(tmp_path),
                 batch_size=4, progress=False, plot=False, device=DEVICE)  # batches of 4, 4, 2; lr 0 keeps the weights
    history = tr.fit((X, y), (X, y))
    X, y = X.to(DEVICE), y.to(DEVICE)
    with torch.no_grad():
        logits = model(X)
        exact_loss = nn.CrossEntropyLoss()(logits, y).item()
        exact_acc = (logits.argmax(1) == y).sum().item() / len(y)
        batch_means = [nn.CrossEntropyLoss()(model(X[i : i + 4]), y[i : i + 4]).item() for i in range(0, 10, 4)]
    row = history[0]
    assert row["val_loss"] == pytest.approx(exact_loss, rel=1e-6)
    assert row["val_acc"] == pytest.approx(exact_acc, abs=1e-12)
    assert row["train_loss"] == pytest.approx(exact_loss, rel=1e-6)
    assert row["train_acc"] == pytest.approx(exact_acc, abs=1e-12)
    # the mean of batch means is measurably different here, so the test can tell them apart
    assert abs(sum(batch_means) / 3 - exact_loss) > 1e-4


@pytest.mark.parametrize("task", [None, "multiclass", "binary", "multilabel", "regression"])
def test_no_host_sync_per_batch(tmp_path, monkeypatch, task):
    """item/cpu/tolist/bool/numpy calls during fit do not grow with the number of batches (every task,
    several metrics each: acc, f1_macro, top5_acc; f1, auroc; f1_micro, exact_match; mse, mae, r2)."""
    counts = {"n": 0}
    for name in ("item", "cpu", "tolist", "__bool__", "numpy", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _orig=original, **k):
            counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    monkeypatch.setattr(Trainer, "poll_interval_s", 1e9)  # the time-based NaN poll is tested elsewhere

    def syncs(n, batch_size):
        if task is None:  # the default: multiclass accuracy
            (X, y), model, loss_fn, metrics = make_blobs(n=n), tiny_mlp(), None, None
        else:
            model, loss_fn, X, y = task_problem(task, n=n)
            metrics = TASK_METRICS[task]
        tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, metrics=metrics, max_epochs=2,
                     out_dir=str(tmp_path / f"r{n}_{batch_size}"), batch_size=batch_size, progress=False, plot=False)
        counts["n"] = 0
        tr.fit((X, y), (X, y))
        return counts["n"]

    few = syncs(64, 32)      # 2 batches per epoch
    many = syncs(640, 8)     # 80 batches per epoch
    # 2 vs 80 batches per epoch: one sync per batch would add 156. The counts may differ by the one
    # weights-finite check of an epoch whose metric improved (up to 2 epochs), which depends on the data.
    assert abs(few - many) <= 2, (few, many)
    assert few < 100


def test_epoch_and_best_lines(tmp_path, capsys):
    X, y = make_blobs(n=60)
    tr = Trainer(tiny_mlp(), max_epochs=3, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False)
    tr.fit((X, y), (X, y))
    out = capsys.readouterr().out
    lines = re.findall(r"^\[(\d{3})/003\] Train Acc: (\d\.\d{6}) Loss: (\d+\.\d{6}) \| Val Acc: (\d\.\d{6}) loss: (\d+\.\d{6})$",
                       out, re.M)
    assert [int(e) for e, *_ in lines] == [1, 2, 3]
    first = re.search(r"^saving best model \(val_acc (\d\.\d{4})\) -> (.+best\.pt)$", out, re.M)
    assert first and first.group(2) == str(tmp_path / "best.pt")
    assert (tmp_path / "last.pt").exists() and (tmp_path / "best.pt").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and set(state["model"]) == set(tr.model.state_dict())


class Wreck(Callback):
    """At epoch `at`, scramble the weights and stop learning: the last epoch is worse than the best."""

    def __init__(self, at):
        self.at = at

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.at:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.copy_(torch.randn_like(p) * 3)
            for g in trainer.optimizer.param_groups:
                g["lr"] = 0.0


def test_test_and_predict_use_best_not_last(tmp_path):
    X, y = make_blobs(n=120)
    Xv, yv = make_blobs(n=60, seed=0)
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.2), max_epochs=4, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False, callbacks=[Wreck(4)], device=DEVICE)
    history = tr.fit((X, y), (Xv, yv))
    assert history[-1]["val_acc"] < tr.best_value  # the run ends worse than its best
    last_preds = model(Xv.to(DEVICE)).argmax(1).cpu()
    metrics = tr.test((Xv, yv))
    assert metrics["test_acc"] == pytest.approx(tr.best_value, abs=1e-12)
    preds = tr.predict(Xv)
    best = tiny_mlp()
    best.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True, map_location="cpu")["model"])
    best.to(DEVICE).eval()
    with torch.no_grad():
        assert torch.equal(preds, best(Xv.to(DEVICE)).argmax(1).cpu())
    assert preds.dtype == torch.int64 and not torch.equal(preds, last_preds)


class NanLossAt:
    """A loss that returns NaN at one training step (0-based count of training calls)."""

    def __init__(self, at):
        self.at, self.calls = at, 0
        self.inner = nn.CrossEntropyLoss()

    def __call__(self, logits, y):
        loss = self.inner(logits, y)
        if torch.is_grad_enabled():
            if self.calls == self.at:
                loss = loss * float("nan")
            self.calls += 1
        return loss


def test_nonfinite_loss_stops_with_epoch_and_step(tmp_path):
    X, y = make_blobs(n=64)  # 4 batches of 16 per epoch
    tr = Trainer(tiny_mlp(), loss_fn=NanLossAt(6), task="multiclass", max_epochs=3, out_dir=str(tmp_path), batch_size=16,
                 progress=False, plot=False)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 3 of 4"):
        tr.fit((X, y), (X, y))
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(tr.history) == 1


class PoisonUnusedParam(Callback):
    def on_train_batch_end(self, trainer, batch_index):
        if trainer.epoch + 1 == 2:
            with torch.no_grad():
                trainer.model.unused.fill_(float("nan"))


def test_nonfinite_weights_never_saved_as_best(tmp_path):
    X, y = make_blobs(n=64)
    model = tiny_mlp()
    model.unused = nn.Parameter(torch.zeros(3))  # not in the forward: the loss stays finite
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), max_epochs=2, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False, monitor="val_loss", callbacks=[PoisonUnusedParam()])
    # the loss stays finite, but the run stops at the end of epoch 2 rather than finish with NaN weights
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at epoch 2"):
        tr.fit((X, y), (X, y))
    assert len(tr.history) == 1
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["unused"]).all()
    last = torch.load(tmp_path / "last.pt", weights_only=True)  # nothing from epoch 2 was saved
    assert last["epoch"] == 1 and torch.isfinite(last["model"]["unused"]).all()


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty", r"train data is empty"),
        ("labels_out_of_range", r"train labels must lie in \[0, 3\).*sample 5 has label 3"),
        ("negative_label", r"sample 0 has label -1"),
        ("bad_output_shape", r"must output logits \[B, C, \*\]"),
        ("length_mismatch", r"20 rows of X but 19 labels"),
        ("float_labels", r"must be integer class ids; sample 2 has label 0.5"),
    ],
)
def test_bad_inputs_fail_before_the_first_step(tmp_path, case, match):
    X, y = make_blobs(n=20)
    model = tiny_mlp()
    if case == "empty":
        X, y = X[:0], y[:0]
    elif case == "labels_out_of_range":
        y = y.clone()
        y[5] = 3
    elif case == "negative_label":
        y = y.clone()
        y[0] = -1
    elif case == "bad_output_shape":
        model = nn.Sequential(tiny_mlp(), nn.Flatten(0))
    elif case == "length_mismatch":
        y = y[:19]
    elif case == "float_labels":
        y = y.float()
        y[2] = 0.5
    before = copy.deepcopy(model.state_dict())
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5), max_epochs=1, out_dir=str(tmp_path),
                 batch_size=8, progress=False, plot=False, monitor="train_acc", device=DEVICE)
    with pytest.raises(DataError, match=match):
        tr.fit((X, y))
    assert all(torch.equal(before[k], v.cpu()) for k, v in model.state_dict().items())
    assert not (tmp_path / "last.pt").exists()


def test_same_seed_same_bits_other_seed_other_bits(tmp_path):
    X, y = make_blobs(n=96)

    def run(seed, name):
        model = tiny_mlp(dropout=0.3, batchnorm=True)
        torch.manual_seed(hash(name) % 1000)  # disturb the global RNG: the trainer must seed it
        Trainer(model, torch.optim.Adam(model.parameters(), lr=0.01), max_epochs=2, seed=seed, out_dir=str(tmp_path / name),
                batch_size=16, progress=False, plot=False).fit((X, y), (X, y))
        return model.state_dict()

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_cuda_device_refused_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from trainval.errors import ConfigError

    X, y = make_blobs(n=20)
    with pytest.raises(ConfigError, match="CUDA is not available"):
        Trainer(tiny_mlp(), device="cuda", out_dir=str(tmp_path), progress=False).fit((X, y), (X, y))


def test_default_device_is_cpu_without_cuda():
    tr = Trainer(tiny_mlp(), progress=False)
    assert tr.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
