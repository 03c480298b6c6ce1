"""The ``trainval`` command: parse arguments -> config -> the Python API (no logic of its own).

User mistakes (a bad config key, a missing file, bad data) print one line ``trainval: error: ...``
and exit non-zero without a traceback: 2 for config and usage errors, 1 for data and checkpoint
errors, 128 + signal number after SIGINT/SIGTERM. Internal bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import NamedTuple

from trainval import __version__

FIT_EXAMPLES = """examples:
  trainval fit                                   # the embedded default: a CNN on scikit-learn's digits
  trainval fit examples/phoneme_mlp.yaml train.epochs=5 optim.lr=3e-4 run.name=try2
  trainval fit examples/phoneme_mlp.yaml --resume
  trainval fit examples/digits.yaml --nproc 2    # 2 processes through torchrun (gloo on CPU)
"""
TEST_EXAMPLES = """examples:
  trainval test examples/digits.yaml
  trainval test examples/digits.yaml --ckpt last
  trainval test runs/phoneme data.test=new_labelled.csv   # a run folder: its own config.yaml
"""
PREDICT_EXAMPLES = """examples:
  trainval predict examples/phoneme_mlp.yaml
  trainval predict examples/phoneme_mlp.yaml --out preds.csv --proba
  trainval predict runs/phoneme data.test=new.csv --out new_preds.csv   # no training file needed
  trainval predict runs/pets --data new_photos/   # data.source=images: one row per image file
"""
RUNS_EXAMPLES = """examples:
  trainval runs                         # every run below runs/
  trainval runs runs --sort best        # best monitored value first
  trainval runs runs --sort test_acc --reverse --format json
  trainval runs runs --plot             # runs/runs.png: their validation curves overlaid
"""
TUNE_EXAMPLES = """examples:
  trainval tune --trials 20 'optim.lr=loguniform(1e-4,1e-2)' 'model.dropout=uniform(0,0.5)'
  trainval tune examples/phoneme_mlp.yaml --trials 30 'model.hidden=choice([64],[128,64])' train.epochs=10
  trainval tune cfg.yaml --trials 10 --storage sqlite:////shared/study.db   # workers on several machines
  trainval fit runs/digits/best.yaml        # the best trial's config (run: runs/digits-best)
