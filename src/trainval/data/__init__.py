"""Data: the fast in-memory batcher, adapters for Datasets and DataLoaders, data sources and splits.

The common case of a supervised loop is features already in memory. For it, :class:`TensorLoader`
takes each batch by slicing a permuted index of the whole tensors: no per-sample ``__getitem__`` and
no collate, which is several times faster than ``DataLoader(TensorDataset(X, y))`` on small models.

Every loader here (see :class:`Loader`) yields ``(inputs, target)`` pairs on the target device:
``inputs`` is a tensor, a tuple of tensors (the model is called ``model(*inputs)``) or a dict of tensors
(``model(**inputs)``); ``target`` is ``None`` for unlabelled data. A dict batch holds its target under
``target_key`` (default ``"labels"``, Hugging Face style). Loaders shard an epoch across processes the
same way, so that ranks see disjoint parts of one permutation.

A stream (a ``torch.utils.data.IterableDataset``, or a DataLoader over one) goes through
:class:`StreamLoader`: an epoch is one pass over this rank's share of it (see :func:`split_by_rank`),
and the loop learns where the epoch ends by reading one batch ahead (:meth:`StreamLoader.steps`).
"""

from __future__ import annotations

import csv
import functools
import importlib
import io
import itertools
import math
import operator
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset, get_worker_info
from torch.utils.data.dataloader import default_collate

from trainval import distributed
from trainval.data.hf import as_torch_data, is_hf_dataset
from trainval.data.splits import stratified_split
from trainval.data.tabular import TableEncoding, strip_all
from trainval.errors import ConfigError, DataError
from trainval.extras import require
from trainval.state import rng_state, seed_everything, set_rng_state
from trainval.untrusted import open_regular, shown, shown_names, shown_repr

Inputs = Any  # a tensor, a tuple/list of tensors, or a dict of tensors
Target = Any  # a tensor, or (several heads) a tuple/list or dict of tensors
Batch = tuple[Inputs, Target]


# --------------------------------------------------------------------------------------------------
# Nested inputs: a tensor, a tuple/list or a dict of them


