"""Gradient accumulation, gradient clipping, schedulers and early stopping, each against a hand loop.

Every test here compares the Trainer with a few lines of plain PyTorch written out by hand, bit for bit
(or value for value), and carries a control that shows the comparison can fail.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE, make_blobs, tiny_mlp
from torch import nn

from trainval import Callback, Trainer
from trainval.loop.callbacks import EarlyStopping


def hand_loop(model, X, y, *, epochs, batch_size, seed, lr, accumulate=1, clip=None, divide_by=None):
    """The notes' loop in plain PyTorch, with gradient accumulation and clipping written out.

    Batches come from one seeded permutation per epoch (as the Trainer draws them); ``accumulate``
    consecutive batches make one optimizer step, each batch's mean loss weighted by its share of the
    group's samples (the last group of an epoch may be short, its last batch too), so that every step
    follows the mean over the group's samples: the large batch's. ``divide_by`` forces the batch means
    to be divided by another number: the control that shows the comparison can fail.
    """
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(seed)
    model.train()
    steps = 0
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=g).to(X.device)
        batches = [perm[i : i + batch_size] for i in range(0, len(X), batch_size)]
        for start in range(0, len(batches), accumulate):
            group = batches[start : start + accumulate]
            samples = sum(len(idx) for idx in group)
            for idx in group:
                loss = loss_fn(model(X.index_select(0, idx)), y.index_select(0, idx))
                (loss / divide_by if divide_by else loss * (len(idx) / samples)).backward()
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
    return model, steps


def trainer_run(model, X, y, tmp_path, *, epochs, batch_size, seed, lr, **kwargs):
    """The same run through the Trainer; returns the model and the number of optimizer steps taken."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = []
    opt.register_step_post_hook(lambda *_: steps.append(1))
    tr = Trainer(
        model,
        opt,
        max_epochs=epochs,
        seed=seed,
        out_dir=str(tmp_path),
        batch_size=batch_size,
        progress=False,
        plot=False,
        monitor="train_loss",
        device=DEVICE,
        **kwargs,
    )
    tr.fit((X, y))
    return model, len(steps)


def assert_same_weights(a: nn.Module, b: nn.Module, what: str) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{what}: {k} differs"