"""


def _split_positionals(items: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [key=value ...]``: the one item without '=' is the config file."""
    config, overrides = None, []
    for item in items:
        if "=" in item and not item.endswith((".yaml", ".yml")):
            overrides.append(item)
        elif config is None:
            config = item
        else:
            from trainval.errors import ConfigError

            raise ConfigError(
                f"more than one config file given ({config}, {item}); overrides look like key=value."
            )
    return config, overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainval", description="Train, validate, keep the best checkpoint, test and predict."
    )
    parser.add_argument("--version", action="version", version=f"trainval {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "fit", help="train (default: the embedded digits run)", epilog=FIT_EXAMPLES, formatter_class=raw
    )
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG] [key=value]", help="a YAML config and/or dotted overrides"
    )
    p.add_argument("--resume", action="store_true", help="continue from last.pt in the run folder")
    p.add_argument(
        "--nproc", type=int, default=None, metavar="N", help="start N processes with torchrun on this machine"
    )
    p.add_argument(
        "--nnodes", type=int, default=1, metavar="N", help="machines taking part (each runs the same command)"
    )
    p.add_argument(
        "--node-rank", type=int, default=None, metavar="R", help="this machine's rank, 0 to nnodes-1"
    )
    p.add_argument(
        "--rdzv-endpoint",
        default=None,
        metavar="HOST:PORT",
        help="where the machines meet (c10d rendezvous; node 0's address); needed with --nnodes > 1",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=None,
        metavar="N",
        help="restart the workers up to N times after a failure (they resume from last.pt)",
    )

    for name, examples, help_ in (
        ("test", TEST_EXAMPLES, "metrics of a checkpoint on the test split"),
        ("predict", PREDICT_EXAMPLES, "write a predictions file for the test split"),
    ):
        p = sub.add_parser(name, help=help_, epilog=examples, formatter_class=raw)
        p.add_argument(
            "args",
            nargs="+",
            metavar="CONFIG [key=value]",
            help="the run's YAML config, or its run folder (its config.yaml), and overrides",
        )
        p.add_argument("--ckpt", default="best", help="best (default), last, or a checkpoint path")
        p.add_argument(
            "--data",
            default=None,
            metavar="PATH",
            help="the data to score or predict (sets data.test): a file, or a folder of images",
        )
        p.add_argument(
            "--trust-code",
            action="store_true",
            help="allow importing the 'module:name' model or data factory that the config names",
        )
        if name == "predict":
            p.add_argument(
                "--out",
                default=None,
                help="output CSV (default: <run folder>/predictions.csv; '-' for standard output)",
            )
            p.add_argument("--proba", action="store_true", help="add one probability column per class")
            p.add_argument(
                "--force",
                action="store_true",
                help="replace an existing --out file that is not a predictions file trainval wrote",
            )

    p = sub.add_parser(
        "runs", help="list and compare the runs below a folder", epilog=RUNS_EXAMPLES, formatter_class=raw
    )
    p.add_argument("folder", nargs="?", default="runs", help="where to look for run folders (default: runs)")
    p.add_argument(
        "--sort",
        default=None,
        metavar="KEY",
        help="best (best monitored value first), name, status, epochs, time, or a column: test_acc, val_loss...",
    )
    p.add_argument("--reverse", action="store_true", help="reverse the order")
    p.add_argument("--format", choices=("table", "json"), default="table", help="table (default) or json")
    p.add_argument(
        "--plot",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="overlay the runs' validation curves in one PNG (default: FOLDER/runs.png)",
    )

    p = sub.add_parser(
        "tune",
        help="hyperparameter search with Optuna (each trial a run)",
        epilog=TUNE_EXAMPLES,
        formatter_class=raw,
    )
    p.add_argument(
        "args",
        nargs="*",
        metavar="[CONFIG] [key=value|key=dist(...)]",
        help="a YAML config, fixed overrides, and search spaces: loguniform(a,b), uniform(a,b), "
        "int(a,b), choice(x,y,...)",
    )
    p.add_argument("--trials", type=int, required=True, metavar="N", help="trials this worker runs")
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage shared by several workers (default: sqlite study.db in the run folder)",
    )
    p.add_argument("--study", default=None, metavar="NAME", help="study name (default: run.name)")
    p.add_argument(
        "--pruner",
        choices=("median", "none"),
        default="median",
        help="stop unpromising trials early on the monitored metric (default: median)",
    )

    p = sub.add_parser("lint", help="find training-loop mistakes in Python files")
    from trainval.lint.cli import add_arguments

    add_arguments(p)
    return parser


