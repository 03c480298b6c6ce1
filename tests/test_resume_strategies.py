"""Resume across strategies (1 process, DDP, FSDP) and process counts at an epoch's end: real gloo processes.

What must be equal, and why:

- DDP on 2 processes and FSDP on 2 processes take bit-identical steps: every rank holds the same full
  parameters in the forward (FSDP gathers its shards), computes the same local gradient, and the mean over
  2 ranks is ``(a + b) / 2`` under DDP's all-reduce and ``a / 2 + b / 2`` under FSDP's reduce-scatter: equal
  in binary floating point (a division by 2 is exact, and a sum of two numbers has one order). Adam is
  elementwise, so its sharded state is the full one cut in rows. A DDP ``last.pt`` resumed under FSDP must
  therefore end bit for bit where FSDP throughout ends. (With 3 processes the division by 3 rounds and the
  order of the sum may differ: equal to rounding only.)
- One process with batch 16 and 2 processes with batch 8 train the same samples per step (the 2 ranks'
  shards of one global batch are its 16 samples), but sum them in another order: equal to rounding only. So
  a one-process ``last.pt`` resumed under FSDP (2) is compared bit for bit with the same file resumed under
  DDP (2), and to rounding with FSDP throughout.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_distributed import CHILD, _ddp_child_module, run_child

pytestmark = pytest.mark.slow

OPTS = {"batch": 8, "blocks": True, "adam": True}  # 96 training samples: 6 steps per epoch on 2 processes


def _run(out_dir, nproc, **opts):
    """The child on ``nproc`` processes (every rank's done-marker of an earlier run in the folder removed)."""
    for marker in glob.glob(os.path.join(out_dir, "done.*")):
        os.remove(marker)
    return run_child(out_dir, nproc, **{**OPTS, **opts})


def _full_state(folder) -> tuple[dict, dict]:
    """last.pt's model weights and optimizer tensors by parameter name (``state.<name>.<key>``), whether it
    is one whole file (its optimizer state keyed by index) or DCP's shards put together."""
    from trainval.checkpoint import sharded

    path = os.path.join(folder, "last.pt")
    state = torch.load(path, weights_only=True)
    if "shards" in state:
        return sharded.consolidate(state["shards"], path, "model"), sharded.consolidate(
            state["shards"], path, "optimizer"
        )
    names = [n for n, _ in _ddp_child_module().make_model(blocks=True).named_parameters()]  # the index order
    by_name = {
        f"state.{names[i]}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()
    }
    return state["model"], by_name


def _assert_equal(a, b, exact=True):
    for x, y in zip(a, b):
        assert set(x) == set(y) and len(x) > 0
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), k
            else:
                assert torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-7), k


def _adam_steps(state) -> set[float]:
    return {float(v) for k, v in state[1].items() if k.endswith(".step")}


@pytest.fixture(scope="module")
def fsdp_throughout(tmp_path_factory):
    """2 epochs under FSDP on 2 processes, uninterrupted: the reference."""
    out = tmp_path_factory.mktemp("fsdp_throughout")
    _run(out, 2, epochs=2, strategy="fsdp")
    return out


def test_a_ddp_last_pt_resumes_under_fsdp_bit_identical_to_fsdp_throughout(fsdp_throughout, tmp_path):
    proc, cut = _run(tmp_path, 2, epochs=2, strategy="ddp", stop_after=1, resume_strategy="fsdp")
    assert "(epoch 1, batch 0)" in proc.stdout and cut["strategy"] == "fsdp"
    assert "resuming on" not in proc.stdout  # the same number of processes: nothing changed to tell
    resumed, reference = _full_state(tmp_path), _full_state(fsdp_throughout)
    assert "shards" in torch.load(tmp_path / "last.pt", weights_only=True)  # FSDP wrote it
    _assert_equal(resumed, reference)  # weights, Adam's exp_avg, exp_avg_sq and step, bit for bit
    assert len([k for k in resumed[1] if k.endswith("exp_avg")]) == 6
    # 2 epochs x 6 steps: Adam's state came through the resume (dropped, it would count 6)
    assert _adam_steps(resumed) == {12.0}


