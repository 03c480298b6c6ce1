"""A training DataLoader's own sampler and batch_sampler are honoured: on one process as given, on several
processes split per rank from one draw list per epoch; resume redraws the same lists."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import REPO
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset, WeightedRandomSampler

from trainval import Callback, Trainer, seed_everything
from trainval.errors import Interrupted

CHILD = os.path.join(REPO, "tests", "helpers", "sampler_child.py")
N = 40


def id_data(n=N):
    """Column 0 is the sample's id (the probe reads it back); columns 1-4 are features."""
    g = torch.Generator().manual_seed(0)
    X = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n, 4, generator=g)], dim=1)
    return X, (X[:, 1] > 0).long()


class Probe(nn.Module):
    """Records the sample ids of its training forwards; dropout draws from the global RNG between batches."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))
        self.seen: list[list[int]] = []

    def forward(self, x):
        if self.training:
            self.seen.append(x[:, 0].long().tolist())
        return self.net(x[:, 1:])


def trainer(model, tmp_path, epochs=2, **kw):
    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_epochs=epochs, out_dir=str(tmp_path),
                   seed=3, progress=False, plot=False, monitor="train_loss", device="cpu", **kw)


def hand_loop(model, loader, epochs, seed=3):
    """The plain PyTorch loop over the same DataLoader, seeded like trainval (seed_everything(seed))."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seed_everything(seed)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model


def weighted_loader(generator=None):
    X, y = id_data()
    weights = torch.zeros(N)
    weights[:4] = 1.0  # only samples 0-3 can be drawn
    return DataLoader(TensorDataset(X, y), batch_size=8,
                      sampler=WeightedRandomSampler(weights, num_samples=N, replacement=True, generator=generator))


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_weighted_sampler_is_honoured_and_equals_the_hand_loop(tmp_path):
    model = Probe()
    trainer(model, tmp_path).fit(weighted_loader())
    seen = [i for batch in model.seen for i in batch]
    assert len(seen) == 2 * N and set(seen) <= {0, 1, 2, 3}  # (today: all 40 samples, in order)
    assert len(set(seen)) == 4
    reference = hand_loop(Probe(), weighted_loader(), epochs=2)
    assert same_weights(model, reference)
    assert reference.seen == model.seen  # the same batches, in the same order
    # the control: another seed draws other batches and ends on other weights
    other = hand_loop(Probe(), weighted_loader(), epochs=2, seed=4)
    assert other.seen != model.seen and not same_weights(model, other)


class FixedBatches(Sampler):
    """A custom batch_sampler: uneven batches in an order of its own."""

    BATCHES = [[5, 1, 9], [0], [33, 2, 17, 8, 30], [12, 12, 4], [39, 38]]

    def __iter__(self):
        return iter([list(b) for b in self.BATCHES])

    def __len__(self):
        return len(self.BATCHES)


def test_custom_batch_sampler_is_honoured(tmp_path):
    X, y = id_data()
    model = Probe()
    trainer(model, tmp_path).fit(DataLoader(TensorDataset(X, y), batch_sampler=FixedBatches()))
    assert model.seen == FixedBatches.BATCHES * 2  # (today: a DataError)
    reference = hand_loop(Probe(), DataLoader(TensorDataset(X, y), batch_sampler=FixedBatches()), epochs=2)
    assert same_weights(model, reference)


def test_shuffle_true_and_false_keep_trainvals_own_order(tmp_path):
    """The samplers a DataLoader gets from shuffle=False/True are still trainval's seeded order."""
    X, y = id_data()
    ordered = Probe()
    trainer(ordered, tmp_path / "a", epochs=1).fit(DataLoader(TensorDataset(X, y), batch_size=8))
    assert [i for b in ordered.seen for i in b] == list(range(N))
    shuffled, again = Probe(), Probe()
    trainer(shuffled, tmp_path / "b", epochs=1).fit(DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True))
    trainer(again, tmp_path / "c", epochs=1).fit(DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True,
                                                            generator=torch.Generator().manual_seed(99)))
    order = [i for b in shuffled.seen for i in b]
    assert sorted(order) == list(range(N)) and order != list(range(N))
    assert again.seen == shuffled.seen  # trainval's generator (seed=3) draws it, not the DataLoader's


class StopAt(Callback):
    """SIGTERM to this process after batch ``batch`` of epoch ``epoch``: trainval saves last.pt mid-epoch and stops."""

    def __init__(self, epoch, batch):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, batch_index):
        if trainer.epoch + 1 == self.epoch and batch_index + 1 == self.batch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("own_generator", [False, True])