_LAUNCHER_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--max-restarts")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_torchrun(args, argv: list[str]) -> int:
    """Start torchrun with the same arguments, wait for it, and say once how the workers ended.

    The user's signals reach this process alone (torchrun runs in a process group of its own). The
    first SIGINT/SIGTERM goes to torchrun, which passes it to every worker: they finish the step, save
    last.pt and stop, and this process prints their "stopped by ... Resume with" line and exits with
    128 + the signal. A second SIGINT goes straight to the workers, which then exit at once. Should this
    process die without a word (SIGKILL), torchrun gets SIGTERM (Linux) and stops the workers the same
    graceful way, so no job trains on unattended.
    """
    rest, skip = [], False
    for a in argv:  # the same arguments, less the launcher's own
        if skip:
            skip = False
        elif a in _LAUNCHER_FLAGS:
            skip = True
        elif not a.startswith(tuple(f"{flag}=" for flag in _LAUNCHER_FLAGS)):
            rest.append(a)
    endpoint = _endpoint(args.rdzv_endpoint)
    if args.nnodes > 1 and args.node_rank is not None and endpoint is not None:
        # static rendezvous: node R's workers are global ranks R*N to R*N+N-1 (c10d would ignore --node-rank
        # and number the nodes in the order they arrive)
        launch = [
            f"--nnodes={args.nnodes}",
            f"--node-rank={args.node_rank}",
            f"--master-addr={endpoint[0]}",
            f"--master-port={endpoint[1]}",
        ]
    elif args.nnodes > 1:  # every node meets at the endpoint (c10d rendezvous), ranked as they arrive
        launch = [
            f"--nnodes={args.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={args.rdzv_endpoint}",
            "--rdzv-id=trainval",
        ]
    else:
        launch = ["--standalone"]
    if args.max_restarts is not None:
        launch.append(f"--max-restarts={args.max_restarts}")
    nproc = args.nproc or 1
    # -P: torchrun and its workers import nothing from the current folder (a tqdm.py there, say)
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    cmd = [
        sys.executable,
        *safe_path,
        "-m",
        "torch.distributed.run",
        *launch,
        f"--nproc-per-node={nproc}",
        "-m",
        "trainval",
        *rest,
    ]
    import tempfile

    temp = tempfile.gettempdir()
    remove_stale_outcome_folders(temp)
    forward = _SignalForwarder()
    previous = {s: signal.signal(s, forward) for s in _STOP_SIGNALS}
    try:  # until the end: a signal after torchrun's exit must not turn a finished run into a traceback
        with tempfile.TemporaryDirectory(prefix=f"{_OUTCOMES_PREFIX}{os.getpid()}-", dir=temp) as outcomes:
            # A restarted worker group (--max-restarts) must not read its peers' addresses of the failed
            # attempt from torchrun's shared store (pytorch#135712). After a stop signal, torchrun waits
            # TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30) for the workers to save last.pt
            # before it kills them; give a large model's save more time.
            env = {
                "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120",
                **os.environ,
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                _RANK_OUTCOMES: outcomes,
            }
            with tempfile.TemporaryFile("w+") as launcher_log:
                forward.start(
                    subprocess.Popen(
                        cmd, env=env, stderr=launcher_log, preexec_fn=_torchrun_preexec(os.getpid())
                    )
                )
                code = forward.wait(_waiting_notice(args) if args.nnodes > 1 else None, _notice_period())
                return _exit_code(code, _rank_reports(outcomes), nproc, forward.signals, launcher_log)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


_NOTICE_S = 30.0  # how often a launcher waiting for the other nodes says so (TRAINVAL_WAIT_NOTICE_S)


def _notice_period() -> float:
    value = os.environ.get("TRAINVAL_WAIT_NOTICE_S", "")
    if not value:
        return _NOTICE_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0.1 <= seconds <= 3600:
        from trainval.errors import ConfigError
        from trainval.untrusted import shown_repr

        raise ConfigError(
            f"the environment variable TRAINVAL_WAIT_NOTICE_S={shown_repr(value)} is not a number of seconds "
            "between 0.1 and 3600; set it to how often a launcher waiting for the other nodes says so, or unset it."
        )
    return seconds


def _waiting_notice(args):
    """What a launcher says while its node waits for the others: where, how many, and since when."""
    endpoint = args.rdzv_endpoint
    how = (
        f"as node rank {args.node_rank} (static rendezvous)"
        if args.node_rank is not None and _endpoint(endpoint) is not None
        else "(c10d rendezvous; node ranks in order of arrival)"
    )

    def notice(waited: float) -> None:
        print(
            f"trainval: waited {waited:.0f} s for {args.nnodes} nodes to meet at {endpoint} {how}; start the same "
            f"command with --nnodes {args.nnodes} on every node (the rendezvous gives up after 600 s).",
            file=sys.stderr,
            flush=True,
        )

    return notice


