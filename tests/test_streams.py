"""Streams (IterableDatasets): an epoch is one pass, each rank reads its own share, ranks stay in lockstep.

The 2-process tests run real gloo jobs through torchrun (``tests/helpers/stream_child.py``), with shares
that differ by several batches, under DDP and FSDP.
"""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch
from conftest import REPO, make_blobs, run_cli, tiny_mlp
from test_distributed import torchrun, torchrun_ok
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from trainval import Callback, Trainer
from trainval.data import RankSplit, make_loader, split_by_rank
from trainval.errors import Interrupted

HELPERS = os.path.join(REPO, "tests", "helpers")
CHILD = os.path.join(HELPERS, "stream_child.py")


class Stream(IterableDataset):
    """``(X[i], y[i])`` for ``i`` in ``order`` (default: in order); ``set_epoch`` calls are recorded."""

    def __init__(self, X, y, order=None):
        self.X, self.y = X, y
        self.order = list(range(len(y))) if order is None else list(order)
        self.epochs: list[int] = []

    def __iter__(self):
        for i in self.order:
            yield self.X[i], self.y[i]

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def fit(data, out_dir, val=None, model=None, **kw):
    model = model or tiny_mlp(dropout=0.2)  # dropout: the global RNG streams must line up too
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_epochs=3,
                      out_dir=str(out_dir), progress=False, plot=False, batch_size=8, seed=0, **kw)
    trainer.fit(data, val)
    return trainer, model


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def same_weights(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------------------------
# One process


def test_a_stream_trains_bit_identical_to_a_map_style_dataset_in_the_same_order(tmp_path):
    X, y = make_blobs(n=45)
    stream, val = Stream(X, y), Stream(X[:21], y[:21])
    a, _ = fit(stream, tmp_path / "stream", val)
    b, _ = fit(DataLoader(TensorDataset(X, y), batch_size=8, shuffle=False), tmp_path / "map",
               DataLoader(TensorDataset(X[:21], y[:21]), batch_size=8))
    for name in ("best.pt", "last.pt"):
        assert same_weights(weights(tmp_path / "stream" / name), weights(tmp_path / "map" / name)), name
    assert metric_rows(tmp_path / "stream") == metric_rows(tmp_path / "map") and len(metric_rows(tmp_path / "map")) == 3
    assert stream.epochs == [0, 1, 2]  # set_epoch before each epoch's pass, counted from 0 (DistributedSampler's)
    assert val.epochs == []  # evaluation is not shuffled
    assert a.test(stream) == b.test((X, y))
    assert torch.equal(a.predict(stream), b.predict(X))
    # the control: the same samples in another order train to other weights and other metrics
    fit(Stream(X, y, order=reversed(range(45))), tmp_path / "reversed", val)
    assert not same_weights(weights(tmp_path / "reversed" / "last.pt"), weights(tmp_path / "map" / "last.pt"))
    assert metric_rows(tmp_path / "reversed") != metric_rows(tmp_path / "map")


class UserLoss(torch.nn.Module):
    """Cross-entropy behind a plain module: trainval cannot know its denominator, so accumulation keeps the
    mean of the micro-batch means (built-in losses are weighted exactly: tests/test_loop_accumulation.py)."""

    def forward(self, output, target):
        return torch.nn.functional.cross_entropy(output, target)


def test_the_short_last_accumulation_group_of_a_stream_is_rescaled(tmp_path, monkeypatch):
    # 40 samples, batch 8: 5 batches, accumulated by 3 -> a last group of 2, which a stream only learns
    # at its end: its gradients (divided by 3) are rescaled by 3/2 before the step, as map-style data
    # divides by 2 up front (equal to rounding, not bit for bit). (A loss of unknown denominator: with a
    # built-in one the group is read ahead and weighted exactly, nothing is rescaled.)
    X, y = make_blobs(n=40)
    user = dict(loss_fn=UserLoss(), task="multiclass")
    fit(Stream(X, y), tmp_path / "stream", accumulate_steps=3, **user)
    fit(DataLoader(TensorDataset(X, y), batch_size=8), tmp_path / "map", accumulate_steps=3, **user)
    a, b = weights(tmp_path / "stream" / "last.pt"), weights(tmp_path / "map" / "last.pt")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the control: without the rescale the last group's step is 2/3 as large, and the weights differ
    monkeypatch.setattr(Trainer, "_scale_gradients", lambda self, factor: None)
    fit(Stream(X, y), tmp_path / "unscaled", accumulate_steps=3, **user)
    c = weights(tmp_path / "unscaled" / "last.pt")
    assert not all(torch.allclose(c[k], b[k], atol=1e-4) for k in c)


def test_split_by_rank_keeps_every_world_th_element_and_splits_again_over_workers():
    items = list(range(23))
    shares = [list(split_by_rank(items, r, 3)) for r in range(3)]
    assert shares == [items[0::3], items[1::3], items[2::3]]
    assert [len(split_by_rank(items, r, 3)) for r in range(3)] == [8, 8, 7]
    # with 2 DataLoader workers per rank, every element is still read exactly once, by its rank
    for r in range(3):
        loader = DataLoader(RankSplit(items, r, 3), batch_size=2, num_workers=2)
        read = [int(v) for batch in loader for v in batch]
        assert sorted(read) == shares[r], r
    # the control: without the split by worker, each worker reads the whole share (duplicates)
    plain = DataLoader(IterableWrapper(shares[0]), batch_size=2, num_workers=2)
    assert len([v for batch in plain for v in batch]) == 2 * len(shares[0])


class IterableWrapper(IterableDataset):
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_predict_over_a_stream_read_by_workers_is_in_stream_order(tmp_path):
    X, y = make_blobs(n=45)
    trainer, _ = fit((X, y), tmp_path / "run")
    expected = trainer.predict_proba(X)
    with_workers = DataLoader(Stream(X, y), batch_size=4, num_workers=2)
    assert torch.allclose(trainer.predict_proba(with_workers), expected, rtol=0, atol=1e-6)  # batch 4 vs 45: rounding
    # the control: two workers interleave their batches, so the rows do not come in stream order by themselves
    loader = make_loader(with_workers, train=False, batch_size=4, generator=torch.Generator(),
                         device=torch.device("cpu"), labelled=False, name="predict")
    assert torch.cat([x for x, _ in loader.iter_from(0)]).ne(X).any()


class Interrupt(Callback):
    """SIGINT to this process after ``at`` training batches: the Trainer saves last.pt and stops."""

    def __init__(self, at):
        self.at, self.seen = at, 0

    def on_train_batch_end(self, trainer, batch_index):
        self.seen += 1
        if self.seen == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_mid_epoch_resume_of_a_stream_rereads_what_was_consumed_and_is_exact(tmp_path):
    X, y = make_blobs(n=45)  # 6 batches per epoch
    fit(Stream(X, y), tmp_path / "ref", checkpoint_every_steps=2)
    with pytest.raises(Interrupted):
        fit(Stream(X, y), tmp_path / "cut", checkpoint_every_steps=2, callbacks=[Interrupt(at=9)])  # epoch 2, batch 3
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert (state["epoch"], state["loop"]["batch_in_epoch"]) == (1, 3)
    model = tiny_mlp(dropout=0.2, seed=5)  # the resumed run must not depend on fresh weights
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), max_epochs=3,
                      out_dir=str(tmp_path / "cut"), progress=False, plot=False, batch_size=8, seed=0,
                      checkpoint_every_steps=2)
    trainer.fit(Stream(X, y), resume=True)
    assert same_weights(weights(tmp_path / "ref" / "last.pt"), weights(tmp_path / "cut" / "last.pt"))
    assert metric_rows(tmp_path / "ref") == metric_rows(tmp_path / "cut")


