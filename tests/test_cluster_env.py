"""Issue 21: clusters as they are. One launcher-environment detector (trainval.launch) for torchrun, SLURM
``srun`` tasks and plain RANK/WORLD_SIZE/MASTER_* (PyTorchJob, mpirun wrappers); a partial environment is
one line; ``--node-rank`` is honoured (static rendezvous) and a waiting launcher says what it waits for;
``train.device=cuda --nproc 2`` without CUDA is one line; a crashed rank's error is printed last, once.

The multi-process tests start real gloo processes on the CPU: two plain subprocesses with an srun task's
(or a PyTorchJob pod's) variables, no torchrun, must train exactly like ``trainval fit --nproc 2``.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, run_cli

from trainval import launch
from trainval.app import cli
from trainval.errors import ConfigError

# the variables of every launcher: removed from the environment of the processes these tests start
LAUNCHER_VARS = [
    name
    for name in os.environ
    if name.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
    or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
]
FIT = [
    "fit",
    "model.name=mlp",
    "train.epochs=2",
    "train.batch_size=32",
    "log.plot=false",
    "train.progress=false",
]


def clean_env(path: str = "", **extra: str) -> dict[str, str]:
    """This environment less any launcher's variables; ``path`` goes in front of PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


# ------------------------------------------------------------------------------------------------
# The detector: SLURM host lists


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu-node-17", ["gpu-node-17"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[008-010]", ["n008", "n009", "n010"]),
        ("rack[1-2]n[1-2]", ["rack1n1", "rack1n2", "rack2n1", "rack2n2"]),
        ("x[3],y", ["x3", "y"]),
        ("10.0.0.[1-2]", ["10.0.0.1", "10.0.0.2"]),
    ],
)
def test_slurm_host_lists_are_expanded_in_order(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    "nodelist", ["", "node[", "node]", "node[3-1]", "node[a-b]", "a,,b", ",a", "n[[1]]", "n[1-]"]
)
def test_a_malformed_host_list_is_one_error_naming_it(nodelist):
    with pytest.raises(ConfigError) as caught:
        launch.expand_nodelist(nodelist)
    assert "SLURM_JOB_NODELIST=" in str(caught.value) and "MASTER_ADDR" in str(caught.value)


# ------------------------------------------------------------------------------------------------
# The detector: each launcher


