"""Tables: pandas DataFrames through the Python API, CSV files with class names and text columns through the
CLI, and the fast CSV reader agreeing with the Python one."""

import csv
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_blobs, run_cli, tiny_mlp

from trainval import Trainer
from trainval.data import load_csv
from trainval.errors import DataError

SPECIES = ["setosa", "versicolor", "virginica"]
COLORS = ["blue", "green", "red"]


def frame(n: int = 90, seed: int = 0) -> pd.DataFrame:
    X, y = make_blobs(n=n, d=3, seed=seed)
    return pd.DataFrame(
        {
            "a": X[:, 0].numpy(),
            "color": [COLORS[(i * 7) % 3] for i in range(n)],
            "b": X[:, 1].numpy(),
            "c": X[:, 2].numpy(),
            "species": [SPECIES[k] for k in y.tolist()],
        }
    )


def by_hand(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    """The same numbers as tensors: a, one-hot color (blue, green, red), b, c; class ids by sorted name."""
    onehot = np.stack([(df["color"] == c).to_numpy() for c in COLORS], axis=1)
    X = np.column_stack([df["a"], onehot, df["b"], df["c"]]).astype(np.float32)
    return torch.from_numpy(X), torch.tensor([SPECIES.index(s) for s in df["species"]])


def trainer(out: str) -> Trainer:
    return Trainer(
        tiny_mlp(d=6), max_epochs=3, batch_size=16, out_dir=str(out), progress=False, plot=False, seed=0
    )


def test_a_dataframe_fit_matches_a_tensor_fit_bitwise(tmp_path):
    df = frame()
    features = ["a", "color", "b", "c"]
    t = trainer(tmp_path / "df")
    t.fit((df[features], df["species"]))
    X, y = by_hand(df)
    ref = trainer(tmp_path / "tensor")
    ref.fit((X, y))
    assert t.table is not None and t.table.classes == SPECIES and t.table.categories == {"color": COLORS}
    assert torch.equal(t.predict(df[features]), ref.predict(X))
    assert torch.equal(t.predict_proba(df[features]), ref.predict_proba(X))
    # columns by name: reordered, with extra columns (the label) ignored
    assert torch.equal(t.predict(df[["c", "species", "b", "color", "a"]]), ref.predict(X))
    assert t.test(df, target="species") == ref.test((X, y))
    assert t.validate(df, target="species") == ref.validate((X, y))
    # a fresh Trainer reads the columns from best.pt
    fresh = Trainer(tiny_mlp(d=6, seed=5), out_dir=str(tmp_path / "df"), progress=False)
    assert torch.equal(fresh.predict(df[features[::-1]]), ref.predict(X))
    assert t.table.decode_classes(t.predict(df).tolist()[:3]) == [
        SPECIES[i] for i in ref.predict(X).tolist()[:3]
    ]


def test_fit_with_a_target_column_name_and_val_frame(tmp_path):
    df = frame()
    t = trainer(tmp_path / "a")
    t.fit(df.iloc[:60], df.iloc[60:], target="species")
    X, y = by_hand(df)
    ref = trainer(tmp_path / "b")
    ref.fit((X[:60], y[:60]), (X[60:], y[60:]))
    assert t.history[-1]["val_loss"] == ref.history[-1]["val_loss"]
    assert torch.equal(t.predict(df), ref.predict(X))


def test_dataframe_refusals_are_one_line(tmp_path):
    df = frame()
    t = trainer(tmp_path / "r")
    t.fit(df, target="species")
    with pytest.raises(DataError, match=r"lacks the column\(s\) 'b' the model was trained on"):
        t.predict(df.drop(columns=["b"]))
    unseen = df.copy()
    unseen.loc[4, "color"] = "purple"
    with pytest.raises(DataError, match=r"column 'color': value 'purple' is not a category seen in training"):
        t.predict(unseen)
    unknown = df.copy()
    unknown.loc[2, "species"] = "daisy"
    with pytest.raises(
        DataError, match=r"column 'species': label 'daisy' is not a class the run was trained on"
    ):
        t.test(unknown, target="species")
    with pytest.raises(DataError, match=r"no target column 'label'"):
        trainer(tmp_path / "s").fit(df, target="label")


# --------------------------------------------------------------------------------------------------
# The CLI on a CSV with class names and a text column


def write_csv(path, df: pd.DataFrame) -> str:
    df.to_csv(path, index=False, float_format="%.6g")
    return str(path)


def read_rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


FIT = [
    "data.source=csv",
    "data.label=species",
    "model.name=mlp",
    "model.hidden=[8]",
    "train.epochs=2",
    "train.progress=false",
    "log.plot=false",
    "run.out_dir=runs",
    "run.name=r",
]


def test_cli_string_labels_and_text_column(tmp_path):
    df = frame(n=120)
    write_csv(tmp_path / "train.csv", df.iloc[:90])
    test_df = df.iloc[90:][["species", "c", "color", "b", "a"]]  # columns in another order
    write_csv(tmp_path / "test.csv", test_df)
    write_csv(tmp_path / "new.csv", df.iloc[90:][["c", "b", "a", "color"]])  # unlabelled
    proc = run_cli("fit", "data.train=train.csv", "data.test=test.csv", *FIT, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "r"
    import yaml

    resolved = yaml.safe_load((run / "config.yaml").read_text())["resolved"]
    assert resolved["classes"] == SPECIES and resolved["categories"] == {"color": COLORS}
    assert resolved["in_shape"] == [6] and resolved["num_outputs"] == 3
    rows = read_rows(run / "predictions.csv")
    assert rows[0] == ["Id", "Class"] and len(rows) == 31 and {r[1] for r in rows[1:]} <= set(SPECIES)

    # the CLI's numbers are the Python API's on the same numbers (one-hot by hand, ids by sorted name)
    proc = run_cli("predict", str(run), "data.test=new.csv", "--proba", "--out", "p.csv", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(tmp_path / "p.csv")
    assert rows[0] == ["Id", "Class", "prob_setosa", "prob_versicolor", "prob_virginica"]
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert [r[1] for r in rows[1:]] == [SPECIES[k] for k in probs.argmax(1)]
    test_rows = read_rows(run / "predictions.csv")
    assert [r[1] for r in rows[1:]] == [r[1] for r in test_rows[1:]]  # same rows, columns reordered

    proc = run_cli("test", str(run), "data.test=test.csv", cwd=str(tmp_path))
    assert proc.returncode == 0 and "Test Acc" in proc.stderr + proc.stdout, proc.stderr

    # an unknown class at test, an unseen category at predict, a missing column: one line each
    bad = test_df.copy()
    bad.iloc[3, 0] = "daisy"
    write_csv(tmp_path / "unknown.csv", bad)
    proc = run_cli("test", str(run), "data.test=unknown.csv", cwd=str(tmp_path))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        "unknown.csv: row 5, label column 'species': 'daisy' is not a class the run was trained on" in err[0]
    )
    bad = df.iloc[90:][["c", "b", "a", "color"]].copy()
    bad.iloc[1, 3] = "purple"
    write_csv(tmp_path / "purple.csv", bad)
    proc = run_cli("predict", str(run), "data.test=purple.csv", "--out", "p2.csv", cwd=str(tmp_path))
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(err) == 1, proc.stderr
    assert "purple.csv: row 3, column 'color': 'purple' is not one of the column's categories" in err[0]
    assert not os.path.exists(tmp_path / "p2.csv")
    write_csv(tmp_path / "nob.csv", df.iloc[90:][["c", "a", "color"]])
    proc = run_cli("predict", str(run), "data.test=nob.csv", "--out", "p3.csv", cwd=str(tmp_path))
    assert proc.returncode == 1 and "nob.csv: feature columns not found: b" in proc.stderr, proc.stderr


def test_cli_csv_predictions_match_the_api_on_the_same_numbers(tmp_path):
    """The CSV's one-hot column and class names give the same model as the Python API on a DataFrame."""
    df = frame(n=90)
    path = write_csv(tmp_path / "train.csv", df)
    split = load_csv(path, label="species")
    X, y = by_hand(pd.read_csv(path))
    assert np.array_equal(split.X, X.numpy()) and split.y.tolist() == y.tolist()
    assert split.encoding is not None and split.encoding.classes == SPECIES


# --------------------------------------------------------------------------------------------------
# The fast reader (pyarrow) and the Python reader agree


def test_fast_and_python_csv_readers_agree(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    n = 200
    df = pd.DataFrame({f"f{i}": rng.normal(size=n) * 10.0 ** rng.integers(-5, 5) for i in range(5)})
    df["big"] = rng.integers(-(2**60), 2**60, n)
    df["color"] = rng.choice(["red", " blue", "green "], n)
    df["label"] = rng.integers(0, 3, n)
    path = str(tmp_path / "d.csv")
    df.to_csv(path, index=False, float_format="%.17g")
    import trainval.data as data

    took = []
    original = data._csv_fast
    monkeypatch.setattr(data, "_csv_fast", lambda *a: took.append(original(*a)) or took[-1])
    fast = load_csv(path)
    assert took and took[0] is not None  # the fast path read it
    called = []
    monkeypatch.setattr(data, "_csv_fast", lambda *a: called.append(1))  # the Python reader alone
    slow = load_csv(path)
    assert called and fast.X.dtype == slow.X.dtype == np.float32
    assert np.array_equal(fast.X, slow.X) and np.array_equal(fast.y, slow.y)
    assert fast.encoding == slow.encoding and fast.encoding.categories == {"color": ["blue", "green", "red"]}
    monkeypatch.undo()
    # every python-float of a cell, rounded to float32 as the Python reader does
    exact = np.array([[float(v) for v in row[:5]] for row in read_rows(path)[1:]]).astype(np.float32)
    assert np.array_equal(fast.X[:, :5], exact)
