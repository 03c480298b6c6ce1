"""Real torch.distributed runs: 2 CPU processes with gloo, launched by torchrun.

torch 2.13 + gloo sometimes aborts a worker at interpreter exit ("terminate called without an active
exception") after all its work is done. trainval's entry points leave through os._exit, so this
should not happen; if a run still fails, `torchrun_ok` accepts it only when the abort is that one AND
every rank wrote its done-marker, so real failures are never hidden.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli

CHILD = os.path.join(REPO, "tests", "helpers", "ddp_child.py")
pytestmark = pytest.mark.slow


def torchrun(args, nproc=2, extra=(), timeout=240, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})})


def torchrun_ok(proc, out_dir, nproc=2) -> bool:
    if proc.returncode == 0:
        return True
    aborted_at_exit = "terminate called without an active exception" in proc.stderr
    all_done = all(os.path.exists(os.path.join(out_dir, f"done.{r}")) for r in range(nproc))
    return aborted_at_exit and all_done


def run_child(out_dir, nproc, **opts):
    os.makedirs(out_dir, exist_ok=True)
    if nproc == 1:
        proc = subprocess.run([sys.executable, CHILD, str(out_dir), json.dumps(opts)], capture_output=True, text=True,
                              timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    else:
        proc = torchrun([CHILD, str(out_dir), json.dumps(opts)], nproc=nproc)
    assert torchrun_ok(proc, out_dir, nproc), proc.stdout + proc.stderr
    return proc, torch.load(os.path.join(out_dir, "predictions.pt"), weights_only=True)


def _ddp_child_module():
    spec = importlib.util.spec_from_file_location("ddp_child", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    started = time.perf_counter()
    metrics = ["acc", "f1_macro", "top2_acc"]
    _, one = run_child(tmp_path / "one", 1, batch=16, metrics=metrics)
    proc, two = run_child(tmp_path / "two", 2, batch=8, metrics=metrics)
    for a, b in zip(one["history"], two["history"]):
        for key in ("train_loss", "val_loss", "val_acc", "val_f1_macro", "val_top2_acc", "train_f1_macro"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    from sklearn.metrics import f1_score

    # the confusion matrices were all-reduced: the odd-sized (45) validation set's F1 is scikit-learn's
    expected = f1_score(two["y"].numpy(), two["preds"].numpy(), average="macro")
    assert two["test"]["test_f1_macro"] == pytest.approx(expected, abs=1e-12)
    assert one["test"]["test_f1_macro"] == two["test"]["test_f1_macro"]
    assert torch.equal(one["preds"], two["preds"])  # identical predictions, in dataset order
    assert torch.allclose(one["probs"], two["probs"], atol=1e-5)
    assert one["test"]["test_acc"] == two["test"]["test_acc"]
    for r in range(2):  # every rank got all 45 predictions (gathered, then broadcast)
        assert json.loads((tmp_path / "two" / f"done.{r}").read_text()) == {"world": 2, "n_preds": 45}
    # only rank 0 prints: each epoch line once
    assert proc.stdout.count("[001/003] Train Acc") == 1 and proc.stdout.count("[003/003] Train Acc") == 1
    print(f"2-process equivalence: {time.perf_counter() - started:.1f} s")


def test_eval_counts_each_sample_once_with_uneven_shards(tmp_path):
    # 45 validation samples over 2 ranks with eval batch 4: shards of 23 and 22, no padding duplicates
    _, two = run_child(tmp_path / "r", 2, batch=8, eval_batch=4, epochs=1)
    assert len(two["preds"]) == 45 and two["probs"].shape == (45, 5)
    # The reference, computed here in one process: best.pt's model on the 45 samples in dataset order.
    # The gathered probabilities must be its softmax row for row (a shard out of place, a padded
    # duplicate or a missing softmax would show), and val_acc must count each sample once.
    helper = _ddp_child_module()
    Xv, yv = helper.data(45, 2)
    model = helper.make_model()
    model.load_state_dict(torch.load(tmp_path / "r" / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        expected = model(Xv).softmax(dim=1)
    assert torch.allclose(two["probs"], expected, rtol=0, atol=1e-6)
    assert torch.equal(two["preds"], expected.argmax(dim=1))
    assert round(two["history"][0]["val_acc"] * 45) == int((expected.argmax(dim=1) == yv).sum())
    assert two["history"][0]["val_acc"] * 45 == pytest.approx(round(two["history"][0]["val_acc"] * 45))
    # the control: rows differ enough that any reordering of them would fail the comparison above
    assert (expected[1:] - expected[:-1]).abs().amax(dim=1).min() > 1e-3


def test_binary_auroc_gathers_every_rank_once(tmp_path):
    """Exact AUROC needs every score: gathered once per epoch from both ranks' uneven shards (23 + 22)."""
    from sklearn.metrics import roc_auc_score

    _, two = run_child(tmp_path / "b", 2, batch=8, eval_batch=4, epochs=2, binary=True, metrics=["acc", "auroc"])
    assert two["probs"].shape == (45,)
    assert two["test"]["test_auroc"] == pytest.approx(roc_auc_score(two["y"].numpy(), two["probs"].numpy()), abs=1e-12)
    assert two["test"]["test_acc"] == pytest.approx(((two["probs"] > 0.5).long() == two["y"]).float().mean().item())


