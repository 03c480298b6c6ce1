"""What the launcher's environment says about this process, read and checked in one place.

torchrun starts each worker with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` (and ``TORCHELASTIC_RUN_ID``/``TORCHELASTIC_RESTART_COUNT``); trainval adds
``TRAINVAL_DIST_TIMEOUT``. Anyone can set them in a shell, so :func:`read` checks them all: a value that
is not a whole number (or a timeout that is not a number of seconds) is one :class:`ConfigError` naming
the variable, its value and what to set, never a traceback deep inside torch.

Several processes run only when ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` are all set and
``WORLD_SIZE`` is above 1; otherwise this is the one (main) process, whatever ``RANK`` says. This module
imports no torch, so that the CLI checks the environment before a config error, as fast.
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
_LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
_WHOLE = re.compile(r"[0-9]{1,10}")


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes a launcher started (the defaults: one process)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    by_torchrun: bool = False  # RANK, LOCAL_RANK and WORLD_SIZE are all set
    elastic_run: bool = False  # ... and TORCHELASTIC_RUN_ID: torchrun's own workers
    restart_count: int = 0  # how often torchrun restarted the workers (--max-restarts); 0 elsewhere
    timeout_s: float = DEFAULT_TIMEOUT_S  # TRAINVAL_DIST_TIMEOUT

    @property
    def distributed(self) -> bool:
        """Several processes: launched with ``WORLD_SIZE`` above 1."""
        return self.by_torchrun and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 of several processes, or the only one: the process that holds run-folder locks and writes."""
        return not self.distributed or self.rank == 0


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
    given = {name: env[name] for name in _LAUNCHER if env.get(name)}
    numbers = {name: _whole(name, value) for name, value in given.items()}
    world = numbers.get("WORLD_SIZE", 1)
    if "WORLD_SIZE" in numbers and world < 1:
        raise ConfigError(
            "the environment variable WORLD_SIZE=0 is not a number of processes; unset it to run one "
            "process, or start several with `trainval fit --nproc N`."
        )
    by_torchrun = len(numbers) == len(_LAUNCHER)
    rank = numbers.get("RANK", 0)
    if by_torchrun and world > 1:
        if rank >= world:
            raise ConfigError(
                f"the environment variable RANK={rank} is not below WORLD_SIZE={world}; a process's rank "
                "is 0 to WORLD_SIZE-1: start the processes with `trainval fit --nproc N` (or torchrun)."
            )
        _check_rendezvous(env, world)
    elastic_run = by_torchrun and bool(env.get("TORCHELASTIC_RUN_ID"))
    restarts = env.get("TORCHELASTIC_RESTART_COUNT")
    return Launch(
        rank=rank if by_torchrun and world > 1 else 0,
        local_rank=numbers.get("LOCAL_RANK", 0) if by_torchrun and world > 1 else 0,
        world_size=world if by_torchrun else 1,
        by_torchrun=by_torchrun,
        elastic_run=elastic_run,
        # honoured only in torchrun's workers: a stray one must not turn a fresh fit into a resume
        restart_count=_whole("TORCHELASTIC_RESTART_COUNT", restarts) if elastic_run and restarts else 0,
        timeout_s=_timeout(env.get("TRAINVAL_DIST_TIMEOUT")),
    )


def _check_rendezvous(env: Mapping[str, str], world: int) -> None:
    """Where the processes meet (torch's env:// rendezvous): MASTER_ADDR and a port number."""
    address, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    launch = (
        "start the processes with `trainval fit --nproc N` (or torchrun), which sets it, or unset WORLD_SIZE "
    )
    if not address:
        raise ConfigError(
            f"WORLD_SIZE={world} asks for {world} processes, but the environment variable MASTER_ADDR "
            f"(where they meet) is not set; {launch}to run one process."
        )
    number = int(port) if port and _WHOLE.fullmatch(port) else 0
    if not 1 <= number <= 65535:
        raise ConfigError(
            f"WORLD_SIZE={world} asks for {world} processes, but the environment variable MASTER_PORT="
            f"{shown_repr(port)} is not a port number (1 to 65535); {launch}to run one process."
        )
