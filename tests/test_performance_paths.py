"""Structural properties of the fast paths: compile, precision, and (with CUDA) zero syncs per step.

Speed itself is measured by benchmarks/compare.py, never by timed unit tests.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_blobs, tiny_mlp

from trainval import Callback, Trainer

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.slow
def test_compiled_run_checkpoint_loads_into_plain_model(tmp_path):
    X, y = make_blobs(n=64)
    model = tiny_mlp()
    tr = Trainer(model, max_epochs=1, out_dir=str(tmp_path), batch_size=16, progress=False, plot=False, compile=True)
    tr.fit((X, y), (X, y))
    state = torch.load(tmp_path / "best.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state)
    plain = tiny_mlp(seed=9)
    plain.load_state_dict(state)  # strict: every key matches a plain model
    last = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert set(last) == set(plain.state_dict())


def test_bf16_autocast_trains_on_cpu(tmp_path):
    X, y = make_blobs(n=96)
    model = tiny_mlp()
    seen = []
    tr = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05), max_epochs=3, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False, precision="bf16")
    orig = tr.train_step

    def spy(x, y):
        loss, logits = orig(x, y)
        seen.append(logits.dtype)
        return loss, logits

    tr.train_step = spy
    history = tr.fit((X, y), (X, y))
    assert set(seen) == {torch.bfloat16} and history[-1]["val_acc"] > 0.8
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights stay fp32


def test_fp16_needs_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    from trainval.errors import ConfigError

    X, y = make_blobs(n=20)
    with pytest.raises(ConfigError, match="fp16' needs a CUDA device"):
        Trainer(tiny_mlp(), out_dir=str(tmp_path), precision="fp16", progress=False).fit((X, y), (X, y))


class SyncDebug(Callback):
    """Sync-debug mode "error" for the training steps of epoch 2 (after the first warm-up epoch)."""

    def __init__(self):
        self.steps = 0

    def on_epoch_start(self, trainer, epoch):
        if epoch == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, i):
        if trainer.epoch + 1 == 2:
            self.steps += 1
            if i + 1 == len(trainer.train_loader):
                torch.cuda.set_sync_debug_mode(0)  # the epoch-end read is the one intended sync


@cuda
@pytest.mark.parametrize("precision, data", [("fp32", "on_device"), ("bf16", "on_device"), ("fp16", "on_device"),
                                             ("fp32", "pinned"), ("fp32", "dataset")])
def test_zero_host_device_syncs_per_training_step(tmp_path, monkeypatch, precision, data):
    monkeypatch.setattr(Trainer, "poll_interval_s", 1e9)
    X, y = make_blobs(n=512, d=32, classes=10)
    train = torch.utils.data.TensorDataset(X, y) if data == "dataset" else (X, y)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    probe = SyncDebug()
    tr = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True), max_epochs=2, out_dir=str(tmp_path),
                 batch_size=64, progress=False, plot=False, device="cuda", precision=precision, grad_clip=1.0,
                 callbacks=[probe], on_device=data == "on_device")
    try:
        tr.fit(train, (X, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert probe.steps == 8


@cuda
@pytest.mark.parametrize("task", ["multiclass", "binary", "multilabel", "regression"])
def test_zero_host_device_syncs_per_step_for_every_task(tmp_path, monkeypatch, task):
    """Several metrics per task (acc, f1_macro, top5_acc; acc, f1, auroc; f1_micro, f1_macro, exact_match;
    mse, mae, r2): their per-step updates are device work only."""
    from conftest import TASK_METRICS, task_problem

    monkeypatch.setattr(Trainer, "poll_interval_s", 1e9)
    model, loss_fn, X, y = task_problem(task, n=512)
    probe = SyncDebug()
    tr = Trainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loss_fn, metrics=TASK_METRICS[task],
                 max_epochs=2, out_dir=str(tmp_path), batch_size=64, progress=False, plot=False, device="cuda",
                 callbacks=[probe], on_device=True)
    try:
        tr.fit((X, y), (X, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert probe.steps == 8


@cuda
def test_pinned_non_blocking_path(tmp_path):
    from trainval.data import epoch_indices

    X, y = make_blobs(n=256)
    tr = Trainer(tiny_mlp(), max_epochs=1, out_dir=str(tmp_path), batch_size=32, progress=False, plot=False,
                 device="cuda", on_device=False)
    tr.fit((X, y), (X, y))
    loader = tr.train_loader
    assert loader.X.is_pinned() and loader.X.device.type == "cpu" and loader._non_blocking
    # every shuffled batch is gathered into pinned memory, so its copy to the GPU is asynchronous
    sources, move = [], loader._move
    loader._move = lambda t: (sources.append(t.is_pinned()), move(t))[1]
    state = loader.generator.get_state()
    batches = [(xb.cpu(), yb.cpu()) for xb, yb in loader]
    assert len(sources) == 2 * len(batches) and all(sources)
    loader.generator.set_state(state)
    order = epoch_indices(len(X), shuffle=True, generator=loader.generator)
    assert torch.equal(torch.cat([b[0] for b in batches]), X[order])
    assert torch.equal(torch.cat([b[1] for b in batches]), y[order])
    tr2 = Trainer(tiny_mlp(), max_epochs=1, out_dir=str(tmp_path / "b"), batch_size=32, progress=False, plot=False,
                  device="cuda", on_device=True)
    tr2.fit((X, y), (X, y))
    assert tr2.train_loader.X.device.type == "cuda"


@cuda
def test_sync_probe_catches_one_item_per_step(tmp_path, monkeypatch):
    """The control for the test above: a train_step that reads its loss (``.item()``) is caught."""
    monkeypatch.setattr(Trainer, "poll_interval_s", 1e9)

    class Chatty(Trainer):
        def train_step(self, x, y):
            loss, logits = super().train_step(x, y)
            self.last_loss = loss.item()  # the host waits for the GPU here, on every step
            return loss, logits

    X, y = make_blobs(n=256, d=32, classes=10)
    model = torch.nn.Sequential(torch.nn.Linear(32, 10))
    probe = SyncDebug()
    tr = Chatty(model, max_epochs=2, out_dir=str(tmp_path), batch_size=64, progress=False, plot=False,
                device="cuda", callbacks=[probe], on_device=True)
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            tr.fit((X, y), (X, y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert probe.steps == 0  # it failed on the first step of the checked epoch
