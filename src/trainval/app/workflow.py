"""From a resolved config to the Python API: data splits, model, optimizer, scheduler, Trainer.

The CLI only parses arguments and calls :func:`fit`, :func:`test` or :func:`predict` here; each of
them is a few calls on :class:`~trainval.loop.trainer.Trainer`, so that the command line and the Python API
cannot drift apart.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import numpy as np
import torch
from torch import nn

from trainval import launch, options
from trainval.app import config, preprocess, runs
from trainval.app.config import require_trusted_code
from trainval.app.models import CNN, MLP
from trainval.checkpoint import check_recorded_model, load_checkpoint, load_model_weights, sharded
from trainval.data import (
    Split,
    check_classes,
    csv_feature_columns,
    import_object,
    is_stream,
    load_csv,
    load_digits_arrays,
    load_npz,
    stratified_split,
)
from trainval.data import images as image_data
from trainval.data.tabular import TableEncoding
from trainval.errors import CheckpointError, ConfigError, DataError, RunFolderError
from trainval.fsio import atomic_write
from trainval.loop import trackers
from trainval.loop.callbacks import EarlyStopping, TensorBoardLogger
from trainval.loop.ema import EMA
from trainval.loop.trainer import Trainer, seed_everything
from trainval.metrics import resolve_metrics
from trainval.run import runfolder
from trainval.state import check_last
from trainval.tasks import make_task
from trainval.untrusted import check_replaceable, shown_repr


@dataclass
class Splits:
    train: Any
    val: Any
    test: Any  # may be unlabelled (a Split with y None), or None
    resolved: dict = field(
        default_factory=dict
    )  # what reading the data settled, recorded in the run (images)


def run_folder(cfg: dict) -> str:
    return os.path.join(cfg["run"]["out_dir"], cfg["run"]["name"])


# --------------------------------------------------------------------------------------------------
# Data


def _load_file(cfg: dict, path: str, require_labels: bool, encoding: TableEncoding | None = None) -> Split:
    """A data file; a CSV read with ``encoding`` (its categories and class names), or learning it (None)."""
    d = cfg["data"]
    if d["source"] == "npz":
        return load_npz(path, d["x_key"], d["y_key"], require_labels=require_labels)
    return load_csv(
        path,
        d["label"],
        d["features"],
        require_labels=require_labels,
        allow_nonfinite=not d["check_inputs"],
        integer_labels=task_name(cfg) != "regression",
        encoding=encoding,
    )


def _take(split: Split, idx: np.ndarray) -> Split:
    ids = None if split.ids is None else [split.ids[i] for i in idx]
    return Split(split.X[idx], None if split.y is None else split.y[idx], ids, split.encoding)


def load_splits(cfg: dict, encoding: TableEncoding | None = None) -> Splits:
    """Train/val/test data for a config: separate files, or seeded stratified splits of one.

    ``encoding``: the CSV categories and class names a run recorded (test/predict); None: learnt from
    the training file and applied to the validation and test files.
    """
    d = cfg["data"]
    if d["source"] == "factory":
        made = import_object(d["factory"], "data.factory")
        try:
            out = made() if callable(made) else made
        except Exception as e:  # noqa: BLE001 - the user's code failed; say so in one line
            raise ConfigError(f"data.factory '{d['factory']}' raised {type(e).__name__}: {e}") from None
        if isinstance(out, dict):
            return Splits(out.get("train"), out.get("val"), out.get("test"))
        if isinstance(out, (tuple, list)) and len(out) in (2, 3):
            return Splits(out[0], out[1], out[2] if len(out) == 3 else None)
        raise ConfigError(
            f"data.factory '{d['factory']}' must return a dict with 'train', 'val' (and 'test') "
            f"or a tuple (train, val[, test]); got {type(out).__name__}."
        )
    if d["source"] == "images":
        return _image_splits(cfg, None)
    if d["source"] == "digits":
        X, y = load_digits_arrays()
        full = Split(X, y)
    else:
        full = _load_file(cfg, d["train"], require_labels=True, encoding=encoding)
        encoding = full.encoding
        column = (
            f"array {shown_repr(d['y_key'])}"
            if d["source"] == "npz"
            else f"label column {shown_repr(d['label'])}"
        )
        check_classes(full.y, d["train"], column, task_name(cfg), cfg["task"]["ignore_index"])
    val_frac = 0.0 if d["val"] else d["val_split"]
    test_frac = 0.0 if d["test"] else d["test_split"]
    # labelled: require_labels refuses a file without its labels, and the config an empty data.label
    assert full.y is not None
    train_idx, val_idx, test_idx = stratified_split(full.y, [val_frac, test_frac], d["split_seed"])
    train = _take(full, train_idx)
    val = (
        _load_file(cfg, d["val"], True, encoding)
        if d["val"]
        else (_take(full, val_idx) if len(val_idx) else None)
    )
    test: Split | None
    if d["test"]:
        test = _load_file(cfg, d["test"], require_labels=False, encoding=encoding)
    else:
        test = _take(full, test_idx) if len(test_idx) else None
    return Splits(train, val, test)


def _image_splits(cfg: dict, fmt: image_data.ImageFormat | None) -> Splits:
    """An image folder's splits (see :mod:`trainval.data.images`), read as ``fmt`` (None: settled now)."""
    d = cfg["data"]
    fractions = (0.0 if d["val"] else d["val_split"], 0.0 if d["test"] else d["test_split"])
    train, val, test, fmt = image_data.load_image_splits(d, fractions, fmt)
    return Splits(train, val, test, fmt.record())


