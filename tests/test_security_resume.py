"""Issue 18 (last point): what a crafted last.pt says about the loop is checked before a resume trusts it,
and the run folder's ``tb`` folder is its own (no link out of the run folder, no file in its place)."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch
from conftest import make_blobs, run_cli, tiny_mlp
from test_security import csv_args, one_error_line

from trainval import Trainer
from trainval.errors import CheckpointError, RunFolderError
from trainval.loop.callbacks import TensorBoardLogger


def _fit(folder, epochs: int = 2, resume: bool = False, **kwargs) -> Trainer:
    X, y = make_blobs(n=40)
    trainer = Trainer(tiny_mlp(), max_epochs=epochs, out_dir=str(folder), batch_size=16, progress=False,
                      plot=False, **kwargs)
    trainer.fit((X[:30], y[:30]), (X[30:], y[30:]), resume=resume)
    return trainer


def _edit_last(folder, edit) -> None:
    """What an attacker does: load last.pt as plain data, change it, save it back."""
    path = os.path.join(folder, "last.pt")
    state = torch.load(path, weights_only=True, map_location="cpu")
    edit(state)
    torch.save(state, path)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(state):
        target = state
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _both_epochs(value):
    def edit(state):
        state["epoch"] = value
        state["loop"]["epoch"] = value

    return edit


# --------------------------------------------------------------------------------------------------
# R1-R4 and the other loop fields, through the Python API (Trainer._agree_on_last, LoopState.load_state_dict)

CRAFTED = {
    "R1 epoch a string": (_set("epoch", "abc"), "its epoch is 'abc'"),
    "R2 loop a list": (_set("loop", [1, 2]), "its loop is [1, 2]"),
    "R3 negative epoch": (_both_epochs(-5), "its epoch is -5"),
    "R3 negative loop.epoch": (_set("loop", "epoch", -5), "its loop.epoch is -5"),
    "R4 NaN best_value": (_set("loop", "best_value", float("nan")), "its loop.best_value is nan"),
    "infinite best_value": (_set("loop", "best_value", float("inf")), "its loop.best_value is inf"),
    "string best_value": (_set("loop", "best_value", "0.9"), "its loop.best_value is '0.9'"),
    "bool epoch": (_both_epochs(True), "its epoch is True"),
    "float global_step": (_set("loop", "global_step", 1.5), "its loop.global_step is 1.5"),
    "negative batch_in_epoch": (_set("loop", "batch_in_epoch", -1), "its loop.batch_in_epoch is -1"),
    "best_epoch beyond epoch": (_set("loop", "best_epoch", 99), "its loop.best_epoch is 99"),
    "mode": (_set("loop", "mode", "sideways"), "its loop.mode is 'sideways'"),
    "monitor": (_set("loop", "monitor", 3), "its loop.monitor is 3"),
    "missing monitor": (lambda s: s["loop"].pop("monitor"), "it lacks loop.monitor"),
    "history a string": (_set("loop", "history", "rows"), "its loop.history is 'rows'"),
    "history rows not dicts": (_set("loop", "history", [1, 2]), "its loop.history[0] is 1"),
    "history row without epoch": (_set("loop", "history", [{"train_loss": 0.5}]), "its loop.history[0] is"),
    "should_stop": (_set("loop", "should_stop", "no"), "its loop.should_stop is 'no'"),
    "epoch_start": (_set("loop", "epoch_start", [1]), "its loop.epoch_start is [1]"),
    "epochs disagree": (_set("epoch", 1), "its epoch (1) and loop.epoch (2) differ"),
    "task": (_set("task", ["multiclass"]), "its task is ['multiclass']"),
    "ranks": (_set("ranks", 3), "its ranks is 3"),
    "callbacks": (_set("callbacks", {"a": 1}), "its callbacks is {'a': 1}"),
    "optimizer a string": (_set("optimizer", "abc"), "its optimizer is 'abc'"),
    "scheduler a list": (_set("scheduler", [1]), "its scheduler is [1]"),
    "rng a string": (_set("rng", "abc"), "its rng is 'abc'"),
    "generator of floats": (_set("generator", torch.zeros(3)), "its generator is tensor"),
    "train_metrics a number": (_set("train_metrics", 3), "its train_metrics is 3"),
}


def test_random_generator_states_of_the_right_type_but_not_trainvals_are_one_checkpoint_error(tmp_path):
    """check_last checks the types; a uint8 tensor that is no generator state, or an rng dict without its
    streams, fails where it is set: one CheckpointError there too (was torch's TypeError/RuntimeError)."""
    for edit in (_set("generator", torch.zeros(3, dtype=torch.uint8)),
                 lambda state: state["ranks"][0].__setitem__("rng", {"python": 1})):
        folder = tmp_path / str(len(os.listdir(tmp_path)))
        _fit(folder, epochs=2)
        _edit_last(folder, edit)
        with pytest.raises(CheckpointError, match="its random generators' states are not ones trainval saved"):
            _fit(folder, epochs=4, resume=True)


@pytest.mark.parametrize("name", list(CRAFTED))
def test_a_crafted_loop_field_in_last_pt_is_one_checkpoint_error(tmp_path, name):
    edit, expected = CRAFTED[name]
    _fit(tmp_path, epochs=2)
    _edit_last(tmp_path, edit)
    last = os.path.join(tmp_path, "last.pt")
    with pytest.raises(CheckpointError) as info:
        _fit(tmp_path, epochs=4, resume=True)
    message = str(info.value)
    assert message.startswith(f"{last} is not a checkpoint trainval wrote"), message
    assert expected in message, message
    assert "start a new run, or resume from a last.pt that trainval wrote" in message


def test_an_unedited_last_pt_resumes(tmp_path):
    """The control: the same round trip without an edit resumes and trains on."""
    _fit(tmp_path, epochs=2)
    _edit_last(tmp_path, lambda state: None)
    trainer = _fit(tmp_path, epochs=3, resume=True)
    assert trainer.epoch == 3 and [row["epoch"] for row in trainer.history] == [1, 2, 3]


def test_a_finite_best_value_from_last_pt_is_still_compared(tmp_path):
    """R4's control: a best value that no later epoch beats keeps best.pt where it was; a NaN one is refused."""
    _fit(tmp_path, epochs=2)
    _edit_last(tmp_path, _set("loop", "best_value", 1.0))  # val_acc: nothing beats 1.0
    _edit_last(tmp_path, _set("loop", "best_epoch", 2))
    trainer = _fit(tmp_path, epochs=3, resume=True)
    assert trainer.best_value == 1.0 and trainer.best_epoch == 2


# --------------------------------------------------------------------------------------------------
# The CLI: one line, no traceback (workflow._resume_changes reads last.pt first)


CLI_CASES = [
    (_set("epoch", "abc"), "its epoch is 'abc'"),                           # R1: was a ValueError traceback
    (_set("loop", [1, 2]), "its loop is [1, 2]"),                           # R2: an AttributeError traceback
    (_both_epochs(-5), "its epoch is -5"),                                  # R3: trained epochs [-04/004]...
    (_set("loop", "best_value", float("nan")), "its loop.best_value is nan"),  # R4: best.pt silently stuck
]


def test_the_cli_refuses_a_crafted_last_pt_in_one_line(tmp_path):
    run_cli("fit", *csv_args(tmp_path), "train.epochs=2", cwd=str(tmp_path), check=True)
    folder = tmp_path / "runs" / "r"
    written = (folder / "last.pt").read_bytes()
    before = os.path.getmtime(folder / "best.pt")
    for edit, expected in CLI_CASES:  # R1-R4, each on the run's own last.pt
        (folder / "last.pt").write_bytes(written)
        _edit_last(folder, edit)
        proc = run_cli("fit", *csv_args(tmp_path), "train.epochs=4", "--resume", cwd=str(tmp_path))
        err = one_error_line(proc, 1)
        assert f"{folder / 'last.pt'} is not a checkpoint trainval wrote: {expected}" in err, err
        assert "start a new run" in err
        assert "Epoch" not in proc.stdout and os.path.getmtime(folder / "best.pt") == before  # nothing trained


def test_loop_state_refuses_a_nan_best_value_where_it_is_loaded():
    """The one place: LoopState.load_state_dict checks what it restores (an API user's own call too)."""
    from trainval.state import LoopState

    good = LoopState(epoch=2, best_value=0.5, best_epoch=1, monitor="val_acc").state_dict()
    state = LoopState()
    state.load_state_dict(good, "x.pt")
    assert state.best_value == 0.5 and state.epoch == 2
    with pytest.raises(CheckpointError, match=r"x\.pt is not a checkpoint trainval wrote: its loop\.best_value is nan"):
        LoopState().load_state_dict({**good, "best_value": math.nan}, "x.pt")


# --------------------------------------------------------------------------------------------------
# T5/T6: the run folder's tb folder


def _events(folder) -> list[str]:
    return glob.glob(os.path.join(folder, "**", "events.out.tfevents.*"), recursive=True)


def test_tb_linked_out_of_the_run_folder_is_refused(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _fit(run, epochs=1)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, run / "tb")
    with pytest.raises(RunFolderError, match=r"cannot log to TensorBoard: .*tb is a symbolic link; trainval writes "
                                             r"TensorBoard's event files only in the run folder's own tb folder"):
        _fit(run, epochs=2, resume=True, callbacks=[TensorBoardLogger()])
    assert os.listdir(elsewhere) == []  # nothing written through the link


@pytest.mark.parametrize("kind", ["file", "dangling link"])
def test_tb_that_is_not_a_folder_is_refused(tmp_path, kind):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _fit(run, epochs=1)
    if kind == "file":
        (run / "tb").write_text("mine\n")
        match = r"tb is not a folder; trainval writes TensorBoard's event files only in the run folder's own tb folder"
    else:
        os.symlink(tmp_path / "missing", run / "tb")
        match = r"tb is a symbolic link"
    with pytest.raises(RunFolderError, match=match):
        _fit(run, epochs=2, resume=True, callbacks=[TensorBoardLogger()])
    assert not os.path.exists(tmp_path / "missing")
    if kind == "file":
        assert (run / "tb").read_text() == "mine\n"


def test_tb_is_made_in_the_run_folder(tmp_path):
    """The control: without anything in the way, the run folder's own tb folder gets the event files."""
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _fit(run, epochs=1, callbacks=[TensorBoardLogger()])
    assert os.path.isdir(run / "tb") and not os.path.islink(run / "tb") and _events(run / "tb")


def test_the_cli_refuses_a_linked_tb_in_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    run_cli("fit", *csv_args(tmp_path), cwd=str(tmp_path), check=True)
    folder = tmp_path / "runs" / "r"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, folder / "tb")
    proc = run_cli("fit", *csv_args(tmp_path), "train.epochs=2", "--resume", "log.tensorboard=true", cwd=str(tmp_path))
    err = one_error_line(proc, 2)
    assert f"{folder / 'tb'} is a symbolic link" in err and "move the folder there" in err, err
    assert os.listdir(elsewhere) == []


def test_a_file_named_last_shards_is_refused_where_shards_are_written(tmp_path):
    """The same check for last.shards (sharded.py): a file in its place is one clear error, not DCP's."""
    from trainval.checkpoint import sharded

    (tmp_path / "last.shards").write_text("mine\n")
    with pytest.raises(CheckpointError, match=r"cannot be written: .*last\.shards is not a folder"):
        sharded.write({"model": tiny_mlp().state_dict()}, {"epoch": 2}, str(tmp_path))
    assert (tmp_path / "last.shards").read_text() == "mine\n"
