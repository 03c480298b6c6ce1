"""Issue 18: nothing runs from the working folder; configs and run folders' config.yaml are read through
one bounded YAML gate (alias bombs, deep nesting, FIFOs refused in one line). Real CLI subprocesses."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from conftest import run_cli

from trainval.errors import ConfigError
from trainval.untrusted import MAX_YAML_DEPTH, load_yaml, shown


def run_cli_fresh(*args, **kwargs):
    """A new interpreter: what it imports from the current folder is what these tests are about."""
    return run_cli(*args, fresh=True, **kwargs)

SHADOWS = ("tqdm", "sklearn", "matplotlib", "yaml", "numpy")


def plant_shadow_modules(folder) -> None:
    """Modules named like trainval's dependencies that leave a flag file when imported."""
    for name in SHADOWS:
        (folder / f"{name}.py").write_text(f"open({str(folder / ('IMPORTED-' + name))!r}, 'w').close()\n"
                                           f"raise SystemExit('the {name}.py of the current folder ran')\n")


def imported(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("IMPORTED-"))


FIT = ["train.epochs=1", "train.progress=false", "log.plot=false", "run.name=r"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 1-epoch run of the default digits job, made in a clean folder."""
    base = tmp_path_factory.mktemp("clean")
    run_cli_fresh("fit", *FIT, cwd=str(base), check=True)
    return base / "runs" / "r"


def test_modules_in_the_current_folder_never_run_without_being_named(tmp_path, digits_run):
    shutil.copytree(digits_run, tmp_path / "r")
    plant_shadow_modules(tmp_path)
    for args in (("predict", "r"), ("test", "r"), ("runs", ".", "--plot"), ("test", "r", "--ckpt", "last")):
        proc = run_cli_fresh(*args, cwd=str(tmp_path), timeout=300)
        assert proc.returncode == 0, (args, proc.stdout + proc.stderr)
        assert imported(tmp_path) == [], (args, imported(tmp_path))
    # fit too, and the console script as well as `python -m trainval`
    exe = os.path.join(os.path.dirname(sys.executable), "trainval")
    import subprocess

    proc = subprocess.run([exe, "fit", *FIT[:-1], "run.name=again"], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert imported(tmp_path) == []


def test_a_module_the_config_names_is_imported_from_the_current_folder_after_installed_ones(tmp_path):
    """The control: the user's own module in the current folder is found (appended to sys.path)."""
    plant_shadow_modules(tmp_path)
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, in_features, num_classes):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(in_features, num_classes)\n"
        "    def forward(self, x):\n"
        "        return self.lin(x.flatten(1))\n")
    proc = run_cli_fresh("fit", *FIT, "model.name=mynet:Net", cwd=str(tmp_path), env={"PYTHONPATH": ""}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert imported(tmp_path) == []  # its own imports (torch) and trainval's still come from the installed packages
    refused = run_cli_fresh("predict", "runs/r", cwd=str(tmp_path), env={"PYTHONPATH": ""})
    assert refused.returncode == 2 and "--trust-code" in refused.stderr, refused.stderr
    trusted = run_cli_fresh("predict", "runs/r", "--trust-code", "--out", "p.csv", cwd=str(tmp_path), env={"PYTHONPATH": ""})
    assert trusted.returncode == 0 and (tmp_path / "p.csv").exists(), trusted.stderr
    assert imported(tmp_path) == []


@pytest.mark.slow
def test_nproc_workers_import_nothing_from_the_current_folder(tmp_path):
    plant_shadow_modules(tmp_path)
    proc = run_cli_fresh("fit", *FIT, "train.batch_size=128", "--nproc", "2", cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert imported(tmp_path) == []


def billion_laughs(levels: int = 9) -> str:
    """The classic YAML bomb (613 bytes for nine levels): each anchor is a list of nine of the previous."""
    text = 'lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]\n"
    return text


def indented(text: str, spaces: int) -> str:
    return "".join(" " * spaces + line + "\n" for line in text.splitlines())


def test_yaml_gate_refuses_alias_bombs_and_deep_nesting_and_keeps_ordinary_aliases():
    with pytest.raises(ConfigError, match="billion laughs"):
        load_yaml(billion_laughs(), "bomb.yaml")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml("a: " + "[" * 100_000, "deep.yaml")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_yaml("".join("  " * i + f"k{i}:\n" for i in range(MAX_YAML_DEPTH + 2)) + "  " * 70 + "v: 1\n", "deep.yaml")
    # the controls: aliases that expand to a little, nesting a config uses
    assert load_yaml("a: &x [1, 2]\nb: *x\n", "ok.yaml") == {"a": [1, 2], "b": [1, 2]}
    assert load_yaml(billion_laughs(3), "small.yaml")["lol2"][0][0] == ["lol"] * 9


def test_a_run_folders_billion_laughs_config_is_one_line_not_a_hang(tmp_path, digits_run):
    run = tmp_path / "r"
    shutil.copytree(digits_run, run)
    recorded = (run / "config.yaml").read_text()
    assert "  kwargs: {}\n" in recorded
    bomb = "  kwargs:\n" + indented(billion_laughs(), 4)
    (run / "config.yaml").write_text(recorded.replace("  kwargs: {}\n", bomb))
    assert len(bomb.encode()) < 1000
    for command in ("predict", "test"):
        proc = run_cli_fresh(command, str(run), cwd=str(tmp_path), timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and "billion laughs" in err and "config.yaml" in err, err


def test_deep_yaml_anywhere_is_one_line(tmp_path, digits_run):
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  kwargs: " + "[" * 50_000 + "]" * 50_000 + "\n")
    proc = run_cli_fresh("fit", str(deep), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "nested deeper" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run = tmp_path / "r"
    shutil.copytree(digits_run, run)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "deep: " + "[" * 50_000 + "\n")
    proc = run_cli_fresh("predict", str(run), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "nested deeper" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # an override is YAML too: a bomb there is a string the key then refuses, bounded in the message
    proc = run_cli_fresh("fit", "model.kwargs=" + billion_laughs().replace("\n", " "), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "model.kwargs must be a mapping" in proc.stderr and len(proc.stderr) < 600, proc.stderr


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_config_that_is_a_fifo_or_device_is_one_line_not_a_hang(tmp_path, digits_run):
    fifo = tmp_path / "cfg.yaml"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero", str(tmp_path)):
        proc = run_cli_fresh("fit", path, cwd=str(tmp_path), timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and "not a regular file" in err, err
    run = tmp_path / "r"
    shutil.copytree(digits_run, run)
    os.unlink(run / "config.yaml")
    os.mkfifo(run / "config.yaml")
    proc = run_cli_fresh("predict", str(run), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2 and "is a FIFO" in proc.stderr, proc.stderr


def test_error_lines_carry_no_terminal_escapes(tmp_path):
    """The CLI's last gate: whatever a message quotes is printed with its control characters escaped."""
    evil = tmp_path / "cfg\x1b]0;pwned\x07\x1b[2J.yaml"
    evil.write_text("train:\n  epochz: 1\n")
    proc = run_cli_fresh("fit", str(evil), cwd=str(tmp_path), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr and "\\x1b]0;pwned" in proc.stderr, proc.stderr
    assert shown("a\x1b[31mb\r\n\u202e", limit=0) == "a\\x1b[31mb\\x0d\\x0a\\u202e"
    assert shown("x" * 1000).endswith("...(800 more characters)")
