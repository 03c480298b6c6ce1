"""Image folders (``data.source: images``), read with Pillow; no torchvision.

A labelled folder holds one subfolder per class, as torchvision's ``ImageFolder`` reads it: the classes
are the subfolder names in sorted order (class id 0, 1, ...), and every image file below a class
folder (at any depth) is a sample of that class. A flat folder of images (no subfolders) is unlabelled:
``trainval predict`` writes one row per file, the file name as its ``Id``.

Every image is decoded, converted and resized the way fit settled and recorded (:class:`ImageFormat`,
in the run's ``config.yaml`` under ``resolved``), so that test and predict read new images exactly as
the training images were read:

- mode: ``grayscale`` (1 channel, Pillow's ``L``), ``rgb`` (3 channels; an alpha channel is dropped), or
  ``auto`` (the default): grayscale when every training image is grayscale, else RGB;
- size: ``data.image_size`` (a square side, in pixels), or by default the most common size among the
  training images (height x width); other images are resized to it (bilinear);
- values: scaled to [0, 1], then standardised per channel with the mean and standard deviation of the
  training split.

The files are untrusted input: a file that is not a regular file (a FIFO, a device), a symbolic link
that leads out of the folder, a link to a folder, a file whose name does not end in an image extension,
an image that Pillow cannot read, and an image of more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``
(a decompression bomb) are each refused in one line naming the file. Hidden files (``.DS_Store``)
are skipped. The images are read into memory, as the CLI's other sources are.
"""

from __future__ import annotations

import math
import os
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainval.data import Split, stratified_split
from trainval.errors import ConfigError, DataError
from trainval.extras import require
from trainval.untrusted import open_regular, shown, shown_names, shown_repr

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "La"})
MODES = {"grayscale": "L", "rgb": "RGB"}


def pillow() -> Any:
    """``PIL.Image``, or one clear line naming the extra that installs Pillow."""
    return require("PIL.Image", "data.source=images (read with Pillow)")


@dataclass
class ImageFiles:
    """The image files of a folder, relative to it and sorted; ``labels`` is None for a flat folder."""

    root: str
    files: list[str]
    labels: list[int] | None
    classes: list[str] | None


@dataclass
class ImageFormat:
    """How every image of a run is read: what fit settled on the training folder, recorded in the run."""

    size: tuple[int, int]  # (height, width)
    mode: str  # Pillow's "L" or "RGB"
    classes: list[str]
    mean: list[float]
    std: list[float]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def record(self) -> dict:
        return {
            "image_size": list(self.size),
            "image_mode": self.mode,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "classes": list(self.classes),
        }

    @classmethod
    def from_record(cls, resolved: dict | None, where: str) -> ImageFormat:
        """The format a run recorded, each value checked (config.yaml is a file like any other)."""
        r = resolved or {}
        size, mode, mean, std, classes = (
            r.get(k) for k in ("image_size", "image_mode", "image_mean", "image_std", "classes")
        )
        channels = 1 if mode == "L" else 3 if mode == "RGB" else None
        ok = (
            channels is not None
            and isinstance(size, list)
            and len(size) == 2
            and all(type(n) is int and 1 <= n <= 2**16 for n in size)
            and all(
                isinstance(v, list)
                and len(v) == channels
                and all(type(x) in (int, float) and math.isfinite(x) for x in v)
                for v in (mean, std)
            )
            and all(x > 0 for x in std)  # type: ignore[union-attr]  # (checked a list just above)
            and isinstance(classes, list)
            and all(isinstance(c, str) for c in classes)
        )
        if not ok:
            raise ConfigError(
                f"{where} records no image format that trainval wrote (resolved.image_size, image_mode, "
                "image_mean, image_std, classes); use the run folder of a fit with data.source=images."
            )
        assert isinstance(size, list) and isinstance(mode, str) and isinstance(classes, list)
        return cls((size[0], size[1]), mode, list(classes), list(mean), list(std))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Listing a folder


def _inside(path: str, root_real: str) -> bool:
    real = os.path.realpath(path)
    return real == root_real or real.startswith(root_real.rstrip(os.sep) + os.sep)


