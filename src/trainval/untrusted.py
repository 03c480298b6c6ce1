"""What trainval reads from files and folders it did not just write, and shows back: three gates.

Every file a user (or a downloaded run folder) hands trainval is input from outside: it may be a FIFO
that blocks a reader forever, a link to ``/dev/zero``, a YAML "billion laughs", or a name full of
terminal escape sequences. Every reader and printer goes through one of these:

- :func:`open_regular` opens a path only if it is a regular file (a FIFO, device, socket or folder is
  one clear error, and the open itself never blocks); ``follow=False`` refuses a symbolic link too.
- :func:`shown` makes text from a file or folder name safe to print: control characters (escape
  sequences, carriage returns, bidi overrides) are written as ``\\x1b``-style escapes, and the length is
  bounded.
- :func:`load_yaml` parses YAML with PyYAML's safe loader, refusing a key given twice, nesting deeper
  than :data:`MAX_YAML_DEPTH` and aliases that expand to more than :data:`MAX_YAML_NODES` nodes, before
  anything is built.
"""

from __future__ import annotations

import os
import reprlib
import stat
import unicodedata
from typing import IO, Any

import yaml

from trainval.errors import ConfigError, TrainvalError

MAX_YAML_DEPTH = 64  # nesting of mappings and lists; trainval's own config.yaml needs 3
MAX_YAML_NODES = 1_000_000  # scalars and collections, every alias counted as the nodes it stands for
MAX_YAML_BYTES = 64 * 2**20
SHOWN_LIMIT = 200  # characters of one value in a message


# --------------------------------------------------------------------------------------------------
# Text for the terminal


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def shown(value: Any, limit: int = SHOWN_LIMIT) -> str:
    """``str(value)`` safe to print on a terminal, in one line of at most about ``limit`` characters.

    Control and format characters (ESC, CR, LF, BEL, DEL, C1 controls, bidi overrides, zero-width
    characters) are written as escapes such as ``\\x1b``; a longer text is cut with ``...(N more)``.
    """
    text = value if isinstance(value, str) else str(value)
    cut = len(text) - limit if limit and len(text) > limit else 0
    if cut:
        text = text[:limit]
    out = "".join(
        _escape(ch) if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") else ch for ch in text
    )
    return out + (f"...({cut} more characters)" if cut else "")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 80, 80, 40


def shown_repr(value: Any) -> str:
    """``repr(value)`` bounded in depth, items and length (a value read from a file may be huge, or a
    structure whose shared parts expand without end when written out) and safe to print."""
    return shown(_REPR.repr(value))


def shown_names(names: Any, most: int = 30, quoted: bool = False) -> str:
    """Names read from a file (columns, keys, metrics) for a message: ``a, b, c (and 7 more)``, each one
    terminal-safe and cut at 120 characters, at most ``most`` of them; ``quoted`` writes each as ``'a'``."""
    names = list(names)
    listed = ", ".join(shown_repr(n) if quoted else shown(n, 120) for n in names[:most])
    return listed + (f" (and {len(names) - most} more)" if len(names) > most else "")


def shown_line(message: str) -> str:
    """A whole message (an error line) terminal-safe, its length unbounded: what the CLI prints last."""
    return shown(message, limit=0)


# --------------------------------------------------------------------------------------------------
# Regular files only


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular(
    path: str, what: str, error: type[TrainvalError] = TrainvalError, follow: bool = True
) -> os.stat_result:
    """``os.stat`` (``os.lstat`` when not ``follow``) of ``path``, refusing anything but a regular file."""
    try:
        info = os.stat(path) if follow else os.lstat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {shown(path)}.") from None
    except OSError as e:
        raise error(f"cannot read {what} {shown(path)}: {e.strerror or e}.") from None
    if not follow and stat.S_ISLNK(info.st_mode):
        raise error(f"{what} {shown(path)} is a symbolic link; trainval reads only the file it wrote there.")
    if not stat.S_ISREG(info.st_mode):
        raise error(
            f"{what} {shown(path)} is {_kind(info.st_mode)}, not a regular file; give the path of a file."
        )
    return info


