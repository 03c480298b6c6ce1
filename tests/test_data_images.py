"""Image folders (data.source=images, trainval.data.images): real PNG files made with Pillow here.

The CLI runs are real subprocesses (run_cli). What fit records (size, mode, per-channel mean/std) is
checked against statistics computed here from the pixels the test wrote, and predict is checked against
the recorded model applied by hand to images resized and standardised here.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
import yaml
from conftest import run_cli
from PIL import Image

from trainval.app.workflow import load_model
from trainval.errors import ConfigError, DataError

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]], dtype=np.float64)  # one per class
CLASSES = ["cat", "dog", "eel"]


def pixels(cls: int, rng: np.random.Generator, size: int = 8) -> np.ndarray:
    """An RGB image of the class's colour with noise, uint8 [H, W, 3]."""
    noise = rng.normal(0, 25, (size, size, 3))
    return np.clip(COLOURS[cls] + noise, 0, 255).astype(np.uint8)


def write_class_folder(root, per_class: int = 20, seed: int = 0, size: int = 8) -> dict[str, np.ndarray]:
    """root/<class>/<i>.png; returns {relative path: pixels} as written."""
    rng = np.random.default_rng(seed)
    written = {}
    for c, name in enumerate(CLASSES):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            a = pixels(c, rng, size)
            rel = os.path.join(name, f"{i:02d}.png")
            Image.fromarray(a, "RGB").save(os.path.join(root, rel))
            written[rel] = a
    return written


