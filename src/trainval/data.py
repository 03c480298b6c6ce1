"""Data: the fast in-memory batcher, adapters for Datasets and DataLoaders, data sources and splits.

The common case of a supervised loop is features already in memory. For it, :class:`TensorLoader`
takes each batch by slicing a permuted index of the whole tensors: no per-sample ``__getitem__`` and
no collate, which is several times faster than ``DataLoader(TensorDataset(X, y))`` on small models.
Every loader here yields ``(x, y)`` pairs on the target device (``y`` is ``None`` for unlabelled data)
and shards an epoch across processes the same way, so that ranks see disjoint parts of one permutation.
"""

from __future__ import annotations

import csv
import importlib
import io
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from trainval.errors import ConfigError, DataError

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def epoch_indices(
    n: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None,
    rank: int = 0,
    world_size: int = 1,
    pad: bool = False,
) -> torch.Tensor | None:
    """The sample indices one rank visits in one epoch, or ``None`` for "all, in order".

    Every rank draws the same permutation (their generators hold the same state) and takes every
    ``world_size``-th element from position ``rank``: the shards are disjoint and together they are the
    whole epoch. With ``pad`` (training), the permutation is extended from its start so that every rank
    gets the same number of samples, as ``DistributedSampler`` does; evaluation never pads, so that each
    sample is counted exactly once.
    """
    if not shuffle and world_size == 1:
        return None
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        if pad:
            total = math.ceil(n / world_size) * world_size
            if total > n:
                repeats = math.ceil(total / n)
                order = order.repeat(repeats)[:total]
        order = order[rank::world_size]
    return order


class TensorLoader:
    """Batches of in-memory tensors, taken by slicing a permuted index.

    Args:
        X: features, any shape ``[N, ...]``.
        y: integer labels ``[N]``, or ``None`` for unlabelled data.
        batch_size: samples per batch (per process).
        shuffle: draw a new permutation from ``generator`` at every ``iter()``.
        drop_last: drop a last batch smaller than ``batch_size``.
        generator: the ``torch.Generator`` that shuffles (the trainer owns one, for exact resume).
        rank, world_size, pad: this process's shard of each epoch (see :func:`epoch_indices`).
        device: where batches are delivered; from pinned CPU memory they move with ``non_blocking``.
    """

    def __init__(
        self,
        X: torch.Tensor,
        y: torch.Tensor | None = None,
        batch_size: int = 64,
        shuffle: bool = False,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
        device: torch.device | str | None = None,
    ):
        if y is not None and len(X) != len(y):
            raise DataError(f"features and labels differ in length: {len(X)} rows of X but {len(y)} labels.")
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        self.X, self.y = X, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.device = torch.device(device) if device is not None else X.device
        self._copy = self.device != X.device
        self._non_blocking = self._copy and self.device.type == "cuda" and X.is_pinned()

    @property
    def num_samples(self) -> int:
        """Samples this rank visits in one epoch."""
        n = len(self.X)
        if self.world_size == 1:
            return n
        if self.pad:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self._non_blocking) if self._copy else t

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from ``start_batch`` on; the permutation is drawn now, not lazily."""
        order = epoch_indices(
            len(self.X), shuffle=self.shuffle, generator=self.generator,
            rank=self.rank, world_size=self.world_size, pad=self.pad,
        )
        if order is not None and order.device != self.X.device:  # data resident on the GPU
            order = order.pin_memory().to(self.X.device, non_blocking=True)
        return self._batches(order, start_batch * self.batch_size)

    def _batches(self, order: torch.Tensor | None, start: int) -> Iterator[Batch]:
        n = self.num_samples
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        X, y, B = self.X, self.y, self.batch_size
        for i in range(start, stop, B):
            if order is None:  # contiguous views, no copy
                xb = X[i : i + B]
                yb = None if y is None else y[i : i + B]
            else:
                idx = order[i : i + B]
                xb = self._gather(X, idx)
                yb = None if y is None else self._gather(y, idx)
            yield self._move(xb), (None if yb is None else self._move(yb))

    def _gather(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``t[idx]``; from pinned memory into a pinned batch, so that its copy to the GPU is asynchronous.

        (A plain ``index_select`` of a pinned tensor returns pageable memory, whose ``non_blocking`` copy
        the host waits for.) The pinned batch comes from torch's caching host allocator, which does not
        hand the block out again until the copy that reads it has finished.
        """
        if not self._non_blocking:
            return t.index_select(0, idx)
        out = torch.empty((len(idx), *t.shape[1:]), dtype=t.dtype, pin_memory=True)
        return torch.index_select(t, 0, idx, out=out)