def check_replaceable(
    path: str,
    what: str,
    error: type[TrainvalError] = TrainvalError,
    hint: str = "move it away, or write elsewhere",
) -> os.stat_result | None:
    """Before a write replaces ``path``: None when nothing is there, its ``lstat`` when it is a regular file.

    Anything else is one clear error ending with ``hint``: a symbolic link (replacing it would change
    what the user set up, and ``/dev/stdout`` is one), a FIFO, a device, a socket or a folder. Nothing
    is opened, so a FIFO cannot block the check.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise error(f"cannot check {what} {shown(path)}: {e.strerror or e}; {hint}.") from None
    if stat.S_ISLNK(info.st_mode):
        try:
            to = f" (to {shown(os.readlink(path))})"
        except OSError:
            to = ""
        raise error(
            f"{what} {shown(path)} is a symbolic link{to}, and trainval replaces only a regular file, "
            f"never a link; {hint}."
        )
    if not stat.S_ISREG(info.st_mode):
        raise error(
            f"{what} {shown(path)} is {_kind(info.st_mode)}, and trainval replaces only a regular file; "
            f"{hint}."
        )
    return info


def open_regular(
    path: str,
    what: str,
    error: type[TrainvalError] = TrainvalError,
    follow: bool = True,
    text: bool = False,
    **text_options: Any,
) -> IO:
    """``open(path, 'rb')`` (or text mode with ``text_options``) only if ``path`` is a regular file.

    The file is opened non-blocking (a FIFO's open would wait for a writer) and checked with ``fstat``
    on the open descriptor, so that nothing swapped in between the check and the read gets through.
    ``follow=False`` refuses a symbolic link at ``path`` itself.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"{what} not found: {shown(path)}.") from None
    except IsADirectoryError:
        raise error(
            f"{what} {shown(path)} is a folder, not a regular file; give the path of a file."
        ) from None
    except OSError as e:
        if not follow and os.path.islink(path):
            raise error(
                f"{what} {shown(path)} is a symbolic link; trainval reads only the file it wrote there."
            ) from None
        raise error(f"cannot read {what} {shown(path)}: {e.strerror or e}.") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(
                f"{what} {shown(path)} is {_kind(mode)}, not a regular file; give the path of a file."
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "r" if text else "rb", **text_options)
    except BaseException:
        os.close(fd)
        raise


def read_bytes(
    path: str,
    what: str,
    error: type[TrainvalError] = TrainvalError,
    limit: int | None = None,
    follow: bool = True,
) -> bytes:
    """The whole regular file at ``path``; one clear error if it holds more than ``limit`` bytes."""
    with open_regular(path, what, error, follow=follow) as f:
        data = f.read(limit + 1) if limit is not None else f.read()
    if limit is not None and len(data) > limit:
        raise error(
            f"{what} {shown(path)} is larger than {limit} bytes; trainval does not read a file that big "
            "for this."
        )
    return data


# --------------------------------------------------------------------------------------------------
# YAML


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:
                continue  # an unhashable key: PyYAML's own error names it
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key '{key}', first given at line {first}",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


def _check_yaml_shape(text: str, source: str) -> None:
    """Refuse nesting deeper than MAX_YAML_DEPTH and aliases expanding past MAX_YAML_NODES, from PyYAML's
    event stream (no recursion, linear in the text): each anchor's expanded size is counted once."""
    sizes: dict[str, int] = {}
    stack: list[list] = [
        [None, 0]
    ]  # [anchor, nodes so far] per open collection; the bottom one is the document
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            stack.append([event.anchor, 0])
            if len(stack) - 1 > MAX_YAML_DEPTH:
                assert event.start_mark is not None  # the parser marks every event
                raise ConfigError(
                    f"{source}: nested deeper than {MAX_YAML_DEPTH} levels (line "
                    f"{event.start_mark.line + 1}); a trainval config is a few levels deep."
                )
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, count = stack.pop()
            count += 1
            if anchor is not None:
                sizes[anchor] = count
            stack[-1][1] += count
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            stack[-1][1] += 1
        elif isinstance(event, yaml.AliasEvent):
            assert event.anchor is not None  # an alias always names its anchor
            stack[-1][1] += sizes.get(event.anchor, 1)
        else:
            continue
        if stack[-1][1] > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: its aliases (&anchor/*alias) expand to more than {MAX_YAML_NODES} values "
                "(a 'billion laughs'?); write the values out, or remove the aliases."
            )


def load_yaml(text: str, source: str) -> Any:
    """YAML ``text`` as plain data (safe loader, unique keys, bounded depth and alias expansion).

    Raises a :class:`ConfigError` naming ``source`` (and the line, where PyYAML gives one).
    """
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(
            f"{source} is larger than {MAX_YAML_BYTES // 2**20} MiB; a config is a small text file."
        )
    try:
        _check_yaml_shape(text, source)
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{source}: not valid YAML{where} ({shown(getattr(e, 'problem', None) or e)})."
        ) from None
    except RecursionError:  # a limit above should prevent it; never a traceback
        raise ConfigError(
            f"{source}: nested too deeply to read; a trainval config is a few levels deep."
        ) from None


def read_yaml(path: str, what: str = "config file") -> Any:
    """The YAML file at ``path`` (a regular file of UTF-8 text, a BOM allowed) as plain data, by :func:`load_yaml`."""
    raw = read_bytes(path, what, ConfigError, limit=MAX_YAML_BYTES)
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in raw:
        raise ConfigError(
            f"{shown(path)} is not a UTF-8 text file (binary or UTF-16); save it as UTF-8 YAML."
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{shown(path)} is not UTF-8 text (an invalid byte at line {line}); save it as UTF-8 YAML."
        ) from None
    return load_yaml(text, shown(path))
