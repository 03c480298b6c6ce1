"""Issue 18, `trainval runs` on run folders someone else made: no terminal escapes (item 9), no hang on a
FIFO (item 11), and one bad run folder shown as unreadable while the rest are listed (the unclear cases).

Run folders are built by hand (the marker ``.trainval-run`` plus a crafted summary.json / metrics.csv);
tests/test_runs.py covers folders a real fit wrote.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import run_cli

from trainval.app import runs
from trainval.app.cli import build_parser, parse_arguments
from trainval.errors import TrainvalError
from trainval.untrusted import shown_line

MARKER = ".trainval-run"
FIFO = object()  # a file spec: make a named pipe there
TIMEOUT = 60  # a hang fails the test instead of blocking the run
CONTROL = ("\x1b", "\x07", "\r", "\x9b")

GOOD = {
    "made_by": "trainval", "status": "finished", "started": "2024-05-01T10:00:00+00:00",
    "updated": "2024-05-01T10:00:09+00:00", "epochs": 2, "max_epochs": 2, "monitor": "val_acc", "mode": "max",
    "best_epoch": 2, "best_value": 0.9, "train_samples": 60, "val_samples": 30, "seconds": 0.5, "wall_seconds": 3.25,
    "final": {"epoch": 2, "train_loss": 0.3, "lr": 0.1, "val_loss": 0.35, "val_acc": 0.9, "seconds": 0.25},
    "test": {"test_loss": 0.4, "test_acc": 0.875},
}


def list_runs(root, *args: str, in_subprocess: bool = False):
    """``trainval runs ROOT ARGS``: in a subprocess (with a timeout, so that a hang fails the test) where a
    FIFO lies below ``root``; else in this process, as the CLI does it (``runs.report``'s text; fast)."""
    if in_subprocess:
        return run_cli("runs", str(root), *args, timeout=TIMEOUT)
    a = parse_arguments(build_parser(), ["runs", str(root), *args])
    try:
        out = runs.report(a.folder, sort=a.sort, reverse=a.reverse, fmt=a.format, plot=a.plot)
    except TrainvalError as e:
        return subprocess.CompletedProcess(["runs"], e.exit_code, "", f"trainval: error: {shown_line(str(e))}\n")
    return subprocess.CompletedProcess(["runs"], 0, out + "\n", "")


def make_run(folder, files: dict) -> str:
    """A run folder: the marker (empty, as `touch` adopts one) unless ``files`` gives one, then each file:
    bytes, text, a dict (as JSON) or FIFO."""
    os.makedirs(folder)
    files = {MARKER: b"", **files}
    for name, content in files.items():
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if content is FIFO:
            os.mkfifo(path)
        else:
            data = json.dumps(content) if isinstance(content, dict) else content
            with open(path, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
    return str(folder)


def summary_with(**fields) -> dict:
    return {**GOOD, **fields}


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The table's rows by run name (the first cell), each as its cells."""
    lines = stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "status", "epochs", "monitor"], stdout
    return {line.split()[0]: line.split() for line in lines[1:] if line.strip()}


def assert_terminal_safe(text: str) -> None:
    for ch in CONTROL:
        assert ch not in text, (ch, text[:2000])


# --------------------------------------------------------------------------------------------------
# Item 9: nothing from a folder name or a summary reaches the terminal raw

ESCAPES = "\x1b[2J\x1b[31m\x1b]0;owned\x07\r\x9b"


@pytest.mark.parametrize("where", ["folder name", "monitor", "test metric name", "test metric value"])
def test_runs_table_escapes_folder_names_and_summary_fields(tmp_path, where):
    root = tmp_path / "runs"
    make_run(root / "good", {"summary.json": GOOD})
    name, summary = "crafted", dict(GOOD)
    if where == "folder name":
        name = "crafted" + ESCAPES
    elif where == "monitor":
        summary["monitor"] = "val" + ESCAPES
    elif where == "test metric name":
        summary["test"] = {"test_acc" + ESCAPES: 0.5}
    else:
        summary["test"] = {"test_note": "x" + ESCAPES}
    make_run(root / name, {"summary.json": summary})
    proc = list_runs(root)
    assert proc.returncode == 0, proc.stderr
    assert_terminal_safe(proc.stdout)
    rows = table_rows(proc.stdout)
    assert rows["good"][1] == "finished"
    crafted = next(cells for first, cells in rows.items() if first.startswith("crafted"))
    assert crafted[1] == "finished" and "\\x1b" in proc.stdout  # shown, escaped
    if where == "monitor":
        assert crafted[3].startswith("val\\x1b[2J")

    as_json = list_runs(root, "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    assert_terminal_safe(as_json.stdout)  # json.dumps (ensure_ascii) writes every control character as \u....
    records = {r["name"]: r for r in json.loads(as_json.stdout)}
    assert records[name]["status"] == "finished"
    if where == "monitor":
        assert records[name]["monitor"] == "val" + ESCAPES  # the value itself, losslessly, in JSON


def test_runs_table_cells_are_bounded(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "long", {"summary.json": summary_with(monitor="m" * 100_000,
                                                            test={f"test_m{i}": 0.5 for i in range(5000)})})
    proc = list_runs(root)
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) < 2000 and "more characters" in proc.stdout


def test_sort_on_a_missing_column_names_a_bounded_list(tmp_path):
    """The error lists the runs' columns (names from summary.json: escaped, and not 5000 of them)."""
    root = tmp_path / "runs"
    make_run(root / "wide", {"summary.json": summary_with(final={f"col{i}" + ESCAPES: 1.0 for i in range(5000)})})
    proc = list_runs(root, "--sort", "nonsense")
    assert proc.returncode == 2 and proc.stderr.startswith("trainval: error: --sort nonsense")
    assert_terminal_safe(proc.stderr)
    assert len(proc.stderr) < 3000 and "more" in proc.stderr


# --------------------------------------------------------------------------------------------------
# Item 11 and the unclear cases: one bad run folder is listed as unreadable, the others as usual

DEEP = '{"final": ' + "[" * 100_000 + "]" * 100_000 + "}"
HUGE = json.dumps(summary_with(started="x" * (8 * 2**20)))
BAD_RUNS = {
    # item 11: a FIFO where a file is read
    "summary.json is a FIFO": ({"summary.json": FIFO}, []),
    "metrics.csv is a FIFO": ({"metrics.csv": FIFO}, []),
    "the marker is a FIFO": ({MARKER: FIFO, "summary.json": GOOD}, []),
    "summary.json is a folder": ({"summary.json/x": b""}, []),
    # a field of the wrong type, or a value no summary holds
    "test is a list": ({"summary.json": summary_with(test=[1, 2])}, []),
    "seconds is text": ({"summary.json": summary_with(seconds="abc", wall_seconds="abc")}, []),
    "seconds is 1e400": ({"summary.json": json.dumps(GOOD).replace('"wall_seconds": 3.25', '"wall_seconds": 1e400')}, []),
    "best_value is text, --sort best": ({"summary.json": summary_with(best_value="0.9")}, ["--sort", "best"]),
    "best_value is NaN": ({"summary.json": json.dumps(GOOD).replace('"best_value": 0.9', '"best_value": NaN')},
                          ["--sort", "best"]),
    "final is text, --sort val_acc": ({"summary.json": summary_with(final="x")}, ["--sort", "val_acc"]),
    "epochs is an object, --sort epochs": ({"summary.json": summary_with(epochs={"n": 2})}, ["--sort", "epochs"]),
    "max_epochs is a list": ({"summary.json": summary_with(max_epochs=[2])}, []),
    "monitor is a number": ({"summary.json": summary_with(monitor=5)}, []),
    "mode is an object": ({"summary.json": summary_with(mode={})}, ["--sort", "best"]),
    "summary is a list": ({"summary.json": "[1, 2]"}, []),
    "summary nested 100k deep": ({"summary.json": DEEP}, []),
    "summary is not JSON": ({"summary.json": "{not json"}, []),
    "summary is not UTF-8": ({"summary.json": b'{"monitor": "\xff"}'}, []),
    "summary is 8 MiB": ({"summary.json": HUGE}, []),
    # no summary.json (an older run folder): what metrics.csv tells
    "metrics.csv not UTF-8": ({"metrics.csv": b"epoch,val_acc\n1,0.5\n2,\xff\xfe\n"}, []),
    "metrics.csv cell over the csv field limit": ({"metrics.csv": "epoch,val_acc\n1," + "9" * 200_000 + "\n"}, []),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_one_bad_run_folder_is_listed_as_unreadable_and_the_rest_as_usual(tmp_path, case):
    files, args = BAD_RUNS[case]
    root = tmp_path / "runs"
    make_run(root / "a-good", {"summary.json": GOOD})
    make_run(root / "bad", files)
    make_run(root / "z-good", {"summary.json": summary_with(best_value=0.95, final={**GOOD["final"], "val_acc": 0.95})})
    proc = list_runs(root, *args, in_subprocess=any(content is FIFO for content in files.values()))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-3000:]
    assert_terminal_safe(proc.stdout)
    rows = table_rows(proc.stdout)
    assert rows["a-good"][1] == rows["z-good"][1] == "finished" and rows["bad"][1] == "unreadable", proc.stdout
    if args:  # sorted: the unreadable run last
        assert proc.stdout.splitlines()[3].startswith("bad "), proc.stdout
    assert any(line.startswith("bad: unreadable: ") for line in proc.stdout.splitlines()), proc.stdout


def test_json_output_gives_each_unreadable_run_a_problem(tmp_path):
    root = tmp_path / "runs"
    make_run(root / "good", {"summary.json": GOOD})
    for i, (files, _) in enumerate(BAD_RUNS.values()):
        make_run(root / f"bad{i:02d}{ESCAPES}", files)
    proc = run_cli("runs", str(root), "--format", "json", "--sort", "best", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_terminal_safe(proc.stdout)
    records = json.loads(proc.stdout)
    assert records[0]["name"] == "good" and records[0]["status"] == "finished" and "problem" not in records[0]
    assert len(records) == 1 + len(BAD_RUNS)
    for record in records[1:]:
        assert record["status"] == "unreadable" and record["name"].endswith(ESCAPES), record
        assert isinstance(record["problem"], str) and 0 < len(record["problem"]) < 1000, record
    problems = [r["problem"] for r in records[1:]]
    assert sum("FIFO" in p for p in problems) == 3 and any('"test"' in p for p in problems), problems


@pytest.mark.parametrize("marker", ['{"pid": 1e400}', '{"pid": 100000000000000000000000000000}', '{"pid": -1}',
                                    '{"pid": true}', '{"pid": "12"}', "[" * 100_000, b"\xff\xfe"])
def test_a_marker_with_a_wrong_pid_is_no_holder(tmp_path, marker):
    """The marker records the writer lock's holder; a pid trainval never wrote means no holder (never
    a signal to process group -1, never a traceback)."""
    root = tmp_path / "runs"
    make_run(root / "r", {MARKER: marker, "summary.json": summary_with(status="running")})  # probed: not finished
    proc = list_runs(root)
    assert proc.returncode == 0 and table_rows(proc.stdout)["r"][1] == "interrupted", proc.stderr[-3000:]


def test_sort_on_a_column_of_numbers_and_text_puts_numbers_first(tmp_path):
    root = tmp_path / "runs"
    for name, value in (("a", 0.5), ("b", "n/a"), ("c", None), ("d", 0.7), ("e", True)):
        make_run(root / name, {"summary.json": summary_with(final={**GOOD["final"], "val_acc": value})})
    make_run(root / "f", {"summary.json": summary_with(final={**GOOD["final"], "val_acc": [1]})})
    proc = list_runs(root, "--sort", "val_acc", "--format", "json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    order = [r["name"] for r in json.loads(proc.stdout)]
    assert order[:3] == ["a", "d", "b"] and set(order[3:]) == {"c", "e", "f"}, order  # numbers, text, none


def test_a_folder_tree_a_thousand_deep_is_no_traceback(tmp_path):
    """os.walk recurses (Python < 3.12): the listing stops descending at MAX_RUN_DEPTH."""
    root = tmp_path / "runs"
    make_run(root / "good", {"summary.json": GOOD})
    make_run(root / "x" / "y" / "trials" / "0000", {"summary.json": GOOD})  # a tuning trial, 4 deep
    fd = os.open(root, os.O_RDONLY)
    try:
        for _ in range(1100):
            os.mkdir("a", dir_fd=fd)
            fd, parent = os.open("a", os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
        os.close(os.open(MARKER, os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    try:
        proc = list_runs(root)
    finally:  # pytest's own clean-up of tmp_path recurses too
        while os.path.isdir(root / "a" / "a"):  # one level less each time, by short paths
            os.rename(root / "a" / "a", root / "b")
            os.rmdir(root / "a")
            os.rename(root / "b", root / "a")
        os.unlink(root / "a" / MARKER)
        os.rmdir(root / "a")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(table_rows(proc.stdout)) == {"good", os.path.join("x", "y", "trials", "0000")}
