"""``summary.json``: a run's record, read and written atomically (see :class:`trainval.loop.summary.RunSummary`).

Every fit writes it through the ``RunSummary`` callback; ``test`` adds its metrics with :func:`record_test`;
``trainval runs`` (:mod:`trainval.app.runs`) reads it. A file that cannot be read is one clear
:class:`~trainval.errors.RunFolderError`, never a traceback.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any

from trainval.errors import RunFolderError
from trainval.fsio import atomic_write
from trainval.run import runfolder
from trainval.untrusted import read_bytes, shown

SUMMARY = "summary.json"
MAX_SUMMARY_BYTES = 4 * 2**20  # a summary.json trainval writes is a few KB


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def plain(value: Any) -> Any:
    """``value`` if it can be written as JSON without loss (numbers, strings, lists, dicts of them), else None."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return items if all(i is not None or v is None for i, v in zip(items, value)) else None
    if isinstance(value, dict):
        out = {str(k): plain(v) for k, v in value.items()}
        return out if all(out[str(k)] is not None or v is None for k, v in value.items()) else None
    return None


def json_kind(value: Any) -> str:
    """What a JSON value is, in words (for a message)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    names: dict[type, str] = {str: "text", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def load_summary(folder: str) -> dict | None:
    """The run's ``summary.json`` as parsed JSON, None when there is none; a :class:`RunFolderError`
    saying what is wrong with one that cannot be read (not a regular file, too big, not JSON)."""
    path = os.path.join(folder, SUMMARY)
    if not os.path.lexists(path):
        return None
    raw = read_bytes(path, SUMMARY, RunFolderError, limit=MAX_SUMMARY_BYTES)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunFolderError(f"{SUMMARY} is not UTF-8 text (an invalid byte at offset {e.start}).") from None
    except ValueError as e:  # JSONDecodeError, or an integer of more than 4300 digits
        raise RunFolderError(f"{SUMMARY} is not valid JSON ({shown(e)}).") from None
    except RecursionError:
        raise RunFolderError(
            f"{SUMMARY} is nested too deeply to read; trainval writes a flat summary."
        ) from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{SUMMARY} holds {json_kind(data)}, not an object.")
    return data


def read_summary(folder: str) -> dict | None:
    """The run's ``summary.json`` as written, or None (no file, or one that cannot be read)."""
    try:
        return load_summary(folder)
    except RunFolderError:
        return None


def write_summary(folder: str, summary: dict) -> None:
    data = (json.dumps(summary, indent=2, default=str) + "\n").encode()
    atomic_write(os.path.join(folder, SUMMARY), lambda f: f.write(data), "summary")


def update_summary(folder: str, **fields: Any) -> dict:
    """Merge ``fields`` into the run's ``summary.json`` (made by :class:`RunSummary`), atomically."""
    summary = read_summary(folder) or {}
    summary.update(fields)
    write_summary(folder, summary)
    return summary


def record_test(folder: str, metrics: dict) -> None:
    """Add test metrics to the run's ``summary.json``, if trainval wrote one there."""
    if runfolder.is_run_folder(folder) and read_summary(folder) is not None:
        update_summary(
            folder, test={k: plain(v) for k, v in metrics.items() if not k.startswith("test_confusion")}
        )
