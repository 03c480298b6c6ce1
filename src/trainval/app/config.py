"""The typed run config: schema with defaults, validation with clear errors, YAML in/out, overrides.

A config has the sections ``data``, ``model``, ``task``, ``optim``, ``scheduler``, ``train``, ``run``
and ``log``. Every key is declared once in :data:`SCHEMA` with its type, default, allowed values and a
one-line description; the README's reference table is generated from it (and a test keeps the two equal).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import yaml

from trainval import options
from trainval.errors import ConfigError
from trainval.options import Key
from trainval.run.runfolder import check_run_name
from trainval.untrusted import load_yaml, read_yaml, shown, shown_repr

SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "source": Key(
            "str",
            "digits",
            "where the data comes from",
            choices=("digits", "npz", "csv", "factory", "images"),
        ),
        "train": Key(
            "str", None, "training file (npz or csv), or folder of class subfolders (images)", nullable=True
        ),
        "val": Key(
            "str", None, "validation file; without it, `val_split` of the training file", nullable=True
        ),
        "test": Key(
            "str",
            None,
            "test file (labels optional); without it, `test_split` of the training file",
            nullable=True,
        ),
        "val_split": Key(
            "float", 0.15, "fraction held out for validation (stratified, seeded)", minimum=0.0, maximum=0.9
        ),
        "test_split": Key(
            "float",
            0.15,
            "fraction held out for testing when there is no test file",
            minimum=0.0,
            maximum=0.9,
        ),
        "label": Key(
            "str|list[str]",
            "label",
            "CSV target column, or a list of them (multilabel, multi-output regression)",
        ),
        "features": Key("list[str]", None, "CSV feature columns (default: all but the label)", nullable=True),
        "x_key": Key("str", "x", "npz array of features"),
        "y_key": Key("str", "y", "npz array of labels"),
        "factory": Key(
            "str",
            None,
            "`module:function` returning {'train', 'val', 'test'} data (source: factory)",
            nullable=True,
        ),
        "split_seed": Key(
            "int", 0, "seed of the stratified splits", minimum=0, maximum=2**32 - 1
        ),  # scikit-learn's range
        "image_size": Key(
            "int",
            None,
            "images: the side of the square every image is resized to (default: the training images' "
            "most common size); recorded in the run",
            nullable=True,
            minimum=1,
            maximum=4096,
        ),
        "image_mode": Key(
            "str",
            "auto",
            "images: `grayscale` (1 channel), `rgb` (3) or `auto` (grayscale when every training image is)",
            choices=("auto", "rgb", "grayscale"),
        ),
        "standardize": Key(
            "bool",
            False,
            "standardise features with the training split's per-feature mean and std "
            "(saved as `standardize.json` in the run folder; applied at test and predict)",
        ),
    },
    "model": {
        "name": Key(
            "str",
            "cnn",
            "built-in `mlp` or `cnn`, or `module:Class`",
            choices=("mlp", "cnn"),
            open_choices=True,
        ),
        "hidden": Key("list[int]", [256, 128], "MLP hidden layer sizes"),
        "channels": Key("list[int]", [32, 64], "CNN channels of its two conv blocks"),
        "dropout": Key("float", 0.25, "dropout probability", minimum=0.0, maximum=0.95),
        "batchnorm": Key("bool", True, "MLP: BatchNorm after each hidden layer"),
        "kwargs": Key("dict", {}, "keyword arguments for a `module:Class` model"),
    },
    "task": {
        "name": Key(
            "str",
            None,
            "what the model predicts (default: multiclass)",
            nullable=True,
            choices=("multiclass", "binary", "multilabel", "regression"),
        ),
        "metrics": Key(
            "list[str]|heads",
            None,
            "metrics per split (default per task: acc; f1_micro for multilabel; mse, mae for regression); "
            "a multi-head model's per head: `{cls: [acc], reg: [mae]}`",
            nullable=True,
        ),
        "loss": Key(
            "str",
            None,
            "loss (default per task: cross_entropy; bce_with_logits for binary/multilabel; mse), or a "
            "`module:function` loss(outputs, targets) of your own (a multi-head model's: dict targets)",
            nullable=True,
            choices=("cross_entropy", "bce_with_logits", "mse", "l1", "smooth_l1", "huber"),
            open_choices=True,
        ),
        "class_weights": Key(
            "list[float]|balanced",
            None,
            "multiclass: a weight per class, or `balanced` (n / (C * count))",
            nullable=True,
        ),
    },
    "optim": {
        "name": Key("str", "adam", "optimizer", choices=("sgd", "adam", "adamw")),
        "lr": Key("float", 1e-3, "learning rate", minimum=0.0),
        "weight_decay": Key("float", 0.0, "weight decay", minimum=0.0),
        "momentum": Key("float", 0.9, "SGD momentum", minimum=0.0, maximum=1.0),
        "nesterov": Key("bool", False, "SGD Nesterov momentum"),
        "betas": Key("list[float]", [0.9, 0.999], "Adam/AdamW betas"),
    },
    "scheduler": {
        "name": Key(
            "str",
            "none",
            "learning-rate schedule: per epoch (`step`, `cosine`, `plateau` on the monitored metric) or per batch (`onecycle`)",
            choices=("none", "step", "cosine", "onecycle", "plateau"),
        ),
        "step_size": Key("int", 10, "step: epochs between decays", minimum=1),
        "gamma": Key("float", 0.1, "step: decay factor", minimum=0.0, maximum=1.0),
        "min_lr": Key("float", 0.0, "cosine: final learning rate; plateau: lower bound", minimum=0.0),
        "max_lr": Key(
            "float", None, "onecycle: peak learning rate (default 10 x optim.lr)", nullable=True, minimum=0.0
        ),
        "steps_per_epoch": Key(
            "int",
            None,
            "onecycle: optimizer steps per epoch (default: from the training data's length; needed for a stream without one)",
            nullable=True,
            minimum=1,
        ),
        "factor": Key("float", 0.1, "plateau: decay factor", minimum=0.0, maximum=1.0),
        "patience": Key("int", 5, "plateau: epochs without improvement before decaying", minimum=0),
    },
    "train": {
        "patience": Key(
            "int",
            None,
            "early stopping: evaluations (epochs, or val_every_steps rows) without improvement (default: off)",
            nullable=True,
            minimum=1,
        ),
        "ema_decay": Key(
            "float",
            None,
            "validate and save best.pt with an exponential moving average of the weights, updated after every optimizer step with this decay, in (0, 1) (e.g. 0.999; default: off)",
            nullable=True,
        ),
    },
    "run": {
        "name": Key("str", "digits", "run name: the run folder is `<out_dir>/<name>`"),
        "out_dir": Key("str", "runs", "parent folder of run folders"),
    },
    "log": {
        "tensorboard": Key(
            "bool", False, "TensorBoard scalars in `<run folder>/tb` (needs the tensorboard extra)"
        ),
        "mlflow": Key("bool", False, "log to MLflow (the mlflow extra): scalars, the config as parameters"),
        "mlflow_uri": Key(
            "str", None, "MLflow tracking URI (default: `sqlite:///<run.out_dir>/mlflow.db`)", nullable=True
        ),
        "mlflow_experiment": Key("str", "trainval", "MLflow experiment name"),
        "wandb": Key("bool", False, "log to Weights & Biases (the wandb extra)"),
        "wandb_project": Key("str", "trainval", "W&B project"),
        "wandb_mode": Key(
            "str",
            None,
            "W&B mode: `online`, `offline` (no account needed) or `disabled` (default: W&B's own)",
            nullable=True,
            choices=("online", "offline", "disabled"),
        ),
        "artifacts": Key("bool", False, "trackers: also log best.pt as an artifact at the end"),
    },
}

# The Trainer's own options are declared once, in trainval.options (type, default, bounds, meaning):
# their config keys are added to the sections they name.
for _path, _key in options.cli_keys().items():
    _section, _, _name = _path.partition(".")
    SCHEMA[_section][_name] = _key


def defaults() -> dict:
    return {s: {k: copy.deepcopy(key.default) for k, key in keys.items()} for s, keys in SCHEMA.items()}


def all_paths() -> list[str]:
    return [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys]


def _unknown(path: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(path, all_paths(), n=1, cutoff=0.5)
    if not close:
        leaf = path.rsplit(".", 1)[-1]
        close = [p for p in all_paths() if p.endswith("." + leaf)][:1]
    hint = f" (did you mean '{close[0]}'?)" if close else f" (sections: {', '.join(SCHEMA)})"
    return ConfigError(f"{source}: unknown key '{path}'{hint}.")


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)  # an int exactly (a seed's 2**63 - 1)


def _check(path: str, key: Key, value: Any, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {path} must be {expected}, got {shown_repr(value)}.")

    if value is None:
        if key.nullable:
            return None
        raise bad(f"a {key.kind} (it cannot be empty)")
    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad("a finite number")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise bad("a string")
    elif kind == "str|list[str]":
        if not (
            isinstance(value, str)
            or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))
        ):
            raise bad("a column name or a non-empty list of column names")
    elif kind == "list[float]|balanced":
        if value == "balanced":
            return value
        if not (
            isinstance(value, list)
            and value
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value)
        ):
            raise bad("a list of non-negative numbers (one per class) or 'balanced'")
        value = [float(v) for v in value]
    elif kind == "list[str]|heads":
        heads = value if isinstance(value, dict) else {"": value}
        if not heads or not all(
            isinstance(v, list) and all(isinstance(m, str) for m in v) for v in heads.values()
        ):
            raise bad("a list of metric names, or a mapping of heads to lists of names ({cls: [acc]})")
    elif kind.startswith("list["):
        inner = kind[5:-1]
        ok = {
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "str": lambda v: isinstance(v, str),
        }[inner]
        if not isinstance(value, list) or not all(ok(v) for v in value):
            raise bad(f"a list of {inner}s, like [1, 2]" if inner != "str" else "a list of strings")
        if inner == "float" and not all(math.isfinite(v) for v in value):
            raise bad("a list of finite numbers")
        if inner == "float":
            value = [float(v) for v in value]
    elif kind == "dict":
        if not isinstance(value, dict):
            raise bad("a mapping of names to values")
    if key.choices is not None and value not in key.choices:
        if not (key.open_choices and isinstance(value, str) and ":" in value):
            allowed = ", ".join(map(str, key.choices)) + (
                ", or a 'module:Class' import string" if key.open_choices else ""
            )
            raise bad(f"one of {allowed}")
    if key.minimum is not None and isinstance(value, (int, float)) and value < key.minimum:
        raise bad(f"at least {_bound(key.minimum)}")
    if key.maximum is not None and isinstance(value, (int, float)) and value > key.maximum:
        raise bad(f"at most {_bound(key.maximum)}")
    return value


def merge(cfg: dict, update: dict, source: str) -> dict:
    """``cfg`` updated with ``update`` (a nested mapping), every key and value validated."""
    if not isinstance(update, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections ({', '.join(SCHEMA)}).")
    for section, values in update.items():
        if section in ("versions", "resolved"):  # written into run folders; informational
            continue
        if section not in SCHEMA:
            first = next(iter(values), None) if isinstance(values, dict) else None
            raise _unknown(f"{section}.{first}" if first is not None else str(section), source)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"{source}: section '{shown(section)}' must be a mapping of keys to values, got {shown_repr(values)}."
            )
        for k, v in values.items():
            path = f"{section}.{k}"
            if k not in SCHEMA[section]:
                raise _unknown(path, source)
            cfg[section][k] = _check(path, SCHEMA[section][k], v, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must have the form section.key=value (e.g. train.epochs=5).")
    path, _, raw = text.partition("=")
    path = path.strip()
    if path.count(".") != 1:
        raise ConfigError(f"override '{text}': the key must be section.key (e.g. optim.lr=3e-4).")
    try:
        value = load_yaml(raw, f"override {shown(text, 120)}") if raw.strip() else None
    except ConfigError:  # not YAML (or a nesting or alias bomb): the text as written, checked as a string
        value = raw
    return path, value


def load(path: str | None, overrides: Sequence[str] = ()) -> dict:
    """Defaults, then the YAML file (if any), then ``section.key=value`` overrides; validated."""
    cfg = defaults()
    if path is not None:
        data = read_yaml(path)
        merge(cfg, data or {}, path)
    apply_overrides(cfg, overrides)
    return validate(cfg, path or "default config")


def apply_overrides(cfg: dict, overrides: Sequence[str] = ()) -> dict:
    """``cfg`` updated with ``section.key=value`` overrides, each value parsed as YAML and validated."""
    for text in overrides:
        key, value = parse_override(text)
        section, _, k = key.partition(".")
        merge(cfg, {section: {k: value}}, f"override {shown(text, 120)}")
    return cfg


def validate(cfg: dict, source: str) -> dict:
    """Checks that involve several keys."""
    check_run_name(cfg["run"]["name"], source)
    d = cfg["data"]
    for section, key in (("run", "out_dir"), ("data", "train"), ("data", "val"), ("data", "test")):
        if cfg[section][key]:  # '~/runs' means the home folder, never a folder named '~'
            cfg[section][key] = os.path.expanduser(cfg[section][key])
    if d["features"] is not None and not d["features"]:
        raise ConfigError(
            f"{source}: data.features is empty; list the feature columns, or leave it unset "
            "for all columns but the label."
        )
    if d["features"] is not None and d["label"] in d["features"]:
        raise ConfigError(
            f"{source}: data.features includes the label column {shown_repr(d['label'])}; remove it."
        )
    if d["features"] is not None and len(set(d["features"])) != len(d["features"]):
        seen: set = set()
        twice = None
        for c in d["features"]:  # the first column named a second time
            if c in seen:
                twice = c
                break
            seen.add(c)
        raise ConfigError(
            f"{source}: data.features names the column {shown_repr(twice)} more than once; list each "
            "column once."
        )
    decay = cfg["train"]["ema_decay"]
    if decay is not None and not 0.0 < decay < 1.0:
        raise ConfigError(
            f"{source}: train.ema_decay must be a number strictly between 0 and 1 (e.g. 0.999), got "
            f"{shown_repr(decay)}."
        )
    betas = cfg["optim"]["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(
            f"{source}: optim.betas must be two numbers in [0, 1), like [0.9, 0.999], got {betas}."
        )
    if d["source"] in ("npz", "csv", "images") and not d["train"]:
        raise ConfigError(
            f"{source}: data.source is {d['source']} but data.train (the training "
            f"{'folder of class subfolders' if d['source'] == 'images' else 'file'}) is not set."
        )
    if d["source"] == "factory" and not d["factory"]:
        raise ConfigError(
            f"{source}: data.source is factory but data.factory ('module:function') is not set."
        )
    if d["val_split"] + d["test_split"] >= 0.95:
        raise ConfigError(
            f"{source}: data.val_split + data.test_split must leave data to train on, "
            f"got {d['val_split']} + {d['test_split']}."
        )
    monitor = cfg["train"]["monitor"]
    if monitor is not None and not re.fullmatch(r"(train|val)_[A-Za-z0-9_]+", monitor):
        raise ConfigError(
            f"{source}: train.monitor must be val_<metric>, train_<metric>, val_loss or train_loss, "
            f"got {monitor!r}."
        )
    if (
        (monitor or "val_").startswith("val_")
        and not d["val"]
        and d["val_split"] == 0
        and d["source"] != "factory"
    ):
        raise ConfigError(
            f"{source}: train.monitor is {monitor or 'a val_ metric (the default)'} but there is no "
            "validation data (set data.val or data.val_split, or monitor a train_ metric such as train_loss)."
        )
    return cfg


def code_imports(cfg: dict) -> list[str]:
    """The 'module:name' strings of a config: each one imports (runs) Python code when used."""
    found = []
    if ":" in cfg["model"]["name"]:
        found.append(f"model.name={cfg['model']['name']}")
    if cfg["data"]["source"] == "factory" and cfg["data"]["factory"]:
        found.append(f"data.factory={cfg['data']['factory']}")
    if ":" in (cfg["task"]["loss"] or ""):
        found.append(f"task.loss={cfg['task']['loss']}")
    return found


def require_trusted_code(cfg: dict, trust_code: bool, command: str) -> None:
    """``test``/``predict`` import code named by a config only with an explicit opt-in.

    A run folder's config.yaml (downloaded, shared) is a file like any other: pointing ``test`` or
    ``predict`` at it must not import a module it names unless the user says they trust it. The
    opt-in is a command-line flag, never a config key, so that a config cannot grant it to itself.
    """
    imports = code_imports(cfg)
    if imports and not trust_code:
        raise ConfigError(
            f"{' and '.join(imports)} would import Python code; `trainval {command}` imports code "
            "only with --trust-code (Python API: trust_code=True). Add it if you trust that code."
        )


# What ``fit --resume`` may change relative to the config last.pt was trained with. A key not named
# here must not change (so every new key is safe until someone decides otherwise): a resumed run
# must continue exactly as the recorded config says, and config.yaml must never claim a value that
# was not used.
RESUME_MAY_CHANGE = {
    "run.out_dir": "the run folder's location",
    "run.name": "the run folder's location",
    "log.tensorboard": "logging only",
    "log.mlflow": "logging only",
    "log.mlflow_uri": "logging only",
    "log.mlflow_experiment": "logging only",
    "log.wandb": "logging only",
    "log.wandb_project": "logging only",
    "log.wandb_mode": "logging only",
    "log.artifacts": "logging only",
    **options.resume_may_change(),  # the Trainer's options say it where they are declared
}


def resume_changes(saved: dict, cfg: dict, resolved: dict, epochs_done: int, where: str) -> list[str]:
    """Notes on the allowed differences between ``cfg`` and the config ``saved`` in last.pt.

    Raises a :class:`ConfigError` naming every key that changed and cannot be honoured exactly.
    A key missing from ``saved`` (written by an older trainval) counts as its default.
    """
    refused, notes = [], []
    for section, keys in SCHEMA.items():
        old_section = found if isinstance(found := saved.get(section), dict) else {}
        for k, key in keys.items():
            path = f"{section}.{k}"
            old, new = old_section.get(k, key.default), cfg[section][k]
            if old == new:
                continue
            change = f"{path} {shown_repr(old)} -> {shown_repr(new)}"
            if path not in RESUME_MAY_CHANGE:
                refused.append(change)
            elif path == "train.epochs" and cfg["scheduler"]["name"] in ("cosine", "onecycle"):
                refused.append(
                    change + f" (the {cfg['scheduler']['name']} schedule was laid out for {old} epochs)"
                )
            elif path == "train.max_steps" and cfg["scheduler"]["name"] == "onecycle":
                refused.append(
                    change + f" (the onecycle schedule was laid out for max_steps {shown_repr(old)})"
                )
            elif path == "train.epochs" and new < epochs_done:
                refused.append(change + f" ({epochs_done} epochs are already done)")
            else:
                notes.append(change)
    old_resolved = found if isinstance(found := saved.get("resolved"), dict) else {}
    for k, new in resolved.items():
        if k in old_resolved and old_resolved[k] != new:
            refused.append(f"the data's {k} {shown_repr(old_resolved[k])} -> {shown_repr(new)}")
    if refused:
        raise ConfigError(
            f"cannot resume {where} with this config; it differs from the one the run was trained "
            f"with in: {'; '.join(refused)}. Resume with the recorded values (config.yaml in the "
            "run folder), or start a new run (another run.name)."
        )
    return [f"resuming with {', '.join(notes)}"] if notes else []


def dump(cfg: dict, extra: dict | None = None) -> str:
    out = copy.deepcopy(cfg)
    if extra:
        out.update(extra)
    return yaml.safe_dump(out, sort_keys=False)


def reference_table() -> str:
    """The README's config reference, generated from :data:`SCHEMA`."""
    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for section, keys in SCHEMA.items():
        for k, key in keys.items():
            default = (
                "—"
                if key.default is None
                else yaml.safe_dump(key.default, default_flow_style=True).strip().removesuffix("...").strip()
            )
            kind = key.kind.replace("|", " or ") + (" or null" if key.nullable else "")
            doc = key.doc
            if key.choices:
                doc += " (one of: " + ", ".join(f"`{c}`" for c in key.choices) + ")"
            lines.append(f"| `{section}.{k}` | {kind} | `{default}` | {doc} |")
    return "\n".join(lines)