def tree_map(fn: Callable[[torch.Tensor], Any], x: Inputs) -> Inputs:
    """``fn`` applied to every tensor of a tensor / tuple / list / dict (other leaves pass through)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return {k: tree_map(fn, v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return (
            type(x)(tree_map(fn, v) for v in x) if type(x) in (tuple, list) else [tree_map(fn, v) for v in x]
        )
    return x


def tree_tensors(x: Inputs) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return [t for v in x.values() for t in tree_tensors(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tree_tensors(v)]
    return []


def describe(x: Inputs) -> str:
    """Shapes of nested inputs, for error messages: ``{'input_ids': [2, 16], ...}``."""
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in x) + ")"
    return type(x).__name__


def tree_len(x: Inputs, what: str) -> int:
    """The common first dimension of every tensor in ``x`` (the number of samples)."""
    tensors = tree_tensors(x)
    if not tensors:
        raise DataError(f"{what} holds no tensors ({describe(x)}).")
    lengths = {len(t) if t.dim() else 0 for t in tensors}
    if len(lengths) != 1:
        raise DataError(
            f"{what}: its tensors differ in length ({describe(x)}); every input needs one row per sample."
        )
    return lengths.pop()


def as_target(y: Any) -> Target:
    """A collated target as tensors: a tensor, or a tuple/dict of them (several heads) as the batch holds them."""
    if isinstance(y, torch.Tensor):
        return y
    if isinstance(y, Mapping):
        return {k: as_target(v) for k, v in y.items()}
    if isinstance(y, (tuple, list)) and any(isinstance(v, (torch.Tensor, np.ndarray, Mapping)) for v in y):
        return tuple(as_target(v) for v in y)
    try:
        return torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as e:
        raise DataError(
            f"a batch's target is {type(y).__name__}, which is not a tensor ({e}); targets must be tensors, "
            "numbers, or a tuple or dict of them (one per head)."
        ) from None


def split_batch(batch: Any, target_key: str, labelled: bool) -> Batch:
    """``(x, y)`` / ``x`` / ``{..., target_key: y}`` -> ``(inputs, target)``."""
    if isinstance(batch, Mapping):
        inputs = {k: v for k, v in batch.items() if k != target_key}
        return inputs, (batch.get(target_key) if labelled else None)
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], (batch[1] if labelled else None)
        if len(batch) == 1:
            return batch[0], None
        raise DataError(
            f"a batch must be (inputs, target), inputs alone, or a dict with the target under "
            f"'{target_key}'; got a sequence of {len(batch)} items ({describe(batch)}). "
            "Several input tensors go in a tuple: ((x1, x2), y)."
        )
    if isinstance(batch, torch.Tensor):
        return batch, None
    raise DataError(f"a batch must be (inputs, target), a tensor, or a dict; got {type(batch).__name__}.")


# --------------------------------------------------------------------------------------------------
# Loaders


class Loader(Protocol):
    """What the loop needs of a loader: :class:`TensorLoader`, :class:`DataLoaderAdapter`, :class:`StreamLoader`."""

    # Read-only properties (the loaders compute them), so declared as properties, not settable attributes.
    @property
    def dataset_size(self) -> int | None: ...  # samples in the whole data set (every rank together), if known
    @property
    def num_batches(
        self,
    ) -> int | None: ...  # batches per epoch on this rank: exact for map-style data, a hint for a stream
    @property
    def is_stream(
        self,
    ) -> bool: ...  # True: the epoch's length is learnt by reading it (never from num_batches)

    def set_epoch(self, epoch: int) -> None: ...  # before an epoch's iterator is made (a stream's shuffling)
    def iter_from(self, start_batch: int) -> Iterator[Batch]: ...  # an epoch's batches from start_batch on
    def steps(self, start_batch: int = 0, lockstep: bool = False) -> Iterator[Step]: ...  # the same, as Steps
    def sample_batch(self) -> Batch: ...  # one or two samples, read without touching any RNG
    def unpadded(self, batch_index: int, size: int) -> int: ...  # samples of that batch that are not padding
    def state_dict(self) -> dict: ...  # random state of the user's own sampler objects (exact resume)
    def load_state_dict(self, state: dict) -> None: ...


class Step:
    """One step of an epoch as every rank sees it.

    ``x``/``y`` is this rank's batch, or ``None`` where this rank's share has run out while another rank's
    has not (the rank then joins the step's collectives with a stand-in). ``batches``: real batches in
    this step over all ranks. ``last``: is this the epoch's last step on every rank? For a stream it is
    known only once the next batch has been read and counted over the ranks, so it is resolved when first
    read (the count runs while the step computes). ``scale`` and ``weight`` are set by the loop's step plan
    (exact accumulation, see :meth:`trainval.loop.plan.StepPlan.weighted`): what the batch's mean loss is
    multiplied by before its backward, and what it was divided by; ``None`` where the plan leaves them.
    """

    __slots__ = ("x", "y", "batches", "_last", "scale", "weight")

    def __init__(self, x: Inputs | None, y: Target, batches: int, last: bool | Callable[[], bool]):
        self.x, self.y, self.batches, self._last = x, y, batches, last
        self.scale: torch.Tensor | float | None = None
        self.weight: torch.Tensor | int | None = None

    @property
    def last(self) -> bool:
        if not isinstance(self._last, bool):
            self._last = bool(self._last())  # may wait for the other ranks' count (a collective)
        return self._last


def known_steps(batches: Iterator[Batch], start: int, total: int, world_size: int) -> Iterator[Step]:
    """Steps of a loader whose length is known: this rank's batches, then stand-in steps up to ``total``
    (the most any rank runs; evaluation shards may be a batch shorter on some ranks)."""
    i = start
    for x, y in batches:
        i += 1
        yield Step(x, y, world_size, i == total)
    while i < total:
        i += 1
        yield Step(None, None, 0, i == total)


def unpadded_in_batch(n: int, rank: int, world_size: int, pad: bool, start: int, size: int) -> int:
    """How many of the ``size`` samples from position ``start`` of a rank's shard are not padding.

    :func:`epoch_indices` pads by repeating the permutation's start after its end, so rank ``r``'s padded
    samples are the tail of its shard: its first ``len(range(r, n, world_size))`` samples are real.
    """
    if not pad or world_size == 1:
        return size
    return max(0, min(size, len(range(rank, n, world_size)) - start))


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
        X: inputs with one row per sample: a tensor ``[N, ...]``, a tuple of them, or a dict of them.
        y: targets ``[N, ...]`` (class ids, 0/1, multi-hot rows or values), or ``None`` for unlabelled data.
        batch_size: samples per batch (per process).
        shuffle: draw a new permutation from ``generator`` at every ``iter()``.
        drop_last: drop a last batch smaller than ``batch_size``.
        generator: the ``torch.Generator`` that shuffles (the trainer owns one, for exact resume).
        rank, world_size, pad: this process's shard of each epoch (see :func:`epoch_indices`).
        device: where batches are delivered; from pinned CPU memory they move with ``non_blocking``.
    """

    def __init__(
        self,
        X: Inputs,
        y: Target = None,
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
        n = tree_len(X, "the inputs")
        if y is not None and n != tree_len(y, "the targets"):
            raise DataError(
                f"features and labels differ in length: {n} rows of X but {tree_len(y, 'the targets')} labels."
            )
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        self.X, self.y, self.n = X, y, n
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = generator
        self.rank, self.world_size, self.pad = rank, world_size, pad
        first = tree_tensors(X)[0]
        self.device = torch.device(device) if device is not None else first.device
        self._copy = self.device != first.device
        self._non_blocking = self._copy and self.device.type == "cuda" and first.is_pinned()
        self._single = isinstance(X, torch.Tensor)  # the common case: no tree walk per batch

    @property
    def dataset_size(self) -> int:
        return self.n

    @property
    def num_samples(self) -> int:
        """Samples this rank visits in one epoch."""
        n = self.n
        if self.world_size == 1:
            return n
        if self.pad:
            return math.ceil(n / self.world_size)
        return len(range(self.rank, n, self.world_size))

    is_stream = False

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_batches(self) -> int:
        return len(self)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the order is drawn from the trainer's generator."""

    def state_dict(self) -> dict:
        return {}  # the order is drawn from the trainer's generator, which the trainer saves

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

    def steps(self, start_batch: int = 0, lockstep: bool = False) -> Iterator[Step]:
        """The epoch as :class:`Step` objects; with ``lockstep``, as many as the rank with the most batches runs."""
        total = len(self)
        if lockstep and not self.pad:  # training shards are padded to equal length; evaluation shards are not
            total = distributed.all_reduce_max(total)
        return known_steps(self.iter_from(start_batch), start_batch, total, self.world_size)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self._non_blocking) if self._copy else t

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def sample_batch(self) -> Batch:
        k = min(2, self.n)
        xb = self.X[:k] if self._single else tree_map(lambda t: t[:k], self.X)
        return xb, (None if self.y is None else tree_map(lambda t: t[:k], self.y))

    def unpadded(self, batch_index: int, size: int) -> int:
        return unpadded_in_batch(
            self.n, self.rank, self.world_size, self.pad, batch_index * self.batch_size, size
        )

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from ``start_batch`` on; the permutation is drawn now, not lazily."""
        order = epoch_indices(
            self.n,
            shuffle=self.shuffle,
            generator=self.generator,
            rank=self.rank,
            world_size=self.world_size,
            pad=self.pad,
        )
        first = tree_tensors(self.X)[0]
        if order is not None and order.device != first.device:  # data resident on the GPU
            order = order.pin_memory().to(first.device, non_blocking=True)
        return self._batches(order, start_batch * self.batch_size)

    def _batches(self, order: torch.Tensor | None, start: int) -> Iterator[Batch]:
        n = self.num_samples
        stop = (n // self.batch_size) * self.batch_size if self.drop_last else n
        X, y, B, single = self.X, self.y, self.batch_size, self._single
        ysingle = isinstance(y, torch.Tensor)  # one target tensor (else a tuple/dict: several heads)
        for i in range(start, stop, B):
            if order is None:  # contiguous views, no copy
                xb = X[i : i + B] if single else tree_map(operator.itemgetter(slice(i, i + B)), X)
                yb = (
                    None
                    if y is None
                    else (y[i : i + B] if ysingle else tree_map(operator.itemgetter(slice(i, i + B)), y))
                )
            else:
                idx = order[i : i + B]
                xb = self._gather(X, idx) if single else tree_map(functools.partial(self._gather, idx=idx), X)
                yb = None if y is None else tree_map(functools.partial(self._gather, idx=idx), y)
            if self._copy:
                xb = self._move(xb) if single else tree_map(self._move, xb)
                yb = None if yb is None else tree_map(self._move, yb)
            yield xb, yb

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

    def __init__(
        self,
        n: int,
        shuffle: bool,
        generator: torch.Generator | None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = False,
    ):
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def __iter__(self) -> Iterator[int]:
        order = epoch_indices(
            self.n,
            shuffle=self.shuffle,
            generator=self.generator,
            rank=self.rank,
            world_size=self.world_size,
            pad=self.pad,
        )
        return iter(range(self.n) if order is None else order.tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def unpadded(self, batch_index: int, size: int, batch_size: int) -> int:
        return unpadded_in_batch(self.n, self.rank, self.world_size, self.pad, batch_index * batch_size, size)


def own_generators(*objects: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` objects a DataLoader, sampler or batch_sampler draws from (its ``generator``, and
    its inner ``sampler``'s), each once: the random state of a user's sampler that is not the global RNG's."""
    found: list[torch.Generator] = []
    for obj in objects:
        for holder in (obj, getattr(obj, "sampler", None)):
            g = getattr(holder, "generator", None)
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
    return found


class DrawnShare(Sampler[Any]):
    """This rank's share of the epoch's draws of a user's ``sampler`` (indices) or ``batch_sampler`` (batches).

    Under several processes every rank must train on its part of ONE draw list. So every rank draws the
    whole list the same way: each epoch takes a seed from the trainer's shuffling generator (the same state
    on every rank, saved in last.pt with the epoch's start, so a resume redraws the same list), and the user's
    sampler is iterated with the global generators (Python, NumPy, torch) and its own ``generator``, if any,
    seeded from it; their states are put back after. The list is then split as :func:`epoch_indices` splits a
    permutation: every ``world_size``-th draw from position ``rank``, padded (training) by repeating the
    list's start so that every rank holds as many; :meth:`unpadded` tells the repeats apart.
    """

    def __init__(
        self,
        sampler: Any,
        generator: torch.Generator,
        rank: int,
        world_size: int,
        pad: bool = True,
        batches: bool = False,
        name: str = "train",
    ):
        try:
            self.n = len(sampler)  # draws per epoch: indices, or batches of a batch_sampler
        except TypeError:
            raise DataError(
                f"{name}: the DataLoader's {'batch_sampler' if batches else 'sampler'} "
                f"({type(sampler).__name__}) has no len(); under several processes its draws are split "
                "between the ranks, which needs their number per epoch: give it a __len__."
            ) from None
        self.sampler, self.generator, self.batches, self.name = sampler, generator, batches, name
        self.rank, self.world_size, self.pad = rank, world_size, pad

    def draws(self) -> list[Any]:
        """The epoch's whole draw list, the same on every rank (consumes one number of the trainer's generator)."""
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))  # (CPU, once per epoch)
        saved = rng_state()
        own = own_generators(self.sampler)
        own_saved = [g.get_state() for g in own]
        try:
            seed_everything(seed)
            for k, g in enumerate(own):
                g.manual_seed(seed + 1 + k)
            drawn = list(self.sampler)
        finally:
            set_rng_state(saved)
            for g, state in zip(own, own_saved):
                g.set_state(state)
        if len(drawn) != self.n:
            what = "batch_sampler" if self.batches else "sampler"
            raise DataError(
                f"{self.name}: the DataLoader's {what} ({type(self.sampler).__name__}) yielded "
                f"{len(drawn)} items in an epoch but its len() is {self.n}; make them agree."
            )
        return drawn

    def __iter__(self) -> Iterator[Any]:
        drawn = self.draws()
        positions = epoch_indices(
            self.n, shuffle=False, generator=None, rank=self.rank, world_size=self.world_size, pad=self.pad
        )
        return iter(drawn if positions is None else [drawn[p] for p in positions.tolist()])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        if self.pad:
            return math.ceil(self.n / self.world_size)
        return len(range(self.rank, self.n, self.world_size))

    def unpadded(self, batch_index: int, size: int, batch_size: int | None) -> int:
        if self.batches:  # a whole batch is real or a repeat
            return (
                size if unpadded_in_batch(self.n, self.rank, self.world_size, self.pad, batch_index, 1) else 0
            )
        return unpadded_in_batch(
            self.n, self.rank, self.world_size, self.pad, batch_index * (batch_size or 1), size
        )


