"""What the launcher's environment says about this process, read and checked in one place.

Three kinds of launcher are recognised, in this order (the first whose variables are set wins):

1. **torchrun** (and anything that sets torch's variables: Kubeflow's PyTorchJob, ``mpirun`` wrappers):
   ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, and ``LOCAL_RANK`` where the launcher
   knows it. Without ``LOCAL_RANK``, the local rank is ``RANK`` modulo ``LOCAL_WORLD_SIZE`` when that is
   set (the ranks of a node are consecutive, as torchrun and PyTorchJob number them); otherwise it is not
   known here, and :func:`trainval.distributed.setup` takes ``RANK`` modulo the number of CUDA devices the
   process sees (on the CPU the local rank names no device, and nothing depends on it).
2. **SLURM ``srun`` tasks** (inside a job step: ``SLURM_STEP_ID`` is set): ``SLURM_PROCID`` is the rank,
   ``SLURM_NTASKS`` the number of processes, ``SLURM_LOCALID`` the local rank. ``MASTER_ADDR`` defaults
   to the first host of ``SLURM_STEP_NODELIST`` (else ``SLURM_JOB_NODELIST``; the compressed forms
   ``node[01-03,07]`` and ``a1,b[2-3]`` are expanded), ``MASTER_PORT`` to ``15000 + SLURM_JOB_ID % 10000``
   (:func:`slurm_port`), which every task of the job computes alike. An ``sbatch`` script itself (no job
   step) is one process, whatever ``SLURM_NTASKS`` says: its ``srun`` starts the tasks.
3. Nothing of the above: one process.

torchrun's variables win over SLURM's, so ``trainval fit --nproc N`` inside a SLURM job works. Anyone can
set these variables in a shell, so :func:`read` checks them all: a value that is not a whole number, a
partial set (``RANK`` without ``WORLD_SIZE``, ``WORLD_SIZE`` above 1 without ``RANK``), a rank not below
the number of processes, or several processes without ``MASTER_ADDR`` or a port number is one
:class:`ConfigError` naming the variable, its value and what to set: never a single process that runs
under a distributed name. trainval adds ``TRAINVAL_DIST_TIMEOUT``. This module imports no torch, so that
the CLI checks the environment before a config error, as fast.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from trainval.errors import ConfigError
from trainval.untrusted import shown_repr

DEFAULT_TIMEOUT_S = 300.0
MAX_TIMEOUT_S = 366 * 24 * 3600.0  # a year: torch turns the timeout into a C++ duration
_TORCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_WHOLE = re.compile(r"[0-9]{1,10}")
SLURM_PORT_BASE = 15000  # MASTER_PORT under SLURM when unset: SLURM_PORT_BASE + SLURM_JOB_ID % 10000

TORCHRUN, ENV, SLURM = "torchrun", "env", "slurm"  # Launch.source


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes a launcher started (the defaults: one process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    by_torchrun: bool = False  # a launcher's variables are set (torchrun's, torch's or SLURM's)
    elastic_run: bool = False  # ... and TORCHELASTIC_RUN_ID: torchrun's own workers
    restart_count: int = 0  # how often torchrun restarted the workers (--max-restarts); 0 elsewhere
    timeout_s: float = DEFAULT_TIMEOUT_S  # TRAINVAL_DIST_TIMEOUT
    source: str = ""  # "torchrun", "env" (torch's variables, no torchrun), "slurm"; "" for one process
    master_addr: str = ""  # where the processes meet (several processes only)
    master_port: int = 0
    local_rank_known: bool = True  # False: no LOCAL_RANK, LOCAL_WORLD_SIZE nor SLURM_LOCALID (see above)

    @property
    def distributed(self) -> bool:
        """Several processes: launched with ``WORLD_SIZE`` above 1."""
        return self.by_torchrun and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of several processes, or the only one: the process that holds run-folder locks and writes."""
        return not self.distributed or self.rank == 0

    def describe(self) -> str:
        """One phrase for messages: ``rank 1 of 2 (SLURM srun task)``."""
        by = {TORCHRUN: "torchrun", ENV: "RANK/WORLD_SIZE", SLURM: "SLURM srun task"}.get(self.source, "")
        return f"rank {self.rank} of {self.world_size}" + (f" ({by})" if by else "")


def _whole(name: str, value: str) -> int:
    number = int(value) if _WHOLE.fullmatch(value) else -1
    if not 0 <= number < 2**31:
        raise ConfigError(
            f"the environment variable {name}={shown_repr(value)} is not a whole number 0 or more; torchrun sets "
            f"{name} for the processes it starts: unset it (`unset {name}`) to run one process, or start several "
            "with `trainval fit --nproc N` (or torchrun)."
        )
    return number


def _timeout(value: str | None) -> float:
    if not value:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 1 <= seconds <= MAX_TIMEOUT_S):
        raise ConfigError(
            f"the environment variable TRAINVAL_DIST_TIMEOUT={shown_repr(value)} is not a number of seconds between "
            f"1 and {MAX_TIMEOUT_S:.0f}; set it to how long a collective waits for the other processes (e.g. 300), "
            "or unset it."
        )
    return seconds