def srun_task(rank: int, ntasks: int = 2, **extra: str) -> dict[str, str]:
    """What srun gives each task of a job step."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_LOCALID": str(rank % 8),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        **extra,
    }


def test_srun_tasks_are_one_job_meeting_at_the_first_host():
    tasks = [launch.read(srun_task(r, 16, SLURM_LOCALID=str(r % 8))) for r in range(16)]
    assert [t.rank for t in tasks] == list(range(16))
    assert {(t.world_size, t.master_addr, t.master_port, t.source) for t in tasks} == {
        (16, "gpu07", 15000 + 4242, "slurm")
    }
    assert [t.local_rank for t in tasks] == [r % 8 for r in range(16)] and all(t.distributed for t in tasks)
    assert [t.is_main for t in tasks] == [True] + [False] * 15
    # the step's own node list first (a step may run on part of the job's nodes); MASTER_* win when set
    assert launch.read(srun_task(1, SLURM_STEP_NODELIST="gpu[08]")).master_addr == "gpu08"
    given = launch.read(srun_task(1, MASTER_ADDR="10.1.2.3", MASTER_PORT="29400"))
    assert (given.master_addr, given.master_port) == ("10.1.2.3", 29400)
    assert launch.slurm_port(123456) == 15000 + 3456


def test_an_sbatch_script_and_a_one_task_step_are_one_process():
    # the batch script itself has SLURM_PROCID=0 and the allocation's SLURM_NTASKS, but no job step
    batch = {k: v for k, v in srun_task(0, 16).items() if k != "SLURM_STEP_ID"}
    assert launch.read(batch) == launch.Launch()
    assert launch.read(srun_task(0, 1)) == launch.Launch()  # `srun --ntasks=1 trainval fit ... --nproc 8`


def test_torchruns_variables_win_over_slurms():
    """`trainval fit --nproc 2` inside an srun task: torchrun's workers inherit the task's SLURM_*."""
    worker = {
        **srun_task(1, 2),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29511",
        "TORCHELASTIC_RUN_ID": "x",
    }
    got = launch.read(worker)
    assert (got.source, got.rank, got.world_size, got.master_addr, got.master_port) == (
        "torchrun",
        0,
        2,
        "127.0.0.1",
        29511,
    )


def test_rank_and_world_size_without_local_rank_are_one_job():
    """PyTorchJob, mpirun wrappers: LOCAL_RANK is RANK % LOCAL_WORLD_SIZE, or unknown here (then the node's
    CUDA devices decide, trainval.distributed.cuda_index)."""
    base = {"WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
    plain = [launch.read({**base, "RANK": str(r)}) for r in range(4)]
    assert [(p.rank, p.world_size, p.distributed, p.source) for p in plain] == [
        (r, 4, True, "env") for r in range(4)
    ]
    assert not any(p.local_rank_known for p in plain) and [p.is_main for p in plain] == [
        True,
        False,
        False,
        False,
    ]
    local = [launch.read({**base, "RANK": str(r), "LOCAL_WORLD_SIZE": "2"}) for r in range(4)]
    assert [p.local_rank for p in local] == [0, 1, 0, 1] and all(p.local_rank_known for p in local)


def test_the_cuda_device_of_each_rule(monkeypatch):
    from trainval import distributed

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    base = {"WORLD_SIZE": "16", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert distributed.cuda_index(launch.read({**base, "RANK": "11"})) == 3  # no local rank: RANK % devices
    assert distributed.cuda_index(launch.read({**base, "RANK": "11", "LOCAL_RANK": "3"})) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1: one device per task
    assert distributed.cuda_index(launch.read(srun_task(5, 8, SLURM_LOCALID="5"))) == 0


TWO = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}


@pytest.mark.parametrize(
    "env, named",
    [
        ({"RANK": "1"}, "RANK=1 but not WORLD_SIZE"),
        ({"RANK": "0", "LOCAL_RANK": "0", **TWO}, "RANK=0, LOCAL_RANK=0 but not WORLD_SIZE"),
        ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 but not WORLD_SIZE"),
        ({"WORLD_SIZE": "2", **TWO}, "WORLD_SIZE=2 asks for 2 processes, but RANK"),
        ({"RANK": "2", "WORLD_SIZE": "2", **TWO}, "RANK=2 is not below WORLD_SIZE=2"),
        ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR (where they meet) is not set"),
        ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT=None is not a port number"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", **TWO}, "LOCAL_RANK=2 is above RANK=1"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "0", **TWO}, "LOCAL_WORLD_SIZE=0"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "x", **TWO}, "LOCAL_WORLD_SIZE='x'"),
        ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}, "SLURM_PROCID is not set"),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "1"}, "SLURM_NTASKS is not set"),
        ({**srun_task(2, 2)}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
        ({**srun_task(1), "SLURM_JOB_NODELIST": ""}, "neither MASTER_ADDR nor SLURM_JOB_NODELIST"),
        ({**srun_task(1), "SLURM_JOB_NODELIST": "gpu[07-"}, "SLURM_JOB_NODELIST='gpu[07-'"),
        ({**srun_task(1), "SLURM_JOB_ID": ""}, "neither MASTER_PORT nor SLURM_JOB_ID"),
        ({**srun_task(1), "MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a port number"),
        ({**srun_task(1), "SLURM_LOCALID": "3"}, "SLURM_LOCALID=3 is above SLURM_PROCID=1"),
        ({**srun_task(1), "SLURM_PROCID": "one"}, "SLURM_PROCID='one'"),
    ],
)
def test_a_partial_or_inconsistent_environment_is_one_error(env, named):
    with pytest.raises(ConfigError) as caught:
        launch.read(env)
    message = str(caught.value)
    assert named in message and "\n" not in message, message


@pytest.mark.parametrize(
    "env",
    [
        {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"},
        {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "1"},
    ],
    ids=["world_size_without_rank", "srun_step_without_procid"],
)
def test_the_cli_refuses_a_partial_environment_in_one_line_before_training(tmp_path, env):
    """Before: WORLD_SIZE=2 without RANK, or an srun step without SLURM_PROCID, trained one process alone."""
    proc = run_cli(*FIT, f"run.out_dir={tmp_path}", env=env, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(err.splitlines()) == 1 and err.startswith("trainval: error: "), err
    assert not (tmp_path / "digits").exists()


# ------------------------------------------------------------------------------------------------
# A PyTorchJob manifest: the environment each pod gets is one job


def pytorchjob_pod_envs(manifest: dict) -> list[tuple[dict[str, str], list[str]]]:
    """(environment, container args) of every pod, as Kubeflow's training operator sets them without
    nprocPerNode: MASTER_ADDR = <name>-master-0, MASTER_PORT = the port named pytorchjob-port, WORLD_SIZE =
    the number of pods, RANK = 0 for the Master, 1 + i for Worker i (no LOCAL_RANK)."""
    name = manifest["metadata"]["name"]
    specs = manifest["spec"]["pytorchReplicaSpecs"]
    assert "nprocPerNode" not in manifest["spec"]  # WORLD_SIZE then counts pods, and RANK numbers them
    world = sum(spec["replicas"] for spec in specs.values())
    master = specs["Master"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in master["ports"] if p["name"] == "pytorchjob-port")
    pods = []
    for kind in ("Master", "Worker"):
        container = specs[kind]["template"]["spec"]["containers"][0]
        assert container["name"] == "pytorch"  # where the operator puts its variables
        for i in range(specs[kind]["replicas"]):
            rank = 0 if kind == "Master" else 1 + i
            env = {
                "MASTER_ADDR": f"{name}-master-0",
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(world),
                "RANK": str(rank),
                "PYTHONUNBUFFERED": "1",
            }
            pods.append((env, container["args"]))
    return pods


def test_the_pytorchjob_example_gives_each_pod_one_consistent_job():
    with open(os.path.join(REPO, "examples", "pytorchjob.yaml")) as f:
        manifest = yaml.safe_load(f)
    pods = pytorchjob_pod_envs(manifest)
    seen = [launch.read(env) for env, _ in pods]
    assert sorted(s.rank for s in seen) == list(range(len(pods))) == list(range(2))
    assert {(s.world_size, s.master_addr, s.master_port, s.source) for s in seen} == {
        (2, "trainval-digits-master-0", 23456, "env")
    }
    # each pod's `trainval fit ... --nproc 8` is one node of a static rendezvous at the Master's address
    nodes = []
    for (_env, args), seen_env in zip(pods, seen):
        parsed = cli.parse_arguments(cli.build_parser(), list(args))
        assert parsed.command == "fit" and parsed.nproc == 8
        assert cli._cluster_nodes(parsed, seen_env) is None
        nodes.append((parsed.nnodes, parsed.node_rank, parsed.rdzv_endpoint))
    assert nodes == [(2, 0, "trainval-digits-master-0:23456"), (2, 1, "trainval-digits-master-0:23456")]


# ------------------------------------------------------------------------------------------------
# Real processes: srun-style tasks and RANK/WORLD_SIZE-only processes form one job


def free_port(low: int = 1024, high: int = 65535) -> int:
    import random

    for _ in range(200):
        port = random.randint(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def metrics_rows(run) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def nproc_reference(tmp_path_factory):
    """`trainval fit --nproc 2` (torchrun) of the config: its run folder."""
    out = tmp_path_factory.mktemp("torchrun")
    proc = run_cli(*FIT, f"run.out_dir={out}", "--nproc", "2", env=clean_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out / "digits"


def start_tasks(envs: list[dict[str, str]], out, extra=()) -> list[subprocess.CompletedProcess]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "trainval", *FIT, f"run.out_dir={out}", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(**env),
        )
        for env in envs
    ]
    results = []
    for p in procs:
        out_text, err_text = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out_text, err_text))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["srun", "rank_world_only"])
def test_two_plain_processes_form_one_job_equal_to_nproc_2(tmp_path, nproc_reference, kind):
    """Before: each process trained alone; rank 1 failed with "already holds a run"."""
    if kind == "srun":
        port = free_port(15000, 24999)  # the port derived from SLURM_JOB_ID: no MASTER_* given
        envs = [
            {
                "SLURM_JOB_ID": str(port - 15000),
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(r),
                "SLURM_JOB_NODELIST": "127.0.0.[1-2]",
            }
            for r in range(2)
        ]
    else:  # a PyTorchJob pod's, or an mpirun wrapper's: no LOCAL_RANK
        port = free_port()
        envs = [
            {"RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            for r in range(2)
        ]
    procs = start_tasks(envs, tmp_path)
    for proc in procs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Test Acc:" in procs[0].stdout and procs[1].stdout == ""  # only rank 0 prints
    run = tmp_path / "digits"
    assert metrics_rows(run) == metrics_rows(nproc_reference)
    assert (run / "predictions.csv").read_text() == (nproc_reference / "predictions.csv").read_text()


# ------------------------------------------------------------------------------------------------
# --node-rank: static rendezvous; a waiting launcher says so


RANK_RECORDER = """
import os
from torch import nn