class DataLoaderAdapter:
    """Wraps a ``DataLoader``: splits each batch into ``(inputs, target)`` and moves it to the device.

    ``target_transform`` (set by the trainer) casts each batch's target to what the task's loss wants.
    ``generators``: the user's own ``torch.Generator`` objects the loader draws from (a training DataLoader
    used as given, see :func:`make_loader`): their states are what :meth:`state_dict` saves for exact resume.
    """

    def __init__(
        self,
        loader: DataLoader,
        device: torch.device,
        labelled: bool = True,
        target_key: str = "labels",
        generators: list[torch.Generator] | None = None,
    ):
        self.loader, self.device, self.labelled, self.target_key = loader, device, labelled, target_key
        self._non_blocking = device.type == "cuda"
        self.target_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.generators = generators or []

    def _share(self) -> ShardSampler | DrawnShare | None:
        """Our sharding sampler (or batch sampler) inside the loader; ``None``: the user's own, as given."""
        batch_sampler = self.loader.batch_sampler
        for s in (batch_sampler, getattr(batch_sampler, "sampler", None)):
            if isinstance(s, (ShardSampler, DrawnShare)):
                return s
        return None

    @property
    def dataset_size(self) -> int | None:
        return _map_size(self.loader.dataset) if isinstance(self.loader.sampler, ShardSampler) else None

    @property
    def num_samples(self) -> int:
        sampler = getattr(
            self.loader.batch_sampler, "sampler", None
        )  # (torch types batch_sampler as an Iterable)
        try:
            return len(sampler) if sampler is not None else _map_size(self.loader.dataset)
        except TypeError:
            return _map_size(self.loader.dataset)

    is_stream = False

    @property
    def batch_size(self) -> int | None:
        """Samples per batch on this rank (``None``: a user's batch sampler decides each batch)."""
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_batches(self) -> int | None:
        return len(self.loader)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: the order is drawn from the trainer's generator (or, on one process, by the user's
        own sampler from the global generators, whose epoch-start state the trainer saves)."""

    def state_dict(self) -> dict:
        """The states of the user's own generators (:attr:`generators`): with the global RNG state, which the
        trainer saves, what a resumed run needs to redraw the same order."""
        return {"generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state: dict) -> None:
        states = state.get("generators", [])
        if not states or not self.generators:
            return  # saved by several processes (whose draws are seeded per epoch), or resumed by several
        if len(states) != len(self.generators):
            raise ValueError(
                f"it holds the states of {len(states)} sampler generators, this DataLoader draws from "
                f"{len(self.generators)}"
            )
        for g, s in zip(self.generators, states):
            g.set_state(s)

    def steps(self, start_batch: int = 0, lockstep: bool = False) -> Iterator[Step]:
        """The epoch as :class:`Step` objects; with ``lockstep``, as many as the rank with the most batches runs."""
        share = self._share()
        total, world = len(self), (share.world_size if share is not None else 1)
        if lockstep and not (share is not None and share.pad):
            total = distributed.all_reduce_max(total)
        return known_steps(self.iter_from(start_batch), start_batch, total, world)

    def sample_batch(self) -> Batch:
        dataset = self.loader.dataset
        collate = self.loader.collate_fn or default_collate
        batch = collate([dataset[i] for i in range(min(2, _map_size(dataset)))])
        x, y = split_batch(batch, self.target_key, self.labelled)
        return x, (None if y is None else as_target(y))

    def unpadded(self, batch_index: int, size: int) -> int:
        share = self._share()
        if share is None:  # the user's own sampler on one process: never padded
            return size
        batch_size = self.loader.batch_size
        if isinstance(share, ShardSampler):
            assert batch_size is not None  # make_loader builds a ShardSampler's DataLoader with a batch_size
            return share.unpadded(batch_index, size, batch_size)
        return share.unpadded(batch_index, size, batch_size)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from ``start_batch`` on; the skipped ones are fetched now and dropped."""
        it = iter(self.loader)
        for _ in range(start_batch):
            next(it, None)
        return self._batches(it)

    def _move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=self._non_blocking)

    def _batches(self, it) -> Iterator[Batch]:
        transform = self.target_transform
        for batch in it:
            x, y = split_batch(batch, self.target_key, self.labelled)
            x = tree_map(self._move, x)
            if y is not None:
                y = self._move(y) if isinstance(y, torch.Tensor) else tree_map(self._move, as_target(y))
                if transform is not None:
                    y = transform(y)
            yield x, y


# --------------------------------------------------------------------------------------------------
# Streams: IterableDatasets


def is_stream(data: Any) -> bool:
    """Is ``data`` an ``IterableDataset``, or a ``DataLoader`` over one?"""
    if isinstance(data, DataLoader):
        return isinstance(data.dataset, IterableDataset)
    return isinstance(data, IterableDataset)


class RankSplit(IterableDataset):
    """Every ``world_size``-th element of ``dataset`` from position ``rank`` on (see :func:`split_by_rank`).

    In a DataLoader with ``num_workers`` K, worker ``k`` keeps every ``world_size * K``-th element from
    position ``rank + world_size * k``: the workers of a rank split its share again, so no element is
    read into two batches. With ``positions``, each element comes as ``(position in the stream, element)``.
    """

    def __init__(self, dataset: Any, rank: int, world_size: int, positions: bool = False):
        self.dataset, self.rank, self.world_size, self.positions = dataset, rank, world_size, positions

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        items = enumerate(self.dataset) if self.positions else iter(self.dataset)
        return itertools.islice(items, self.rank + self.world_size * worker, None, self.world_size * workers)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world_size))  # TypeError: the stream has no len

    def set_epoch(self, epoch: int) -> None:
        if callable(getattr(self.dataset, "set_epoch", None)):
            self.dataset.set_epoch(epoch)


def split_by_rank(dataset: Any, rank: int, world_size: int) -> IterableDataset:
    """This rank's share of a stream: its elements ``rank``, ``rank + world_size``, ``rank + 2 * world_size``...

    trainval's default split. Every rank still reads the whole stream and skips the others' elements,
    which is cheap for in-memory or generated streams; for streams that are expensive to read (files,
    network), give the dataset a method ``split_by_rank(rank, world_size)`` that returns this rank's
    share read at the source (e.g. its own files; Hugging Face: ``split_dataset_by_node(ds, rank,
    world_size)``), and trainval calls that instead. Such a share must split itself over DataLoader
    workers too (``torch.utils.data.get_worker_info()``), as PyTorch expects of an IterableDataset; this
    default does.
    """
    return RankSplit(dataset, rank, world_size)


def _structure(x: Any, shapes: bool) -> Any:
    """What must agree between the samples (``shapes``) or batches of a stream: types, keys, lengths."""
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape) if shapes else x.dim())
    if isinstance(x, np.ndarray):
        return ("array", x.shape if shapes else x.ndim)
    if isinstance(x, Mapping):
        return ("dict", tuple((k, _structure(v, shapes)) for k, v in x.items()))
    if isinstance(x, (tuple, list)):
        return ("sequence", tuple(_structure(v, shapes) for v in x))
    return type(x).__name__


