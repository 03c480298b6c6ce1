"""Side-by-side epoch times: hand-optimised loop, the notes' loop, trainval, Lightning, Accelerate.

    .venv/bin/python benchmarks/compare.py [--workloads tiny,mlp] [--repeats 5] [--contenders ...] [--epochs E] [--scale F]

Each measurement is one fresh worker process (so peak RSS is its own) that builds the same seeded
data and model, warms up, then runs E epochs of train + full validation + a metrics line + best/last
checkpoints; its wall time / E is one sample. Contenders alternate within each repeat (the order
rotates), and the table reports medians of wall time and of process CPU time (less sensitive to a
noisy host), ratios to the hand-optimised loop, samples/s and peak RSS.
Writes benchmarks/results/compare.json and compare.png. Lightning and Accelerate run when installed
(`pip install -e '.[bench]'`).

Workloads (2 CPU cores here):
  tiny  MLP 32 -> 64 -> 10, 100k train / 20k val, batch 64, 3 epochs per sample (per-step overhead)
  mlp   MLP 429 -> 1024 -> 512 -> 128 -> 39 with BatchNorm + Dropout, 200k train / 40k val,
        batch 512, 1 epoch per sample (compute-bound)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEVICE = os.environ.get("TRAINVAL_BENCH_DEVICE", "cpu")  # "cuda": data and model resident on the GPU
WORKLOADS = {
    "tiny": dict(d=32, hidden=[64], classes=10, n_train=100_000, n_val=20_000, batch=64, epochs=3, bn=False),
    "mlp": dict(d=429, hidden=[1024, 512, 128], classes=39, n_train=200_000, n_val=40_000, batch=512, epochs=1, bn=True),
}

def _resize(epochs: int = 0, scale: float = 0.0) -> None:
    """--epochs and --scale (the fraction of the samples), also handed to worker processes by env."""
    for w in WORKLOADS.values():
        if epochs > 0:
            w["epochs"] = epochs
        if scale > 0:
            w["n_train"], w["n_val"] = max(1, round(w["n_train"] * scale)), max(1, round(w["n_val"] * scale))


_resize(int(os.environ.get("TRAINVAL_BENCH_EPOCHS") or 0), float(os.environ.get("TRAINVAL_BENCH_SCALE") or 0))
# hand_again: the hand loop under another name, an A/A control: its ratio's spread is the run's resolution
CONTENDERS = ["hand", "notes", "trainval", "trainval_bar", "lightning_off", "lightning", "accelerate"]
LABELS = {
    "hand": "hand-optimised loop", "hand_again": "hand loop again (A/A control)",
    "hand_f1": "hand loop + macro F1 on the device", "trainval_f1": "trainval fit, metrics acc + f1_macro", "notes": "notes' loop (DataLoader + .item())", "trainval": "trainval fit",
    "trainval_bar": "trainval fit + progress bar", "lightning_off": "Lightning (bar/ckpt/logger off)",
    "lightning": "Lightning defaults", "accelerate": "Accelerate",
}


# ------------------------------------------------------------------------------------------------
# Worker side: one contender, one workload, in this process


def _setup(w):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(w["classes"], w["d"], generator=g)
    def make(n):
        y = torch.randint(0, w["classes"], (n,), generator=g)
        return centers[y] + torch.randn(n, w["d"], generator=g) * 2, y
    train, val = make(w["n_train"]), make(w["n_val"])
    train, val = tuple(t.to(DEVICE) for t in train), tuple(t.to(DEVICE) for t in val)
    torch.manual_seed(0)
    layers, width = [], w["d"]
    for h in w["hidden"]:
        layers += [nn.Linear(width, h)] + ([nn.BatchNorm1d(h)] if w["bn"] else []) + [nn.ReLU()]
        layers += [nn.Dropout(0.25)] if w["bn"] else []
        width = h
    layers.append(nn.Linear(width, w["classes"]))
    model = nn.Sequential(*layers).to(DEVICE)
    return train, val, model


def _warm_up(model, train, batch):
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for i in range(20):
        x, y = train[0][i * batch : (i + 1) * batch], train[1][i * batch : (i + 1) * batch]
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _macro_f1(cm):
    """Macro F1 from a confusion matrix (rows: true class), over the classes that occur."""
    import torch

    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (cm.sum(0) + cm.sum(1)) > 0
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    return f1[present].mean().item()


def run_hand(w, train, val, model, out, f1=False):
    """Tensor slicing, metrics on the device, one sync per epoch, best/last state_dicts.

    With ``f1``: also a confusion matrix per split, updated on the device every step (index_add_),
    and macro F1 from it once per epoch -- the reference for trainval with metrics=["acc", "f1_macro"].
    """
    import torch
    from torch import nn

    X, y = train
    Xv, yv = val
    C = w["classes"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    best, B = -1.0, w["batch"]
    for epoch in range(w["epochs"]):
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=DEVICE)
        correct = torch.zeros((), dtype=torch.int64, device=DEVICE)
        cm = torch.zeros(C * C, dtype=torch.float64, device=DEVICE) if f1 else None
        perm = torch.randperm(len(X), generator=g).to(DEVICE)
        for i in range(0, len(X), B):
            idx = perm[i : i + B]
            xb, yb = X[idx], y[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(yb)
            pred = logits.argmax(1)
            correct += (pred == yb).sum()
            if f1:
                cm.index_add_(0, yb * C + pred, torch.ones(len(yb), dtype=torch.float64, device=DEVICE))
        model.eval()
        vloss = torch.zeros((), dtype=torch.float64, device=DEVICE)
        vcorrect = torch.zeros((), dtype=torch.int64, device=DEVICE)
        vcm = torch.zeros(C * C, dtype=torch.float64, device=DEVICE) if f1 else None
        with torch.no_grad():
            for i in range(0, len(Xv), B):
                logits, yb = model(Xv[i : i + B]), yv[i : i + B]
                vloss += loss_fn(logits, yb) * len(logits)
                pred = logits.argmax(1)
                vcorrect += (pred == yb).sum()
                if f1:
                    vcm.index_add_(0, yb * C + pred, torch.ones(len(yb), dtype=torch.float64, device=DEVICE))
        tl, ta, vl, va = (loss_sum / len(X)).item(), correct.item() / len(X), (vloss / len(Xv)).item(), vcorrect.item() / len(Xv)
        line = f"[{epoch + 1:03d}/{w['epochs']:03d}] Train Acc: {ta:3.6f} Loss: {tl:3.6f} | Val Acc: {va:3.6f} loss: {vl:3.6f}"
        if f1:
            line += f" | F1 {_macro_f1(cm.view(C, C)):.6f} / {_macro_f1(vcm.view(C, C)):.6f}"
        print(line)
        if va > best:
            best = va
            torch.save(model.state_dict(), os.path.join(out, "best.pt"))
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1}, os.path.join(out, "last.pt"))


def run_notes(w, train, val, model, out):
    """The notes' loop: DataLoader over a TensorDataset, per-batch .item(), mean of batch means."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    train_loader = DataLoader(TensorDataset(*train), batch_size=w["batch"], shuffle=True)
    val_loader = DataLoader(TensorDataset(*val), batch_size=w["batch"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = nn.CrossEntropyLoss()
    best_acc = 0.0
    for epoch in range(w["epochs"]):
        train_acc = train_loss = val_acc = val_loss = 0.0
        model.train()
        for x, y in train_loader:
            outputs = model(x)
            batch_loss = loss(outputs, y)
            _, train_pred = torch.max(outputs, 1)
            train_acc += (train_pred.cpu() == y.cpu()).sum().item()
            train_loss += batch_loss.item()
            batch_loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            for x, y in val_loader:
                outputs = model(x)
                batch_loss = loss(outputs, y)
                _, val_pred = torch.max(outputs, 1)
                val_acc += (val_pred.cpu() == y.cpu()).sum().item()
                val_loss += batch_loss.item()
        print(f"[{epoch + 1:03d}/{w['epochs']:03d}] Train Acc: {train_acc / len(train[0]):3.6f} Loss: {train_loss / len(train_loader):3.6f} "
              f"| Val Acc: {val_acc / len(val[0]):3.6f} loss: {val_loss / len(val_loader):3.6f}")
        if val_acc > best_acc:
            best_acc = val_acc
            torch.save(model.state_dict(), os.path.join(out, "best.pt"))
        torch.save(model.state_dict(), os.path.join(out, "last.pt"))


class _FakeTerminal:
    """A terminal for tqdm that writes nowhere: measures the bar's own cost, not the console's."""

    def __init__(self):
        self._f = open(os.devnull, "w")

    def isatty(self):
        return True

    def write(self, s):
        return self._f.write(s)

    def flush(self):
        self._f.flush()


def run_trainval(w, train, val, model, out, bar=False, metrics=None):
    import torch

    from trainval import Trainer
    from trainval.loop.callbacks import ProgressBar

    callbacks = [ProgressBar(stream=_FakeTerminal())] if bar else []
    Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), max_epochs=w["epochs"], out_dir=out,
            batch_size=w["batch"], progress=False, plot=False, callbacks=callbacks, overwrite=True,
            device=DEVICE, metrics=metrics, monitor="val_acc").fit(train, val)