def test_mid_epoch_resume_with_a_custom_sampler_is_bit_identical(tmp_path, own_generator):
    def loader():
        return weighted_loader(torch.Generator().manual_seed(5) if own_generator else None)

    ref = Probe()
    trainer(ref, tmp_path / "ref", epochs=3).fit(loader())
    assert {i for b in ref.seen for i in b} <= {0, 1, 2, 3}  # the sampler's draws (today: every sample)
    cut = Probe()
    with pytest.raises(Interrupted):
        trainer(cut, tmp_path / "cut", epochs=3, callbacks=[StopAt(epoch=2, batch=2)]).fit(loader())
    seed_everything(99)  # the resumed run owes nothing to this process's RNG state
    resumed = Probe(seed=1)
    history = trainer(resumed, tmp_path / "cut", epochs=3).fit(loader(), resume=True)
    assert cut.seen + resumed.seen == ref.seen  # epoch 2 went on with its third batch, then epoch 3
    assert same_weights(ref, resumed)
    assert history[-1]["train_loss"] == torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["loop"][
        "history"][-1]["train_loss"]


def test_epoch_boundary_resume_with_a_sampler_generator_is_bit_identical(tmp_path):
    def loader():
        return weighted_loader(torch.Generator().manual_seed(5))

    ref = Probe()
    trainer(ref, tmp_path / "ref", epochs=3).fit(loader())
    assert {i for b in ref.seen for i in b} <= {0, 1, 2, 3}  # the sampler's draws (today: every sample)
    first = Probe()
    trainer(first, tmp_path / "cut", epochs=1).fit(loader())
    resumed = Probe(seed=1)
    trainer(resumed, tmp_path / "cut", epochs=3).fit(loader(), resume=True)
    assert first.seen + resumed.seen == ref.seen  # epochs 2-3 continue the sampler's generator, not restart it
    assert same_weights(ref, resumed)


# --------------------------------------------------------------------------------------------------
# Several processes: 2 gloo processes under torchrun


def torchrun(out_dir, opts, extra=(), nproc=2):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           CHILD, str(out_dir), json.dumps(opts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    ok = proc.returncode == 0 or ("terminate called without an active exception" in proc.stderr and all(
        os.path.exists(os.path.join(out_dir, f"done.{r}")) for r in range(nproc)))  # see test_distributed.torchrun_ok
    assert ok, proc.stdout + proc.stderr
    return proc


def read(out_dir, what, rank):
    with open(os.path.join(out_dir, f"{what}.{rank}.json")) as f:
        return json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("batches", ["sampler", "batch_sampler"])
def test_two_ranks_split_one_draw_list_and_resume_exactly(tmp_path, batches):
    opts = {"epochs": 3, "batches": batches, "batch": 4, "num_samples": 21, "num_batches": 7}
    ref = tmp_path / "ref"
    torchrun(ref, opts)
    draws = [read(ref, "draws", r) for r in range(2)]
    seen = [read(ref, "seen", r) for r in range(2)]
    assert draws[0] == draws[1] and len(draws[0]) == 3  # every rank drew the same list, once per epoch
    assert draws[0][0] != draws[0][1]  # a new list each epoch
    for epoch, drawn in enumerate(draws[0], start=1):
        union = seen[0][str(epoch)] + seen[1][str(epoch)]
        if batches == "sampler":
            # 21 draws on 2 ranks: 11 each, the 22nd a repeat of the list's first (padding, as DistributedSampler)
            assert len(seen[0][str(epoch)]) == len(seen[1][str(epoch)]) == 11
            assert Counter(union) == Counter(drawn + drawn[:1])
        else:
            # 7 batches on 2 ranks: 4 each, the 8th a repeat of the first batch
            flat = [i for b in drawn for i in b]
            assert Counter(union) == Counter(flat + drawn[0])
    history = torch.load(ref / "result.pt", weights_only=True)["history"]
    assert len(history) == 3
    # the training metrics count each drawn sample once: accuracy over 21 samples (or the batches' samples)
    total = 21 if batches == "sampler" else sum(len(b) for b in draws[0][0])
    k = round(history[0]["train_acc"] * total)
    assert history[0]["train_acc"] == pytest.approx(k / total, abs=1e-12) and 0 < k < total
    # a stop after epoch 1 and a resume in a fresh Trainer; then a kill mid-epoch and torchrun's restart
    stopped = tmp_path / "stopped"
    torchrun(stopped, {**opts, "stop_after": 1})
    killed = tmp_path / "killed"
    steps = 3 if batches == "sampler" else 4  # per epoch: 11 samples in batches of 4; 7 batches on 2 ranks
    kill = {"every": 1, "kill_rank": 1, "kill_step": steps + 2}  # rank 1 dies after epoch 2's second step
    proc = torchrun(killed, {**opts, **kill}, extra=["--max-restarts=1"])
    assert "(epoch 1, batch 1)" in proc.stdout  # both restarted from last.pt of epoch 2's first step
    a = torch.load(ref / "result.pt", weights_only=True)
    for folder in (stopped, killed):
        b = torch.load(folder / "result.pt", weights_only=True)
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), folder
        assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]
        assert read(folder, "seen", 0)["3"] == seen[0]["3"] and read(folder, "seen", 1)["3"] == seen[1]["3"]