def _mismatch(what: str, name: str, first: Any, k: int, other: Any) -> DataError:
    return DataError(
        f"the {name} stream yielded {what}{'es' if what == 'batch' else 's'} of different structures: {what} 0 is {describe(first)}, "
        f"{what} {k} is {describe(other)}; every {what} of a stream needs the same structure."
    )


class StreamCollate:
    """The stream's collate function, after a check that a batch's samples share one structure (shapes
    included: the default collate stacks them). With ``positions``, samples come as ``(position, sample)``
    and batches go out as ``(positions, batch)``; ``batched``: the stream yields whole batches."""

    def __init__(
        self, collate: Callable[[list], Any], name: str, check: bool, positions: bool, batched: bool
    ):
        self.collate, self.name, self.check, self.positions, self.batched = (
            collate,
            name,
            check,
            positions,
            batched,
        )

    def __call__(self, samples: Any) -> Any:
        if self.batched:  # one element of the stream is one batch
            if not self.positions:
                return self.collate(samples)
            position, batch = samples
            return torch.tensor(position), self.collate(batch)
        if self.positions:
            positions = torch.tensor([p for p, _ in samples])
            samples = [s for _, s in samples]
        if self.check and len(samples) > 1:
            first = _structure(samples[0], shapes=True)
            for k, sample in enumerate(samples[1:], start=1):
                if _structure(sample, shapes=True) != first:
                    raise _mismatch("sample", self.name, samples[0], k, sample)
        batch = self.collate(samples)
        return (positions, batch) if self.positions else batch


class StreamLoader(DataLoaderAdapter):
    """A DataLoader over this rank's share of a stream: an epoch is one pass over the share.

    Built by :func:`make_loader`. The epoch's length is not known in advance: :meth:`steps` reads one
    batch ahead, and on several processes counts over the ranks, once per step, how many still hold a
    batch (a small all-reduce on the CPU, overlapped with the step's compute), so that a rank whose share
    ran out joins the others' collectives until every share is read.

    Args:
        loader: a DataLoader over ``share``.
        dataset: the whole stream (:meth:`sample_batch` reads its first samples).
        share: this rank's share (what ``loader`` iterates; its ``set_epoch``, if any, is called per epoch).
        positions: the share yields stream positions (:meth:`positions` orders predictions by them).
    """

    is_stream = True

    def __init__(
        self,
        loader: DataLoader,
        dataset: Any,
        share: Any,
        device: torch.device,
        *,
        labelled: bool,
        target_key: str,
        name: str,
        positions: bool,
    ):
        super().__init__(loader, device, labelled, target_key)
        self.dataset, self.share, self.name, self.has_positions = dataset, share, name, positions
        self._positions: list[torch.Tensor] = []

    @property
    def dataset_size(self) -> None:
        return None  # learnt by reading the stream; evaluation counts are all-reduced sums

    @property
    def num_batches(self) -> int | None:
        """Batches per epoch from the share's ``len``, if it has one (a hint for the progress bar only)."""
        try:
            n = len(self.share)
        except TypeError:
            return None
        size = self.loader.batch_size
        if size is None:
            return n
        return n // size if self.loader.drop_last else math.ceil(n / size)

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError(f"the {self.name} stream has no len()")
        return n

    def __bool__(self) -> bool:
        return True  # not len() (a stream may have none)

    def set_epoch(self, epoch: int) -> None:
        """``set_epoch(epoch)`` of the share (or the stream), if it has one, like ``DistributedSampler``."""
        for obj in (self.share, self.dataset):
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
                return

    def sample_batch(self) -> Batch:
        """The stream's first one or two samples, collated; every global RNG state is put back after."""
        state = rng_state()
        try:
            items = list(itertools.islice(iter(self.dataset), 1 if self.loader.batch_size is None else 2))
        finally:
            set_rng_state(state)
        if not items:
            raise DataError(
                f"the {self.name} stream yielded no samples; check the dataset's __iter__ "
                "(and the file or source it reads)."
            )
        collate = self.loader.collate_fn
        if isinstance(collate, StreamCollate):
            collate = collate.collate
        batch = collate(items[0]) if self.loader.batch_size is None else collate(items)
        x, y = split_batch(batch, self.target_key, self.labelled)
        return x, (None if y is None else as_target(y))

    def unpadded(self, batch_index: int, size: int) -> int:
        return size  # a stream is never padded

    def positions(self) -> torch.Tensor | None:
        """Stream positions of the rows this rank read in its last pass, in its order (None: not recorded)."""
        if not self.has_positions:
            return None
        return torch.cat(self._positions) if self._positions else torch.zeros(0, dtype=torch.int64)

    def iter_from(self, start_batch: int) -> Iterator[Batch]:
        """The epoch's batches from ``start_batch`` on; the skipped ones are read now and dropped."""
        self._positions = []
        it = iter(self.loader)
        for _ in range(start_batch):
            next(it, None)
        return self._batches(self._checked(it))

    def _checked(self, it: Iterator[Any]) -> Iterator[Any]:
        """The batches, positions taken off, each checked against the first's structure (a host-side walk)."""
        first = None
        for k, batch in enumerate(it):
            if self.has_positions:
                position, batch = batch
                self._positions.append(
                    position if position.dim() else position.expand(tree_len(batch, self.name))
                )
            shape = _structure(batch, shapes=False)
            if first is None:
                first, first_batch = shape, batch
            elif shape != first:
                raise _mismatch("batch", self.name, first_batch, k, batch)
            yield batch

    def steps(self, start_batch: int = 0, lockstep: bool = False) -> Iterator[Step]:
        """The epoch as :class:`Step` objects, reading one batch ahead to know the last one.

        With ``lockstep`` (several processes that must run equally many steps), each step also counts
        over the ranks which of them hold the next batch: one all-reduce of one integer per step, on the
        CPU, started when the next batch is read and waited for when ``Step.last`` is first read (after
        the step's compute, unless gradient accumulation needs it before the backward). The epoch ends
        when no rank holds a batch; a rank that runs out earlier gets ``Step(None, ...)`` steps.
        """
        return self._steps(self.iter_from(start_batch), start_batch, lockstep)

    def _steps(self, batches: Iterator[Batch], start: int, lockstep: bool) -> Iterator[Step]:
        count = distributed.count_ranks if lockstep else _local_count
        current = next(batches, None)
        active = count(current is not None)()
        if active == 0 and (lockstep or not distributed.info().enabled):  # the count is over every rank
            where = f"after the {start} batches read before the interruption" if start else "in this epoch"
            raise DataError(
                f"the {self.name} stream yielded no batches {where}; its __iter__ must start a new "
                "pass over the data every time it is called."
            )
        while active:
            following = next(batches, None)
            pending = count(following is not None)  # runs while this step computes
            x, y = current if current is not None else (None, None)
            yield Step(x, y, active, _none_left(pending))
            current, active = following, pending()


def _local_count(flag: bool) -> Callable[[], int]:
    return lambda: int(flag)


def _none_left(pending: Callable[[], int]) -> Callable[[], bool]:
    """``Step.last`` for a step: true when no rank holds a next batch (``pending``: that count, resolved lazily)."""
    return lambda: pending() == 0