def differs(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_with_a_short_last_group_equals_the_hand_loop(tmp_path):
    # 95 samples in batches of 10: 10 batches per epoch (the last one of 5 samples); accumulate_steps=4
    # groups them 4, 4, 2, so each epoch takes 3 optimizer steps and the last one averages the 15 samples
    # of its 2 batches (10 and 5: not the mean of the two batch means).
    X, y = make_blobs(n=95)
    X, y = X.to(DEVICE), y.to(DEVICE)
    init = tiny_mlp(dropout=0.2)
    opts = dict(epochs=2, batch_size=10, seed=5, lr=0.1)
    hand, hand_steps = hand_loop(copy.deepcopy(init).to(DEVICE), X, y, accumulate=4, **opts)
    ours, our_steps = trainer_run(copy.deepcopy(init), X, y, tmp_path, accumulate_steps=4, **opts)
    assert hand_steps == our_steps == 6
    assert_same_weights(hand, ours, "accumulate_steps=4")
    # Controls: dividing the short group by 4 (not by its 2 batches), or not accumulating at all, gives
    # other weights, so the comparison above sees the short group's scaling and the grouping.
    wrong, _ = hand_loop(copy.deepcopy(init).to(DEVICE), X, y, accumulate=4, divide_by=4, **opts)
    assert differs(wrong, hand)
    plain, _ = hand_loop(copy.deepcopy(init).to(DEVICE), X, y, accumulate=1, **opts)
    assert differs(plain, hand)


# ------------------------------------------------------------------------------------------------
# Gradient clipping


@pytest.mark.parametrize("accumulate", [1, 3])
def test_grad_clip_equals_clip_grad_norm_in_the_hand_loop(tmp_path, accumulate):
    # 70 samples in batches of 16: 5 batches per epoch; with accumulate=3, groups of 3 and 2, clipped
    # once per optimizer step, on the group's accumulated gradient.
    X, y = make_blobs(n=70, spread=2.0)
    X, y = X.to(DEVICE), y.to(DEVICE)
    init = tiny_mlp()
    opts = dict(epochs=2, batch_size=16, seed=2, lr=0.5)

    def by_hand(**kw):
        return hand_loop(copy.deepcopy(init).to(DEVICE), X, y, accumulate=accumulate, **opts, **kw)[0]

    def by_trainer(folder, **kw):
        return trainer_run(
            copy.deepcopy(init), X, y, tmp_path / folder, accumulate_steps=accumulate, **opts, **kw
        )[0]

    clipped = by_trainer("clip", grad_clip=0.05)
    assert_same_weights(by_hand(clip=0.05), clipped, "grad_clip=0.05")
    # Controls: without clipping the run ends elsewhere (the Trainer still equal to the hand loop), so
    # max norm 0.05 really clips; and another max norm gives other weights.
    unclipped = by_trainer("plain")
    assert_same_weights(by_hand(), unclipped, "no clipping")
    assert differs(unclipped, clipped)
    assert differs(by_hand(clip=0.1), clipped)


# ------------------------------------------------------------------------------------------------
# Schedulers


class RecordLR(Callback):
    """The learning rate after every training batch (after the optimizer and a per-step scheduler stepped)."""

    def __init__(self):
        self.per_batch: list[float] = []

    def on_train_batch_end(self, trainer, batch_index):
        self.per_batch.append(trainer.optimizer.param_groups[0]["lr"])


class ScriptedValLoss(nn.Module):
    """Cross-entropy while training; during evaluation, a scripted value per epoch.

    It makes ``val_loss`` (the monitored value) follow a sequence the test chooses, while training
    is real.
    """

    def __init__(self, values):
        super().__init__()
        self.values, self.epoch = list(values), 0

    def forward(self, logits, y):
        loss = nn.functional.cross_entropy(logits, y)
        if torch.is_grad_enabled():
            return loss
        return loss * 0 + self.values[self.epoch - 1]


class TrackEpoch(Callback):
    def __init__(self, loss: ScriptedValLoss):
        self.loss = loss

    def on_epoch_start(self, trainer, epoch):
        self.loss.epoch = epoch


def _schedulers():
    return {
        "step_lr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
        "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.01),
        "one_cycle": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6 * 4),
    }


@pytest.mark.parametrize("name", ["step_lr", "cosine", "one_cycle"])
def test_scheduler_learning_rates_equal_a_hand_loop(tmp_path, name):
    # 60 samples in batches of 16: 4 steps per epoch, 6 epochs. StepLR and cosine step once per epoch,
    # OneCycleLR once per optimizer step (the Trainer's default interval for it).
    X, y = make_blobs(n=60)
    epochs, steps_per_epoch = 6, 4
    make = _schedulers()[name]
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    record = RecordLR()
    tr = Trainer(
        model,
        opt,
        max_epochs=epochs,
        out_dir=str(tmp_path),
        batch_size=16,
        progress=False,
        plot=False,
        scheduler=make(opt),
        callbacks=[record],
        device=DEVICE,
    )
    history = tr.fit((X, y), (X, y))

    hand_opt = torch.optim.SGD(tiny_mlp().parameters(), lr=0.2, momentum=0.9)
    hand_sched = make(hand_opt)
    at_epoch_start, after_batch = [], []
    for _ in range(epochs):
        at_epoch_start.append(hand_opt.param_groups[0]["lr"])
        for _ in range(steps_per_epoch):
            hand_opt.step()  # no gradients: only the schedule moves
            if name == "one_cycle":
                hand_sched.step()
            after_batch.append(hand_opt.param_groups[0]["lr"])
        if name != "one_cycle":
            hand_sched.step()
    assert [row["lr"] for row in history] == at_epoch_start
    assert record.per_batch == after_batch
    assert len(set(after_batch)) > 2  # the schedule really moves within these 6 epochs


