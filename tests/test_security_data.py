"""Issue 18, users' data files: every check on a file is linear, names from a file reach no terminal raw,
a folder/FIFO/device is named as such (never read), crafted npz headers and labels are one line, and a
training file of one class says so. CLI cases run the real ``trainval`` in a subprocess."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
import zipfile

import numpy as np
import pytest
import yaml
from conftest import run_cli

from trainval.app import preprocess
from trainval.data import csv_feature_columns, load_csv, load_npz
from trainval.errors import ConfigError, DataError

ESCAPES = "\x1b]0;pwned\x07\x1b[2J"
CLI_TIMEOUT = 120  # a hang shows as subprocess.TimeoutExpired, never as a stuck test run


def one_error_line(proc) -> str:
    """The one ``trainval: error:`` line of a failed command, with no byte that steers a terminal."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trainval: error: "), err[:2000]
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "Traceback" not in proc.stderr
    return err


def refusal(read, path: str, fifo: str | None = None, seconds: float = 60) -> BaseException | None:
    """What ``read(path)`` raises, read in a thread: if it is still blocked after ``seconds`` (opened a FIFO
    and waits for a writer), the test fails, after a writer on ``fifo`` has let the reader go."""
    caught: list[BaseException | None] = [None]

    def target() -> None:
        try:
            read(path)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            caught[0] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo:
            with open(fifo, "w"):  # the blocked reader now gets end-of-file
                pass
        thread.join(seconds)
        pytest.fail(f"reading {path} blocked for {seconds} s")
    return caught[0]


def fit_args(data, *extra: str) -> list[str]:
    return ["fit", "data.source=csv", f"data.train={data}", "model.name=mlp", "model.hidden=[4]", "train.epochs=1",
            "train.progress=false", f"run.out_dir={os.path.dirname(str(data))}/runs", "run.name=r", *extra]


def write_rows(path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(header) + "\n")
        f.writelines(",".join(str(v) for v in row) + "\n" for row in rows)
    return str(path)


def small_csv(path, label_of=lambda r: r % 2, rows: int = 40) -> str:
    return write_rows(path, ["f1", "f2", "label"], [[r * 0.1, (r % 7) * 0.5, label_of(r)] for r in range(rows)])


# ------------------------------------------------------------------------------------------------
# Item 3: a header of 100,000+ columns is read in linear time


def test_checks_on_a_wide_csv_header_are_linear(tmp_path):
    """200,000 columns: the duplicate-column check, the label and feature look-ups and the column list of
    fit take well under a second each here (the quadratic duplicate check took minutes)."""
    names = [f"c{i}" for i in range(200_000)]
    cells = ["0.5"] * len(names)
    dup = write_rows(tmp_path / "dup.csv", [*names, "label", "c7"], [[*cells, r % 2, 0.5] for r in range(3)])
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"dup\.csv: the header names column\(s\) 'c7' more than once"):
        load_csv(dup)
    wide = write_rows(tmp_path / "wide.csv", [*names, "label"], [[*cells, r % 2] for r in range(3)])
    split = load_csv(wide, features=names[::-1])  # every feature looked up by name
    assert split.X.shape == (3, 200_000) and split.y.tolist() == [0, 1, 0]
    assert csv_feature_columns(wide, "label", None) == names
    assert len(load_csv(wide).X[0]) == 200_000
    with pytest.raises(DataError, match=r"feature columns not found: nope \(columns: c0, c1, c2"):
        load_csv(wide, features=[*names, "nope"])
    assert time.perf_counter() - started < 30  # about 2 s here; the quadratic checks took many minutes