class ShardSampler(Sampler[int]):
    """A sampler with the same epoch sharding as :class:`TensorLoader`, for map-style datasets."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator | None,
                 rank: int = 0, world_size: int = 1, pad: bool = False):
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def __iter__(self) -> Iterator[int]:
        order = epoch_indices(self.n, shuffle=self.shuffle, generator=self.generator,
                              rank=self.rank, world_size=self.world_size, pad=self.pad)
        return iter(range(self.n) if order is None else order.tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))


class DataLoaderAdapter:
    """Wraps a ``DataLoader``: unpacks ``(x, y)`` or ``x`` batches and moves them to the device."""

    def __init__(self, loader: DataLoader, device: torch.device, labelled: bool = True):
        self.loader, self.device, self.labelled = loader, device, labelled
        self._non_blocking = device.type == "cuda"

    @property
    def num_samples(self) -> int:
        sampler = self.loader.batch_sampler.sampler if self.loader.batch_sampler is not None else None
        try:
            return len(sampler) if sampler is not None else len(self.loader.dataset)
        except TypeError:
            return len(self.loader.dataset)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from ``start_batch`` on; the skipped ones are fetched now and dropped."""
        it = iter(self.loader)
        for _ in range(start_batch):
            next(it, None)
        return self._batches(it)

    def _batches(self, it) -> Iterator[Batch]:
        for batch in it:
            if isinstance(batch, (tuple, list)):
                if len(batch) < 1 or len(batch) > 2:
                    raise DataError(f"a batch must be (x, y) or x, got a sequence of {len(batch)} items.")
                x = batch[0]
                y = batch[1] if len(batch) == 2 and self.labelled else None
            elif isinstance(batch, torch.Tensor):
                x, y = batch, None
            else:
                raise DataError(f"a batch must be (x, y) or a tensor x, got {type(batch).__name__}.")
            x = x.to(self.device, non_blocking=self._non_blocking)
            if y is not None:
                y = y.to(self.device, non_blocking=self._non_blocking)
            yield x, y


# --------------------------------------------------------------------------------------------------
# Turning what the user passes into tensors or loaders


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            raise DataError(f"{what} is a NumPy array of Python objects; give numbers (float or int).")
        return torch.from_numpy(np.ascontiguousarray(a))
    raise DataError(f"{what} must be a tensor or NumPy array, got {type(a).__name__}.")


def prepare_features(X: torch.Tensor) -> torch.Tensor:
    """Features as a floating tensor (float64 and integers become float32)."""
    if X.dtype == torch.bool or not X.is_floating_point():
        return X.float()
    if X.dtype == torch.float64:
        return X.float()
    return X


def prepare_labels(y: torch.Tensor, what: str = "labels") -> torch.Tensor:
    """Labels as int64 class ids; integral floats are accepted, anything else is refused."""
    if y.dim() != 1:
        if y.dim() == 2 and y.shape[1] == 1:
            y = y[:, 0]
        else:
            raise DataError(f"{what} must be one class id per sample (shape [N]), got shape {list(y.shape)}.")
    if y.is_floating_point():
        bad = ~torch.isfinite(y) | (y != torch.round(y))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise DataError(f"{what} must be integer class ids; sample {i} has label {y[i].item()!r}.")
    elif y.dtype == torch.bool or y.is_complex():
        raise DataError(f"{what} must be integer class ids, got dtype {y.dtype}.")
    return y.long()


