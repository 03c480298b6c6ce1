"""Files written whole or not at all: ``atomic_write`` (temp file, fsync, rename, fsync of the folder).

A write that fails (a full disk, a quota, a read-only file system) leaves the previous file intact and
raises one :class:`~trainval.errors.CheckpointError` that says why and what to do (:func:`write_failure`).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from typing import Any

from trainval.errors import CheckpointError
from trainval.untrusted import check_replaceable, shown


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_current_umask()  # what open() would give; mkstemp's own files are 0600


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform (e.g. Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None], what: str = "file") -> None:
    """Write ``path`` whole or not at all: temp file in the same folder, flush, fsync, ``os.replace``.

    ``write`` receives a binary file object. On any failure the temp file is removed, whatever was at
    ``path`` before is untouched, and a :class:`CheckpointError` names the path and the cause.

    Only a regular file is ever replaced: a symbolic link (``/dev/stdout`` is one), a FIFO, a device, a
    socket or a folder at ``path`` is a :class:`CheckpointError`, checked before writing and again just
    before the rename (``os.replace`` would otherwise put a regular file in its place).
    """
    check_replaceable(path, what, CheckpointError)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(
            dir=folder, prefix=f".trainval-{os.path.basename(path)}.", suffix=".tmp"
        )  # runfolder.remove_own_temp_files deletes only these
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        check_replaceable(path, what, CheckpointError)  # swapped for a link or a FIFO while we wrote?
        os.replace(tmp, path)
        tmp = None
        fsync_dir(folder)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise  # a RuntimeError that is no write failure: a bug, with its traceback
        raise CheckpointError(
            f"could not write {what} {path}: {reason} The previous {os.path.basename(path)}, if any, is intact."
        ) from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


_HINTS = {
    errno.ENOSPC: "Free some disk space.",
    errno.EDQUOT: "Free some space within your disk quota.",
    errno.EACCES: "Check the folder's permissions.",
    errno.EROFS: "The file system is read-only; choose another output folder.",
}


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, as ``"<reason>. <what to do>."``; ``None`` when ``e`` is no write failure.

    An ``OSError`` anywhere in ``e``'s chain gives its errno's reason. ``torch.save`` turns an error of
    the file it writes into its zip writer's ``RuntimeError: [enforce fail at inline_container.cc...]``
    (keeping the ``OSError`` as its context): that is a write failure too, named as such when no errno is left.
    """
    chain: BaseException | None = e
    seen: set[int] = set()
    while chain is not None and id(chain) not in seen:
        if isinstance(chain, OSError):
            reason = os.strerror(chain.errno) if chain.errno else (str(chain) or type(chain).__name__)
            hint = _HINTS.get(chain.errno or 0, "")
            return f"{shown(reason)}.{' ' + hint if hint else ''}"
        seen.add(id(chain))
        chain = chain.__cause__ or chain.__context__
    text = str(e).strip()
    if isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text):
        return (
            f"the file could not be written ({shown(text.splitlines()[0])}); check that the disk has free "
            "space and the folder is writable."
        )
    return None