def _pair(split: Any) -> Any:
    """A Split as the (X, y) pair the Trainer takes; other objects (Datasets...) pass through."""
    if isinstance(split, Split):
        return (split.X, split.y)
    return split


def _arrays(s: Any) -> tuple[Any, Any]:
    """``(X, y)`` of in-memory data (a Split or a pair), else ``(None, None)`` (Datasets...)."""
    if isinstance(s, Split):
        return s.X, s.y
    if isinstance(s, (tuple, list)) and len(s) == 2:
        return s[0], s[1]
    return None, None


def _shape_and_outputs(
    splits: Splits, task: str, model_name: str, classes: list[str] | None = None
) -> tuple[list[int] | None, int | None]:
    """The input shape and the number of outputs a built-in model needs, from the task and the targets.

    multiclass: the largest class id + 1 (train and val); binary: 1; multilabel: the targets' width;
    regression: the number of values per target. ``(None, None)`` when the data is not in memory (a
    ``module:Class`` model then knows its own sizes).
    """
    X, y = _arrays(splits.train)
    if isinstance(y, (dict, tuple, list)):  # several heads: the module:Class model knows its own sizes
        if model_name in ("mlp", "cnn"):
            raise ConfigError(
                f"model.name {model_name} has one output, and the training targets hold several heads; "
                "use a 'module:Class' model with an output per head (and a task.loss of your own)."
            )
        return list(np.asarray(X).shape[1:]) if not isinstance(X, dict) else None, None
    if X is None or y is None:
        if model_name in ("mlp", "cnn"):
            raise ConfigError(
                f"model.name {model_name} needs in-memory training data (X, y) to size itself; with a "
                "Dataset factory use a 'module:Class' model that knows its input and output sizes."
            )
        return None, None
    X, y = np.asarray(X) if not isinstance(X, torch.Tensor) else X, np.asarray(y)
    if len(X) == 0:
        raise DataError("the training data is empty (0 samples).")
    in_shape = list(X.shape[1:])
    if task == "binary":
        return in_shape, 1
    if task in ("multilabel", "regression"):
        return in_shape, int(np.prod(y.shape[1:])) if y.ndim > 1 else 1
    if classes is not None:  # class names learnt from the training file: one output each
        return in_shape, len(classes)
    labels = [y]
    _, vy = _arrays(splits.val)
    if vy is not None:
        labels.append(np.asarray(vy))
    try:
        top = max(int(np.max(lab)) for lab in labels if len(lab))
    except (TypeError, ValueError):
        raise DataError(
            "multiclass targets must be integer class ids (set task.name for other targets)."
        ) from None
    return in_shape, top + 1


# --------------------------------------------------------------------------------------------------
# Model, optimizer, scheduler


def build_model(
    model_cfg: dict, in_shape: list[int] | None, num_outputs: int | None, *, on_meta: bool = False
) -> nn.Module:
    """A built-in model sized for the data (``num_outputs``: classes, labels or values), or ``module:Class``.

    ``on_meta``: a built-in model is built on the meta device (no memory, no random draws), for FSDP to
    shard before each rank materialises its part (:mod:`trainval.loop.materialize`: the same weights).
    """
    name = model_cfg["name"]
    if name in ("mlp", "cnn") and on_meta:
        with torch.device("meta"):
            return build_model(model_cfg, in_shape, num_outputs)
    if name in ("mlp", "cnn"):
        if in_shape is None or num_outputs is None:  # e.g. a config.yaml edited by hand
            raise ConfigError(
                f"model.name {name} needs the data's sample shape and number of outputs to size itself; "
                "give in-memory training data (X, y), or use a 'module:Class' model."
            )
        if name == "mlp":
            return MLP(
                int(np.prod(in_shape)),
                num_outputs,
                model_cfg["hidden"],
                model_cfg["dropout"],
                model_cfg["batchnorm"],
            )
        if len(in_shape) != 3:
            raise ConfigError(
                f"model.name cnn needs image inputs of shape [N, C, H, W]; the data has samples of shape "
                f"{in_shape}. Use model.name=mlp for feature vectors."
            )
        return CNN(in_shape[0], num_outputs, model_cfg["channels"], model_cfg["dropout"])
    cls = import_object(name, "model.name")
    kwargs = dict(model_cfg["kwargs"])
    params: Mapping[str, inspect.Parameter]
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    if "num_classes" in params and num_outputs is not None:  # a module:Class model's output size
        kwargs.setdefault("num_classes", num_outputs)
    if "in_features" in params and in_shape is not None:
        kwargs.setdefault("in_features", int(np.prod(in_shape)))
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(
            f"model.name '{name}' could not be built with model.kwargs {shown_repr(kwargs)}: {e}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model.name '{name}' built a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _shards_on_meta(cfg: dict) -> bool:
    """FSDP's run: the built-in models start on the meta device, so no rank ever holds the whole model
    (a ``module:Class`` model is built as it is: its own init may not survive the meta device)."""
    return cfg["train"]["strategy"] == "fsdp" and cfg["model"]["name"] in ("mlp", "cnn")


def build_optimizer(cfg: dict, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    if o["name"] == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=o["lr"],
            momentum=o["momentum"],
            weight_decay=o["weight_decay"],
            nesterov=o["nesterov"],
        )
    if len(o["betas"]) != 2:
        raise ConfigError(f"optim.betas must hold two numbers, got {o['betas']}.")
    cls = torch.optim.Adam if o["name"] == "adam" else torch.optim.AdamW
    return cls(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer, n_train: int, stream: bool = False):
    """The ``scheduler`` section's schedule; onecycle lays itself out over ``n_train`` samples (0: unknown)
    unless ``scheduler.steps_per_epoch`` says; ``stream``: the training data is an IterableDataset."""
    s, t = cfg["scheduler"], cfg["train"]
    sched = torch.optim.lr_scheduler
    if s["name"] == "none":
        return None
    if s["name"] == "step":
        return sched.StepLR(optimizer, step_size=s["step_size"], gamma=s["gamma"])
    if s["name"] == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=t["epochs"], eta_min=s["min_lr"])
    if s["name"] == "plateau":
        mode: Literal["min", "max"] = t["mode"] or monitor_direction(cfg)  # the schema allows only min/max
        return sched.ReduceLROnPlateau(
            optimizer, mode=mode, factor=s["factor"], patience=s["patience"], min_lr=s["min_lr"]
        )
    if s["steps_per_epoch"]:
        per_epoch = s["steps_per_epoch"]
    elif n_train < 1:
        raise ConfigError(
            "scheduler.name onecycle needs the number of optimizer steps per epoch, and the training data "
            "is a stream without a length: set scheduler.steps_per_epoch, or give the dataset a __len__."
        )
    else:
        world = launch.read().world_size  # torchrun, srun tasks or RANK/WORLD_SIZE alike
        batches = math.ceil(math.ceil(n_train / world) / t["batch_size"])
        if stream and cfg["data"]["num_workers"] > 1:  # a stream's workers each end on a partial batch
            batches += cfg["data"]["num_workers"] - 1
        per_epoch = math.ceil(batches / t["accumulate_steps"])
    total = (
        per_epoch * t["epochs"] if t["max_steps"] is None else min(per_epoch * t["epochs"], t["max_steps"])
    )
    return sched.OneCycleLR(optimizer, max_lr=s["max_lr"] or 10 * cfg["optim"]["lr"], total_steps=total)