def as_tensors(data: Any, *, labelled: bool = True, what: str = "data") -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(X, y)`` for in-memory data (a pair of tensors/arrays, a tensor, a ``TensorDataset``), else None."""
    if isinstance(data, TensorDataset):
        tensors = data.tensors
        if len(tensors) not in (1, 2):
            raise DataError(f"{what}: a TensorDataset must hold (X,) or (X, y), it holds {len(tensors)} tensors.")
        X, y = tensors[0], (tensors[1] if len(tensors) == 2 else None)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        X, y = _as_tensor(data[0], f"{what} features"), _as_tensor(data[1], f"{what} labels")
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        X, y = _as_tensor(data, f"{what} features"), None
    else:
        return None
    if y is not None and len(X) != len(y):
        raise DataError(f"{what}: features and labels differ in length: {len(X)} rows of X but {len(y)} labels.")
    X = prepare_features(X)
    y = prepare_labels(y, f"{what} labels") if (y is not None and labelled) else None
    return X, y


def check_finite(X: torch.Tensor, what: str = "data") -> None:
    """Refuse NaN/Inf features, naming the first bad row and column."""
    if not X.is_floating_point() or X.numel() == 0:
        return
    low, high = torch.aminmax(X)  # NaN and +-Inf show in the extremes: no X-sized temporary
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    flat = X.reshape(len(X), -1)
    rows = max(1, (1 << 20) // max(1, flat.shape[1]))
    for start in range(0, len(flat), rows):  # find the first bad cell a chunk at a time
        bad = ~torch.isfinite(flat[start : start + rows])
        if bool(bad.any()):
            pos = bad.nonzero()[0].tolist()
            pos[0] += start
            break
    raise DataError(
        f"{what} features contain NaN or Inf (first at row {pos[0]}, column {pos[1]}); clean the data, "
        "or pass check_inputs=False to train anyway."
    )


def check_labels(y: torch.Tensor, num_classes: int, what: str = "data") -> None:
    """Refuse labels outside ``[0, num_classes)``, naming the first bad sample."""
    if len(y) == 0:
        return
    bad = (y < 0) | (y >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise DataError(
            f"{what} labels must lie in [0, {num_classes}) for a model with {num_classes} outputs; "
            f"sample {i} has label {int(y[i])}."
        )


# --------------------------------------------------------------------------------------------------
# Data sources for the CLI: digits, npz, csv, Python factories; and seeded stratified splits


@dataclass
class Split:
    """One split of a data set in memory; ``y`` is ``None`` for an unlabelled test file."""

    X: np.ndarray
    y: np.ndarray | None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), as ``[N, 1, 8, 8]`` in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return X, d.target.astype(np.int64)


def load_npz(path: str, x_key: str = "x", y_key: str = "y", require_labels: bool = True) -> Split:
    if not os.path.isfile(path):
        raise ConfigError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            if x_key not in f:
                raise DataError(f"{path}: no array named '{x_key}' (it holds {keys}); set data.x_key.")
            X = f[x_key]
            if y_key in f:
                y = f[y_key]
            elif require_labels:
                raise DataError(f"{path}: no label array named '{y_key}' (it holds {keys}); set data.y_key.")
            else:
                y = None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npz file ({e}).") from None
    if y is not None and len(X) != len(y):
        raise DataError(f"{path}: '{x_key}' has {len(X)} rows but '{y_key}' has {len(y)}.")
    return Split(X, y)


def load_csv(path: str, label: str | None = "label", features: list[str] | None = None,
             require_labels: bool = True, allow_nonfinite: bool = False) -> Split:
    """A CSV with a header row: the label column by name, features all other columns (or a list).

    UTF-8 (with or without a BOM), quoted cells and blank lines are fine. Every error names the file,
    the row as the file numbers it (the header is row 1) and the column by name. NaN/Inf features are
    refused here, where their row is known, unless ``allow_nonfinite``.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"data file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}: row {row} is not UTF-8 text (byte {raw[e.start]:#x}); save the file as UTF-8 "
                        "(for example from a spreadsheet: CSV UTF-8).") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows, data_rows = [], []  # the cells of each data row, and the file row where it starts
    previous_end = 0
    try:
        for row in reader:
            start, previous_end = previous_end + 1, reader.line_num  # a quoted cell may span rows
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            if header is None:
                header = [h.strip() for h in row]
            else:
                rows.append(row)
                data_rows.append(start)
    except csv.Error as e:
        raise DataError(f"{path}: row {reader.line_num}: {e}.") from None
    if header is None:
        raise DataError(f"{path}: the file is empty (a header row is needed).")
    if not rows:
        raise DataError(f"{path}: there are no data rows below the header.")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise DataError(f"{path}: the header names column(s) {', '.join(map(repr, duplicates))} more than once; "
                        "give every column its own name.")
    if features is not None and not features:
        raise ConfigError("data.features is empty: list the feature columns, or leave it unset for all but the label.")
    if features is not None and label is not None and label in features:
        raise ConfigError(f"data.features includes the label column '{label}'; remove it from data.features.")
    has_label = label is not None and label in header
    if label is not None and not has_label and require_labels:
        raise DataError(f"{path}: no label column '{label}' (columns: {', '.join(header)}); set data.label.")
    if features is None:
        feat_cols = [h for h in header if h != label]
        if not feat_cols:
            raise DataError(f"{path}: there are no feature columns besides the label '{label}'.")
    else:
        missing = [c for c in features if c not in header]
        if missing:
            raise DataError(f"{path}: feature columns not found: {', '.join(missing)}.")
        feat_cols = list(features)
    col = {h: i for i, h in enumerate(header)}
    X = np.empty((len(rows), len(feat_cols)), dtype=np.float32)
    y = np.empty(len(rows), dtype=np.float64) if has_label else None
    for r, row in enumerate(rows):
        at = data_rows[r]
        if len(row) != len(header):
            raise DataError(f"{path}: row {at} has {len(row)} cells, the header has {len(header)}.")
        for j, c in enumerate(feat_cols):
            try:
                X[r, j] = float(row[col[c]])
            except ValueError:
                raise DataError(f"{path}: row {at}, column '{c}': {row[col[c]]!r} is not a number.") from None
            if not allow_nonfinite and not np.isfinite(X[r, j]):
                raise DataError(f"{path}: row {at}, column '{c}': {row[col[c]].strip()!r} is not a finite number; "
                                "clean the data (or set data.check_inputs=false to train on it anyway).")
        if y is not None:
            try:
                y[r] = float(row[col[label]])
            except ValueError:
                raise DataError(
                    f"{path}: row {at}, label column '{label}': {row[col[label]]!r} is not a class id."
                ) from None
    if y is not None:
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            r = int(np.argmax(bad))
            raise DataError(f"{path}: row {data_rows[r]}, label column '{label}': {y[r]!r} is not an integer class id.")
        y = y.astype(np.int64)
    return Split(X, y)