def test_wide_csv_header_gets_an_answer_from_the_cli(tmp_path):
    names = [f"c{i}" for i in range(100_000)]
    data = write_rows(tmp_path / "wide.csv", [*names, "label", "c99999"], [["0.5"] * 100_002 for _ in range(4)])
    err = one_error_line(run_cli(*fit_args(data), cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert "wide.csv: the header names column(s) 'c99999' more than once" in err


# ------------------------------------------------------------------------------------------------
# Item 10: names and values quoted from a CSV header or a run's config.yaml are terminal-safe and bounded


def test_column_names_with_escapes_are_shown_escaped_and_bounded(tmp_path):
    name = ESCAPES + "A" * 100_000  # (the csv module refuses a cell over 128 KiB)
    # (a column of numbers with one text cell: a column of text only is categorical, one-hot encoded)
    data = write_rows(tmp_path / "esc.csv", ["f1", name, "label"], [[r, "abc" if r == 0 else r, r % 2] for r in range(20)])
    with pytest.raises(DataError) as caught:
        load_csv(data)
    message = str(caught.value)
    assert "\x1b" not in message and "\x07" not in message and len(message) < 1000, message[:300]
    assert "esc.csv: row 2, column '\\x1b]0;pwned\\x07\\x1b[2J" in message and "'abc' is not a number" in message
    err = one_error_line(run_cli(*fit_args(data), cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert len(err) < 1000 and "\\x1b]0;pwned" in err
    # a long cell is cut too
    cell = write_rows(tmp_path / "cell.csv", ["f1", "label"], [[ESCAPES + "B" * 100_000, 0], [1, 1]])
    with pytest.raises(DataError) as caught:
        load_csv(cell)
    assert "\x1b" not in str(caught.value) and len(str(caught.value)) < 1000


def test_feature_names_from_a_run_config_yaml_are_bounded_and_a_fifo_test_file_is_refused(tmp_path):
    data = small_csv(tmp_path / "d.csv")
    run_cli(*fit_args(data), cwd=str(tmp_path), timeout=CLI_TIMEOUT, check=True)
    config_yaml = tmp_path / "runs" / "r" / "config.yaml"
    recorded = yaml.safe_load(config_yaml.read_text())
    recorded["resolved"]["features"] = ["f1", ESCAPES + "C" * 1_000_000]  # 1 MB
    config_yaml.write_text(yaml.safe_dump(recorded))
    proc = run_cli("predict", str(tmp_path / "runs" / "r"), f"data.test={data}", "--out", str(tmp_path / "p.csv"),
                   cwd=str(tmp_path), timeout=CLI_TIMEOUT)
    err = one_error_line(proc)
    assert "feature columns not found: \\x1b]0;pwned\\x07\\x1b[2J" in err and len(err) < 1000, err[:300]
    # and `test RUN` with a test file that is a FIFO: named so, not read
    os.mkfifo(tmp_path / "fifo.csv")
    proc = run_cli("test", str(tmp_path / "runs" / "r"), f"data.test={tmp_path / 'fifo.csv'}", cwd=str(tmp_path),
                   timeout=CLI_TIMEOUT)
    assert "fifo.csv is a FIFO (named pipe), not a regular file" in one_error_line(proc)


# ------------------------------------------------------------------------------------------------
# Unclear items: npz with 0-d arrays, an npz header claiming 10^12 rows, a label 1e30


def _npy_bytes(shape: tuple, descr: str = "<f4", data: bytes = b"\0" * 32) -> bytes:
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + data


def test_npz_with_0d_arrays_or_a_header_claiming_1e12_rows_is_one_line(tmp_path):
    np.savez(tmp_path / "scalar.npz", x=np.float32(1.0), y=np.int64(0))
    with pytest.raises(DataError, match=r"scalar\.npz: array 'x' is a single value \(shape \(\)\)"):
        load_npz(str(tmp_path / "scalar.npz"))
    crafted = tmp_path / "huge.npz"
    with zipfile.ZipFile(crafted, "w") as z:
        z.writestr("x.npy", _npy_bytes((10**12, 4)))  # 32 bytes of data under a header of 16 TB
        z.writestr("y.npy", _npy_bytes((2,), "<i8", b"\0" * 16))
    with pytest.raises(DataError, match=r"huge\.npz: array 'x' declares shape \(1000000000000, 4\) of float32 "
                                        r"\(16000000000000 bytes\) but holds 32 bytes"):
        load_npz(str(crafted))
    # the zip directory may lie about the member's size too: believed only as far as the archive allows
    with zipfile.ZipFile(tmp_path / "lying.npz", "w") as z:
        z.writestr("x.npy", _npy_bytes((200_000_000, 4)))  # 3.2 GB declared, 32 bytes held
        z.writestr("y.npy", _npy_bytes((2,), "<i8", b"\0" * 16))
    raw = bytearray((tmp_path / "lying.npz").read_bytes())
    entry = raw.index(b"PK\x01\x02")  # x.npy's central directory entry: uncompressed size at +24
    struct.pack_into("<I", raw, entry + 24, 3_200_000_000 + 128)
    (tmp_path / "lying.npz").write_bytes(bytes(raw))
    assert zipfile.ZipFile(tmp_path / "lying.npz").getinfo("x.npy").file_size == 3_200_000_128
    with pytest.raises(DataError, match=r"lying\.npz: array 'x' declares shape \(200000000, 4\) of float32 "
                                        r"\(3200000000 bytes\) but holds"):
        load_npz(str(tmp_path / "lying.npz"))
    for name in ("scalar.npz", "huge.npz"):
        proc = run_cli("fit", "data.source=npz", f"data.train={tmp_path / name}", "model.name=mlp",
                       f"run.out_dir={tmp_path}/runs", cwd=str(tmp_path), timeout=CLI_TIMEOUT)
        assert f"{name}: array 'x'" in one_error_line(proc)
    # a sound file of the same layout loads
    with zipfile.ZipFile(tmp_path / "ok.npz", "w") as z:
        z.writestr("x.npy", _npy_bytes((2, 4)))
        z.writestr("y.npy", _npy_bytes((2,), "<i8", b"\0" * 16))
    assert load_npz(str(tmp_path / "ok.npz")).X.shape == (2, 4)


def test_a_label_1e30_is_shown_as_written_and_said_to_be_no_class_id(tmp_path):
    data = small_csv(tmp_path / "d.csv", label_of=lambda r: "1e30" if r == 5 else r % 2)
    with pytest.raises(DataError, match=r"d\.csv: row 7, label column 'label': 1e30 is not an integer class id"):
        load_csv(data)
    err = one_error_line(run_cli(*fit_args(data), cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert "row 7, label column 'label': 1e30 is not an integer class id" in err
    assert "class ids 0, 1, 2" in err and "9223372036854775808" not in err
    assert load_csv(data, integer_labels=False).y[5] == 1e30  # a regression target may be that large


# ------------------------------------------------------------------------------------------------
# Item 4 (unclear): a data path that is a folder, a FIFO or a device is named so, and never read


def _special_paths(tmp_path) -> dict[str, str]:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    return {"a FIFO (named pipe)": str(tmp_path / "fifo"), "a device": "/dev/zero", "a folder": str(tmp_path / "folder")}


def test_data_paths_that_are_no_regular_file_are_named_so(tmp_path):
    special = _special_paths(tmp_path)
    for kind, path in special.items():
        expected = re.escape(f"data file {path} is {kind}, not a regular file; give the path of a file.")
        for read in (load_csv, load_npz, lambda p: csv_feature_columns(p, "label", None)):
            error = refusal(read, path, path if "FIFO" in kind else None)
            assert isinstance(error, ConfigError) and re.fullmatch(expected, str(error)), error
    fifo, device = special["a FIFO (named pipe)"], special["a device"]
    err = one_error_line(run_cli(*fit_args(fifo), cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert f"data file {fifo} is a FIFO (named pipe), not a regular file" in err, err
    data = small_csv(tmp_path / "d.csv")
    err = one_error_line(run_cli(*fit_args(data, f"data.test={device}"), cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert "data file /dev/zero is a device, not a regular file" in err, err


def test_standardize_json_that_is_a_fifo_or_malformed_is_one_error(tmp_path):
    fifo = str(tmp_path / preprocess.FILE)
    os.mkfifo(fifo)
    error = refusal(lambda _: preprocess.load(str(tmp_path)), fifo, fifo)
    assert isinstance(error, DataError) and "standardize.json is a FIFO" in str(error), error
    os.remove(tmp_path / preprocess.FILE)
    (tmp_path / preprocess.FILE).write_text('{"shape": [1000000000000], "mean": [0], "std": [1]}')
    with pytest.raises(DataError, match="'mean' and 'std' must be lists of numbers, one per feature"):
        preprocess.load(str(tmp_path))
    (tmp_path / preprocess.FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="cannot read"):
        preprocess.load(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Item 5 (unclear): a training CSV of one class says so, naming the file and the label column


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_a_training_csv_of_one_class_says_so(tmp_path, task):
    data = small_csv(tmp_path / "one.csv", label_of=lambda r: 1)
    args = ["fit", "data.source=csv", f"data.train={data}", f"task.name={task}", "train.epochs=1",
            f"run.out_dir={tmp_path}/runs"]  # the default model (cnn) too: the data is at fault, not the model
    err = one_error_line(run_cli(*args, cwd=str(tmp_path), timeout=CLI_TIMEOUT))
    assert "one.csv: every label in label column 'label' is the same class (1, 40 rows)" in err, err
    assert "regression" in err and ("both classes" in err if task == "binary" else "at least two classes" in err)


def test_config_features_messages_quote_one_bounded_name(tmp_path):
    from trainval.app import config

    name = ESCAPES + "D" * 100_000
    path = tmp_path / "c.yaml"
    for features, label, words in (([name, "f1", name], "label", "names the column '\\x1b]0;pwned"),
                                   (["f1", name], name, "includes the label column '\\x1b]0;pwned")):
        path.write_text(yaml.safe_dump({"data": {"source": "csv", "train": "d.csv", "features": features,
                                                  "label": label}}))
        with pytest.raises(ConfigError) as caught:
            config.load(str(path))
        message = str(caught.value)
        assert words in message and "\x1b" not in message and len(message) < 1000, message[:300]
