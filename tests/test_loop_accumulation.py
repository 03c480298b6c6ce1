"""Gradient accumulation equals the large batch (issue 19, "Exactness").

Each micro-batch's loss is weighted by its share of the whole group's count of samples or of non-ignored
targets (over every micro-batch and every rank), so ``batch B x accumulate_steps k`` takes the step of
``batch k*B``: with ``ignore_index`` tokens spread unevenly, with a short last group, under two gloo
processes whose counts differ, and over a stream whose last group is known only at its end. Every test
compares float64 weights to 1e-6 and carries a control that shows the old rule (the mean of the
micro-batch means) lands elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import pytest
import torch
from conftest import DEVICE, REPO
from test_distributed import torchrun, torchrun_ok
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from trainval import Callback, Trainer
from trainval.errors import Interrupted

CHILD = os.path.join(REPO, "tests", "helpers", "accum_child.py")
_spec = importlib.util.spec_from_file_location("accum_child", CHILD)
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

TOL = 1e-6


def trained(data, out_dir, *, batch, accumulate=1, epochs=1, loss_fn=None, model=None, device=DEVICE, **kw):
    model = model or child.Tagger()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), loss_fn,
                      max_epochs=epochs, batch_size=batch, accumulate_steps=accumulate, seed=7,
                      out_dir=str(out_dir), monitor="train_loss", metrics=["acc"], progress=False, plot=False,
                      device=device, **kw)
    trainer.fit(data)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, trainer


def hand_loop(X, y, *, groups, epochs=1, seed=7, shuffle=True, loss_fn=None, mean_of_means=False):
    """Plain PyTorch. ``groups``: each optimizer step's list of micro-batch sizes, per epoch (the Trainer's
    permutation is drawn from a generator seeded with ``seed``). The large batch: one backward of the loss of
    the group's samples at once. ``mean_of_means``: the old rule, each micro-batch's mean divided by the
    number of micro-batches (the control)."""
    model = child.Tagger().to(DEVICE)
    X, y = X.to(DEVICE), y.to(DEVICE)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=g) if shuffle else torch.arange(len(X))
        start = 0
        for sizes in groups:
            if mean_of_means:
                for size in sizes:
                    idx = order[start : start + size].to(DEVICE)
                    (loss_fn(model(X[idx]), y[idx]) / len(sizes)).backward()
                    start += size
            else:
                idx = order[start : start + sum(sizes)].to(DEVICE)
                loss_fn(model(X[idx]), y[idx]).backward()
                start += sum(sizes)
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def max_diff(a, b) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------
# One process


@pytest.mark.parametrize("class_weights", [False, True])
def test_ignored_tokens_spread_unevenly_accumulate_to_the_large_batch(tmp_path, class_weights):
    # 8 sequences of 6 tags, 1 to 6 of them counted: one step at batch 8 vs batch 4 x accumulate 2, whose
    # two micro-batches count different numbers of tokens (or of class weight).
    X, y = child.data(8)
    weight = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64)

    def loss():
        return nn.CrossEntropyLoss(weight=weight.to(DEVICE)) if class_weights else None

    big, _ = trained((X, y), tmp_path / "big", batch=8, loss_fn=loss())
    small, _ = trained((X, y), tmp_path / "small", batch=4, accumulate=2, loss_fn=loss())
    hand = hand_loop(X, y, groups=[[8]], loss_fn=loss())
    assert max_diff(big, hand) < TOL
    assert max_diff(small, big) < TOL
    # the micro-batches really count differently, so the old rule is a different step
    order = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    counted = [int((y[order[:4]] != -100).sum()), int((y[order[4:]] != -100).sum())]
    assert counted[0] != counted[1]
    old = hand_loop(X, y, groups=[[4, 4]], loss_fn=loss(), mean_of_means=True)
    assert max_diff(old, hand) > 1e-3


def test_a_short_last_group_equals_the_large_batch(tmp_path):
    # 14 samples, batch 4 x accumulate 2: groups of 4 + 4 and 4 + 2 samples (the last batch short), two
    # epochs with momentum; batch 8 takes 8 then 6 samples: the same steps.
    X, y = child.data(14)
    y[:, 1:] = -100  # one counted tag per sample: a mean over samples (as a classifier's)
    small, _ = trained((X, y), tmp_path / "small", batch=4, accumulate=2, epochs=2)
    big, _ = trained((X, y), tmp_path / "big", batch=8, epochs=2)
    hand = hand_loop(X, y, groups=[[4, 4], [4, 2]], epochs=2)
    assert max_diff(small, hand) < TOL
    assert max_diff(big, hand) < TOL
    old = hand_loop(X, y, groups=[[4, 4], [4, 2]], epochs=2, mean_of_means=True)
    assert max_diff(old, hand) > 1e-3


class Stream(IterableDataset):
    """``(X[i], y[i])`` in order: a stream whose length the loop learns only at its end."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        for i in range(len(self.X)):
            yield self.X[i], self.y[i]


