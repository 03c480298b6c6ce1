"""``trainval lint PATH...``: arguments, file walking, configuration, output and exit codes.

Exit codes: 1 when findings at error level exist, 2 on usage errors or files that cannot be parsed
(named, with the position of the syntax error; the other files are still checked), 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import os
import re
import sys

DEFAULT_EXCLUDES = [".venv", "venv", ".env", "env", "build", "dist", ".git", "__pycache__", ".tox", ".nox",
                    ".mypy_cache", ".ruff_cache", ".pytest_cache", "node_modules", "site-packages", "*.egg-info"]
NOQA = re.compile(r"#\s*noqa(?::\s*(?P<codes>[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*))?", re.I)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help="Python files or folders (folders are walked)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--select", default=None, help="comma-separated codes to check (default: all enabled rules)")
    p.add_argument("--ignore", default=None, help="comma-separated codes to skip")
    p.add_argument("--exclude", action="append", default=[], help="glob of files/folders to skip (repeatable)")
    p.epilog = "rules: " + ", ".join(_rule_codes()) + ". Configure in pyproject.toml under [tool.trainval.lint]."


def _rule_codes() -> list[str]:
    from trainval.lint.rules import RULES

    return list(RULES)


def _codes(value, source: str) -> set[str]:
    from trainval.lint.rules import RULES

    if value is None:
        return set()
    items = value if isinstance(value, list) else str(value).split(",")
    codes = {c.strip().upper() for c in items if c.strip()}
    unknown = sorted(c for c in codes if c not in RULES)
    if unknown:
        raise ValueError(f"{source}: unknown rule code(s) {', '.join(unknown)} (rules: {', '.join(RULES)})")
    return codes


def load_pyproject(start: str) -> tuple[dict, str | None]:
    folder = os.path.abspath(start if os.path.isdir(start) else os.path.dirname(start) or ".")
    while True:
        path = os.path.join(folder, "pyproject.toml")
        if os.path.isfile(path):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                return {}, None
            with open(path, "rb") as f:
                try:
                    data = tomllib.load(f)
                except tomllib.TOMLDecodeError as e:
                    raise ValueError(f"{path}: not valid TOML ({e})") from None
            return data.get("tool", {}).get("trainval", {}).get("lint", {}), path
        parent = os.path.dirname(folder)
        if parent == folder:
            return {}, None
        folder = parent


def iter_files(paths: list[str], excludes: list[str]) -> tuple[list[str], list[str]]:
    files, missing = [], []

    def excluded(path: str) -> bool:
        parts = os.path.normpath(path).split(os.sep)
        return any(fnmatch.fnmatch(part, pat) for part in parts for pat in excludes) or \
            any(fnmatch.fnmatch(path, pat) for pat in excludes)

    for p in paths:
        if os.path.isfile(p):
            files.append(p)  # named explicitly: always checked
        elif os.path.isdir(p):
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not excluded(os.path.join(root, d)) and not excluded(d))
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py") and not excluded(os.path.join(root, n))]
        else:
            missing.append(p)
    return files, missing


def lint_source(source: str, path: str = "<string>", enabled: set[str] | None = None) -> list:
    """Findings for one file's source text (raises SyntaxError when it does not parse)."""
    from trainval.lint.analysis import FileInfo
    from trainval.lint.rules import RULES, Finding, check

    enabled = enabled if enabled is not None else {c for c, r in RULES.items() if r.default}
    tree = ast.parse(source, filename=path)
    info = FileInfo(tree, source)
    lines = source.splitlines()
    found: dict[tuple, Finding] = {}
    for line, col, code, message in check(info):
        if code not in enabled:
            continue
        text_line = lines[line - 1] if 0 < line <= len(lines) else ""
        m = NOQA.search(text_line)
        if m and (m.group("codes") is None or code in {c.strip().upper() for c in m.group("codes").split(",")}):
            continue
        found.setdefault((line, col, code), Finding(path, line, col, code, message))
    return sorted(found.values(), key=lambda f: (f.line, f.col, f.code))


def run(args) -> int:
    from trainval.lint.rules import RULES

    try:
        config, config_path = load_pyproject(args.paths[0])
        select = _codes(args.select, "--select") or _codes(config.get("select"), f"{config_path} select")
        ignore = _codes(args.ignore, "--ignore") | _codes(config.get("ignore"), f"{config_path} ignore")
    except ValueError as e:
        print(f"trainval lint: error: {e}", file=sys.stderr)
        return 2
    enabled = (select or {c for c, r in RULES.items() if r.default}) - ignore
    excludes = DEFAULT_EXCLUDES + list(config.get("exclude", [])) + args.exclude
    files, missing = iter_files(args.paths, excludes)
    status = 0
    for p in missing:
        print(f"trainval lint: error: {p}: no such file or folder", file=sys.stderr)
        status = 2
    findings, broken = [], []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                source = f.read()
            findings += lint_source(source, path, enabled)
        except SyntaxError as e:
            broken.append({"path": path, "line": e.lineno, "col": e.offset, "message": e.msg})
        except (UnicodeDecodeError, OSError) as e:
            broken.append({"path": path, "line": 0, "col": 0, "message": str(e)})
    if args.format == "json":
        print(json.dumps({"findings": [dict(path=f.path, line=f.line, col=f.col, code=f.code, level=f.level,
                                             message=f.message) for f in findings],
                          "errors": broken}, indent=2))
    else:
        for f in findings:
            print(f"{f.path}:{f.line}:{f.col}: {f.code} {f.message}")
        for b in broken:
            print(f"trainval lint: error: {b['path']}:{b['line']}:{b['col']}: cannot parse: {b['message']}", file=sys.stderr)
    if broken or status:
        return 2
    return 1 if any(f.level == "error" for f in findings) else 0
