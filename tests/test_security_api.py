"""Issue 18, the Python API: a Trainer given parts that cannot train refuses in one clear sentence.

A scheduler of another optimizer, a loss that is not a scalar tensor, a model with nothing to train, a seed
out of range, a non-finite optimizer setting: each is a ``TrainvalError`` raised before anything is trained
(the constructor, or the first step's loss), never a raw torch error or a run that "finishes" with nothing
learnt. A step that turns the weights non-finite stops the run instead of being saved as ``last.pt``.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_blobs, run_cli, tiny_mlp
from torch import nn
from torch.optim import lr_scheduler

from trainval import Trainer
from trainval.app.config import SCHEMA
from trainval.errors import ConfigError, NonFiniteLossError
from trainval.state import SEED_MAX, SEED_MIN

KW = dict(progress=False, plot=False, device="cpu")


def _sgd(model: nn.Module, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **{"lr": 0.1, **kw})


def _lrs(folder) -> list[float]:
    with open(folder / "metrics.csv") as f:
        return [float(row["lr"]) for row in csv.DictReader(f)]


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# --- a scheduler (or optimizer) that does not drive this model ------------------------------------------

SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, 1, gamma=0.5),
    "ReduceLROnPlateau": lambda opt: lr_scheduler.ReduceLROnPlateau(opt),
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 0.5 ** epoch),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_scheduler_of_another_optimizer_is_refused(tmp_path, name):
    model = tiny_mlp()
    other = torch.optim.SGD(tiny_mlp(seed=1).parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=rf"scheduler {name} was built on another optimizer .*this optimizer"):
        Trainer(model, _sgd(model), scheduler=SCHEDULERS[name](other), out_dir=str(tmp_path), **KW)
    # the default optimizer is built by the Trainer: no scheduler can have been built on it
    with pytest.raises(ConfigError, match="pass the optimizer"):
        Trainer(model, scheduler=SCHEDULERS[name](other), out_dir=str(tmp_path), **KW)


def test_scheduler_of_the_trainers_optimizer_steps_the_learning_rate(tmp_path):
    """The control: the same scheduler on the Trainer's own optimizer halves the lr every epoch."""
    X, y = make_blobs()
    model = tiny_mlp()
    opt = _sgd(model)
    Trainer(model, opt, scheduler=SCHEDULERS["StepLR"](opt), max_epochs=3, out_dir=str(tmp_path), **KW).fit((X, y), (X, y))
    assert _lrs(tmp_path) == [0.1, 0.05, 0.025]


def test_optimizer_over_none_of_the_models_parameters_is_refused(tmp_path):
    class Tempered(nn.Module):  # a loss with a learnable temperature: its parameter is the optimizer's only one
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones(()))

        def forward(self, output, target):
            return F.cross_entropy(output / self.temperature, target)

    model, loss = tiny_mlp(), Tempered()
    with pytest.raises(ConfigError, match="holds none of the model's parameters"):
        Trainer(model, torch.optim.SGD(loss.parameters(), lr=0.1), loss, task="multiclass", out_dir=str(tmp_path), **KW)
    # the control: the model's and the loss's parameters together are fine
    Trainer(model, torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.1), loss, task="multiclass",
            out_dir=str(tmp_path), **KW)


# --- a loss that is not a scalar tensor --------------------------------------------------------------


def _per_sample(output, target):
    return F.cross_entropy(output, target, reduction="none")


def _as_float(output, target):
    return float(F.cross_entropy(output, target))