def read(environ: Mapping[str, str] | None = None) -> Launch:
    """The launcher's variables in ``environ`` (default ``os.environ``), checked; see the module's text."""
    env = os.environ if environ is None else environ
    timeout_s = _timeout(env.get("TRAINVAL_DIST_TIMEOUT"))
    if any(env.get(name) for name in _TORCH):
        return _read_torch(env, timeout_s)
    if env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID"):
        return _read_slurm(env, timeout_s)
    return Launch(timeout_s=timeout_s)


def _read_torch(env: Mapping[str, str], timeout_s: float) -> Launch:
    numbers = {name: _whole(name, env[name]) for name in _TORCH if env.get(name)}
    world = numbers.get("WORLD_SIZE")
    if world is None:
        given = ", ".join(f"{name}={numbers[name]}" for name in _TORCH if name in numbers)
        raise ConfigError(
            f"the environment sets {given} but not WORLD_SIZE, the number of processes; a launcher sets "
            "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together: set WORLD_SIZE as well, or unset "
            f"{' and '.join(name for name in _TORCH if name in numbers)} to run one process."
        )
    if world < 1:
        raise ConfigError(
            "the environment variable WORLD_SIZE=0 is not a number of processes; unset it to run one "
            "process, or start several with `trainval fit --nproc N`."
        )
    if "RANK" not in numbers:
        if world == 1:  # WORLD_SIZE=1 (and LOCAL_RANK=0) alone: one process, as the launcher says
            return Launch(timeout_s=timeout_s)
        raise ConfigError(
            f"the environment variable WORLD_SIZE={world} asks for {world} processes, but RANK (this process's "
            "place among them, 0 to WORLD_SIZE-1) is not set; set RANK in each process, or unset WORLD_SIZE to "
            "run one process."
        )
    rank = numbers["RANK"]
    if rank >= world:
        raise ConfigError(
            f"the environment variable RANK={rank} is not below WORLD_SIZE={world}; a process's rank "
            "is 0 to WORLD_SIZE-1: start the processes with `trainval fit --nproc N` (or torchrun)."
        )
    source = TORCHRUN if env.get("TORCHELASTIC_RUN_ID") else ENV
    local_rank, known = numbers.get("LOCAL_RANK"), True
    local_size = env.get("LOCAL_WORLD_SIZE")
    if local_rank is None:
        if local_size:
            size = _whole("LOCAL_WORLD_SIZE", local_size)
            if size < 1:
                raise ConfigError(
                    "the environment variable LOCAL_WORLD_SIZE=0 is not a number of processes per machine; "
                    "set it to how many processes run on each machine, or unset it."
                )
            local_rank = rank % size
        else:
            local_rank, known = rank, False  # distributed.setup derives it from the node's CUDA devices
    elif local_rank > rank:
        raise ConfigError(
            f"the environment variable LOCAL_RANK={local_rank} is above RANK={rank}; a process's rank on its "
            "machine is at most its rank among all the processes: fix the launcher's variables, or start the "
            "processes with `trainval fit --nproc N` (or torchrun)."
        )
    elastic_run = source == TORCHRUN
    restarts = env.get("TORCHELASTIC_RESTART_COUNT")
    restart_count = _whole("TORCHELASTIC_RESTART_COUNT", restarts) if elastic_run and restarts else 0
    if world == 1:
        # one process, as the launcher says (torchrun --nproc 1 sets all of them): rank 0 by the check above
        return Launch(
            by_torchrun=True,
            elastic_run=elastic_run,
            restart_count=restart_count,
            timeout_s=timeout_s,
            source=source,
        )
    address, port = _rendezvous(env, world, what="WORLD_SIZE", unset="WORLD_SIZE")
    return Launch(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        by_torchrun=True,
        elastic_run=elastic_run,
        # honoured only in torchrun's workers: a stray one must not turn a fresh fit into a resume
        restart_count=restart_count,
        timeout_s=timeout_s,
        source=source,
        master_addr=address,
        master_port=port,
        local_rank_known=known,
    )


