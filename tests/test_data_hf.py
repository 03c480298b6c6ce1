"""Hugging Face ``datasets`` passed directly to fit/validate/test/predict (trainval.data.hf).

Each dataset is made in the test with ``Dataset.from_dict`` (no hub: HF_DATASETS_OFFLINE=1, a tmp cache);
every result is compared exactly with the same data given as tensors.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_blobs
from torch import nn
from torch.utils.data import IterableDataset

from trainval import Trainer
from trainval.errors import DataError


@pytest.fixture(autouse=True)
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def datasets():
    import datasets as hf

    return hf


class NamedNet(nn.Module):
    """forward(x): a dataset column named ``x`` goes to it by name."""

    def __init__(self, d: int = 6, classes: int = 3, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, classes))

    def forward(self, x):
        return self.net(x)


class TwoInputs(nn.Module):
    """forward(a, b): two named columns; any other column is left out."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(4, 8), nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, a, b):
        return self.head(torch.relu(self.a(a) + self.b(b)))


def trainer(model: nn.Module, out, epochs: int = 3) -> Trainer:
    return Trainer(
        model,
        torch.optim.Adam(model.parameters(), lr=0.05),
        max_epochs=epochs,
        out_dir=str(out),
        batch_size=16,
        progress=False,
        plot=False,
        device="cpu",
    )


def fitted(model: nn.Module, out, train, val) -> tuple[list[dict], dict]:
    tr = trainer(model, out)
    history = tr.fit(train, val)
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history], model.state_dict()


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_map_style_dataset_trains_exactly_as_tensors(tmp_path):
    X, y = make_blobs(n=60)
    ds = datasets().Dataset.from_dict({"x": X.tolist(), "label": y.tolist()})
    hf_history, hf_weights = fitted(NamedNet(), tmp_path / "hf", ds, ds)
    t_history, t_weights = fitted(NamedNet(), tmp_path / "t", (X, y), (X, y))
    assert hf_history == t_history and hf_history[-1]["val_acc"] > 0.8
    assert_same_weights(hf_weights, t_weights)


def test_map_style_validate_test_predict_equal_tensors(tmp_path):
    X, y = make_blobs(n=50, seed=3)
    ds = datasets().Dataset.from_dict({"x": X.tolist(), "label": y.tolist()})
    tr = trainer(NamedNet(), tmp_path)
    tr.fit((X, y), (X, y))
    assert tr.validate(ds) == tr.validate((X, y))
    assert tr.test(ds, ckpt="best") == tr.test((X, y), ckpt="best")
    assert torch.equal(tr.predict(ds), tr.predict(X))
    assert torch.equal(tr.predict_proba(ds), tr.predict_proba(X))
    # unlabelled: predict needs no target column
    assert torch.equal(tr.predict(ds.remove_columns("label")), tr.predict(X))


def test_unnamed_column_goes_positionally(tmp_path):
    """nn.Sequential's forward(input) names no column: the one feature column is passed as the tensor."""
    X, y = make_blobs(n=60, seed=1)
    ds = datasets().Dataset.from_dict({"features": X.tolist(), "labels": y.tolist()})

    def seq():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))

    hf_history, hf_weights = fitted(seq(), tmp_path / "hf", ds, ds)
    t_history, t_weights = fitted(seq(), tmp_path / "t", (X, y), (X, y))
    assert hf_history == t_history
    assert_same_weights(hf_weights, t_weights)


def test_columns_the_forward_names_go_as_a_dict(tmp_path):
    """forward(a, b): a dict batch of a and b; a text column the model does not take is left out."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(60, 4, generator=g), torch.randn(60, 2, generator=g)
    y = ((a[:, 0] + b[:, 0]) > 0).long() + (a[:, 1] > 1).long()
    ds = datasets().Dataset.from_dict(
        {"a": a.tolist(), "text": [f"row {i}" for i in range(60)], "b": b.tolist(), "label": y.tolist()}
    )
    hf_history, hf_weights = fitted(TwoInputs(), tmp_path / "hf", ds, ds)
    t_history, t_weights = fitted(TwoInputs(), tmp_path / "t", ({"a": a, "b": b}, y), ({"a": a, "b": b}, y))
    assert hf_history == t_history
    assert_same_weights(hf_weights, t_weights)


class TensorStream(IterableDataset):
    """The same rows as a plain torch stream, for the IterableDataset comparison."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __iter__(self):
        return zip(self.X, self.y)


def test_iterable_dataset_trains_as_the_same_tensor_stream(tmp_path):
    X, y = make_blobs(n=64, seed=2)
    ds = datasets().Dataset.from_dict({"x": X.tolist(), "label": y.tolist()})
    stream = ds.to_iterable_dataset()  # read in order: an epoch is one pass
    hf_history, hf_weights = fitted(NamedNet(), tmp_path / "hf", stream, stream)
    t_history, t_weights = fitted(NamedNet(), tmp_path / "t", TensorStream(X, y), TensorStream(X, y))
    assert hf_history == t_history and hf_history[-1]["val_acc"] > 0.8
    assert_same_weights(hf_weights, t_weights)
    tr = trainer(NamedNet(), tmp_path / "t")
    assert tr.test(stream, ckpt="best") == tr.test((X, y), ckpt="best")
    assert torch.equal(tr.predict(stream, ckpt="best"), tr.predict(X, ckpt="best"))


def test_iterable_dataset_without_known_features(tmp_path):
    """A generator stream: its columns are known only once read."""
    X, y = make_blobs(n=40, seed=4)

    def rows():
        for xi, yi in zip(X.tolist(), y.tolist()):
            yield {"x": xi, "label": yi}

    stream = datasets().IterableDataset.from_generator(rows)
    tr = trainer(NamedNet(), tmp_path)
    tr.fit((X, y), (X, y))
    assert torch.equal(tr.predict(stream), tr.predict(X))
    assert tr.validate(stream) == tr.validate((X, y))


def test_one_clear_line_for_what_cannot_be_read(tmp_path):
    hf = datasets()
    X, y = make_blobs(n=20)
    ds = hf.Dataset.from_dict({"x": X.tolist(), "label": y.tolist()})
    tr = trainer(NamedNet(), tmp_path)
    with pytest.raises(DataError, match=r"DatasetDict with splits 'train'.*ds\['train'\]"):
        tr.validate(hf.DatasetDict({"train": ds}))
    text = hf.Dataset.from_dict({"words": ["a", "b"], "label": [0, 1]})
    seq = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(DataError, match=r"column 'words' holds str values") as e:
        trainer(seq, tmp_path / "s").validate(text)
    assert "\n" not in str(e.value)
    only_labels = hf.Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(DataError, match="no feature columns besides the target"):
        tr.validate(only_labels)


def test_sharded_stream_reads_each_row_once():
    """split_by_rank over 2 ranks: disjoint shares that together are the whole stream (whole shards here)."""
    from trainval.data.hf import HFStream, plan_columns

    X, y = make_blobs(n=24)
    ds = datasets().Dataset.from_dict({"x": X.tolist(), "label": y.tolist()})
    stream = ds.to_iterable_dataset(num_shards=4)
    wrapped = HFStream(stream, plan_columns(stream.column_names, NamedNet(), "labels", "train"))
    shares = [list(wrapped.split_by_rank(r, 2)) for r in range(2)]
    rows = sorted(tuple(s[0]["x"].tolist()) for s in itertools.chain(*shares))
    assert len(shares[0]) == len(shares[1]) == 12
    assert rows == sorted(tuple(r) for r in X.tolist())