def run_lightning(w, train, val, model, out, defaults=False):
    import logging

    import pytorch_lightning as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.loss = nn.CrossEntropyLoss()

        def training_step(self, batch, i):
            x, y = batch
            logits = self.model(x)
            loss = self.loss(logits, y)
            self.log("train_loss", loss, on_epoch=True, on_step=False)
            self.log("train_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True, on_step=False)
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            logits = self.model(x)
            self.log("val_loss", self.loss(logits, y), on_epoch=True)
            self.log("val_acc", (logits.argmax(1) == y).float().mean(), on_epoch=True)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):  # no "GPU available" banners
        logging.getLogger(name).setLevel(logging.WARNING)
    kwargs = dict(max_epochs=w["epochs"], accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, default_root_dir=out,
                  num_sanity_val_steps=0, enable_model_summary=False)
    if not defaults:
        kwargs.update(enable_progress_bar=False, enable_checkpointing=False, logger=False)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(Module(), DataLoader(TensorDataset(*train), batch_size=w["batch"], shuffle=True),
                DataLoader(TensorDataset(*val), batch_size=w["batch"]))


def run_accelerate(w, train, val, model, out):
    import torch
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    acc = Accelerator(cpu=DEVICE == "cpu")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tl, vl = DataLoader(TensorDataset(*train), batch_size=w["batch"], shuffle=True), DataLoader(TensorDataset(*val), batch_size=w["batch"])
    model, opt, tl, vl = acc.prepare(model, opt, tl, vl)
    loss_fn, best = nn.CrossEntropyLoss(), -1.0
    for epoch in range(w["epochs"]):
        model.train()
        loss_sum = torch.zeros((), device=acc.device)
        correct = torch.zeros((), dtype=torch.int64, device=acc.device)
        for x, y in tl:
            logits = model(x)
            loss = loss_fn(logits, y)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        model.eval()
        vcorrect = torch.zeros((), dtype=torch.int64, device=acc.device)
        with torch.no_grad():
            for x, y in vl:
                vcorrect += (model(x).argmax(1) == y).sum()
        va = vcorrect.item() / len(val[0])
        acc.print(f"[{epoch + 1:03d}] Train Acc: {correct.item() / len(train[0]):.6f} Loss: {loss_sum.item() / len(train[0]):.6f} | Val Acc: {va:.6f}")
        if va > best:
            best = va
            acc.save(acc.unwrap_model(model).state_dict(), os.path.join(out, "best.pt"))
        acc.save(acc.unwrap_model(model).state_dict(), os.path.join(out, "last.pt"))


