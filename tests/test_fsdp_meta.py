"""FSDP from a model built on the meta device: each rank materialises only its shards, and the model equals a
plain build after the same seed (real gloo processes through torchrun; tests/helpers/fsdp_meta_child.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from torch import nn

from trainval import Trainer
from trainval.app.workflow import build_model
from trainval.errors import ConfigError
from trainval.loop.strategies import FSDPStrategy, SingleProcess

CHILD = os.path.join(REPO, "tests", "helpers", "fsdp_meta_child.py")


def _torchrun(out_dir, *args: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        CHILD,
        str(out_dir),
        *args,
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    # gloo may abort a worker at interpreter exit after all its work (see test_distributed.torchrun_ok)
    done = all(os.path.exists(os.path.join(out_dir, f"done.{r}")) for r in range(2))
    assert proc.returncode == 0 or done, proc.stdout + proc.stderr


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_meta_model_sharded_by_fsdp_equals_a_plain_build_bit_for_bit(tmp_path):
    _torchrun(tmp_path, "weights")
    saved = torch.load(tmp_path / "weights.pt", weights_only=True)
    plain, meta = saved["plain"], saved["meta"]
    assert _same_state(plain["state"], meta["state"])  # gathered full weights and BatchNorm buffers
    assert torch.equal(plain["out"], meta["out"])  # and the sharded forward that uses them
    # the values are drawn, not a constant fill: the two blocks' (same-shaped) weights differ
    assert not torch.equal(meta["state"]["blocks.0.0.weight"], meta["state"]["blocks.1.0.weight"])
    assert meta["optimizer_holds_model_params"] and not meta["is_meta"]
    assert (
        meta["local_numel"]
        == plain["local_numel"]
        < sum(t.numel() for k, t in meta["state"].items() if "running" not in k and "num_batches" not in k)
    )


@pytest.mark.slow
def test_fit_from_a_meta_model_under_fsdp_equals_fit_from_a_plain_build(tmp_path):
    _torchrun(tmp_path, "fit")
    histories = torch.load(tmp_path / "fit.pt", weights_only=True)
    assert len(histories["meta"]) == 2 and histories["meta"] == histories["plain"]
    best = {k: torch.load(tmp_path / k / "best.pt", weights_only=True)["model"] for k in ("plain", "meta")}
    assert _same_state(best["plain"], best["meta"])


@pytest.mark.slow
def test_a_meta_fsdp_start_peaks_below_the_whole_model_per_rank(tmp_path):
    """~288 MiB of fp32 weights on 2 ranks: a plain start holds the whole model (and then its shard) on
    every rank; a meta start holds its half plus one block's full weights while it is initialised."""
    records = {}
    for kind in ("plain", "meta"):
        _torchrun(tmp_path / kind, "rss", kind)
        records[kind] = [json.loads((tmp_path / kind / f"rss.{r}.json").read_text()) for r in range(2)]
    full = records["meta"][0]["full_bytes"]
    assert full == 18 * 2048 * 2048 * 4
    for plain, meta in zip(records["plain"], records["meta"]):
        plain_bytes, meta_bytes = plain["growth_kib"] * 1024, meta["growth_kib"] * 1024
        assert plain_bytes > full  # the control: the measure sees a whole-model build
        assert meta["local_bytes"] == full // 2 <= meta_bytes  # the shard really is allocated and written
        # never the whole model: its half, one block being initialised and the allocator's slack (measured
        # 177-185 MiB of growth on a quiet machine, up to 217 MiB under load, against 433 MiB for a plain start)
        assert meta_bytes < full
        assert meta_bytes < 0.6 * plain_bytes


@pytest.mark.parametrize(
    "cfg,in_shape",
    [
        ({"name": "mlp", "hidden": [32, 16], "dropout": 0.1, "batchnorm": True}, [8]),
        ({"name": "cnn", "channels": [4, 8], "dropout": 0.25}, [1, 8, 8]),
    ],
)
def test_the_cli_models_built_on_meta_materialise_to_a_plain_build(cfg, in_shape):
    torch.manual_seed(7)
    plain = build_model(cfg, in_shape, 5)
    torch.manual_seed(7)
    meta = build_model(cfg, in_shape, 5, on_meta=True)
    assert all(t.is_meta for t in meta.state_dict().values())
    optimizer = torch.optim.SGD(meta.parameters(), lr=0.1)
    SingleProcess().wrap(meta, optimizer, torch.device("cpu"), lambda m: m)
    assert _same_state(plain.state_dict(), meta.state_dict())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in meta.parameters()]


class _NoInit(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(x * self.scale)


@pytest.fixture
def one_process_group():
    """FSDP on one process makes a one-member process group in this process: gone after the test."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def test_a_meta_module_without_an_initialiser_is_one_clear_error_and_param_init_fills_it(one_process_group):
    with torch.device("meta"):
        model = _NoInit()
    X, y = torch.randn(16, 3), torch.arange(16) % 2
    with pytest.raises(ConfigError, match=r"module '\(the root\)' \(_NoInit\).*reset_parameters.*param_init"):
        Trainer(model, strategy=FSDPStrategy(), max_epochs=1, progress=False, device="cpu").validate((X, y))

    def param_init(module: nn.Module) -> None:
        if isinstance(module, _NoInit):
            module.scale.fill_(1.0)
        else:
            module.reset_parameters()

    with torch.device("meta"):
        model = _NoInit()
    trainer = Trainer(model, strategy=FSDPStrategy(param_init=param_init), progress=False, device="cpu")
    trainer.validate((X, y))
    state = trainer.strategy.model_state_dict(trainer.model)
    assert torch.equal(state["scale"], torch.ones(3)) and torch.isfinite(state["head.weight"]).all()


def test_a_model_partly_on_meta_is_one_clear_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, device="meta"))
    with pytest.raises(ConfigError, match=r"2 of its 4 parameters and buffers on the meta device"):
        Trainer(model, progress=False, device="cpu").validate((torch.randn(8, 3), torch.arange(8) % 2))