def monitor_direction(cfg: dict) -> Literal["min", "max"]:
    """``max``/``min`` for the metric the Trainer will monitor (``train.monitor``, or its default: the
    first metric), as the Trainer decides it, for a ReduceLROnPlateau built before the Trainer."""
    if isinstance(cfg["task"]["metrics"], dict) or own_loss(cfg):  # heads the first batch settles
        if (cfg["train"]["monitor"] or "").endswith("_loss"):
            return "min"
        raise ConfigError(
            "scheduler.name plateau with a task.loss of your own (or metrics per head) needs train.mode "
            "(min or max) for its monitored metric, or train.monitor=val_loss."
        )
    task = make_task(task_name(cfg), None)
    assert task is not None  # a task name always gives a Task (None only for a task a BCE loss leaves open)
    metrics = resolve_metrics(cfg["task"]["metrics"], task)
    name = (cfg["train"]["monitor"] or f"val_{next(iter(metrics))}").split("_", 1)[1]
    if name == "loss" or name not in metrics:
        return "min"
    return "max" if metrics[name].higher_is_better else "min"


def _num_samples(data: Any) -> int:
    """Samples in a split: a Split, an (X, y) pair, a Dataset or a DataLoader (0 when unknown)."""
    X, _ = _arrays(data)
    try:
        if X is not None:
            return len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except (TypeError, StopIteration):
        return 0


LOSSES = {
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "smooth_l1": nn.SmoothL1Loss,
    "huber": nn.HuberLoss,
}
DEFAULT_LOSS = {
    "multiclass": "cross_entropy",
    "binary": "bce_with_logits",
    "multilabel": "bce_with_logits",
    "regression": "mse",
}


def task_name(cfg: dict) -> str:
    return cfg["task"]["name"] or "multiclass"


def own_loss(cfg: dict) -> bool:
    """``task.loss`` names the user's own ``module:function`` (the Trainer infers the task, per head)."""
    return ":" in (cfg["task"]["loss"] or "")


def build_loss(cfg: dict, splits: Splits | None, num_outputs: int | None) -> nn.Module:
    """The loss named by ``task.loss`` (default per task), with ``task.class_weights``/``ignore_index``."""
    tk, task = cfg["task"], task_name(cfg)
    name = tk["loss"] or DEFAULT_LOSS[task]
    if ":" in name:  # the user's own loss(outputs, targets): a function, or an nn.Module class
        loss = import_object(name, "task.loss")
        if isinstance(loss, type):
            loss = loss()
        if not callable(loss):
            raise ConfigError(
                f"task.loss '{name}' is a {type(loss).__name__}, not a function or a loss class."
            )
        return loss
    kwargs: dict[str, Any] = {}
    if tk["class_weights"] is not None:
        if name != "cross_entropy":
            raise ConfigError(
                f"task.class_weights weighs the classes of a cross_entropy loss; task.loss is {name}."
            )
        weights = tk["class_weights"]
        if weights == "balanced":
            _, y = _arrays(splits.train) if splits is not None else (None, None)
            if y is None or num_outputs is None:
                raise ConfigError(
                    "task.class_weights: balanced needs in-memory training targets; give a list of weights."
                )
            counts = np.bincount(
                np.asarray(y).reshape(-1).astype(np.int64).clip(min=0), minlength=num_outputs
            )
            weights = (counts.sum() / (num_outputs * np.maximum(counts, 1))).tolist()
        elif num_outputs is not None and len(weights) != num_outputs:
            raise ConfigError(
                f"task.class_weights has {len(weights)} weights but the model has {num_outputs} classes."
            )
        kwargs["weight"] = torch.tensor(weights, dtype=torch.float32)
    if tk["ignore_index"] is not None:
        if name != "cross_entropy":
            raise ConfigError(f"task.ignore_index applies to a cross_entropy loss; task.loss is {name}.")
        kwargs["ignore_index"] = tk["ignore_index"]
    return LOSSES[name](**kwargs)


