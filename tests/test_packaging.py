"""The package as users install and run it: the light install (required packages only, the rest extras with
one clear line each), trainval's own stratified splits (equal to scikit-learn's), the wheel's metadata
(licence, py.typed, one version), a user's script under ``mypy --strict``, and a real Jupyter kernel (the
progress widget; a second interrupt does not end the kernel)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainval.data.splits import stratified_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "src")


# --------------------------------------------------------------------------------------------------
# Splits: the same indices as scikit-learn's train_test_split (what trainval used before)


def sklearn_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray] | None:
    """trainval's split as it was written with scikit-learn (None where it refused)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    parts, remaining, remaining_frac = [], idx, 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        share = frac / remaining_frac
        try:
            remaining, taken = train_test_split(remaining, test_size=share, random_state=seed, stratify=y[remaining])
        except ValueError:
            try:
                remaining, taken = train_test_split(remaining, test_size=share, random_state=seed)
            except ValueError:
                return None
        parts.append(np.sort(taken))
        remaining_frac -= frac
    return [np.sort(remaining), *parts]


def assert_same_split(y: np.ndarray, fractions: list[float], seed: int) -> None:
    from trainval.errors import DataError

    expected = sklearn_split(y, fractions, seed)
    if expected is None:
        with pytest.raises(DataError, match="cannot hold out"):
            stratified_split(y, fractions, seed)
        return
    got = stratified_split(y, fractions, seed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@settings(max_examples=150, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
    val=st.sampled_from([0.0, 0.1, 0.15, 0.2, 0.33, 0.5]),
    test=st.sampled_from([0.0, 0.1, 0.15, 0.25]),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_split_equals_scikit_learns(labels, val, test, seed):
    assert_same_split(np.array(labels), [val, test], seed)


def test_stratified_split_equals_scikit_learns_on_digits_regression_and_multilabel():
    from sklearn.datasets import load_digits

    y = load_digits().target
    for seed in (0, 1, 2**32 - 1):
        assert_same_split(y, [0.15, 0.15], seed)
    rng = np.random.default_rng(0)
    assert_same_split(rng.normal(size=90).astype(np.float32), [0.2, 0.1], 3)  # every value unique: shuffled
    assert_same_split(rng.integers(0, 2, size=(80, 3)), [0.25, 0.0], 5)  # multi-label rows as strata
    assert_same_split(np.array([0, 1]), [0.5, 0.0], 0)  # too few to stratify, still two parts
    assert_same_split(np.array([0]), [0.5, 0.0], 0)  # refused: nothing left to train on


# --------------------------------------------------------------------------------------------------
# The light install: a Python that sees only the required packages


REQUIRED = ("torch", "numpy", "tqdm", "PyYAML")


def _closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions these need, transitively (unconditional requirements only)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        dist = importlib.metadata.distribution(name)
        for req in dist.requires or []:
            if ";" in req and "extra ==" in req.split(";", 1)[1]:
                continue
            if ";" in req and "platform_system" in req and "Windows" in req:
                continue
            todo.append(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


@pytest.fixture(scope="module")
def bare_site(tmp_path_factory):
    """A folder of links to the files of trainval's required packages (and theirs), trainval's src, nothing else."""
    site = tmp_path_factory.mktemp("bare-site")
    requires = [r for r in importlib.metadata.requires("trainval") or [] if "extra ==" not in r]
    declared = {re.split(r"[\s;<>=!~\[]", r, maxsplit=1)[0] for r in requires}
    assert declared == set(REQUIRED), f"pyproject's required dependencies changed: {sorted(declared)}"
    for key in _closure(REQUIRED):
        dist = importlib.metadata.distribution(key)
        for top in {f.parts[0] for f in dist.files or [] if not f.parts[0].endswith((".dist-info", ".pth"))}:
            if top == ".." or top.startswith("__") or (site / top).exists():
                continue
            target = dist.locate_file(top)
            if os.path.exists(target):
                os.symlink(target, site / top)
    os.symlink(os.path.join(SRC, "trainval"), site / "trainval")
    return str(site)


def bare_python(site: str, code: str, *args: str, cwd: str) -> subprocess.CompletedProcess:
    """``code`` run by this Python with no site-packages but ``site`` (-S: no site, -E: no PYTHON* variables)."""
    boot = f"import sys; sys.path.insert(0, {site!r}); sys.argv[1:] = {list(args)!r}\n" + code
    return subprocess.run(
        [sys.executable, "-S", "-E", "-c", boot], cwd=cwd, capture_output=True, text=True, timeout=300
    )


CLI = "from trainval.app.cli import main; sys.exit(main())"


@pytest.mark.slow
def test_the_light_install_trains_and_names_the_extra_a_feature_needs(bare_site, tmp_path):
    missing = bare_python(bare_site, "import sklearn", cwd=str(tmp_path))
    assert "No module named 'sklearn'" in missing.stderr  # the control: the extras really are absent

    # the default data set needs scikit-learn: one line naming the extra, exit 2, no traceback
    out = bare_python(bare_site, CLI, "fit", cwd=str(tmp_path))
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "trainval: error: data.source=digits (the default data set) needs scikit-learn, which is not installed: "
        "pip install 'trainval[digits]'."
    ]

    # a CLI fit of one npz file: split without scikit-learn, trained, tested; no curves.png, said once
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 5)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    out = bare_python(
        bare_site, CLI, "fit", "data.source=npz", "data.train=d.npz", "model.name=mlp", "train.epochs=2",
        "run.out_dir=runs", "run.name=bare", cwd=str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    said = out.stdout + out.stderr
    assert said.count("curves.png needs matplotlib, which is not installed: pip install 'trainval[plot]'") == 1
    run = tmp_path / "runs" / "bare"
    assert (run / "best.pt").is_file() and (run / "predictions.csv").is_file()
    assert not (run / "curves.png").exists()
    # the same split as scikit-learn's (the full environment computes it): 150 -> 105/22/23
    assert len((run / "predictions.csv").read_text().splitlines()) == 1 + len(stratified_split(
        (x[:, 0] > 0).astype(np.int64), [0.15, 0.15], 0)[2])  # fmt: skip

    # trainval runs --plot needs matplotlib
    out = bare_python(bare_site, CLI, "runs", "runs", "--plot", "p.png", cwd=str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "trainval runs --plot needs matplotlib, which is not installed: pip install 'trainval[plot]'." in out.stderr

    # the Python API, the default plot=True included
    api = textwrap.dedent(
        """
        import torch
        from torch import nn
        import trainval
        torch.manual_seed(0)
        x = torch.randn(64, 4); y = (x[:, 0] > 0).long()
        model = nn.Linear(4, 2)
        t = trainval.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                             max_epochs=2, out_dir="api", progress=False)
        t.fit((x, y), (x, y))
        print("test acc", t.test((x, y))["test_acc"] > 0.5)
        """
    )
    out = bare_python(bare_site, api, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "test acc True" in out.stdout
    assert not (tmp_path / "api" / "curves.png").exists()


# --------------------------------------------------------------------------------------------------
# The wheel and the types


@pytest.mark.slow
def test_the_wheel_holds_the_licence_py_typed_and_one_version(tmp_path):
    import trainval

    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), REPO],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("trainval-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        licence = z.read(next(n for n in names if n.endswith("/licenses/LICENSE"))).decode()
    assert "trainval/py.typed" in names
    assert "MIT License" in licence
    assert re.search(r"^Version: (.+)$", meta, re.M).group(1) == trainval.__version__
    assert "Classifier: Typing :: Typed" in meta
    assert "License-Expression: MIT" in meta
    required = sorted(line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line)
    assert [re.split(r"[<>=]", r)[0] for r in required] == sorted(REQUIRED)
    assert os.path.isfile(os.path.join(REPO, "CHANGELOG.md"))


USER_SCRIPT = '''
import torch
from torch import nn

import trainval
from trainval import EMA, Callback, EarlyStopping, RunSummary, TensorLoader, Trainer


class Stop(Callback):
    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if row["epoch"] >= 1:
            trainer.should_stop = True


def main(folder: str) -> float:
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 2))
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
        callbacks=[Stop(), EarlyStopping(patience=2), EMA(0.9)], max_epochs=2, out_dir=folder, overwrite=True,
    )
    history = trainer.fit(TensorLoader(x, y, batch_size=16), val_data=(x, y))
    scores = trainer.test((x, y))
    predictions: torch.Tensor = trainer.predict(x)
    loaded: nn.Module = trainval.load_model(folder)
    summary = RunSummary()
    print(len(history), predictions.shape, loaded, summary, trainval.__version__, trainval.find_runs(folder))
    return float(scores["test_acc"])
'''


@pytest.mark.slow
def test_a_users_script_passes_mypy_strict(tmp_path):
    """py.typed: mypy reads trainval's hints (without it, subclassing Callback is an error under --strict)."""
    (tmp_path / "user.py").write_text(USER_SCRIPT)
    # torch's own types are not what this checks, and reading them takes most of a minute
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n\n[mypy-torch.*]\nfollow_imports = skip\nfollow_imports_for_stubs = True\n")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", sys.executable, "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Success: no issues found in 1 source file" in out.stdout
    # the control: the hints are real, so a misspelt option and a wrongly typed one are reported
    (tmp_path / "bad.py").write_text(
        "import torch\nfrom trainval import Trainer\nm = torch.nn.Linear(2, 2)\n"
        "Trainer(m, max_epoch=3)\nTrainer(m, max_epochs='3')\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", str(tmp_path / "cache"),
         "--python-executable", sys.executable, "bad.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 1
    assert 'bad.py:4: error: Unexpected keyword argument "max_epoch"' in out.stdout, out.stdout
    assert 'bad.py:5: error: Argument "max_epochs" to "Trainer" has incompatible type "str"; expected "int"' in out.stdout, out.stdout


# --------------------------------------------------------------------------------------------------
# A real Jupyter kernel

KERNEL_SETUP = """
import os, signal, torch, tqdm.notebook
from torch import nn
import trainval
torch.manual_seed(0)
x = torch.randn(256, 4); y = (x[:, 0] > 0).long()
kinds = []

class Watch(trainval.Callback):
    def __init__(self, interrupt):
        self.interrupt = interrupt
    def on_train_batch_end(self, trainer, i):
        kinds.append(isinstance(trainer._bar.bar, tqdm.notebook.tqdm) and "widget")
        if self.interrupt and i == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the first: finish the step, save, stop
            os.kill(os.getpid(), signal.SIGINT)  # the second: at once

def trainer(interrupt=False, **kw):
    model = nn.Linear(4, 2)
    return trainval.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(),
                            max_epochs=2, batch_size=16, out_dir="nb_run", callbacks=[Watch(interrupt)], **kw)
"""


@pytest.mark.slow
def test_in_a_jupyter_kernel_the_bar_is_a_widget_and_a_second_interrupt_spares_the_kernel(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    jupyter_client = pytest.importorskip("jupyter_client")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    km = jupyter_client.KernelManager(kernel_name="python3")  # ipykernel's own spec: this Python
    km.start_kernel(cwd=str(tmp_path))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)

        def cell(code: str) -> dict:
            reply = kc.execute_interactive(code, timeout=180, output_hook=lambda msg: None)
            return reply["content"]

        setup = cell(KERNEL_SETUP)
        assert setup["status"] == "ok", setup
        first = cell("trainer().fit((x, y), (x, y)); assert set(kinds) == {'widget'}, kinds")
        assert first["status"] == "ok", first
        again = cell("trainer().fit((x, y), (x, y))")  # the same cell again: the folder holds a run
        assert again["status"] == "error" and again["ename"] == "RunFolderError", again
        assert "overwrite" in again["evalue"]
        stopped = cell("trainer(interrupt=True, overwrite=True).fit((x, y), (x, y))")
        assert stopped["status"] == "error" and stopped["ename"] == "KeyboardInterrupt", stopped
        assert km.is_alive()
        alive = cell("assert kinds[-1] == 'widget' and len(kinds) > 16; print('alive')")
        assert alive["status"] == "ok", alive
        # a single interrupt: the step finishes, last.pt is saved, fit stops with Interrupted
        single = cell(
            "class Once(trainval.Callback):\n"
            "    def on_train_batch_end(self, trainer, i):\n"
            "        if i == 2: os.kill(os.getpid(), signal.SIGINT)\n"
            "model = nn.Linear(4, 2)\n"
            "trainval.Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), max_epochs=2,"
            " batch_size=16, out_dir='nb_run', overwrite=True, callbacks=[Once()]).fit((x, y), (x, y))"
        )
        assert single["status"] == "error" and single["ename"] == "Interrupted", single
        assert (tmp_path / "nb_run" / "last.pt").is_file()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