def test_the_progress_bar_shows_a_total_only_when_the_stream_has_a_length(tmp_path, capsys):
    import io

    from trainval.loop.callbacks import ProgressBar

    class Sized(Stream):
        def __len__(self):
            return len(self.order)

    X, y = make_blobs(n=45)
    for data, total in ((Stream(X, y), None), (Sized(X, y), 6)):
        bar = ProgressBar(line_s=0.0, stream=io.StringIO())
        trainer, _ = fit(data, tmp_path / str(total), callbacks=[bar])
        assert trainer.train_loader.num_batches == total
        lines = bar.stream.getvalue().splitlines()
        assert lines[0].startswith("  epoch 1/3 batch 1" + ("/6 " if total else " ")), lines[0]


def test_onecycle_over_a_stream_without_length_is_one_clear_error_and_steps_per_epoch_fixes_it(tmp_path):
    pytest.importorskip("yaml")
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["data.source=factory", "data.factory=user_factory:streams", "model.name=user_factory:TinyNet",
              "model.kwargs={width: 12, in_features: 5, num_classes: 3}", "scheduler.name=onecycle",
              f"run.out_dir={tmp_path}", "train.epochs=2", "train.batch_size=16", "log.plot=false"]
    refused = run_cli("fit", *common, "run.name=a", cwd=str(tmp_path), env=env)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("trainval: error: scheduler.name onecycle needs the number of optimizer steps per "
                                      "epoch, and the training data is a stream without a length: set "
                                      "scheduler.steps_per_epoch, or give the dataset a __len__.")
    ok = run_cli("fit", *common, "scheduler.steps_per_epoch=6", "run.name=b", cwd=str(tmp_path), env=env, check=True)
    assert "[002/002]" in ok.stdout  # 90 samples / 16 = 6 steps per epoch: OneCycleLR was not overrun


