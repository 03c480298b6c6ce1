"""torch.distributed glue: launcher detection, process-group set-up/teardown, rank-aware helpers.

Launch with ``torchrun --nproc_per_node=N ...``, ``srun`` tasks, or anything that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (:mod:`trainval.launch` reads and checks them all);
:func:`setup` joins the group: NCCL on CUDA, gloo on CPU, the device taken from the local rank
(:func:`cuda_index`). Collectives time out after
``TRAINVAL_DIST_TIMEOUT`` seconds (default 300), so that ranks whose peer died exit with an error
instead of hanging forever.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainval import launch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """A launcher's variables are set: torchrun's, torch's ``RANK``/``WORLD_SIZE``, or an ``srun`` task's
    (checked by :func:`trainval.launch.read`)."""
    return launch.read().by_torchrun


def cuda_index(env: launch.Launch) -> int:
    """The CUDA device of this process: its local rank, modulo the devices it sees.

    Without a local rank from the launcher (``RANK``/``WORLD_SIZE`` alone), the ranks of a node are taken
    as consecutive and spread over its devices (``RANK % device_count``). With fewer devices than local
    ranks, SLURM has bound a GPU per task (``--gpus-per-task``): ``SLURM_LOCALID % device_count``.
    """
    count = torch.cuda.device_count()
    if count < 1:
        return env.local_rank
    if not env.local_rank_known or env.source == launch.SLURM:
        return env.local_rank % count
    return env.local_rank


def elastic_restart_count() -> int:
    """How often torchrun has restarted this worker group (``--max-restarts``); 0 on the first run, and
    0 in a process torchrun did not start (a stray ``TORCHELASTIC_RESTART_COUNT`` is ignored)."""
    return launch.read().restart_count


def timeout_seconds() -> float:
    """``TRAINVAL_DIST_TIMEOUT`` (checked), or 300."""
    return launch.read().timeout_s


def setup(device: torch.device | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group if torchrun launched us (idempotent); return rank information.

    ``timeout_s``: how long a collective waits for its peers (default: :func:`timeout_seconds`).
    The launcher's variables are checked first (:func:`trainval.launch.read`): a bad one is one
    ``ConfigError``.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    env = launch.read()
    if not env.distributed:
        return DistInfo()
    use_cuda = (device.type == "cuda") if device is not None else torch.cuda.is_available()
    if use_cuda and not torch.cuda.is_available():
        from trainval.errors import ConfigError

        raise ConfigError(f"device {str(device)!r} was asked for but CUDA is not available; use 'cpu'.")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(cuda_index(env))
    # torch's env:// rendezvous, told the rank and size: the same for torchrun, srun tasks (whose address
    # and port trainval.launch derived) and a bare RANK/WORLD_SIZE environment
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = env.master_addr, str(env.master_port)
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s or env.timeout_s),
    )
    return info()


def info() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        env = launch.read()
        local_rank = cuda_index(env) if env.distributed else dist.get_rank()  # (the local rank on the CPU)
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size())
    return DistInfo()


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list | None:
    """Every rank's ``obj`` in rank order on rank 0 (``None`` on the others); ``[obj]`` on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order, on every rank; ``[obj]`` on one process."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: int) -> int:
    """The largest ``value`` over ranks (used to agree on stopping)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def count_ranks(flag: bool):
    """Start counting the ranks whose ``flag`` is set; returns a function that waits for the count.

    An asynchronous all-reduce of one integer, on the CPU (through a gloo group of its own when the
    default backend is NCCL, so that reading the count is never a GPU sync point). A stream's loop counts
    once per step which ranks still hold a batch (:meth:`trainval.data.StreamLoader.steps`).
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return lambda: int(flag)
    t = torch.tensor([int(flag)], dtype=torch.int64)
    work = dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_cpu_group(), async_op=True)
    result: list[int] = []

    def wait() -> int:
        if not result:
            work.wait()
            result.append(int(t.item()))
        return result[0]

    return wait


_CPU_GROUPS: dict[int, object] = {}


