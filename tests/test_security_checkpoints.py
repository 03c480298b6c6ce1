"""Issue 18, checkpoints: special files never hang a load, every shard file is bound to its save, a linked
``last.shards`` is refused, and a full disk inside ``torch.save`` (or DCP's write) is one clear line.

Reads that could hang (a FIFO, ``/dev/zero``) run in a subprocess with a timeout, so a hang fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_mlp

from trainval import load_model
from trainval.checkpoint import atomic_write, load_checkpoint, save_checkpoint, sharded
from trainval.errors import CheckpointError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
TESTS = os.path.dirname(os.path.abspath(__file__))


def _sharded_save(run, model, epoch: int, name: str) -> str:
    """One sharded save of ``model`` into ``run`` (DCP in one process, then fit's own commit)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    metadata = dcp.save({"model": model_state, "optimizer": optimizer_state}, no_dist=True,
                        storage_writer=dcp.FileSystemWriter(os.path.join(run, sharded.SHARDS_DIR, name)))
    sharded._commit(str(run), name, metadata, {"epoch": epoch, "loop": {"global_step": epoch}})
    return os.path.join(run, sharded.SHARDS_DIR, name)


def _in_subprocess(code: str, timeout: float = 60) -> str:
    """Run ``code`` in a fresh interpreter (tests/ on its path); its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s (killed): {code.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_CALLS = """
import signal, sys, warnings
warnings.simplefilter("ignore")
from conftest import tiny_mlp
from trainval import load_model
from trainval.checkpoint import load_checkpoint
from trainval.errors import CheckpointError

class Hung(BaseException):  # not an OSError (TimeoutError is one): no reader's handler may catch it
    pass

def hung(*_):
    raise Hung

signal.signal(signal.SIGALRM, hung)
for call in sys.argv[1:]:
    signal.alarm(10)  # a FIFO's open or /dev/zero's endless read is interrupted: the case reports HUNG
    try:
        eval(call)
        print("LOADED", flush=True)
    except CheckpointError as e:
        print("ERROR:", e, flush=True)
    except Hung:
        print("HUNG:", call, flush=True)
    signal.alarm(0)
