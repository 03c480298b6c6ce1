"""Tables: named columns, string class labels and categorical features, for the CLI's CSV files and DataFrames.

A :class:`TableEncoding` is what is learnt from the training table and applied to every later one:

- ``features``: the input columns, in the order the model sees them; later tables give them by name,
  in any order, and a missing one is refused naming it;
- ``categories``: for each categorical column (strings: ``"red"``, ``"blue"``), its categories in
  one-hot order; the column becomes ``len(categories)`` 0/1 features, in place;
- ``classes``: the class names when the target holds names (``"setosa"``...); class id ``k`` is
  ``classes[k]`` (the sorted names), and predictions are written back as names.

It is plain data (:meth:`TableEncoding.state_dict`: lists and strings, JSON and YAML safe), recorded in
the run folder's ``config.yaml`` (``resolved``) and in every checkpoint.

A value that the training table did not hold is refused, in one line naming it: an unknown class in
test labels, and an unseen category in a feature column at test or predict time (never an all-zero
row the model was not trained on, and never a shifted one-hot column).

pandas is optional: it is imported only where a DataFrame is given (then it is already imported).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainval.errors import DataError
from trainval.untrusted import shown, shown_names, shown_repr

PANDAS_HINT = "pip install 'trainval[tabular]'"


@dataclass
class TableEncoding:
    """Columns, categories and class names learnt from a training table (see the module docstring)."""

    features: list[str]
    categories: dict[str, list[str]] = field(default_factory=dict)
    classes: list[str] | None = None

    @property
    def width(self) -> int:
        """Features the model sees: one per numeric column, one per category of a categorical one."""
        return sum(len(self.categories[c]) if c in self.categories else 1 for c in self.features)

    @property
    def is_plain(self) -> bool:
        """Numbers only: nothing beyond the column names to record."""
        return not self.categories and self.classes is None

    def state_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "categories": {k: list(v) for k, v in self.categories.items()},
            "classes": None if self.classes is None else list(self.classes),
        }

    @classmethod
    def from_state(cls, state: Any, where: str) -> TableEncoding:
        """The encoding :meth:`state_dict` wrote, checked to be lists of strings (it comes from a file)."""

        def strings(v: Any) -> bool:
            return isinstance(v, list) and all(isinstance(s, str) for s in v)

        cats = state.get("categories") if isinstance(state, dict) else None
        if not (
            isinstance(state, dict)
            and strings(state.get("features"))
            and isinstance(cats, dict)
            and all(isinstance(k, str) and strings(v) and v for k, v in cats.items())
            and (state.get("classes") is None or strings(state.get("classes")))
        ):
            raise DataError(
                f"{where}: the recorded table encoding (features, categories, classes) is not one trainval "
                "wrote; the file was changed. Train the run again."
            )
        return cls(list(state["features"]), {k: list(v) for k, v in cats.items()}, state.get("classes"))

    # ------------------------------------------------------------------------------------------

    def encode_classes(self, values: np.ndarray, where: str) -> np.ndarray:
        """Class names -> class ids (int64); a name the training labels did not hold is refused."""
        assert self.classes is not None
        return codes_of(values, self.classes, f"{where}: label", "a class the run was trained on")

    def decode_classes(self, ids: Sequence[int]) -> list[str]:
        assert self.classes is not None
        return [self.classes[i] for i in ids]

    def assemble(self, columns: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The ``[n, width]`` float32 features from each column's numbers (numeric columns) or category
        ids (categorical ones), in ``features`` order, a categorical column one-hot in its place."""
        X = np.zeros((n, self.width), dtype=np.float32)
        j = 0
        rows = np.arange(n)
        for name in self.features:
            values = columns[name]
            if name in self.categories:
                X[rows, j + values] = 1.0
                j += len(self.categories[name])
            else:
                with np.errstate(over="ignore"):  # 1e39 is inf as float32 (refused where it is read)
                    X[:, j] = values.astype(np.float64, copy=False)
                j += 1
        return X


def strip_all(values: np.ndarray) -> np.ndarray:
    """The cells of a text column without surrounding spaces (``" red"`` is ``red``), as str objects."""
    return np.array([str(v).strip() for v in values], dtype=object)


def codes_of(values: np.ndarray, names: list[str], what: str, known: str) -> np.ndarray:
    """Positions of ``values`` (strings) in ``names``; the first value not among them is one DataError."""
    index = {name: i for i, name in enumerate(names)}
    uniques, inverse = np.unique(values.astype(str), return_inverse=True)
    found = np.empty(len(uniques), dtype=np.int64)
    for k, u in enumerate(uniques.tolist()):
        if u not in index:
            raise DataError(
                f"{what} {shown_repr(u)} is not {known} ({shown_names(names, most=10, quoted=True)}); "
                "map it to one of them or drop those rows (an unseen value is refused, never guessed)."
            )
        found[k] = index[u]
    return found[inverse.reshape(-1)]


# --------------------------------------------------------------------------------------------------
# DataFrames (pandas)


def _pandas() -> Any:
    return sys.modules.get("pandas")  # a DataFrame exists only once pandas is imported


def is_frame(x: Any) -> bool:
    pd = _pandas()
    return pd is not None and isinstance(x, pd.DataFrame)