def _exit_code(code: int, reports: dict[int, _Outcome], nproc: int, signals: list[int], launcher_log) -> int:
    """The launcher's exit code from torchrun's and the workers' outcomes, each said once, on stderr."""
    ranks = {rank: (r.code, r.message) for rank, r in reports.items()}
    if signals and len(ranks) == nproc and all(c == 0 for c, _ in ranks.values()):
        # every worker had finished its work; the signal only cut torchrun's own shutdown short
        print(
            f"trainval: the run had finished when {signal.Signals(signals[0]).name} came; its results are "
            "complete.",
            file=sys.stderr,
            flush=True,
        )
        return 0
    failures = _failures(ranks)
    if failures or signals:
        return _report_failures(failures, signals, reports)
    launcher_log.seek(0)  # success, or a crash without a user error: show everything
    sys.stderr.write(launcher_log.read())
    return code


class _SignalForwarder:
    """The launcher's SIGINT/SIGTERM handler: the first signal to torchrun, a second SIGINT to the workers
    (which exit at once); a repeated SIGTERM is dropped, as the workers drop theirs."""

    def __init__(self):
        self.signals: list[int] = []
        self._torchrun: subprocess.Popen | None = None

    def __call__(self, signum, frame) -> None:
        if self._torchrun is not None and self._torchrun.returncode is not None:
            return  # torchrun has ended: the run is over, there is nobody to stop
        if self.signals and signum != signal.SIGINT:
            return  # a repeated SIGTERM (a scheduler's): the graceful stop is under way
        self.signals.append(signum)
        if self._torchrun is not None:
            self._forward(signum)

    def start(self, torchrun: subprocess.Popen) -> None:
        self._torchrun = torchrun
        for signum in self.signals:  # any that came while torchrun was being started
            self._forward(signum)

    def wait(self, notice=None, every: float = _NOTICE_S) -> int:
        """torchrun's exit code (the handler runs meanwhile; waitpid resumes after it). Until torchrun has
        started its workers (the nodes have met), ``notice(seconds waited)`` every ``every`` seconds."""
        assert self._torchrun is not None, "start() first"
        import time

        started = time.monotonic()
        while notice is not None:
            try:
                return self._torchrun.wait(timeout=every)
            except subprocess.TimeoutExpired:
                if _child_pids(self._torchrun.pid):
                    notice = None  # the workers run: every node is there
                elif not self.signals:
                    notice(time.monotonic() - started)
        return self._torchrun.wait()

    def _forward(self, signum: int) -> None:
        # torchrun passes a signal on to its workers and waits for them; during that wait a second one
        # would only end torchrun, so it goes to the workers directly (the Trainer's "exit at once").
        assert self._torchrun is not None  # __call__ and start forward only once torchrun is known
        workers = _child_pids(self._torchrun.pid) if len(self.signals) > 1 else []
        if not workers:
            self._torchrun.send_signal(signum)
        for pid in workers:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def _torchrun_preexec(launcher_pid: int):
    """Runs in torchrun's process before it starts: a process group of its own (a Ctrl-C or a signal
    to the launcher's group reaches the launcher alone, which forwards it once), and on Linux SIGTERM
    when the launcher dies (PR_SET_PDEATHSIG), so that a SIGKILLed launcher leaves no job behind."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
            if os.getppid() != launcher_pid:  # the launcher died before prctl: nobody to train for
                os._exit(128 + signal.SIGTERM)

    return preexec


def _child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux /proc; an empty list elsewhere)."""
    children = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:  # the field after the state: the parent
                children.append(int(entry))
    return children