def _read_slurm(env: Mapping[str, str], timeout_s: float) -> Launch:
    """An ``srun`` task: SLURM_PROCID of SLURM_NTASKS, SLURM_LOCALID on its node."""
    missing = [name for name in ("SLURM_PROCID", "SLURM_NTASKS") if not env.get(name)]
    if missing:
        raise ConfigError(
            f"this is a SLURM job step (SLURM_STEP_ID is set), but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; srun sets SLURM_PROCID and SLURM_NTASKS for every "
            "task: start trainval with srun, or unset SLURM_STEP_ID to run one process."
        )
    rank, world = _whole("SLURM_PROCID", env["SLURM_PROCID"]), _whole("SLURM_NTASKS", env["SLURM_NTASKS"])
    if world < 1 or rank >= world:
        raise ConfigError(
            f"the environment variable SLURM_PROCID={rank} is not below SLURM_NTASKS={world}; srun numbers its "
            "tasks 0 to SLURM_NTASKS-1: start trainval with srun, or unset SLURM_STEP_ID to run one process."
        )
    if world == 1:  # `srun trainval fit ... --nproc 8`, an interactive `srun --pty bash`: one process here
        return Launch(timeout_s=timeout_s)
    local = env.get("SLURM_LOCALID")
    local_rank = _whole("SLURM_LOCALID", local) if local else rank
    if local_rank > rank:
        raise ConfigError(
            f"the environment variable SLURM_LOCALID={local_rank} is above SLURM_PROCID={rank}; srun sets both: "
            "start trainval with srun."
        )
    address = env.get("MASTER_ADDR") or ""
    if not address:
        nodelist_var = next(
            (n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(n)), None
        )
        if nodelist_var is None:
            raise ConfigError(
                f"SLURM_NTASKS={world} asks for {world} processes, but neither MASTER_ADDR nor "
                "SLURM_JOB_NODELIST (whose first host would be where they meet) is set; set MASTER_ADDR to "
                "the first task's host name."
            )
        address = expand_nodelist(env[nodelist_var], nodelist_var)[0]
    if not env.get("MASTER_PORT"):
        job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
        if not job:
            raise ConfigError(
                f"SLURM_NTASKS={world} asks for {world} processes, but neither MASTER_PORT nor SLURM_JOB_ID "
                "(from which every task derives the same port) is set; export MASTER_PORT=<a free port> "
                "before srun."
            )
        port = slurm_port(_whole("SLURM_JOB_ID", job))
    else:
        _, port = _rendezvous(
            {**env, "MASTER_ADDR": address}, world, what="SLURM_NTASKS", unset="SLURM_STEP_ID"
        )
    return Launch(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        by_torchrun=True,
        timeout_s=timeout_s,
        source=SLURM,
        master_addr=address,
        master_port=port,
        local_rank_known=bool(local),
    )


def slurm_port(job_id: int) -> int:
    """The port the tasks of SLURM job ``job_id`` meet at when ``MASTER_PORT`` is not set: 15000 to 24999.

    Two multi-task job steps of one job running at once need a ``MASTER_PORT`` each."""
    return SLURM_PORT_BASE + job_id % 10000


_MAX_HOSTS = 100_000


def expand_nodelist(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
    """SLURM's compressed host list, expanded in order: ``node[01-03,07]`` -> node01, node02, node03, node07;
    ``a1,b[2-3]`` -> a1, b2, b3; ``r[1-2]n[1-2]`` -> r1n1, r1n2, r2n1, r2n2 (zero-padding kept)."""
    hosts: list[str] = []
    try:
        for token in _split_top_level(nodelist.strip()):
            hosts.extend(_expand_host(token))
            if len(hosts) > _MAX_HOSTS:
                break
    except ValueError:
        hosts = []
    if not hosts:
        raise ConfigError(
            f"the environment variable {name}={shown_repr(nodelist)} is not a SLURM host list (like "
            "node[01-03,07] or a1,b[2-3]); set MASTER_ADDR to the first task's host name."
        )
    return hosts


def _split_top_level(text: str) -> list[str]:
    """``a1,b[2-3]`` -> ``a1``, ``b[2-3]``: the commas outside brackets."""
    tokens, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(text)
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(text)
        elif char == "," and depth == 0:
            tokens.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(text)
    tokens.append(text[start:])
    if not all(tokens):
        raise ValueError(text)
    return tokens


def _expand_host(token: str, tail: bool = False) -> list[str]:
    """One host name with bracketed ranges: every combination, in order (``tail``: the rest after a
    bracket, which may be empty)."""
    if "[" not in token:
        if "]" in token or not (token or tail):
            raise ValueError(token)
        return [token]
    prefix, _, rest = token.partition("[")
    ranges, _, suffix = rest.partition("]")
    tails = _expand_host(suffix, tail=True)
    out: list[str] = []
    for part in ranges.split(","):
        low, dash, high = part.partition("-")
        if not (_WHOLE.fullmatch(low) and (not dash or _WHOLE.fullmatch(high))):
            raise ValueError(token)
        last = int(high) if dash else int(low)
        if last < int(low) or (last - int(low) + 1) * len(tails) > _MAX_HOSTS:
            raise ValueError(token)
        for number in range(int(low), last + 1):
            out.extend(f"{prefix}{number:0{len(low)}d}{end}" for end in tails)
    return out


def _rendezvous(env: Mapping[str, str], world: int, what: str, unset: str) -> tuple[str, int]:
    """Where the processes meet (torch's env:// rendezvous): MASTER_ADDR and a port number."""
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    launch = (
        f"start the processes with `trainval fit --nproc N` (or torchrun), which sets it, or unset {unset} "
    )
    if not address:
        raise ConfigError(
            f"{what}={world} asks for {world} processes, but the environment variable MASTER_ADDR "
            f"(where they meet) is not set; {launch}to run one process."
        )
    number = int(port) if port and _WHOLE.fullmatch(port) else 0
    if not 1 <= number <= 65535:
        raise ConfigError(
            f"{what}={world} asks for {world} processes, but the environment variable MASTER_PORT="
            f"{shown_repr(port)} is not a port number (1 to 65535); {launch}to run one process."
        )
    return address, number