# ------------------------------------------------------------------------------------------------
# The command line: a data.factory returning streams


def test_cli_trains_tests_and_predicts_on_streams(tmp_path):
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    common = ["data.source=factory", "model.name=user_factory:TinyNet", "model.kwargs={width: 12, in_features: 5, num_classes: 3}",
              f"run.out_dir={tmp_path}", "train.epochs=3", "train.batch_size=16", "log.plot=false"]
    proc = run_cli("fit", *common, "data.factory=user_factory:streams", "run.name=s", cwd=str(tmp_path), env=env,
                   check=True)
    assert "[003/003] Train Acc" in proc.stdout and "Test Acc:" in proc.stdout and "wrote 30 predictions" in proc.stdout
    with open(tmp_path / "s" / "predictions.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Id", "Class"] and [r[0] for r in rows[1:]] == [str(i) for i in range(30)]
    history = metric_rows(tmp_path / "s")
    assert len(history) == 3 and float(history[-1]["val_acc"]) > 0.5  # it learnt something
    # `trainval predict` later, from best.pt, over the same stream: the same file
    os.remove(tmp_path / "s" / "predictions.csv")
    same = run_cli("predict", *common, "data.factory=user_factory:streams", "run.name=s", "--trust-code",
                   cwd=str(tmp_path), env=env, check=True)
    assert "wrote 30 predictions" in same.stdout
    with open(tmp_path / "s" / "predictions.csv") as f:
        assert list(csv.reader(f)) == rows


@pytest.mark.parametrize("factory, message", [
    ("empty_streams", "trainval: error: the train stream yielded no samples; check the dataset's __iter__ "
                      "(and the file or source it reads)."),
    ("mixed_streams", "trainval: error: the train stream yielded samples of different structures: sample 0 is "
                      "([5], []), sample 4 is {'x': [5], 'labels': []}; every sample of a stream needs the same "
                      "structure."),
])
def test_cli_stream_errors_are_one_line(tmp_path, factory, message):
    env = {"PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = run_cli("fit", "data.source=factory", f"data.factory=user_factory:{factory}", "model.name=user_factory:TinyNet",
                   "model.kwargs={width: 12, in_features: 5, num_classes: 3}", f"run.out_dir={tmp_path}",
                   "train.epochs=1", "train.batch_size=16", cwd=str(tmp_path), env=env)
    assert proc.returncode == 1  # a data error
    assert proc.stderr.strip() == message
    assert "Traceback" not in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------------
# Two processes (gloo): every sample once per epoch, exact evaluation, no hang on uneven shares


def run_child(out_dir, **opts):
    os.makedirs(out_dir, exist_ok=True)
    proc = torchrun([CHILD, str(out_dir), json.dumps(opts)], timeout=240, env={"TRAINVAL_DIST_TIMEOUT": "60"})
    assert torchrun_ok(proc, out_dir), proc.stdout + proc.stderr
    ids = [json.loads((out_dir / f"ids.{r}.json").read_text()) for r in range(2)]
    return proc, ids, torch.load(out_dir / "result.pt", weights_only=True)


