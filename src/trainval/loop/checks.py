"""Checks made before and at the first step: clear errors instead of a run that trains nothing or crashes.

Each is free (attributes only, no host sync) or runs once, before training: the optimizer and scheduler
belong to this model, the first loss is a scalar that a gradient flows back from, the training targets
are worth training on.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from trainval.data import TensorLoader, describe
from trainval.errors import ConfigError, DataError
from trainval.tasks import Task
from trainval.untrusted import shown_repr

BATCHNORM = nn.modules.batchnorm._BatchNorm


def finite_setting(value: Any) -> bool:
    """Is an optimizer setting finite: a number, a 1-element tensor, or a tuple of them (betas)?"""
    if isinstance(value, (tuple, list)):
        return all(finite_setting(v) for v in value)
    if isinstance(value, torch.Tensor):
        return value.numel() != 1 or bool(torch.isfinite(value).all())  # once, at construction
    if isinstance(value, float):
        return math.isfinite(value)
    return True  # ints, bools, strings (foreach, capturable, ...)


def check_optimizer_and_scheduler(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module | None,
    scheduler: Any,
    default_optimizer: bool,
) -> None:
    """Refuse an optimizer or scheduler that would "train" without changing this model, before training.

    The optimizer must hold this model's parameters (and perhaps the loss's), and only finite settings
    (a NaN learning rate turns every weight into NaN at the first step); the scheduler must be built on
    this optimizer (one built on another sets the other's learning rate, and this one never changes).
    Whether anything requires a gradient is checked on the first step's loss (:func:`check_loss_value`):
    a callback may freeze or unfreeze modules at ``on_epoch_start``.
    """
    model_params = {id(p) for p in model.parameters()}
    own = set(model_params)
    if isinstance(loss_fn, nn.Module):
        own |= {id(p) for p in loss_fn.parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = [p for p in params if id(p) not in own]
    if foreign:
        raise ConfigError(
            f"the optimizer holds {len(foreign)} of {len(params)} parameter tensors that are not the "
            "model's (or the loss's): build it from this model, e.g. "
            "torch.optim.AdamW(model.parameters())."
        )
    if model_params and not any(id(p) in model_params for p in params):
        raise ConfigError(
            f"the optimizer holds none of the model's parameters (only {len(params)} of the loss's), "
            "so the model would never change: build it over the model's parameters too, e.g. "
            "torch.optim.AdamW([*model.parameters(), *loss_fn.parameters()])."
        )
    for i, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key != "params" and not finite_setting(value):
                raise ConfigError(
                    f"the optimizer's {key}={shown_repr(value)} (param group {i}) is not a finite "
                    "number, and a step with it would make the weights NaN: build the optimizer "
                    f"with a finite {key}."
                )
    if scheduler is None:
        return
    name = type(scheduler).__name__
    if not callable(getattr(scheduler, "step", None)):
        raise ConfigError(
            f"scheduler must be a learning-rate scheduler with a step() method "
            f"(torch.optim.lr_scheduler), got {shown_repr(scheduler)}."
        )
    stepped = getattr(scheduler, "optimizer", optimizer)  # torch's schedulers all name theirs
    if stepped is not optimizer:
        if default_optimizer:
            raise ConfigError(
                f"scheduler {name} was built on an optimizer the Trainer was not given (it builds "
                "its own default AdamW); pass the optimizer the scheduler was built on: "
                f"Trainer(model, optimizer, scheduler={name}(optimizer, ...))."
            )
        raise ConfigError(
            f"scheduler {name} was built on another optimizer than the Trainer's, so the learning "
            f"rate would never change: build it on this optimizer, {name}(optimizer, ...), with the "
            "optimizer passed to the Trainer."
        )


def check_loss_value(loss: Any, training: bool, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The first batch's loss: a scalar tensor, and in training one that a gradient flows back from.

    Free (attributes only, no host sync); once per epoch (a callback may freeze modules at
    ``on_epoch_start``) and per evaluation, before the first backward.
    """
    if not isinstance(loss, torch.Tensor):
        if isinstance(loss, (int, float)):
            raise ConfigError(
                f"loss_fn returned a {type(loss).__name__} ({loss!r}), not a tensor; a number has no "
                "gradient: return the loss tensor itself (no .item() or float() on it)."
            )
        raise ConfigError(
            f"loss_fn returned {describe(loss)}; it must return the batch's mean loss as a scalar tensor."
        )
    if loss.numel() != 1:
        raise ConfigError(
            f"loss_fn returned a tensor of shape {list(loss.shape)}; it must return a scalar (the "
            "batch's mean): use reduction='mean', or return loss.mean()."
        )
    if not training:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the model's, the loss's
    if loss.requires_grad:
        if not any(p.requires_grad for p in params):
            raise ConfigError(
                f"none of the parameters the optimizer holds requires a gradient (its "
                f"{len(params)} parameter tensors are frozen: requires_grad=False), so training "
                "would change nothing: build the optimizer over the trainable parameters, e.g. "
                "torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)."
            )
        return
    model_params = list(model.parameters())
    if not any(p.requires_grad for p in [*model_params, *params]):
        count = len(model_params)
        raise ConfigError(
            f"no parameter of the model requires a gradient (all {count} parameter tensors have "
            "requires_grad=False), so there is nothing to train: unfreeze the ones to train "
            "(p.requires_grad_(True)) before fit, or only validate, test or predict with this model."
        )
    raise ConfigError(
        "the training loss does not depend on any parameter that requires a gradient (it was "
        "detached, or computed under torch.no_grad()): return the loss of the model's output "
        "as it is."
    )


def check_training_data(loader: TensorLoader, task: Task, model: nn.Module, batch_size: int) -> None:
    y = loader.y
    if y is None:  # (fit's data is labelled: checked by the pre-flight before this)
        return
    if task.name == "multiclass" and y.dim() == 1 and len(y) > 1 and bool(torch.eq(y, y[0]).all()):
        raise DataError(
            f"the training targets hold a single class ({int(y[0])}) in {len(y)} samples: there is "
            "nothing to tell apart. Check the labels (or the split)."
        )
    has_batchnorm = any(isinstance(m, BATCHNORM) and m.training for m in model.modules())
    if has_batchnorm and loader.num_samples % batch_size == 1:
        raise DataError(
            f"the last training batch would hold 1 sample ({loader.num_samples} samples per process, "
            f"batch_size {batch_size}), and BatchNorm cannot train on one sample; choose a "
            f"batch_size that leaves more over (e.g. {batch_size + 1})."
        )