def build_trainer(
    cfg: dict,
    model: nn.Module,
    n_train: int,
    resolved: dict,
    loss: nn.Module | None = None,
    callbacks: list | tuple = (),
    stream: bool = False,
) -> Trainer:
    t = cfg["train"]
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, n_train, stream)
    folder = run_folder(cfg)
    callbacks = list(callbacks)
    if t["patience"]:
        callbacks.append(EarlyStopping(t["patience"]))
    if t["ema_decay"] is not None:
        callbacks.append(EMA(t["ema_decay"]))
    if cfg["log"]["tensorboard"]:
        callbacks.append(TensorBoardLogger())  # the run folder's own tb folder
    callbacks += trackers.from_config(cfg)
    saved = dict(cfg)
    saved["resolved"] = resolved
    return Trainer(
        model,
        optimizer,
        loss if loss is not None else build_loss(cfg, None, resolved.get("num_outputs")),
        task=cfg["task"]["name"] if own_loss(cfg) else task_name(cfg),  # own loss: inferred (per head)
        metrics=cfg["task"]["metrics"],
        callbacks=callbacks,
        scheduler=scheduler,
        config=saved,
        out_dir=folder,
        **options.from_config(cfg),
    )


# --------------------------------------------------------------------------------------------------
# The three workflows


def fit(
    cfg: dict, resume: bool = False, callbacks: list | tuple = (), test_if: Callable[[], bool] = lambda: True
) -> dict:
    """Train; then, when there is a test split, reload best.pt, test and write predictions.csv.

    ``callbacks``: added to the ones the config asks for (``trainval tune``'s pruning, trackers).
    ``test_if``: asked after training; False skips the test and the predictions (a pruned trial).
    """
    if not runfolder.is_main_process():
        return _fit(cfg, resume, callbacks, test_if)
    with runfolder.locked(run_folder(cfg), "fit"):  # one writer per run folder, released on any exit
        return _fit(cfg, resume, callbacks, test_if)


def _fit(cfg: dict, resume: bool, callbacks: list | tuple, test_if: Callable[[], bool]) -> dict:
    started = time.perf_counter()
    seed_everything(cfg["train"]["seed"])  # before the model is built: its initial weights too
    splits = load_splits(cfg)
    if splits.train is None:
        raise ConfigError("there is no training data (data.factory returned no 'train').")
    table = splits.train.encoding if isinstance(splits.train, Split) else None
    if cfg["data"]["standardize"]:
        splits, saver = _standardize_for_fit(splits)
        callbacks = [*callbacks, saver]
    classes = (
        table.classes if table is not None else splits.resolved.get("classes")
    )  # a CSV's or class folders'
    in_shape, num_outputs = _shape_and_outputs(splits, task_name(cfg), cfg["model"]["name"], classes)
    if "classes" in splits.resolved and task_name(cfg) == "multiclass":  # every class folder, even if unseen
        num_outputs = len(splits.resolved["classes"])
    resolved: dict[str, Any] = {"in_shape": in_shape, "num_outputs": num_outputs, "task": task_name(cfg)}
    resolved.update(splits.resolved)
    if cfg["data"]["source"] == "csv":  # test/predict then take these columns by name, in this order
        resolved["features"] = csv_feature_columns(
            cfg["data"]["train"], cfg["data"]["label"], cfg["data"]["features"]
        )
        if table is not None and table.categories:  # one-hot order of each text column
            resolved["categories"] = table.categories
        if classes is not None:  # class id k is classes[k]: predictions.csv writes the names
            resolved["classes"] = classes
    # torchrun restarting its workers (--max-restarts) makes Trainer.fit resume from last.pt: the same check
    restarted = launch.read().restart_count > 0
    notes = (
        _resume_changes(cfg, resolved) if resume or restarted else []
    )  # a refusal comes before anything is built
    model = build_model(cfg["model"], in_shape, num_outputs, on_meta=_shards_on_meta(cfg))
    loss = build_loss(cfg, splits, num_outputs)
    trainer = build_trainer(
        cfg, model, _num_samples(splits.train), resolved, loss, callbacks, stream=is_stream(splits.train)
    )
    for note in notes:
        trainer.log(note)
    fit_started = time.perf_counter()
    history = trainer.fit(
        _pair(splits.train), _pair(splits.val) if splits.val is not None else None, resume=resume
    )
    fit_seconds = time.perf_counter() - fit_started
    folder = run_folder(cfg)
    assert trainer.train_loader is not None  # fit built it
    summary: dict[str, Any] = {
        "run_folder": folder,
        "epochs": len(history),
        "monitor": trainer.monitor,
        "best_epoch": trainer.best_epoch,
        "best_value": trainer.best_value,
        "train_samples": trainer.train_loader.dataset_size or _num_samples(splits.train),
    }
    if splits.test is not None and test_if():
        summary.update(_test_and_predict(trainer, splits.test, folder, classes))
    epoch_seconds = sum(r.get("seconds", 0.0) for r in history)
    summary["wall_seconds"] = round(time.perf_counter() - started, 3)
    summary["fit_seconds"] = round(fit_seconds, 3)
    summary["train_samples_per_second"] = (
        round(summary["train_samples"] * len(history) / epoch_seconds, 1) if epoch_seconds > 0 else None
    )
    if trainer.dist.is_main:  # beside what the Trainer's RunSummary recorded
        runs.update_summary(folder, **summary)
    return summary