def stats(arrays) -> tuple[np.ndarray, np.ndarray]:
    X = np.stack(list(arrays)).astype(np.float64) / 255.0  # [N, H, W, 3]
    return X.mean(axis=(0, 1, 2)), X.std(axis=(0, 1, 2))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI fit on train/ (whole), val/ and test/ folders: the run, and the pixels written."""
    root = tmp_path_factory.mktemp("images")
    train = write_class_folder(root / "train", 20, seed=0)
    write_class_folder(root / "val", 5, seed=1)
    write_class_folder(root / "test", 5, seed=2)
    args = [
        "fit",
        "data.source=images",
        f"data.train={root / 'train'}",
        f"data.val={root / 'val'}",
        f"data.test={root / 'test'}",
        "train.epochs=8",
        "train.batch_size=16",
        "train.progress=false",
        "log.plot=false",
        "model.channels=[8,16]",
        "optim.lr=0.01",
        f"run.out_dir={root / 'runs'}",
        "run.name=colours",
    ]
    fit = run_cli(*args, cwd=str(root))
    assert fit.returncode == 0, fit.stdout + fit.stderr
    return root, root / "runs" / "colours", train, fit


@pytest.mark.slow  # one CLI fit (about 10 s of CPU), shared by the three tests that use it
def test_fit_records_size_mode_and_training_statistics(trained):
    root, run, train, fit = trained
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    resolved = cfg["resolved"]
    mean, std = stats(train.values())  # the whole train/ folder is the training split
    assert resolved["image_size"] == [8, 8] and resolved["image_mode"] == "RGB"
    assert (
        resolved["classes"] == CLASSES and resolved["num_outputs"] == 3 and resolved["in_shape"] == [3, 8, 8]
    )
    np.testing.assert_allclose(resolved["image_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(resolved["image_std"], std, rtol=1e-12)
    summary = yaml.safe_load((run / "summary.json").read_text())
    assert summary["test"]["test_acc"] == 1.0  # coloured classes: the built-in cnn learns them
    rows = list(csv.reader(open(run / "predictions.csv")))
    assert rows[0] == ["Id", "Class"]
    assert [r[0] for r in rows[1:]] == [f"{c}/{i:02d}.png" for c in CLASSES for i in range(5)]
    assert [r[1] for r in rows[1:]] == [c for c in CLASSES for _ in range(5)]  # the class folders' names


@pytest.mark.slow  # one CLI fit (about 10 s of CPU), shared by the three tests that use it
def test_predict_flat_folder_writes_file_names_and_reapplies_recorded_format(trained, tmp_path):
    root, run, train, _ = trained
    flat = tmp_path / "new"
    flat.mkdir()
    rng = np.random.default_rng(7)
    names = {"b.png": 2, "a,1.png": 0, "c d.jpg": 1, "z.PNG": 2, "m.png": 1}
    for name, c in names.items():  # 16x16: predict resizes to the recorded 8x8
        Image.fromarray(pixels(c, rng, 16), "RGB").save(
            flat / name, format="JPEG" if name.endswith("jpg") else "PNG"
        )
    Image.fromarray(pixels(0, rng, 16)[:, :, 0], "L").save(flat / "gray.png")  # converted to the recorded RGB
    out = tmp_path / "preds.csv"
    p = run_cli("predict", str(run), "--data", str(flat), "--out", str(out), "--proba", cwd=str(root))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["Id", "Class", *(f"prob_{c}" for c in CLASSES)]  # classes by their folders' names
    ordered = sorted([*names, "gray.png"])
    assert [r[0] for r in rows[1:]] == ordered
    assert [CLASSES.index(r[1]) for r in rows[1:] if r[0] != "gray.png"] == [
        names[n] for n in ordered if n != "gray.png"
    ]
    # the same probabilities by hand: Pillow's bilinear resize to 8x8, RGB, the training split's mean/std
    mean, std = stats(train.values())
    model = load_model(str(run))
    by_hand = []
    for name in ordered:
        image = Image.open(flat / name).convert("RGB").resize((8, 8), Image.Resampling.BILINEAR)
        x = (np.asarray(image, dtype=np.float64) / 255.0 - mean) / std
        by_hand.append(torch.from_numpy(x.transpose(2, 0, 1).astype(np.float32)))
    with torch.no_grad():
        probs = torch.softmax(model(torch.stack(by_hand)), dim=1).numpy()
    np.testing.assert_allclose(np.array([[float(v) for v in r[2:]] for r in rows[1:]]), probs, atol=2e-6)
    # data.test=FOLDER does the same as --data
    again = run_cli(
        "predict", str(run), f"data.test={flat}", "--out", str(tmp_path / "again.csv"), cwd=str(root)
    )
    assert again.returncode == 0, again.stderr
    assert [r[:2] for r in csv.reader(open(tmp_path / "again.csv"))] == [r[:2] for r in rows]


@pytest.mark.slow  # one CLI fit (about 10 s of CPU), shared by the three tests that use it
def test_test_on_a_labelled_folder_and_unknown_class(trained, tmp_path):
    root, run, _, _ = trained
    labelled = tmp_path / "more"
    write_class_folder(labelled, 4, seed=9)
    t = run_cli("test", str(run), "--data", str(labelled), cwd=str(root))
    assert t.returncode == 0, t.stdout + t.stderr
    assert "Test Acc: 1.000000" in t.stdout
    os.rename(labelled / "eel", labelled / "fox")
    bad = run_cli("test", str(run), "--data", str(labelled), cwd=str(root))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0
    assert (
        "class folder(s) 'fox' that the run was not trained on (its classes: 'cat', 'dog', 'eel')"
        in bad.stderr
    )


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("broken.png", b"this is not a png", "broken.png is not a readable image"),
        ("truncated.png", None, "truncated.png is not a readable image"),
        ("notes.txt", b"hello", "notes.txt is not an image file"),
    ],
)
def test_corrupt_or_non_image_file_is_one_line_naming_it(tmp_path, name, content, says):
    write_class_folder(tmp_path / "train", 4)
    if content is None:  # a real PNG cut short: its header reads, its pixels do not
        Image.fromarray(pixels(0, np.random.default_rng(0), 32), "RGB").save(tmp_path / "full.png")
        content = (tmp_path / "full.png").read_bytes()[:120]
    (tmp_path / "train" / "dog" / name).write_bytes(content)
    r = run_cli(
        "fit",
        "data.source=images",
        f"data.train={tmp_path / 'train'}",
        "train.epochs=1",
        f"run.out_dir={tmp_path / 'runs'}",
        "train.progress=false",
        cwd=str(tmp_path),
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert says in r.stderr and os.path.join("train", "dog", name) in r.stderr


def test_untrusted_files_refused(tmp_path, monkeypatch):
    from trainval.data import images as image_data

    root = tmp_path / "train"
    write_class_folder(root, 2)
    outside = tmp_path / "secret.png"
    Image.fromarray(pixels(0, np.random.default_rng(0)), "RGB").save(outside)
    os.symlink(outside, root / "cat" / "link.png")
    with pytest.raises(DataError, match="link.png is a symbolic link that leads out of the image folder"):
        image_data.scan(str(root), "data.train")
    os.remove(root / "cat" / "link.png")
    os.symlink(root / "dog" / "00.png", root / "cat" / "inside.png")  # a link inside the folder is read
    assert "cat/inside.png" in image_data.scan(str(root), "data.train").files
    os.mkfifo(root / "dog" / "pipe.png")
    with pytest.raises(DataError, match="pipe.png in the image folder is not a regular file"):
        image_data.scan(str(root), "data.train")
    os.remove(root / "dog" / "pipe.png")
    files = image_data.scan(str(root), "data.train")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 63)  # the 8x8 images are 64 pixels: bombs now
    with pytest.raises(
        DataError,
        match=r"cat/00.png .*more .*than Pillow's Image.MAX_IMAGE_PIXELS \(63\); refused as a possible decompression bomb",
    ):
        image_data.probe(files)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    assert len(image_data.probe(files)) == len(files.files)


def test_grayscale_auto_and_image_size(tmp_path):
    """Grayscale images stay one channel; data.image_size resizes; mixed folders are RGB."""
    from trainval.data import images as image_data

    root = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(
                np.full((10, 6), 40 + 150 * c, np.uint8) + rng.integers(0, 9, (10, 6), dtype=np.uint8), "L"
            ).save(root / name / f"{i}.png")
    d = {
        "train": str(root),
        "val": None,
        "test": None,
        "split_seed": 0,
        "image_size": None,
        "image_mode": "auto",
    }
    train, val, test, fmt = image_data.load_image_splits(d, (0.0, 0.0))
    assert fmt.mode == "L" and fmt.size == (10, 6) and train.X.shape == (12, 1, 10, 6) and val is None
    np.testing.assert_allclose(train.X.mean(axis=(0, 2, 3)), [0.0], atol=1e-6)  # standardised per channel
    np.testing.assert_allclose(train.X.std(axis=(0, 2, 3)), [1.0], atol=1e-5)
    train, *_, fmt = image_data.load_image_splits({**d, "image_size": 4, "image_mode": "rgb"}, (0.0, 0.0))
    assert fmt.mode == "RGB" and fmt.size == (4, 4) and train.X.shape == (12, 3, 4, 4)
    Image.fromarray(pixels(0, rng), "RGB").save(root / "a" / "colour.png")
    assert image_data.load_image_splits(d, (0.0, 0.0))[3].mode == "RGB"
    with pytest.raises(ConfigError, match="is not a folder"):
        image_data.scan(str(root / "a" / "0.png"), "data.train")
    (root / "stray.png").write_bytes(b"")
    with pytest.raises(DataError, match="holds both subfolders"):
        image_data.scan(str(root), "data.train")
