"""Sharded last.pt (trainval.checkpoint.sharded) read and cleaned in one process, and async_save on one process.

The multi-process halves (FSDP writing shards on 2 gloo ranks, a crash between the shards and the
pointer, async FSDP saves) are in test_distributed.py.
"""

from __future__ import annotations

import csv
import os
import pickle

import pytest
import torch
from conftest import make_blobs, tiny_mlp

from trainval import Trainer, load_model
from trainval.checkpoint import load_checkpoint, save_checkpoint, sharded, snapshot
from trainval.errors import CheckpointError


def _fit(out_dir, async_save, epochs=4, callbacks=(), every=2):
    X, y = make_blobs(120)
    Xv, yv = make_blobs(45, seed=1)
    model = tiny_mlp(dropout=0.2)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), max_epochs=epochs,
                      out_dir=str(out_dir), batch_size=16, progress=False, plot=False, device="cpu",
                      checkpoint_every_steps=every, async_save=async_save, callbacks=list(callbacks))
    trainer.fit((X, y), (Xv, yv))
    return trainer


def _metrics_rows(folder):
    with open(os.path.join(folder, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def _same(a, b, path="") -> None:
    """Equal nested checkpoint content, tensors bit for bit; wall-clock seconds aside."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        keys = set(a) - {"seconds"}
        assert keys == set(b) - {"seconds"}, path
        for k in keys:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, z) in enumerate(zip(a, b)):
            _same(x, z, f"{path}[{i}]")
    else:
        assert a == b, path


def test_async_save_writes_what_a_synchronous_save_writes(tmp_path):
    sync = _fit(tmp_path / "sync", async_save=False)
    asyn = _fit(tmp_path / "async", async_save=True)
    a = torch.load(tmp_path / "sync" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "async" / "last.pt", weights_only=True)
    _same(a, b)  # weights, optimizer momentum, RNG streams, loop state and history
    assert a["optimizer"]["state"] and a["epoch"] == 4
    _same(torch.load(tmp_path / "sync" / "best.pt", weights_only=True)["model"],
          torch.load(tmp_path / "async" / "best.pt", weights_only=True)["model"])
    assert _metrics_rows(tmp_path / "sync") == _metrics_rows(tmp_path / "async")
    assert len(_metrics_rows(tmp_path / "sync")) == 4
    assert [r["val_loss"] for r in sync.history] == [r["val_loss"] for r in asyn.history]
    # the control: another run's last.pt differs, so the comparison can fail
    _fit(tmp_path / "short", async_save=True, epochs=3)
    with pytest.raises(AssertionError):
        _same(a, torch.load(tmp_path / "short" / "last.pt", weights_only=True))


def test_snapshot_is_not_changed_by_later_steps():
    model = tiny_mlp()
    live = model.state_dict()
    copy = snapshot({"model": live, "rows": [{"a": 1}]})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(torch.equal(copy["model"][k] + 1.0, live[k]) for k in live)
    # the control: a state_dict shares memory with the parameters (what an unsnapshotted write would see)
    assert torch.equal(model.state_dict()["0.weight"], live["0.weight"])


@pytest.mark.parametrize("at", [1, 3])  # a write in the middle of the run, and the very last one
def test_async_write_failure_is_an_error_of_fit(tmp_path, monkeypatch, at):
    """The disk fills up during the ``at``-th write of last.pt, in the background thread."""
    import errno
    import threading

    from trainval import checkpoint as ckpt_mod

    writes, threads = [], []

    def disk_full(fd):
        threads.append(threading.current_thread().name)
        if threads[-1] == "trainval-checkpoint-write":  # last.pt (best.pt is written in the training thread)
            writes.append(fd)
            if len(writes) == at:
                raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_write_hook", disk_full)
    with pytest.raises(CheckpointError, match=r"could not write last checkpoint .*last\.pt: No space left on device"):
        _fit(tmp_path, async_save=True, epochs=3, every=None)
    assert len(writes) == at  # it failed in the background thread, and was raised by fit
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # the temp file was removed


def test_remove_stale_deletes_only_trainval_shard_folders(tmp_path):
    root = tmp_path / "last.shards"

    def folder(name, files):
        (root / name).mkdir(parents=True)
        for f in files:
            (root / name / f).write_bytes(b"x")

    folder("e1-s6-aaaaaaaa", [".metadata", "__0_0.distcp", "__1_0.distcp"])  # the live one
    folder("e1-s8-bbbbbbbb", [".metadata", "__0_0.distcp", "__1_0.distcp", ".metadata.tmp"])  # a save cut short
    folder("e9-s9-0000abcd", ["__0_0.distcp", "keep.txt"])  # a user's file inside: it stays
    folder("mine", ["__0_0.distcp"])  # not a name trainval writes
    (root / "notes.txt").write_text("user")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "__0_0.distcp").write_bytes(b"precious")
    os.symlink(outside, root / "e3-s3-cccccccc")  # a link with trainval's name: never followed
    save_checkpoint({"epoch": 1, "shards": {"dir": "last.shards/e1-s6-aaaaaaaa"}}, str(tmp_path / "last.pt"))
    assert (root / "e1-s8-bbbbbbbb").is_dir()  # the control: the stray folder is there before

    sharded.remove_stale(str(tmp_path))
    assert sorted(os.listdir(root)) == ["e1-s6-aaaaaaaa", "e3-s3-cccccccc", "e9-s9-0000abcd", "mine", "notes.txt"]
    assert sorted(os.listdir(root / "e1-s6-aaaaaaaa")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert os.listdir(root / "e9-s9-0000abcd") == ["keep.txt"]
    assert os.listdir(root / "mine") == ["__0_0.distcp"]
    assert (outside / "__0_0.distcp").read_bytes() == b"precious"

    # an unreadable last.pt: which folder is live cannot be told, so nothing is deleted
    folder("e2-s9-dddddddd", [".metadata"])
    (tmp_path / "last.pt").write_bytes(b"garbage")
    sharded.remove_stale(str(tmp_path))
    assert (root / "e2-s9-dddddddd" / ".metadata").exists()


def _sharded_run(folder, model):
    """A sharded last.pt written by one process (DCP without a process group), as fit's commit writes it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    name = "e1-s1-12345678"
    metadata = dcp.save({"model": model_state, "optimizer": optimizer_state},
                        storage_writer=dcp.FileSystemWriter(os.path.join(folder, sharded.SHARDS_DIR, name)), no_dist=True)
    sharded._commit(str(folder), name, metadata, {"epoch": 1, "loop": {"global_step": 1}})
    return os.path.join(folder, "last.pt")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creating a file stands for running any code


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_last_pt_loads_as_a_plain_model_and_its_metadata_never_runs_code(tmp_path):
    trained = tiny_mlp(seed=3)
    path = _sharded_run(tmp_path, trained)
    state = load_checkpoint(path)
    assert "model" not in state and state["shards"]["dir"].startswith("last.shards/e1-s1-")
    loaded = load_model(str(tmp_path), "last", model=tiny_mlp(seed=4))  # the shards put together
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model(str(tmp_path), "last", model=tiny_mlp(hidden=8))

    # a crafted .metadata, and a last.pt whose fingerprint matches it (whoever writes the folder can do both)
    marker = tmp_path / "ran"
    metadata = tmp_path / state["shards"]["dir"] / ".metadata"
    metadata.write_bytes(pickle.dumps(_Payload(str(marker))))
    sha = sharded.sha256_file(str(metadata))
    record = {**state["shards"], "metadata_sha256": sha, "sha256": {**state["shards"]["sha256"], ".metadata": sha}}
    save_checkpoint({**state, "shards": record}, path)
    with pytest.raises(CheckpointError, match="refusing to read the shard metadata .*is not allowed"):
        load_model(str(tmp_path), "last", model=tiny_mlp())
    assert not marker.exists()
    with open(metadata, "rb") as f:  # the control: plain pickle (what DCP's own reader does) runs it
        pickle.load(f)
    assert marker.exists()

    # a fingerprint that does not match (shards of another save): refused before anything is unpickled
    save_checkpoint({**state, "shards": {**record, "metadata_sha256": "0" * 64}}, path)
    with pytest.raises(CheckpointError, match="not the ones .* recorded"):
        load_model(str(tmp_path), "last", model=tiny_mlp())
    # a pointer out of the run folder's shard folders
    save_checkpoint({**state, "shards": {**record, "dir": "../outside"}}, path)
    with pytest.raises(CheckpointError, match="not a shard folder trainval writes"):
        load_model(str(tmp_path), "last", model=tiny_mlp())


def test_damaged_or_linked_shards_are_one_clear_error(tmp_path):
    """Sizes the shard files cannot hold are refused before anything is allocated (a crafted 40 TB
    tensor used to end in the allocator's traceback); linked files are named as links, not as missing."""
    path = _sharded_run(tmp_path, tiny_mlp(seed=3))
    state = load_checkpoint(path)
    folder = tmp_path / state["shards"]["dir"]
    metadata = folder / ".metadata"
    original = metadata.read_bytes()
    import io

    md = sharded._MetadataUnpickler(io.BytesIO(original)).load()
    key = next(k for k in md.state_dict_metadata if k.startswith("model.") and k.endswith("weight"))
    md.state_dict_metadata[key].size = torch.Size([10**7, 10**6])
    metadata.write_bytes(pickle.dumps(md))
    sha = sharded.sha256_file(str(metadata))
    save_checkpoint({**state, "shards": {**state["shards"], "metadata_sha256": sha,
                                         "sha256": {**state["shards"]["sha256"], ".metadata": sha}}}, path)
    with pytest.raises(CheckpointError, match=r"describes 4\d+ bytes of tensors, but the shard files hold \d+"):
        load_model(str(tmp_path), "last", model=tiny_mlp())

    metadata.write_bytes(original)  # the control: the untouched metadata loads
    save_checkpoint(state, path)
    load_model(str(tmp_path), "last", model=tiny_mlp())

    shard = next(p for p in folder.iterdir() if p.name.endswith(".distcp"))
    moved = tmp_path / "elsewhere.distcp"
    shard.rename(moved)
    shard.symlink_to(moved)
    with pytest.raises(CheckpointError, match=r"is a symbolic link; trainval reads only the shard files it wrote"):
        load_model(str(tmp_path), "last", model=tiny_mlp())