def import_object(spec: str, what: str) -> Any:
    """``"package.module:attr"`` -> the object, or a ConfigError naming the string and the reason."""
    if ":" not in spec:
        raise ConfigError(f"{what} '{spec}' must have the form 'module:name'.")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(f"{what} '{spec}': cannot import module '{module_name}' ({type(e).__name__}: {e}).") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ConfigError(f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'.") from None
    return obj


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Index arrays: the first part gets what the fractions leave; each later part gets ``fraction``.

    Stratified by label and seeded, so the same data and seed always give the same split.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    parts: list[np.ndarray] = []
    remaining, remaining_frac = idx, 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        share = frac / remaining_frac
        try:
            remaining, taken = train_test_split(remaining, test_size=share, random_state=seed,
                                                stratify=y[remaining])
        except ValueError:  # too few samples of some class to stratify
            try:
                remaining, taken = train_test_split(remaining, test_size=share, random_state=seed)
            except ValueError:
                raise DataError(f"cannot hold out a {frac:g} split of {len(remaining)} samples and keep some to "
                                "train on; use more data or set data.val_split/data.test_split to 0.") from None
        parts.append(np.sort(taken))
        remaining_frac -= frac
    return [np.sort(remaining), *parts]


__all__ = [
    "TensorLoader", "ShardSampler", "DataLoaderAdapter", "epoch_indices", "as_tensors", "check_finite",
    "check_labels", "Split", "load_digits_arrays", "load_npz", "load_csv", "import_object",
    "stratified_split",
]
