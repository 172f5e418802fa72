"""The framework-free core: columns as numpy arrays, cut into batches.

A frame is converted to numpy once. Each epoch is then one permutation (if
shuffling) and one gather per column per batch: no Python loop over rows.
Several readers of the same epoch (DataLoader workers) compute the same
permutation from the same seed and each takes every k-th batch, so together
they cover every row exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from .. import options
from ..exceptions import InvalidArgumentError


def check_batch_size(batch_size: Any, *, allow_none: bool = True) -> int | None:
    """``batch_size`` must be a positive int (or None where single rows are allowed)."""
    if batch_size is None and allow_none:
        return None
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size <= 0:
        raise InvalidArgumentError(
            f"batch_size must be a positive int{' or None' if allow_none else ''}, got {batch_size!r}"
        )
    return int(batch_size)


def check_flag(value: Any, name: str) -> bool:
    """``shuffle`` and ``drop_last_batch`` must be True or False (numpy's too):
    a text such as "no" or "False", being truthy, shuffled."""
    hint = " (storage_options is a keyword argument: storage_options={...})" if isinstance(value, dict) else ""
    return options.check_flag(value, name, hint)


def check_seed(seed: Any) -> int | None:
    """``seed`` must be a non-negative int (numpy ints too) or None."""
    if seed is None:
        return None
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative int or None, got {seed!r}")
    return int(seed)


def _datetimes_as_int64_ns(series: pd.Series) -> np.ndarray:
    """Datetimes and timedeltas as int64 nanoseconds, whatever unit they are
    stored in (pandas 3 often stores [us]): the same instant is one number.
    tz-aware datetimes count from the epoch in UTC."""
    try:
        arrow_type = getattr(series.dtype, "pyarrow_dtype", None)
        if arrow_type is not None and pa.types.is_date(arrow_type):
            # pyarrow's dates (what read_parquet(dtype_backend="pyarrow") makes
            # of a parquet date) have no unit to change: midnight of the day
            series = series.astype("datetime64[ns]")
        elif getattr(series.dtype, "tz", None) is not None or getattr(arrow_type, "tz", None):
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        values = series.dt.as_unit("ns").to_numpy()
    except (pd.errors.OutOfBoundsDatetime, pd.errors.OutOfBoundsTimedelta, OverflowError) as exc:
        raise InvalidArgumentError(
            f"column {series.name!r} has values outside the int64 nanosecond range "
            f"(years 1677-2262); convert it to another unit or a number first"
        ) from exc
    return values.view("int64")


def column_to_numpy(series: pd.Series, has_missing: bool | None = None) -> tuple[np.ndarray, bool]:
    """One column as numpy; returns (array, is_string).

    Numbers keep their dtype; nullable floats keep their width, NaN for
    missing. Nullable ints/bools keep their numpy dtype unless the whole
    source has a missing value in this column (``has_missing``; None: look at
    ``series``, which is then the whole source): then they become float64
    with NaN, so one column has one dtype in every batch. Datetimes and
    timedeltas become int64 nanoseconds (UTC for tz-aware); strings,
    categories and other objects become an object array (None for missing).
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(dtype) or dtype == object:
        values = series.astype(object).to_numpy(copy=True)
        values[pd.isna(values)] = None
        return values, True
    if getattr(dtype, "kind", None) in ("M", "m"):  # numpy, tz-aware and pyarrow datetimes/durations
        return _datetimes_as_int64_ns(series), False
    if isinstance(dtype, pd.api.extensions.ExtensionDtype):
        numpy_dtype = np.dtype(getattr(dtype, "numpy_dtype", "float64"))
        try:
            if numpy_dtype.kind == "f":
                return series.to_numpy(dtype=numpy_dtype, na_value=np.nan), False
            if series.isna().any() if has_missing is None else has_missing:
                return series.to_numpy(dtype="float64", na_value=np.nan), False
            return series.to_numpy(dtype=numpy_dtype), False
        except (TypeError, ValueError) as exc:
            # periods, intervals: "float() argument must be ... not 'Period'",
            # which named no column
            raise InvalidArgumentError(
                f"column {series.name!r} ({dtype}) has no numeric form for a tensor ({type(exc).__name__}: "
                f"{exc}); convert it first: a period with .dt.to_timestamp(), an interval with "
                f".array.left or .array.mid, or anything with .astype(str)"
            ) from exc
    return series.to_numpy(), False


def check_column_names(columns: Any) -> None:
    """Batches are keyed by ``str(name)``: two columns must not share one key."""
    seen: dict[str, Any] = {}
    for name in columns:
        key = str(name)
        if key in seen:
            clash = f"column {name!r} appears twice" if seen[key] == name else (
                f"columns {seen[key]!r} and {name!r} both become the key {key!r}"
            )
            raise InvalidArgumentError(
                f"{clash} in the batches' dict[column -> tensor]; rename one first "
                f"(df.rename(columns=...) or df.columns = [...])"
            )
        seen[key] = name


@dataclass
class Columns:
    """A frame as named numpy columns, converted once."""

    arrays: dict[str, np.ndarray]
    strings: frozenset[str]
    n_rows: int

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, with_missing: frozenset[str] | None = None) -> "Columns":
        """Convert every column once. ``with_missing``: the columns that have
        a missing value somewhere in the whole source, when ``frame`` is only
        part of it (one file of a FileSet); None: ``frame`` is the whole source."""
        check_column_names(frame.columns)
        arrays, strings = {}, set()
        for position, name in enumerate(frame.columns):
            has_missing = None if with_missing is None else str(name) in with_missing
            array, is_string = column_to_numpy(frame.iloc[:, position], has_missing)
            if not array.flags.writeable:  # pandas' copy-on-write hands out read-only views
                array = array.copy()
            arrays[str(name)] = array
            if is_string:
                strings.add(str(name))
        return cls(arrays, frozenset(strings), len(frame))

    @property
    def schema(self) -> dict[str, tuple[np.dtype, bool]]:
        """``{column: (numpy dtype, is_string)}``."""
        return {n: (a.dtype, n in self.strings) for n, a in self.arrays.items()}

    def take(self, index: np.ndarray | slice) -> dict[str, np.ndarray]:
        """The rows at ``index`` as new arrays, never views: a batch handed to
        the user may be changed in place, and must not change later epochs."""
        if isinstance(index, slice):
            return {name: array[index].copy() for name, array in self.arrays.items()}
        return {name: array[index] for name, array in self.arrays.items()}


