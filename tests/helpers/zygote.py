"""A process that imports torch and trainval once, then forks one real training process per request.

The fault-injection tests start dozens of short training processes and kill or signal them. A fresh
interpreter spends about 2.5 s importing torch (and torch._dynamo, which the first optimizer pulls in)
before 0.3 s of training; a fork of this already-importing process skips that. Each child is still a
real process: it is SIGKILLed, gets real signals, writes real files and exits with a real status.

Protocol (one JSON line per request on stdin): ``{"out_dir": ..., "opts": {...}, "log": path}``.
The zygote answers ``PID <pid>`` at once, then ``EXIT <code>`` when that child ends (``-N`` when a
signal N ended it, like ``subprocess``). The child's stdout and stderr go to ``log``.
Use it through :class:`Zygote` in the tests, not by hand.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _serve() -> None:
    import torch._dynamo  # noqa: F401  # what the first optimizer would import in every child
    import train_child  # this folder is on sys.path: the zygote runs as a script from it

    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(train_child, request)  # never returns
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"EXIT {code}", flush=True)


def _child(train_child, request) -> None:
    code = 1
    try:
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        train_child.run(request["out_dir"], request["opts"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkedChild:
    """One training process forked by a :class:`Zygote`; the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, zygote: Zygote, pid: int, log: str):
        self.zygote, self.pid, self.log, self.returncode = zygote, pid, log, None

    @property
    def stdout(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:  # the child has not opened it yet
            return ""

    stderr = ""  # merged into stdout

    def send_signal(self, sig: int) -> None:
        """Signals the child unless it has ended (then ``wait()`` gives its own exit code)."""
        if self.poll() is None:  # the zygote reaps an ended child at once: never signal a reused pid
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended between the poll and the kill
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.zygote._exit_code(timeout=0)
        return self.returncode

    def wait(self, timeout: float = 120) -> int:
        if self.returncode is None:
            self.returncode = self.zygote._exit_code(timeout=timeout)
            if self.returncode is None:
                self.kill()
                self.zygote._exit_code(timeout=30)
                raise subprocess.TimeoutExpired(f"forked child {self.pid}", timeout, output=self.stdout)
        return self.returncode

    def wait_for_line(self, text: str, timeout: float = 120) -> list[str]:
        """Block until the child printed a line equal to ``text``; returns the lines before it."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [ln.strip() for ln in self.stdout.splitlines()]
            if text in lines:
                return lines[: lines.index(text)]
            if self.poll() is not None:
                raise AssertionError(f"child exited {self.returncode} before printing {text!r}:\n{self.stdout}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from the child after {timeout} s:\n{self.stdout}")
            time.sleep(0.005)


class ZygoteProcess:
    """A zygote server process (``argv``) spoken to by JSON lines on its stdin; it answers in lines."""

    def __init__(self, argv: list[str], cwd: str):
        self.buffer = b""
        self.proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def _line(self, timeout: float) -> str | None:
        """The zygote's next line, or None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            if not select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the zygote exited ({self.proc.wait()})")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Zygote(ZygoteProcess):
    """Starts the zygote process; ``start()`` forks one child (one at a time), ``run()`` also waits for it."""

    def __init__(self, log_dir: str):
        super().__init__([sys.executable, os.path.abspath(__file__)], cwd=HERE)
        self.log_dir, self.count = log_dir, 0

    def start(self, out_dir, **opts) -> ForkedChild:
        self.count += 1
        log = os.path.join(self.log_dir, f"child-{self.count}.log")
        self.proc.stdin.write((json.dumps({"out_dir": str(out_dir), "opts": opts, "log": log}) + "\n").encode())
        line = self._line(timeout=120)
        assert line is not None and line.startswith("PID "), line
        return ForkedChild(self, int(line.split()[1]), log)

    def run(self, out_dir, timeout: float = 120, **opts) -> ForkedChild:
        child = self.start(out_dir, **opts)
        child.wait(timeout)
        return child

    def _exit_code(self, timeout: float) -> int | None:
        line = self._line(timeout)
        if line is None:
            return None
        assert line.startswith("EXIT "), line
        return int(line.split()[1])


if __name__ == "__main__":
    _serve()
