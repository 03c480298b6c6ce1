"""``trainval`` CLI runs forked from a process that imported torch and trainval once (for ``run_cli``).

A CLI test spends about 2.5 s of its ~3 s starting a fresh interpreter and importing torch, NumPy and
scikit-learn. The zygote pays that once per test worker; each ``run_cli`` forks a child that sets up
what a fresh ``python -m trainval`` would have (current folder, environment, ``PYTHONPATH`` on
``sys.path``, default signal handlers, temp folder, thread count), runs ``trainval.app.cli.main`` and exits
with its code. Each child is a real process writing real files; its stdout and stderr are real files.

What a fork cannot show, a test asks a fresh interpreter for (``run_cli(..., fresh=True)``): which
modules the interpreter imports from the current folder or ``sys.path`` (``tests/test_security_paths.py``),
and anything read when torch is imported. ``TRAINVAL_TEST_FRESH_CLI=1`` makes every ``run_cli`` fresh.

Protocol: one JSON line per request on stdin ``{"args", "cwd", "env", "out", "err"}``; the zygote answers
``PID <pid>`` at once and ``EXIT <code>`` when the child ends (``-N`` after signal N).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # also when run as the zygote (python -P)
from zygote import ZygoteProcess  # noqa: E402

del sys.path[0]  # nothing of this folder stays on the zygote's (and so its children's) sys.path


def _serve() -> None:
    import numpy  # noqa: F401
    import sklearn.model_selection  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  # what the first optimizer would import
    import tqdm  # noqa: F401
    import yaml  # noqa: F401

    import trainval.app.cli
    import trainval.app.workflow  # noqa: F401  # the trainer, data, metrics, checkpoints...

    base_path = list(sys.path)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, base_path, trainval.app.cli, torch)  # never returns
        print(f"PID {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"EXIT {code}", flush=True)


def _child(request: dict, base_path: list[str], cli, torch) -> None:
    code = 1
    try:
        os.setsid()  # a group of its own, as the timeout below kills it with anything it started
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # `python -m trainval` puts PYTHONPATH's folders first (the current folder it adds, __main__ removes)
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.abspath(p) for p in extra] + base_path
        import tempfile

        tempfile.tempdir = None  # TMPDIR as the request's environment says
        if request["env"].get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.argv = ["trainval", *request["args"]]
        code = cli.main(list(request["args"]))
    except SystemExit as e:  # argparse's usage errors and --help
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a traceback, as the interpreter prints it
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what a normal interpreter exit runs (trackers' own clean-up)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


class CliZygote(ZygoteProcess):
    """The zygote process of this test worker; :meth:`run` is ``subprocess.run`` of ``python -m trainval``."""

    def __init__(self) -> None:
        # -P: nothing of this folder on the zygote's sys.path (a child sees what `python -m trainval` would)
        super().__init__([sys.executable, "-P", os.path.abspath(__file__)], cwd="/")

    def run(self, args: list[str], cwd: str, env: dict, timeout: float, logs: str) -> subprocess.CompletedProcess:
        out, err = os.path.join(logs, "stdout"), os.path.join(logs, "stderr")
        request = {"args": list(args), "cwd": cwd, "env": env, "out": out, "err": err}
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        line = self._line(60)
        assert line is not None and line.startswith("PID "), line
        pid = int(line.split()[1])
        line = self._line(timeout)
        if line is None:  # like subprocess.run: kill it, then say so
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._line(60)
            raise subprocess.TimeoutExpired(["trainval", *args], timeout, output=_read(out), stderr=_read(err))
        assert line.startswith("EXIT "), line
        return subprocess.CompletedProcess(["trainval", *args], int(line.split()[1]), _read(out), _read(err))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


if __name__ == "__main__":
    _serve()