def _report_failures(
    failures: list[tuple[int, tuple[int, str]]],
    signals: list[int],
    reports: dict[int, _Outcome] | None = None,
) -> int:
    """The workers' own errors, once each, instead of torchrun's report of a failed child, the first to
    fail last (the others often fail because of it: a peer gone from a collective); a crash's traceback
    comes just before its line. After a stop signal that no worker reported on (it came before training,
    or a second one), one line."""
    reports = reports or {}
    order = {rank: i for i, (rank, _) in enumerate(failures)}  # lowest rank first, as read
    when = {rank: reports[rank].when if rank in reports else 0.0 for rank, _ in failures}
    # the first to fail is printed last; ranks that did not say when are taken as the first
    ordered = sorted(failures, key=lambda f: (when[f[0]] or 0.0, order[f[0]]), reverse=True)
    ranks_saying: dict[str, int] = {}
    for _, (_, message) in failures:
        ranks_saying[message] = ranks_saying.get(message, 0) + 1
    shown: set[str] = set()
    for rank, (_, message) in ordered:
        if message in shown:
            continue
        shown.add(message)
        # an error every rank gave (a config mistake) belongs to none of them; rank 0's needs no name
        prefix = "" if rank == 0 or ranks_saying[message] > 1 else f"[rank {rank}] "
        for line in reports[rank].traceback if rank in reports else []:
            print(f"{prefix}{line}", file=sys.stderr)
        print(f"trainval: error: {prefix}{message}", file=sys.stderr, flush=True)
    if failures:
        return ordered[-1][1][0]
    name = signal.Signals(signals[-1]).name
    if len(signals) > 1:
        message = (
            f"stopped at once by a second {name}; last.pt is the last checkpoint saved before it "
            "(`trainval fit CONFIG --resume`)."
        )
    else:
        message = f"interrupted by {name}."
    print(f"trainval: error: {message}", file=sys.stderr, flush=True)
    return 128 + signals[-1]


_RANK_OUTCOMES = "TRAINVAL_RANK_ERRORS"  # the folder where workers started by --nproc leave their outcomes


_OUTCOMES_PREFIX = "trainval-ranks-"  # + the launcher's pid + "-" + tempfile's random part


def remove_stale_outcome_folders(temp: str) -> list[str]:
    """Removes the outcome folders of launchers that were SIGKILLed (so they could not remove their own).

    Only folders named ``trainval-ranks-<pid>-*`` that this user owns, whose launcher ``pid`` is gone,
    and that hold nothing but rank outcome files (named by a rank number); anything else is left alone
    (another user's folder is not even looked into, and a name whose pid cannot be one is skipped).
    Returns the removed paths.
    """
    import re
    import stat

    from trainval.run import runfolder

    removed: list[str] = []
    try:
        names = os.listdir(temp)
    except OSError:
        return removed
    for name in names:
        match = re.fullmatch(re.escape(_OUTCOMES_PREFIX) + r"([0-9]{1,10})-[A-Za-z0-9_]+", name)
        if not match or not 0 < int(match.group(1)) < 2**31:
            continue
        path = os.path.join(temp, name)
        try:
            info = os.lstat(path)
            if (
                not stat.S_ISDIR(info.st_mode)
                or info.st_uid != os.getuid()
                or runfolder.process_alive(int(match.group(1)))
            ):
                continue
            entries = os.listdir(path)
            if not all(
                e.isdigit() and stat.S_ISREG(os.lstat(os.path.join(path, e)).st_mode) for e in entries
            ):
                continue
            for e in entries:
                os.unlink(os.path.join(path, e))
            os.rmdir(path)
            removed.append(path)
        except OSError:  # another launcher removed it first, or it changed meanwhile: leave it
            continue
    return removed


_OUTCOME_LIMIT = 64 * 1024  # one exit code and one error line


class _Outcome(NamedTuple):
    """What a worker left for the launcher: its exit code and error line, when it failed (``time.time()``;
    0 when not said) and, for a crash, its traceback's lines less the last (the error line says it)."""

    code: int
    message: str
    when: float = 0.0
    traceback: tuple[str, ...] = ()


def _rank_outcomes(folder: str) -> dict[int, tuple[int, str]]:
    """rank -> (exit code, message) of each worker of this node that ended through ``main``: 0 when
    its work was done, else the error it printed. Only regular files named by a rank number, of the
    form a worker writes, are read (never through a link, never a FIFO); anything else is ignored."""
    return {rank: (r.code, r.message) for rank, r in _rank_reports(folder).items()}