def test_reduce_on_plateau_receives_the_monitored_value(tmp_path):
    # val_loss (monitored) is scripted to stall; the training loss keeps falling. ReduceLROnPlateau(patience=1)
    # must halve the rate after two epochs without a new best of val_loss, exactly as a hand loop feeding
    # it the same values does; fed the training loss instead, it would never reduce.
    scripted = [1.0, 0.9, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85]
    X, y = make_blobs(n=60)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    loss = ScriptedValLoss(scripted)
    tr = Trainer(
        model,
        opt,
        loss,
        task="multiclass",  # a custom loss: the task is named
        max_epochs=len(scripted),
        out_dir=str(tmp_path),
        batch_size=16,
        progress=False,
        plot=False,
        monitor="val_loss",
        scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=1),
        callbacks=[TrackEpoch(loss)],
        device=DEVICE,
    )
    history = tr.fit((X, y), (X, y))
    assert [row["val_loss"] for row in history] == pytest.approx(scripted, abs=1e-6)

    hand_opt = torch.optim.SGD(tiny_mlp().parameters(), lr=0.2, momentum=0.9)
    hand = torch.optim.lr_scheduler.ReduceLROnPlateau(hand_opt, patience=1)
    expected = []
    for row in history:
        expected.append(hand_opt.param_groups[0]["lr"])
        hand.step(row["val_loss"])
    assert [row["lr"] for row in history] == expected
    assert expected[0] > expected[-1]  # it did reduce (twice: after epochs 4 and 7)
    assert opt.param_groups[0]["lr"] == hand_opt.param_groups[0]["lr"]
    # the control: the training loss falls every epoch here, so fed to the scheduler it never reduces
    train_losses = [row["train_loss"] for row in history]
    assert all(b < a for a, b in zip(train_losses, train_losses[1:]))


# ------------------------------------------------------------------------------------------------
# Early stopping


class SnapshotWeights(Callback):
    def __init__(self):
        self.by_epoch: dict[int, dict] = {}

    def on_epoch_end(self, trainer, row):
        self.by_epoch[row["epoch"]] = copy.deepcopy(
            {k: v.cpu() for k, v in trainer.model.state_dict().items()}
        )


def test_early_stopping_stops_at_the_epoch_patience_implies(tmp_path, capsys):
    # val_loss: best 0.25 at epoch 4; epoch 5 only ties it (not an improvement); epochs 5, 6, 7 make
    # three epochs without improvement, so patience=3 stops after epoch 7, before the new best of epoch 8.
    scripted = [1.0, 0.5, 0.75, 0.25, 0.25, 0.6, 0.7, 0.2, 0.1, 0.1]
    X, y = make_blobs(n=60)
    model = tiny_mlp()
    loss = ScriptedValLoss(scripted)
    snapshots = SnapshotWeights()
    tr = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss,
        task="multiclass",  # a custom loss: the task is named
        max_epochs=len(scripted),
        out_dir=str(tmp_path),
        batch_size=16,
        progress=False,
        plot=False,
        monitor="val_loss",
        callbacks=[TrackEpoch(loss), EarlyStopping(patience=3), snapshots],
        device=DEVICE,
    )
    history = tr.fit((X, y), (X, y))
    assert [row["epoch"] for row in history] == [1, 2, 3, 4, 5, 6, 7]
    assert "early stopping" in capsys.readouterr().out
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert best["epoch"] == 4 and last["epoch"] == 7
    assert all(torch.equal(best["model"][k], v) for k, v in snapshots.by_epoch[4].items())
    assert any(
        not torch.equal(best["model"][k], v) for k, v in snapshots.by_epoch[7].items()
    )  # it trained on
    # test() reloads best.pt: afterwards the model holds the weights of epoch 4
    tr.test((X, y))
    assert all(torch.equal(v.cpu(), snapshots.by_epoch[4][k]) for k, v in model.state_dict().items())


def test_an_unknown_strategy_is_one_clear_error():
    from trainval.errors import ConfigError

    with pytest.raises(ConfigError, match="strategy must be one of auto, ddp, fsdp"):
        Trainer(tiny_mlp(), strategy="zero3")
    Trainer(tiny_mlp(), strategy="fsdp")  # the control: a known name is accepted (nothing is set up yet)
