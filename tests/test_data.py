"""The in-memory batcher, input adapters and data sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_blobs, tiny_mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset, TensorDataset

from trainval import Trainer
from trainval.data import TensorLoader, epoch_indices, load_csv, load_npz, stratified_split
from trainval.errors import DataError


def _seen(loader):
    return [int(v) for x, _ in loader for v in x[:, 0].tolist()]


@given(n=st.integers(1, 60), batch=st.integers(1, 17), world=st.integers(1, 4), shuffle=st.booleans(),
       pad=st.booleans(), drop_last=st.booleans())
@settings(max_examples=150, deadline=None)
def test_shards_are_disjoint_and_cover_the_epoch(n, batch, world, shuffle, pad, drop_last):
    X = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n)
    seen = []
    for rank in range(world):
        g = torch.Generator().manual_seed(3)  # every rank holds the same generator state
        loader = TensorLoader(X, y, batch, shuffle=shuffle, drop_last=drop_last, generator=g, rank=rank,
                              world_size=world, pad=pad)
        got = _seen(loader)
        # len() is the number of batches an iteration yields, shuffled or not: full batches, then one
        # short batch unless drop_last drops it
        per_rank = -(-n // world) if pad else len(range(rank, n, world))
        sizes = [len(xb) for xb, _ in loader]
        expected = [batch] * (per_rank // batch) + ([per_rank % batch] if per_rank % batch and not drop_last else [])
        assert len(loader) == len(sizes) and sizes == expected
        assert len(got) == sum(expected)
        for xb, yb in loader:
            assert torch.equal(xb[:, 0].long(), yb)  # features and labels stay paired
        seen.append(got)
        if pad:
            assert loader.num_samples == -(-n // world)
    flat = [i for part in seen for i in part]
    if not drop_last and not pad:
        assert sorted(flat) == list(range(n))  # each sample exactly once
    if not drop_last and pad:
        assert set(flat) == set(range(n)) and len(flat) == -(-n // world) * world
    if drop_last and not pad and world == 1:
        assert len(flat) == (n // batch) * batch and len(set(flat)) == len(flat)


def test_shuffle_draws_from_the_given_generator():
    X = torch.arange(50, dtype=torch.float32)[:, None]
    a = _seen(TensorLoader(X, None, 7, shuffle=True, generator=torch.Generator().manual_seed(1)))
    b = _seen(TensorLoader(X, None, 7, shuffle=True, generator=torch.Generator().manual_seed(1)))
    c = _seen(TensorLoader(X, None, 7, shuffle=True, generator=torch.Generator().manual_seed(2)))
    assert a == b and a != c and sorted(a) == list(range(50))
    unshuffled = TensorLoader(X, None, 7)
    assert _seen(unshuffled) == list(range(50))


def test_iter_from_skips_batches_of_the_same_permutation():
    X = torch.arange(40, dtype=torch.float32)[:, None]
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    full = _seen(TensorLoader(X, None, 6, shuffle=True, generator=g))
    g.set_state(state)
    rest = torch.cat([x[:, 0] for x, _ in TensorLoader(X, None, 6, shuffle=True, generator=g).iter_from(3)]).long().tolist()
    assert rest == full[18:]


def test_epoch_indices_matches_single_process_batches_as_sets():
    """Two ranks with batch B/2 see, at step t, exactly the samples of batch t of one process with batch B."""
    g1 = torch.Generator().manual_seed(0)
    single = epoch_indices(40, shuffle=True, generator=g1)
    shards = [epoch_indices(40, shuffle=True, generator=torch.Generator().manual_seed(0), rank=r, world_size=2)
              for r in range(2)]
    for t in range(5):
        union = set(shards[0][t * 4 : (t + 1) * 4].tolist()) | set(shards[1][t * 4 : (t + 1) * 4].tolist())
        assert union == set(single[t * 8 : (t + 1) * 8].tolist())


class PairDataset(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


@pytest.mark.parametrize("kind", ["tensors", "numpy", "tensor_dataset", "dataset", "dataloader"])
def test_every_input_kind_trains_and_predicts(tmp_path, kind):
    X, y = make_blobs(n=60)
    data = {
        "tensors": (X, y),
        "numpy": (X.numpy().astype(np.float64), y.numpy()),
        "tensor_dataset": TensorDataset(X, y),
        "dataset": PairDataset(X, y),
        "dataloader": DataLoader(PairDataset(X, y), batch_size=16, shuffle=True),
    }[kind]
    model = tiny_mlp()
    tr = Trainer(model, torch.optim.Adam(model.parameters(), lr=0.05), max_epochs=3, out_dir=str(tmp_path),
                 batch_size=16, progress=False, plot=False)
    history = tr.fit(data, data)
    assert len(history) == 3 and history[-1]["val_acc"] > 0.8
    preds = tr.predict(data)
    assert preds.shape == (60,) and (preds == y).float().mean() > 0.8


def test_dataset_runs_are_reproducible(tmp_path):
    X, y = make_blobs(n=60)

    def run(name):
        m = tiny_mlp(dropout=0.2)
        Trainer(m, max_epochs=2, out_dir=str(tmp_path / name), batch_size=8, progress=False, plot=False).fit(
            PairDataset(X, y), PairDataset(X, y))
        return m.state_dict()

    a, b = run("a"), run("b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_features_refused_unless_disabled(tmp_path):
    X, y = make_blobs(n=30)
    X[7, 2] = float("nan")
    with pytest.raises(DataError, match="row 7, column 2"):
        Trainer(tiny_mlp(), out_dir=str(tmp_path / "a"), progress=False).fit((X, y), (X, y))
    tr = Trainer(tiny_mlp(), max_epochs=1, out_dir=str(tmp_path / "b"), progress=False, plot=False,
                 check_inputs=False, monitor="train_acc")
    from trainval.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError):  # then the loss itself catches it
        tr.fit((X, y))


def test_load_npz_and_csv(tmp_path):
    X, y = make_blobs(n=20)
    np.savez(tmp_path / "d.npz", x=X.numpy(), y=y.numpy())
    s = load_npz(str(tmp_path / "d.npz"))
    assert s.X.shape == (20, 6) and s.y.tolist() == y.tolist()
    np.savez(tmp_path / "nolabels.npz", x=X.numpy())
    assert load_npz(str(tmp_path / "nolabels.npz"), require_labels=False).y is None
    with pytest.raises(DataError, match="no label array named 'y'"):
        load_npz(str(tmp_path / "nolabels.npz"))

    (tmp_path / "d.csv").write_text("a,b,label\n1,2,0\n3,4,1\n")
    c = load_csv(str(tmp_path / "d.csv"))
    assert c.X.tolist() == [[1, 2], [3, 4]] and c.y.tolist() == [0, 1]
    (tmp_path / "bad.csv").write_text("a,b,label\n1,2,0\n3,x,1\n")
    with pytest.raises(DataError, match=r"row 3, column 'b': 'x' is not a number"):
        load_csv(str(tmp_path / "bad.csv"))
    with pytest.raises(DataError, match="no label column 'target'"):
        load_csv(str(tmp_path / "d.csv"), label="target")
    (tmp_path / "real.csv").write_text("a,b,label\n1,2,0\n3,4,0.25\n")
    with pytest.raises(DataError, match=r"row 3, label column 'label': 0\.25 is not an integer class id \(for "):
        load_csv(str(tmp_path / "real.csv"))  # the value as written, not numpy's np.float64(0.25)


def test_stratified_split_is_seeded_and_stratified():
    y = np.repeat(np.arange(4), 50)
    a = stratified_split(y, [0.2, 0.1], seed=3)
    b = stratified_split(y, [0.2, 0.1], seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    train, val, test = a
    assert len(val) == 40 and len(test) == 20 and len(train) == 140
    assert np.bincount(y[val]).tolist() == [10, 10, 10, 10]
    assert len(set(train) | set(val) | set(test)) == 200


def test_loaders_say_which_training_samples_are_padding():
    """97 samples on 2 ranks, batch 8: rank 1's 49th sample repeats the permutation's first (padding)."""
    from trainval.data import make_loader

    X, y = torch.randn(97, 3, generator=torch.Generator().manual_seed(0)), torch.arange(97) % 2
    for data in ((X, y), TensorDataset(X, y)):
        seen = []
        for rank in range(2):
            loader = make_loader(data, train=True, batch_size=8, generator=torch.Generator().manual_seed(0),
                                 device=torch.device("cpu"), rank=rank, world_size=2)
            batches = list(loader.iter_from(0))
            assert len(batches) == 7
            real = [loader.unpadded(i, len(b[1])) for i, b in enumerate(batches)]
            assert real == [8] * 6 + ([1] if rank == 0 else [0])
            seen += [x for (x, _), r in zip(batches, real) for x in x[:r]]
        # the control: the unpadded samples are the 97, each once; with the padding there are 98
        assert len(seen) == 97 and len({tuple(x.tolist()) for x in seen}) == 97