def _standardize_for_fit(splits: Splits) -> tuple[Splits, preprocess.SaveStandardizer]:
    """Fit the statistics on the training split and apply them to every split; the callback saves them
    once the Trainer has accepted the run folder (a refused fit leaves an existing run's file alone)."""
    if not isinstance(splits.train, Split):
        raise ConfigError("data.standardize needs in-memory features (data.source csv, npz or digits).")
    stats = preprocess.fit_standardizer(splits.train.X)
    standardized = Splits(
        *(
            _standardized(s, stats, name)
            for s, name in (
                (splits.train, "training data"),
                (splits.val, "validation data"),
                (splits.test, "test data"),
            )
        )
    )
    return standardized, preprocess.SaveStandardizer(stats)


def _standardized(split: Any, stats: dict, what: str) -> Any:
    if split is None:
        return None
    if not isinstance(split, Split):
        raise ConfigError("data.standardize needs in-memory features (data.source csv, npz or digits).")
    return Split(preprocess.apply(stats, split.X, what), split.y, split.ids, split.encoding)


def _test_data(cfg: dict) -> tuple[Splits, dict | None]:
    """The data ``test``/``predict`` need, and the model sizes fit recorded (None: size from the data).

    With a separate test file (``data.test``) and a run folder whose config.yaml records the model's
    input shape and outputs, the training file is not read at all: a run can be scored or used long
    after its training data is gone. The recorded sizes are plain numbers, never code.
    """
    d = cfg["data"]
    if d["source"] == "images":  # always read as fit recorded, whether from data.test or data.train
        sizes = runs.recorded_sizes(run_folder(cfg))
        fmt = image_data.ImageFormat.from_record(sizes, os.path.join(run_folder(cfg), "config.yaml"))
        if d["test"]:
            return Splits(None, None, image_data.load_folder(d["test"], "data.test", fmt)), sizes
        return _image_splits(cfg, fmt), sizes
    recorded = runs.recorded_sizes(run_folder(cfg)) if d["source"] in ("csv", "npz") else None
    encoding = _recorded_encoding(cfg)
    features = (recorded or {}).get("features")
    if d["source"] == "csv" and d["features"] is None and isinstance(features, list):
        # the columns the model was trained on, by name: a test file with its columns in another
        # order is read right, one without them is refused naming them
        cfg = {**cfg, "data": {**d, "features": [str(c) for c in features]}}
        d = cfg["data"]
    sizes = recorded if d["test"] else None
    if (
        sizes is not None
        and cfg["task"]["class_weights"] != "balanced"
        and sizes.get("task") == task_name(cfg)
    ):
        splits = Splits(None, None, _load_file(cfg, d["test"], require_labels=False, encoding=encoding))
    else:
        splits, sizes = load_splits(cfg, encoding), None
    if cfg["data"]["standardize"] and splits.test is not None:
        stats = preprocess.load(run_folder(cfg))
        splits = Splits(splits.train, splits.val, _standardized(splits.test, stats, "test data"))
    return splits, sizes


def _recorded_image_classes(cfg: dict, sizes: dict | None) -> list[str] | None:
    """The class folders' names fit recorded for an image run (checked by ImageFormat.from_record)."""
    if cfg["data"]["source"] != "images" or not sizes or task_name(cfg) != "multiclass":
        return None
    classes = sizes.get("classes")
    return [str(c) for c in classes] if isinstance(classes, list) else None


def _recorded_encoding(cfg: dict) -> TableEncoding | None:
    """The categories and class names fit learnt from a training CSV (config.yaml, resolved), or None."""
    recorded = runs.recorded_sizes(run_folder(cfg)) if cfg["data"]["source"] == "csv" else None
    if recorded is None:
        return None
    state = {
        "features": recorded.get("features") or [],
        "categories": recorded.get("categories") or {},
        "classes": recorded.get("classes"),
    }
    return TableEncoding.from_state(state, os.path.join(run_folder(cfg), "config.yaml"))


def _resume_changes(cfg: dict, resolved: dict) -> list[str]:
    """Refuse resuming with a config that last.pt's run could not honour; notes on what may change."""
    path = os.path.join(run_folder(cfg), "last.pt")
    if not os.path.exists(path):
        return []  # Trainer.fit says there is nothing to resume
    state = check_last(load_checkpoint(path, map_location="cpu"), path)  # its loop fields: checked, once
    saved = state.get("config")
    if not isinstance(saved, dict):
        return []  # written by the Python API: there is no config to compare with
    return config.resume_changes(saved, cfg, resolved, state["epoch"] or 0, path)


def _test_and_predict(trainer: Trainer, test: Any, folder: str, classes: list[str] | None = None) -> dict:
    out: dict[str, Any] = {}
    labelled = not (isinstance(test, Split) and test.y is None)
    if labelled:
        metrics = trainer.test(_pair(test), ckpt="best")
        out["test"] = metrics
        trainer.log(f"{test_line(metrics)} (best.pt from epoch {trainer.best_epoch})")
    inputs = test.X if isinstance(test, Split) else test
    ids = test.ids if isinstance(test, Split) else None
    path = os.path.join(folder, "predictions.csv")
    written = _write_predictions_for(
        trainer, inputs, "best", path, proba=False, cfg=trainer.config, ids=ids, classes=classes
    )
    trainer.log(f"wrote {written} predictions -> {path}")
    out["predictions"] = path
    return out


