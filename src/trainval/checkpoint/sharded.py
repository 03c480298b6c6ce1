"""A sharded ``last.pt``: every process writes its own shards with ``torch.distributed.checkpoint`` (DCP).

Layout in the run folder::

    last.pt                       small, ``torch.load(weights_only=True)``: the loop state (epoch, step, RNG
                                  streams per rank, best value, scheduler, running sums, callbacks, config)
                                  and ``"shards"``: a pointer to one folder below and a fingerprint of it
    last.shards/e3-s36-1f2e3d4c/  DCP's files: ``__<rank>_<n>.distcp`` (each rank writes its own) and ``.metadata``

A save is atomic: the shards go into a fresh folder (its name agreed by every rank), DCP's own gather
makes rank 0 write ``.metadata`` only after every rank's files are written, then rank 0 replaces
``last.pt`` (an atomic ``os.replace``) and only after that deletes older shard folders. A crash at any
moment leaves either the new ``last.pt`` and its folder, or the previous ``last.pt`` and its folder; a
folder no ``last.pt`` points to is removed by the next fit (only names trainval writes, see
:func:`remove_stale`).

Reading never executes code from the files: DCP's ``FileSystemReader`` unpickles ``.metadata`` with plain
``pickle.load`` and its default planner reads non-tensor entries with ``torch.load(weights_only=False)``;
here the metadata goes through an unpickler that allows only DCP's metadata classes, non-tensor entries
are read with ``weights_only=True``, every file the metadata names must be one of DCP's shard names inside
the folder, and every file read (``.metadata`` and each shard file) must be a regular file, not a link,
whose SHA-256 is the one ``last.pt`` recorded for it at save time. The hash is checked on the very file
descriptor that is then read, before any of its bytes are used. Cost: rank 0 reads the whole shard folder
once more after each save (to hash it), and every load reads each shard file twice (hash, then data),
both sequential reads. A ``last.pt`` written before the per-file hashes were recorded is still read,
with the checks of its time (the ``.metadata`` hash and each shard file's size); its next save records them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import pickle
import re
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
import torch.distributed as dist

from trainval import distributed
from trainval.checkpoint import check_fits, load_checkpoint, save_checkpoint
from trainval.errors import CheckpointError
from trainval.fsio import fsync_dir, write_failure
from trainval.run import runfolder
from trainval.untrusted import check_regular, open_regular, shown, shown_repr

SHARDS_DIR = "last.shards"
FORMAT = "torch.distributed.checkpoint"
_METADATA = ".metadata"
_VERSION = re.compile(r"^e\d+-s\d+-[0-9a-f]{8}$")  # the folders trainval names (and only these are deleted)
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")  # DCP's data files
_DCP_FILE = re.compile(
    r"^(__\d+_\d+\.distcp|\.metadata(\.tmp)?|__\d+\.metadata(\.tmp)?)$"
)  # every name DCP writes

# A test hook: called on rank 0 with the new shard folder after every shard is written and before last.pt
# points to it. Fault-injection tests set it to die exactly there.
_before_commit_hook: Callable[[str], None] | None = None


def write(
    shards: dict, loop_state: dict | None, out_dir: str, *, background: bool = False, group: Any = None
) -> Callable[[], None]:
    """Start a sharded save of ``last.pt``; returns the call that finishes it (a collective on every rank).

    ``shards``: this rank's ``{"model": ..., "optimizer": ...}`` (DTensors under FSDP); ``loop_state``:
    the rest of last.pt, on rank 0 (``None`` on the others). With ``background``, DCP's ``async_save``
    copies the shards to CPU memory now (training may change the live tensors right after) and the
    returned call waits for the write, on ``group`` (a process group of its own: the training
    collectives keep the default one); without, the returned call does the whole write.
    """
    import torch.distributed.checkpoint as dcp

    _own_root(out_dir, "the shards of last.pt cannot be written", create=True)
    name = f"e{_epoch(loop_state)}-s{_step(loop_state)}-{uuid.uuid4().hex[:8]}"
    name = distributed.broadcast_object(name)  # one folder for every rank (rank 0's name)
    folder = os.path.join(out_dir, SHARDS_DIR, name)
    writer = dcp.FileSystemWriter(folder, sync_files=True, overwrite=False)
    if background:
        try:
            future = dcp.async_save(shards, storage_writer=writer, process_group=group)
        except _dcp_errors() as e:  # staging failed: one clear error
            raise _write_error(folder, e) from None
        assert isinstance(
            future, Future
        )  # FileSystemWriter stages blocking: async_save returns the write's future
        wait: Callable[[], Any] = future.result
    else:

        def wait():
            return dcp.save(shards, storage_writer=writer)

    def finish() -> None:
        try:
            metadata = wait()  # every rank's files are written once rank 0's .metadata is (DCP gathers first)
        except _dcp_errors() as e:
            raise _write_error(folder, e) from None
        fsync_dir(folder)
        if loop_state is not None:  # rank 0
            if _before_commit_hook is not None:
                _before_commit_hook(folder)
            _commit(out_dir, name, metadata, loop_state)

    return finish


def _epoch(state: dict | None) -> int:
    return int((state or {}).get("epoch") or 0)


def _step(state: dict | None) -> int:
    return int(((state or {}).get("loop") or {}).get("global_step") or 0)


def _dcp_errors() -> tuple[type[BaseException], ...]:
    """DCP raises its own CheckpointException, a BaseException (not an Exception) holding each rank's error."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def _cause(e: BaseException) -> str:
    """One line: DCP's CheckpointException carries each rank's own exception; name the first."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = next(iter(sorted(failures.items(), key=lambda item: item[0])))
        return f"rank {rank}: {_cause(inner)}"
    written = write_failure(e) if isinstance(e, (OSError, RuntimeError)) else None
    if written is not None:  # a full disk, a read-only folder: its reason and what to do
        return written.rstrip(".")
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _own_error(e: BaseException) -> CheckpointError | None:
    """The first :class:`CheckpointError` a rank raised inside DCP (which wraps it in its own exception)."""
    if isinstance(e, CheckpointError):
        return e
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for _, (inner, _) in sorted(failures.items(), key=lambda item: item[0]):
            if isinstance(inner, CheckpointError):
                return inner
    return None


def _write_error(folder: str, e: BaseException) -> CheckpointError:
    return CheckpointError(
        f"could not write the shards of last.pt to {folder} ({_cause(e)}). "
        "The previous last.pt, if any, is intact."
    )


def _commit(out_dir: str, name: str, metadata: Any, loop_state: dict) -> None:
    """Rank 0: point last.pt at the complete folder ``name`` (atomic), then delete the folders before it."""
    folder = os.path.join(out_dir, SHARDS_DIR, name)
    files = sorted({info.relative_path for info in metadata.storage_data.values()})
    hashes = {
        f: sha256_file(os.path.join(folder, f), "shard file", follow=False) for f in [_METADATA, *files]
    }
    record = {
        "format": FORMAT,
        "dir": f"{SHARDS_DIR}/{name}",
        "metadata_sha256": hashes[_METADATA],
        "files": {f: os.path.getsize(os.path.join(folder, f)) for f in files},
        "sha256": hashes,
    }  # every file of this save: a file of another save is refused at load
    fsync_dir(os.path.join(out_dir, SHARDS_DIR))
    save_checkpoint({**loop_state, "shards": record}, os.path.join(out_dir, "last.pt"), "last checkpoint")
    remove_stale(out_dir, keep=name)


def sha256_file(path: str, what: str = "file", follow: bool = True) -> str:
    """The SHA-256 (hex) of the regular file at ``path`` (see :func:`untrusted.open_regular`)."""
    with open_regular(path, what, CheckpointError, follow=follow) as f:
        return _sha256(f)


def _sha256(f: Any) -> str:
    """SHA-256 (hex) of an open file from where it stands, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _own_root(out_dir: str, doing: str, create: bool) -> None:
    """``last.shards`` must be the run folder's own folder: a link (out of the run folder) or a file is refused."""
    runfolder.own_subfolder(
        out_dir, SHARDS_DIR, doing, "reads and writes shards", create=create, error=CheckpointError
    )


