"""Seeded, stratified train/val/test splits, without scikit-learn.

:func:`stratified_split` gives, for the same labels, fractions and seed, the very indices that
``sklearn.model_selection.train_test_split(..., stratify=y, random_state=seed)`` gave in earlier versions of
trainval (the same NumPy ``RandomState`` draws in the same order; ``tests/test_packaging.py`` compares the two
on random inputs). Run folders split before scikit-learn became optional therefore split the same way now,
and the library needs no scikit-learn for a split.
"""

from __future__ import annotations

import math

import numpy as np

from trainval.errors import DataError


class _CannotSplit(ValueError):
    """A split that scikit-learn would refuse (too few samples of a class, or of all)."""


def _sizes(n_samples: int, test_size: float) -> tuple[int, int]:
    """(n_train, n_test) for a fractional ``test_size``, rounded as scikit-learn rounds them."""
    if not 0 < test_size < 1:
        raise _CannotSplit
    n_test = math.ceil(test_size * n_samples)
    n_train = n_samples - n_test
    if n_train <= 0:
        raise _CannotSplit
    return n_train, n_test


def _approximate_mode(class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``n_draws`` to take from each class: the floor of each class's share, then one more for
    the classes with the largest remainders (ties broken by ``rng``)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _stratified_once(
    items: np.ndarray, y: np.ndarray, test_size: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``items`` cut into (train, test), each class kept in proportion."""
    n_train, n_test = _sizes(len(items), test_size)
    if y.ndim == 2:  # multi-label: each distinct row of labels is one stratum
        y = np.array([" ".join(row.astype("str")) for row in y])
    _, y_indices, class_counts = np.unique(y, return_inverse=True, return_counts=True)
    n_classes = len(class_counts)
    if class_counts.min() < 2 or n_train < n_classes or n_test < n_classes:
        raise _CannotSplit
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    rng = np.random.RandomState(seed)
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(n_classes):
        permuted = class_indices[i].take(rng.permutation(class_counts[i]), mode="clip")
        train.extend(permuted[: n_i[i]])
        test.extend(permuted[n_i[i] : n_i[i] + t_i[i]])
    return items[rng.permutation(train)], items[rng.permutation(test)]


def _shuffled_once(items: np.ndarray, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``items`` cut into (train, test) at random, for labels too rare to stratify."""
    n_train, n_test = _sizes(len(items), test_size)
    permutation = np.random.RandomState(seed).permutation(len(items))
    return items[permutation[n_test : n_test + n_train]], items[permutation[:n_test]]


def stratified_split(y: np.ndarray, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Index arrays: the first part gets what the fractions leave; each later part gets ``fraction``.

    Stratified by label and seeded, so the same data and seed always give the same split. Where some class
    has too few samples to stratify, that part is drawn at random instead.
    """
    remaining = np.arange(len(y))
    parts: list[np.ndarray] = []
    remaining_frac = 1.0
    for frac in fractions:
        if frac <= 0:
            parts.append(np.array([], dtype=np.int64))
            continue
        share = frac / remaining_frac
        try:
            remaining, taken = _stratified_once(remaining, y[remaining], share, seed)
        except _CannotSplit:
            try:
                remaining, taken = _shuffled_once(remaining, share, seed)
            except _CannotSplit:
                raise DataError(
                    f"cannot hold out a {frac:g} split of {len(remaining)} samples and keep some to "
                    "train on; use more data or set data.val_split/data.test_split to 0."
                ) from None
        parts.append(np.sort(taken))
        remaining_frac -= frac
    return [np.sort(remaining), *parts]
