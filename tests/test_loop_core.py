"""The loop core's structure: options declared once, layers without import cycles, a light CLI start.

These guard the redesign of issue 19: each can fail (a second declaration of an option that drifts, an
import that closes a cycle, a torch import on the CLI's error path).
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import subprocess
import sys

import pytest
import torch

import trainval
from trainval import options
from trainval.app import config
from trainval.errors import ConfigError

SRC = pathlib.Path(trainval.__file__).parent


def test_every_option_is_a_keyword_of_trainer_with_its_default():
    params = inspect.signature(trainval.Trainer).parameters
    for f in options.fields():
        assert f.name in params, f.name
        assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert f"{f.name}:" in trainval.Trainer.__doc__  # its meaning in help(Trainer)


def test_the_typed_keyword_arguments_are_the_options():
    """``Trainer(**options: Unpack[TrainerOptionsArgs])``: the TypedDict that type checkers read names each option
    with the type TrainerOptions declares (out_dir also takes a path object, which the options make a str)."""
    declared = {f.name: f.type for f in options.fields()}
    typed = {k: getattr(v, "__forward_arg__", v) for k, v in options.TrainerOptionsArgs.__annotations__.items()}
    assert list(typed) == list(declared)
    assert typed.pop("out_dir") == "str | os.PathLike[str]"
    assert all(typed[k] == declared[k] for k in typed), {k: (typed[k], declared[k]) for k in typed if typed[k] != declared[k]}
    assert trainval.Trainer.__init__.__annotations__["options"] == "Unpack[TrainerOptionsArgs]"


def test_an_unknown_option_is_one_clear_error_with_the_closest_name():
    with pytest.raises(ConfigError, match=r"unknown option 'accumulate_step' \(did you mean 'accumulate_steps'\?\)"):
        trainval.Trainer(torch.nn.Linear(2, 2), accumulate_step=2)


@pytest.mark.parametrize("name,value,words", [
    ("max_epochs", 0, "max_epochs must be a positive integer, got 0"),
    ("grad_clip", float("nan"), "grad_clip must be a positive number or None, got nan"),
    ("precision", "fp8", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ("progress", "yes", "progress must be True or False, got 'yes'"),
])
def test_an_option_is_checked_where_it_is_declared(name, value, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        trainval.Trainer(torch.nn.Linear(2, 2), **{name: value})


def test_the_config_schema_and_the_resume_rules_derive_from_the_options():
    for f in options.fields():
        path = f.metadata["cli"]
        if path is None:
            continue
        section, _, key = path.partition(".")
        declared = config.SCHEMA[section][key]
        assert (declared.kind, declared.choices, declared.doc) == (f.metadata["kind"], f.metadata["choices"],
                                                                   f.metadata["cli_doc"])
        assert (path in config.RESUME_MAY_CHANGE) == (f.metadata["resume"] is not None)
    # the default config gives the Trainer options it accepts
    made = options.make_options(options.from_config(config.defaults()))
    assert made.max_epochs == config.SCHEMA["train"]["epochs"].default


def _imports(path: pathlib.Path, package: str) -> set[str]:
    """Every module ``path`` imports when run, inside functions too (``if TYPE_CHECKING:`` blocks are not run)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found |= {f"{base}.{a.name}" for a in node.names} | {base}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_core_has_no_import_cycle_even_through_imports_inside_functions():
    modules = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if "lint" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for target in _imports(path, package):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, "trainval"):
                targets.add(target)
        edges[name] = targets
    state: dict[str, int] = {}

    def visit(v: str, trail: list[str]) -> None:
        state[v] = 1
        for w in edges[v]:
            if state.get(w) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(w):] + [v, w]) if w in trail
                            else f"import cycle through {v} -> {w}")
            if w not in state:
                visit(w, trail + [v])
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v, [])


def test_config_errors_answer_without_importing_torch():
    code = ("import sys, trainval.app.config as c, trainval.options; c.load(None, ['train.epochs=2']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# The folders' order: each imports only from the folders below it (and the base modules at the top).
FOLDER_RANK = {"distributed": 1, "data": 2, "run": 2, "checkpoint": 3, "loop": 4, "app": 5}


def _rank(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in FOLDER_RANK):
        return FOLDER_RANK.get(parts[1], 0)
    if module == "trainval.__main__":
        return FOLDER_RANK["app"]  # `python -m trainval` runs the command line
    return 0  # the package root and the base modules (errors, untrusted, fsio, options, launch, state, ...)


def test_each_folder_imports_only_from_the_folders_below_it():
    wrong = []
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if "lint" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in _imports(path, package):
            if not target.startswith("trainval.") or target.startswith("trainval.lint"):
                continue
            mine, theirs = _rank(name), _rank(target)
            base_to_distributed = mine == 0 and name == "trainval.metrics" and theirs == 1  # gathers over ranks
            if theirs > mine and not base_to_distributed:
                wrong.append(f"{name} -> {target}")
    assert not wrong, "imports that point up a layer: " + ", ".join(sorted(wrong))


def test_a_signal_at_an_epochs_last_step_saves_that_epoch_before_stopping(tmp_path):
    """SIGINT during the last optimizer step of an epoch: the epoch's row and last.pt are written before the
    stop (it used to stop first, claiming a last.pt that did not exist), and the resumed run ends bitwise equal
    to an uninterrupted one."""
    import os
    import signal

    from trainval import Callback, Trainer
    from trainval.errors import Interrupted

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 5, generator=g), torch.arange(40) % 3

    class SigintAt(Callback):
        def __init__(self, step):
            self.step = step

        def on_train_batch_end(self, trainer, batch_index):
            if trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGINT)

    def trainer(folder, callbacks=()):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_epochs=3, batch_size=10,
                       out_dir=str(folder), progress=False, plot=False, callbacks=list(callbacks))

    whole = trainer(tmp_path / "whole")
    whole.fit((X, y), (X, y))
    for stop_at in (4, 8):  # the last step of epoch 1, of epoch 2 (4 steps per epoch)
        cut = trainer(tmp_path / f"cut{stop_at}", [SigintAt(stop_at)])
        with pytest.raises(Interrupted, match=f"at the end of epoch {stop_at // 4}"):
            cut.fit((X, y), (X, y))
        saved = torch.load(tmp_path / f"cut{stop_at}" / "last.pt", weights_only=True)
        assert saved["epoch"] == stop_at // 4 and len(saved["loop"]["history"]) == stop_at // 4
        resumed = trainer(tmp_path / f"cut{stop_at}")
        resumed.fit((X, y), (X, y), resume=True)
        assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(),
                                                     resumed.model.state_dict().values()))
        assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in whole.history]


def test_a_run_that_max_epochs_ends_before_max_steps_says_so_and_the_summary_counts_epochs(tmp_path, capsys):
    import json

    from trainval import Trainer

    X, y = torch.randn(100, 4), torch.arange(100) % 2
    model = torch.nn.Linear(4, 2)
    trainer = Trainer(model, max_epochs=2, max_steps=50, val_every_steps=3, batch_size=10, out_dir=str(tmp_path),
                      progress=False, plot=False)
    trainer.fit((X, y), (X, y))
    assert "max_epochs=2 ended the run at step 20, before max_steps=50" in capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(trainer.history) == 7 and summary["epochs"] == 2 and summary["steps"] == 20  # rows are not epochs
