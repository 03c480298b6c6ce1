"""Issue 12: nothing from a file runs code, nothing trainval does not own is touched, one writer per
run folder. CLI cases run the real ``trainval`` in a subprocess."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import run_cli

from trainval.app.models import MLP
from trainval.errors import ConfigError


def write_csv(path, rows: int = 60, features: int = 4, classes: int = 2, seed: int = 0) -> str:
    """A tiny learnable CSV: f1..fN and a label column."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(rows) % classes
    X = y[:, None].float() * 2 + 0.3 * torch.randn(rows, features, generator=g)
    lines = [",".join([f"f{i + 1}" for i in range(features)] + ["label"])]
    lines += [",".join([f"{v:.4f}" for v in X[r].tolist()] + [str(int(y[r]))]) for r in range(rows)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def csv_args(tmp_path, name: str = "r") -> list[str]:
    data = tmp_path / "data.csv"
    if not data.exists():
        write_csv(data)
    return [
        "data.source=csv",
        f"data.train={data}",
        "model.name=mlp",
        "model.hidden=[8]",
        "train.epochs=1",
        "train.batch_size=16",
        "train.progress=false",
        "log.plot=false",
        f"run.out_dir={tmp_path / 'runs'}",
        f"run.name={name}",
    ]


def one_error_line(proc, code: int) -> str:
    assert proc.returncode == code, proc.stdout + proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("trainval: error: "), err
    return err


# ------------------------------------------------------------------------------------------------
# 1. A checkpoint never runs code


def test_crafted_checkpoint_naming_os_system_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "downloaded.pt"
    torch.save(
        {
            "model": {},
            "epoch": 1,
            "config": {
                "model": {"name": "os:system", "kwargs": {"command": f"touch {marker}"}},
                "resolved": {"in_shape": [4], "num_classes": 2},
            },
        },
        crafted,
    )
    proc = run_cli(
        "predict",
        *csv_args(tmp_path),
        "--ckpt",
        str(crafted),
        "--out",
        str(tmp_path / "p.csv"),
        cwd=str(tmp_path),
    )
    err = one_error_line(proc, 1)
    assert "model.name: checkpoint 'os:system', config 'mlp'" in err, err
    assert not marker.exists()
    assert not (tmp_path / "p.csv").exists()


def test_a_run_folders_module_model_is_imported_only_with_trust_code(tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nNet = None\n")
    env = {"PYTHONPATH": str(tmp_path)}
    # A downloaded run folder whose config.yaml names the module, and a checkpoint naming it too.
    cfg = tmp_path / "config.yaml"
    cfg.write_text("model:\n  name: evilmod:Net\n")
    torch.save({"model": {}, "epoch": 1, "config": {"model": {"name": "evilmod:Net"}}}, tmp_path / "best.pt")
    for command in ("test", "predict"):
        proc = run_cli(
            command,
            str(cfg),
            *csv_args(tmp_path)[:2],
            "model.name=evilmod:Net",
            "--ckpt",
            str(tmp_path / "best.pt"),
            cwd=str(tmp_path),
            env=env,
        )
        err = one_error_line(proc, 2)
        assert "--trust-code" in err and "model.name=evilmod:Net" in err, err
        assert not marker.exists()
    # A checkpoint naming the module while the user's config builds an MLP: compared, not imported.
    proc = run_cli(
        "predict",
        *csv_args(tmp_path),
        "--ckpt",
        str(tmp_path / "best.pt"),
        "--out",
        str(tmp_path / "p.csv"),
        cwd=str(tmp_path),
        env=env,
    )
    assert "model.name: checkpoint 'evilmod:Net', config 'mlp'" in one_error_line(proc, 1)
    assert not marker.exists()
    # The control: with the opt-in, the import does happen.
    run_cli(
        "predict",
        str(cfg),
        *csv_args(tmp_path)[:2],
        "--trust-code",
        "--ckpt",
        str(tmp_path / "best.pt"),
        "--out",
        str(tmp_path / "p.csv"),
        cwd=str(tmp_path),
        env=env,
    )
    assert marker.exists()


def test_predict_with_a_bare_state_dict_checks_keys_and_shapes(tmp_path):
    args = csv_args(tmp_path)
    built = MLP(4, 2, [8], 0.25, True)
    torch.save(built.state_dict(), tmp_path / "sd.pt")
    ok = run_cli(
        "predict",
        *args,
        "--ckpt",
        str(tmp_path / "sd.pt"),
        "--out",
        str(tmp_path / "p.csv"),
        cwd=str(tmp_path),
    )
    assert ok.returncode == 0, ok.stderr
    torch.save(MLP(4, 2, [16], 0.25, True).state_dict(), tmp_path / "wide.pt")
    bad = run_cli(
        "predict",
        *args,
        "--ckpt",
        str(tmp_path / "wide.pt"),
        "--out",
        str(tmp_path / "q.csv"),
        cwd=str(tmp_path),
    )
    assert "shape mismatches" in one_error_line(bad, 1)


# ------------------------------------------------------------------------------------------------
# 9. A zip bomb is refused before anything is inflated


def test_zip_bomb_checkpoint_is_refused_before_unpickling(tmp_path, monkeypatch):
    import zipfile

    from trainval.checkpoint import load_checkpoint
    from trainval.errors import CheckpointError

    plain = tmp_path / "plain.pt"
    torch.save({"model": {"w": torch.zeros(4_000_000)}, "epoch": 1}, plain)  # 16 MB of zeros
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < plain.stat().st_size // 50
    assert torch.load(bomb, weights_only=True)["model"]["w"].numel() == 4_000_000  # torch itself inflates it

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was reached")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"refusing to load .*bomb\.pt: it holds compressed entries"):
        load_checkpoint(str(bomb))
    # Sizes that claim more than the file holds: patch one stored entry's declared size.
    liar = tmp_path / "liar.pt"
    data = bytearray(plain.read_bytes())
    with zipfile.ZipFile(plain) as src:
        info = max(src.infolist(), key=lambda i: i.file_size)
    at = 0
    while True:  # its central-directory record: signature, ..., uncompressed size at offset 24, name at 46
        at = data.index(b"PK\x01\x02", at + 1)
        if data[at + 46 : at + 46 + len(info.filename)] == info.filename.encode():
            break
    data[at + 24 : at + 28] = (2**31).to_bytes(4, "little")
    liar.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"refusing to load .*liar\.pt: its entries claim"):
        load_checkpoint(str(liar))


# ------------------------------------------------------------------------------------------------
# 2. predict --out never replaces a checkpoint, an input, or a file trainval did not write


def test_predict_out_refuses_checkpoints_inputs_and_foreign_files(tmp_path):
    args = csv_args(tmp_path)
    run_cli("fit", *args, cwd=str(tmp_path), check=True)
    run = tmp_path / "runs" / "r"
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  epochs: 1\n")
    elsewhere = tmp_path / "other.pt"
    elsewhere.write_bytes((run / "last.pt").read_bytes())
    notes = tmp_path / "notes.txt"
    notes.write_text("mine\n")
    guarded = {
        run / "best.pt": "best.pt",
        run / "last.pt": "last.pt",
        tmp_path / "data.csv": "data.train",
        cfg: "the config file",
        elsewhere: "PyTorch checkpoint",
        run / "summary.json": "summary.json",
    }
    for path, words in guarded.items():
        before = path.read_bytes()
        proc = run_cli("predict", str(cfg), *args, "--out", str(path), "--force", cwd=str(tmp_path))
        assert words in one_error_line(proc, 2)
        assert path.read_bytes() == before
    proc = run_cli("predict", str(cfg), *args, "--out", str(notes), cwd=str(tmp_path))
    assert "--force" in one_error_line(proc, 2) and notes.read_text() == "mine\n"
    # The controls: trainval's own predictions file is replaced; --force replaces the user's file.
    run_cli("predict", *args, cwd=str(tmp_path), check=True)
    run_cli("predict", *args, "--out", str(notes), "--force", cwd=str(tmp_path), check=True)
    assert notes.read_text().startswith("Id,Class\n")


# ------------------------------------------------------------------------------------------------
# 3. fit never overwrites files it did not write


def test_fit_into_a_users_folder_replaces_nothing(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    files = {"config.yaml": "my config\n", "predictions.csv": "a,b\n", "summary.json": "{}\n"}
    for name, text in files.items():
        (user / name).write_text(text)
    args = csv_args(tmp_path)[:-2] + [f"run.out_dir={tmp_path}", "run.name=mine"]
    proc = run_cli("fit", *args, "run.overwrite=true", cwd=str(tmp_path))
    err = one_error_line(proc, 2)
    assert "not made by trainval" in err and "config.yaml, summary.json, predictions.csv" in err, err
    assert sorted(os.listdir(user)) == sorted(files)
    assert all((user / name).read_text() == text for name, text in files.items())
    # An empty folder the user made becomes a run folder: the control.
    (tmp_path / "empty").mkdir()
    run_cli("fit", *args[:-1], "run.name=empty", cwd=str(tmp_path), check=True)
    assert (tmp_path / "empty" / "best.pt").exists() and (tmp_path / "empty" / ".trainval-run").exists()


# ------------------------------------------------------------------------------------------------
# 4. run.name stays inside out_dir; only trainval's own temp files are deleted


@pytest.mark.parametrize("name", ["../escaped", "a/b", "/tmp/abs-run", ".", ".."])
def test_run_name_is_confined_to_out_dir(tmp_path, name):
    (tmp_path / "runs").mkdir()
    args = csv_args(tmp_path)[:-1] + [f"run.name={name}"]
    proc = run_cli("fit", *args, cwd=str(tmp_path / "runs"))
    assert "run.name must be a plain folder name" in one_error_line(proc, 2)
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "runs"] and os.listdir(tmp_path / "runs") == []


def test_fit_deletes_only_its_own_temp_files(tmp_path):
    args = csv_args(tmp_path)
    run_cli("fit", *args, cwd=str(tmp_path), check=True)
    run = tmp_path / "runs" / "r"
    own = run / ".trainval-last.pt.ab12cd_9.tmp"  # what a killed atomic write leaves
    users = [run / ".notes.tmp", run / ".last.pt.abcdefgh.tmp", run / ".trainval-notes.tmp"]
    for path in [own, *users]:
        path.write_text("x")
    run_cli("fit", *args, "run.overwrite=true", cwd=str(tmp_path), check=True)
    assert not own.exists()
    assert all(path.read_text() == "x" for path in users)


# ------------------------------------------------------------------------------------------------
# 5. One writer per run folder: a real second process is refused, naming the holder's pid


def test_one_writer_per_run_folder(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = csv_args(tmp_path)
    run = tmp_path / "runs" / "r"
    long_fit = [*args[:-6], "train.epochs=100000", *args[-5:]]
    holder = subprocess.Popen(
        [sys.executable, "-m", "trainval", "fit", *long_fit],
        cwd=str(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "last.pt").exists():
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        busy = f"in use by another trainval process (pid {holder.pid})"
        writing = run / ".trainval-last.pt.abcd1234.tmp"  # as if the holder were inside a write
        writing.write_text("half")
        second = run_cli("fit", *args, "run.overwrite=true", cwd=str(tmp_path))
        assert busy in one_error_line(second, 2)
        assert writing.exists()  # the refused fit cleaned up nothing
        resume = run_cli("fit", *long_fit, "--resume", cwd=str(tmp_path))
        assert busy in one_error_line(resume, 2)
        into = run_cli("predict", *args, cwd=str(tmp_path))
        assert busy in one_error_line(into, 2)
        assert not (run / "predictions.csv").exists()
        # Reading the folder is not writing to it: predictions elsewhere go ahead meanwhile.
        run_cli("predict", *args, "--out", str(tmp_path / "p.csv"), cwd=str(tmp_path), check=True)
        assert holder.poll() is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # A SIGKILLed holder blocks nobody: the kernel released its lock.
    again = run_cli("fit", *args, "run.overwrite=true", cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("probe_seconds, refused", [(0.2, False), (3.0, True)])
def test_a_listing_probe_does_not_refuse_a_starting_writer(tmp_path, probe_seconds, refused):
    """`trainval runs` probes a folder with an instant's shared lock; a fit starting during the probe
    waits it out. The control: a lock held longer than the writer's patience is a writer in the way."""
    import fcntl
    import threading

    from trainval.errors import RunFolderError
    from trainval.run import runfolder

    folder = tmp_path / "r"
    folder.mkdir()
    fd = os.open(folder, os.O_RDONLY)  # another open file description: flock conflicts as across processes
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    timer = threading.Timer(probe_seconds, lambda: fcntl.flock(fd, fcntl.LOCK_UN))
    timer.start()
    try:
        if refused:
            with pytest.raises(RunFolderError, match="in use by another trainval process"):
                with runfolder.locked(str(folder), "fit"):
                    pass
        else:
            with runfolder.locked(str(folder), "fit"):
                assert runfolder.is_run_folder(str(folder))
    finally:
        timer.join()
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# 11. Config files and run-folder paths: one clear line each, no traceback


CONFIG_FILES = {
    "duplicate": (
        b"optim:\n  lr: 0.1\n  name: sgd\n  lr: 0.2\n",
        "duplicate key 'lr', first given at line 2",
    ),
    "utf16": ("train:\n  epochs: 1\n".encode("utf-16"), "not a UTF-8 text file"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a UTF-8 text file"),
    "latin1": ("run:\n  name: caf\xe9\n".encode("latin-1"), "not UTF-8 text (an invalid byte at line 2)"),
}


@pytest.mark.parametrize("kind", list(CONFIG_FILES))
def test_bad_config_files(tmp_path, kind):
    data, words = CONFIG_FILES[kind]
    (tmp_path / "c.yaml").write_bytes(data)
    proc = run_cli("fit", "c.yaml", cwd=str(tmp_path))
    assert words in one_error_line(proc, 2)
    assert os.listdir(tmp_path) == ["c.yaml"]


BAD_VALUES = [
    (["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    (["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1)"),
    (["optim.betas=[1.5, 0.9]"], "optim.betas must be two numbers in [0, 1)"),
    (["optim.betas=[.nan, 0.9]"], "optim.betas must be a list of finite numbers"),
]


@pytest.mark.parametrize("args, words", BAD_VALUES, ids=[a[0] for a, _ in BAD_VALUES])
def test_bad_values(tmp_path, args, words):
    proc = run_cli("fit", *args, cwd=str(tmp_path))
    assert words in one_error_line(proc, 2)
    assert os.listdir(tmp_path) == []


def test_unusable_run_folder_paths(tmp_path):
    args = csv_args(tmp_path)[:-2]
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    cases = {
        f"run.out_dir={tmp_path}": ("run.name=afile", "is a file, not a folder"),
        f"run.out_dir={tmp_path}/afile": ("run.name=r", "a part of that path is a file"),
        f"run.out_dir={tmp_path}/": ("run.name=dangling", "is a symbolic link to"),
        "run.out_dir=/proc/no-such-place": ("run.name=r", "cannot create the run folder"),
    }
    for out_dir, (name, words) in cases.items():
        proc = run_cli("fit", *args, out_dir, name, cwd=str(tmp_path))
        assert words in one_error_line(proc, 2), out_dir
    assert (tmp_path / "afile").read_text() == "x" and not os.path.exists(tmp_path / "nowhere")


def test_read_only_file_system_is_one_clear_error(tmp_path, monkeypatch):
    import errno

    from trainval.errors import ConfigError
    from trainval.run import runfolder

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(ConfigError, match=r"cannot create the run folder .*: Read-only file system"):
        runfolder.make_folder(str(tmp_path / "r"))


def test_tilde_out_dir_is_the_home_folder(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    args = csv_args(tmp_path)[:-2] + ["run.out_dir=~/runs", "run.name=r"]
    run_cli("fit", *args, cwd=str(work), env={"HOME": str(home)}, check=True)
    assert (home / "runs" / "r" / "best.pt").exists()
    assert os.listdir(work) == []  # no literal './~'
    assert f"out_dir: {home}/runs" in (home / "runs" / "r" / "config.yaml").read_text()  # the value used


# ------------------------------------------------------------------------------------------------
# 7. CSV files: positions are the file's rows, columns are named, odd-but-valid files load


def _csv_lines(rows: int = 40) -> list[str]:
    return ["f1,f2,label"] + [f"{r * 0.1:.1f},{(r % 7) * 0.5:.1f},{r % 2}" for r in range(rows)]


def test_csv_bom_blank_lines_and_quoted_cells_load(tmp_path):
    from trainval.data import load_csv

    lines = _csv_lines()
    lines[0] = "\ufeff" + lines[0]
    lines.insert(3, "")  # a blank line: file row 4
    lines[5] = '"0.3","1.5",1'  # quoted cells
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    split = load_csv(str(tmp_path / "d.csv"))
    assert split.X.shape == (40, 2) and split.y.tolist() == [r % 2 for r in range(40)]
    assert split.X[3].tolist() == [0.30000001192092896, 1.5]  # the quoted row (file row 6)
    # A quoted cell spanning two lines in a column that is not used; rows after it keep their numbers.
    lines = ["f1,note,f2,label"] + [f"{r},x,{r},{r % 2}" for r in range(12)]
    lines[3] = '2,"two\nlines",2,0'
    lines[10] = "9,x,nan,1"  # file row 11 (row 4 spans two lines)
    (tmp_path / "q.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    from trainval.errors import DataError

    with pytest.raises(DataError, match=r"q\.csv: row 12, column 'f2': 'nan' is not a finite number"):
        load_csv(str(tmp_path / "q.csv"), features=["f1", "f2"])
    assert load_csv(str(tmp_path / "q.csv"), features=["f1", "f2"], allow_nonfinite=True).X.shape == (12, 2)


def _nan_at_row_11():
    lines = _csv_lines()
    lines.insert(3, "")
    lines[10] = "0.9,nan,1"  # file row 11 (row 4 is blank)
    return "\n".join(lines) + "\n"


CSV_CASES = {
    "nan-row-11": (_nan_at_row_11(), [], 1, "data.csv: row 11, column 'f2': 'nan' is not a finite number"),
    "duplicate-columns": (
        "f1,f1,label\n" + "1,2,0\n3,4,1\n" * 20,
        [],
        1,
        "the header names column(s) 'f1' more than once",
    ),
    "features-include-label": (
        "\n".join(_csv_lines()) + "\n",
        ["data.features=[f1, label]"],
        2,
        "data.features includes the label column 'label'",
    ),
    "features-empty": ("\n".join(_csv_lines()) + "\n", ["data.features=[]"], 2, "data.features is empty"),
    "latin-1": (
        "f1,f2,label\n" + "1,2,0\n3,4,1\n" * 5 + "1,2,caf\xe9\n",
        [],
        1,
        "data.csv: row 12 is not UTF-8 text (byte 0xe9)",
    ),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_bad_csv_files_are_one_line_naming_row_and_column(tmp_path, case):
    text, extra, code, words = CSV_CASES[case]
    (tmp_path / "data.csv").write_bytes(text.encode("latin-1" if case == "latin-1" else "utf-8"))
    proc = run_cli("fit", *csv_args(tmp_path), *extra, cwd=str(tmp_path))
    assert words in one_error_line(proc, code)
    assert not (tmp_path / "runs").exists() or os.listdir(tmp_path / "runs") == []


# ------------------------------------------------------------------------------------------------
# 6. Resume with a changed config: refused when it cannot be honoured exactly, noted when it can

RESUME_REFUSED = [
    (["optim.lr=0.01"], "optim.lr 0.001 -> 0.01"),
    (["train.monitor=val_loss"], "train.monitor None -> 'val_loss'"),
    (["train.batch_size=8"], "train.batch_size 16 -> 8"),
    (["data.split_seed=3"], "data.split_seed 0 -> 3"),
    (["optim.name=sgd", "optim.lr=0.1"], "optim.name 'adam' -> 'sgd'; optim.lr 0.001 -> 0.1"),
    (["train.epochs=1"], "train.epochs 2 -> 1 (2 epochs are already done)"),
]


@pytest.mark.slow
def test_resume_with_a_changed_config(tmp_path):
    args = csv_args(tmp_path)[:4] + csv_args(tmp_path)[5:]  # without train.epochs
    run = tmp_path / "runs" / "r"
    run_cli("fit", *args, "train.epochs=2", cwd=str(tmp_path), check=True)
    kept = {name: (run / name).read_bytes() for name in ("last.pt", "config.yaml", "metrics.csv")}
    for extra, words in RESUME_REFUSED:
        proc = run_cli("fit", *args, "train.epochs=2", *extra, "--resume", cwd=str(tmp_path))
        err = one_error_line(proc, 2)
        assert "cannot resume" in err and words in err, err
        assert {name: (run / name).read_bytes() for name in kept} == kept
    ok = run_cli("fit", *args, "train.epochs=3", "--resume", cwd=str(tmp_path), check=True)
    assert "resuming with train.epochs 2 -> 3" in ok.stdout and "[003/003]" in ok.stdout
    assert "epochs: 3" in (run / "config.yaml").read_text()
    # Schedules laid out for a number of epochs: more epochs would jump (cosine) or crash (onecycle).
    for schedule in ("cosine", "onecycle"):
        run_cli(
            "fit",
            *args[:-1],
            f"run.name={schedule}",
            "train.epochs=1",
            f"scheduler.name={schedule}",
            cwd=str(tmp_path),
            check=True,
        )
        proc = run_cli(
            "fit",
            *args[:-1],
            f"run.name={schedule}",
            "train.epochs=2",
            f"scheduler.name={schedule}",
            "--resume",
            cwd=str(tmp_path),
        )
        assert f"train.epochs 1 -> 2 (the {schedule} schedule was laid out for 1 epochs)" in one_error_line(
            proc, 2
        )


def test_api_resume_with_another_optimizer_is_one_clear_error(tmp_path):
    from conftest import make_blobs, tiny_mlp

    from trainval import Trainer
    from trainval.errors import CheckpointError

    X, y = make_blobs(n=30)
    model = tiny_mlp()
    Trainer(
        model,
        torch.optim.Adam(model.parameters()),
        max_epochs=1,
        out_dir=str(tmp_path),
        progress=False,
        plot=False,
        device="cpu",
    ).fit((X, y), (X, y))
    model = tiny_mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(sgd, 1)
    with pytest.raises(CheckpointError, match="cannot be resumed with this optimizer/scheduler"):
        Trainer(
            model,
            sgd,
            max_epochs=2,
            out_dir=str(tmp_path),
            progress=False,
            plot=False,
            device="cpu",
            scheduler=scheduler,
        ).fit((X, y), (X, y), resume=True)


# ------------------------------------------------------------------------------------------------
# 10. A closed stdout does not kill a fit; a kill between best.pt and the first last.pt is recoverable


def test_fit_piped_into_head_keeps_training_and_saves(tmp_path):
    import shlex
    import subprocess
    import sys

    args = csv_args(tmp_path)[:4] + ["train.epochs=3"] + csv_args(tmp_path)[5:]
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "trainval", "fit", *args])
    proc = subprocess.run(
        ["bash", "-c", f"{command} | head -1; exit ${{PIPESTATUS[0]}}"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("[001/003]") and len(proc.stdout.splitlines()) == 1
    run = tmp_path / "runs" / "r"
    assert (run / "last.pt").exists() and (run / "summary.json").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3


def test_kill_between_best_and_first_last_checkpoint_is_recoverable(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    # The real kill: SIGKILL inside the second checkpoint write of a fit (last.pt, just after best.pt).
    child = os.path.join(REPO, "tests", "helpers", "train_child.py")
    killed = subprocess.run(
        [sys.executable, child, str(tmp_path / "api"), json.dumps({"kill_in_write": 2})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9
    assert (tmp_path / "api" / "best.pt").exists() and not (tmp_path / "api" / "last.pt").exists()
    # The same state through the CLI: both paths say the same thing, and starting over works.
    args = csv_args(tmp_path)
    run = tmp_path / "runs" / "r"
    run_cli("fit", *args, cwd=str(tmp_path), check=True)
    for name in ("last.pt", "metrics.csv", "summary.json", "predictions.csv"):
        (run / name).unlink()
    resume = run_cli("fit", *args, "--resume", cwd=str(tmp_path))
    assert "no epoch was saved there); start without resume to train from the beginning" in one_error_line(
        resume, 1
    )
    again = run_cli("fit", *args, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr
    assert (
        "has no last.pt beside it (a fit stopped before its first epoch was saved): starting over"
        in again.stdout
    )
    assert (run / "last.pt").exists()


# ------------------------------------------------------------------------------------------------
# 13. --nproc: a config error before torchrun starts; a failing rank's own error, prefixed by its rank


def test_nproc_config_typo_is_one_line_before_torchrun(tmp_path):
    import time

    started = time.monotonic()
    proc = run_cli("fit", "--nproc", "2", "train.epoch=5", cwd=str(tmp_path))
    assert "unknown key 'train.epoch' (did you mean 'train.epochs'?)" in one_error_line(proc, 2)
    assert "torch.distributed" not in proc.stdout + proc.stderr and time.monotonic() - started < 30
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_nproc_prints_a_failing_ranks_own_error(tmp_path):
    (tmp_path / "rankfail.py").write_text(
        "import os\nimport numpy as np\n\n\ndef data():\n"
        "    if os.environ.get('RANK') == '1':\n        raise RuntimeError('rank one broke')\n"
        "    X = np.random.default_rng(0).normal(size=(40, 4)).astype('float32')\n"
        "    return {'train': (X, np.arange(40) % 2), 'val': (X, np.arange(40) % 2)}\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = run_cli(
        "fit",
        "--nproc",
        "2",
        "data.source=factory",
        "data.factory=rankfail:data",
        "model.name=mlp",
        "train.epochs=1",
        f"run.out_dir={tmp_path}",
        "run.name=r",
        "log.plot=false",
        cwd=str(tmp_path),
        env=env,
    )
    err = one_error_line(proc, 2)
    assert (
        err == "trainval: error: [rank 1] data.factory 'rankfail:data' raised RuntimeError: rank one broke"
    ), err
    # The same error on every rank is printed once: rank 0's, or rank 1's (prefixed) when torchrun
    # stopped rank 0 before it got there.
    proc = run_cli(
        "fit",
        "--nproc",
        "2",
        "data.source=csv",
        "data.train=nope.csv",
        "model.name=mlp",
        f"run.out_dir={tmp_path}",
        "run.name=s",
        cwd=str(tmp_path),
        env=env,
    )
    err = one_error_line(proc, 2)
    assert err in (
        "trainval: error: data file not found: nope.csv.",
        "trainval: error: [rank 1] data file not found: nope.csv.",
    ), err


def test_csv_without_data_rows_or_too_few_to_split_is_one_line(tmp_path):
    (tmp_path / "data.csv").write_text("f1,f2,f3,f4,label\n")
    proc = run_cli("fit", *csv_args(tmp_path), cwd=str(tmp_path))
    assert "data.csv: there are no data rows below the header" in one_error_line(proc, 1)
    (tmp_path / "data.csv").write_text("f1,f2,f3,f4,label\n1,2,3,4,0\n")
    proc = run_cli("fit", *csv_args(tmp_path), cwd=str(tmp_path))
    assert "cannot hold out a 0.15 split of 1 samples" in one_error_line(proc, 1)


def test_predictions_files_trainval_wrote_are_told_from_other_files(tmp_path):
    """predict replaces, without --force, only what write_predictions writes (every task's layout)."""
    from trainval.app.workflow import write_predictions
    from trainval.run import runfolder

    made = {
        "multiclass": (torch.tensor([1, 0]), torch.tensor([[0.2, 0.8], [0.9, 0.1]])),
        "binary": (torch.tensor([1, 0]), torch.tensor([0.8, 0.1])),
        "multilabel": (torch.tensor([[1, 0, 1], [0, 0, 1]]), torch.rand(2, 3)),
        "regression": (torch.tensor([[0.5, 2.0], [1.5, 3.0]]), None),
    }
    for task, (pred, probs) in made.items():
        for with_probs in (False, True):
            path = tmp_path / f"{task}-{with_probs}.csv"
            write_predictions(str(path), task, pred, probs if with_probs else None, ["y", "z"])
            assert runfolder._is_predictions_file(str(path), ["y", "z"]), path.read_text()
    dense = tmp_path / "dense.csv"
    write_predictions(str(dense), "multiclass", torch.zeros(2, 4, 4, dtype=torch.long))
    assert dense.read_text().startswith("Id,Array\n") and runfolder._is_predictions_file(str(dense))
    write_predictions(str(dense), "multiclass", torch.ones(2, 4, 4, dtype=torch.long))  # its own .npy: replaced
    assert np.load(tmp_path / "dense.npy").sum() == 32

    foreign = {"data.csv": "f1,f2,label\n1,2,0\n", "ids.csv": "Id,Name\n0,a\n", "reg.csv": "Id,y\n0,1.5\n",
               "labels.csv": "Id,label_1\n0,1\n", "empty.csv": "", "binary.csv": b"\xff\xfe"}
    for name, text in foreign.items():
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
        assert not runfolder._is_predictions_file(str(tmp_path / name), ["z"]), name
        with pytest.raises(ConfigError, match="not a predictions file trainval wrote"):
            runfolder.check_output(str(tmp_path / name), {}, force=False, target_names=["z"])
    runfolder.check_output(str(tmp_path / "reg.csv"), {}, force=False, target_names=["y"])  # this run's targets

    # a user's .npy beside a new --out is never replaced by a dense output's array file
    (tmp_path / "mine.npy").write_bytes(b"the user's")
    with pytest.raises(ConfigError, match="mine.npy exists but was not written with it"):
        write_predictions(str(tmp_path / "mine.csv"), "multiclass", torch.zeros(2, 4, 4, dtype=torch.long))
    assert (tmp_path / "mine.npy").read_bytes() == b"the user's" and not (tmp_path / "mine.csv").exists()
    write_predictions(str(tmp_path / "mine.csv"), "multiclass", torch.zeros(2, 4, 4, dtype=torch.long), force=True)
    assert np.load(tmp_path / "mine.npy").shape == (2, 4, 4)