def _stream_loader(
    data: Any,
    *,
    train: bool,
    batch_size: int,
    device: torch.device,
    rank: int,
    world_size: int,
    labelled: bool,
    target_key: str,
    num_workers: int,
    positions: bool,
    name: str,
) -> StreamLoader:
    """A :class:`StreamLoader` for an IterableDataset or a DataLoader over one: this rank's share, through
    the dataset's own ``split_by_rank(rank, world_size)`` if it has one, else :func:`split_by_rank`."""
    given = data if isinstance(data, DataLoader) else None
    dataset = given.dataset if given is not None else data
    hook = getattr(dataset, "split_by_rank", None)
    if callable(hook) and not isinstance(dataset, RankSplit):
        share, positions = hook(rank, world_size), False  # the user's share: positions unknown
        if not isinstance(share, IterableDataset):
            raise DataError(
                f"{name}: {type(dataset).__name__}.split_by_rank({rank}, {world_size}) returned "
                f"{type(share).__name__}; it must return an IterableDataset (this rank's share)."
            )
    else:
        share = RankSplit(dataset, rank, world_size, positions)
    if given is not None:
        batched = given.batch_size is None  # the stream yields whole batches
        user_collate = given.collate_fn
        collate = StreamCollate(
            user_collate, name, check=user_collate is default_collate, positions=positions, batched=batched
        )
        kwargs: dict[str, Any] = dict(
            batch_size=given.batch_size,
            num_workers=given.num_workers,
            collate_fn=collate,
            pin_memory=given.pin_memory,
            drop_last=given.drop_last and train,
            timeout=given.timeout,
            worker_init_fn=given.worker_init_fn,
            persistent_workers=given.persistent_workers,
        )
        # (no generator: worker seeds come from the per-rank seeded global RNG, as for map-style data)
        if given.num_workers > 0:
            kwargs["prefetch_factor"] = given.prefetch_factor
        loader = DataLoader(share, **kwargs)
    else:
        collate = StreamCollate(default_collate, name, check=True, positions=positions, batched=False)
        loader = DataLoader(
            share,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=device.type == "cuda",
        )
    return StreamLoader(
        loader,
        dataset,
        share,
        device,
        labelled=labelled,
        target_key=target_key,
        name=name,
        positions=positions,
    )


def make_loader(
    data: Any,
    *,
    train: bool,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    labelled: bool = True,
    target_key: str = "labels",
    num_workers: int = 0,
    check_inputs: bool = True,
    place: Callable[[torch.Tensor], torch.Tensor] | None = None,
    name: str = "data",
    positions: bool = False,
    model: torch.nn.Module | None = None,
) -> TensorLoader | DataLoaderAdapter | StreamLoader:
    """The loader for what the user passed: in-memory data -> :class:`TensorLoader`; a ``Dataset`` or a
    ``DataLoader`` -> a ``DataLoader`` drawing from our sharded, seeded order (:class:`ShardSampler`);
    an ``IterableDataset`` (or a DataLoader over one) -> a :class:`StreamLoader` over this rank's share.

    A training DataLoader with its own ``sampler`` (e.g. ``WeightedRandomSampler``) or ``batch_sampler`` keeps
    it: on one process it is iterated as given (its draws come from the global generators, seeded like a hand
    loop's, or its own ``generator``); on several, each rank takes its share of one draw list per epoch
    (:class:`DrawnShare`).

    Training shuffles from ``generator`` (the trainer's, for exact resume) and pads shards to equal
    length; evaluation and prediction visit each sample once, in dataset order. A stream is read in its
    own order (shuffling it is the dataset's business) and never padded. ``positions``: record each
    stream sample's position (prediction, to restore the stream's order across ranks and workers).
    A Hugging Face ``datasets.Dataset``/``IterableDataset`` is read as :mod:`trainval.data.hf` says, with
    the columns ``model``'s forward takes.
    """
    if is_hf_dataset(data):
        data = as_torch_data(data, model, target_key, name)
    if is_stream(data):
        return _stream_loader(
            data,
            train=train,
            batch_size=batch_size,
            device=device,
            rank=rank,
            world_size=world_size,
            labelled=labelled,
            target_key=target_key,
            num_workers=num_workers,
            positions=positions,
            name=name,
        )
    tensors = as_tensors(data, labelled=labelled, what=name, target_key=target_key)
    if tensors is not None:
        X, y = tensors
        if tree_len(X, f"{name} inputs") == 0:
            raise DataError(f"{name} data is empty (0 samples).")
        if check_inputs:
            for t in tree_tensors(X):
                check_finite(t, name)
        if place is not None:
            X, y = tree_map(place, X), (None if y is None else tree_map(place, y))
        return TensorLoader(
            X,
            y,
            batch_size,
            shuffle=train,
            generator=generator if train else None,
            rank=rank,
            world_size=world_size,
            pad=train,
            device=device,
        )
    if isinstance(data, DataLoader):
        _check_map_style(data.dataset, name)
        if train and not _default_sampling(data):
            # The user's own sampler or batch_sampler: its draws, as given on one process, split per rank on several.
            if world_size == 1:
                return DataLoaderAdapter(
                    data, device, labelled, target_key, generators=own_generators(data, data.batch_sampler)
                )
            if data.batch_size is None:  # a custom batch_sampler: its batches are split
                share = DrawnShare(
                    data.batch_sampler, generator, rank, world_size, pad=True, batches=True, name=name
                )
                return DataLoaderAdapter(
                    rebuild_loader(data, batch_sampler=share), device, labelled, target_key
                )
            share = DrawnShare(data.sampler, generator, rank, world_size, pad=True, name=name)
            return DataLoaderAdapter(
                rebuild_loader(data, share, drop_last=data.drop_last), device, labelled, target_key
            )
        # Re-sample through our sharded order: seeded (and resumable) shuffling for training (a DataLoader
        # made with shuffle=True/False); in dataset order, each sample once, for evaluation and prediction.
        if train or world_size > 1 or not isinstance(data.sampler, torch.utils.data.SequentialSampler):
            if data.batch_size is None:
                raise DataError(
                    f"{name}: a DataLoader with a custom batch_sampler cannot be sharded; "
                    "give a Dataset or a DataLoader with batch_size."
                )
            shuffle = train and isinstance(data.sampler, torch.utils.data.RandomSampler)
            sampler = ShardSampler(
                _map_size(data.dataset),
                shuffle=shuffle,
                generator=generator if train else None,
                rank=rank,
                world_size=world_size,
                pad=train,
            )
            data = rebuild_loader(data, sampler, drop_last=data.drop_last and train)
        return DataLoaderAdapter(data, device, labelled, target_key)
    if isinstance(data, Dataset):
        _check_map_style(data, name)
        sampler = ShardSampler(
            _map_size(data),
            shuffle=train,
            generator=generator if train else None,
            rank=rank,
            world_size=world_size,
            pad=train,
        )
        loader = DataLoader(
            data,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        return DataLoaderAdapter(loader, device, labelled, target_key)
    raise DataError(
        f"{name} data must be a DataLoader, a Dataset, or in-memory (X, y) with X a tensor/array, a "
        f"tuple or a dict of them; got {type(data).__name__}."
    )


def _map_size(dataset: Dataset) -> int:
    """``len`` of a map-style dataset (torch types ``Dataset`` without ``__len__``; :func:`make_loader` has
    checked with :func:`_check_map_style` that the dataset of every non-stream loader has one)."""
    return len(cast(Sized, dataset))


def _check_map_style(dataset: Any, name: str) -> None:
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"{name}: the dataset has no len(); give a map-style Dataset.") from None
    if n == 0:
        raise DataError(f"{name} data is empty (0 samples).")


def _default_sampling(loader: DataLoader) -> bool:
    """Did the DataLoader get its sampler from ``shuffle=False``/``shuffle=True`` (a ``SequentialSampler``,
    or a ``RandomSampler`` without replacement over the whole dataset) and its batches from ``batch_size``?

    Those trainval replaces by its own seeded, sharded order (:class:`ShardSampler`); anything else is the
    user's sampling, which is honoured.
    """
    if loader.batch_size is None and loader.batch_sampler is not None:
        return False  # a custom batch_sampler
    sampler = loader.sampler
    if type(sampler) is torch.utils.data.SequentialSampler:
        return sampler.data_source is loader.dataset
    if type(sampler) is torch.utils.data.RandomSampler:
        return (
            sampler.data_source is loader.dataset and not sampler.replacement and sampler._num_samples is None
        )
    return False


def rebuild_loader(
    loader: DataLoader,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    batch_sampler: Sampler | None = None,
) -> DataLoader:
    """The same DataLoader, drawing indices from ``sampler`` (or batches from ``batch_sampler``)."""
    batching: dict[str, Any] = (
        dict(batch_sampler=batch_sampler)
        if batch_sampler is not None
        else dict(batch_size=loader.batch_size, sampler=sampler, drop_last=drop_last)
    )
    kwargs = dict(
        **batching,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, **kwargs)