def check_each_sample_once(ids, n, epochs):
    for r in range(2):
        assert ids[r]["set_epoch"] == list(range(epochs)), r  # each rank's share is told every epoch
    shares = []
    for e in range(epochs):
        seen = ids[0]["epochs"][e] + ids[1]["epochs"][e]
        assert sorted(seen) == list(range(n)), e  # each sample trained on once: none twice, none dropped
        shares.append((len(ids[0]["epochs"][e]), len(ids[1]["epochs"][e])))
    return shares


def reference_predictions(out_dir, n):
    """best.pt's model on the whole validation stream, in one process, in stream order."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("stream_child", CHILD)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    Xv, yv = helper.data(n, 2)
    model = helper.Net()
    model.load_state_dict(weights(out_dir / "best.pt"))
    with torch.no_grad():
        return model(Xv).argmax(dim=1), yv


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_with_shares_that_differ_by_batches_train_each_sample_once(tmp_path, strategy):
    from sklearn.metrics import accuracy_score, f1_score

    # The stream's own split_by_rank gives rank 0 the first 60%: 61 vs 40 training samples (8 vs 5 batches
    # of 8) and 27 vs 18 validation samples (7 vs 5 batches of 4): rank 1 runs out 3 steps early in
    # training and 2 forwards early in evaluation (collectives under FSDP), and must not hang anyone.
    proc, ids, result = run_child(tmp_path, blocks=0.6, strategy=strategy, epochs=2, accumulate=2)
    assert result["strategy"] == strategy
    assert check_each_sample_once(ids, 101, 2) == [(61, 40), (61, 40)]
    preds, yv = reference_predictions(tmp_path, 45)
    assert torch.equal(result["preds"], preds)  # 45 predictions, gathered rank by rank (blocks: stream order)
    assert result["test"]["test_acc"] == pytest.approx(accuracy_score(yv, preds), abs=1e-12)
    assert result["test"]["test_f1_macro"] == pytest.approx(f1_score(yv, preds, average="macro"), abs=1e-12)
    assert round(result["history"][-1]["val_acc"] * 45) == pytest.approx(result["history"][-1]["val_acc"] * 45)
    assert proc.stdout.count("[002/002] Train Acc") == 1


@pytest.mark.slow
def test_two_ranks_split_round_robin_with_workers_and_predict_in_stream_order(tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    # trainval's split: rank r keeps elements r, r+2, ...; each of its 2 DataLoader workers half of those
    proc, ids, result = run_child(tmp_path, workers=2, epochs=2, n_train=101, n_val=45)
    assert check_each_sample_once(ids, 101, 2) == [(51, 50), (51, 50)]
    preds, yv = reference_predictions(tmp_path, 45)
    assert torch.equal(result["preds"], preds)  # back in stream order across 2 ranks x 2 workers
    assert result["test"]["test_acc"] == pytest.approx(accuracy_score(yv, preds), abs=1e-12)
    assert result["test"]["test_f1_macro"] == pytest.approx(f1_score(yv, preds, average="macro"), abs=1e-12)


@pytest.mark.parametrize("planned", [5, 15])
def test_a_onecycle_of_the_python_api_that_a_stream_overruns_is_one_clear_error(tmp_path, planned):
    """48 samples in batches of 8: 6 optimizer steps per epoch, 12 in 2 epochs. OneCycleLR planned for
    5 raises torch's bare ValueError at step 6; trainval names what to do. The control plans 15."""
    from trainval.errors import ConfigError

    X, y = make_blobs(n=48)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=planned)
    trainer = Trainer(model, opt, scheduler=sched, max_epochs=2, out_dir=str(tmp_path), progress=False,
                      plot=False, batch_size=8)
    if planned < 12:
        with pytest.raises(ConfigError, match=r"OneCycleLR scheduler planned fewer optimizer steps than this run "
                                              r"takes \(step 6, epoch 1\).*scheduler.steps_per_epoch"):
            trainer.fit(Stream(X, y))
    else:
        assert len(trainer.fit(Stream(X, y))) == 2