def _rank_reports(folder: str) -> dict[int, _Outcome]:
    """:func:`_rank_outcomes` with when each worker failed and a crash's traceback (file: the exit code,
    the message, then optionally ``at <time>`` and the traceback's lines)."""
    import re

    from trainval.errors import TrainvalError
    from trainval.untrusted import read_bytes, shown_line

    found = {}
    for name in os.listdir(folder):
        if not re.fullmatch(r"[0-9]{1,10}", name):
            continue
        try:
            raw = read_bytes(os.path.join(folder, name), "rank outcome", limit=_OUTCOME_LIMIT, follow=False)
        except (TrainvalError, OSError):
            continue
        code, _, rest = raw.decode("utf-8", errors="replace").partition("\n")
        if not re.fullmatch(r"-?[0-9]{1,3}", code.strip()):
            continue
        message, _, rest = rest.partition("\n")
        when, lines = 0.0, rest.splitlines()
        if lines and re.fullmatch(r"at [0-9]{1,12}(\.[0-9]{1,9})?", lines[0]):
            when, lines = float(lines[0][3:]), lines[1:]
        found[int(name)] = _Outcome(
            int(code), shown_line(message.strip()), when, tuple(shown_line(line) for line in lines[:200])
        )
    return found


def _failures(ranks: dict[int, tuple[int, str]]) -> list[tuple[int, tuple[int, str]]]:
    """(rank, (exit code, message)) of each worker that failed, lowest rank first; when none has an error
    of its own, only the lowest rank stopped by a signal (one stop, whose ranks may word it differently)."""
    found = sorted((rank, outcome) for rank, outcome in ranks.items() if outcome[0] != 0)
    own = [f for f in found if f[1][0] < 128]
    return own or found[:1]


class _QuietWhenClosed:
    """stdout that, once its reader is gone (``trainval fit ... | head -1``), sends the rest to
    /dev/null: training goes on and saves its checkpoints instead of dying of BrokenPipeError."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not isinstance(sys.stdout, _QuietWhenClosed) and hasattr(sys.stdout, "fileno"):
        sys.stdout = _QuietWhenClosed(sys.stdout)
    args = parse_arguments(build_parser(), argv)
    if args.command == "lint":
        from trainval.lint.cli import run as run_lint

        return run_lint(args)

    from trainval.errors import TrainvalError

    in_torchrun = False
    try:
        from trainval import launch

        env = launch.read()  # the launcher's variables checked: a bad one is one line
        in_torchrun = env.distributed
        if args.command == "fit" and (args.nproc is not None or args.nnodes != 1):
            if env.distributed and env.source in (launch.SLURM, launch.ENV):
                # srun (or a PyTorchJob's pods) started one launcher per node: its tasks are the nodes
                problem = _cluster_nodes(args, env)
                in_torchrun = False
            else:
                problem = _launch_problem(args)
            if problem:
                return _error(problem, 2)
            if ((args.nproc or 1) > 1 or args.nnodes > 1) and not in_torchrun:
                from trainval.app import config

                config.load(*_split_positionals(args.args))  # a config error: one line, before torchrun
                return _run_torchrun(args, argv)
        code = _dispatch(args)
    except (TrainvalError, KeyboardInterrupt) as e:
        if in_torchrun:  # torchrun SIGTERMs the other workers when one fails: each says its error in full
            from trainval import distributed

            distributed.ignore_stop_signals()
        code = _error(str(e), e.exit_code) if isinstance(e, TrainvalError) else _error("interrupted.", 130)
    except Exception as e:  # a bug: its traceback (a --nproc worker's is printed last by the launcher)
        if not (in_torchrun and _record_crash(e)):
            raise
        code = 1
    if in_torchrun:
        from trainval import distributed

        distributed.ignore_stop_signals()  # the work is over: a late Ctrl-C must not turn into a traceback
        if code == 0:
            _record_outcome(0, "done")  # for the launcher: a stop signal from now on came after the work
        distributed.teardown_and_exit(code)  # os._exit: avoids gloo's abort at interpreter exit
    return code


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options and ``key=value`` overrides in any order (``test k=v --ckpt last k2=v``), like argparse's
    ``parse_intermixed_args``: a command's positionals that come after an option join the ones before."""
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "args", None), list):
        unknown = [a for a in extra if a.startswith("-")]
        if not unknown:
            args.args.extend(extra)
            return args
        extra = unknown
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _launch_problem(args) -> str | None:
    if args.nproc is not None and args.nproc < 1:
        return f"--nproc must be at least 1, got {args.nproc}."
    if args.nnodes < 1:
        return f"--nnodes must be at least 1, got {args.nnodes}."
    if args.nnodes > 1 and not args.rdzv_endpoint:
        return f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address, a free port) on every node."
    if args.node_rank is not None and not 0 <= args.node_rank < args.nnodes:
        return f"--node-rank must be between 0 and {args.nnodes - 1}, got {args.node_rank}."
    if args.node_rank is not None and args.nnodes > 1 and _endpoint(args.rdzv_endpoint) is None:
        return (
            f"--rdzv-endpoint {args.rdzv_endpoint} is not HOST:PORT; with --node-rank the nodes meet at node 0's "
            "address and a port number (1 to 65535), e.g. node0.example:29500."
        )
    if args.max_restarts is not None and args.max_restarts < 0:
        return f"--max-restarts must be 0 or more, got {args.max_restarts}."
    return None