RUNNERS = {
    "hand": run_hand, "hand_again": run_hand, "notes": run_notes, "trainval": run_trainval,
    "trainval_bar": lambda *a: run_trainval(*a, bar=True), "accelerate": run_accelerate,
    "hand_f1": lambda *a: run_hand(*a, f1=True), "trainval_f1": lambda *a: run_trainval(*a, metrics=["acc", "f1_macro"]),
    "lightning_off": run_lightning, "lightning": lambda *a: run_lightning(*a, defaults=True),
}
# what each contender imports: importing is start-up, for every contender, not part of the timed epochs
LIBRARY = {"trainval": "trainval.loop.trainer", "trainval_bar": "trainval.loop.trainer", "trainval_f1": "trainval.loop.trainer",
           "lightning_off": "pytorch_lightning",
           "lightning": "pytorch_lightning", "accelerate": "accelerate"}


def _prepare(names: list[str], workload: str, threads: int):
    """Threads, the seeded data and model (warmed up), and the contenders' libraries imported."""
    import importlib

    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    w = WORKLOADS[workload]
    train, val, model = _setup(w)
    _warm_up(model, train, w["batch"])
    for name in names:
        if name in LIBRARY:
            importlib.import_module(LIBRARY[name])
    return w, train, val, model


def _synchronize() -> None:
    if DEVICE == "cuda":
        import torch

        torch.cuda.synchronize()


def worker(name: str, workload: str, threads: int) -> dict:
    import resource

    w, train, val, model = _prepare([name], workload, threads)
    with tempfile.TemporaryDirectory() as out:
        cpu_start = time.process_time()  # user + sys of all threads
        start = time.perf_counter()
        RUNNERS[name](w, train, val, model, out)
        _synchronize()
        seconds = (time.perf_counter() - start) / w["epochs"]
        cpu_seconds = (time.process_time() - cpu_start) / w["epochs"]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_mb": rss_mb}