def test_cli_nproc_and_resume(tmp_path):
    args = ["fit", "train.epochs=2", "train.batch_size=32", f"run.out_dir={tmp_path}", "log.plot=false", "--nproc", "2"]
    proc = run_cli(*args, cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("[002/002] Train Acc") == 1 and "Test Acc:" in proc.stdout
    run = tmp_path / "digits"
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0] == "Id,Class" and len(rows) == 271  # 270 test samples, each once
    resumed = run_cli("fit", "train.epochs=3", "train.batch_size=32", f"run.out_dir={tmp_path}", "log.plot=false",
                      "--nproc", "2", "--resume", cwd=str(tmp_path), env={"OMP_NUM_THREADS": "1"}, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[003/003]" in resumed.stdout and "[001/003]" not in resumed.stdout


def test_a_dead_rank_ends_the_run_in_bounded_time(tmp_path):
    started = time.perf_counter()
    proc = torchrun([CHILD, str(tmp_path), json.dumps({"batch": 8, "epochs": 3, "kill_rank": 1, "kill_step": 9})],
                    env={"TRAINVAL_DIST_TIMEOUT": "30"})
    elapsed = time.perf_counter() - started
    assert proc.returncode != 0
    assert not (tmp_path / "done.0").exists()
    assert elapsed < 120, elapsed


def test_elastic_restart_resumes_from_last(tmp_path):
    ref = tmp_path / "ref"
    run_child(ref, 2, batch=8, epochs=3)
    cut = tmp_path / "cut"
    os.makedirs(cut)
    proc = torchrun([CHILD, str(cut), json.dumps({"batch": 8, "epochs": 3, "kill_rank": 1, "kill_step": 9})],
                    extra=["--max-restarts=1"], env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert torchrun_ok(proc, cut), proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout
    a = torch.load(ref / "last.pt", weights_only=True)["model"]
    b = torch.load(cut / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the restarted run ends where an unbroken one does


# ------------------------------------------------------------------------------------------------
# Strategies: FSDP2 (fully_shard) on 2 gloo processes


def test_fsdp_trains_like_ddp_and_best_pt_reloads_into_a_plain_model(tmp_path):
    started = time.perf_counter()
    # accumulation over 2 batches: no gradient sync on the first (no_sync / set_requires_gradient_sync)
    _, ddp = run_child(tmp_path / "ddp", 2, batch=8, epochs=2, blocks=True, accumulate=2)
    _, fsdp = run_child(tmp_path / "fsdp", 2, batch=8, epochs=2, blocks=True, strategy="fsdp", accumulate=2)
    assert (ddp["strategy"], fsdp["strategy"]) == ("ddp", "fsdp")
    for a, b in zip(ddp["history"], fsdp["history"]):  # the same math, sharded: equal to rounding
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["epoch"], key)
    # best.pt is one plain, full state_dict: it loads into an unwrapped model and scores what FSDP scored
    helper = _ddp_child_module()
    Xv, yv = helper.data(45, 2)
    saved = torch.load(tmp_path / "fsdp" / "best.pt", weights_only=True)["model"]
    assert set(saved) == set(helper.make_model(blocks=True).state_dict())
    plain = helper.make_model(blocks=True)
    plain.load_state_dict(saved)
    with torch.no_grad():
        probs = plain(Xv).softmax(dim=1)
    assert torch.allclose(fsdp["probs"], probs, rtol=0, atol=1e-6)
    assert round(fsdp["test"]["test_acc"] * 45) == int((probs.argmax(dim=1) == yv).sum())
    # the control: a model that did not get best.pt's weights predicts otherwise
    with torch.no_grad():
        fresh = helper.make_model(blocks=True)(Xv).softmax(dim=1)
    assert not torch.allclose(fsdp["probs"], fresh, atol=1e-3)
    print(f"DDP + FSDP runs: {time.perf_counter() - started:.1f} s")


def _full_last(folder):
    """A sharded last.pt's loop state, and its shards put together: (state, model weights, optimizer tensors)."""
    from trainval.checkpoint import sharded

    path = os.path.join(folder, "last.pt")
    state = torch.load(path, weights_only=True)
    return (state, sharded.consolidate(state["shards"], path, "model"),
            sharded.consolidate(state["shards"], path, "optimizer"))


def _assert_sharded_by_each_rank(folder, nproc=2):
    """last.pt holds no weights; every rank wrote its own shard file, holding its own rows of each weight."""
    from trainval.checkpoint import sharded

    path = os.path.join(folder, "last.pt")
    state = torch.load(path, weights_only=True)
    assert "model" not in state and "optimizer" not in state
    shapes = {tuple(v.shape) for v in _ddp_child_module().make_model(blocks=True).state_dict().values() if v.dim() == 2}
    tensors = []
    _tensors_in(state, tensors)
    assert not [t for t in tensors if tuple(t.shape) in shapes]  # no weight matrix anywhere in last.pt
    assert sorted(state["shards"]["files"]) == [f"__{r}_0.distcp" for r in range(nproc)]
    assert sorted(state["shards"]["sha256"]) == [".metadata", *sorted(state["shards"]["files"])]  # every rank's file
    shard_dir = sharded.verify(state["shards"], path)
    metadata = sharded._safe_reader(shard_dir, state["shards"], path).read_metadata()
    for key in ("model.blocks.0.weight", "model.blocks.1.weight", "model.head.weight"):
        files = {info.relative_path for index, info in metadata.storage_data.items() if index.fqn == key}
        assert files == {f"__{r}_0.distcp" for r in range(nproc)}, key  # rows 0..k on rank 0, the rest on rank 1


def _tensors_in(obj, out):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors_in(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _tensors_in(v, out)


def _assert_same_state(a_dir, b_dir):
    sa, ma, oa = _full_last(a_dir)
    sb, mb, ob = _full_last(b_dir)
    assert set(ma) == set(mb) and all(torch.equal(ma[k], mb[k]) for k in ma)
    momentum = [k for k in oa if k.endswith("momentum_buffer")]
    assert len(momentum) == 6 and set(oa) == set(ob)  # the full optimizer state (momentum), by parameter name
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert sa["epoch"] == sb["epoch"] and sa["loop"]["global_step"] == sb["loop"]["global_step"]


def _metrics_rows(folder):
    """metrics.csv without its wall-clock column."""
    import csv

    with open(os.path.join(folder, "metrics.csv")) as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_fsdp_sharded_last_pt_resumes_bit_identical(tmp_path):
    _, ref = run_child(tmp_path / "ref", 2, batch=8, epochs=3, blocks=True, strategy="fsdp")
    _assert_sharded_by_each_rank(tmp_path / "ref")
    proc, cut = run_child(tmp_path / "cut", 2, batch=8, epochs=3, blocks=True, strategy="fsdp", stop_after=1)
    assert "(epoch 1, batch 0)" in proc.stdout  # the second Trainer resumed the first one's sharded last.pt
    _assert_same_state(tmp_path / "ref", tmp_path / "cut")
    assert [r["val_loss"] for r in ref["history"]] == [r["val_loss"] for r in cut["history"]]
    assert torch.equal(ref["probs"], cut["probs"])
    assert len(os.listdir(tmp_path / "cut" / "last.shards")) == 1  # older folders deleted once last.pt moved on
    # the control: a run one epoch short differs (the comparison above can fail)
    _, short = run_child(tmp_path / "short", 2, batch=8, epochs=2, blocks=True, strategy="fsdp")
    with pytest.raises(AssertionError):
        _assert_same_state(tmp_path / "ref", tmp_path / "short")
    # mid-epoch: rank 1 dies at step 9; torchrun restarts both from the last.pt of step 8 (epoch 2, batch 2)
    killed = tmp_path / "killed"
    os.makedirs(killed)
    opts = {"batch": 8, "epochs": 3, "blocks": True, "strategy": "fsdp", "every": 2, "kill_rank": 1, "kill_step": 9}
    proc = torchrun([CHILD, str(killed), json.dumps(opts)], extra=["--max-restarts=1"],
                    env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert torchrun_ok(proc, killed), proc.stdout + proc.stderr
    assert "(epoch 1, batch 2)" in proc.stdout
    _assert_same_state(tmp_path / "ref", killed)
    # ckpt="last" puts the shards together for a plain model (load_model), equal to the weights resumed above
    from trainval import load_model

    plain = load_model(str(killed), "last", model=_ddp_child_module().make_model(blocks=True))
    _, weights, _ = _full_last(tmp_path / "ref")
    assert all(torch.equal(plain.state_dict()[k], weights[k]) for k in weights)


def test_fsdp_crash_between_shards_and_pointer_resumes_the_previous_checkpoint(tmp_path):
    """Rank 0 dies after every shard of the 4th save (step 8) is written, before last.pt points to it."""
    run_child(tmp_path / "ref", 2, batch=8, epochs=3, blocks=True, strategy="fsdp")
    cut = tmp_path / "cut"
    os.makedirs(cut)
    opts = {"batch": 8, "epochs": 3, "blocks": True, "strategy": "fsdp", "every": 2, "die_before_commit": 4}
    proc = torchrun([CHILD, str(cut), json.dumps(opts)], extra=["--max-restarts=1"],
                    env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert torchrun_ok(proc, cut), proc.stdout + proc.stderr
    # saves: steps 2, 4, end of epoch 1 (6), step 8 <- killed; the restart resumes the step-6 checkpoint
    assert "resuming from" in proc.stdout and "(epoch 1, batch 0)" in proc.stdout, proc.stdout
    stray = (cut / "stray.txt").read_text()
    assert stray.startswith("e1-s8-")  # the complete but never pointed-to folder of step 8...
    assert not (cut / "last.shards" / stray).exists()  # ...was removed by the restarted run
    assert len(os.listdir(cut / "last.shards")) == 1
    _assert_same_state(tmp_path / "ref", cut)  # and the run ends where an unbroken one does


def test_fsdp_async_save_matches_sync(tmp_path):
    _, sync = run_child(tmp_path / "sync", 2, batch=8, epochs=3, blocks=True, strategy="fsdp", every=2)
    _, asyn = run_child(tmp_path / "async", 2, batch=8, epochs=3, blocks=True, strategy="fsdp", every=2,
                        **{"async": True})
    _assert_sharded_by_each_rank(tmp_path / "async")
    _assert_same_state(tmp_path / "sync", tmp_path / "async")
    a = torch.load(tmp_path / "sync" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "async" / "best.pt", weights_only=True)["model"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _metrics_rows(tmp_path / "sync") == _metrics_rows(tmp_path / "async") and len(_metrics_rows(tmp_path / "sync")) == 3
    assert torch.equal(sync["probs"], asyn["probs"])


def test_fsdp_async_save_failure_is_an_error_of_fit(tmp_path):
    """A full disk under the background shard writes (both ranks): fit raises, nothing hides it."""
    opts = {"batch": 8, "epochs": 3, "blocks": True, "strategy": "fsdp", "async": True, "block_shards": True}
    proc = torchrun([CHILD, str(tmp_path), json.dumps(opts)])
    assert proc.returncode != 0
    # each failing rank reports it, unless torchrun's SIGTERM (sent when the first one exits) comes first
    assert proc.stderr.count("CheckpointError: could not write the shards of last.pt") >= 1, proc.stderr[-3000:]
    assert not (tmp_path / "done.0").exists() and not (tmp_path / "last.pt").exists()
    # the control: the same run without the blocking file completes
    ok = tmp_path / "ok"
    run_child(ok, 2, **{**opts, "block_shards": False})
    assert (ok / "last.pt").exists()


def test_a_sharded_last_pt_resumes_under_another_strategy(tmp_path):
    """FSDP's shards, read back into the plain model (one process): DCP puts them together on load."""
    _, ref = run_child(tmp_path / "ref", 1, batch=16, epochs=3, blocks=True, strategy="fsdp")
    proc, moved = run_child(tmp_path / "moved", 1, batch=16, epochs=3, blocks=True, strategy="fsdp", stop_after=1,
                            resume_strategy="auto")
    assert "(epoch 1, batch 0)" in proc.stdout and moved["strategy"] == "single"
    last = torch.load(tmp_path / "moved" / "last.pt", weights_only=True)
    assert "model" in last and "shards" not in last  # now one whole file, and the shard folder it replaced is gone
    assert os.listdir(tmp_path / "moved" / "last.shards") == []
    for a, b in zip(ref["history"], moved["history"]):  # FSDP on one process is the plain model's math
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6), a["epoch"]
    assert torch.equal(ref["preds"], moved["preds"])


def test_a_mid_epoch_last_pt_resumes_only_with_the_number_of_processes_that_wrote_it(tmp_path):
    """Mid-epoch, what each rank already trained depends on the number of processes: 2 ranks resuming
    one process's batch 3 would skip 3 of their own batches (6 of the process's) and train some twice."""
    from trainval import Callback, Trainer

    helper = _ddp_child_module()
    Xt, yt = helper.data(96, 1)
    Xv, yv = helper.data(45, 2)

    class StopAt(Callback):  # a crash in the middle of epoch 2
        def on_train_batch_end(self, trainer, batch_index):
            if trainer.epoch == 1 and batch_index == 3:
                raise RuntimeError("crash")

    def trainer(callbacks=()):
        model = helper.make_model()
        return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), max_epochs=3, out_dir=str(tmp_path),
                       batch_size=16, checkpoint_every_steps=1, progress=False, plot=False, callbacks=list(callbacks))

    with pytest.raises(RuntimeError, match="crash"):
        trainer([StopAt()]).fit((Xt, yt), (Xv, yv))
    assert torch.load(tmp_path / "last.pt", weights_only=True)["loop"]["batch_in_epoch"] == 3
    proc = torchrun([CHILD, str(tmp_path), json.dumps({"batch": 8, "resume": True})])
    assert proc.returncode != 0 and not os.path.exists(tmp_path / "done.0")
    assert "was saved in the middle of epoch 2 by 1 process; this run has 2" in proc.stdout + proc.stderr
    assert "resume with 1 (--nproc 1)" in proc.stdout + proc.stderr
    # the control: the process count that wrote it resumes it
    history = trainer().fit((Xt, yt), (Xv, yv), resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_fsdp_evaluation_with_batch_counts_that_differ_across_ranks_does_not_hang(tmp_path):
    """45 validation samples, evaluation batch 1: 23 forwards on rank 0, 22 on rank 1. Every FSDP forward
    gathers parameters (a collective), so the ranks agree on the count before the loop and rank 1 runs one
    stand-in forward. (Agreeing after the loop, as before, had rank 1 enter the count's all-reduce while
    rank 0 was in its 23rd forward's gather: a collective mismatch that timed out.)"""
    _, fsdp = run_child(tmp_path, 2, batch=8, epochs=1, blocks=True, strategy="fsdp", eval_batch=1)
    assert len(fsdp["preds"]) == 45 and fsdp["probs"].shape == (45, 5)
    helper = _ddp_child_module()
    Xv, yv = helper.data(45, 2)
    plain = helper.make_model(blocks=True)
    plain.load_state_dict(torch.load(tmp_path / "best.pt", weights_only=True)["model"])
    with torch.no_grad():
        probs = plain(Xv).softmax(dim=1)
    assert torch.allclose(fsdp["probs"], probs, rtol=0, atol=1e-6)
    assert round(fsdp["test"]["test_acc"] * 45) == int((probs.argmax(dim=1) == yv).sum())


def test_fsdp_on_one_process_equals_the_plain_model(tmp_path):
    """One process (no torchrun): FSDP runs in a one-member group of its own; the math is the plain model's."""
    _, plain = run_child(tmp_path / "plain", 1, batch=16, epochs=2, blocks=True)
    _, fsdp = run_child(tmp_path / "fsdp", 1, batch=16, epochs=2, blocks=True, strategy="fsdp")
    assert (plain["strategy"], fsdp["strategy"]) == ("single", "fsdp")
    for a, b in zip(plain["history"], fsdp["history"]):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-6), a["epoch"]
    assert torch.equal(plain["preds"], fsdp["preds"])


# ------------------------------------------------------------------------------------------------
# Randomness: one shared shuffling permutation, per-rank model randomness, exact resume


def test_dropout_differs_across_ranks_and_a_mid_epoch_restart_stays_exact(tmp_path):
    opts = {"batch": 8, "epochs": 2, "dropout": 0.5, "every": 2}
    ref = tmp_path / "ref"
    run_child(ref, 2, **opts)
    masks = [torch.load(ref / f"masks.{r}.pt", weights_only=True) for r in range(2)]
    assert masks[0][0].shape == masks[1][0].shape == (8, 12)
    assert not torch.equal(masks[0][0], masks[1][0])  # each rank draws its own dropout masks
    # rank 1 dies at step 9 (epoch 2, batch 3); torchrun restarts both from last.pt of step 8 (mid-epoch)
    cut = tmp_path / "cut"
    os.makedirs(cut)
    proc = torchrun([CHILD, str(cut), json.dumps({**opts, "kill_rank": 1, "kill_step": 9})],
                    extra=["--max-restarts=1"], env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert torchrun_ok(proc, cut), proc.stdout + proc.stderr
    assert "(epoch 1, batch 2)" in proc.stdout
    for r in range(2):  # the control: the same rank draws the same masks in two runs (seeded, not arbitrary)
        assert all(torch.equal(a, b) for a, b in zip(masks[r], torch.load(cut / f"masks.{r}.pt", weights_only=True)))
    a = torch.load(ref / "last.pt", weights_only=True)
    b = torch.load(cut / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # rank 1's streams were restored too
    assert a["loop"]["history"][-1]["train_loss"] == b["loop"]["history"][-1]["train_loss"]
    assert len(a["ranks"]) == 2 and not torch.equal(a["ranks"][0]["rng"]["torch"], a["ranks"][1]["rng"]["torch"])


def test_train_metrics_count_each_sample_once_despite_padding(tmp_path):
    # 97 training samples on 2 ranks: shards of 49, rank 1's last sample a repeat of the permutation's
    # first, alone in its last batch (batch 8: 6 full batches and one of 1). In epoch 1 every forward
    # before the last step's update sees the same weights as one process with batch 16, so the train
    # metrics must be equal, over 97 samples.
    metrics = ["acc", "f1_macro"]
    _, one = run_child(tmp_path / "one", 1, batch=16, epochs=1, n_train=97, metrics=metrics)
    _, two = run_child(tmp_path / "two", 2, batch=8, epochs=1, n_train=97, metrics=metrics)
    a, b = one["history"][0], two["history"][0]
    k = round(b["train_acc"] * 97)
    assert b["train_acc"] == pytest.approx(k / 97, abs=1e-12) and 0 < k < 97  # k/97: never k/98
    assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1e-12)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
    assert a["train_f1_macro"] == pytest.approx(b["train_f1_macro"], abs=1e-12)


def test_sync_batchnorm_on_the_cpu_is_one_clear_error(tmp_path):
    """torch's SyncBatchNorm is GPU-only (DDP refuses it on CPU modules): say so before training."""
    proc = torchrun([CHILD, str(tmp_path), json.dumps({"batch": 8, "epochs": 1, "batchnorm": True,
                                                       "sync_batchnorm": True})])
    assert proc.returncode != 0
    # once per rank, unless torchrun's SIGTERM after the first rank's exit reaches the other one first
    assert proc.stderr.count("ConfigError: sync_batchnorm needs CUDA devices") >= 1, proc.stderr[-3000:]
    assert "SyncBatchNorm layers only work with GPU modules" not in proc.stderr  # not torch's own


# ------------------------------------------------------------------------------------------------
# "Two nodes" on this machine: two launchers meeting at a c10d rendezvous on 127.0.0.1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_launchers(commands, timeout=240):
    """Start one launcher per "node" (each a list of arguments), wait for both; their CompletedProcess-likes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for cmd in commands]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def _cli_node(out_dir, port, node_rank, epochs=1):
    return [sys.executable, "-m", "trainval", "fit", f"train.epochs={epochs}", "train.batch_size=64",
            f"run.out_dir={out_dir}", "log.plot=false", "train.progress=false", "--nproc", "1", "--nnodes", "2",
            "--node-rank", str(node_rank), "--rdzv-endpoint", f"127.0.0.1:{port}"]


def test_two_nodes_need_a_shared_run_folder(tmp_path):
    started = time.perf_counter()
    port = _free_port()
    apart = two_launchers([_cli_node(tmp_path / f"node{r}", port, r) for r in range(2)])
    for proc in apart:  # every node says why, in one line, and no training starts
        assert proc.returncode != 0, proc.stdout + proc.stderr
        assert "is not shared by every process: rank 1 (host" in proc.stderr, proc.stderr
        assert "Train Acc" not in proc.stdout
    # the control: the same two launchers with one shared folder train, test and predict
    port = _free_port()
    shared = two_launchers([_cli_node(tmp_path / "shared", port, r) for r in range(2)])
    for proc in shared:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Test Acc:" in shared[0].stdout + shared[1].stdout
    assert (tmp_path / "shared" / "digits" / "best.pt").exists()
    assert not list((tmp_path / "shared" / "digits").glob(".trainval-shared-*"))  # the probe file is gone
    print(f"two launchers, twice: {time.perf_counter() - started:.1f} s")


def test_a_stale_last_pt_on_one_node_is_refused(tmp_path):
    import shutil

    opts = {"batch": 8, "epochs": 1}
    run_child(tmp_path / "a", 2, **opts)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # node 1's copy: epoch 1
    run_child(tmp_path / "a", 2, **{**opts, "epochs": 2, "resume": True})  # node 0's moves on to epoch 2
    port = _free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=stale"]
    procs = two_launchers([[*launch, CHILD, str(tmp_path / d), json.dumps({**opts, "epochs": 3, "resume": True})]
                           for d in ("a", "b")])
    for proc in procs:  # one clear error on every rank, naming what each saw
        assert proc.returncode != 0
        assert "CheckpointError: cannot resume: the processes see different last.pt files" in proc.stderr, proc.stderr
        # (which launcher's worker becomes rank 0 is the rendezvous's choice)
        assert ": epoch 2, step 12, sha256" in proc.stderr and ": epoch 1, step 6, sha256" in proc.stderr
    assert torch.load(tmp_path / "a" / "last.pt", weights_only=True)["epoch"] == 2  # nothing was trained or written


# ------------------------------------------------------------------------------------------------
# Stop signals that reach the ranks at different moments


def test_a_signal_that_reaches_one_rank_first_stops_every_rank_at_the_same_epoch(tmp_path):
    """Rank 1 alone gets SIGTERM at the end of epoch 2 (torchrun passes a signal on to one worker after
    the other). The ranks agree at the epoch's end and both save and stop there; before, rank 1 stopped
    alone and rank 0 waited in the next epoch's collective until the timeout."""
    started = time.perf_counter()
    proc = torchrun([CHILD, str(tmp_path), json.dumps({"batch": 8, "epochs": 6, "term_rank": 1, "term_epoch": 2})],
                    env={"TRAINVAL_DIST_TIMEOUT": "60"}, timeout=240)
    elapsed = time.perf_counter() - started
    assert proc.returncode != 0 and not (tmp_path / "done.0").exists()
    # run_and_exit prints each rank's Interrupted; both stopped at the same place
    # (torchrun's SIGTERM after the first rank's exit may beat the other rank's report on a loaded machine)
    said = re.findall(r"Interrupted: stopped by SIG\w+ at [^;]*;", proc.stderr)
    assert said and set(said) == {"Interrupted: stopped by SIGTERM at the end of epoch 2;"}, proc.stderr[-3000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 2
    assert elapsed < 60, elapsed  # not a collective's timeout