def remove_stale(out_dir: str, keep: str | None = None) -> None:
    """Delete shard folders that ``last.pt`` does not point to: only trainval's names, only DCP's files.

    ``keep``: the folder to keep (``""``: none, a whole last.pt was just written); without it, the folder
    the current ``last.pt`` points to is kept, and when ``last.pt`` cannot be read nothing is deleted. A folder that holds anything else than DCP's files (a user's file, a
    symbolic link) keeps that and stays.
    """
    root = os.path.join(out_dir, SHARDS_DIR)
    if not os.path.isdir(root) or os.path.islink(root):
        return
    if keep is None:
        last = os.path.join(out_dir, "last.pt")
        if os.path.exists(last):
            try:
                keep = pointed_folder(load_checkpoint(last))
            except CheckpointError:
                return  # cannot tell which folder is live: delete nothing
    for entry in os.scandir(root):
        if entry.name == keep or not _VERSION.match(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        for item in os.scandir(entry.path):
            if _DCP_FILE.match(item.name) and item.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(item.path)
        with contextlib.suppress(OSError):
            os.rmdir(entry.path)  # fails, and keeps the folder, when anything else is left in it


def pointed_folder(state: dict) -> str | None:
    """The shard folder's name that a last.pt points to (``None`` for a whole, unsharded last.pt)."""
    record = state.get("shards")
    if not isinstance(record, dict):
        return None
    return str(record.get("dir", "")).rsplit("/", 1)[-1] or None


# ----------------------------------------------------------------------------------------------
# Reading: verified against last.pt's record, metadata through an allow-list, tensors weights_only


def verify(record: dict, path: str) -> str:
    """The shard folder of the last.pt at ``path``, after checking it is the one last.pt recorded."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} points to shards in a format trainval does not read ({shown_repr(record)})."
        )
    rel = str(record.get("dir", ""))
    parts = rel.split("/")
    if len(parts) != 2 or parts[0] != SHARDS_DIR or not _VERSION.match(parts[1]):
        raise CheckpointError(
            f"{path} points to {_shown_name(rel)}, which is not a shard folder trainval writes "
            f"({SHARDS_DIR}/e<epoch>-s<step>-<id>); refusing to read it."
        )
    run = os.path.dirname(os.path.abspath(path))
    _own_root(run, f"the shards of {path} are refused", create=False)
    folder = os.path.join(run, SHARDS_DIR, parts[1])
    if os.path.islink(folder):
        raise CheckpointError(
            f"the shards of {path} are refused: {folder} is a symbolic link; trainval reads "
            "only the shard folder it wrote there (copy the files, do not link them)."
        )
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"the shards of {path} are missing: no folder {folder} (last.pt and its "
            f"{SHARDS_DIR} folder must be copied together)."
        )
    try:
        sha = sha256_file(os.path.join(folder, _METADATA), "shard metadata", follow=False)
    except CheckpointError as e:
        raise CheckpointError(f"the shards of {path} in {folder} are incomplete or refused: {e}") from None
    if sha != record.get("metadata_sha256"):
        raise CheckpointError(
            f"the shards in {folder} are not the ones {path} recorded (their {_METADATA} "
            "differs): a folder from another run or another save; refusing to mix them."
        )
    files = found if isinstance(found := record.get("files"), dict) else {}
    for name, size in files.items():
        file = os.path.join(folder, str(name))
        if not _SHARD_FILE.match(str(name)):
            raise CheckpointError(
                f"{path} lists {_shown_name(name)}, which is not a shard file name trainval writes."
            )
        if os.path.islink(file):
            raise CheckpointError(
                f"the shards of {path} are refused: {file} is a symbolic link; trainval reads "
                "only the shard files it wrote there (copy the files, do not link them)."
            )
        if not os.path.lexists(file):
            raise CheckpointError(f"the shards of {path} are incomplete: {file} is missing.")
        found = check_regular(file, "shard file", CheckpointError, follow=False).st_size
        if found != size:
            raise CheckpointError(
                f"the shards of {path} are damaged: {file} holds {found} bytes, last.pt recorded {size}."
            )
    return folder


def _shown_name(name: Any) -> str:
    return repr(shown(str(name), limit=80))


def _recorded_hashes(record: dict, path: str) -> dict[str, str] | None:
    """The SHA-256 of every file of the save (``None``: a last.pt written before they were recorded)."""
    hashes = record.get("sha256")
    if hashes is None:
        return None
    if not isinstance(hashes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()
    ):
        raise CheckpointError(
            f"{path} is damaged: its record of the shard files' SHA-256 is not a table of names and hashes."
        )
    return hashes


def load(target: dict, record: dict, path: str) -> None:
    """Fill ``target`` (this rank's ``{"model": ..., "optimizer": ...}``) in place from the shards.

    A collective when a process group is up (each rank reads the pieces its shards need); the model's
    keys and shapes are checked first, with one clear error for another architecture.
    """
    import torch.distributed.checkpoint as dcp

    folder = verify(record, path)
    reader = _safe_reader(folder, record, path)
    metadata = reader.read_metadata()
    _check_model_fits(target.get("model", {}), metadata, path)
    try:
        with _quiet_single_process():
            dcp.load(
                target,
                storage_reader=reader,
                planner=_safe_planner(),
                no_dist=not (dist.is_available() and dist.is_initialized()),
            )
    except _dcp_errors() as e:
        own = _own_error(e)  # a refused file, raised inside DCP's read on some rank
        if own is not None:
            raise own from None
        raise CheckpointError(
            f"{path} cannot be resumed with this model/optimizer: its shards in {folder} do not fit "
            f"({_cause(e)}). Resume with the model and optimizer it was trained with."
        ) from None


def consolidate(record: dict, path: str, prefix: str = "model") -> dict[str, torch.Tensor]:
    """Every tensor under ``prefix`` (``"model"``: the plain, full state_dict), read in this process alone.

    For ``test``/``predict``/``load_model`` with ``ckpt="last"``: the shards of every rank, put together
    on the CPU (no process group needed).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    folder = verify(record, path)
    reader = _safe_reader(folder, record, path)
    metadata = reader.read_metadata()
    head = prefix + "."
    wanted = {
        key[len(head) :]: md
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(head) and isinstance(md, TensorStorageMetadata)
    }
    _check_sizes_fit_files(wanted, folder, path)  # before allocating what the metadata claims
    out = {key: torch.empty(md.size, dtype=md.properties.dtype) for key, md in wanted.items()}
    if not out:
        raise CheckpointError(f"the shards of {path} hold no {prefix!r} tensors.")
    try:
        with _quiet_single_process():
            dcp.load({prefix: out}, storage_reader=reader, planner=_safe_planner(), no_dist=True)
    except _dcp_errors() as e:
        own = _own_error(e)  # a refused file, raised inside DCP's read
        if own is not None:
            raise own from None
        raise CheckpointError(f"cannot read the shards of {path} in {folder} ({_cause(e)}).") from None
    return out


def _check_sizes_fit_files(wanted: dict, folder: str, path: str) -> None:
    """Every stored tensor's data lies in the shard files once, so the full tensors the metadata describes
    cannot hold more bytes than those files: a larger claim is a damaged or crafted folder."""
    try:
        claimed = sum(
            math.prod(md.size) * torch.empty(0, dtype=md.properties.dtype).element_size()
            for md in wanted.values()
        )
    except (TypeError, ValueError, AttributeError, RuntimeError):
        raise CheckpointError(
            f"the shards of {path} in {folder} are damaged: their {_METADATA} describes "
            "tensors that cannot exist."
        ) from None
    stored = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if _SHARD_FILE.match(f))
    if claimed > stored:
        raise CheckpointError(
            f"the shards of {path} in {folder} are damaged: their {_METADATA} describes "
            f"{claimed} bytes of tensors, but the shard files hold {stored}."
        )


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every load in one process; reading alone is what is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check_model_fits(model_target: dict, metadata: Any, path: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {
        key[len("model.") :]: torch.empty(md.size, device="meta")
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
    }
    check_fits({k: v.shape for k, v in model_target.items() if isinstance(v, torch.Tensor)}, saved, path)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as fs
    import torch.distributed.checkpoint.metadata as md

    allowed: dict[tuple[str, str], Any] = {
        (md.__name__, n): getattr(md, n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    }
    allowed[(fs.__name__, "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    for module in ("pathlib", "pathlib._local"):
        for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            allowed[(module, n)] = getattr(pathlib, n)
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` allowing only its own plain classes: nothing else can be imported or called."""

    _allowed: dict | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _MetadataUnpickler._allowed is None:
            _MetadataUnpickler._allowed = _allowed_globals()
        if (module, name) in _MetadataUnpickler._allowed:
            return _MetadataUnpickler._allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in shard metadata")


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class RecordedFiles(FileSystem):
        """DCP's file access for reading, limited to the regular files (not links) of one save whose SHA-256
        ``last.pt`` recorded, checked on the open file before DCP reads a byte of it."""

        def __init__(self, hashes: dict[str, str], complete: bool, checkpoint: str) -> None:
            self.hashes, self.complete, self.checkpoint = hashes, complete, checkpoint

        @contextlib.contextmanager
        def create_stream(self, path: Any, mode: str):
            if mode != "rb":
                raise CheckpointError(
                    f"trainval reads shards, never writes them while reading ({shown(path)})."
                )
            with open_regular(os.fspath(path), "shard file", CheckpointError, follow=False) as f:
                _check_recorded(f, os.fspath(path), self.hashes, self.complete, self.checkpoint)
                yield f

    class SafeReader(FileSystemReader):
        def __init__(self, folder: str, hashes: dict[str, str], complete: bool, checkpoint: str) -> None:
            super().__init__(folder)
            self.fs = RecordedFiles(hashes, complete, checkpoint)

        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            path = os.path.join(self.path, _METADATA)
            with self.fs.create_stream(path, "rb") as f:
                raw = f.read()  # the bytes that were hashed
            try:
                metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
            except (
                pickle.UnpicklingError,
                EOFError,
                AttributeError,
                TypeError,
                ValueError,
                IndexError,
                OSError,
            ) as e:
                raise CheckpointError(f"refusing to read the shard metadata {path}: {e}.") from None
            if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
                raise CheckpointError(f"refusing to read the shard metadata {path}: not DCP metadata.")
            bad = [
                i.relative_path
                for i in metadata.storage_data.values()
                if not _SHARD_FILE.match(str(getattr(i, "relative_path", "")))
            ]
            if bad:
                raise CheckpointError(
                    f"refusing to read the shard metadata {path}: it names files outside its "
                    f"folder or not DCP's ({bad[0]!r})."
                )
            storage_meta = getattr(metadata, "storage_meta", None)
            if storage_meta is None:
                storage_meta = metadata.storage_meta = StorageMeta()
            storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_reader(folder: str, record: dict, path: str) -> Any:
    """DCP's reader for the verified ``folder`` of the last.pt at ``path`` (the classes are built lazily:
    DCP is imported only when shards are read)."""
    hashes = _recorded_hashes(record, path)
    if (
        hashes is None
    ):  # an older last.pt: only its .metadata was hashed (each file's size is checked by verify)
        return _reader_class()(folder, {_METADATA: str(record.get("metadata_sha256"))}, False, path)
    return _reader_class()(folder, hashes, True, path)


def _check_recorded(f: Any, file: str, hashes: dict[str, str], complete: bool, checkpoint: str) -> None:
    """Refuse ``f`` (open at ``file``) unless its SHA-256 is the one recorded for its name; leave it at 0.

    ``complete``: ``hashes`` holds every file of the save (an older last.pt recorded only ``.metadata``'s)."""
    name = os.path.basename(file)
    expected = hashes.get(name)
    if expected is None and not complete:
        return  # an older last.pt recorded no hash of this shard file: verify checked its size
    if expected is None:
        raise CheckpointError(
            f"the shards of {checkpoint} are refused: {shown(file)} is not one of the files "
            "last.pt recorded for this save."
        )
    if _sha256(f) != expected:
        raise CheckpointError(
            f"the shards of {checkpoint} are refused: {shown(file)} is not the file saved with "
            f"it (its SHA-256 differs; a shard file of another save or another run?); refusing "
            "to mix them. Copy last.pt and its last.shards folder together, from one save."
        )
    f.seek(0)


def _safe_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner, except that non-tensor entries load with ``weights_only=True``."""

        def load_bytes(self, read_item, value):
            from torch.distributed.checkpoint._traverse import set_element

            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(
                    f"refusing a shard entry {read_item.dest_index.fqn}: it holds Python "
                    f"objects other than tensors and plain containers ({e})."
                ) from None
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


def async_group() -> Any:
    """A gloo process group for background saves (a collective: every rank calls it once), or None."""
    if dist.is_available() and dist.is_initialized():
        return dist.new_group(backend="gloo")
    return None


def model_weights(state: dict, path: str) -> dict:
    """The plain, full model state_dict of a loaded checkpoint; a sharded last.pt's shards put together."""
    if "model" in state:
        return state["model"]
    return consolidate(state["shards"], path)