def paired_worker(names: list[str], workload: str, repeats: int, threads: int) -> dict:
    """All contenders in one process, alternating, each on a fresh copy of the same initial model.

    Host noise that drifts over seconds hits neighbouring runs alike, so the per-repeat ratio of each
    contender to the hand loop is far steadier than ratios between separate processes.
    """
    import contextlib
    import copy
    import io

    w, train, val, model = _prepare(names, workload, threads)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}  # process CPU time (what other tenants' turns leave out)
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            fresh = copy.deepcopy(model)
            with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
                cpu_start, start = time.process_time(), time.perf_counter()
                RUNNERS[name](w, train, val, fresh, out)
                _synchronize()
                times[name].append((time.perf_counter() - start) / w["epochs"])
                cpu[name].append((time.process_time() - cpu_start) / w["epochs"])
            print(f"  {workload} rep {rep + 1}/{repeats} {name}: {times[name][-1]:.3f} s (CPU {cpu[name][-1]:.3f} s)",
                  file=sys.stderr, flush=True)
    return {"wall": times, "cpu": cpu}


# ------------------------------------------------------------------------------------------------
# Driver side


def available(name: str) -> bool:
    if name not in LIBRARY or name.startswith("trainval"):
        return True
    import importlib.util

    return importlib.util.find_spec(LIBRARY[name]) is not None