class Net(nn.Module):  # an MLP that notes which node's launcher started which global rank
    def __init__(self, num_outputs=10):
        super().__init__()
        folder = os.environ["RANK_RECORDS"]
        open(os.path.join(folder, f"rank{os.environ['RANK']}-node{os.environ['TEST_NODE']}"), "w").close()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, num_outputs))

    def forward(self, x):
        return self.net(x)
"""


def node_launcher(
    tmp_path, node_rank: int, port: int, stderr=subprocess.PIPE, **env: str
) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "trainval",
        "fit",
        "model.name=recorder:Net",
        "train.epochs=1",
        "train.batch_size=64",
        f"run.out_dir={tmp_path / 'shared'}",
        "log.plot=false",
        "train.progress=false",
        "--nproc",
        "2",
        "--nnodes",
        "2",
        "--node-rank",
        str(node_rank),
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
    ]
    full = clean_env(
        path=str(tmp_path), RANK_RECORDS=str(tmp_path / "records"), TEST_NODE=str(node_rank), **env
    )
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=full)


@pytest.mark.slow
def test_the_launcher_of_node_rank_1_owns_global_ranks_2_and_3(tmp_path):
    """Before: c10d ranked the nodes by arrival, so node 1, started first, became ranks 0 and 1."""
    (tmp_path / "recorder.py").write_text(RANK_RECORDER)
    (tmp_path / "records").mkdir()
    port = free_port()
    node1 = node_launcher(tmp_path, 1, port)  # node 1 first: arrival order would make it ranks 0-1
    time.sleep(3)
    node0 = node_launcher(tmp_path, 0, port)
    results = [p.communicate(timeout=300) for p in (node0, node1)]
    for p, (out, err) in zip((node0, node1), results):
        assert p.returncode == 0, out + err
    assert sorted(os.listdir(tmp_path / "records")) == [
        "rank0-node0",
        "rank1-node0",
        "rank2-node1",
        "rank3-node1",
    ]
    assert "Test Acc:" in results[0][0] and results[1][0] == ""  # global rank 0 (node 0) alone prints


@pytest.mark.slow
def test_a_launcher_waiting_for_its_peer_node_says_what_it_waits_for(tmp_path):
    """Before: nothing printed for 600 s. (TRAINVAL_WAIT_NOTICE_S shortens the default 30 s.)"""
    (tmp_path / "recorder.py").write_text(RANK_RECORDER)
    port = free_port()
    log = tmp_path / "node1.err"
    with open(log, "w") as err:
        node1 = node_launcher(tmp_path, 1, port, stderr=err, TRAINVAL_WAIT_NOTICE_S="1")
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and log.read_text().count("trainval: waited") < 2:
            time.sleep(0.2)
    finally:
        node1.send_signal(signal.SIGTERM)
        node1.communicate(timeout=120)
    err_lines = log.read_text().splitlines()
    said = [line for line in err_lines if line.startswith("trainval: waited")]
    assert len(said) >= 2, err_lines
    assert f"for 2 nodes to meet at 127.0.0.1:{port} as node rank 1 (static rendezvous)" in said[0], said[0]
    assert not (tmp_path / "shared" / "digits" / "last.pt").exists()


# ------------------------------------------------------------------------------------------------
# Errors of several processes: one line, and the failing rank's last


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_on_a_machine_without_it_is_one_line_with_nproc_2(tmp_path):
    """Before: a 103-line traceback (one process gave this one line)."""
    proc = run_cli(
        *FIT, "train.device=cuda", f"run.out_dir={tmp_path}", "--nproc", "2", env=clean_env(), timeout=300
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    # one line, from whichever rank reported first (rank 0's carries no prefix)
    assert re.fullmatch(
        r"trainval: error: (\[rank 1\] )?device 'cuda' was asked for but CUDA is not available; use 'cpu'\.", err
    ), err


CRASHER = """
import os
from torch import nn