"""


def _calls_in_subprocess(calls: list[str], timeout: float = 90) -> list[str]:
    """Each call's outcome (``LOADED``, ``ERROR: <message>`` or ``HUNG``), run in one fresh interpreter so
    that a hang fails the test instead of hanging the suite."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    try:
        proc = subprocess.run([sys.executable, "-c", _CALLS, *calls], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        done = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"hung for {timeout} s (killed) at {calls[len(done.splitlines())]}; before it: {done}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == len(calls), proc.stdout  # one line each: no multi-line message
    return lines


# --------------------------------------------------------------------------------------------------
# Item 4: a FIFO or a link to /dev/zero never hangs a load


def test_a_special_file_where_a_checkpoint_is_read_is_refused_not_read(tmp_path):
    """``load_model(run, "last")`` (what ``test/predict --ckpt last`` reads) used to block forever on a FIFO
    ``.metadata`` and hash /dev/zero without end; ``load_checkpoint`` on a FIFO ``best.pt`` blocked too."""
    calls, expected = [], []
    for victim in (".metadata", "__0_0.distcp"):
        for kind in ("fifo", "dev-zero-link"):
            run = tmp_path / f"{kind}{victim}"
            folder = _sharded_save(str(run), tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
            load_model(str(run), "last", model=tiny_mlp())  # the control: the untouched run loads
            target = os.path.join(folder, victim)
            os.unlink(target)
            if kind == "fifo":
                os.mkfifo(target)
            else:
                os.symlink("/dev/zero", target)
            calls.append(f"load_model({str(run)!r}, 'last', model=tiny_mlp())")
            expected.append((victim, "is a FIFO (named pipe), not a regular file" if kind == "fifo" else
                             "is a symbolic link"))
    for kind in ("fifo", "dev-zero-link", "device"):
        best = tmp_path / kind / "best.pt"
        best.parent.mkdir()
        save_checkpoint({"model": tiny_mlp().state_dict(), "epoch": 1}, str(best))
        load_checkpoint(str(best))  # the control
        best.unlink()
        if kind == "fifo":
            os.mkfifo(best)
        elif kind == "dev-zero-link":
            best.symlink_to("/dev/zero")
        else:
            best = "/dev/zero"
        calls.append(f"load_checkpoint({str(best)!r})")
        expected.append(("checkpoint ", "is a FIFO (named pipe), not a regular file" if kind == "fifo" else
                         "is a device, not a regular file"))
    for call, line, (name, why) in zip(calls, _calls_in_subprocess(calls), expected):
        assert line.startswith("ERROR: ") and name in line and why in line, (call, line)


def test_load_checkpoint_reads_the_file_it_checked(tmp_path):
    """The archive check and torch.load read one open file: what is refused is never handed to torch.load."""
    path = tmp_path / "best.pt"
    save_checkpoint({"model": tiny_mlp().state_dict(), "epoch": 3}, str(path))
    assert load_checkpoint(str(path))["epoch"] == 3
    os.symlink(path, tmp_path / "link.pt")
    assert load_checkpoint(str(tmp_path / "link.pt"))["epoch"] == 3  # a user's link to a checkpoint is followed
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        load_checkpoint(str(tmp_path / "link.pt"), follow=False)
    with pytest.raises(CheckpointError, match="is a folder, not a regular file"):
        load_checkpoint(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Item 5: every shard file is bound to its save


def _two_saves_and_a_swap(run):
    """Epoch 1's shard file copied over epoch 2's (same size), as a mixed-up copy or restore leaves it."""
    first = _sharded_save(run, tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
    kept = run / "epoch1.distcp"
    shutil.copy(os.path.join(first, "__0_0.distcp"), kept)
    second_model = tiny_mlp(seed=2)
    second = _sharded_save(run, second_model, 2, "e2-s2-bbbbbbbb")
    live = os.path.join(second, "__0_0.distcp")
    assert os.path.getsize(kept) == os.path.getsize(live)  # same size: the size check cannot tell them apart
    return second_model, kept, live


def test_a_shard_file_of_another_save_is_refused(tmp_path):
    second_model, kept, live = _two_saves_and_a_swap(tmp_path)
    loaded = load_model(str(tmp_path), "last", model=tiny_mlp())  # the control: the live save loads, whole
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second_model.state_dict().items())

    shutil.copy(kept, live)
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is not the file saved with it \(its SHA-256 differs"):
        load_model(str(tmp_path), "last", model=tiny_mlp())
    # resume reads the shards through the same reader (every rank, inside DCP): the same one line
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = tiny_mlp()
    model_state, optimizer_state = get_state_dict(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    state = load_checkpoint(str(tmp_path / "last.pt"))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp is not the file saved with it"):
        sharded.load({"model": model_state, "optimizer": optimizer_state}, state["shards"], str(tmp_path / "last.pt"))


def test_every_file_of_a_save_is_recorded_in_last_pt(tmp_path):
    folder = _sharded_save(tmp_path, tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
    record = load_checkpoint(str(tmp_path / "last.pt"))["shards"]
    assert sorted(record["sha256"]) == sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp"]
    assert record["sha256"]["__0_0.distcp"] == sharded.sha256_file(os.path.join(folder, "__0_0.distcp"))


def test_a_last_pt_without_the_shard_hashes_loads_with_the_checks_of_its_time(tmp_path):
    """A last.pt written before every file was hashed: read (its .metadata hash and sizes checked), not refused."""
    second_model, kept, live = _two_saves_and_a_swap(tmp_path)
    state = load_checkpoint(str(tmp_path / "last.pt"))
    old = {k: v for k, v in state["shards"].items() if k != "sha256"}
    save_checkpoint({**state, "shards": old}, str(tmp_path / "last.pt"))
    loaded = load_model(str(tmp_path), "last", model=tiny_mlp())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in second_model.state_dict().items())
    save_checkpoint({**state, "shards": {**old, "sha256": ["not", "a", "table"]}}, str(tmp_path / "last.pt"))
    with pytest.raises(CheckpointError, match="record of the shard files' SHA-256 is not a table"):
        load_model(str(tmp_path), "last", model=tiny_mlp())


# --------------------------------------------------------------------------------------------------
# Item 6: last.shards itself a link out of the run folder


def test_a_linked_last_shards_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _sharded_save(run, tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
    load_model(str(run), "last", model=tiny_mlp())  # the control: the run's own folder loads
    outside = tmp_path / "outside"
    shutil.move(str(run / "last.shards"), outside)
    os.symlink(outside, run / "last.shards")
    with pytest.raises(CheckpointError, match=r"last\.shards is a symbolic link; trainval reads and writes shards only"):
        load_model(str(run), "last", model=tiny_mlp())
    with pytest.raises(CheckpointError, match=r"cannot be written: .*last\.shards is a symbolic link"):
        sharded.write({"model": tiny_mlp().state_dict()}, {"epoch": 2}, str(run))
    assert os.listdir(outside) == ["e1-s1-aaaaaaaa"]  # nothing written through the link


# --------------------------------------------------------------------------------------------------
# Unclear item: the disk fills up inside torch.save (or inside DCP's write)


class _FillsUp(io.RawIOBase):
    """A file that takes ``room`` bytes and then fails as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def writable(self):
        return True

    def write(self, b):
        if len(b) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(b)
        return self._f.write(b)

    def flush(self):
        self._f.flush()

    def seekable(self):
        return self._f.seekable()

    def tell(self):
        return self._f.tell()

    def seek(self, *args):
        return self._f.seek(*args)


_STATE = {"model": {"w": torch.arange(50_000, dtype=torch.float32)}, "epoch": 2}
_FULL = (r"could not write last checkpoint .*last\.pt: No space left on device\. Free some disk space\. "
         r"The previous last\.pt, if any, is intact\.$")


def test_a_full_disk_inside_torch_save_is_one_line(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint({"model": {}, "epoch": 1}, path)
    with pytest.raises(RuntimeError, match="inline_container"):  # the control: torch.save turns it into this
        torch.save(_STATE, _FillsUp(io.BytesIO(), 1000))
    with pytest.raises(CheckpointError, match=_FULL):
        atomic_write(path, lambda f: torch.save(_STATE, _FillsUp(f, 1000)), "last checkpoint")
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]
    # a RuntimeError that is no write failure stays a bug, with its traceback
    with pytest.raises(RuntimeError, match="a bug"):
        atomic_write(path, lambda f: (_ for _ in ()).throw(RuntimeError("a bug")), "last checkpoint")


def test_a_file_size_limit_inside_torch_save_is_one_line(tmp_path):
    """A real kernel write failure (RLIMIT_FSIZE: EFBIG) inside save_checkpoint's torch.save."""
    path = str(tmp_path / "last.pt")
    out = _in_subprocess(f"""
        import resource, signal, torch
        from trainval.checkpoint import save_checkpoint
        from trainval.errors import CheckpointError
        save_checkpoint({{"model": {{}}, "epoch": 1}}, {path!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        try:
            save_checkpoint({{"model": {{"w": torch.zeros(100_000)}}, "epoch": 2}}, {path!r}, "last checkpoint")
        except CheckpointError as e:
            print("ERROR:", e, flush=True)
    """)
    assert out.startswith("ERROR: could not write last checkpoint") and "File too large." in out, out
    assert "The previous last.pt, if any, is intact." in out
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_a_full_disk_inside_dcp_write_is_one_line(tmp_path, monkeypatch):
    """The sharded save: DCP writes each shard file itself; the disk fills up in the middle of one."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    run = str(tmp_path)
    _sharded_save(run, tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
    create_stream = FileSystem.create_stream

    def fills_up(self, path, mode):
        stream = create_stream(self, path, mode)
        if "w" not in mode or not str(path).endswith(".distcp"):
            return stream

        class Full:
            def __enter__(self):
                return _FillsUp(stream.__enter__(), 300)

            def __exit__(self, *exc):
                return stream.__exit__(*exc)

        return Full()

    monkeypatch.setattr(FileSystem, "create_stream", fills_up)
    model = tiny_mlp(seed=2)
    finish = sharded.write({"model": model.state_dict()}, {"epoch": 2, "loop": {"global_step": 2}}, run)
    with pytest.raises(CheckpointError, match=r"could not write the shards of last\.pt to .* \(rank 0: No space left "
                                              r"on device\. Free some disk space\)\. The previous last\.pt"):
        finish()
    assert load_checkpoint(os.path.join(run, "last.pt"))["epoch"] == 1
    load_model(run, "last", model=tiny_mlp())  # the previous save is whole


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 256 KiB file system (needs root and mount); skipped where it cannot be made."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode(errors='replace').strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_really_full_disk_is_one_line(tiny_tmpfs):
    path = str(tiny_tmpfs / "last.pt")
    save_checkpoint({"model": {}, "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=_FULL):
        save_checkpoint({"model": {"w": torch.zeros(200_000)}, "epoch": 2}, path, "last checkpoint")
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tiny_tmpfs) == ["last.pt"]

    run = tiny_tmpfs / "run"
    run.mkdir()
    _sharded_save(str(run), tiny_mlp(seed=1), 1, "e1-s1-aaaaaaaa")
    finish = sharded.write({"model": {"w": torch.zeros(200_000)}}, {"epoch": 2, "loop": {"global_step": 2}}, str(run))
    with pytest.raises(CheckpointError, match=r"could not write the shards .*No space left on device\. Free some "
                                              r"disk space\)\. The previous last\.pt, if any, is intact\.$"):
        finish()
    assert load_checkpoint(str(run / "last.pt"))["epoch"] == 1