def _files_below(folder: str, root: str, root_real: str) -> list[str]:
    """The image files below ``folder`` (any depth), relative to ``root``, each checked (see the module)."""
    found: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list the image folder {shown(current)}: {e.strerror or e}.") from None
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue  # hidden files (.DS_Store) and folders (.ipynb_checkpoints)
            path = entry.path
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                if not _inside(path, root_real):
                    raise DataError(
                        f"{shown(path)} is a symbolic link that leads out of the image folder "
                        f"{shown(root)}; trainval reads only files inside it: copy the image in."
                    )
                if os.path.isdir(path):
                    raise DataError(
                        f"{shown(path)} is a symbolic link to a folder; trainval does not follow links to "
                        "folders: move the folder there instead."
                    )
                info = os.stat(path)
            if stat.S_ISDIR(info.st_mode):
                subfolders.append(path)
            elif not stat.S_ISREG(info.st_mode):
                raise DataError(
                    f"{shown(path)} in the image folder is not a regular file (a FIFO, device or socket); "
                    "remove it from the folder."
                )
            elif not entry.name.lower().endswith(EXTENSIONS):
                raise DataError(
                    f"{shown(path)} is not an image file (its name does not end in "
                    f"{', '.join(EXTENSIONS)}); move it out of the image folder."
                )
            else:
                found.append(rel)
        stack.extend(reversed(subfolders))
    return sorted(found)


