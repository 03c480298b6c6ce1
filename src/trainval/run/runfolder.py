"""What trainval owns on disk: run folders it made, files it wrote, its temp files, and one writer.

- A folder is a run folder only if trainval made it: it holds the marker file ``.trainval-run``.
  ``fit`` writes into a folder without the marker only when the folder holds none of the names a
  run writes (so a user's ``config.yaml`` or ``summary.json`` is never replaced), and then marks it.
- One writer per run folder: an exclusive ``flock`` on the folder itself, held by ``fit`` (rank 0
  under torchrun), ``test`` and ``predict`` into the folder. The kernel releases it when the holder
  exits in any way, SIGKILL included, so a dead holder never blocks the next run. The holder's pid is
  recorded in the marker so that a refused writer can name it.
- Temp files: :func:`~trainval.checkpoint.atomic_write` names its temp files ``.trainval-*.tmp``;
  a fit deletes only those (after taking the lock, so never a live writer's), never a user's ``.*.tmp``.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import stat
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

from trainval import launch
from trainval.errors import ConfigError, RunFolderError, TrainvalError
from trainval.fsio import atomic_write
from trainval.untrusted import check_replaceable, open_regular, read_bytes, shown

_Method = TypeVar("_Method", bound=Callable[..., Any])

MARKER = ".trainval-run"
STDOUT = "-"  # `predict --out -`: the predictions CSV goes to standard output (a file named '-' is ./-)
TEMP_PREFIX = ".trainval-"
# mkstemp's names: prefix + 8 characters from [a-z0-9_] + suffix.
_OWN_TEMP = re.compile(r"^\.trainval-.+\.[a-z0-9_]{8}\.tmp$")
# Every name a fit may write into its run folder (the Trainer's and the CLI workflow's).
RUN_FILES = (
    "best.pt",
    "last.pt",
    "last.shards",
    "config.yaml",
    "metrics.csv",
    "curves.png",
    "summary.json",
    "predictions.csv",
    "predictions.npy",
    "confusion_matrix.csv",
    "test.json",
    "tb",
    "standardize.json",
    "trials",
    "study.db",
    "best.yaml",
    "wandb",
)

_held: dict[str, list] = {}  # realpath -> [fd, depth]: the lock is re-entrant within one process


def is_run_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _holder_pid(folder: str) -> int | None:
    """The pid the marker records (the writer lock's last holder), or None: no marker, one that is not a
    regular file (a FIFO never blocks this), or one that does not hold the pid trainval writes."""
    try:
        raw = read_bytes(os.path.join(folder, MARKER), f"the marker {MARKER}", RunFolderError, limit=4096)
        pid = json.loads(raw.decode("utf-8")).get("pid")
    except (TrainvalError, ValueError, AttributeError, RecursionError):
        return None
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
        return None  # never 0 or -1 (os.kill would probe a process group, or every process)
    return pid


def process_alive(pid: object) -> bool:
    """Whether ``pid`` names a running process on this machine (another user's counts). Anything but a
    positive 32-bit int names none: never 0 or -1, which ``os.kill`` would read as a process group or as every
    process."""
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid < 2**31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_marker(folder: str) -> None:
    data = (json.dumps({"made_by": "trainval", "pid": os.getpid()}) + "\n").encode()
    atomic_write(os.path.join(folder, MARKER), lambda f: f.write(data), "run-folder marker")


def make_folder(folder: str) -> None:
    """``os.makedirs`` with one clear error for a path that is a file, read-only, or a dangling link."""
    if os.path.islink(folder) and not os.path.exists(folder):
        raise ConfigError(
            f"the run folder {folder} is a symbolic link to {os.readlink(folder)}, which does not "
            "exist; remove the link or choose another run.out_dir/run.name."
        )
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(
            f"the run folder {folder} is a file, not a folder; choose another run.out_dir/run.name."
        )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            reason = "a part of that path is a file"
        raise ConfigError(
            f"cannot create the run folder {folder}: {reason}; choose another run.out_dir/run.name."
        ) from None


def own_subfolder(
    folder: str,
    name: str,
    doing: str,
    keeps: str,
    *,
    create: bool = True,
    error: type[TrainvalError] = RunFolderError,
) -> str | None:
    """The run folder's own subfolder ``folder/name`` (``tb``, ``last.shards``), made when missing (``create``).

    A symbolic link there (dangling or not) would lead trainval's reads and writes out of the run folder,
    and anything else than a folder cannot hold files: each is one ``error`` that names it, after ``doing``
    ("cannot log to TensorBoard"); ``keeps`` says what the folder is for ("writes TensorBoard's event
    files"). Returns the path, or None when it is missing and ``create`` is false.
    """
    path = os.path.join(folder, name)
    for _ in range(2):  # a second look when another process made it between the lstat and the mkdir
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
        if stat.S_ISLNK(mode):
            raise error(
                f"{doing}: {shown(path)} is a symbolic link; trainval {keeps} only in the run folder's own "
                f"{name} folder (move the folder there, do not link it)."
            )
        if not stat.S_ISDIR(mode):
            raise error(
                f"{doing}: {shown(path)} is not a folder; trainval {keeps} only in the run folder's own "
                f"{name} folder: move or remove that file."
            )
        return path
    raise error(f"{doing}: {shown(path)} keeps changing; make sure no other program writes there.")


@contextlib.contextmanager
def locked(folder: str, command: str, create: bool = True) -> Iterator[None]:
    """Hold the run folder's writer lock for the block (re-entrant within this process).

    ``create``: make the folder if missing (fit); otherwise a missing folder is simply not locked.
    """
    made = create and not os.path.lexists(folder)
    if create:
        make_folder(folder)
    elif not os.path.isdir(folder):
        yield
        return
    key = os.path.realpath(folder)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise RunFolderError(
            f"cannot open the run folder {shown(folder)} to lock it: {e.strerror or e}; "
            "check its permissions, or choose another run.out_dir/run.name."
        ) from None
    try:
        _flock_exclusive(fd)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            # ENOLCK (NFS without a lock daemon), EBADF, EINVAL...: this file system does not lock
            name = errno.errorcode.get(e.errno or 0, str(e.errno))
            raise RunFolderError(
                f"cannot lock the run folder {shown(folder)} ({name}: {e.strerror or e}): file locks do not work "
                "on its file system, and trainval keeps one writer per run folder with them; put the run folder "
                "on a local disk or a file system with working locks (run.out_dir)."
            ) from None
        pid = _holder_pid(folder)
        raise RunFolderError(
            f"{folder} is in use by another trainval process"
            f"{f' (pid {pid})' if pid else ''}; wait for it to finish, or use another "
            f"run folder for this {command}."
        ) from None
    _held[key] = [fd, 1]
    try:
        if is_run_folder(folder) or not os.listdir(folder):
            _write_marker(folder)  # records the holder's pid; marks a folder this process made
        yield
    except BaseException:
        if made:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                if os.listdir(folder) == [MARKER]:
                    os.unlink(os.path.join(folder, MARKER))
                    os.rmdir(folder)
        raise
    finally:
        del _held[key]
        os.close(fd)  # releases the lock


def _flock_exclusive(fd: int, patience: float = 1.0) -> None:
    """The writer lock, without blocking on a writer; ``is_locked``'s probes (an instant's shared lock,
    e.g. ``trainval runs`` listing the folder) are waited out for up to ``patience`` seconds."""
    import fcntl

    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def is_locked(folder: str) -> bool:
    """Whether a live trainval process holds the folder's writer lock (fit, test or predict).

    Only a folder whose marker names a live process is probed, and the probe is a shared lock held for
    an instant, so that listing runs practically never gets in a starting fit's way.
    """
    pid = _holder_pid(folder)
    if pid is None:
        return False
    if pid != os.getpid() and not process_alive(pid):
        return False
    import fcntl

    try:  # a folder swapped for a FIFO since it was listed: refused at once, not waited on
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def is_main_process() -> bool:
    """Rank 0 of several processes, or the only one (``WORLD_SIZE`` 1 or unset, whatever ``RANK`` says):
    the process that holds run-folder locks (asked before any process group exists)."""
    return launch.read().is_main


def holds_run_folder(method: _Method) -> _Method:
    """Decorates ``Trainer.fit``: rank 0 holds ``self.out_dir``'s writer lock for the whole call. The
    decorated method keeps its signature, for users' type checkers too."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_main_process():
            return method(self, *args, **kwargs)
        with locked(self.out_dir, "fit"):
            return method(self, *args, **kwargs)

    return cast(_Method, wrapper)


def claim(folder: str, resume: bool) -> None:
    """Refuse to fit into a folder trainval did not make when that would replace the user's files."""
    if is_run_folder(folder):
        return
    present = [name for name in RUN_FILES if os.path.lexists(os.path.join(folder, name))]
    if present:
        raise RunFolderError(
            f"{folder} was not made by trainval (it has no {MARKER} marker) and holds {', '.join(present)}, "
            f"which {'resuming' if resume else 'fit'} would overwrite; choose another run folder "
            f"(run.out_dir/run.name). A run folder of an older trainval can be adopted with "
            f"`touch {os.path.join(folder, MARKER)}`."
        )
    _write_marker(folder)


def remove_own_temp_files(folder: str) -> None:
    """Delete temp files that trainval's own atomic writes left behind when killed (no others)."""
    for entry in os.listdir(folder):
        if _OWN_TEMP.match(entry):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def check_run_name(name: str, source: str = "run.name") -> None:
    """``run.name`` is one folder name inside ``run.out_dir``: no separators, no '..', not absolute."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(s in name for s in seps) or os.path.isabs(name) or "\0" in name:
        raise ConfigError(
            f"{source}: run.name must be a plain folder name inside run.out_dir (no '/', no '..', "
            f"not absolute), got {name!r}; put the parent folders in run.out_dir."
        )


def _is_checkpoint(path: str) -> bool:
    try:
        with open_regular(path, "--out", follow=False) as f, zipfile.ZipFile(f) as archive:
            return any(n.endswith("/data.pkl") or n == "data.pkl" for n in archive.namelist())
    except (TrainvalError, zipfile.BadZipFile, OSError, ValueError):
        return False


def predictions_header(path: str) -> list[str] | None:
    """The header of the CSV at ``path`` when its first column is ``Id`` (as in every predictions file
    trainval writes), else None (also when ``path`` is not a regular file: it is never opened then)."""
    try:
        with open_regular(path, "predictions file", follow=False, text=True, encoding="utf-8") as f:
            header = f.readline(4096).rstrip("\r\n").split(",")
    except (TrainvalError, OSError, UnicodeDecodeError):
        return None
    return header if header[:1] == ["Id"] else None


def _is_predictions_file(path: str, target_names: list[str] | tuple = ()) -> bool:
    """Whether ``path`` has the header of one of ``workflow.write_predictions``' layouts: ``Id,Class`` or
    ``Id,label_<k>...`` (each maybe followed by ``prob_<k>`` columns), ``Id,Array`` (dense outputs, in a
    ``.npy`` beside it) or regression's ``Id,<target names>`` (this run's ``target_names``, or the defaults).
    """
    header = predictions_header(path)
    if header is None:
        return False
    rest = header[1:]
    labels = 0
    while labels < len(rest) and rest[labels] == f"label_{labels}":
        labels += 1
    probs = rest[1:] if rest[:1] in (["Class"], ["Array"]) else rest[labels:] if labels else None
    if probs is not None:
        return all(h.startswith("prob_") for h in probs)
    return bool(rest) and (
        rest == list(target_names) or rest == ["Target"] or rest == [f"target_{k}" for k in range(len(rest))]
    )


def check_output(
    out: str, protected: dict[str, str], force: bool, target_names: list[str] | tuple = ()
) -> None:
    """Refuse a ``predict --out`` that is a checkpoint or an input of the run, anything but a regular file
    (a symbolic link, a FIFO, a device: even with ``force``), or (without ``force``) an existing file that
    is not a predictions file trainval wrote. ``--out -`` (:data:`STDOUT`) is standard output: nothing to check.

    ``protected`` maps paths (checkpoints, data files, the config) to what they are; ``target_names``
    are the column names a regression run writes.
    """
    if out == STDOUT:
        return
    real = os.path.realpath(out)
    for path, what in protected.items():
        if path and os.path.realpath(path) == real:
            raise ConfigError(f"--out {shown(out)} is {what}; predictions must go to another file.")
    if os.path.isdir(out) and not os.path.islink(out):
        raise ConfigError(
            f"--out {shown(out)} is a folder; give a file name such as {shown(os.path.join(out, 'predictions.csv'))}."
        )
    # /dev/stdout is a link to a pipe, a terminal or a file: replacing it (as root) or reading it (a pipe) is wrong
    if (
        check_replaceable(
            out,
            "--out",
            ConfigError,
            hint="give the path of a regular file, or `--out -` to write the predictions to standard output",
        )
        is None
    ):
        return
    if _is_checkpoint(out):
        raise ConfigError(f"--out {shown(out)} is a PyTorch checkpoint; predictions must go to another file.")
    if not force and not _is_predictions_file(out, target_names):
        raise ConfigError(
            f"--out {shown(out)} exists and is not a predictions file trainval wrote; choose another file, "
            "or pass --force to replace it."
        )


def check_shared(folder: str, rank: int) -> None:
    """Refuse a run folder that not every process sees (several processes; a collective).

    Rank 0 writes a marker with a fresh name into ``folder``; every rank looks for it. Checkpoints are
    written by rank 0 and read by all (resume, ``test`` after ``fit``), so the run folder must be on a
    file system every node mounts (NFS, Lustre, ...), or a run fails late, or resumes from a stale file.
    """
    import socket
    import uuid

    from trainval import distributed

    token = distributed.broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    marker = os.path.join(folder, f"{TEMP_PREFIX}shared-{token}")
    if rank == 0:
        with open(marker, "w"):
            pass
    distributed.barrier()
    seen = distributed.all_gather_objects((socket.gethostname(), os.path.isfile(marker)))
    if rank == 0:
        os.unlink(marker)
    blind = [f"rank {r} (host {host})" for r, (host, ok) in enumerate(seen) if not ok]
    if blind:
        raise RunFolderError(
            f"the run folder {folder} is not shared by every process: {', '.join(blind)} cannot see "
            f"the file rank 0 (host {seen[0][0]}) wrote there. Put the run folder on a file system "
            "every node mounts (NFS, Lustre, ...)."
        )
