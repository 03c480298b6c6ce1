"""``trainval lint PATH...``: arguments, file walking, configuration, output and exit codes.

Exit codes: 1 when findings at error level exist; 2 on usage or configuration errors, and for files
that cannot be read, parsed or analysed (each named on one line; the other files are still checked);
0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import errno
import fnmatch
import io
import json
import os
import re
import stat
import sys
import tokenize
import warnings

from trainval.errors import TrainvalError
from trainval.untrusted import read_bytes, shown, shown_line, shown_repr

DEFAULT_EXCLUDES = [
    ".venv",
    "venv",
    ".env",
    "env",
    "build",
    "dist",
    ".git",
    "__pycache__",
    ".tox",
    ".nox",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "node_modules",
    "site-packages",
    "*.egg-info",
]
NOQA = re.compile(r"#\s*noqa(?::\s*(?P<codes>[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*))?", re.I)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="PATH", help="Python files or folders (folders are walked)")
    p.add_argument(
        "--explain", metavar="CODE", default=None, help="print a rule's rationale, examples and fix"
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument(
        "--select", default=None, help="comma-separated codes to check (default: all enabled rules)"
    )
    p.add_argument("--ignore", default=None, help="comma-separated codes to skip")
    p.add_argument(
        "--exclude", action="append", default=[], help="glob of files/folders to skip (repeatable)"
    )
    p.epilog = (
        "rules: " + ", ".join(_rule_codes()) + ". Configure in pyproject.toml under [tool.trainval.lint]."
    )


def _rule_codes() -> list[str]:
    from trainval.lint.rules import RULES

    return list(RULES)


CONFIG_KEYS = ("select", "ignore", "exclude")


def _strings(value, source: str) -> list[str]:
    """A list of strings, or one comma-separated string: anything else is a configuration error."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ValueError(
        f"{source} must be a list of strings or one comma-separated string, not {shown_repr(value)}"
    )


def _codes(value, source: str) -> set[str]:
    from trainval.lint.rules import RULES

    codes = {c.upper() for c in _strings(value, source)}
    unknown = sorted(c for c in codes if c not in RULES)
    if unknown:
        raise ValueError(
            f"{source}: unknown rule code(s) {shown(', '.join(unknown))} (rules: {', '.join(RULES)})"
        )
    return codes


def load_pyproject(start: str) -> tuple[dict, str | None]:
    """``[tool.trainval.lint]`` of the nearest ``pyproject.toml`` above ``start`` (a ValueError naming the file
    when it cannot be read or does not have the expected shape)."""
    folder = os.path.abspath(start if os.path.isdir(start) else os.path.dirname(start) or ".")
    while True:
        path = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(path):
            if sys.version_info >= (3, 11):
                import tomllib

                return _lint_table(path, tomllib), path
            return {}, None  # Python 3.10: no tomllib
        parent = os.path.dirname(folder)
        if parent == folder:
            return {}, None
        folder = parent


def _lint_table(path: str, tomllib) -> dict:
    from trainval.errors import TrainvalError
    from trainval.untrusted import read_bytes

    where = shown(path)
    try:
        data = tomllib.loads(read_bytes(path, "pyproject.toml", limit=16 * 2**20).decode("utf-8"))
    except TrainvalError as e:
        raise ValueError(str(e).rstrip(".")) from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where}: not UTF-8 text (an invalid byte at offset {e.start}); save it as UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{where}: not valid TOML ({shown(e)})") from None
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read as TOML") from None
    table, name = data, ""
    for key in ("tool", "trainval", "lint"):
        name = f"{name}.{key}" if name else key
        table = table.get(key, {})
        if not isinstance(table, dict):
            raise ValueError(f"{where}: [{name}] must be a table, not {shown_repr(table)}")
    unknown = sorted(set(table) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(
            f"{where}: [tool.trainval.lint] has unknown key(s) {shown(', '.join(unknown))} "
            f"(keys: {', '.join(CONFIG_KEYS)})"
        )
    return table


def iter_files(paths: list[str], excludes: list[str]) -> tuple[list[str], list[str]]:
    files, missing = [], []

    def excluded(path: str) -> bool:
        parts = os.path.normpath(path).split(os.sep)
        return any(fnmatch.fnmatch(part, pat) for part in parts for pat in excludes) or any(
            fnmatch.fnmatch(path, pat) for pat in excludes
        )

    for p in paths:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not excluded(os.path.join(root, d)) and not excluded(d))
                files += [
                    os.path.join(root, n)
                    for n in sorted(names)
                    if n.endswith(".py")
                    and not excluded(os.path.join(root, n))
                    and _regular(os.path.join(root, n))
                ]
        elif os.path.exists(p):
            files.append(p)  # named explicitly: always checked (read_source refuses a FIFO or device)
        else:
            missing.append(f"{shown(p)}: {_why_missing(p)}")
    return files, missing