def scan(root: str, what: str, classes: list[str] | None = None) -> ImageFiles:
    """The images of ``root`` (``what``: the config key, for errors): class subfolders, or a flat folder.

    ``classes``: the run's classes (test and validation folders): a subfolder must be one of them.
    """
    if not os.path.isdir(root):
        raise ConfigError(
            f"{what} {shown(root)} is not a folder; data.source=images reads a folder of class subfolders "
            "(or, to predict, a folder of images)."
        )
    root_real = os.path.realpath(root)
    entries = [e for e in sorted(os.scandir(root), key=lambda e: e.name) if not e.name.startswith(".")]
    folders = [e for e in entries if e.is_dir(follow_symlinks=False)]
    if len(folders) < len(entries) and folders:
        loose = next(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        raise DataError(
            f"{what} {shown(root)} holds both subfolders ({shown_repr(folders[0].name)}) and other entries "
            f"({shown_repr(loose)}); give class subfolders only, or (to predict) images only."
        )
    if not folders:  # a flat folder of images: unlabelled
        files = _files_below(root, root, root_real)
        if not files:
            raise DataError(f"{what} {shown(root)} holds no images.")
        return ImageFiles(root, files, None, None)
    names = [e.name for e in folders]
    if classes is not None:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DataError(
                f"{what} {shown(root)} has class folder(s) {shown_names(unknown, quoted=True)} that the run "
                f"was not trained on (its classes: {shown_names(classes, quoted=True)})."
            )
    ids = {c: i for i, c in enumerate(classes if classes is not None else names)}
    files, labels = [], []
    for name in names:
        below = _files_below(os.path.join(root, name), root, root_real)
        if not below:
            raise DataError(f"the class folder {shown(os.path.join(root, name))} holds no images.")
        files += below
        labels += [ids[name]] * len(below)
    return ImageFiles(root, files, labels, names if classes is None else list(classes))


# --------------------------------------------------------------------------------------------------
# Reading images


def _open(Image: Any, path: str) -> Any:
    """The image at ``path``, header read, refused past Pillow's ``MAX_IMAGE_PIXELS`` (a decompression bomb)."""
    fh = open_regular(path, "image file", DataError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fh)
        limit = Image.MAX_IMAGE_PIXELS
        width, height = image.size
        if limit is not None and width * height > limit:
            raise DataError(
                f"{shown(path)} is an image of {width} x {height} pixels, more than Pillow's "
                f"Image.MAX_IMAGE_PIXELS ({limit}); refused as a possible decompression bomb."
            )
        return image
    except DataError:
        fh.close()
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        fh.close()
        raise DataError(
            f"{shown(path)} has more pixels than Pillow's Image.MAX_IMAGE_PIXELS "
            f"({Image.MAX_IMAGE_PIXELS}); refused as a possible decompression bomb."
        ) from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on an untrusted file: one line
        fh.close()
        raise DataError(f"{shown(path)} is not a readable image ({type(e).__name__}: {shown(e)}).") from None


def probe(files: ImageFiles) -> list[tuple[tuple[int, int], str]]:
    """``((height, width), mode)`` of every image, from its header."""
    Image = pillow()
    out = []
    for rel in files.files:
        with _open(Image, os.path.join(files.root, rel)) as image:
            out.append(((image.size[1], image.size[0]), image.mode))
    return out


def settle(files: ImageFiles, size: int | None, mode: str) -> tuple[tuple[int, int], str]:
    """The size (``size`` square, or the most common one) and Pillow mode (see the module) for a run."""
    headers = probe(files)
    if mode == "auto":
        pil_mode = "L" if all(m in GRAY_MODES for _, m in headers) else "RGB"
    else:
        pil_mode = MODES[mode]
    if size is not None:
        return (size, size), pil_mode
    sizes = Counter(s for s, _ in headers)
    return max(sizes, key=lambda s: (sizes[s], s)), pil_mode


def read(files: ImageFiles, size: tuple[int, int], mode: str) -> np.ndarray:
    """Every image as ``uint8 [N, C, H, W]``: converted to ``mode`` and resized to ``size`` (height, width)."""
    Image = pillow()
    channels = 1 if mode == "L" else 3
    out = np.empty((len(files.files), channels, *size), dtype=np.uint8)
    for i, rel in enumerate(files.files):
        path = os.path.join(files.root, rel)
        with _open(Image, path) as image:
            try:
                pixels = image.convert(mode)
                if pixels.size != (size[1], size[0]):
                    pixels = pixels.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                array = np.asarray(pixels, dtype=np.uint8)
            except Exception as e:  # noqa: BLE001 - a truncated or damaged file fails when decoded
                raise DataError(
                    f"{shown(path)} is not a readable image ({type(e).__name__}: {shown(e)})."
                ) from None
        out[i] = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return out


def channel_stats(X: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of ``uint8 [N, C, H, W]`` images scaled to [0, 1]."""
    scaled = X.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = scaled.std(axis=(0, 2, 3))
    return mean.tolist(), np.where(std > 1e-12, std, 1.0).tolist()


def standardized(X: np.ndarray, fmt: ImageFormat) -> np.ndarray:
    """``(X / 255 - mean) / std`` per channel, as float32."""
    mean = np.asarray(fmt.mean, dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(fmt.std, dtype=np.float64).reshape(1, -1, 1, 1)
    return ((X.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)


def _split(X: np.ndarray, files: ImageFiles, fmt: ImageFormat, idx: np.ndarray | None = None) -> Split:
    take = np.arange(len(files.files)) if idx is None else idx
    y = None if files.labels is None else np.asarray(files.labels, dtype=np.int64)[take]
    return Split(standardized(X[take], fmt), y, [files.files[i] for i in take])


# --------------------------------------------------------------------------------------------------
# The splits of a run


def load_folder(root: str, what: str, fmt: ImageFormat) -> Split:
    """A validation or test folder (class subfolders of the run's classes, or a flat folder), read as ``fmt``."""
    files = scan(root, what, fmt.classes)
    return _split(read(files, fmt.size, fmt.mode), files, fmt)


def load_image_splits(
    d: dict, fractions: tuple[float, float], fmt: ImageFormat | None = None
) -> tuple[Split, Split | None, Split | None, ImageFormat]:
    """Train/val/test for the ``data`` config ``d``: ``data.val``/``data.test`` folders, or seeded stratified
    ``fractions`` (val, test) of ``data.train``. ``fmt``: the run's recorded format (None: settle it now,
    the statistics from the training split)."""
    files = scan(d["train"], "data.train")
    if files.labels is None or files.classes is None or len(files.classes) < 2:
        raise DataError(
            f"data.train {shown(d['train'])} needs class subfolders (at least two classes) to train on."
        )
    if fmt is None:
        size, mode = settle(files, d["image_size"], d["image_mode"])
    else:
        size, mode = fmt.size, fmt.mode
    X = read(files, size, mode)
    y = np.asarray(files.labels, dtype=np.int64)
    train_idx, val_idx, test_idx = stratified_split(y, list(fractions), d["split_seed"])
    if fmt is None:
        fmt = ImageFormat(size, mode, files.classes, *channel_stats(X[train_idx]))
    train = _split(X, files, fmt, train_idx)
    val = (
        load_folder(d["val"], "data.val", fmt)
        if d["val"]
        else (_split(X, files, fmt, val_idx) if len(val_idx) else None)
    )
    test = (
        load_folder(d["test"], "data.test", fmt)
        if d["test"]
        else (_split(X, files, fmt, test_idx) if len(test_idx) else None)
    )
    return train, val, test, fmt


__all__ = [
    "ImageFormat",
    "ImageFiles",
    "scan",
    "settle",
    "read",
    "load_folder",
    "load_image_splits",
    "pillow",
]