def test_line(metrics: dict) -> str:
    """``Test Acc: 0.98 f1_macro: 0.97 Loss: 0.05`` from ``{"test_loss", "test_<metric>"...}``."""
    shown = [
        f"{'Acc' if k == 'test_acc' else k[5:]}: {v:.6f}" for k, v in metrics.items() if k != "test_loss"
    ]
    return " ".join(["Test", *shown, f"Loss: {metrics['test_loss']:.6f}"])


def _target_names(cfg: dict | None, width: int) -> list[str]:
    label = (cfg or {}).get("data", {}).get("label")
    if isinstance(label, list) and len(label) == width:
        return list(label)
    if isinstance(label, str) and width == 1 and (cfg or {}).get("data", {}).get("source") == "csv":
        return [label]
    return ["Target"] if width == 1 else [f"target_{k}" for k in range(width)]


def _write_predictions_for(
    trainer: Trainer,
    inputs: Any,
    ckpt: str,
    path: str | IO[str],
    proba: bool,
    cfg: dict | None,
    force: bool = False,
    ids: list[str] | None = None,
    classes: list[str] | None = None,
) -> int:
    """Predict ``inputs`` and write the task's predictions file (rank 0); returns the number of rows.
    ``classes``: the class names a CSV's labels had (the file then holds names)."""
    predictions = trainer.predict(inputs, ckpt=ckpt)
    assert trainer.task is not None  # predict resolved it
    probs = trainer.predict_proba(inputs, ckpt=None) if (proba and trainer.task.is_classification) else None
    if trainer.dist.is_main:
        write_predictions(
            path,
            trainer.task.name,
            predictions,
            probs,
            _target_names(cfg, _width(predictions)),
            force=force,
            ids=ids,
            classes=classes,
        )
    return _rows(predictions)


def _rows(t: Any) -> int:
    return len(next(iter(t.values()))) if isinstance(t, dict) else len(t)


def _width(t: Any) -> int:
    if isinstance(t, dict):  # a multi-head model's (its columns are named by head)
        return 0
    return int(np.prod(t.shape[1:])) if t.dim() > 1 else 1


def _trainer_from_run(
    cfg: dict, ckpt: str | None, splits: Splits, sizes: dict | None = None
) -> tuple[Trainer, str]:
    """The model built from the user's own config and data, then checked against the checkpoint.

    The checkpoint is data only: the config recorded in it is compared, never used to build anything.
    """
    folder = run_folder(cfg)
    path = runs.checkpoint_path(folder, ckpt)
    if ckpt not in (None, "best", "last") and not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint not found: {path} (--ckpt takes best, last or the path of a .pt file)."
        )
    state = load_checkpoint(path, map_location="cpu")
    if sizes is not None:  # recorded by fit in the run folder's config.yaml
        in_shape, num_outputs = sizes["in_shape"], sizes["num_outputs"]
        test = splits.test
        if isinstance(test, Split) and hasattr(test.X, "shape") and list(test.X.shape[1:]) != list(in_shape):
            raise DataError(
                f"the test data ({cfg['data']['test']}) has samples of shape {list(test.X.shape[1:])}, "
                f"but the run's model was trained on samples of shape {list(in_shape)} (config.yaml, "
                "resolved.in_shape); give data shaped like the training data."
            )
    else:
        encoding = _recorded_encoding(cfg)
        in_shape, num_outputs = _shape_and_outputs(
            splits, task_name(cfg), cfg["model"]["name"], encoding.classes if encoding else None
        )
    resolved = {"in_shape": in_shape, "num_outputs": num_outputs, "task": task_name(cfg)}
    check_recorded_model(state, cfg["model"], resolved, path)  # before anything is built
    model = build_model(cfg["model"], in_shape, num_outputs)
    trainer = build_trainer(cfg, model, 1, resolved, build_loss(cfg, splits, num_outputs))
    return trainer, path


def test(cfg: dict, ckpt: str | None = "best", trust_code: bool = False) -> dict:
    """Metrics of a checkpoint on the test split; ``trust_code`` allows importing 'module:name' strings."""
    require_trusted_code(cfg, trust_code, "test")
    with runfolder.locked(run_folder(cfg), "test", create=False):  # it writes test.json there
        return _test(cfg, ckpt)


def _test(cfg: dict, ckpt: str | None) -> dict:
    splits, sizes = _test_data(cfg)
    if splits.test is None:
        raise ConfigError("there is no test data: set data.test or data.test_split.")
    if isinstance(splits.test, Split) and splits.test.y is None:
        raise DataError(
            f"the test data ({cfg['data']['test']}) has no labels, so it cannot be scored; "
            "use `trainval predict` to write predictions for it."
        )
    trainer, path = _trainer_from_run(cfg, ckpt, splits, sizes)
    metrics = trainer.test(_pair(splits.test), ckpt=path)
    folder = run_folder(cfg)
    result = {"checkpoint": path, **metrics}
    if not runfolder.is_run_folder(folder):
        trainer.log(f"(test.json not written: {folder} is not a run folder that trainval made)")
    elif trainer.dist.is_main:
        summary_path = os.path.join(folder, "summary.json")
        # before test.json is written: a link, a FIFO or a device there is refused (never opened)
        check_replaceable(
            summary_path, "the run's summary.json", RunFolderError, hint="remove it from the run folder"
        )
        summary = runs.read_summary(folder)  # None when there is none, or it is no JSON trainval wrote
        write_json(os.path.join(folder, "test.json"), result, "test results")
        if summary is not None:
            summary["test"] = metrics
            write_json(summary_path, summary)
    trainer.log(f"{test_line(metrics)} ({path})")
    return result