def _why_missing(path: str) -> str:
    """Why ``os.path.exists(path)`` is false: a symbolic link loop, a link to nothing, or nothing there."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (the link leads back to itself); point it at a file or folder"
        if os.path.islink(path):
            try:
                target = f" ({shown(os.readlink(path))})"
            except OSError:
                target = ""
            return f"a symbolic link to a file or folder that does not exist{target}"
        if not isinstance(e, FileNotFoundError):
            return f"cannot be read ({shown(e.strerror or e)})"
    return "no such file or folder"


def _regular(path: str) -> bool:
    """A regular file (following links): a FIFO named ``x.py`` would block the reader forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_source(path: str) -> str:
    """A file's text decoded as Python does: a coding cookie or a BOM, else UTF-8."""
    try:  # a FIFO named x.py would block a plain open forever
        data = read_bytes(path, "source file")
    except TrainvalError as e:
        raise OSError(str(e)) from None
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    return data.decode(encoding)


def lint_source(source: str, path: str = "<string>", enabled: set[str] | None = None) -> list:
    """Findings for one file's source text (raises SyntaxError when it does not parse)."""
    from trainval.lint.analysis import FileInfo
    from trainval.lint.rules import RULES, Finding, check

    enabled = enabled if enabled is not None else {c for c, r in RULES.items() if r.default}
    try:
        with warnings.catch_warnings():  # the user's invalid escape sequences are not ours to report
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=path)
    except ValueError as e:  # null bytes (Python 3.11)
        raise SyntaxError(str(e)) from None
    info = FileInfo(tree, source)
    lines = source.splitlines()
    found: dict[tuple, Finding] = {}
    for line, col, code, message in check(info):
        if code not in enabled:
            continue
        text_line = lines[line - 1] if 0 < line <= len(lines) else ""
        m = NOQA.search(text_line)
        if m and (
            m.group("codes") is None or code in {c.strip().upper() for c in m.group("codes").split(",")}
        ):
            continue
        found.setdefault((line, col, code), Finding(path, line, col, code, message))
    return sorted(found.values(), key=lambda f: (f.line, f.col, f.code))


def explain(code: str) -> int:
    from trainval.lint.rules import RULES

    rule = RULES.get(code.strip().upper())
    if rule is None:
        _error(f"--explain: unknown rule code {shown(code)} (rules: {', '.join(RULES)})")
        return 2
    print(rule.explain())
    return 0


def _error(message: str) -> None:
    """One line on stderr, terminal-safe (it may quote a file's name or text read from a file)."""
    print(shown_line(f"trainval lint: error: {message}"), file=sys.stderr)


def run(args) -> int:
    from trainval.lint.rules import RULES

    if args.explain is not None:
        return explain(args.explain)
    if not args.paths:
        _error("give at least one PATH (or --explain CODE)")
        return 2
    try:
        config, config_path = load_pyproject(args.paths[0])
        config_path = shown(config_path)
        select = _codes(args.select, "--select") or _codes(config.get("select"), f"{config_path}: select")
        ignore = _codes(args.ignore, "--ignore") | _codes(config.get("ignore"), f"{config_path}: ignore")
        excludes = (
            DEFAULT_EXCLUDES + _strings(config.get("exclude"), f"{config_path}: exclude") + args.exclude
        )
    except ValueError as e:
        _error(str(e))
        return 2
    enabled = (select or {c for c, r in RULES.items() if r.default}) - ignore
    files, missing = iter_files(args.paths, excludes)
    status = 0
    for why in missing:
        _error(why)
        status = 2
    findings, broken = [], []
    for path in files:
        try:
            source = read_source(path)
        except SyntaxError as e:  # a malformed coding cookie
            broken.append(
                {
                    "path": path,
                    "line": e.lineno or 0,
                    "col": e.offset or 0,
                    "message": f"cannot read: {e.msg}",
                }
            )
            continue
        except (UnicodeDecodeError, LookupError, OSError) as e:
            broken.append({"path": path, "line": 0, "col": 0, "message": f"cannot read: {e}"})
            continue
        try:
            findings += lint_source(source, path, enabled)
        except SyntaxError as e:
            broken.append(
                {
                    "path": path,
                    "line": e.lineno or 0,
                    "col": e.offset or 0,
                    "message": f"cannot parse: {e.msg}",
                }
            )
        except (RecursionError, MemoryError) as e:
            broken.append(
                {
                    "path": path,
                    "line": 0,
                    "col": 0,
                    "message": f"cannot analyse: the code nests too deeply or is too large ({type(e).__name__})",
                }
            )
        except Exception as e:  # noqa: BLE001 - one file's analysis bug must not hide the other files' findings
            broken.append(
                {
                    "path": path,
                    "line": 0,
                    "col": 0,
                    "message": f"internal error: {type(e).__name__}: {e} (please report this file)",
                }
            )
    if args.format == "json":
        print(
            json.dumps(
                {
                    "findings": [
                        dict(
                            path=f.path, line=f.line, col=f.col, code=f.code, level=f.level, message=f.message
                        )
                        for f in findings
                    ],
                    "errors": broken,
                },
                indent=2,
            )
        )
    else:
        for f in findings:  # a file's name (and a message quoting the code) may hold terminal escapes
            print(shown_line(f"{f.path}:{f.line}:{f.col}: {f.code} {f.message}"))
        for b in broken:
            _error(f"{b['path']}:{b['line']}:{b['col']}: {b['message']}")
    if broken or status:
        return 2
    return 1 if any(f.level == "error" for f in findings) else 0