def epoch_rng(seed: int, *keys: int) -> np.random.Generator:
    """The generator of one epoch: the same keys give the same permutation."""
    return np.random.default_rng([seed, *keys])


def count_batches(n_rows: int, batch_size: int, drop_last: bool) -> int:
    """How many batches one epoch of ``n_rows`` rows has."""
    return n_rows // batch_size + (1 if not drop_last and n_rows % batch_size else 0)


def batch_bounds(n_rows: int, batch_size: int, drop_last: bool) -> list[tuple[int, int]]:
    stops = list(range(batch_size, n_rows + 1, batch_size))
    bounds = [(stop - batch_size, stop) for stop in stops]
    if not drop_last and n_rows % batch_size:
        bounds.append((n_rows - n_rows % batch_size, n_rows))
    return bounds


def iter_batches(
    columns: Columns,
    *,
    batch_size: int | None,
    shuffle: bool,
    drop_last: bool,
    rng: np.random.Generator | None,
    share: int = 0,
    n_shares: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield this reader's batches of one epoch as dicts of numpy arrays.

    With ``batch_size=None`` the batches are single rows (dicts of scalars).
    Reader ``share`` of ``n_shares`` takes batches share, share + n_shares, ...
    """
    order = rng.permutation(columns.n_rows) if shuffle else None
    size = batch_size or 1
    for number, (start, stop) in enumerate(batch_bounds(columns.n_rows, size, drop_last or batch_size is None)):
        if number % n_shares != share:
            continue
        index = order[start:stop] if order is not None else slice(start, stop)
        batch = columns.take(index)
        if batch_size is None:
            yield {name: values[0] for name, values in batch.items()}
        else:
            yield batch


class Rebatcher:
    """Cut a stream of column chunks (one per file) into equal batches.

    Rows left over at the end of one chunk are carried into the next, so
    batches may span files; only the very last batch can be short.
    """

    def __init__(self, batch_size: int | None, drop_last: bool):
        self.size = batch_size or 1
        self.single_rows = batch_size is None
        self.drop_last = drop_last or batch_size is None
        self.carry: dict[str, np.ndarray] | None = None

    def feed(self, chunk: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        if self.carry is not None:
            chunk = {name: np.concatenate([self.carry[name], values]) for name, values in chunk.items()}
        n_rows = len(next(iter(chunk.values()))) if chunk else 0
        full = n_rows - n_rows % self.size
        for start in range(0, full, self.size):
            batch = {name: values[start : start + self.size] for name, values in chunk.items()}
            yield {k: v[0] for k, v in batch.items()} if self.single_rows else batch
        self.carry = {name: values[full:] for name, values in chunk.items()}

    def finish(self) -> Iterator[dict[str, np.ndarray]]:
        if self.carry is not None and not self.drop_last:
            rest = len(next(iter(self.carry.values()))) if self.carry else 0
            if rest:
                yield self.carry
        self.carry = None


class FrameSource:
    """Batches of one in-memory frame (a group's rows)."""

    def __init__(self, frame: pd.DataFrame):
        self.columns = Columns.from_frame(frame)

    @property
    def n_rows(self) -> int:
        return self.columns.n_rows

    @property
    def schema(self) -> dict[str, tuple[np.dtype, bool]]:
        """``{column: (numpy dtype, is_string)}``."""
        return self.columns.schema

    def epoch(self, rng, *, batch_size, shuffle, drop_last, share=0, n_shares=1):
        return iter_batches(
            self.columns, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
            rng=rng, share=share, n_shares=n_shares,
        )


def new_seed() -> int:
    """A random seed, drawn once where a dataset is made: its copies in
    DataLoader workers share it, so their permutations agree."""
    return int(np.random.SeedSequence().entropy % (2**63))