def _endpoint(text: str | None) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[v6]:PORT`` too) as the host and a port number; None when it is not one."""
    host, _, port = (text or "").rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not (port.isdigit() and len(port) <= 5 and 1 <= int(port) <= 65535):
        return None
    return host, int(port)


def _cluster_nodes(args, env) -> str | None:
    """``trainval fit --nproc N`` in each of several ``srun`` tasks or PyTorchJob pods (one per node): the
    tasks are the nodes. ``--nnodes``, ``--node-rank`` and ``--rdzv-endpoint`` default to the task count,
    this task's rank and the address and port the tasks meet at (:mod:`trainval.launch`), and the nodes
    meet in a static rendezvous; a launcher flag that contradicts them is one line. Returns the problem,
    or None."""
    if args.nnodes == 1:
        args.nnodes = env.world_size
    if args.node_rank is None:
        args.node_rank = env.rank
    if args.rdzv_endpoint is None:
        host = f"[{env.master_addr}]" if ":" in env.master_addr else env.master_addr
        args.rdzv_endpoint = f"{host}:{env.master_port}"
    if args.nnodes != env.world_size or args.node_rank != env.rank:
        rank, world = ("SLURM_PROCID", "SLURM_NTASKS") if env.source == "slurm" else ("RANK", "WORLD_SIZE")
        return (
            f"--nnodes {args.nnodes} --node-rank {args.node_rank} contradict the environment this launcher runs "
            f"in ({rank}={env.rank} of {world}={env.world_size}: one launcher per node); leave --nnodes and "
            "--node-rank out, they are taken from there."
        )
    return _launch_problem(args)


def _dispatch(args) -> int:
    from trainval.app import config

    # The current folder is not on sys.path (see __main__): a module there is imported only when the
    # config names it as a `module:Class` model or `module:function` factory (data.import_object).
    if args.command == "runs":
        from trainval.app import runs

        print(runs.report(args.folder, sort=args.sort, reverse=args.reverse, fmt=args.format, plot=args.plot))
        return 0
    if args.command == "tune":
        from trainval.app import tuning

        cfg_path, overrides, space = tuning.split_arguments(args.args)
        tuning.tune(
            cfg_path,
            overrides,
            space,
            trials=args.trials,
            storage=args.storage,
            study_name=args.study,
            pruner=args.pruner,
        )
        return 0
    cfg_path, overrides = _split_positionals(args.args)
    if args.command in ("test", "predict") and cfg_path is not None and os.path.isdir(cfg_path):
        from trainval.app import runs

        cfg = runs.run_config(cfg_path, overrides)  # a run folder: the config it was trained with
        cfg_path = None
    else:
        cfg = config.load(cfg_path, overrides)  # config errors come before torch is imported
    if getattr(args, "data", None):  # test/predict --data PATH: data.test, taken as a path (never as YAML)
        cfg["data"]["test"] = os.path.expanduser(args.data)
    from trainval.app import workflow

    if args.command == "fit":
        workflow.fit(cfg, resume=args.resume)
    elif args.command == "test":
        workflow.test(cfg, ckpt=args.ckpt, trust_code=args.trust_code)
    elif args.command == "predict":
        workflow.predict(
            cfg,
            ckpt=args.ckpt,
            out=args.out,
            proba=args.proba,
            trust_code=args.trust_code,
            force=args.force,
            config_path=cfg_path,
        )
    return 0


def _error(message: str, code: int) -> int:
    from trainval.untrusted import shown, shown_line

    message = shown_line(message)  # it may quote a file's text: no escape sequence reaches the terminal
    if not _record_outcome(code, message):  # every failing rank says so, the others prefixed with their rank
        rank = _launch().rank
        prefix = f"[rank {shown(rank)}] " if rank else ""
        print(f"trainval: error: {prefix}{message}", file=sys.stderr, flush=True)
    return code


def _launch():
    """The launcher's variables (:func:`trainval.launch.read`); one process when they are not valid (that
    error is the one being reported)."""
    from trainval import launch
    from trainval.errors import ConfigError

    try:
        return launch.read()
    except ConfigError:
        return launch.Launch()


def _record_crash(error: BaseException) -> bool:
    """A worker of --nproc that crashed (a bug, not a user error) leaves its traceback with its outcome,
    for the launcher to print last; False where it cannot (the caller lets Python print it)."""
    import traceback

    from trainval import distributed

    distributed.ignore_stop_signals()  # torchrun SIGTERMs the others: this report must not be cut short
    last = traceback.format_exception_only(type(error), error)
    lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).splitlines()
    body = lines[: len(lines) - len("".join(last).splitlines())]
    message = " ".join(part.strip() for part in "".join(last).splitlines())[:4000]
    return _record_outcome(1, message, body)


def _record_outcome(code: int, message: str, traceback_lines: list[str] | None = None) -> bool:
    """A worker of --nproc leaves its exit code and message for the launcher, which prints them; False
    elsewhere, and whenever the file cannot be written safely (the caller prints the message then).

    Only a worker that torchrun started (several processes), into the folder its launcher made: a real
    folder of this user named ``trainval-ranks-*``; the file is created anew, never through a link, and
    never opened if it is a FIFO.
    """
    import stat

    env = _launch()
    folder = os.environ.get(_RANK_OUTCOMES)
    if not (
        env.distributed
        and env.elastic_run
        and folder
        and os.path.basename(os.path.normpath(folder)).startswith(_OUTCOMES_PREFIX)
    ):
        return False
    path = os.path.join(folder, str(env.rank))
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            return False
        if (
            env.restart_count > 0
        ):  # a worker restarted by torchrun (--max-restarts) replaces its earlier outcome
            try:
                os.unlink(path)  # (a link is removed, never what it points to)
            except FileNotFoundError:
                pass
        fd = os.open(path, flags, 0o600)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            import time

            f.write(f"{code}\n{message}\n")
            if code != 0:
                f.write(f"at {time.time():.6f}\n")
                # a traceback of ~200 lines at most: the file's limit is 64 KiB
                f.write("".join(f"{line[:300]}\n" for line in (traceback_lines or [])[-200:]))
    except OSError:
        return False
    return True


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