def test_a_stream_whose_last_group_is_short_accumulates_to_the_large_batch(tmp_path):
    # 14 sequences in stream order, batch 4 x accumulate 2: groups 4 + 4 and 4 + 2 (the stream's end is
    # read ahead with the group), ignored tags spread unevenly; equal to batch 8 over a map-style
    # DataLoader in the same order, and to the hand loop.
    X, y = child.data(14)
    stream, _ = trained(Stream(X, y), tmp_path / "stream", batch=4, accumulate=2, epochs=2)
    mapped, _ = trained(DataLoader(TensorDataset(X, y), batch_size=8), tmp_path / "map", epochs=2, batch=8)
    hand = hand_loop(X, y, groups=[[4, 4], [4, 2]], epochs=2, shuffle=False)
    assert max_diff(stream, hand) < TOL
    assert max_diff(mapped, hand) < TOL
    old = hand_loop(X, y, groups=[[4, 4], [4, 2]], epochs=2, shuffle=False, mean_of_means=True)
    assert max_diff(old, hand) > 1e-3


def test_a_loss_whose_denominator_is_unknown_keeps_the_mean_of_micro_batch_means(tmp_path):
    # A user's loss (reduction 'mean', nothing to say what it averages over): documented, today's rule.
    X, y = child.data(8)
    ours, _ = trained((X, y), tmp_path / "user", batch=4, accumulate=2, loss_fn=child.UserLoss(), task="multiclass")
    old = hand_loop(X, y, groups=[[4, 4]], mean_of_means=True)
    assert max_diff(ours, old) < TOL
    assert max_diff(ours, hand_loop(X, y, groups=[[8]])) > 1e-3


class NoisyTokens(Dataset):
    """Token ids with a random token swapped in from the global generator (num_workers=0: in this process),
    so that reading a group ahead must leave the random streams where an unbroken run has them."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        x = self.X[i].clone()
        x[int(torch.randint(0, x.shape[0], ()))] = int(torch.randint(0, child.VOCAB, ()))
        return x, self.y[i]


class Dropped(child.Tagger):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.embed(x)))).transpose(1, 2)


class SigintAt(Callback):
    def __init__(self, batch):
        self.batch = batch

    def on_train_batch_end(self, trainer, batch_index):
        if trainer.epoch == 1 and batch_index == self.batch:
            os.kill(os.getpid(), signal.SIGINT)


def test_a_stop_inside_a_group_saves_at_its_end_and_resumes_bit_identical(tmp_path):
    # 22 samples, batch 3 x accumulate 3 (groups of 9, 9 and 4 samples), random data and dropout: SIGINT
    # after the 5th batch of epoch 2 (inside the second group) stops at the group's end (batch 6); the
    # resumed run ends with the unbroken run's bits.
    X, y = child.data(22)
    data = NoisyTokens(X, y)
    opts = dict(batch=3, accumulate=3, epochs=3, device="cpu")
    ref, _ = trained(data, tmp_path / "ref", model=Dropped(), **opts)
    with pytest.raises(Interrupted):
        trained(data, tmp_path / "cut", model=Dropped(), callbacks=[SigintAt(4)], **opts)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (state["epoch"], state["loop"]["batch_in_epoch"], state["loop"]["global_step"]) == (1, 6, 5)
    model = Dropped()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), max_epochs=3, batch_size=3,
                      accumulate_steps=3, seed=7, out_dir=str(tmp_path / "cut"), monitor="train_loss",
                      metrics=["acc"], progress=False, plot=False, device="cpu")
    trainer.fit(data, resume=True)
    resumed = {k: v.detach() for k, v in model.state_dict().items()}
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


# ------------------------------------------------------------------------------------------------
# Two gloo processes


@pytest.mark.slow
def test_two_processes_with_uneven_counts_equal_one_process_with_the_global_batch(tmp_path):
    # 16 sequences, global batch 8 per optimizer step, 2 epochs. Two ranks each take every other sample
    # of the shared permutation, so their counted tags differ; with batch 2 x accumulate 2 (DDP and FSDP)
    # and with batch 4 (no accumulation) the weights equal one process's at batch 8.
    one = {k: v.detach() for k, v in child.run(str(tmp_path / "one"), batch=8, device="cpu").items()}
    results = {}
    runs = {"accumulate": dict(batch=2, accumulate=2), "plain": dict(batch=4),
            "fsdp": dict(batch=2, accumulate=2, strategy="fsdp"), "user_loss": dict(batch=4, user_loss=True)}
    for name, opts in runs.items():
        out = tmp_path / name
        out.mkdir()
        proc = torchrun([CHILD, str(out), json.dumps(opts)], env={"TRAINVAL_DIST_TIMEOUT": "60"})
        assert torchrun_ok(proc, str(out)), proc.stdout + proc.stderr
        results[name] = torch.load(out / "weights.pt", weights_only=True)
    assert max_diff(results["accumulate"], one) < TOL
    assert max_diff(results["plain"], one) < TOL
    assert max_diff(results["fsdp"], one) < TOL  # FSDP2 averages the ranks' gradients as DDP does
    # the control: the ranks' counts do differ, so averaging the ranks' means (a loss whose denominator
    # trainval cannot know) lands elsewhere
    assert max_diff(results["user_loss"], one) > 1e-3