def _cpu_group():
    """The default group if it runs gloo, else one gloo group over every rank (made once, a collective)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _CPU_GROUPS:
        _CPU_GROUPS[key] = dist.new_group(backend="gloo")
    return _CPU_GROUPS[key]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_in_order(local: torch.Tensor, n_total: int) -> torch.Tensor | None:
    """Rank 0 gets the rows of every rank in dataset order; the others get ``None``.

    Rank ``r`` holds rows ``r, r + W, r + 2W, ...`` of the data set (the unpadded evaluation shard),
    so interleaving the ranks' rows restores the original order, with each sample exactly once.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = _collective_device()
    per_rank = -(-n_total // world)
    buf = torch.zeros((per_rank, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: len(local)] = local.to(dev)
    gathered = [torch.empty_like(buf) for _ in range(world)] if rank == 0 else None
    if dist.get_backend() == "nccl":  # nccl has no gather; all_gather is fine at this size
        gathered_all = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(gathered_all, buf)
        gathered = gathered_all if rank == 0 else None
    else:
        dist.gather(buf, gathered, dst=0)
    if rank != 0:
        return None
    assert gathered is not None  # rank 0 holds the gathered parts
    out = torch.empty((n_total, *local.shape[1:]), dtype=local.dtype)
    for r, part in enumerate(gathered):
        count = len(range(r, n_total, world))
        out[r::world] = part[:count].cpu()
    return out


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated (rank order), on every rank's CPU; ranks may hold different counts.

    Used once per epoch by metrics that need every sample's score (exact AUROC): two collectives.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local.cpu()
    world, dev = dist.get_world_size(), _collective_device()
    count = torch.tensor([len(local)], dtype=torch.int64, device=dev)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    buf = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[: len(local)] = local.to(dev)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:n].cpu() for p, n in zip(parts, sizes)])


def gather_by_position(local: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """Every rank's rows on every rank's CPU, ordered by their ``positions`` (each row's place in a stream).

    Without positions (a stream split by the dataset's own ``split_by_rank``), rank 0's rows come first,
    then rank 1's, each rank's in the order it read them. Four collectives (counts and rows, twice).
    """
    rows = gather_rows(local)
    if positions is None:
        return rows
    order = gather_rows(positions)
    return rows[torch.argsort(order, stable=True)]


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def run_and_exit(main, *args, **kwargs) -> None:
    """Run ``main(*args, **kwargs)`` in a torchrun worker, then leave with its exit code.

    For your own scripts launched with torchrun: ``distributed.run_and_exit(main)`` at the bottom
    returns exit code 0 after a successful run, 1 (with the traceback printed) after an exception,
    and the code of a ``SystemExit``, without the interpreter-teardown abort described below.
    """
    import traceback

    try:
        result = main(*args, **kwargs)
        code = result if isinstance(result, int) else 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported, then turned into the exit code
        # torchrun SIGTERMs the other workers as soon as one fails: this one's report must not be cut short
        ignore_stop_signals()
        traceback.print_exc()
        code = 1
    teardown_and_exit(code)


def teardown_and_exit(code: int) -> None:
    """The work is done: leave the process group and exit with ``code``, deaf to SIGINT/SIGTERM.

    A signal arriving now (torchrun forwarding a Ctrl-C that came just after the last output) has
    nothing left to stop; it must not turn a finished run into a traceback or another exit code.
    """
    ignore_stop_signals()
    teardown()
    exit_process(code)


def exit_process(code: int) -> None:
    """Flush and leave now, skipping interpreter teardown; SIGINT/SIGTERM are ignored meanwhile.

    With torch 2.13 and gloo, a worker sometimes aborts (SIGABRT, "terminate called without an active
    exception") while the interpreter tears down, after all its work is done. Every output is written
    and flushed by then, so distributed runs leave through ``os._exit`` with the real exit code.
    """
    ignore_stop_signals()  # a KeyboardInterrupt raised inside the flush would print a traceback
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM do nothing from now on (in the main thread; elsewhere this is a no-op)."""
    if threading.current_thread() is threading.main_thread():  # (signal.signal works there only)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, on ``t``'s device. No host sync where the backend runs on that device
    (NCCL on CUDA, gloo on the CPU): the exact accumulation's one small all-reduce per optimizer step."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    out = t.to(
        _collective_device()
    )  # a copy only for gloo with CUDA tensors (a sync; no default set-up does it)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)