# --------------------------------------------------------------------------------------------------
# Turning what the user passes into tensors


def _as_tensor(a: Any, what: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a
    elif isinstance(a, np.ndarray):
        if a.dtype == object or a.dtype.kind in "USV":
            raise DataError(
                f"{what} is a NumPy array of {a.dtype} (strings or Python objects); give numbers."
            )
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise DataError(f"{what} must be a tensor or NumPy array, got {type(a).__name__}.")
    if t.is_complex():
        raise DataError(f"{what} are complex numbers ({t.dtype}); give real numbers.")
    return t


def prepare_features(X: torch.Tensor) -> torch.Tensor:
    """Features as float32 when they are bool, float64 or half precision; integer inputs (token ids) stay."""
    if X.dtype in (torch.bool, torch.float64, torch.float16, torch.bfloat16):
        return X.float()
    return X


def _inputs(x: Any, what: str) -> Inputs:
    if isinstance(x, Mapping):
        return {k: prepare_features(_as_tensor(v, f"{what} '{k}'")) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(prepare_features(_as_tensor(v, f"{what} {i}")) for i, v in enumerate(x))
    return prepare_features(_as_tensor(x, what))


def as_tensors(
    data: Any, *, labelled: bool = True, what: str = "data", target_key: str = "labels"
) -> tuple[Inputs, Target] | None:
    """``(inputs, y)`` for in-memory data, else ``None`` (Datasets and DataLoaders).

    In-memory data is ``(X, y)`` with ``X`` a tensor/array, a tuple of them or a dict of them; ``X``
    alone (unlabelled); a ``TensorDataset``; or a dict of tensors with the target under ``target_key``.
    """
    X: torch.Tensor | np.ndarray | Mapping | tuple | list  # as given; then as tensors (Inputs)
    y: Any  # a tensor/array, a tuple/dict of them (several heads), or None
    if isinstance(data, TensorDataset):
        tensors = data.tensors
        if len(tensors) not in (1, 2):
            raise DataError(
                f"{what}: a TensorDataset must hold (X,) or (X, y), it holds {len(tensors)} tensors."
            )
        X, y = tensors[0], (tensors[1] if len(tensors) == 2 else None)
    elif isinstance(data, Mapping):
        if not data or not all(isinstance(v, (torch.Tensor, np.ndarray)) for v in data.values()):
            return None
        X = {k: v for k, v in data.items() if k != target_key}
        y = data.get(target_key)
    elif (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and (isinstance(data[1], (torch.Tensor, np.ndarray)) or _arrays_only(data[1]))
        and isinstance(data[0], (torch.Tensor, np.ndarray, tuple, list, Mapping))
    ):
        X, y = data
    elif isinstance(data, (tuple, list)) and len(data) == 2 and data[1] is None:
        X, y = data[0], None
    elif isinstance(data, (torch.Tensor, np.ndarray)):
        X, y = data, None
    else:
        return None
    X = _inputs(X, f"{what} features")
    target = _targets(y, f"{what} labels") if (y is not None and labelled) else None
    n = tree_len(X, f"{what} features")
    if target is not None and n != tree_len(target, f"{what} labels"):
        raise DataError(
            f"{what}: features and labels differ in length: {n} rows of X but "
            f"{tree_len(target, f'{what} labels')} labels."
        )
    return X, target


def _arrays_only(y: Any) -> bool:
    """A non-empty tuple/list or dict of tensors/arrays (a target per head)."""
    values = list(y.values()) if isinstance(y, Mapping) else (list(y) if isinstance(y, (tuple, list)) else [])
    return bool(values) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in values)


def _targets(y: Any, what: str) -> Target:
    """In-memory targets as tensors: one, or a tuple/dict of them (one per head)."""
    if isinstance(y, Mapping):
        return {k: _as_tensor(v, f"{what} '{k}'") for k, v in y.items()}
    if isinstance(y, (tuple, list)):
        return tuple(_as_tensor(v, f"{what} {i}") for i, v in enumerate(y))
    return _as_tensor(y, what)


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


# --------------------------------------------------------------------------------------------------
# Data sources for the CLI: digits, npz, csv, Python factories (seeded stratified splits: splits.py)


@dataclass
class Split:
    """One split of a data set in memory; ``y`` is ``None`` for an unlabelled test file; ``ids``: each
    sample's name for the predictions file's ``Id`` column (an image's file name), else its row number."""

    X: np.ndarray
    y: np.ndarray | None
    ids: list[str] | None = None  # an image folder's file names (the Id column of predictions)
    # a CSV's columns, categories and class names (see trainval.data.tabular); None for other sources
    encoding: TableEncoding | None = None


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), as ``[N, 1, 8, 8]`` in [0, 1]."""
    sklearn_datasets = require("sklearn.datasets", "data.source=digits (the default data set)")
    d = sklearn_datasets.load_digits()
    X = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    return X, d.target.astype(np.int64)


def open_data_file(path: str) -> Any:
    """A data file (``data.train``/``val``/``test``) opened for reading, only if it is a regular file: a
    folder, FIFO or device is one clear error (and never a read that blocks or never ends)."""
    return open_regular(path, "data file", ConfigError)


_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error)


_DEFLATE_RATIO = 1032  # deflate's largest expansion: a member cannot hold more than this times its archive


def _npz_array(archive: Any, key: str, path: str, archive_bytes: int) -> np.ndarray:
    """``archive[key]``, after checking the shape its ``.npy`` header declares against the bytes the member
    holds: a crafted header claiming 10^12 rows is refused before anything that size is allocated. (The
    member's size is the zip directory's word, so it is believed only as far as ``archive_bytes`` allows.)"""
    names = set(archive.zip.namelist())
    member = f"{key}.npy" if f"{key}.npy" in names else key
    info = archive.zip.getinfo(member)
    ratio = 1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_RATIO
    with archive.zip.open(member) as m:
        if m.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX:
            m.seek(0)
            version = np.lib.format.read_magic(m)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(m)
            declared = math.prod(shape) * dtype.itemsize
            held = min(info.file_size, archive_bytes * ratio) - m.tell()
            if not dtype.hasobject and declared > held:
                raise DataError(
                    f"{shown(path)}: array {shown_repr(key)} declares shape {shown(shape)} of {dtype} "
                    f"({declared} bytes) but holds {held} bytes; the file is damaged or was not written "
                    "by NumPy: save it again with numpy.savez."
                )
    array = archive[key]
    if not isinstance(array, np.ndarray):
        raise DataError(
            f"{shown(path)}: {shown_repr(key)} is not a NumPy array (.npy) inside the archive; save the "
            "file with numpy.savez."
        )
    if array.ndim == 0:
        raise DataError(
            f"{shown(path)}: array {shown_repr(key)} is a single value (shape ()), not one row per "
            "sample; save arrays whose first dimension is the sample."
        )
    return array


def load_npz(path: str, x_key: str = "x", y_key: str = "y", require_labels: bool = True) -> Split:
    """The arrays ``x_key`` (features) and ``y_key`` (labels) of a ``.npz`` archive (no pickled objects)."""
    with open_data_file(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        try:
            f = np.load(fh, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):
                raise DataError(
                    f"{shown(path)}: not an .npz archive (a single .npy array?); save the features and "
                    f"labels with numpy.savez(path, {shown(x_key)}=X, {shown(y_key)}=y)."
                )
            with f:
                keys = shown(", ".join(f.files))
                if x_key not in f:
                    raise DataError(
                        f"{shown(path)}: no array named {shown_repr(x_key)} (it holds {keys}); "
                        "set data.x_key."
                    )
                X = _npz_array(f, x_key, path, size)
                if y_key in f:
                    y = _npz_array(f, y_key, path, size)
                elif require_labels:
                    raise DataError(
                        f"{shown(path)}: no label array named {shown_repr(y_key)} (it holds {keys}); "
                        "set data.y_key."
                    )
                else:
                    y = None
        except _NPZ_ERRORS as e:
            raise DataError(f"{shown(path)}: not a readable .npz file ({shown(e)}).") from None
    if y is not None and len(X) != len(y):
        raise DataError(
            f"{shown(path)}: {shown_repr(x_key)} has {len(X)} rows but {shown_repr(y_key)} has {len(y)}."
        )
    return Split(X, y)


def load_csv(
    path: str,
    label: str | list[str] | None = "label",
    features: list[str] | None = None,
    require_labels: bool = True,
    allow_nonfinite: bool = False,
    integer_labels: bool = True,
    encoding: TableEncoding | None = None,
) -> Split:
    """A CSV with a header row: the target column(s) by name, features all other columns (or a list).

    Text columns: with ``encoding`` None (a training file), a feature column in which no cell is a number
    (``red``, ``blue``) is categorical: one-hot encoded, its sorted categories learnt here; a single
    class-label column in which no cell is a number holds class names (class id = position among the
    sorted names). The learnt :class:`~trainval.data.tabular.TableEncoding` comes back as
    ``split.encoding``; another file of the run is read with it (``encoding=``), and a category or class
    it does not hold is refused naming the row. A column mixing numbers and text is refused at its
    first non-number, as a typo in a numeric column.

    Read with pyarrow when it is installed (a fast path that accepts only a clean file); any doubt,
    and every error, goes through the Python reader below, which names the row and column.

    ``label`` may be a list of columns (multilabel, multi-output regression): ``y`` is then ``[N, K]``.
    ``integer_labels`` (classification) refuses targets that are not integers, naming the file row.

    UTF-8 (with or without a BOM), quoted cells and blank lines are fine. Every error names the file,
    the row as the file numbers it (the header is row 1) and the column by name. NaN/Inf features are
    refused here, where their row is known, unless ``allow_nonfinite``.
    """
    with open_data_file(path) as f:
        raw = f.read()
    where = shown(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{where}: row {row} is not UTF-8 text (byte {raw[e.start]:#x}); save the file as UTF-8 "
            "(for example from a spreadsheet: CSV UTF-8)."
        ) from None
    fast = _csv_fast(raw, text, label, features, require_labels, allow_nonfinite, integer_labels, encoding)
    if fast is not None:
        return fast
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
        raise DataError(f"{where}: row {reader.line_num}: {shown(e)}.") from None
    if header is None:
        raise DataError(f"{where}: the file is empty (a header row is needed).")
    if not rows:
        raise DataError(f"{where}: there are no data rows below the header.")
    # Every check below is linear in the number of columns (a header may have 100,000 of them).
    col: dict[str, int] = {}
    duplicates: dict[str, None] = {}  # in header order
    for i, h in enumerate(header):
        if col.setdefault(h, i) != i:
            duplicates[h] = None
    if duplicates:
        raise DataError(
            f"{where}: the header names column(s) {shown_names(duplicates, quoted=True)} more than once; "
            "give every column its own name."
        )
    if features is not None and not features:
        raise ConfigError(
            "data.features is empty: list the feature columns, or leave it unset for all but the label."
        )
    labels = [] if label is None else ([label] if isinstance(label, str) else list(label))
    if features is not None:
        feature_set = set(features)
        both = [c for c in labels if c in feature_set]
        if both:
            raise ConfigError(
                f"data.features includes the label column {shown_names(both, quoted=True)}; remove it from "
                "data.features."
            )
    absent = [c for c in labels if c not in col]
    has_label = bool(labels) and not absent
    if labels and absent and require_labels:
        raise DataError(
            f"{where}: no label column {shown_names(absent, quoted=True)} (columns: {shown_names(header)}); "
            "set data.label."
        )
    if features is None:
        label_set = set(labels)
        feat_cols = [h for h in header if h not in label_set]
        if not feat_cols:
            raise DataError(
                f"{where}: there are no feature columns besides the label {shown_names(labels, quoted=True)}."
            )
    else:
        missing = [c for c in features if c not in col]
        if missing:
            raise DataError(
                f"{where}: feature columns not found: {shown_names(missing)} (columns: {shown_names(header)})."
            )
        feat_cols = list(features)
    whole = [row for row in rows if len(row) == len(header)]  # (a short or long row is refused below)
    if encoding is None:
        encoding = TableEncoding(
            list(feat_cols),
            {
                c: sorted({cell.strip() for cell in cells} - {""})
                for c in feat_cols
                if (cells := [row[col[c]] for row in whole]) and not any(map(_is_float, cells))
            },
        )
        if isinstance(label, str) and has_label and integer_labels:
            cells = [row[col[label]] for row in whole]
            if cells and not any(map(_is_float, cells)):
                encoding.classes = sorted({cell.strip() for cell in cells} - {""})
    categorical = {
        c: {name: k for k, name in enumerate(encoding.categories[c])}
        for c in feat_cols
        if c in encoding.categories
    }
    classes = (
        None if encoding.classes is None or not has_label else {n: k for k, n in enumerate(encoding.classes)}
    )
    numeric_cols = [c for c in feat_cols if c not in categorical]
    X = np.empty((len(rows), len(numeric_cols)), dtype=np.float32)
    codes = {c: np.empty(len(rows), dtype=np.int64) for c in categorical}
    y = np.empty((len(rows), len(labels)), dtype=np.float64) if has_label else None
    feat_at = [col[c] for c in numeric_cols]
    label_at = [col[c] for c in labels] if has_label else []
    for r, row in enumerate(rows):
        at = data_rows[r]
        if len(row) != len(header):
            raise DataError(f"{where}: row {at} has {len(row)} cells, the header has {len(header)}.")
        for c, index in categorical.items():
            cell = row[col[c]].strip()
            if cell not in index:
                raise DataError(
                    f"{where}: row {at}, column {shown_repr(c)}: {shown_repr(cell)} is not one of the column's "
                    f"categories ({shown_names(index, most=10, quoted=True)}) the run was trained on; an "
                    "unseen category is refused, never guessed: map it to one of them or drop the row."
                )
            codes[c][r] = index[cell]
        if classes is not None:
            cell = row[label_at[0]].strip()
            if cell not in classes:
                raise DataError(
                    f"{where}: row {at}, label column {shown_repr(labels[0])}: {shown_repr(cell)} is not a class "
                    f"the run was trained on ({shown_names(classes, most=10, quoted=True)})."
                )
            assert y is not None
            y[r, 0] = classes[cell]
            continue
        try:
            with np.errstate(over="ignore"):  # 1e39 is inf as float32: refused below, as not finite
                X[r] = [float(row[i]) for i in feat_at]
        except ValueError:
            i = next(i for i in feat_at if not _is_float(row[i]))
            raise DataError(
                f"{where}: row {at}, column {shown_repr(header[i])}: {shown_repr(row[i])} is not a number."
            ) from None
        if not allow_nonfinite and not np.isfinite(X[r]).all():
            i = feat_at[int(np.argmin(np.isfinite(X[r])))]
            raise DataError(
                f"{where}: row {at}, column {shown_repr(header[i])}: {shown_repr(row[i].strip())} is "
                "not a finite number; clean the data (or set data.check_inputs=false to train on it "
                "anyway)."
            )
        if y is not None and classes is None:
            for k, i in enumerate(label_at):
                try:
                    y[r, k] = float(row[i])
                except ValueError:
                    what = "a class id" if integer_labels else "a number"
                    raise DataError(
                        f"{where}: row {at}, label column {shown_repr(header[i])}: {shown_repr(row[i])} "
                        f"is not {what}."
                    ) from None
    if y is not None:
        # A class id is an integer a float64 holds exactly (beyond 2**53, 1e30 would become -2**63 as int64).
        bad = ~np.isfinite(y) | (((y != np.round(y)) | (np.abs(y) > 2**53)) if integer_labels else False)
        if bad.any():
            r, k = (int(i) for i in np.argwhere(bad)[0])
            what = (
                "an integer class id (for real-valued targets set task.name: regression; labels must be the "
                "class ids 0, 1, 2..., or -100 for a sample to ignore)"
                if integer_labels
                else "a finite number"
            )
            cell = rows[r][
                label_at[k]
            ].strip()  # the value as written: 1e30, not 1e+30 or -9223372036854775808
            raise DataError(
                f"{where}: row {data_rows[r]}, label column {shown_repr(labels[k])}: {shown(cell)} "
                f"is not {what}."
            )
        if integer_labels:
            y = y.astype(np.int64)
        if isinstance(label, str):
            y = y[:, 0]
    if categorical:
        columns = {c: X[:, k] for k, c in enumerate(numeric_cols)} | codes
        X = encoding.assemble(columns, len(rows))
    return Split(X, y, encoding=encoding)


def _lines(text: str) -> Iterator[str]:
    """The lines of ``text``, each with its line ending, made one at a time."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def _csv_fast(
    raw: bytes,
    text: str,
    label: str | list[str] | None,
    features: list[str] | None,
    require_labels: bool,
    allow_nonfinite: bool,
    integer_labels: bool,
    encoding: TableEncoding | None,
) -> Split | None:
    """``load_csv`` through pyarrow's CSV reader for a clean file, or None: pyarrow is missing, or
    something in the file needs the Python reader (which then names the row and the column at fault,
    or accepts what pyarrow would not, such as a line of spaces). Never a different result."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped]
        import pyarrow.csv as pacsv  # type: ignore[import-untyped]
    except ImportError:
        return None
    reader = csv.reader(_lines(text))  # (io.StringIO would copy the whole text, four bytes a character)
    header = None
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                header = [h.strip() for h in row]
                break
    except csv.Error:
        return None
    labels = [] if label is None else ([label] if isinstance(label, str) else list(label))
    if header is None or len(set(header)) != len(header) or any("\n" in h or "\r" in h for h in header):
        return None
    present = {h: i for i, h in enumerate(header)}
    if features == [] or (features is not None and set(features) & set(labels)):
        return None
    if not all(c in present for c in labels):
        if require_labels:
            return None
        labels, label = [], None  # an unlabelled file (test/predict)
    label_set = set(labels)
    feat_cols = [h for h in header if h not in label_set] if features is None else list(features)
    if not feat_cols or not all(c in present for c in feat_cols) or set(feat_cols) & label_set:
        return None
    try:
        table = pacsv.read_csv(
            io.BytesIO(raw),
            read_options=pacsv.ReadOptions(
                skip_rows=reader.line_num, column_names=[f"c{i}" for i in range(len(header))]
            ),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                include_columns=[f"c{present[c]}" for c in [*feat_cols, *labels]],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[],
            ),
        )
    except (pa.ArrowException, ValueError, OSError):
        return None
    n = table.num_rows
    if n == 0:
        return None

    def column(name: str) -> np.ndarray:
        # one chunk first: converting pyarrow's chunks one by one costs more than the parse
        return table.column(f"c{present[name]}").combine_chunks().to_numpy(zero_copy_only=False)

    def names_of(values: np.ndarray) -> np.ndarray | None:
        """Text cells, stripped, if none is blank or a number; else None."""
        if values.dtype != object:
            return None
        cells = strip_all(values)
        uniques = set(cells.tolist())
        return None if "" in uniques or any(map(_is_float, uniques)) else cells

    def number_kind(values: np.ndarray) -> bool:
        return values.dtype.kind in "iuf"

    learn = encoding is None
    enc = encoding or TableEncoding(list(feat_cols))
    columns: dict[str, np.ndarray] = {}
    for c in feat_cols:
        values = column(c)
        if (learn and not number_kind(values)) or c in enc.categories:
            cells = names_of(values) if not number_kind(values) else None
            if cells is None:
                return None
            if learn:
                enc.categories[c] = sorted(set(cells.tolist()))
            index = {v: k for k, v in enumerate(enc.categories[c])}
            if not set(cells.tolist()) <= index.keys():
                return None  # an unseen category: the Python reader names its row
            columns[c] = np.array([index[v] for v in cells.tolist()], dtype=np.int64)
        elif not number_kind(values):
            return None
        else:
            values = values.astype(np.float64)
            with np.errstate(over="ignore"):
                if not allow_nonfinite and not np.isfinite(values.astype(np.float32)).all():
                    return None
            columns[c] = values
    y = None
    if labels:
        ys = [column(c) for c in labels]
        if (
            isinstance(label, str)
            and integer_labels
            and ((learn and not number_kind(ys[0])) or enc.classes is not None)
        ):
            cells = names_of(ys[0])
            if cells is None:
                return None
            if learn:
                enc.classes = sorted(set(cells.tolist()))
            assert enc.classes is not None
            index = {v: k for k, v in enumerate(enc.classes)}
            if not set(cells.tolist()) <= index.keys():
                return None
            y = np.array([index[v] for v in cells.tolist()], dtype=np.int64)
        else:
            if not all(number_kind(v) for v in ys):
                return None
            y = np.column_stack([v.astype(np.float64) for v in ys])
            bad = ~np.isfinite(y) | (((y != np.round(y)) | (np.abs(y) > 2**53)) if integer_labels else False)
            if bad.any():
                return None
            if integer_labels:
                y = y.astype(np.int64)
            if isinstance(label, str):
                y = y[:, 0]
    return Split(enc.assemble(columns, n), y, encoding=enc)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def csv_feature_columns(path: str, label: str | list[str] | None, features: list[str] | None) -> list[str]:
    """The feature columns ``load_csv`` takes from ``path``, in order: ``features``, or all but the label."""
    if features is not None:
        return list(features)
    labels = {label} if isinstance(label, str) else set(label or [])
    with open_data_file(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        for row in csv.reader(f):
            if any(cell.strip() for cell in row):
                return [h for h in (cell.strip() for cell in row) if h not in labels]
    return []


def check_classes(
    y: np.ndarray | None, path: str, column: str, task: str, ignore_index: int | None = None
) -> None:
    """Refuse a training file whose labels (a multiclass/binary task's 1-D class ids) are all one class.

    ``column`` says where the labels are (``label column 'label'``, ``array 'y'``). Said here, naming the
    file, before a model is built: a classifier cannot learn from a single class.
    """
    if y is None or task not in ("multiclass", "binary") or y.ndim != 1:
        return
    counted = y[y != (-100 if ignore_index is None else ignore_index)] if task == "multiclass" else y
    classes = np.unique(counted)
    if len(classes) == 1 and len(counted) > 1:  # (one row: too few to split, said where it is split)
        needs = "rows of both classes (0 and 1)" if task == "binary" else "rows of at least two classes"
        raise DataError(
            f"{shown(path)}: every label in {column} is the same class ({shown(classes[0].item())}, "
            f"{len(counted)} rows), and a {task} classifier needs {needs} to learn from; check the "
            "labels (or set task.name: regression for real-valued targets)."
        )


def import_object(spec: str, what: str) -> Any:
    """``"package.module:attr"`` -> the object, or a ConfigError naming the string and the reason."""
    if ":" not in spec:
        raise ConfigError(f"{what} '{spec}' must have the form 'module:name'.")
    module_name, _, attr = spec.partition(":")
    # The user's own modules (`trainval fit` run where they lie): the current folder, searched after the
    # standard library and installed packages, and only now that the config names code to import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise ConfigError(
            f"{what} '{spec}': cannot import module '{module_name}' ({type(e).__name__}: {e})."
        ) from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        where = getattr(module, "__file__", None)
        raise ConfigError(
            f"{what} '{spec}': module '{module_name}' has no attribute '{attr}'"
            f"{f' (it was imported from {where})' if where else ''}."
        ) from None
    return obj


__all__ = [
    "Loader",
    "Step",
    "TensorLoader",
    "ShardSampler",
    "DrawnShare",
    "DataLoaderAdapter",
    "StreamLoader",
    "RankSplit",
    "split_by_rank",
    "is_stream",
    "make_loader",
    "epoch_indices",
    "as_tensors",
    "check_finite",
    "split_batch",
    "tree_map",
    "Split",
    "load_digits_arrays",
    "load_npz",
    "load_csv",
    "check_classes",
    "import_object",
    "stratified_split",
]