def predict(
    cfg: dict,
    ckpt: str | None = "best",
    out: str | None = None,
    proba: bool = False,
    trust_code: bool = False,
    force: bool = False,
    config_path: str | None = None,
) -> str:
    """Write predictions for the test split.

    Args:
        out: the CSV file (default: the run folder's ``predictions.csv``); only a regular file is ever
            replaced (never a symbolic link, a FIFO or a device). ``"-"`` writes the CSV to standard
            output, and everything else predict prints goes to standard error meanwhile.
        trust_code: allow importing the 'module:name' model or data factory the config names.
        force: replace an existing ``out`` that is not a predictions file trainval wrote.
        config_path: the config file, so that ``out`` can never replace it.
    """
    require_trusted_code(cfg, trust_code, "predict")
    folder = run_folder(cfg)
    if out == runfolder.STDOUT:
        stdout = sys.stdout
        with contextlib.redirect_stdout(sys.stderr):  # standard output holds the CSV and nothing else
            _predict(cfg, ckpt, stdout, proba, force)
        return out
    out = out or os.path.join(folder, "predictions.csv")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {out}: the folder {parent} does not exist; create it first.")
    into_folder = os.path.realpath(parent) == os.path.realpath(folder)
    with runfolder.locked(folder, "predict", create=False) if into_folder else contextlib.nullcontext():
        label = cfg["data"].get("label")
        runfolder.check_output(
            out,
            _protected_paths(cfg, ckpt, config_path),
            force,
            target_names=label if isinstance(label, list) else [label] if label else [],
        )
        _predict(cfg, ckpt, out, proba, force)
    return out


def _protected_paths(cfg: dict, ckpt: str | None, config_path: str | None) -> dict[str, str]:
    """The files of a run that ``predict --out`` must never replace, and what each one is."""
    folder, d = run_folder(cfg), cfg["data"]
    protected = {
        os.path.join(folder, name): f"a file of the run folder ({name})"
        for name in runfolder.RUN_FILES
        if name != "predictions.csv"
    }
    protected[os.path.join(folder, runfolder.MARKER)] = "the run folder's marker"
    if ckpt not in (None, "best", "last"):
        protected[ckpt] = "the checkpoint it reads (--ckpt)"
    if d["source"] in ("csv", "npz"):
        for key in ("train", "val", "test"):
            protected[d[key]] = f"an input of the run (data.{key})"
    if config_path:
        protected[config_path] = "the config file"
    return protected


def _predict(cfg: dict, ckpt: str | None, out: str | IO[str], proba: bool, force: bool = False) -> None:
    splits, sizes = _test_data(cfg)
    if splits.test is None:
        raise ConfigError("there is no test data to predict: set data.test or data.test_split.")
    trainer, path = _trainer_from_run(cfg, ckpt, splits, sizes)
    inputs = splits.test.X if isinstance(splits.test, Split) else splits.test
    ids = splits.test.ids if isinstance(splits.test, Split) else None
    encoding = _recorded_encoding(cfg)
    classes = encoding.classes if encoding else _recorded_image_classes(cfg, sizes)
    written = _write_predictions_for(
        trainer, inputs, path, out, proba=proba, cfg=cfg, force=force, ids=ids, classes=classes
    )
    trainer.log(
        f"wrote {written} predictions ({path}) -> {out if isinstance(out, str) else 'standard output'}"
    )


# --------------------------------------------------------------------------------------------------
# Files


