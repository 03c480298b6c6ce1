"""Hugging Face ``datasets``: a ``datasets.Dataset`` or ``datasets.IterableDataset`` passed as it is.

:func:`as_torch_data` turns one into a torch dataset that yields ``(inputs, target)`` samples, read as
``set_format("torch")`` reads them (numbers as tensors: floats as float32, integers as int64). Which
columns go to the model is decided as Hugging Face's ``Trainer`` decides it, from the signature of the
model's ``forward``:

- the target is the column named by ``target_key`` (default ``labels``), else ``label`` or ``label_ids``;
- the columns that ``forward`` names (all of them if it takes ``**kwargs``) go to it as a dict batch,
  ``model(**batch)``; the other columns are left out;
- a ``forward`` that names none of the columns (``forward(self, x)`` over a column ``pixels``) gets the
  feature columns positionally: one column as the tensor, several as ``model(*columns)`` in the
  dataset's column order.

A map-style ``Dataset`` is read lazily, a batch of rows at a time (never all of it into memory), and is
sampled, sharded and shuffled like any map-style torch ``Dataset``. An ``IterableDataset`` is a stream:
each process reads its share through ``datasets.distributed.split_dataset_by_node``, which also splits
it between DataLoader workers.

``datasets`` is never imported here to find out whether an object is one of its datasets: whoever holds
one has imported it already (:func:`is_hf_dataset` looks in ``sys.modules``).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from trainval.errors import DataError
from trainval.state import rng_state, set_rng_state
from trainval.untrusted import shown_names, shown_repr

TARGET_COLUMNS = ("label", "labels", "label_ids")  # Hugging Face's names for the target column


def is_hf_dataset(data: Any) -> bool:
    """Is ``data`` a ``datasets`` Dataset, IterableDataset or a dict of them (without importing ``datasets``)?"""
    module = sys.modules.get("datasets")
    if module is None:
        return False
    kinds = tuple(
        getattr(module, name)
        for name in ("Dataset", "IterableDataset", "DatasetDict", "IterableDatasetDict")
        if isinstance(getattr(module, name, None), type)
    )
    return bool(kinds) and isinstance(data, kinds)


@dataclass(frozen=True)
class Columns:
    """Which columns make a sample's inputs and target, and how the inputs reach the model."""

    inputs: tuple[str, ...]
    target: str | None
    named: bool  # a dict of the columns (model(**batch)); else the column, or a tuple of them

    def sample(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """``(inputs, target)``, or ``(inputs,)`` without a target column (see ``trainval.data.split_batch``)."""
        if self.named:
            x: Any = {c: row[c] for c in self.inputs}
        elif len(self.inputs) == 1:
            x = row[self.inputs[0]]
        else:
            x = tuple(row[c] for c in self.inputs)
        return (x, row[self.target]) if self.target is not None else (x,)

    @property
    def read(self) -> list[str]:
        return [*self.inputs, *([self.target] if self.target is not None else [])]


def forward_names(model: nn.Module | None) -> tuple[set[str], bool]:
    """The argument names of ``model.forward`` and whether it takes ``**kwargs`` (HF Trainer's rule)."""
    if model is None:
        return set(), False
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
    }
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def plan_columns(columns: Sequence[str], model: nn.Module | None, target_key: str, name: str) -> Columns:
    """The :class:`Columns` for a dataset with ``columns`` and this model (see the module docstring)."""
    target = target_key if target_key in columns else next((c for c in TARGET_COLUMNS if c in columns), None)
    features = [c for c in columns if c != target and c not in TARGET_COLUMNS]
    names, any_name = forward_names(model)
    named = features if any_name else [c for c in features if c in names]
    if not features:
        raise DataError(
            f"{name}: the Hugging Face dataset has no feature columns besides the target (columns: "
            f"{shown_names(columns)}); add the model's inputs as columns."
        )
    if named:
        return Columns(tuple(named), target, named=True)
    return Columns(tuple(features), target, named=False)


def _check_sample(row: Mapping[str, Any], columns: Columns, name: str) -> None:
    """Positional inputs and the target must be numbers (tensors once formatted): say which is not."""
    check = [] if columns.named else list(columns.inputs)
    if columns.target is not None:
        check.append(columns.target)
    for c in check:
        if not isinstance(row[c], torch.Tensor):
            raise DataError(
                f"{name}: the Hugging Face dataset's column {shown_repr(c)} holds {type(row[c]).__name__} "
                "values, which make no tensor; encode it as numbers (Dataset.map), remove it "
                "(remove_columns), or name it as an argument of the model's forward."
            )


class HFMapDataset(Dataset):
    """A map-style ``datasets.Dataset`` as a torch ``Dataset`` of ``(inputs, target)`` samples."""

    def __init__(self, dataset: Any, columns: Columns):
        self.dataset = dataset.with_format("torch", columns=columns.read)
        self.columns = columns

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        return self.columns.sample(self.dataset[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, ...]]:
        """A DataLoader's batch of rows in one read of the Arrow table (then collated as usual)."""
        rows = self.dataset[[int(i) for i in indices]]
        return [self.columns.sample({k: v[j] for k, v in rows.items()}) for j in range(len(indices))]


class HFStream(IterableDataset):
    """A ``datasets.IterableDataset`` as a stream of ``(inputs, target)`` samples.

    ``split_by_rank`` gives each process its share through ``split_dataset_by_node`` (whole shards where
    their number divides by the processes, else every ``world_size``-th row), which ``datasets`` splits
    again between DataLoader workers; ``set_epoch`` reaches the dataset's own shuffling.
    """

    def __init__(self, dataset: Any, columns: Columns):
        self.dataset, self.columns = dataset, columns
        self._formatted = dataset.select_columns(columns.read).with_format("torch")

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return (self.columns.sample(row) for row in self._formatted)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def split_by_rank(self, rank: int, world_size: int) -> HFStream:
        if world_size == 1:
            return self
        split = importlib.import_module("datasets.distributed").split_dataset_by_node
        return HFStream(split(self.dataset, rank=rank, world_size=world_size), self.columns)


def as_torch_data(data: Any, model: nn.Module | None, target_key: str, name: str) -> Dataset:
    """The torch dataset for a Hugging Face one (see the module docstring); ``name``: the split, for errors."""
    module = sys.modules["datasets"]
    if isinstance(data, (module.DatasetDict, module.IterableDatasetDict)):
        raise DataError(
            f"{name} data is a Hugging Face DatasetDict with splits {shown_names(list(data), quoted=True)}; pass one "
            "split, e.g. ds['train']."
        )
    stream = isinstance(data, module.IterableDataset)
    columns = list(data.column_names or [])
    first: Mapping[str, Any] | None = None
    if not columns:  # a stream whose features are unknown until it is read
        first = next(iter(data), None)
        if first is None:
            raise DataError(f"{name}: the Hugging Face IterableDataset yielded no rows.")
        columns = list(first)
    plan = plan_columns(columns, model, target_key, name)
    if stream:
        stream_data = HFStream(data, plan)
        wrapped: Dataset = stream_data
        state = rng_state()  # a shuffled stream without a seed may draw one: read it as if untouched
        try:
            row = next(iter(stream_data._formatted), None)
        finally:
            set_rng_state(state)
    else:
        if len(data) == 0:
            raise DataError(f"{name} data is empty (0 samples).")
        wrapped = HFMapDataset(data, plan)
        row = wrapped.dataset[0]
    if row is not None:
        _check_sample(row, plan, name)
    return wrapped


__all__ = ["is_hf_dataset", "as_torch_data", "plan_columns", "Columns", "HFMapDataset", "HFStream"]