def test_a_one_process_last_pt_resumes_under_fsdp_and_an_fsdp_one_under_one_process(
    fsdp_throughout, tmp_path
):
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    _run(one, 1, batch=16, epochs=1)  # the same global batch (16) as 2 processes of 8
    shutil.copytree(one, ddp)
    proc, fsdp = _run(one, 2, epochs=2, resume=True, strategy="fsdp")
    assert fsdp["strategy"] == "fsdp" and "(epoch 1, batch 0)" in proc.stdout
    assert (
        proc.stdout.count(
            f"resuming on 2 processes where {one}/last.pt was written by 1: the global batch stays 16."
        )
        == 1
    )
    _run(ddp, 2, epochs=2, resume=True, strategy="ddp")
    _assert_equal(_full_state(one), _full_state(ddp))  # the same file resumed under FSDP and DDP: bit for bit
    assert _adam_steps(_full_state(one)) == {6.0 + 6.0}  # one process's 6 steps, then 6 on 2 processes
    _assert_equal(
        _full_state(one), _full_state(fsdp_throughout), exact=False
    )  # epoch 1 summed in another order
    # and back: FSDP's shards (2 processes) and DDP's whole file, each resumed on one process, end equal
    proc, single = _run(one, 1, batch=16, epochs=3, resume=True)
    assert single["strategy"] == "single" and "(epoch 2, batch 0)" in proc.stdout
    assert (
        f"resuming on 1 process where {one}/last.pt was written by 2: the global batch stays 16."
        in proc.stdout
    )
    _run(ddp, 1, batch=16, epochs=3, resume=True)
    _assert_equal(_full_state(one), _full_state(ddp))
    assert _adam_steps(_full_state(one)) == {18.0}
    assert "model" in torch.load(one / "last.pt", weights_only=True)  # one whole file again


def _onecycle_lr(total_steps, steps):
    """A OneCycleLR as the child builds it (Adam lr 0.01, max_lr 0.05), after ``steps`` steps: its lr."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total_steps)
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return optimizer.param_groups[0]["lr"]


def test_another_process_count_is_told_and_a_onecycle_schedule_is_replanned(tmp_path):
    two, short = tmp_path / "two", tmp_path / "short"
    onecycle = {
        "epochs": 2
    }  # planned for 2 epochs of this run's steps: 6 per epoch on 2 processes, 12 on one
    _run(two, 2, epochs=1, onecycle=onecycle)  # DDP, 1 epoch of the 2 planned
    shutil.copytree(two, short)
    proc, resumed = _run(two, 1, epochs=2, onecycle=onecycle, resume=True)
    notice = (
        f"resuming on 1 process where {two}/last.pt was written by 2: the global batch is now 8, was 16; "
        "the OneCycleLR schedule is re-planned for 12 steps per epoch and continues at step 12 of 24, was step 6."
    )
    assert proc.stdout.count(notice) == 1 and proc.stdout.count("resuming on") == 1
    # epoch 2 starts where an uninterrupted one-process run stands: step 12 of its 24
    replanned = _onecycle_lr(24, 12)
    assert resumed["history"][1]["lr"] == replanned
    assert replanned != _onecycle_lr(12, 6)  # the control: the old plan's position has another lr
    last = torch.load(two / "last.pt", weights_only=True)
    assert (last["scheduler"]["last_epoch"], last["scheduler"]["total_steps"]) == (24, 24)  # ran to its end
    assert last["loop"]["global_step"] == 6 + 12
    assert {float(s["step"]) for s in last["optimizer"]["state"].values()} == {18.0}  # Adam's state kept
    # a schedule planned for 2 processes' steps (12) cannot hold one process's (24): refused before any step
    before = (short / "last.pt").read_bytes()
    for marker in glob.glob(os.path.join(short, "done.*")):
        os.remove(marker)
    opts = {**OPTS, "epochs": 2, "resume": True, "onecycle": {"epochs": 2, "world": 2}}
    proc = subprocess.run(
        [sys.executable, CHILD, str(short), json.dumps(opts)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and not (short / "done.0").exists()
    assert (
        "the OneCycleLR scheduler plans 12 steps, but the 1 epoch done and the 12 steps left take 24 at this "
        "size"
    ) in proc.stderr
    assert (short / "last.pt").read_bytes() == before