def write_predictions(
    path: str | IO[str],
    task: str,
    predictions: torch.Tensor | dict[str, torch.Tensor],
    probs: torch.Tensor | None = None,
    target_names: list[str] | None = None,
    force: bool = False,
    ids: list[str] | None = None,
    classes: list[str] | None = None,
) -> None:
    """The predictions file, written atomically (or the CSV written to ``path``, a text stream such as
    ``sys.stdout``). Columns per task:

    multiclass/binary ``Id,Class`` (+ ``prob_<c>`` with probabilities; binary: ``prob_1``), with
    ``classes`` (a CSV's class names) the names in ``Class`` and ``prob_<name>`` columns; multilabel
    ``Id,label_<k>...`` (+ ``prob_<k>``); regression ``Id,<target names>``. Dense outputs (a class per
    position, or multi-dimensional values) go to a ``.npy`` file beside the CSV, whose rows then say
    where each sample's array is; an existing ``.npy`` there is replaced only when the CSV it replaces
    is such a file (or with ``force``). A stream has no "beside": dense outputs need a file. ``ids``: each
    row's ``Id`` (an image's file name, quoted as CSV needs), else the row number.
    """
    if isinstance(predictions, dict):  # a multi-head model: each head's columns, <head> or <head>_<k>
        n = len(next(iter(predictions.values())))
        columns, cells = [], []
        for head, values in predictions.items():
            flat = values.reshape(n, -1)
            columns += [str(head)] if flat.shape[1] == 1 else [f"{head}_{k}" for k in range(flat.shape[1])]
            cells.append([[f"{v:.8g}" if isinstance(v, float) else v for v in r] for r in flat.tolist()])
        rows = [sum((c[i] for c in cells), []) for i in range(n)]
        return _write_rows(path, columns, rows, ids)
    n = len(predictions)
    if predictions.dim() > 2 or (task == "multiclass" and predictions.dim() > 1):
        if not isinstance(path, str):
            raise ConfigError(
                f"this model's predictions are arrays ({list(predictions.shape[1:])} per sample), "
                "written to a .npy file beside the predictions CSV, so they cannot go to standard "
                "output (`--out -`); give --out a file name such as predictions.csv."
            )
        npy = os.path.splitext(path)[0] + ".npy"
        if os.path.lexists(npy) and not force and runfolder.predictions_header(path) != ["Id", "Array"]:
            raise ConfigError(
                f"the predictions of this dense output go to {npy} beside {path}, and {npy} "
                "exists but was not written with it; choose another --out, or pass --force "
                "to replace it."
            )
        buf = io.BytesIO()
        np.save(buf, predictions.numpy())
        data = buf.getvalue()
        atomic_write(npy, lambda f: f.write(data), "predictions array")
        columns, rows = ["Array"], [[f"{os.path.basename(npy)}[{i}]"] for i in range(n)]
    elif task == "multilabel":
        columns = [f"label_{k}" for k in range(predictions.shape[1])]
        rows = predictions.tolist()
    elif task == "regression":
        values = predictions.reshape(n, -1)
        columns = target_names or [f"target_{k}" for k in range(values.shape[1])]
        rows = [[f"{v:.8g}" for v in row] for row in values.tolist()]
    else:
        predicted = predictions.tolist()
        columns, rows = ["Class"], [[classes[int(c)] if classes else c] for c in predicted]
    if probs is not None and probs.dim() <= 2 and not (task == "multiclass" and predictions.dim() > 1):
        p = probs.reshape(n, -1)
        if task == "binary":  # the positive class's probability
            columns = [*columns, f"prob_{classes[1] if classes else 1}"]
        else:
            columns = columns + [f"prob_{k}" for k in (classes or range(p.shape[1]))]
        rows = [r + [f"{v:.6g}" for v in pr] for r, pr in zip(rows, p.tolist())]
    _write_rows(path, columns, rows, ids)


def _write_rows(
    path: str | IO[str], columns: list[str], rows: list[list[Any]], ids: list[str] | None
) -> None:
    """``Id`` (``ids``, else the row number) and ``columns``, as CSV, atomically (or to a text stream)."""
    n = len(rows)
    buf_text = io.StringIO()
    out = csv.writer(buf_text, lineterminator="\n")  # a class name with a comma or a quote is quoted
    out.writerow(["Id", *columns])
    if ids is not None and len(ids) != n:  # a bug, never a file whose rows name the wrong samples
        raise RuntimeError(f"{n} predictions but {len(ids)} ids")
    for name, row in zip(ids if ids is not None else [str(i) for i in range(n)], rows):
        out.writerow([name, *map(str, row)])
    if not isinstance(path, str):
        path.write(buf_text.getvalue())
        path.flush()
        return
    text = buf_text.getvalue().encode()
    atomic_write(path, lambda f: f.write(text), "predictions file")


def write_json(path: str, obj: dict, what: str = "summary") -> None:
    data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
    atomic_write(path, lambda f: f.write(data), what)


__all__ = ["fit", "test", "predict", "load_splits", "build_model", "build_trainer", "run_folder"]


# --------------------------------------------------------------------------------------------------
# Reloading a run's model


def load_model(
    run_folder: str,
    ckpt: str = "best",
    model: nn.Module | None = None,
    device: Any = None,
    trust_code: bool = False,
) -> nn.Module:
    """A trained model from a run folder, in eval mode on ``device`` (default: CPU).

    Args:
        run_folder: a folder written by ``fit``.
        ckpt: ``best`` (default), ``last``, or a checkpoint path.
        model: load the weights into this module; without it, the built-in model (``mlp``/``cnn``)
            that the run's ``config.yaml`` describes is built again, at the sizes fit recorded.
        trust_code: allow importing the ``module:Class`` model the run's config names (its code runs).

    The checkpoint is data only: the config recorded inside it is compared with config.yaml, never used
    to decide what is built or imported.
    """
    path = runs.checkpoint_path(run_folder, ckpt)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"no checkpoint {path}: run fit first, or choose ckpt='best', 'last' or a path."
        )
    state = load_checkpoint(path, map_location="cpu")
    if model is None:
        recorded = runs.recorded_config(run_folder)
        sizes = runs.recorded_sizes(run_folder)
        if recorded is None or sizes is None:
            why = (
                "a run of the Python API"
                if recorded is None
                else "its data came from a data.factory, so fit did not record the model's input and output sizes"
            )
            raise ConfigError(
                f"{run_folder} records no model config to rebuild ({why}): build the model "
                "yourself and pass it as load_model(..., model=my_model)."
            )
        cfg = runs.run_config(run_folder)
        name = cfg["model"]["name"]
        if ":" in name and not trust_code:
            raise ConfigError(
                f"model.name={name} would import Python code; load_model imports code only with "
                "trust_code=True (CLI: --trust-code). Add it if you trust that code, or pass model=."
            )
        check_recorded_model(state, cfg["model"], sizes, path)
        model = build_model(cfg["model"], sizes["in_shape"], sizes["num_outputs"])
    load_model_weights(
        model, sharded.model_weights(state, path), path
    )  # a sharded last.pt: its shards put together
    model.to(torch.device(device) if device is not None else torch.device("cpu"))
    model.eval()
    return model
