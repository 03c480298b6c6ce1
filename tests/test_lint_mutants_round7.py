"""Round 7 mutants of real scripts that the linter used to miss (issue 22, tests/lint_corpus/real/MUTANTS.tsv),
each cause from a minimal file: the mistake is reported at its line, and a control (the same code without the
mistake) stays quiet."""

from __future__ import annotations

import pytest
from conftest import line_of
from conftest import lint_found as found

# -- 1: a function called once per iteration of a loop, with backward() and step() but no zero_grad()
# (YOLOX's Trainer.train_one_iter through GradScaler, spinningup DDPG's update() with two optimizers)

PER_ITER_METHOD = """
import torch
class Trainer:
    def __init__(self, model):
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        self.scaler = torch.cuda.amp.GradScaler()
    def train_in_iter(self, loader):
        for self.iter in range(100):
            {caller_zero}
            self.train_one_iter(next(loader))
    def train_one_iter(self, batch):
        loss = self.model(batch).sum()
        {zero}
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
"""


@pytest.mark.parametrize(
    ("zero", "caller_zero", "reported"),
    [
        ("pass", "pass", True),
        ("self.optimizer.zero_grad()", "pass", False),
        ("pass", "self.optimizer.zero_grad()", False),
        ("self.model.zero_grad()", "pass", False),
    ],
)
def test_a_step_in_a_function_called_per_iteration_needs_zeroing(zero, caller_zero, reported):
    source = PER_ITER_METHOD.format(zero=zero, caller_zero=caller_zero)
    assert ((line_of(source, "self.scaler.step("), "TVL002") in found(source)) is reported


DDPG = """
import torch
from torch.optim import Adam
def ddpg(ac, buffer, steps):
    pi_optimizer = Adam(ac.pi.parameters())
    q_optimizer = Adam(ac.q.parameters())
    def update(data):
        {zero_q}
        loss_q = ((ac.q(data) - data) ** 2).mean()
        loss_q.backward()
        q_optimizer.step()
        pi_optimizer.zero_grad()
        loss_pi = -ac.q(ac.pi(data)).mean()
        loss_pi.backward()
        pi_optimizer.step()
    for t in range(steps):
        if t % 50 == 0:
            for _ in range(50):
                update(data=buffer.sample())
"""


@pytest.mark.parametrize(("zero_q", "reported"), [("pass", True), ("q_optimizer.zero_grad()", False)])
def test_zeroing_one_optimizer_does_not_zero_another(zero_q, reported):
    source = DDPG.format(zero_q=zero_q)
    got = found(source)
    assert ((line_of(source, "q_optimizer.step()"), "TVL002") in got) is reported
    assert (line_of(source, "pi_optimizer.step()"), "TVL002") not in got


def test_a_function_called_once_outside_any_loop_is_not_judged_by_its_caller():
    # control: backward(); step() in a function nobody calls from a loop -- whoever calls it decides
    source = PER_ITER_METHOD.format(zero="pass", caller_zero="pass").replace(
        "for self.iter in range(100):", "if True:"
    )
    assert (line_of(source, "self.scaler.step("), "TVL002") not in found(source)


# -- 2: stepping a list of optimizers (CSAIL semantic-segmentation's train(): for optimizer in optimizers: step)

OPTIMIZER_LIST = """
import torch
def train(segmentation_module, iterator, optimizers, iters):
    segmentation_module.train()
    for i in range(iters):
        batch = next(iterator)
        {zero}
        loss = segmentation_module(batch).mean()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
"""


@pytest.mark.parametrize(
    ("zero", "reported"),
    [
        ("pass", True),
        ("segmentation_module.zero_grad()", False),
        ("for optimizer in optimizers: optimizer.zero_grad()", False),
    ],
)
def test_a_loop_over_optimizers_steps_once_per_iteration_of_the_loop_around_it(zero, reported):
    source = OPTIMIZER_LIST.format(zero=zero)
    assert ((line_of(source, "optimizer.step()"), "TVL002") in found(source)) is reported


# -- 3: the epoch loop puts back in training mode another model than the one it evaluates (pycls: train_epoch()
# restores the EMA copy only; its arguments given as *params, a tuple built just before)

PYCLS = """
import torch
def train_epoch(loader, model, ema, optimizer, epoch):
    {restore}
    ema.train()
    for x, y in loader:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
def test_epoch(loader, model, epoch):
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            model(x)
def train_model(model, ema, train_loader, test_loader, epochs):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for cur_epoch in range(epochs):
        {call}
        test_epoch(test_loader, model, cur_epoch)
        test_epoch(test_loader, ema, cur_epoch)
"""
STARRED = "params = (train_loader, model, ema, optimizer); train_epoch(*params, cur_epoch)"
PLAIN = "train_epoch(train_loader, model, ema, optimizer, cur_epoch)"


@pytest.mark.parametrize(
    ("restore", "call", "reported"),
    [
        ("pass", STARRED, True),
        ("pass", PLAIN, True),
        ("model.train()", STARRED, False),
        ("model.train()", PLAIN, False),
        # control: arguments it cannot name -- the restore may be of any model, so nothing is said
        ("pass", "train_epoch(*make_params(), cur_epoch)", False),
    ],
)
def test_every_model_the_epoch_loop_evaluates_must_be_put_back_in_training_mode(restore, call, reported):
    source = PYCLS.format(restore=restore, call=call)
    assert (
        (line_of(source, "test_epoch(test_loader, model, cur_epoch)"), "TVL005") in found(source)
    ) is reported


# -- 4: a model known only by its constructor, a network class from another file (CSAIL's evaluate() given
# segmentation_module = SegmentationModule(encoder, decoder, crit), a name no model word starts)

CONSTRUCTED = """
import torch
from mit_semseg.models import {cls}
def evaluate(segmentation_module, loader):
    {mode}
    preds = []
    with torch.no_grad():
        for x in loader:
            preds.append(segmentation_module(x).argmax(1))
    return torch.cat(preds).float().mean().item()
def main(loader):
    segmentation_module = {cls}(torch.nn.Linear(3, 3))
    segmentation_module.cuda()
    print(evaluate(segmentation_module, loader))
"""


@pytest.mark.parametrize(
    ("cls", "mode", "reported"),
    [
        ("SegmentationModule", "pass", True),
        ("SegmentationModule", "segmentation_module.eval()", False),
        ("ResNet", "pass", True),
        # control: a constructor not named like a network class says nothing of what it builds
        ("Segmenter", "pass", False),
        ("SegmentationDataModule", "pass", False),
    ],
)
def test_a_model_built_by_a_network_class_from_another_file_is_a_model(cls, mode, reported):
    source = CONSTRUCTED.format(cls=cls, mode=mode)
    assert ((line_of(source, "segmentation_module(x)"), "TVL004") in found(source)) is reported