class Net(nn.Module):  # a bug in rank 1 alone
    def __init__(self, num_outputs=10):
        super().__init__()
        if os.environ.get("RANK") == "1":
            raise RuntimeError("the model of rank one broke")
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, num_outputs))

    def forward(self, x):
        return self.net(x)
"""


@pytest.mark.slow
def test_a_crashed_ranks_error_is_the_last_line_once_with_its_rank(tmp_path):
    """Before: its traceback came first, then torchrun's own report (ChildFailedError, ~40 lines)."""
    (tmp_path / "crasher.py").write_text(CRASHER)
    proc = run_cli(
        *FIT,
        "model.name=crasher:Net",
        f"run.out_dir={tmp_path}",
        "--nproc",
        "2",
        env=clean_env(path=str(tmp_path)),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "trainval: error: [rank 1] RuntimeError: the model of rank one broke", proc.stderr
    assert proc.stderr.count("RuntimeError: the model of rank one broke") == 1
    assert sum(line.startswith("trainval: error:") for line in lines) == 1
    # its traceback, just above, each line marked with the rank; nothing of torchrun's
    assert lines[0] == "[rank 1] Traceback (most recent call last):" and all(
        line.startswith("[rank 1] ") for line in lines[:-1]
    )
    assert 'crasher.py", line 10, in __init__' in proc.stderr
    assert "ChildFailedError" not in proc.stderr and "torch/distributed/run.py" not in proc.stderr