@pytest.mark.parametrize("loss_fn, message", [
    (_per_sample, r"loss_fn returned a tensor of shape \[40\]; it must return a scalar .*reduction='mean'"),
    (_as_float, r"loss_fn returned a float \(1\.\d+\), not a tensor; .*\.item\(\)"),
])
def test_loss_that_is_not_a_scalar_tensor_is_refused_at_the_first_step(tmp_path, loss_fn, message):
    X, y = make_blobs()
    model = tiny_mlp()
    before = _weights(model)
    trainer = Trainer(model, _sgd(model), loss_fn, task="multiclass", batch_size=40, out_dir=str(tmp_path / "a"), **KW)
    with pytest.raises(ConfigError, match=message):
        trainer.fit((X, y), (X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing was trained
    assert not (tmp_path / "a" / "last.pt").exists()
    evaluator = Trainer(model, _sgd(model), loss_fn, task="multiclass", batch_size=40, out_dir=str(tmp_path / "b"), **KW)
    with pytest.raises(ConfigError, match=message):
        evaluator.validate((X, y))


def test_a_mean_loss_function_trains(tmp_path):
    """The control: the same kind of plain function, returning the batch mean, trains."""
    X, y = make_blobs()
    model = tiny_mlp()
    history = Trainer(model, _sgd(model), lambda o, t: _per_sample(o, t).mean(), task="multiclass",
                      max_epochs=2, out_dir=str(tmp_path), **KW).fit((X, y), (X, y))
    assert history[-1]["train_loss"] < history[0]["train_loss"]


# --- nothing to train -----------------------------------------------------------------------------


@pytest.mark.parametrize("explicit_optimizer", [True, False])
def test_every_parameter_frozen_is_refused_before_training(tmp_path, explicit_optimizer):
    X, y = make_blobs()
    model = tiny_mlp()
    opt = _sgd(model) if explicit_optimizer else None
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model, opt, out_dir=str(tmp_path), **KW)
    with pytest.raises(ConfigError, match=r"no parameter of the model requires a gradient \(all 4 parameter tensors"):
        trainer.fit((X, y), (X, y))
    assert not (tmp_path / "last.pt").exists()


def test_optimizer_over_frozen_parameters_only_is_refused(tmp_path):
    X, y = make_blobs()
    model = tiny_mlp()
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the first layer only, which is then frozen
    for p in model[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError, match="none of the parameters the optimizer holds requires a gradient"):
        Trainer(model, opt, out_dir=str(tmp_path), **KW).fit((X, y), (X, y))


# --- the seed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**70, 2**63, -(2**63) - 1, 1.5, True, "0"])
def test_seed_out_of_range_or_not_an_integer_is_refused(tmp_path, seed):
    with pytest.raises(ConfigError, match=r"seed must be an integer from -2\*\*63 to 2\*\*63 - 1, got "):
        Trainer(tiny_mlp(), seed=seed, out_dir=str(tmp_path), **KW)


@pytest.mark.parametrize("seed", [0, 2**63 - 1, -(2**63), np.int64(5)])
def test_seed_in_range_trains(tmp_path, seed):
    X, y = make_blobs(n=30)
    model = tiny_mlp()
    Trainer(model, _sgd(model), seed=seed, max_epochs=1, out_dir=str(tmp_path), **KW).fit((X, y), (X, y))


@pytest.mark.parametrize("override", [f"train.seed={2**70}", "data.split_seed=-1"])
def test_cli_seed_out_of_range_is_one_line(tmp_path, override):
    proc = run_cli("fit", override, f"run.out_dir={tmp_path}/runs", "train.epochs=1", "train.progress=false",
                   cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainval: error:") and override.split("=")[0] in lines[0], proc.stderr
    # the config's range of train.seed is the Trainer's
    assert (SCHEMA["train"]["seed"].minimum, SCHEMA["train"]["seed"].maximum) == (SEED_MIN, SEED_MAX)


# --- non-finite optimizer settings and non-finite weights --------------------------------------------


@pytest.mark.parametrize("make, key", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=math.nan), "lr"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=math.inf), "weight_decay"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=math.nan), "momentum"),
    (lambda m: torch.optim.SGD(m.parameters(), lr=torch.tensor(math.nan)), "lr"),
    (lambda m: torch.optim.AdamW(m.parameters()), "betas"),  # set to (0.9, nan) below, past Adam's own check
])
def test_non_finite_optimizer_setting_is_refused(tmp_path, make, key):
    model = tiny_mlp()
    opt = make(model)
    if key == "betas":
        opt.param_groups[0]["betas"] = (0.9, math.nan)
    with pytest.raises(ConfigError, match=rf"the optimizer's {key}=.*(nan|inf).* \(param group 0\) is not a finite number"):
        Trainer(model, opt, out_dir=str(tmp_path), **KW)


def test_weights_made_non_finite_by_the_last_step_stop_the_run(tmp_path):
    """Every loss is finite (each is computed before its step), but the epoch's last step turns the
    weights into NaN: the run must stop, not finish and save them as last.pt."""
    X, y = make_blobs(n=80)
    model = tiny_mlp()
    opt = _sgd(model)
    nan_after_first = lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step == 0 else math.nan)  # e.g. a 0/0 warmup
    trainer = Trainer(model, opt, scheduler=nan_after_first, scheduler_interval="step", batch_size=40, max_epochs=1,
                      out_dir=str(tmp_path), **KW)
    with pytest.raises(NonFiniteLossError, match="weights became non-finite at epoch 1"):
        trainer.fit((X, y), (X, y))
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()
