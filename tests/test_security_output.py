"""Issue 18, items 7 and 8 (and the other outputs): trainval writes only regular files, never hangs on one.

``predict --out``, ``runs --plot``, ``test``'s ``test.json``/``summary.json`` and every other file go through
``checkpoint.atomic_write``, which never replaces a symbolic link, a FIFO, a device, a socket or a folder; the
checks before it (``runfolder.check_output``, ``runs.plot_runs``) open nothing that is not a regular file, so
a FIFO (or a link to one, or to a pipe such as ``/proc/self/fd/1``) can never block them. ``--out -`` writes
the predictions CSV to standard output. The real ``/dev/stdout`` is never touched: a link to
``/proc/self/fd/1`` in ``tmp_path`` stands in for it (as root, the old code replaced such a link).
"""

from __future__ import annotations

import csv
import io
import os
import stat
import subprocess

import pytest
import torch
from conftest import run_cli
from test_security import csv_args, one_error_line

from trainval.checkpoint import atomic_write
from trainval.errors import CheckpointError, ConfigError

TIMEOUT = 90  # a hang is a failure (subprocess.TimeoutExpired), not a stuck test run


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One small trained run: (the folder the run's data and runs/ live in, the CLI arguments)."""
    root = tmp_path_factory.mktemp("fitted")
    args = csv_args(root)
    run_cli("fit", *args, cwd=str(root), check=True, timeout=300)
    return root, args


def _kind(path) -> str:
    mode = os.lstat(path).st_mode
    return "link" if stat.S_ISLNK(mode) else "fifo" if stat.S_ISFIFO(mode) else "file" if stat.S_ISREG(mode) else "other"


# ------------------------------------------------------------------------------------------------
# atomic_write: the one writer replaces only a regular file


def test_atomic_write_replaces_only_regular_files(tmp_path):
    regular = tmp_path / "regular.txt"
    regular.write_text("old")
    atomic_write(str(regular), lambda f: f.write(b"new"))  # the control: a regular file is replaced
    assert regular.read_text() == "new"
    atomic_write(str(tmp_path / "fresh.txt"), lambda f: f.write(b"made"))  # and a new one is made
    assert (tmp_path / "fresh.txt").read_text() == "made"

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    target = tmp_path / "target.txt"
    target.write_text("the user's")
    cases = {"fifo": "a FIFO", "folder": "a folder"}
    for name, link_to in {"to_file": target, "to_null": "/dev/null", "to_fifo": tmp_path / "fifo",
                          "dangling": tmp_path / "nowhere"}.items():
        os.symlink(link_to, tmp_path / name)
        cases[name] = "a symbolic link"
    for name, words in cases.items():
        before = _kind(tmp_path / name)
        with pytest.raises(CheckpointError, match=words) as caught:
            atomic_write(str(tmp_path / name), lambda f: f.write(b"x"), "summary")
        assert "\n" not in str(caught.value) and name in str(caught.value)
        assert _kind(tmp_path / name) == before, name
    assert target.read_text() == "the user's" and not os.path.exists(tmp_path / "nowhere")
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temp file left behind


# ------------------------------------------------------------------------------------------------
# predict --out: a FIFO, a link (to /dev/null, a FIFO, a pipe, a file) is refused in one line, at once


def test_predict_out_onto_a_fifo_or_a_link_is_refused_in_one_line_without_hanging(fitted, tmp_path):
    root, args = fitted
    os.mkfifo(tmp_path / "fifo")
    own = tmp_path / "own.csv"
    run_cli("predict", *args, "--out", str(own), cwd=str(root), check=True, timeout=TIMEOUT)
    before = own.read_text()
    assert before.startswith("Id,Class\n")
    links = {"to_null": "/dev/null", "to_fifo": tmp_path / "fifo",
             "to_stdout": "/proc/self/fd/1",  # what /dev/stdout is: here, the pipe run_cli reads
             "to_predictions": own}  # a predictions file trainval wrote: the link is the user's all the same
    for name, target in links.items():
        os.symlink(target, tmp_path / name)
    for name, words in {"fifo": "is a FIFO", **{n: "is a symbolic link" for n in links}}.items():
        path = tmp_path / name
        kind = _kind(path)
        proc = run_cli("predict", *args, "--out", str(path), "--force", cwd=str(root), timeout=TIMEOUT)
        err = one_error_line(proc, 2)
        assert f"--out {path} {words}" in err and "--out -" in err, err
        assert _kind(path) == kind, name
        assert proc.stdout == "", name
    assert own.read_text() == before


def test_predict_out_dash_writes_the_csv_to_stdout_and_the_rest_to_stderr(fitted):
    root, args = fitted
    proc = run_cli("predict", *args, "--out", "-", cwd=str(root), check=True, timeout=TIMEOUT)
    rows = list(csv.reader(io.StringIO(proc.stdout)))
    assert rows[0] == ["Id", "Class"] and len(rows) > 1, proc.stdout
    assert [int(r[0]) for r in rows[1:]] == list(range(len(rows) - 1))
    assert all(r[1] in ("0", "1") for r in rows[1:])
    assert f"wrote {len(rows) - 1} predictions" in proc.stderr and "standard output" in proc.stderr, proc.stderr
    assert not os.path.exists(root / "-")


def test_dense_predictions_never_go_to_a_stream_or_onto_a_fifo(tmp_path):
    from trainval.app.workflow import write_predictions

    stream = io.StringIO()
    write_predictions(stream, "binary", torch.tensor([1, 0]), torch.tensor([0.8, 0.1]))
    assert stream.getvalue() == "Id,Class,prob_1\n0,1,0.8\n1,0,0.1\n"
    with pytest.raises(ConfigError, match=r"\.npy file .*`--out -`") as caught:
        write_predictions(io.StringIO(), "multiclass", torch.zeros(2, 4, 4, dtype=torch.long))
    assert "\n" not in str(caught.value)
    os.mkfifo(tmp_path / "dense.npy")  # the array beside --out dense.csv: never replaced, never opened
    for force in (False, True):
        with pytest.raises((ConfigError, CheckpointError), match="dense.npy"):
            write_predictions(str(tmp_path / "dense.csv"), "multiclass", torch.zeros(2, 4, 4, dtype=torch.long),
                              force=force)
        assert _kind(tmp_path / "dense.npy") == "fifo" and not os.path.exists(tmp_path / "dense.csv")


# ------------------------------------------------------------------------------------------------
# test's test.json / summary.json and runs --plot


def test_test_does_not_replace_or_hang_on_a_fifo_in_the_run_folder(fitted, tmp_path):
    root, args = fitted
    run = root / "runs" / "r"
    for name in ("test.json", "summary.json"):
        path = run / name
        saved = path.read_bytes() if path.exists() else None
        if saved is not None:
            path.unlink()
        os.mkfifo(path)
        try:
            proc = run_cli("test", *args, f"data.test={root / 'data.csv'}", cwd=str(root), timeout=TIMEOUT)
            assert proc.returncode != 0, proc.stdout + proc.stderr
            err = one_error_line(proc, proc.returncode)
            assert f"{path} is a FIFO" in err, err
            assert _kind(path) == "fifo"
        finally:
            path.unlink()
            if saved is not None:
                path.write_bytes(saved)


def test_runs_plot_onto_a_fifo_or_a_link_is_refused_in_one_line(fitted, tmp_path):
    root, _ = fitted
    own = tmp_path / "own.png"
    run_cli("runs", str(root / "runs"), "--plot", str(own), check=True, timeout=TIMEOUT)  # the control
    os.mkfifo(tmp_path / "fifo")
    os.symlink(own, tmp_path / "link")  # a link to a plot `runs --plot` wrote
    for name, words in {"fifo": "is a FIFO", "link": "is a symbolic link"}.items():
        path = tmp_path / name
        try:
            proc = run_cli("runs", str(root / "runs"), "--plot", str(path), timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"runs --plot onto {name} hangs")
        assert f"--plot {path} {words}" in one_error_line(proc, 2)
        assert _kind(path) == name