def is_series(x: Any) -> bool:
    pd = _pandas()
    return pd is not None and isinstance(x, pd.Series)


def holds_frame(data: Any) -> bool:
    """A DataFrame, or an ``(X, y)`` pair whose ``X`` is one."""
    return is_frame(data) or (isinstance(data, (tuple, list)) and len(data) == 2 and is_frame(data[0]))


def _is_text(column: Any) -> bool:
    """Strings or categories (one-hot encoded), not numbers or booleans."""
    pd = _pandas()
    dtype = column.dtype
    return bool(
        isinstance(dtype, pd.CategoricalDtype)
        or pd.api.types.is_string_dtype(dtype)
        or getattr(dtype, "kind", "") == "O"
    )


def _learn_categories(column: Any, name: str, what: str) -> list[str]:
    pd = _pandas()
    if column.isna().any():
        raise _missing(column, name, what)
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories]
    return sorted(set(strip_all(column.to_numpy()).tolist()))


def _missing(column: Any, name: str, what: str) -> DataError:
    row = column.index[column.isna().to_numpy()][0]
    return DataError(
        f"{what}: column {shown_repr(name)} has a missing value (at index {shown_repr(row)}); fill or drop it."
    )


def learn_frame(X: Any, y: Any, classify: bool, what: str) -> TableEncoding:
    """The encoding of a training DataFrame: its columns, the categories of its text columns, and the
    class names when ``y`` (a Series) holds text and the task is a classification."""
    names = [str(c) for c in X.columns]
    if len(set(names)) != len(names):
        raise DataError(
            f"{what}: the DataFrame names some columns more than once; give every column its own name."
        )
    categories = {str(c): _learn_categories(X[c], str(c), what) for c in X.columns if _is_text(X[c])}
    classes = None
    if y is not None and classify and _is_text(y):
        classes = _learn_categories(y, str(y.name), what)
    return TableEncoding(names, categories, classes)


def frame_features(X: Any, enc: TableEncoding, what: str) -> np.ndarray:
    """The model's ``[N, width]`` float32 features from a DataFrame, its columns taken by name."""
    present = {str(c): c for c in X.columns}
    missing = [c for c in enc.features if c not in present]
    if missing:
        raise DataError(
            f"{what}: the DataFrame lacks the column(s) {shown_names(missing, quoted=True)} the model was "
            f"trained on (it has {shown_names(present)})."
        )
    columns: dict[str, np.ndarray] = {}
    for name in enc.features:
        column = X[present[name]]
        if name in enc.categories:
            if column.isna().any():
                raise _missing(column, name, what)
            columns[name] = codes_of(
                strip_all(column.to_numpy()),
                enc.categories[name],
                f"{what}: column {shown_repr(name)}: value",
                "a category seen in training",
            )
        elif _is_text(column):
            raise DataError(
                f"{what}: column {shown_repr(name)} holds text, but the model was trained on numbers there."
            )
        else:
            columns[name] = column.to_numpy(dtype=np.float64)
    return enc.assemble(columns, len(X))


def frame_target(y: Any, enc: TableEncoding, what: str) -> np.ndarray:
    """A target Series as class ids (names through the recorded classes) or as its numbers."""
    if enc.classes is not None:
        if y.isna().any():
            raise _missing(y, str(y.name), what)
        return enc.encode_classes(strip_all(y.to_numpy()), f"{what}: column {shown_repr(str(y.name))}")
    if _is_text(y):
        raise DataError(
            f"{what}: the target {shown_repr(str(y.name))} holds text, but the model was trained on numeric "
            "targets; give the class ids it was trained on."
        )
    return y.to_numpy()


def split_frame(data: Any, target: str | None, what: str) -> tuple[Any, Any]:
    """``(features DataFrame, target Series or None)`` from ``df`` (with ``target=`` naming a column)
    or ``(df, series)``."""
    if isinstance(data, (tuple, list)):
        X, y = data
        if y is not None and not is_series(y):
            y = _pandas().Series(np.asarray(y), name="target")
        if target is not None:
            raise DataError(f"{what}: give the target as a column name (target=) or as a Series, not both.")
        return X, y
    if target is None:
        return data, None
    if target not in data.columns:
        raise DataError(
            f"{what}: the DataFrame has no target column {shown_repr(target)} (it has "
            f"{shown_names([str(c) for c in data.columns])})."
        )
    return data.drop(columns=[target]), data[target]


def frame_arrays(
    data: Any, target: str | None, enc: TableEncoding | None, classify: bool, what: str, labelled: bool = True
) -> tuple[tuple[np.ndarray, np.ndarray | None], TableEncoding]:
    """DataFrame data -> ``((X, y), encoding)``: with ``enc`` None the encoding is learnt here (fit's
    training data), else ``enc`` is applied (validation, test, predict)."""
    X, y = split_frame(data, target, what)
    if not labelled:
        y = None
    if enc is None:
        enc = learn_frame(X, y, classify, what)
    features = frame_features(X, enc, what)
    return (features, None if y is None else frame_target(y, enc, what)), enc


def check_not_frame(data: Any, target: str | None) -> None:
    if target is not None and not holds_frame(data):
        raise DataError(
            f"target={shown(target)} names a column of a DataFrame; this data is {type(data).__name__}."
        )
