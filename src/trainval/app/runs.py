"""Runs people can find and compare: ``summary.json``, the runs table (``load_model`` is in :mod:`trainval.app.workflow`).

- Every fit (Python API or CLI) writes ``summary.json`` into its run folder through :class:`RunSummary`,
  a callback the Trainer always adds on rank 0: at the start with ``"status": "running"``, after every
  epoch, and with ``"finished"`` at the end. A run that stopped early (SIGINT/SIGTERM, a kill, an error)
  keeps ``"running"`` in the file; :func:`run_status` tells it apart from a live one by the run
  folder's writer lock, which the kernel releases when its holder dies in any way.
- :func:`find_runs` lists the run folders (those with trainval's marker) below a folder, and
  :func:`format_table` / :func:`plot_runs` show them side by side (``trainval runs``).
- :func:`run_config`, :func:`recorded_sizes` and :func:`checkpoint_path` read what
  :func:`trainval.app.workflow.load_model` needs to rebuild a run's model.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from trainval import extras
from trainval.app import config
from trainval.errors import ConfigError, RunFolderError, TrainvalError
from trainval.fsio import atomic_write
from trainval.run import runfolder
from trainval.run.summary import (
    SUMMARY,
    json_kind,
    load_summary,
    read_summary,
    update_summary,
)
from trainval.untrusted import (
    check_regular,
    check_replaceable,
    open_regular,
    read_bytes,
    read_yaml,
    shown,
    shown_names,
    shown_repr,
)

if TYPE_CHECKING:
    pass

PLOT_SOFTWARE = "trainval runs"  # the PNG metadata that marks a plot `trainval runs --plot` wrote
MAX_METRICS_BYTES = 64 * 2**20  # a metrics.csv row per epoch: a few hundred bytes each
MAX_RUN_DEPTH = 32  # folders below the listed one; a tuning trial is 3 deep (out_dir/name/trials/0000)


# --------------------------------------------------------------------------------------------------
# Listing and comparing runs


def run_status(folder: str, summary: dict | None) -> str:
    """``finished`` (``pruned``: a tuning trial stopped early by the pruner); ``running`` while a trainval
    process holds the folder's lock during a fit; ``interrupted`` for a fit that stopped before its end
    (a signal, a kill or an error)."""
    recorded = (summary or {}).get("status")
    if recorded == "finished":
        return "pruned" if (summary or {}).get("pruned") else "finished"
    if runfolder.is_locked(folder):
        return "running"
    return (
        "interrupted" if recorded == "running" or os.path.exists(os.path.join(folder, "last.pt")) else "empty"
    )


def _finite(value: Any) -> bool:
    """A JSON number (not true/false) that is a finite float (JSON's NaN, Infinity and 1e400 are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def _wrong(key: str, value: Any, expected: str) -> RunFolderError:
    return RunFolderError(
        f'{SUMMARY}: "{shown(key, 40)}" is {json_kind(value)} ({shown_repr(value)}), not {expected}.'
    )


def _summary_field(raw: dict, key: str, expected: str, ok: Callable[[Any], bool]) -> Any:
    value = raw.get(key)
    if value is not None and not ok(value):
        raise _wrong(key, value, expected)
    return value


def _metric_columns(raw: dict, key: str) -> dict:
    """``final``/``test``: an object of columns. A column of one value is kept (a finite number or text;
    a non-finite number reads as null, as trainval writes it); one that holds a list or an object (a
    user's callback may add one to a row) is left out: no table cell or sort takes it."""
    columns = raw.get(key)
    if columns is None:
        return {}
    if not isinstance(columns, dict):
        raise _wrong(key, columns, "an object of metrics")
    out: dict[str, float | int | str | None] = {}
    for name, value in columns.items():
        if isinstance(value, str) or value is None or _finite(value):
            out[name] = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = None
    return out


def summary_record(raw: dict) -> dict:
    """The fields of a run's summary (its ``summary.json``, parsed) that ``trainval runs`` uses, each of
    the type trainval writes: a :class:`RunFolderError` names the first that is not."""
    count = "a whole number of epochs"

    def is_count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    seconds = "a number of seconds"
    record = {
        "status": _summary_field(raw, "status", "text", lambda v: isinstance(v, str)),
        "pruned": _summary_field(raw, "pruned", "true/false", lambda v: isinstance(v, bool)),
        "epochs": _summary_field(raw, "epochs", count, is_count),
        "max_epochs": _summary_field(raw, "max_epochs", count, is_count),
        "monitor": _summary_field(raw, "monitor", "text", lambda v: isinstance(v, str)),
        "mode": _summary_field(raw, "mode", '"min" or "max"', lambda v: v in ("min", "max")),
        "best_value": _summary_field(raw, "best_value", "a finite number", _finite),
        "best_epoch": _summary_field(raw, "best_epoch", "an epoch number", is_count),
        "started": _summary_field(raw, "started", "text", lambda v: isinstance(v, str)),
        # the whole fit (with its test and predictions) when the CLI ran it, else the epochs' time
        "seconds": _summary_field(raw, "wall_seconds", seconds, _finite),
        "test": _metric_columns(raw, "test"),
        "final": _metric_columns(raw, "final"),
    }
    if record["seconds"] is None:
        record["seconds"] = _summary_field(raw, "seconds", seconds, _finite)
    return record


def _load_metrics_csv(folder: str) -> list[dict]:
    """The rows of the run's ``metrics.csv``, each value a float, text or None ([] when there is none);
    a :class:`RunFolderError` saying what is wrong with one that cannot be read."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.lexists(path):
        return []
    raw = read_bytes(path, "metrics.csv", RunFolderError, limit=MAX_METRICS_BYTES)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise RunFolderError(f"metrics.csv is not UTF-8 text (an invalid byte at line {line}).") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        rows = list(reader)
    except csv.Error as e:  # a field over csv's size limit, a stray quote...
        raise RunFolderError(f"metrics.csv line {reader.line_num}: {shown(e)}.") from None
    out = []
    for row in rows:
        parsed: dict[str, float | str | None] = {}
        for k, v in row.items():
            if k is None or not isinstance(v, (str, type(None))):
                continue  # cells beyond the header's columns
            try:
                parsed[k] = float(v) if v not in ("", None) else None
            except ValueError:
                parsed[k] = v
        out.append(parsed)
    return out


def _read_metrics_csv(folder: str) -> list[dict]:
    """The rows of the run's ``metrics.csv``; [] when there is none, or it cannot be read."""
    try:
        return _load_metrics_csv(folder)
    except RunFolderError:
        return []


def _read_run(folder: str) -> dict:
    """:func:`summary_record` of the run's ``summary.json``, or for an older run folder without one,
    of what its ``metrics.csv`` tells; a :class:`RunFolderError` for a folder that cannot be read."""
    check_regular(os.path.join(folder, runfolder.MARKER), f"its marker {runfolder.MARKER}", RunFolderError)
    summary = load_summary(folder)
    if summary is None:
        rows = _load_metrics_csv(folder)
        summary = {"epochs": len(rows), "final": rows[-1] if rows else {}}
    return summary_record(summary)


def describe_run(folder: str, root: str) -> dict:
    """One run as a flat record: the table's columns, and the rest for ``--format json``. A run whose
    files cannot be read has the status ``unreadable`` and a ``problem`` saying why."""
    record: dict[str, Any] = {"name": os.path.relpath(folder, root), "path": folder}
    problem: str | None
    try:
        summary = _read_run(folder)
    except RunFolderError as e:
        summary, problem = summary_record({}), str(e)
        record["status"] = "unreadable"
    else:
        problem = None
        record["status"] = run_status(folder, summary)
    for key in (
        "epochs",
        "max_epochs",
        "monitor",
        "mode",
        "best_value",
        "best_epoch",
        "started",
        "seconds",
        "test",
        "final",
    ):
        record[key] = summary[key]
    if problem is not None:
        record["problem"] = problem
    return record


def find_runs(root: str) -> list[dict]:
    """Every run folder below ``root`` (``root`` itself included; tuning trials too), by name, down to
    :data:`MAX_RUN_DEPTH` folders below it."""
    if not os.path.isdir(root):
        raise ConfigError(f"{root} is not a folder.")
    found = []
    for folder, dirs, files in os.walk(root):
        # os.walk recurses (Python < 3.12): a folder nested a thousand deep would end the listing
        relative = os.path.relpath(folder, root)
        depth = 0 if relative == os.curdir else relative.count(os.sep) + 1
        dirs[:] = (
            [] if depth >= MAX_RUN_DEPTH else sorted(d for d in dirs if d != "tb" and not d.startswith("."))
        )
        if runfolder.MARKER in files:
            found.append(describe_run(folder, root))
    return found


def _sort_value(record: dict, key: str) -> Any:
    if key == "best":
        value = record.get("best_value")
        return None if value is None else (-value if record.get("mode") == "max" else value)
    if key in ("time", "seconds"):
        return record.get("seconds")
    if key in record and not isinstance(record[key], dict):
        return record[key]
    if key.startswith("test_"):
        return record["test"].get(key)
    return record["final"].get(key)


def _sort_key(value: Any) -> tuple:
    """Numbers before text: a column may hold both (``describe_run``'s records hold nothing else)."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def sort_runs(records: list[dict], key: str, reverse: bool = False) -> list[dict]:
    """Sorted by ``key``: ``best`` (each run's best value, best first), ``name``, ``status``, ``epochs``,
    ``time``, or any column of the runs' summaries (``test_acc``, ``val_loss``...); runs without it last."""
    if not any(_sort_value(r, key) is not None for r in records) and records:
        columns = sorted(
            {
                "best",
                "name",
                "status",
                "epochs",
                "time",
                *(k for r in records for k in r["test"]),
                *(k for r in records for k in r["final"]),
            }
        )
        raise ConfigError(f"--sort {key}: no run has that column; choose one of {shown_names(columns)}.")
    present = [r for r in records if _sort_value(r, key) is not None]
    missing = [r for r in records if _sort_value(r, key) is None]
    present.sort(key=lambda r: _sort_key(_sort_value(r, key)), reverse=reverse)
    return present + missing


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes}m{s:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def format_table(records: list[dict]) -> str:
    """Aligned text: run, status, epochs, monitor, best value and epoch, test metrics, time; below it, why
    each unreadable run is. Every cell is :func:`~trainval.untrusted.shown` (names and values come from
    folders and files: no escape sequence reaches the terminal, no cell is longer than a line)."""
    header = ["run", "status", "epochs", "monitor", "best", "at", "test", "time"]
    lines = [header]
    for r in records:
        epochs = _fmt(r["epochs"]) + (f"/{r['max_epochs']}" if r.get("max_epochs") else "")
        test = " ".join(f"{k.removeprefix('test_')}={_fmt(v)}" for k, v in r["test"].items()) or "-"
        cells = [
            r["name"],
            r["status"],
            epochs,
            _fmt(r["monitor"]),
            _fmt(r["best_value"]),
            _fmt(r["best_epoch"]),
            test,
            _fmt_seconds(r["seconds"]),
        ]
        lines.append([shown(c) for c in cells])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    table = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    table += [f"{shown(r['name'])}: unreadable: {shown(r['problem'])}" for r in records if r.get("problem")]
    return "\n".join(table)


def _written_by_runs_plot(path: str) -> bool:
    try:
        with open_regular(path, "--plot", follow=False) as f:  # a FIFO never blocks it
            return PLOT_SOFTWARE.encode() in f.read(4096)
    except (TrainvalError, OSError):
        return False


def plot_runs(records: list[dict], path: str) -> str:
    """Every run's validation curves in one PNG: a panel per monitored column (and val_loss), a line per run,
    its best epoch marked. Refuses to replace a file that an earlier ``plot_runs`` did not write."""
    if os.path.isdir(path):
        raise ConfigError(
            f"--plot {path} is a folder; give a file name such as {os.path.join(path, 'runs.png')}."
        )
    if check_replaceable(
        path, "--plot", ConfigError, hint="give the path of a regular file"
    ) is not None and not _written_by_runs_plot(path):
        raise ConfigError(
            f"--plot {path} exists and was not written by `trainval runs --plot`; choose another file."
        )
    curves = [(r, _read_metrics_csv(r["path"])) for r in records]
    curves = [(r, rows) for r, rows in curves if rows]
    if not curves:
        raise ConfigError("no run below that folder has a metrics.csv to plot.")
    panels: list[str] = []
    for r, rows in curves:
        for column in (r.get("monitor"), "val_loss"):
            if column and column not in panels and any(row.get(column) is not None for row in rows):
                panels.append(column)
    matplotlib = extras.require("matplotlib", "trainval runs --plot")
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, column in zip(axes.flat, panels):
        for r, rows in curves:
            points = [(row["epoch"], row[column]) for row in rows if isinstance(row.get(column), float)]
            if not points:
                continue
            (line,) = ax.plot(*zip(*points), marker="o", ms=2, label=r["name"])
            best = r.get("best_epoch")
            if column == r.get("monitor") and best is not None:
                at = [v for e, v in points if e == best]
                if at:
                    ax.plot([best], at, marker="*", ms=12, color=line.get_color())
        ax.set_title(
            column
            + (" (* best epoch)" if any(c == column for c in (r.get("monitor") for r, _ in curves)) else "")
        )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": PLOT_SOFTWARE})
    plt.close(fig)
    data = buf.getvalue()
    atomic_write(path, lambda f: f.write(data), "runs plot")
    return path


def report(
    folder: str, sort: str | None = None, reverse: bool = False, fmt: str = "table", plot: str | None = None
) -> str:
    """``trainval runs``: the runs below ``folder`` as a table or JSON; with ``plot`` ('' for
    ``FOLDER/runs.png``), their validation curves in one PNG too."""
    records = find_runs(folder)
    if sort:
        records = sort_runs(records, sort, reverse)
    elif reverse:
        records = records[::-1]
    lines = []
    if fmt == "json":
        # ensure_ascii: every control character of a name or value is written as \u001b..., none raw
        lines.append(json.dumps(records, indent=2, default=str, ensure_ascii=True))
    else:
        lines.append(format_table(records) if records else f"no runs below {shown(folder)}")
    if plot is not None:
        path = plot_runs(records, plot or os.path.join(folder, "runs.png"))
        if fmt != "json":
            lines.append(f"wrote {path}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Reloading a run


def recorded_config(folder: str) -> dict | None:
    """The run folder's ``config.yaml`` as written by fit (with its ``resolved`` sizes), or None."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.lexists(path):
        return None
    data = read_yaml(path, "the run's config")
    return data if isinstance(data, dict) else None


def run_config(folder: str, overrides: Sequence[str] = ()) -> dict:
    """The config a run was trained with (its ``config.yaml``), placed where the folder is now, with overrides.

    What the run recorded beyond the schema (``resolved``, ``versions``) is left out; the data it was
    trained on need not exist any more for ``test``/``predict`` with ``data.test=...``.
    """
    recorded = recorded_config(folder)
    if recorded is None:
        raise ConfigError(
            f"{folder} has no config.yaml (a run of the Python API, or not a run folder); "
            "give the config file the run was trained with."
        )
    cfg = config.defaults()
    config.merge(
        cfg, {s: v for s, v in recorded.items() if s in config.SCHEMA}, os.path.join(folder, "config.yaml")
    )
    folder = os.path.normpath(folder)
    cfg["run"]["out_dir"], cfg["run"]["name"] = os.path.dirname(folder) or ".", os.path.basename(folder)
    config.apply_overrides(cfg, overrides)
    return config.validate(cfg, os.path.join(folder, "config.yaml"))


def recorded_sizes(folder: str) -> dict | None:
    """``{"in_shape", "num_outputs", "task"}`` (and, for CSV data, ``features``) that fit recorded in the run's
    config.yaml (plain data), or None."""
    resolved = (recorded_config(folder) or {}).get("resolved")
    if (
        isinstance(resolved, dict)
        and resolved.get("in_shape") is not None
        and resolved.get("num_outputs") is not None
    ):
        return resolved
    return None


def checkpoint_path(folder: str, ckpt: str | None) -> str:
    name = ckpt or "best"  # a role (best, last) or a path
    return {"best": os.path.join(folder, "best.pt"), "last": os.path.join(folder, "last.pt")}.get(name, name)


__all__ = [
    "find_runs",
    "format_table",
    "plot_runs",
    "read_summary",
    "run_config",
    "sort_runs",
    "update_summary",
]