def measure(name: str, workload: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--workload", workload, "--threads", str(threads)],
                          capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name} on {workload} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="tiny,mlp")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--contenders", default=",".join(CONTENDERS))
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per worker (default 0: torch's default; 1 takes OpenMP spinning out of the picture "
                         "on a small shared host)")
    ap.add_argument("--paired", action="store_true",
                    help="run all contenders alternately inside one process and report the median of per-repeat "
                         "ratios to the hand loop (steadier on a noisy host; no per-contender RSS)")
    ap.add_argument("--epochs", type=int, default=0,
                    help="epochs per sample for every workload (default 0: the workload's own, above)")
    ap.add_argument("--scale", type=float, default=0.0,
                    help="use this fraction of each workload's samples (shorter runs, more repeats; the fixed "
                         "per-run costs then weigh more)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.worker:
        if args.epochs > 0:
            os.environ["TRAINVAL_BENCH_EPOCHS"] = str(args.epochs)
        if args.scale > 0:
            os.environ["TRAINVAL_BENCH_SCALE"] = str(args.scale)
        _resize(args.epochs, args.scale)
    if args.worker == "paired":
        print(json.dumps(paired_worker(args.contenders.split(","), args.workload, args.repeats, args.threads)))
        return
    if args.worker:
        result = worker(args.worker, args.workload, args.threads)
        print(json.dumps(result))
        return
    if args.paired:
        return paired_main(args)

    import platform

    import torch

    contenders = [c for c in args.contenders.split(",") if c]
    skipped = [c for c in contenders if not available(c)]
    contenders = [c for c in contenders if c not in skipped]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    if DEVICE == "cuda":
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    machine += f", {args.threads or torch.get_num_threads()} torch thread(s) per worker"
    results: dict = {"machine": machine, "repeats": args.repeats, "workloads": {}}
    for workload in args.workloads.split(","):
        samples: dict[str, list[dict]] = {c: [] for c in contenders}
        for rep in range(args.repeats):
            order = contenders[rep % len(contenders):] + contenders[: rep % len(contenders)]
            for name in order:
                samples[name].append(measure(name, workload, args.threads))
                print(f"  {workload} rep {rep + 1}/{args.repeats} {name}: {samples[name][-1]['seconds']:.3f} s", file=sys.stderr)
        w = WORKLOADS[workload]
        hand = statistics.median(s["seconds"] for s in samples["hand"])
        hand_rss = statistics.median(s["rss_mb"] for s in samples["hand"])
        hand_cpu = statistics.median(s["cpu_seconds"] for s in samples["hand"])
        rows = {}
        for name in contenders:
            sec = statistics.median(s["seconds"] for s in samples[name])
            rss = statistics.median(s["rss_mb"] for s in samples[name])
            cpu = statistics.median(s["cpu_seconds"] for s in samples[name])
            rows[name] = {"median_epoch_s": sec, "ratio": sec / hand, "samples_per_s": (w["n_train"] + w["n_val"]) / sec,
                          "median_cpu_s": cpu, "cpu_ratio": cpu / hand_cpu,
                          "peak_rss_mb": rss, "rss_ratio": rss / hand_rss, "runs_s": [s["seconds"] for s in samples[name]]}
        results["workloads"][workload] = rows
    if skipped:
        results["skipped"] = skipped
    print(format_table(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "compare.png"))
    print(f"\nwrote {os.path.join(args.out, 'compare.json')} and compare.png")


def paired_main(args) -> None:
    import platform

    import torch

    names = [c for c in args.contenders.split(",") if c and available(c)]
    if "hand" not in names:
        names.insert(0, "hand")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"
    if DEVICE == "cuda":
        machine += f", GPU {torch.cuda.get_device_name(0)}"
    results = {"machine": machine, "repeats": args.repeats, "mode": "paired (one process)", "workloads": {}}
    lines = [f"machine: {machine}; paired mode: {args.repeats} alternating repeats inside one process per workload"]
    for workload in args.workloads.split(","):
        proc = subprocess.run([sys.executable, __file__, "--worker", "paired", "--workload", workload, "--contenders",
                               ",".join(names), "--repeats", str(args.repeats), "--threads", str(args.threads)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise RuntimeError(f"paired run on {workload} failed (its output is above)")
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        times, cpu = measured["wall"], measured["cpu"]
        rows = {}
        lines.append(f"\n{workload}: {WORKLOADS[workload]}")
        lines.append(f"| {'contender':34s} | median epoch s | wall time vs hand: median ratio (min-max) "
                     "| CPU time vs hand: median ratio (min-max) |")
        lines.append(f"| {'-' * 34} | -------------- | ----------------------------------------- "
                     "| ---------------------------------------- |")
        for name in names:
            ratios = [t / h for t, h in zip(times[name], times["hand"])]
            cpu_ratios = [t / h for t, h in zip(cpu[name], cpu["hand"])]
            rows[name] = {"median_epoch_s": statistics.median(times[name]), "ratio": statistics.median(ratios),
                          "ratios": ratios, "runs_s": times[name], "cpu_ratio": statistics.median(cpu_ratios),
                          "cpu_ratios": cpu_ratios, "cpu_s": cpu[name]}
            lines.append(f"| {LABELS[name]:34s} | {rows[name]['median_epoch_s']:14.3f} | {rows[name]['ratio']:.3f}x "
                         f"({min(ratios):.2f}-{max(ratios):.2f}){' ' * 24}| {rows[name]['cpu_ratio']:.3f}x "
                         f"({min(cpu_ratios):.2f}-{max(cpu_ratios):.2f}){' ' * 23}|")
        if "trainval_f1" in names and "hand_f1" in names:  # the reference for trainval with F1 is the F1 hand loop
            ratios = [t / h for t, h in zip(times["trainval_f1"], times["hand_f1"])]
            rows["trainval_f1"]["ratio_vs_hand_f1"] = statistics.median(ratios)
            lines.append(f"trainval fit (acc + f1_macro) vs the hand loop with the same F1 on the device: "
                         f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        results["workloads"][workload] = rows
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compare_paired.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.out, "compare_paired.png"))
    print(f"\nwrote {os.path.join(args.out, 'compare_paired.json')} and compare_paired.png")


def format_table(results: dict) -> str:
    lines = [f"machine: {results['machine']}; medians of {results['repeats']} alternating runs"]
    for workload, rows in results["workloads"].items():
        lines.append(f"\n{workload}: {WORKLOADS[workload]}")
        lines.append(f"| {'contender':34s} | epoch s | vs hand | CPU s (vs hand)  | samples/s | peak RSS MB (vs hand) |")
        lines.append(f"| {'-' * 34} | ------- | ------- | ---------------- | --------- | --------------------- |")
        for name, r in rows.items():
            lines.append(f"| {LABELS[name]:34s} | {r['median_epoch_s']:7.3f} | {r['ratio']:6.2f}x | {r['median_cpu_s']:6.3f} ({r['cpu_ratio']:.2f}x) "
                         f"| {r['samples_per_s']:9.0f} | {r['peak_rss_mb']:8.0f} ({r['rss_ratio']:.3f}x)     |")
    if results.get("skipped"):
        lines.append(f"\nnot installed, skipped: {', '.join(results['skipped'])}")
    return "\n".join(lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    fig, axes = plt.subplots(1, len(workloads), figsize=(6 * len(workloads), 4), squeeze=False)
    for ax, workload in zip(axes[0], workloads):
        rows = results["workloads"][workload]
        names = list(rows)
        ax.barh([LABELS[n] for n in names], [rows[n]["ratio"] for n in names], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{workload}: epoch time / hand-optimised loop")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
