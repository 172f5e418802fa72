"""The engine behind train, predict and DPF runs.

On the client (:func:`start_run`): validate everything that can be checked
without compute, count rows per group, assign groups to output partitions
largest first, shuffle on that assignment, and submit one task per output
partition; or, when every group already lives in one input partition, skip
the shuffle and submit a task per input partition (a large one split into
several). On the workers (:func:`run_partition`): loop over the groups of
one partition, run the user function on each, save what it returns, and
write the group's ``_partition.json`` last. Errors are caught per group; a
model never travels back to the client, only a small record per group.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import datetime
import errno
import functools
import heapq
import inspect
import io
import json
import logging
import math
import os
import pickle
import posixpath
import re
import shutil
import socket
import threading
import time
import traceback
import uuid
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import cloudpickle
import dask
import dask.dataframe as dd
import dask.sizeof
import dask.utils
import distributed
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ._client import get_or_start_client, outside_the_worker_pool
from ._gc import freeze_older_objects
from ._logs import capture_logs
from ._malloc import keep_freed_memory
from .context import DataConnector, PartitionContext, not_one_file
from .exceptions import (
    InvalidArgumentError,
    InvalidURLError,
    MissingDependencyError,
    RunExistsError,
    RunNotFoundError,
    StorageError,
)
from .options import ExecutionOptions
from .serde import (
    ModelSerde,
    PickleSerde,
    check_filename,
    serde_from_manifest,
    serde_to_manifest,
    streams_pickle,
    writes_in_memory,
)
from .store import (
    FORMAT_VERSION,
    GROUP_TEXT,
    GROUPS_FILE,
    PARTITION_FILE,
    RUN_MANIFEST,
    TEMP_PREFIX,
    LocalFile,
    RunStore,
    _temp_name,
    column_segment,
    group_path,
    key_from_json,
    key_to_json,
    normalize_key,
    paths_in_zones,
    remove_paths,
    scratch_folder,
    shown_url,
    stored_zones,
)

logger = logging.getLogger(__name__)

KINDS = {
    # kind: (positional arguments of the user function, their names)
    "train": (2, "data, ctx"),
    "predict": (3, "data, model, ctx"),
    "dpf": (2, "data, ctx"),
}
ON_EXISTING = ("error", "overwrite", "resume")
#: Columns the engine adds while it counts and shuffles start with this.
RESERVED_PREFIX = "__manymodel_"
PARTITION_COLUMN = "__manymodel_partition__"
PREDICTION_COLUMN = "prediction"
OUTPUT_FILE = "part-0.parquet"
_RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# How often a task asks the scheduler whether the run was cancelled, and
# reports progress: often enough to feel prompt, rarely enough to cost nothing.
_HEARTBEAT_SECONDS = 0.5


# --------------------------------------------------------------------------
# validation (client side, before any compute)


def check_run_id(run_id: Any, what: str = "run_id") -> str:
    """A run_id is one safe path segment: ASCII letters, digits, ``.``, ``_``, ``-``."""
    # fullmatch: the pattern's "$" also matches before a last newline ("r1\n")
    if not isinstance(run_id, str) or not _RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise InvalidArgumentError(
            f"{what} {run_id!r} is not allowed: use 1-128 ASCII letters (A-Z, a-z), digits, '.', '_' or '-', "
            f"starting with a letter or digit, without '..', '/' or whitespace"
        )
    return run_id


def check_function(func: Any, kind: str) -> Callable:
    """The user function is callable with the kind's positional arguments."""
    n_args, names = KINDS[kind]
    if not callable(func):
        raise InvalidArgumentError(
            f"the {kind} function must be callable as f({names}), got {func!r}"
        )
    if inspect.isgeneratorfunction(func) or inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        # calling one runs none of its body (a yield left in, an async def):
        # every group would be DONE having done nothing
        what = "a generator function" if inspect.isgeneratorfunction(func) else "an async function"
        raise InvalidArgumentError(
            f"the {kind} function {getattr(func, '__qualname__', func)!r} is {what}: calling it runs none "
            f"of its body; make it a plain function that returns its result"
        )
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # some builtins have no signature: trust them
        return func
    try:
        signature.bind(*range(n_args))
    except TypeError:
        name = getattr(func, "__qualname__", repr(func))
        raise InvalidArgumentError(
            f"the {kind} function {name}{signature} must accept {n_args} positional "
            f"arguments ({names})"
        ) from None
    return func


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stack_level() -> int:
    """The ``stacklevel`` for ``warnings.warn`` that names the user's line:
    the first frame outside this package (as pandas' ``find_stack_level``).
    A fixed level named a line of the package for some entry points, and
    Python shows a warning once per line it names: a second run in a
    notebook with the same problem was not warned of."""
    frame = inspect.currentframe()
    level = 0
    try:
        while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            frame = frame.f_back
            level += 1
    finally:
        del frame  # no reference cycle through the frames
    return level


# What a user function carries along travels to every worker with it: its
# closure, a partial's arguments, and the globals it uses when it is defined
# in a notebook or script (cloudpickle sends such functions by value). Above
# this size, a run warns.
_LARGE_FUNCTION_BYTES = 100 * 2**20


def warn_if_function_carries_large_data(func: Callable, kind: str) -> None:
    """Warn when the user function carries large objects to every worker,
    most often a notebook's whole DataFrame used inside the function."""
    large = []
    try:
        for name, value in _carried_values(func).items():
            size = dask.sizeof.sizeof(value)
            if size >= _LARGE_FUNCTION_BYTES:
                large.append((size, name))
    except Exception:  # an empty closure cell, a broken __sizeof__: a hint is not worth failing a run
        logger.debug("could not size what the function carries", exc_info=True)
        return
    if not large:
        return
    listed = ", ".join(f"{name!r} ({dask.utils.format_bytes(size)})" for size, name in sorted(large, reverse=True))
    warnings.warn(
        f"the {describe_function(func, kind)} carries {listed} to every worker with it (once per worker, "
        f"and the scheduler keeps a copy while the run goes on). If each group needs only its own part of it, merge that part into "
        f"the dataframe or read it inside the function instead; if every group needs all of it, this "
        f"is expected",
        UserWarning,
        stacklevel=user_stack_level(),
    )


def describe_function(func: Callable, kind: str) -> str:
    """``"train function fit_line"``: how messages name the user function."""
    kind_name = "DPF" if kind == "dpf" else kind
    return f"{kind_name} function {getattr(func, '__qualname__', None) or repr(func)}"


def _carried_values(func: Callable) -> dict[str, Any]:
    """What pickling ``func`` takes along, by name (modules left out)."""
    values: dict[str, Any] = {}
    if isinstance(func, functools.partial):
        values.update({f"argument {number}": value for number, value in enumerate(func.args)})
        values.update({f"argument {key}": value for key, value in func.keywords.items()})
        func = func.func
    if inspect.ismethod(func):  # a bound method carries its object
        values.update({f"self.{name}": value for name, value in getattr(func.__self__, "__dict__", {}).items()})
    try:
        found = inspect.getclosurevars(func)
    except TypeError:  # not a Python function: a callable object carries its attributes
        values.update(getattr(func, "__dict__", {}))
    else:
        values.update(found.nonlocals)
        qualname = getattr(func, "__qualname__", "")
        if getattr(func, "__module__", None) == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
            values.update(found.globals)  # pickled by value, with the globals it uses
    return {name: value for name, value in values.items() if not inspect.ismodule(value)}


def check_by(by: Any, ddf: dd.DataFrame) -> list:
    """``by`` as a non-empty list of distinct columns of ``ddf``."""
    # several columns as pandas' groupby takes them: a list, tuple, Index or array
    several = isinstance(by, (list, tuple, pd.Index, np.ndarray))
    columns = list(by) if several else [by]
    for column in columns:
        refused = _not_a_column_name(column, ddf)
        if refused:
            raise InvalidArgumentError(refused)
        try:
            hash(column)
        except TypeError:
            raise InvalidArgumentError(
                f"partition_by/by must name column(s): a column name or a list of them, got "
                f"{type(column).__name__} {column!r:.80}"
            ) from None
    if not columns:
        raise InvalidArgumentError(
            "partition_by/by is empty: name the column(s) that define the groups"
        )
    # before the checks of names given twice: an array of a column's values
    # (by=df["store"].values) "named a column twice", listing every value
    missing = [c for c in columns if c not in ddf.columns]
    if missing:
        shown = f"{missing[:5]!r}" + (f" (and {len(missing) - 5:,} more)" if len(missing) > 5 else "")
        values = ""
        if isinstance(by, (pd.Index, np.ndarray)) and len(missing) > 1:
            values = (
                "; an array of group values, one per row, as pandas' groupby takes, is not taken: add it "
                "as a column (ddf = ddf.assign(group=...)) and pass by='group'"
            )
        raise InvalidArgumentError(
            f"partition_by/by column(s) {shown:.300} not in the dataframe; "
            f"its columns are {list(ddf.columns)!r:.300}{values}"
        )
    if len(set(columns)) != len(columns):
        raise InvalidArgumentError(f"partition_by/by {columns!r} names a column twice")
    if len(set(map(str, columns))) != len(columns):
        # 0 and "0": two columns, but one folder name ("0=...") and one
        # name in the output's parquet files
        raise InvalidArgumentError(
            f"partition_by/by {columns!r} names columns whose names are one text, which its groups' "
            f"folders ('<column>=<value>') and output files name columns by; rename one "
            f"(ddf.rename(columns=...))"
        )
    for column in columns:
        column_segment(str(column))  # a name too long for any folder: refused before compute
        _refuse_a_local_time_zone(column, ddf.dtypes[column])
    return columns


def _refuse_a_local_time_zone(column: Any, dtype: Any) -> None:
    """A ``by`` column in dateutil's ``tzlocal()`` zone: that zone is the
    local zone of each process that reads it (its ``TZ``), and a client and
    its workers may have others (a laptop in Paris, workers in UTC). A
    group's folder names its instant in that zone's offset, so a worker
    named another folder than the client did, found no rows for it, and its
    group (in summer, all of them) was INTERNAL_ERROR "not run". Said before
    compute; a named zone's folders are those the same process had."""
    tz = getattr(dtype, "tz", None)
    if type(tz).__module__.startswith("dateutil") and type(tz).__name__ in ("tzlocal", "tzwinlocal"):
        raise InvalidArgumentError(
            f"partition_by/by column {column!r} is in the time zone {tz!r}, which is the local zone of "
            f"each process that reads it: the client's and the workers' may differ, and so would the "
            f"folders of its groups; convert it to a named zone first, e.g. "
            f"ddf[{column!r}] = ddf[{column!r}].dt.tz_convert('UTC') (or your zone's name, such as "
            f"'Europe/Paris', which keeps the folders of runs made in that zone)"
        )


def _not_a_column_name(value: Any, ddf: dd.DataFrame) -> str | None:
    """Why ``value``, which pandas' groupby takes as ``by`` (a Series of
    values, a function of the index, a ``pd.Grouper``), is refused here, and
    what to do instead; None for anything else. Said before compute: a Dask
    Series was called "not in the dataframe", printed whole, and a function
    or a Grouper the same, which said nothing of what to do."""
    if isinstance(value, (pd.Series, dd.Series, dd.Index)):
        name = value.name
        itself = ""
        try:
            if name is not None and name in ddf.columns:
                itself = f"; to group by the column {name!r} as it is, pass by={name!r}"
        except TypeError:  # a name that cannot be hashed
            pass
        return (
            f"partition_by/by takes column names, not a Series of group values (got a "
            f"{type(value).__module__.split('.')[0]} {type(value).__name__} named {name!r:.80}): add it to the dataframe as a "
            f"column and name that column: ddf = ddf.assign(group=<the Series>), then by='group'{itself}"
        )
    try:
        if value in ddf.columns:
            return None  # a column's label, whatever its type
    except TypeError:  # cannot be hashed: check_by says so
        return None
    if isinstance(value, pd.Grouper):
        key, freq = getattr(value, "key", None), getattr(value, "freq", None)
        freq = getattr(freq, "freqstr", freq)
        column = key if key is not None else "date"  # without a key, pandas bins the index: a column here
        if freq is not None:
            what = (
                f"add its bins as a column and name that column, e.g. for monthly groups ddf = "
                f"ddf.assign(month=ddf[{column!r}].dt.to_period('M').dt.start_time), then by='month'"
            )
        else:
            what = f"pass by={column!r}"
        given = ", ".join(f"{name}={setting!r}" for name, setting in (("key", key), ("freq", freq)) if setting is not None)
        return f"partition_by/by takes column names, not a pd.Grouper (got pd.Grouper({given})): {what}"
    if callable(value) and not isinstance(value, (str, bytes, type)):
        return (
            f"partition_by/by takes column names, not a function (got {getattr(value, '__qualname__', value)!r:.80}): "
            f"pandas calls one on each index label; add its values as a column and name that column: ddf = "
            f"ddf.assign(group=ddf.index.to_series().map(func)), then by='group'"
        )
    return None


def index_as_column(ddf: dd.DataFrame, by: Any) -> dd.DataFrame:
    """A named index becomes a column, so that ``by`` can name it (as after
    ``ddf.set_index(key)``) and each group's frame keeps it (the engine
    hands groups over with a plain RangeIndex; a pandas user's
    ``groupby().apply`` would have seen it as the index). An unnamed index
    is dropped, as ``DataFrame.to_parquet`` drops it.

    Partition by partition: the partitioning that ``set_index`` made is
    kept, so the run needs no shuffle. An index named like a column
    (``set_index(key, drop=False)``) loses its name, which pandas would
    otherwise call ambiguous.
    """
    index_name = ddf.index.name
    if index_name is None:
        return ddf
    if index_name in ddf.columns:
        return ddf.map_partitions(lambda df: df.rename_axis(index=None), token="manymodel-unname-index")
    return ddf.reset_index()


def persisted_under_index_as_column(given: dd.DataFrame, ddf: dd.DataFrame) -> tuple[list | None, str | None]:
    """When ``ddf`` is ``index_as_column(given)`` and ``given`` is persisted
    (``ddf.set_index(key).persist()``, the docs' way to skip the shuffle):
    ``given``'s partition futures and what the run's own tasks do to each
    to make ``ddf``'s partition (:func:`frame_index_as_column`); else
    ``(None, None)``.

    Persisted again as ``ddf``, the run held a second copy of the input
    for as long as it went on (twice its bytes in the workers' memory
    accounting), and its tasks read that copy, not the partitions the user
    had persisted."""
    if ddf is given:
        return None, None
    partitions = persisted_partitions(given)
    if partitions is None:
        return None, None
    return partitions, "unname" if given.index.name in given.columns else "reset"


def frame_index_as_column(df: pd.DataFrame, how: str | None) -> pd.DataFrame:
    """One partition as :func:`index_as_column` makes it (Dask's
    ``reset_index`` is pandas' on each partition): ``how`` is ``"reset"``,
    ``"unname"`` or None (the partition as it is)."""
    if how == "reset":
        return df.reset_index()
    if how == "unname":
        return df.rename_axis(index=None)
    return df


def check_reserved_columns(ddf: dd.DataFrame) -> None:
    """Column names with our prefix would be overwritten by (or clash with)
    the engine's own columns while it counts and shuffles."""
    taken = [c for c in ddf.columns if str(c).startswith(RESERVED_PREFIX)]
    if taken:
        raise InvalidArgumentError(
            f"column {taken[0]!r} starts with {RESERVED_PREFIX!r}, which dask_manymodel keeps for the "
            f"columns it adds while it counts and shuffles; rename it (ddf.rename(columns=...))"
        )


def check_meta(meta: Any, by: list) -> tuple[pd.DataFrame | None, pa.Schema | None]:
    """A predict's ``meta=`` as an empty DataFrame (what Dask's ``meta=``
    takes: a DataFrame, a dict or list of (column, dtype)), and the arrow
    types its groups' output files are written in: those of meta's columns
    outside ``by`` that have one (an empty object column has none)."""
    if meta is None:
        return None, None
    from dask.dataframe.utils import make_meta

    if not isinstance(meta, pd.DataFrame):
        try:
            made = make_meta(_str_as_a_string_type(meta)) if isinstance(meta, (dict, list, tuple)) else None
        except Exception:  # Dask's own message is about its internals
            made = None
        if not isinstance(made, pd.DataFrame):
            raise InvalidArgumentError(
                f"meta must describe the output frame: an empty pandas DataFrame, or a dict or "
                f"list of (column, dtype) such as {{'prediction': 'f8'}}; got {type(meta).__name__} {meta!r:.80}"
                f"{_unknown_dtype(meta)}"
            )
        meta = made
    meta = meta.iloc[:0]
    if not all(isinstance(column, str) for column in meta.columns):
        # the output's columns are its files', which parquet names by text:
        # meta's 1 is the column "1" (kept as 1, it matched none and was
        # nulls in every row, and a by column 0 came twice)
        names = [str(column) for column in meta.columns]
        if len(set(names)) != len(names):
            raise InvalidArgumentError(
                f"meta's columns {list(meta.columns)!r:.200} are named by text in the output (parquet's "
                f"names), where some are one name; rename them so that each has a text of its own"
            )
        meta = meta.set_axis(names, axis=1)
    by_names = {str(column) for column in by}
    if all(column in by_names for column in meta.columns):
        # the output is read back with meta's columns: meta={} (or [], or
        # pd.DataFrame()) gave a SUCCESS run whose to_dask_dataframe() held
        # the by columns alone, every returned column left out
        raise InvalidArgumentError(
            f"meta {meta.columns.tolist()!r:.200} names no column besides the by columns {by!r:.200}, and the "
            f"output is read back with meta's columns only; give the returned frame's columns and dtypes, "
            f"e.g. meta={{'prediction': 'f8'}}, or leave meta=None to take them from the groups' output; "
            f"nothing is written"
        )
    try:
        schema = pa.Schema.from_pandas(meta.drop(columns=[c for c in meta.columns if c in by_names]),
                                       preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"meta has a column pyarrow cannot store: {exc}") from None
    typed = [field for field in schema if _has_a_type(field.type)]
    # the schema's pandas metadata too: a cast column's entry is taken from it
    return meta, pa.schema(typed, metadata=schema.metadata) if typed else None


def _unknown_dtype(meta: Any) -> str:
    """For a dict or list meta, which column's dtype pandas does not know
    (``{'pred': 'float'}`` is fine, ``{'pred': 'flaot'}`` is not), as the end
    of the message: in a meta of many columns, "got dict {...}" cut at 80
    characters did not show the one to fix."""
    try:
        pairs = list(meta.items()) if isinstance(meta, dict) else [tuple(pair) for pair in meta]
    except (TypeError, ValueError):
        return ""
    for pair in pairs:
        if len(pair) != 2:
            return ""
        column, dtype = pair
        try:
            pd.api.types.pandas_dtype(dtype)
        except (TypeError, ValueError) as exc:
            return f": column {column!r} has dtype {dtype!r:.80}, which pandas does not know ({exc})"
    return ""


def _str_as_a_string_type(meta: Any) -> Any:
    """On pandas 2, a dict or list meta's ``"str"`` (or ``str``) as
    ``string[pyarrow]``, as Dask makes pandas 2's strings (pandas 3's
    ``str`` holds NaN for a missing value, this pd.NA). Pandas 2 makes it
    an object column, which has no arrow type: a group whose values were
    all None wrote arrow's null type beside the others' strings, and the
    output could not be read as one dataset."""
    if int(pd.__version__.split(".")[0]) >= 3:
        return meta

    def as_string(dtype: Any) -> Any:
        return "string[pyarrow]" if dtype is str or (isinstance(dtype, str) and dtype == "str") else dtype

    if isinstance(meta, dict):
        return {column: as_string(dtype) for column, dtype in meta.items()}
    if all(isinstance(item, tuple) and len(item) == 2 for item in meta):
        return type(meta)((column, as_string(dtype)) for column, dtype in meta)  # a tuple stays one
    return meta


def _has_a_type(arrow_type: pa.DataType) -> bool:
    """Whether meta says something about a column's values: an empty object
    column (arrow's null type), or an empty ``category`` with no categories
    yet, does not."""
    if pa.types.is_dictionary(arrow_type):
        return not pa.types.is_null(arrow_type.value_type)
    return not pa.types.is_null(arrow_type)


def check_on_existing(value: Any, allowed: Sequence[str] = ON_EXISTING) -> str:
    if value not in allowed:
        raise InvalidArgumentError(
            f"on_existing_artifacts={value!r} is not one of {', '.join(map(repr, allowed))}"
        )
    return value


def check_serde(serde: Any) -> ModelSerde:
    if serde is None:
        return PickleSerde()
    if not isinstance(serde, ModelSerde):
        raise InvalidArgumentError(
            f"serde must be a ModelSerde instance (e.g. PickleSerde()), got {serde!r}"
        )
    check_filename(serde)
    return serde


def object_columns_not_text(frame: pd.DataFrame) -> list[int]:
    """The positions of the columns of Python objects that hold something
    other than text (lists, arrays, bytes, numbers among strings); one scan
    of each column of objects."""
    return [
        i for i in range(frame.shape[1])
        if frame.dtypes.iloc[i] == object
        and pd.api.types.infer_dtype(frame.iloc[:, i], skipna=True) not in ("string", "empty")
    ]


def as_dask_dataframe(
    dataframe: Any, objects_as: Callable[[pd.DataFrame, list[int]], pd.DataFrame] | None = None,
) -> dd.DataFrame:
    """Accept a Dask DataFrame, or a pandas one (split into a few partitions).

    ``objects_as(frame, positions)``, if given, converts a pandas frame's
    columns of Python objects other than text (found once, here) before it
    goes to Dask (FileSet.make: to pyarrow lists and binary); without it
    they stay objects (a run's groups get them as they are)."""
    if isinstance(dataframe, dd.DataFrame):
        return dataframe
    if isinstance(dataframe, pd.DataFrame):
        if isinstance(dataframe.index, pd.MultiIndex):
            # Dask has no MultiIndex (from_pandas failed on one: "isna is not
            # defined for MultiIndex"), and a frame from groupby(...).agg() or
            # a pivot has one: as a named index does (index_as_column), its
            # named levels become columns that by can name; unnamed ones, and
            # those named like a column, are dropped
            named = [name for name in dataframe.index.names if name is not None and name not in dataframe.columns]
            if len(set(named)) != len(named):
                raise InvalidArgumentError(
                    f"the dataframe's MultiIndex names levels {list(dataframe.index.names)!r}, one of them twice; "
                    f"rename them (df.index = df.index.set_names([...])) or reset_index() the frame first"
                )
            levels = dataframe.index.nlevels
            dataframe = dataframe.reset_index(level=named) if named else dataframe
            if len(named) < levels:
                dataframe = dataframe.reset_index(drop=True)
        # Dask's dataframe.convert-string (on by default) makes every object
        # column text as it takes a frame in: a column of arrays or lists
        # (embeddings; Snowpark's ARRAY columns) reached the groups as
        # "[0.  0.5]", a mixed one's 1 as "1". Such columns stay as they are
        objects = object_columns_not_text(dataframe)
        if objects and objects_as is not None:
            dataframe, objects = objects_as(dataframe, objects), []
        keep = bool(objects)
        with dask.config.set({"dataframe.convert-string": False}) if keep else contextlib.nullcontext():
            return dd.from_pandas(dataframe, npartitions=max(1, min(8, len(dataframe) // 100_000 + 1)))
    raise InvalidArgumentError(
        f"dataframe must be a dask.dataframe.DataFrame or pandas.DataFrame, "
        f"got {type(dataframe).__name__}"
    )


def check_reachable(store: RunStore) -> None:
    """Fail now, not after the count (or inside a task), when the URL cannot
    be reached or cannot hold the run: a missing bucket, a file where a
    folder must be, a local folder that cannot be written."""
    try:
        _check_can_hold_run(store)
    except InvalidURLError:
        raise
    except Exception as exc:  # any backend error: credentials, DNS, permissions
        raise InvalidURLError(
            f"cannot reach {store.url_shown!r}: {type(exc).__name__}: {exc}; check the URL "
            f"and storage_options"
        ) from exc


def _check_can_hold_run(store: RunStore) -> None:
    fs = store.fs
    url = store.url_shown
    # the nearest folder that exists at or above the URL's
    path = store.base
    while True:
        try:
            info = fs.info(path)
            break
        except FileNotFoundError:
            parent = fs._parent(path)
            if parent in ("", path):  # the top, and nothing exists on the way
                if store.is_local or store.is_in_memory:
                    return
                if fs.exists(path):  # an empty bucket: s3fs before 2025.10 has no info() of it
                    return
                raise InvalidURLError(
                    f"cannot write to {url!r}: {shown_url(path)!r} does not exist; an object store's "
                    f"bucket must exist before anything is written there (create it, or check the URL)"
                ) from None
            path = parent
    if info["type"] != "directory":
        raise InvalidURLError(f"cannot write to {url!r}: {shown_url(path)!r} is a file, not a folder")
    if store.is_local:
        _check_local_folder_writable(fs._strip_protocol(path), url)
    if path == store.base:  # the run's own folder, where it exists, must be a folder too
        try:
            if fs.info(store.root)["type"] != "directory":
                raise InvalidURLError(
                    f"cannot write run {store.run_id!r} to {url!r}: {shown_url(store.root)!r} is a file, not a "
                    f"folder"
                )
        except FileNotFoundError:
            pass


def _check_local_folder_writable(folder: str, url: str) -> None:
    """Refuse a local ``folder`` (the nearest that exists at or above the
    URL's) in which the run's folders cannot be made. ``os.access`` reads the
    permission bits, which root passes everywhere: /proc and /sys take no new
    folder from anyone (ENOENT, EPERM), and a run there failed only after the
    count, with the bare FileNotFoundError of its folder's creation. So a
    folder is made there, and removed at once."""
    if not os.access(folder, os.W_OK):
        raise InvalidURLError(
            f"cannot write to {url!r}: the folder {folder!r} is not writable here (permissions, "
            f"or a read-only disk)"
        )
    probe = posixpath.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-can-hold-runs")
    try:
        os.mkdir(probe)
    except OSError as exc:
        raise InvalidURLError(
            f"cannot write to {url!r}: no folder can be made in {folder!r} here ({exc.strerror or exc}); "
            f"give a folder on a disk that can be written (not /proc or /sys)"
        ) from exc
    os.rmdir(probe)


def check_workers_share_store(store: RunStore, client: distributed.Client) -> int | None:
    """memory:// lives inside one process: worker processes would each write
    into their own copy, invisible to the client. A local folder lives on
    one machine: see :func:`check_workers_see_local_folder`, whose count of
    workers asked this returns for one."""
    if store.is_local:
        return check_workers_see_local_folder(store, client)
    if not store.is_in_memory:
        return None
    worker_pids = set(client.run(os.getpid).values())
    if worker_pids - {os.getpid()}:
        raise InvalidURLError(
            f"{store.url_shown!r} is in-memory and private to each process, but the cluster's "
            f"workers run in other processes; use a local folder or object store URL, or "
            f"LocalCluster(processes=False)"
        )
    return None


def check_workers_see_local_folder(store: RunStore, client: distributed.Client) -> int:
    """A local folder of the client that the workers do not see (they run on
    other machines, in other pods or containers, and the folder is no disk
    they share at the same path): the client wrote the run's manifest on its
    disk, the tasks found none on theirs, and every group ended CANCELLED,
    "run 'r1' was deleted from ... while it ran". A FileSet's files went to
    the workers' disks, and its manifest listed none. Asked here with a
    marker file, before anything is written; a worker that cannot answer
    (closing) is not counted. Returns how many workers were asked: none
    on a cluster still scaling up, whose run asks again after its count."""
    fs = store.fs
    folder = store.base  # the nearest folder that exists, at or above the URL's
    while not os.path.isdir(folder):
        parent = fs._parent(folder)
        if parent in ("", folder):
            return 0
        folder = parent
    marker = posixpath.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-seen-by-the-workers")
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except OSError:
        return 0  # not writable here: check_reachable has said so, or the run's writes will
    try:
        seen = client.run(os.path.exists, marker, on_error="return")
    finally:
        with contextlib.suppress(OSError):
            os.remove(marker)
    blind = sorted(worker for worker, answer in seen.items() if answer is False)
    if blind:
        raise InvalidURLError(
            f"{store.url_shown!r} is a local folder, and {len(blind)} of the {len(seen)} workers "
            f"({', '.join(blind[:3])}{', ...' if len(blind) > 3 else ''}) do not see {folder!r} as this "
            f"process does: they run on other machines or in other containers (or may not read it). "
            f"Use a URL every worker reaches (s3://, gs://, abfs://) or a shared file system mounted at "
            f"the same path on the client and every worker; nothing was written"
        )
    return len(seen)


# ((worker address, worker process id), module) pairs found importable, per
# client: each worker process is asked once, and only what a run needs that
# it was not asked before
_found_on_workers: "weakref.WeakKeyDictionary[distributed.Client, set[tuple[tuple[str, str], str]]]" = (
    weakref.WeakKeyDictionary()
)


def _worker_processes(client: distributed.Client) -> dict[str, str]:
    """Each worker's address and the id of its process (the scheduler's
    ``WorkerState.server_id``, new each time a worker starts): a worker
    restarted at the same address (a fixed ``--worker-port``, a container
    restarted in its pod) is another process, perhaps in another image.
    Where the scheduler runs no client functions, the address only."""
    try:
        # a local lambda travels by value: the scheduler need not have dask_manymodel
        return client.run_on_scheduler(
            lambda dask_scheduler: {address: ws.server_id for address, ws in dask_scheduler.workers.items()}
        )
    except Exception:
        logger.debug("could not ask the scheduler for its workers' ids", exc_info=True)
        return {address: address for address in client.nthreads()}


def check_workers_environment(client: distributed.Client, serde: ModelSerde | None = None) -> None:
    """Fail before anything runs or is written when the workers lack
    dask_manymodel, or a module the run's serde needs (torch for
    TorchSerde); warn when they have another dask_manymodel than the client.

    A worker without dask_manymodel cannot even unpickle the run's tasks:
    Dask then closes its connection, the worker goes, and the run waited for
    ever with no word of why. Without torch, every group trained, then failed
    to save its model. Workers that join later are asked by the next run.
    """
    from . import __version__

    processes = _worker_processes(client)
    modules = ["dask_manymodel", *getattr(serde, "_needs", ())]
    found = _found_on_workers.setdefault(client, set())
    # forget the workers that left (or were restarted), so that an elastic
    # cluster's comings and goings over days do not pile up addresses here
    found -= {(worker, module) for worker, module in found if processes.get(worker[0]) != worker[1]}
    to_ask = sorted({
        address for address, process in processes.items() for module in modules
        if ((address, process), module) not in found
    })
    if not to_ask:
        return

    def what_is_there(modules: list[str]) -> dict[str, str | None]:
        # defined in here, so that it travels by value: it runs where
        # dask_manymodel may be missing. Per module its version ("" when it
        # has none), or None when it is not there; dask_manymodel is
        # imported, as a task would (a missing dependency of it fails too)
        import importlib
        import importlib.util

        there: dict[str, str | None] = {}
        for name in modules:
            try:
                if name == "dask_manymodel":
                    there[name] = str(importlib.import_module(name).__version__)
                else:
                    there[name] = "" if importlib.util.find_spec(name) is not None else None
            except Exception as exc:
                there[name] = None
                there[f"{name} error"] = f"{type(exc).__name__}: {exc}"
        return there

    try:
        answers = client.run(what_is_there, modules, workers=to_ask, on_error="return")
    except Exception:  # a cluster that runs no client functions: the tasks find out
        logger.debug("could not ask the workers what they have installed", exc_info=True)
        return
    answers = {worker: answer for worker, answer in answers.items() if isinstance(answer, dict)}
    for module in modules:
        lacking = sorted(worker for worker, answer in answers.items() if answer.get(module) is None)
        if lacking:
            first = answers[lacking[0]]
            why = first.get(f"{module} error", f"ModuleNotFoundError: No module named '{module}'")
            needs = (
                f"dask_manymodel {__version__}, the version of this client"
                if module == "dask_manymodel"
                else f"{module}, which {type(serde).__name__} reads and writes models with"
            )
            raise MissingDependencyError(
                f"{module} cannot be imported on {len(lacking)} of the cluster's {len(processes)} "
                f"worker(s) ({lacking[0]}: {why}). Every worker needs {needs}: install it in the "
                f"workers' environment (their image), not only on this client; "
                f"client.get_versions(packages=[{module!r}]) lists each worker's. Nothing is written"
            )
    others = sorted(
        {answer["dask_manymodel"] for answer in answers.values() if answer.get("dask_manymodel") != __version__}
    )
    if others:
        warnings.warn(
            f"the workers have dask_manymodel {', '.join(others)}, this client {__version__}: a run's tasks "
            f"may fail or misbehave on the workers; install the same version on the client and the workers",
            UserWarning,
            stacklevel=user_stack_level(),
        )
    found.update(((worker, processes[worker]), module) for worker in answers for module in modules)


def send_spec(spec: "RunSpec", client: distributed.Client) -> distributed.Future:
    """Make the run's spec a task of the cluster; returns its future.

    A task, not scattered data: the scheduler keeps its bytes and computes
    it again if every worker holding it is lost (a group that kills its
    worker on each try), where scattered data would be gone for good and
    every task of the run cancelled with it.

    A spec that cannot be pickled (most often a function that refers to a
    lock, an open file or a connection) fails here with an error that says
    which part could not be, instead of Dask's "Could not serialize object
    of type RunSpec". Whether the workers can load it is checked by
    :func:`check_spec_loads`.
    """
    try:
        payload = cloudpickle.dumps(spec)
    except Exception as exc:
        culprit = _unpicklable_part(spec)
        if culprit is None:
            raise
        what, advice, error = culprit
        raise InvalidArgumentError(
            f"the {what} cannot be sent to the workers: pickling it failed with "
            f"{type(error).__name__}: {error}. {advice}"
        ) from exc
    what = describe_function(spec.func, spec.kind)
    return client.submit(load_run_spec, payload, what, key=f"manymodel-spec-{spec.submission}", pure=False)


def load_run_spec(payload: bytes, what: str = "function") -> "SentSpec":
    """The task that loads the run's pickled spec (on one worker: an error
    here is the run's, see :func:`check_spec_loads`); its tasks share it."""
    sent = SentSpec(payload, what)
    sent.load()
    return sent


class SentSpec:
    """The run's spec as the workers hold it: loaded once per worker by the
    first task there, and passed from worker to worker as its pickled bytes.

    Passed on as a RunSpec, a worker that lacked a module of the function
    (the others had it) failed to unpickle it inside Dask's own transfer:
    Dask logged it on the worker and the run's tasks there waited for ever.
    As bytes, the task itself fails, with the error that says what to do.
    """

    def __init__(self, payload: bytes, what: str):
        self._payload = payload
        self._what = what  # the function, as the error names it
        self._spec: RunSpec | None = None
        self._lock = threading.Lock()

    def __reduce__(self):
        return type(self), (self._payload, self._what)

    def load(self) -> "RunSpec":
        with self._lock:
            if self._spec is None:
                try:
                    self._spec = pickle.loads(self._payload)
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    if any(sign in text for sign in _CANNOT_LOAD_SIGNS):
                        raise InvalidArgumentError(
                            f"the {self._what} (or its serde) cannot be loaded on the workers: {text}. "
                            f"The workers need every module it refers to: install it there, send a single "
                            f"file with client.upload_file(path), or send the module's code along with the "
                            f"function: cloudpickle.register_pickle_by_value(module)"
                        ) from exc
                    raise
            return self._spec


def check_spec_loads(spec_future: distributed.Future) -> None:
    """Wait until a worker has loaded the spec; one that the workers cannot
    unpickle (a module the client has and they lack) fails with an error
    that says what to do (:meth:`SentSpec.load`'s), before anything is
    written; any other error is the cluster's own, raised as it is."""
    distributed.wait(spec_future)
    if spec_future.status == "error":
        raise spec_future.exception()


# what a worker's failure to unpickle a function looks like in the text Dask relays
_CANNOT_LOAD_SIGNS = ("ModuleNotFoundError", "ImportError", "Can't get attribute")


def _unpicklable_part(spec: "RunSpec") -> tuple[str, str, Exception] | None:
    """The first part of ``spec`` that cloudpickle refuses: (its name for the
    user, what to do, the error)."""
    parts = [
        (describe_function(spec.func, spec.kind), spec.func,
         "It, or something it refers to (a global or a variable of an enclosing function), cannot be "
         "pickled; create such objects (locks, open files, connections, clients) inside the function instead"),
        (f"serde {type(spec.serde).__name__}", spec.serde,
         "Keep only picklable attributes on the serde; create the others when it reads or writes"),
        (f"storage at {spec.store.url_shown!r} (its storage_options)", spec.store,
         "Pass storage_options that pickle (strings, numbers, dicts): fsspec sends them to every worker"),
    ]
    for what, part, advice in parts:
        try:
            cloudpickle.dumps(part)
        except Exception as error:
            return what, advice, error
    return None


def warn_if_no_worker_offers(resources: dict | None, client: distributed.Client) -> None:
    """Warn when no worker of the cluster offers ``resources`` now: Dask holds
    tasks that need them, without a word, until such a worker joins, so the
    run would wait for ever on a cluster that will have none. A warning, not
    an error: on a cluster that scales, such workers may join later."""
    if not resources:
        return
    offered = workers_resources(client)
    if offered is None or some_worker_offers(resources, offered):
        return
    theirs = sorted({f"{name}={amount}" for worker in offered for name, amount in worker.items()})
    warnings.warn(
        f"no worker of the cluster offers resources={resources!r} now (its {len(offered)} worker(s) offer "
        f"{', '.join(theirs) or 'no resources'}); the run's tasks wait until a worker that does joins. "
        f"Start such workers (dask worker ... --resources \"GPU=1\"), or leave resources out of "
        f"ExecutionOptions",
        UserWarning,
        stacklevel=user_stack_level(),
    )


def warn_if_no_workers(client: distributed.Client) -> None:
    """Warn when the cluster has no worker now and its cluster object asks
    for none: the run's first step (counting the groups) waits, inside
    ``train()``, before any handle exists, until a worker joins, without a
    word. A warning, not an error: a worker may be started by hand, or by a
    cluster this process cannot see (a client connected by address)."""
    if client.nthreads():
        return
    cluster = getattr(client, "cluster", None)
    asked = "none are asked for"
    if cluster is None:
        asked = "this client (connected by address) cannot see whether any are asked for"
    else:
        plan = _workers_asked_for(cluster)
        if plan is None:
            # (dask-kubernetes' KubeCluster has neither plan nor workers: said
            # "none are asked for" after its scale(10), its pods pending)
            asked = f"its {type(cluster).__name__} does not say whether any are asked for"
        elif plan[0] or plan[1] is not None:
            return  # workers asked for (scale(n), adapt): they are on their way
    warnings.warn(
        f"the cluster ({client.scheduler.address}) has no workers, and {asked}; the run waits "
        f"(this call does not return) until a worker joins. Start workers (cluster.scale(2), "
        f"cluster.adapt(minimum=1, maximum=...), or dask worker <scheduler address>); nothing of the run "
        f"is written before then",
        UserWarning,
        stacklevel=user_stack_level(),
    )


def workers_resources(client: distributed.Client) -> list[dict] | None:
    """Every worker's resources, asked of the scheduler (``scheduler_info``
    lists only the first few in newer distributed); None if it would not say."""
    try:
        # a local lambda travels by value: the scheduler need not have dask_manymodel
        return client.run_on_scheduler(
            lambda dask_scheduler: [dict(ws.resources) for ws in dask_scheduler.workers.values()]
        )
    except Exception:  # a scheduler that runs no client functions
        logger.debug("could not ask the scheduler for its workers' resources", exc_info=True)
        return None


def some_worker_offers(resources: dict, offered: list[dict]) -> bool:
    """Whether one of the workers' ``offered`` resources covers ``resources``."""
    return any(all(worker.get(name, 0) >= amount for name, amount in resources.items()) for worker in offered)


def run_exists(store: RunStore, likely: bool = False) -> bool:
    """Whether ``url/run_id`` holds anything (the run exists), from one
    listing; refuses a folder that holds files but no ``_run.json``: not a
    run (another tool's files, a FileSet, or a folder named by mistake:
    ``url="~", run_id="Documents"``). An overwrite deletes the folder's
    contents, and deleted them all; the "already exists" error advised
    that overwrite."""
    store.fs.invalidate_cache(store.root)
    # ``likely`` (an overwrite): its _run.json, asked for alone; listing the
    # folder lists every group's (a page of 1,000 a request on S3), and the
    # overwrite lists it all again to delete it (RunStore.delete_run). Not
    # for a first start: where nothing is there, one listing says so
    if likely and store.exists(store.path(RUN_MANIFEST)):
        return True
    try:
        names = [posixpath.basename(name.rstrip("/")) for name in store.fs.ls(store.root, detail=False)]
    except FileNotFoundError:
        return False
    if RUN_MANIFEST in names:
        return True
    # (the temp file of a _run.json whose writer was killed is a run's own)
    others = sorted(name for name in names if not name.startswith(TEMP_PREFIX))
    if others:
        _refuse_a_fileset(store)  # a FileSet's folder: saying so
        shown = ", ".join(repr(name) for name in others[:3]) + (", ..." if len(others) > 3 else "")
        raise RunExistsError(
            f"{store.display()} holds files ({shown}) but no {RUN_MANIFEST}: it is not a run of "
            f"dask_manymodel (another tool's files, a FileSet, or a folder named by mistake), and "
            f"on_existing_artifacts never deletes or writes into one. Choose another run_id or url, or "
            f"remove the folder yourself if it is meant to go; nothing was written"
        )
    return bool(names)


# --------------------------------------------------------------------------
# assignment of groups to output partitions


def planned_threads(client: distributed.Client) -> int:
    """The worker threads the run's tasks are sized for: those of the
    workers there now, or of the workers the cluster is to have, if more.

    A cluster that scales has few workers when a run starts: ``scale(20)``
    was just called and the workers are still starting (a batch job waits in
    its queue), or ``adapt(minimum=1, maximum=20)`` starts one. Sized for the
    workers present, the run had 4 tasks for 20 workers: 16 idled (adaptive
    scaling asks for no more workers than there are tasks), and the tasks
    ran where their input was, one worker running three of them. The cluster
    object (``client.cluster``: a LocalCluster, dask-jobqueue's or
    dask-kubernetes' SpecCluster) says how many workers it asked for, and an
    adaptive one its finite maximum; they are counted with the threads of
    the workers present. A client connected by address has no cluster object:
    the workers present."""
    nthreads = client.nthreads()
    present = sum(nthreads.values())
    cluster = getattr(client, "cluster", None)
    plan = _workers_asked_for(cluster) if cluster is not None else None
    planned = 0
    if plan is not None:  # (a cluster class that cannot say: the workers present only)
        planned, maximum = plan
        if maximum is not None and not math.isinf(maximum):
            planned = max(planned, int(maximum))
    per_worker = present / len(nthreads) if nthreads else 1
    return max(present, round(planned * per_worker), 1)


def _workers_asked_for(cluster: Any) -> tuple[int, float | None] | None:
    """How many workers the cluster object has asked for (``scale(n)``: its
    ``plan``) and, while it adapts, its maximum (maybe inf); None when it
    cannot say (a cluster class of its own, dask-kubernetes' KubeCluster)."""
    try:
        adaptive = getattr(cluster, "_adaptive", None)
        adapting = adaptive is not None and getattr(adaptive, "state", None) in ("starting", "running")
        maximum = (math.inf if adaptive.maximum is None else adaptive.maximum) if adapting else None
        return len(cluster.plan), maximum
    except Exception:
        logger.debug("could not ask the cluster which workers it plans", exc_info=True)
        return None


def default_npartitions(threads: int, n_groups: int) -> int:
    """About four tasks per worker thread: enough to balance, few enough to be cheap."""
    return max(1, min(n_groups, 4 * threads))


_ROWS, _PARTS, _HOME = "__manymodel_rows__", "__manymodel_parts__", "__manymodel_home__"
# a group's estimated bytes in memory (its rows times its partitions' bytes per row)
_BYTES = "__manymodel_bytes__"


_COUNT_FAN_IN = 16  # count frames combined per task
# how per-partition counts combine into one row per group
_COUNT_AGG = {_ROWS: "sum", _PARTS: "sum", _HOME: "min", _BYTES: "sum"}


def persisted_partitions(ddf: dd.DataFrame) -> list[distributed.Future] | None:
    """The futures of ``ddf``'s partitions, in order, when it is nothing but
    persisted partitions (``ddf = ddf.persist()``); None when some partition
    is still to be computed.

    A run reads such a frame's futures as they are: persisting it again
    puts one alias task per partition in front of every task that reads
    it, and another message to the scheduler. In W2 (benchmarks/), the
    run's first tasks then started 20-35 ms later and some first fetched a
    partition from the other worker: whole runs took 7-14% longer.
    """
    try:  # dask's own classes; with another dask, the run persists as before
        from dask._task_spec import Alias
        from dask.dataframe.dask_expr.io.io import FromGraph
    except ImportError:
        return None
    if not isinstance(getattr(ddf, "expr", None), FromGraph):
        return None  # lazy: do not build its graph twice
    graph = ddf.__dask_graph__()
    futures = []
    for key in ddf.__dask_keys__():
        node = graph.get(key)
        while isinstance(node, Alias):
            node = graph.get(node.target)
        if not isinstance(node, distributed.Future):
            return None
        futures.append(node)
    return futures


# why a frame's persisted partitions can be gone for good, said where a
# start is refused for it and where a run's groups were lost for it
INPUT_GONE = (
    "the dataframe's persisted partitions are gone from the cluster (client.restart() drops every persisted "
    "partition, and a worker that dies takes those it held), and it holds nothing to compute them again from "
    "(persisting it again persists the same gone partitions)"
)


def persisted_input_gone(ddf: dd.DataFrame) -> bool:
    """Whether ``ddf`` is persisted and some of its partitions are gone from
    the cluster for good (Dask cancelled their futures)."""
    partitions = persisted_partitions(ddf)
    return bool(partitions) and any(future.cancelled() for future in partitions)


def _sorted_futures(ddf: dd.DataFrame) -> list[distributed.Future]:
    # the persisted keys are those of the lowered graph, (name, i) for i in 0..n-1
    return sorted(distributed.futures_of(ddf), key=lambda future: future.key[1])


def count_groups(ddf: dd.DataFrame, by: list, client: distributed.Client) -> pd.DataFrame:
    """One pass over the (persisted) input: per group its rows, how many
    input partitions hold some of them, and the first of those partitions.

    The result is indexed by the group keys (like ``groupby(by).size()``).
    See :func:`submit_count`, which this waits for.
    """
    return submit_count(ddf, by, client).result()


def submit_count(
    ddf: dd.DataFrame, by: list, client: distributed.Client, partitions: list[distributed.Future] | None = None,
    with_bytes: bool = True, index_to_column: str | None = None,
) -> distributed.Future:
    """Start :func:`count_groups` on the workers; returns the future of its result,
    so that the client can do other work (send the run's spec) meanwhile.

    One task per input partition, then combined 16 at a time on the
    workers: the same answer as ``map_partitions(...).groupby(by).agg(...)``
    in about half the time, which matters on small runs (``python
    benchmarks/bench_workloads.py count``: 0.13 s -> 0.07 s for 2,000 groups
    in 8 partitions, 0.21 s -> 0.13 s for 200,000). ``with_bytes``: each
    group's estimated bytes too, for the memory guard (a deep size of every
    partition: costly only for columns of Python objects).
    ``index_to_column``: ``partitions`` are those of the persisted frame
    under ``ddf``, made ``ddf``'s by :func:`frame_index_as_column`.
    """
    if partitions is None:
        partitions = persisted_partitions(ddf)
    if partitions is None:  # not persisted: count through Dask's own graph
        return _count_groups_graph(ddf, by, client, with_bytes)
    name = f"manymodel-count-{uuid.uuid4().hex}"
    counts = client.map(
        _count_partition, partitions, [by] * len(partitions), range(len(partitions)),
        [with_bytes] * len(partitions), [index_to_column] * len(partitions),
        key=[(name, number) for number in range(len(partitions))],
    )
    level = 0
    while True:
        final = len(counts) <= _COUNT_FAN_IN
        level += 1
        counts = [
            client.submit(
                _combine_counts, counts[first:first + _COUNT_FAN_IN], by, final,
                key=(f"{name}-combine-{level}", first),
            )
            for first in range(0, len(counts), _COUNT_FAN_IN)
        ]
        if final:
            return counts[0]


def _count_partition(
    df: pd.DataFrame, by: list, number: int, with_bytes: bool = True, index_to_column: str | None = None
) -> pd.DataFrame:
    df = frame_index_as_column(df, index_to_column)
    sizes = df.groupby(by, dropna=False, observed=True, sort=False).size()
    out = _object_keys_stay_object(sizes.rename(_ROWS).reset_index(), df, by)
    out[_PARTS] = 1
    out[_HOME] = number
    # for the memory guard of a run that shuffles (see _too_big_to_shuffle)
    per_row = _frame_bytes(df) / len(df) if len(df) and with_bytes else 0.0
    out[_BYTES] = out[_ROWS] * per_row
    return out


def _combine_counts(frames: list[pd.DataFrame], by: list, final: bool) -> pd.DataFrame:
    together = pd.concat(frames, ignore_index=True)
    counts = together.groupby(by, dropna=False, observed=True).agg(_COUNT_AGG)
    return counts if final else _object_keys_stay_object(counts.reset_index(), together, by)


def _object_keys_stay_object(out: pd.DataFrame, source: pd.DataFrame, by: list) -> pd.DataFrame:
    """``out`` with the ``by`` columns that are object in ``source`` object
    again: pandas 2 gives a groupby's keys the type it infers from the
    values (bool for a partition of True/False, float64 for one of None),
    and concatenated, True and False became 1.0 and 0.0 (another group
    folder: the run ended SUCCESS with those groups never run)."""
    for column in by:
        if source[column].dtype == object and out[column].dtype != object:
            out[column] = out[column].astype(object)
    return out


def _count_groups_graph(
    ddf: dd.DataFrame, by: list, client: distributed.Client, with_bytes: bool = True
) -> distributed.Future:
    def per_partition(df: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        return _count_partition(df, by, (partition_info or {}).get("number", 0), with_bytes)

    located = ddf.map_partitions(per_partition, meta=per_partition(ddf._meta), token="manymodel-count")
    counts = located.groupby(by, dropna=False, observed=True).agg(_COUNT_AGG)
    return client.compute(counts)


# A shuffle holds a group's rows several times over on the worker that
# receives them (the pieces, their concatenation, the persisted partition):
# a group meant to fit within the memory guard's fraction is refused before
# the shuffle above this share of it. Measured on workers of 1 GiB, one
# group spread over 4 partitions beside small ones: with tasks, 152 MiB ran
# and 305 MiB killed the workers; with p2p (Dask's default), 92 MiB ran
# (slowly) and 122 MiB did not finish, 152 MiB killed them.
_SHUFFLE_COPIES = {"tasks": 3, "disk": 3, "p2p": 6}


def _too_big_to_shuffle(
    counts: pd.DataFrame, options: ExecutionOptions, client: distributed.Client, method: str | None
) -> dict[int, str]:
    """Groups (by position in ``counts``) too big to shuffle onto one worker,
    with the error each gets: in a run that shuffles, such a group killed the
    workers of the shuffle (Dask's memory limit), and every group of the run
    was lost with them, before the check inside its task could run."""
    fraction = options.max_group_memory_fraction
    if not fraction:
        return {}
    try:
        # every worker's (scheduler_info lists only the first few in some distributed versions)
        limits = client.run_on_scheduler(
            lambda dask_scheduler: [ws.memory_limit or 0 for ws in dask_scheduler.workers.values()]
        )
    except Exception:  # a scheduler that runs no client functions: the tasks' own check only
        return {}
    if not limits or min(limits) <= 0:
        return {}
    limit = min(limits)
    method = method or dask.config.get("dataframe.shuffle.method", None) or "p2p"
    copies = _SHUFFLE_COPIES.get(method, max(_SHUFFLE_COPIES.values()))
    allowed = fraction * limit / copies
    estimated = counts[_BYTES].to_numpy()
    return {
        int(position): (
            f"group {key!r} has {int(counts[_ROWS].iloc[position]):,} rows (about "
            f"{estimated[position] / 2**20:,.0f} MiB in memory), too big to shuffle onto one worker: more than "
            f"{fraction:g} of the workers' memory limit ({limit / 2**20:,.0f} MiB) divided by "
            f"{copies}, the copies a {method} shuffle holds; give workers more memory, split the group, "
            f"raise ExecutionOptions(max_group_memory_fraction=...), or give the input one partition per "
            f"group (set_index on the key), which needs no shuffle"
        )
        for position in np.flatnonzero(estimated > allowed)
        # the group value as the run's handle shows it
        for key in [json_key_to_partition_id(_json_key(_as_key_tuple(counts.index[position], counts.index)))]
    }


def _as_key_tuple(key: Any, index: pd.Index) -> tuple:
    """A group's key in the counts' ``index`` as one value per ``by`` column.
    Only a MultiIndex (several columns) holds tuples of them: a tuple in a
    plain Index is one column's value (an object column of tuples), which
    was read as the values of as many columns, slipped past the check that
    group values are scalars, and failed the run's groups as "not run: its
    task ended without finding its rows"."""
    return key if isinstance(index, pd.MultiIndex) else (key,)


def needs_shuffle(counts: pd.DataFrame, npartitions: int, threads: int, choice: str, npartitions_asked: bool) -> bool:
    """Whether the rows must be shuffled so that each group is in one partition.

    ``"auto"`` skips the shuffle when every group already lives in one input
    partition (e.g. after ``set_index`` on the key, or read from a
    hive-partitioned dataset) and no input partition holds much more than
    its share of the work, ``max(rows / threads, largest group)``: then each
    group runs in a task of its own input partition (a large partition split
    into several, :func:`split_partitions`). ``"never"`` insists on that (and
    says which group is split); ``"always"``, or an explicit
    ``npartitions``, shuffles.
    """
    split = counts[counts[_PARTS] > 1]
    if choice == "never":
        if len(split):
            raise InvalidArgumentError(
                f"ExecutionOptions(shuffle='never') needs every group in one input partition, but "
                f"group {split.index[:1].tolist()[0]!r} is in {int(split[_PARTS].iloc[0])} of them; use "
                f"shuffle='auto', or repartition the input by {list(counts.index.names)!r} first"
            )
        return False
    if choice == "always" or npartitions_asked:
        return True
    if len(split):
        return True
    rows = counts[_ROWS]
    per_partition = rows.groupby(counts[_HOME].to_numpy()).sum()
    fair = max(rows.sum() / threads, rows.max())
    return bool(per_partition.max() > 1.25 * fair or npartitions < threads)


def split_partitions(parts: np.ndarray, sizes: np.ndarray, pending: np.ndarray, n_tasks: int) -> np.ndarray:
    """Without a shuffle, split an input partition that holds more than a
    task's share of the rows (``rows / n_tasks``) into several tasks, its
    groups largest first (each task then reads the same partition and keeps
    its own groups). Returns the subtask of each group within its partition."""
    subtask = np.zeros(len(parts), dtype=np.int64)
    share = sizes[pending].sum() / max(n_tasks, 1)
    rows = np.bincount(parts[pending], weights=sizes[pending])
    for part in np.flatnonzero(rows > 1.5 * share):
        members = np.flatnonzero(pending & (parts == part))
        pieces = min(len(members), int(np.ceil(rows[part] / share)))
        if pieces > 1:
            subtask[members] = assign_groups(sizes[members], pieces)
    return subtask


def assign_groups(sizes: np.ndarray, npartitions: int) -> np.ndarray:
    """Longest-processing-time-first: each group, largest first, goes to the
    output partition with the fewest rows so far. Returns one partition
    number per group."""
    parts = np.empty(len(sizes), dtype=np.int64)
    loads = [(0, p) for p in range(npartitions)]
    for index in np.argsort(-np.asarray(sizes), kind="stable"):
        load, part = heapq.heappop(loads)
        parts[index] = part
        heapq.heappush(loads, (load + int(sizes[index]), part))
    return parts


def _group_index(df: pd.DataFrame, by: list) -> pd.Index:
    if len(by) == 1:
        return _nulls_as_nan(pd.Index(df[by[0]]))
    return pd.MultiIndex.from_frame(df[by])


def _nulls_as_nan(index: pd.Index) -> pd.Index:
    """``index`` with every null of an object column (None, pd.NA, NaT) as
    NaN: groupby names their one group NaN, and ``get_indexer`` matches a
    null of an object Index only to the same kind of null (None found no
    counted group: every group of a run that shuffled failed, and a split
    partition's null group never ran)."""
    if isinstance(index, pd.MultiIndex) or index.dtype != object or not index.hasnans:  # a MultiIndex codes nulls as -1
        return index
    values = index.to_numpy(dtype=object, copy=True)
    values[index.isna()] = np.nan
    return pd.Index(values, dtype=object, name=index.name)


def in_meta_columns(df: pd.DataFrame, columns: list) -> pd.DataFrame:
    """``df`` with exactly ``columns``, in their order, where it has them all
    (once each): a partition whose columns are in another order than its
    meta says, or has more (``map_partitions(..., enforce_metadata=False)``,
    ``from_map``), gives its groups the input's columns as pandas would read
    them whole; the shuffle's own map_partitions would refuse it."""
    if list(df.columns) == columns or df.columns.has_duplicates or not set(columns) <= set(df.columns):
        return df
    return df[columns]


def _tag_partition(df: pd.DataFrame, by: list, keys: pd.Index, parts: np.ndarray, columns: list) -> pd.DataFrame:
    """Add the output-partition column to one input partition."""
    df = in_meta_columns(df, columns)
    positions = _nulls_as_nan(keys).get_indexer(_group_index(df, by))
    if (positions < 0).any():  # the data changed between the count and the shuffle
        raise RuntimeError("a group appeared that was not counted; is the input deterministic?")
    return df.assign(**{PARTITION_COLUMN: parts[positions]})


# --------------------------------------------------------------------------
# what the workers get


#: The scheduler's event topic of every run's progress reports (each names
#: its run's submission): one topic, so that the scheduler keeps one bounded
#: log of them however many runs a cluster serves.
PROGRESS_TOPIC = "manymodel-progress"


@dataclass
class RunSpec:
    """Everything a partition task needs; one task of the cluster per run (:func:`send_spec`)."""

    kind: str
    run_id: str
    attempt: str
    by: list
    func: Callable
    store: RunStore
    serde: ModelSerde | None
    options: ExecutionOptions
    cancel_event: str
    progress_topic: str
    training_store: RunStore | None = None
    training_attempt: str | None = None
    # predict: per ``by`` column, the time zones of the training run's stored
    # values, when the input may hold values in another zone; else None
    training_zones: list[set[str]] | None = None
    # the input's columns, which each group's frame has (None: not checked)
    columns: list | None = None
    # predict with meta=: the types its groups' parquet files are written in
    # (the columns meta gives a type), so that any parquet reader reads them
    # as one dataset
    output_schema: pa.Schema | None = None
    # this start of the run, also in its _run.json: another start (an
    # overwrite or resume while this one runs) writes its own there, and this
    # one's tasks then stop writing (_run_was_superseded). None: not fenced.
    submission: str | None = None

    @functools.cached_property  # asked for every group cast to meta: worked out once per task's copy
    def meta_pandas_columns(self) -> dict[str, dict]:
        """The pandas metadata of ``output_schema``'s columns, by name."""
        try:
            return {entry["name"]: entry for entry in json.loads(self.output_schema.metadata[b"pandas"])["columns"]}
        except (AttributeError, TypeError, KeyError, ValueError):  # no schema, or no pandas metadata
            return {}

    @functools.cached_property  # asked for every group: worked out once per task's copy
    def by_names(self) -> frozenset[str]:
        """The ``by`` columns' names as parquet names them (by text): a
        returned column ``0`` or ``"0"`` is the ``by`` column ``0``."""
        return frozenset(str(column) for column in self.by)

    @functools.cached_property  # asked for every group: worked out once per task's copy
    def own_file_names(self) -> frozenset[str]:
        """The files the engine writes into each group's folder besides its
        status: ``ctx.upload`` may not take their names."""
        if self.kind == "train" and self.serde is not None:
            return frozenset({self.serde.filename})
        if self.kind == "predict":
            return frozenset({OUTPUT_FILE})
        return frozenset()


# The last answers in this process to "was this run cancelled?" (asked of the
# scheduler: a round trip of ~7 ms) and "was it superseded?" (a read of its
# _run.json), per run: (when it was asked, the answer). A task of a few dozen
# ms would otherwise pay the question at its start; the tasks of one run on
# one worker share the answer instead, so a process asks each at most once
# per _HEARTBEAT_SECONDS per run.
_shared_answers: dict[str, tuple[float, bool]] = {}
_shared_answers_lock = threading.Lock()
# answers older than this are dropped, so a long-lived worker keeps few
_SHARED_ANSWER_KEEP_SECONDS = 600.0


def _shared_answer(question: str, ask: Callable[[], bool]) -> bool:
    """The answer to ``question`` (once yes, yes for good): ``ask()`` only if
    no task in this process asked in the last _HEARTBEAT_SECONDS."""
    with _shared_answers_lock:
        asked_at, answer = _shared_answers.get(question, (-np.inf, False))
    if answer or time.monotonic() - asked_at < _HEARTBEAT_SECONDS:
        return answer
    answer = ask()
    _remember_answer(question, answer)
    return answer


def _remember_answer(question: str, answer: bool) -> None:
    now = time.monotonic()
    with _shared_answers_lock:
        # a yes (a cancel, another start), once seen, stays seen
        answer = answer or _shared_answers.get(question, (now, False))[1]
        _shared_answers[question] = (now, answer)
        for name, (asked_at, _) in list(_shared_answers.items()):
            if now - asked_at > _SHARED_ANSWER_KEEP_SECONDS:
                del _shared_answers[name]


def _run_was_cancelled(cancel_event: str) -> bool:
    """Whether the run's cancel event is set (see :func:`_shared_answer`)."""
    try:
        return _shared_answer(cancel_event, lambda: distributed.Event(cancel_event).is_set())
    except Exception:  # the scheduler is busy or gone: keep working
        logger.debug("could not check the cancel event", exc_info=True)
        return False


def _run_was_superseded(spec: RunSpec) -> bool:
    """Whether the run was started again while this start of it runs: its
    ``_run.json`` now names another submission (an overwrite or a resume by
    another client, e.g. a batch job retried while its first try still runs),
    or is gone (the run was deleted). Its folders then belong to that other
    start, and this one must write nothing more there: neither models nor
    statuses, nor its own final ``_run.json``.

    Read from storage at most once per _HEARTBEAT_SECONDS per process. A
    read that fails for another reason (the store is briefly unreachable, the
    file is half-written by a non-atomic writer) is no evidence: work goes on.
    """
    if spec.submission is None:
        return False

    # a failed read is remembered as "no" too: asked again in half a second,
    # not at every batch (a store that refuses reads would otherwise cost
    # one failed read per batch)
    return _shared_answer(
        f"superseded-{spec.submission}",
        lambda: superseded_or_none(spec.store, spec.submission, ended_counts=True) is not None,
    )


def superseded_or_none(store: RunStore, submission: str, ended_counts: bool = False) -> str | None:
    """:func:`superseded_by`, with a failed read taken as no evidence (None)."""
    try:
        return superseded_by(store, submission, ended_counts)
    except Exception:
        logger.debug("could not read the run's manifest to check for another start", exc_info=True)
        return None


def superseded_by(store: RunStore, submission: str, ended_counts: bool = False) -> str | None:
    """What replaced this start of the run in storage (a sentence), or None
    if its ``_run.json`` still names ``submission``. Raises what the read
    raises, except that a missing ``_run.json`` means the run was deleted.

    ``ended_counts`` (a task asking): this start's own ``_run.json`` saying
    it has finished counts too. Its client writes that while a task may still
    run only when the task was cancelled outside the run (``client.cancel``,
    ``client.restart``, a closed client): Dask forgets such a task, but one
    that was running goes on in its worker, and must not write over what the
    client recorded (``ManyModelRun._fence_cut_off_tasks``)."""
    try:
        manifest = store.read_json(store.path(RUN_MANIFEST))
    except FileNotFoundError:
        gone = f"run {store.run_id!r} was deleted from {store.url_shown} while it ran"
        if store.is_local:  # a worker that joined after the start and its count (check_workers_see_local_folder)
            gone += (
                f", or this worker ({socket.gethostname()}) does not see that local folder: a local URL "
                f"must be on a disk every worker shares at the same path"
            )
        return gone
    if not isinstance(manifest, dict):
        return None
    if manifest.get("submission") == submission:
        if ended_counts and manifest.get("finished"):
            return (
                f"run {store.run_id!r} at {store.url_shown} was ended by its client while this task ran: "
                f"the task was cancelled outside the run (client.cancel(), client.restart() or a "
                f"closed client)"
            )
        return None
    return (
        f"run {store.run_id!r} at {store.url_shown} was started again while this one ran (an overwrite or "
        f"resume, most often by another client: attempt {manifest.get('attempt')!r}); its folders belong "
        f"to that run now"
    )


class _Heartbeat:
    """Throttled cancel checks and progress events from inside a task."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.last = -np.inf
        self.cancelled = False
        self.superseded = False  # see _run_was_superseded
        # this task's groups finished so far, reported as running totals: a
        # task that runs again (its worker died) counts from 0 again, and the
        # client keeps each task's highest total, so no group counts twice
        self.finished = {"done": 0, "failed": 0}
        self.reported = 0
        try:
            self.worker = distributed.get_worker()
        except ValueError:  # run outside a worker (unit tests)
            self.worker = None
            self.task = None
        else:
            key = self.worker.get_current_task()
            self.task = key[1] if isinstance(key, tuple) and len(key) == 2 else None

    def count(self, status: str) -> None:
        self.finished["done" if status == "DONE" else "failed"] += 1

    def beat(self) -> bool:
        """Report progress and return True if the run was cancelled or
        superseded. Does either at most once per _HEARTBEAT_SECONDS; the first
        call does both."""
        now = time.monotonic()
        if self.cancelled or self.worker is None or now - self.last < _HEARTBEAT_SECONDS:
            return self.cancelled
        self.last = now
        self.report()
        self.cancelled = _run_was_cancelled(self.spec.cancel_event) or self.check_superseded()
        return self.cancelled

    def check_superseded(self) -> bool:
        """Whether the run was started again elsewhere (then nothing more may
        be written; see _run_was_superseded); remembered once true."""
        self.superseded = self.superseded or _run_was_superseded(self.spec)
        return self.superseded

    def refuse_if_superseded(self) -> None:
        """Before a group's file is written at once (a serde without
        ``to_bytes``, ``ctx.upload``); batched files are checked when their
        batch is written."""
        if self.check_superseded():
            raise _Superseded(_superseded_message(self.spec))

    def report(self) -> None:
        """Send the task's running totals if they grew since the last report
        (an event the worker batches: no round trip)."""
        total = self.finished["done"] + self.finished["failed"]
        if self.worker is not None and total > self.reported:
            self.worker.log_event(
                self.spec.progress_topic, {"submission": self.spec.submission, "task": self.task, **self.finished}
            )
            self.reported = total

    def cancel_run(self) -> None:
        """fail_fast: tell every task of the run to stop (this process's at
        their next group, the others' within _HEARTBEAT_SECONDS)."""
        self.cancelled = True
        if self.worker is not None:
            _remember_answer(self.spec.cancel_event, True)
            distributed.Event(self.spec.cancel_event).set()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def _record(spec: RunSpec, key: tuple, rel: str, **values: Any) -> dict:
    record = {
        "partition_id": _json_key(key),
        "path": rel,
        "status": "DONE",
        "seconds": 0.0,
        "rows": 0,
        "bytes": 0,
        "error": None,
        "traceback": None,
        "logs": "",
        "artifacts": [],
        "attempts": 0,
        "attempt": spec.attempt,
        # which start of the run wrote it: while a resume runs, readers skip
        # the earlier start's outcomes of the groups that run again
        "submission": spec.submission,
        "finished": None,
    }
    record.update(values)
    return record


def _write_status(spec: RunSpec, record: dict) -> dict:
    """Write ``_partition.json`` (last, so a reader trusts only a finished group)."""
    record["finished"] = _now()
    try:
        # compact, and without a rename on local disk: a half-written status
        # does not parse, and readers treat it as absent (store.write_bytes)
        path = spec.store.path(record["path"], PARTITION_FILE)
        try:
            spec.store.write_json(path, record, indent=None, atomic=False)
        except FileNotFoundError:  # a CANCELLED group has no folder yet
            spec.store.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            spec.store.write_json(path, record, indent=None, atomic=False)
    except Exception as exc:
        _status_not_written(record, exc)
    return record


def _status_not_written(record: dict, error: BaseException) -> None:
    """Make ``record`` say that its status could not be written: INTERNAL_ERROR,
    with the outcome it had (the user's error of a FAILED group was lost with
    its traceback, and summary() said only that the store had failed), marked
    for the client to write as the run ends (:data:`STATUS_NOT_STORED`)."""
    had = record["status"]
    if record.get("error"):
        had += ": " + str(record["error"]).splitlines()[0][:500]
    record.update(
        status="INTERNAL_ERROR",
        error=f"could not write the status of group {record['path']} (it had ended {had}): {error}",
        traceback="".join(traceback.format_exception(error)),
    )
    record[STATUS_NOT_STORED] = True


def _write_statuses(spec: RunSpec, records: list[dict]) -> list[dict]:
    """:func:`_write_status` of many groups, in one batch (see
    :meth:`RunStore.write_many`)."""
    files = {}
    for record in records:
        record["finished"] = _now()
        files[spec.store.path(record["path"], PARTITION_FILE)] = json.dumps(record, indent=None, default=str).encode()
    failed = spec.store.write_many(files, atomic=False)
    for path, record in zip(files, records):
        error = failed.get(path)
        if error is not None:
            _status_not_written(record, error)
    return records


# A record's mark, never written: its status could not be stored (the store
# failed just then); the run's client writes it as the run ends
# (ManyModelRun._store_statuses_not_stored)
STATUS_NOT_STORED = "_status_not_stored"


def _save_model(
    spec: RunSpec, model: Any, rel: str, partition_id: Any, scratch_dir: str,
    before_write: Callable[[], None] = lambda: None,
) -> tuple[int, dict[str, bytes]]:
    """Serialize a group's model. A serde that works in memory gives bytes,
    returned for the partition's next batch of writes; any other writes its
    file now, after ``before_write()`` (which raises if the run's folder is no
    longer this run's). Returns (the model's size, ``{path: bytes}`` still to
    write)."""
    serde = spec.serde
    path = spec.store.path(rel, serde.filename)

    def failed(exc: BaseException) -> _UserError:
        return _UserError(
            f"{type(serde).__name__} could not write the model of group {partition_id!r} "
            f"(a {type(model).__module__}.{type(model).__qualname__}): {error_line(exc)}"
        )

    if streams_pickle(serde):
        return _save_pickle(spec, model, path, partition_id, scratch_dir, before_write, failed)
    if writes_in_memory(serde):
        try:
            data = serde.to_bytes(model)
        except BaseException as exc:  # the model's own pickling may raise anything
            raise failed(exc) from exc
        if data is not None:  # None: this model goes through write() (ModelSerde.to_bytes)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise _UserError(
                    f"{type(serde).__name__}.to_bytes returned a {type(data).__name__} for group "
                    f"{partition_id!r}; it must return bytes (or None to have write() save the model)"
                )
            # its size as bytes: len() of a memoryview of a float array
            # (np's, or BytesIO.getbuffer() cast) counts its items, and the
            # run reported a model of 8,000 bytes as 1,000
            data = data if isinstance(data, bytes) else bytes(data)
            return len(data), {path: data}

    def write(local_path: str) -> None:
        try:
            serde.write(model, local_path)
        except BaseException as exc:  # the model's own pickling may raise anything
            _remove_folder(local_path)
            if _disk_refused(exc, local_path):  # not the model's fault: INTERNAL_ERROR
                raise StorageError(
                    f"{type(serde).__name__} could not write the model of group {partition_id!r} to "
                    f"{local_path}: {error_line(exc)}; that disk is full (or over quota, or read-only): "
                    f"free space there, then run the group again (run.retry_failed(), or "
                    f"on_existing_artifacts='resume')"
                ) from exc
            raise failed(exc) from exc
        problem = not_one_file(local_path, f"{type(serde).__name__}.write", f"group {partition_id!r}")
        if problem:
            _remove_folder(local_path)
            raise _UserError(problem)

    before_write()  # written now, not with the batch
    return spec.store.write_via_file(path, write, scratch_dir), {}


#: A pickled model up to this size is written with its task's next batch of
#: files (as _PendingWrites' max_bytes: a bigger one would flush it at once).
_MODEL_BYTES_IN_MEMORY = 32 * 2**20


def _save_pickle(
    spec: RunSpec, model: Any, path: str, partition_id: Any, scratch_dir: str | None,
    before_write: Callable[[], None], failed: Callable[[BaseException], "_UserError"],
) -> tuple[int, dict[str, Any]]:
    """:func:`_save_model` for :class:`PickleSerde`: the pickle streams into
    memory while it is small (its bytes then go with the task's batch of
    files) and on into a local file once it is not. On local disk that file
    is renamed into place now; for remote storage it goes with the batch as
    a :class:`LocalFile`, uploaded once the group has let go of its model
    (s3fs reads up to 500 MB of a file at once to upload it: beside the
    model, that doubled what the worker held). A model of 1 GB was pickled
    to bytes (up to 1.5 GB as they grew) beside itself before anything was
    written: a worker needed 2.5 times the model's size, and over 3 times
    for a model of a class of ``__main__`` (pickled twice)."""
    def spill_path() -> str:  # named only when the pickle outgrows memory (no uuid, no stat per group)
        if spec.store.is_local:  # beside its target: committed by a rename, never copied
            return _temp_name(path, uuid.uuid4().hex)
        return os.path.join(scratch_dir, f"spill-{uuid.uuid4().hex}")  # (a remote store's task has one)

    spill = _SpillFile(_MODEL_BYTES_IN_MEMORY, spill_path)
    handed_over = False  # the spilled file, once the task's batch owns it
    try:
        try:
            spec.serde._dump(model, spill)
        except BaseException as exc:  # the model's own pickling may raise anything
            if spill.path and _disk_refused(exc, spill.path):  # (its file may not have opened)
                raise StorageError(
                    f"{type(spec.serde).__name__} could not write the model of group {partition_id!r} to "
                    f"{spill.path}: {error_line(exc)}; that disk is full (or over quota, or read-only): "
                    f"free space there, then run the group again (run.retry_failed(), or "
                    f"on_existing_artifacts='resume')"
                ) from exc
            raise failed(exc) from exc
        finally:
            spill.close()
        if spill.file is None:
            data = spill.buffer.getvalue()
            return len(data), {path: data}
        if not spec.store.is_local:
            local = LocalFile(spill.path)  # (deleted once its batch is written: _PendingWrites._flush)
            handed_over = True
            return local.size, {path: local}
        # the finished temp file beside its target, renamed into place:
        # atomic, and never a copy (a hard link, where a disk has none, was)
        size = os.path.getsize(spill.path)
        before_write()  # written now, not with the batch
        spec.store._retry(functools.partial(os.replace, spill.path, path), f"writing {path}")
        return size, {}
    finally:
        if spill.path and not handed_over and os.path.exists(spill.path):
            os.remove(spill.path)
            if spill.made_folder:  # not written (a run started again since): nothing left of it
                with contextlib.suppress(OSError):  # (not empty: the group's other files)
                    os.rmdir(spill.made_folder)


class _SpillFile:
    """A file object that holds what is written in memory up to ``limit``
    bytes, and from there on in a local file (what it held first included),
    at the :attr:`path` that ``make_path()`` names then; :attr:`file` is None
    (and :attr:`path` empty) while it is all in memory."""

    def __init__(self, limit: int, make_path: Callable[[], str]):
        self.limit, self.make_path = limit, make_path
        self.path = ""
        self.buffer = io.BytesIO()
        self.file: Any = None
        self.made_folder = ""  # the file's folder, where it was made for it

    def write(self, data: Any) -> int:
        if self.file is None and self.buffer.tell() + memoryview(data).nbytes > self.limit:
            self.path = self.make_path()
            folder = os.path.dirname(self.path)
            if not os.path.isdir(folder):
                os.makedirs(folder)
                self.made_folder = folder
            self.file = open(self.path, "wb")
            self.file.write(self.buffer.getbuffer())
            self.buffer = io.BytesIO()
        return (self.file or self.buffer).write(data)

    def seek(self, offset: int) -> int:  # (PickleSerde starts over from 0 with cloudpickle)
        return (self.file or self.buffer).seek(offset)

    def truncate(self) -> int:
        return (self.file or self.buffer).truncate()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


#: A write that fails with one of these failed for its disk, never its model.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
#: Less free room than this where a write failed: the disk filled up.
_NEARLY_FULL_BYTES = 2**20


def _disk_refused(exc: BaseException, path: str) -> bool:
    """Whether writing local file ``path`` failed for its disk: full, over
    quota, read-only. Some writers wrap the system's error in their own
    (torch.save's "unexpected pos 1600 vs 1494"), so a disk left with (next
    to) no room counts too: the file's partial bytes are still there."""
    link: BaseException | None = exc
    seen: set[int] = set()
    while link is not None and id(link) not in seen:  # a chain may loop (raise a from b, b from a)
        if isinstance(link, OSError) and link.errno in _DISK_ERRNOS:
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    try:
        return shutil.disk_usage(os.path.dirname(path) or ".").free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _remove_folder(path: str) -> None:
    """A folder a serde made where its file belongs: gone, so that no temp
    name is left in the group's folder."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def _series_as_frame(result: pd.Series, frame: pd.DataFrame, by_names: frozenset[str]) -> pd.DataFrame:
    """A Series an inference function returned, as the group's frame with
    it as a column (``prediction`` when unnamed)."""
    if len(result) != len(frame):
        raise _UserError(f"the returned Series has {len(result)} rows, the group {len(frame)}")
    # unnamed (or ""): "prediction"; a Series named 0 is named, as in to_frame()
    name = PREDICTION_COLUMN if result.name is None or result.name == "" else str(result.name)
    if name in by_names:  # the by columns' values come from the path: it would be lost
        raise _UserError(
            f"the returned Series is named {name!r}, a by column, whose values the output takes "
            f"from the group; name it otherwise, e.g. series.rename({PREDICTION_COLUMN!r})"
        )
    values = result.to_numpy()
    if (
        result.index.names == frame.index.names
        and not result.index.equals(frame.index)
        and result.index.is_unique
    ):
        # a Series computed from the group's frame sorted (by its date, as
        # a time series must be) carries the frame's labels in another
        # order: aligned on them, as df.assign aligns. Taken by position,
        # each value landed on another row. Any other index (dates, a
        # fresh one, a column's: set_index("day") of days 0..n-1 in any
        # order would pass for the frame's labels, hence the names) is not
        # the frame's: its values are taken in row order
        positions = frame.index.get_indexer(result.index)
        if (positions >= 0).all():
            values = values[np.argsort(positions)]
    # the input column it replaces, as parquet names them: named 1, it is
    # the column 1 of a frame of int labels (a new "1" beside it would
    # give the file two columns "1", which no reader reads)
    target = name
    if name not in frame.columns and frame.columns.inferred_type != "string":  # (a wide frame: no scan)
        target = next((column for column in frame.columns if str(column) == name), name)
    if isinstance(target, str):
        return frame.assign(**{target: values})
    output = frame.copy(deep=False)
    output[target] = values
    return output


def _save_output(spec: RunSpec, result: Any, frame: pd.DataFrame, rel: str) -> tuple[int, dict[str, bytes]]:
    """Turn what an inference function returned into its parquet file;
    returns (rows, ``{path: bytes}`` still to write)."""
    if result is None:
        return 0, {}
    # parquet names columns by text: a by column 0 is the folder "0=...", and
    # a returned column 0 or "0" is the one the path already names
    by_names = spec.by_names
    if isinstance(result, pd.Series):
        result = _series_as_frame(result, frame, by_names)
    elif isinstance(result, np.ndarray):
        if result.ndim != 1 or len(result) != len(frame):
            raise _UserError(
                f"the returned array has shape {result.shape}; return one value per row "
                f"({len(frame)},), a Series, a DataFrame or None"
            )
        result = frame.assign(**{PREDICTION_COLUMN: result})
    elif not isinstance(result, pd.DataFrame):
        raise _UserError(
            f"the inference function returned a {type(result).__name__}; return a pandas "
            f"DataFrame, Series, a 1-d numpy array with one value per row, or None"
        )
    names = [name for name in result.index.names if name is not None and name not in result.columns]
    if names:
        # as DataFrame.to_parquet: a named index is data (groupby(...).sum()
        # puts the key there), kept as a column; unnamed levels are row
        # numbers and dropped. A level named like a column yields to it.
        result = result.reset_index(level=names)
    # the by columns live in the path (hive style), not in the file. Straight
    # to pyarrow (what DataFrame.to_parquet does underneath): selecting the
    # columns there skips a pandas drop, a third of the cost for small groups
    columns = [c for c in result.columns if str(c) not in by_names]
    if not columns and len(result):
        # a parquet file of no column holds no row either: its rows would be lost
        raise _UserError(
            f"the returned frame has {len(result)} rows but no column besides the by columns "
            f"{list(spec.by)!r}, whose values come from the group; return at least one column of "
            f"your own, or None to store nothing"
        )
    try:
        table = pa.Table.from_pandas(result, columns=columns, preserve_index=False)
    except pa.ArrowMemoryError:  # out of memory: not the frame's fault
        raise
    except (pa.ArrowException, ValueError, TypeError) as exc:  # mixed types in a column, duplicate names
        raise _UserError(
            f"the returned frame cannot be stored as parquet: {error_line(exc)}; give each column one "
            f"type (e.g. .astype(str)) and each column its own name"
        ) from exc
    if len(set(table.column_names)) < table.num_columns:
        # labels that differ in pandas but not as text (1 and "1"): the file
        # would be written with two columns of one name, which every reader
        # (to_dask_dataframe, pd.read_parquet) refuses after the run
        names = table.column_names
        twice = sorted({name for name in names if names.count(name) > 1})
        clashing = [c for c in columns if str(c) in twice]
        raise _UserError(
            f"the returned frame's columns {clashing!r:.200} are all named {twice!r:.100} in parquet, "
            f"which names columns by text; rename them so that each has a text of its own "
            f"(frame.rename(columns=...))"
        )
    if spec.output_schema is not None:
        table = _as_meta_types(table, spec.output_schema, spec.meta_pandas_columns)
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return len(result), {spec.store.path(rel, OUTPUT_FILE): buffer.getvalue().to_pybytes()}


def _as_meta_types(table: pa.Table, schema: pa.Schema, meta_columns: dict[str, dict]) -> pa.Table:
    """The group's output with meta's types where meta gives one: a column
    all null in one group (arrow's null type) or ints where others have
    floats would otherwise make files that readers of the whole folder
    (``pd.read_parquet(url/run_id)``) cannot read as one dataset. A
    categorical keeps its own categories (their count sets its index width);
    only their type follows meta's."""
    cast = []
    for number, column in enumerate(table.schema):
        index = schema.get_field_index(column.name)
        if index < 0:
            continue
        wanted = schema.field(index).type
        if pa.types.is_dictionary(wanted):
            if pa.types.is_dictionary(column.type):
                wanted = pa.dictionary(column.type.index_type, wanted.value_type, wanted.ordered)
            else:
                wanted = pa.dictionary(pa.int32(), wanted.value_type, wanted.ordered)
        if column.type == wanted:
            continue
        try:
            converted = table.column(number).cast(wanted)
        except (pa.ArrowException, ValueError) as exc:
            raise _UserError(
                f"column {column.name!r} of the returned frame holds {column.type} values that do not "
                f"convert to meta's {wanted}: {exc}; return that type, or change meta="
            ) from None
        table = table.set_column(number, pa.field(column.name, wanted), converted)
        cast.append(column.name)
    if cast:
        table = _with_metas_pandas_types(table, meta_columns, set(cast))
    return table


def _with_metas_pandas_types(table: pa.Table, meta_columns: dict[str, dict], cast: set) -> pa.Table:
    """The table's pandas metadata, with meta's entries (``meta_columns``)
    for the columns cast to meta's types: pandas applies the entry's dtype
    when it reads the file (a group's ``Int64`` entry over a float column
    made pandas truncate)."""
    try:
        own = json.loads(table.schema.metadata[b"pandas"])
    except (TypeError, KeyError, ValueError):  # no pandas metadata: nothing to mend
        return table
    own["columns"] = [
        meta_columns.get(entry["name"], entry) if entry["name"] in cast else entry for entry in own["columns"]
    ]
    return table.replace_schema_metadata({**table.schema.metadata, b"pandas": json.dumps(own).encode()})


class _UserError(Exception):
    """A failure the user can fix (FAILED, not INTERNAL_ERROR)."""


class _NoModel(_UserError):
    """A predict group found no model of the training run's attempt (no
    status of it, or its model file gone): what a start again (or a
    deletion) of the training run while the predict runs looks like too, so
    its batch's check of the training run tells which it was."""


# a predict record's mark, never written: its group failed as _NoModel did
_NO_MODEL = "_no_model"


def _model_trained(spec: RunSpec, training_status: dict | None) -> bool:
    """Whether the training run's status says the group has a model."""
    return (
        training_status is not None
        and training_status.get("attempt") == spec.training_attempt
        and training_status.get("status") == "DONE"
    )


def _load_model(
    spec: RunSpec, rel: str, training_status: dict | None, partition_id: Any, prefetched: str | None = None
) -> Any:
    """The group's model from the training run. ``prefetched``: a local copy
    already downloaded (:class:`_ModelPrefetch`), deleted once read."""
    training = spec.training_store
    if training_status is None or training_status.get("attempt") != spec.training_attempt:
        raise _NoModel(
            f"group {partition_id!r} has no model in training run {training.run_id!r} "
            f"(it was never trained there)"
        )
    if training_status.get("status") != "DONE":
        raise _UserError(
            f"group {partition_id!r} has no model in training run {training.run_id!r}: "
            f"it ended {training_status.get('status')} there"
        )
    remote = training.path(rel, spec.serde.filename)
    missing = _NoModel(f"model file {training.display(rel, spec.serde.filename)} is missing")

    def read(local: str) -> Any:
        try:
            return spec.serde.read(local)
        except BaseException as exc:  # the model's own unpickling may raise anything
            if isinstance(exc, FileNotFoundError) and not os.path.lexists(local):
                raise missing from exc
            # (the model file there: a file the model opens as it is unpickled is missing)
            text = error_line(exc)
            if any(sign in text for sign in _CANNOT_LOAD_SIGNS):
                # the model's class is in a module the client (where it was
                # trained) had and this worker lacks, or has in another version
                text += (
                    "; the workers need every module the model's classes come from, in the version it "
                    "was trained with: install it there, or send a single file with client.upload_file(path)"
                )
            raise _UserError(
                f"{type(spec.serde).__name__} could not read model file "
                f"{training.display(rel, spec.serde.filename)}: {text}"
            ) from exc

    if training.is_local:
        return read(remote)  # the serde reads the stored file itself: no copy
    if prefetched is not None:
        try:
            return read(prefetched)
        finally:
            os.remove(prefetched)
    with scratch_folder() as tmp:
        local = os.path.join(tmp, spec.serde.filename)
        try:
            training.download_file(remote, local)
        except FileNotFoundError as exc:
            raise missing from exc
        except Exception as exc:
            if not _disk_refused(exc, local):
                raise
            # "downloading ... failed after 4 attempts: No space left on
            # device" did not say which side was full
            cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
            raise StorageError(
                f"could not copy model file {training.display(rel, spec.serde.filename)} to this worker's "
                f"disk to read it, in {tmp}: {error_line(cause)}; that disk is full (or over quota): give the "
                f"workers a scratch folder with room for the models (dask worker --local-directory, Dask's "
                f"temporary-directory), then run the group again (run.retry_failed())"
            ) from exc
        return read(local)


# How far a predict task on a remote training run downloads models ahead:
# a batch is the next groups' models up to this many bytes or files.
_PREFETCH_BYTES = 64 * 2**20
_PREFETCH_FILES = 64


class _ModelPrefetch:
    """The models of one predict task on a remote training run, downloaded
    in batches ahead of the groups that need them: one ``fs.get`` of many
    files (s3fs and gcsfs fetch them concurrently) in place of one request
    after another, each a network round trip.

    A batch holds the models of the next groups that have one, up to
    _PREFETCH_BYTES (by the sizes in the training statuses) or
    _PREFETCH_FILES. If a batch fails, its copies are dropped and each of
    its models is downloaded alone when its group comes, so that an error
    is that model's own.
    """

    def __init__(self, spec: RunSpec, rels: list[str], training_statuses: dict[str, dict], folder: str):
        self.spec = spec
        self.folder = folder
        self.order = [rel for rel in rels if _model_trained(spec, training_statuses.get(rel))]
        self.sizes = [int(training_statuses[rel].get("bytes") or 0) for rel in self.order]
        self.position = {rel: number for number, rel in enumerate(self.order)}
        self.fetched_up_to = 0  # order[:fetched_up_to] were asked for
        self.ready: dict[str, str] = {}  # rel -> local copy

    def take(self, rel: str) -> str | None:
        """The local copy of the group's model (the caller deletes it), or
        None: then the caller downloads it alone."""
        if rel not in self.ready:
            first = self.position.get(rel)
            if first is not None and first >= self.fetched_up_to:
                self._fetch_batch(first)
        return self.ready.pop(rel, None)

    def _fetch_batch(self, first: int) -> None:
        end, total = first, 0
        while end < len(self.order) and end - first < _PREFETCH_FILES:
            if end > first and total + self.sizes[end] > _PREFETCH_BYTES:
                break
            total += self.sizes[end]
            end += 1
        self.fetched_up_to = end
        batch = self.order[first:end]
        training, filename = self.spec.training_store, self.spec.serde.filename
        # one folder per model: a serde may expect the file's own name
        local_paths = [os.path.join(self.folder, "models", str(n), filename) for n in range(first, end)]
        try:
            training.download_many([training.path(rel, filename) for rel in batch], local_paths)
        except Exception:
            logger.debug("downloading %d models at once failed; one by one now", len(batch), exc_info=True)
            for local_path in local_paths:
                if os.path.exists(local_path):
                    os.remove(local_path)
            return
        self.ready.update(zip(batch, local_paths))


def _memory_limit(spec: RunSpec, heartbeat: "_Heartbeat") -> float | None:
    fraction = spec.options.max_group_memory_fraction
    worker = heartbeat.worker
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None) if worker else None
    return fraction * limit if fraction and limit else None


def _partition_may_not_fit(spec: RunSpec, frame: pd.DataFrame, heartbeat: "_Heartbeat") -> bool:
    allowed = _memory_limit(spec, heartbeat)
    return allowed is not None and _frame_bytes(frame) > allowed


def _frame_bytes(frame: pd.DataFrame) -> int:
    """The memory of ``frame``'s rows: a categorical column's categories are
    shared with the partition the group was cut from, so only its codes count
    (memory_usage counted a million categories in every small group)."""
    usage = frame.memory_usage(deep=True, index=False)
    nbytes = int(usage.sum())
    for position, dtype in enumerate(frame.dtypes):
        if isinstance(dtype, pd.CategoricalDtype):
            nbytes -= int(usage.iloc[position]) - frame.iloc[:, position].cat.codes.nbytes
    return nbytes


def _check_group_fits(spec: RunSpec, frame: pd.DataFrame, partition_id: Any, heartbeat: "_Heartbeat") -> None:
    """Refuse a group too big for its worker, before the user function copies it."""
    allowed = _memory_limit(spec, heartbeat)
    if allowed is None:
        return
    fraction = spec.options.max_group_memory_fraction
    limit = allowed / fraction
    nbytes = _frame_bytes(frame)
    if nbytes > allowed:
        raise _GroupTooBig(
            f"group {partition_id!r} has {len(frame):,} rows ({nbytes / 2**20:,.0f} MiB in memory), "
            f"more than {fraction:g} of the worker's memory limit ({limit / 2**20:,.0f} MiB); "
            f"give workers more memory, split the group, or raise "
            f"ExecutionOptions(max_group_memory_fraction=...)"
        )


class _GroupTooBig(Exception):
    """A group that would not fit in its worker's memory (INTERNAL_ERROR)."""


def run_group(
    spec: RunSpec,
    key: tuple,
    rel: str,
    frame: pd.DataFrame,
    heartbeat: _Heartbeat,
    training_status: dict | None = None,
    scratch_dir: str | None = None,
    check_memory: bool = True,
    model_prefetch: _ModelPrefetch | None = None,
    model_rel: str | None = None,
    frame_again: Callable[[], pd.DataFrame] | None = None,
) -> tuple[dict, dict[str, bytes]]:
    """Run the user function on one group. Never raises.

    Returns the group's record and the files still to write (``{path:
    bytes}``: its model or output); the caller writes them, then the status.
    ``model_rel``: a predict group's folder in the training run, when not
    ``rel`` (:func:`_model_folders`). ``frame_again``: makes ``frame`` again
    as it is now (see :class:`DataConnector`).
    """
    partition_id = key[0] if len(key) == 1 else key
    start = time.perf_counter()
    record = _record(spec, key, rel, rows=len(frame))
    ctx = PartitionContext(
        partition_id, spec.run_id, store=spec.store, by=spec.by, _before_write=heartbeat.refuse_if_superseded,
        _taken_names=spec.own_file_names,
    )
    files: dict[str, bytes] = {}
    with capture_logs(spec.options.max_log_chars) as logs:
        try:
            model = None
            if check_memory:
                _check_group_fits(spec, frame, partition_id, heartbeat)
            if spec.kind == "predict":
                model_rel = model_rel or rel
                prefetched = model_prefetch.take(model_rel) if model_prefetch is not None else None
                model = _load_model(spec, model_rel, training_status, partition_id, prefetched)
            try:
                result = _call_with_retries(spec, record, ctx, frame, model, frame_again)
            finally:
                ctx._close()  # a thread the function left running may not save into the group now
            if record["status"] == "DONE":
                if spec.kind == "train":
                    if result is None:
                        raise _UserError(
                            "the train function returned None; return the model to save "
                            "(or use DPF to save files yourself through ctx.upload)"
                        )
                    record["bytes"], files = _save_model(
                        spec, result, rel, partition_id, scratch_dir, heartbeat.refuse_if_superseded
                    )
                elif spec.kind == "predict":
                    record["output_rows"], files = _save_output(spec, result, frame, rel)
                    record["bytes"] = sum(len(data) for data in files.values())
        except _Superseded as exc:
            record.update(status="CANCELLED", error=f"not written: {exc}", traceback=None)
        except _UserError as exc:
            record.update(status="FAILED", error=str(exc), traceback=traceback.format_exc())
            if isinstance(exc, _NoModel):
                record[_NO_MODEL] = True  # taken off before it is written (_PendingWrites._flush)
        except (StorageError, _GroupTooBig) as exc:
            record.update(status="INTERNAL_ERROR", error=str(exc), traceback=traceback.format_exc())
        except BaseException as exc:  # our own bug, or something unexpected underneath
            record.update(
                status="INTERNAL_ERROR",
                error=error_line(exc),
                traceback=traceback.format_exc(),
            )
    record.update(
        logs=unicode_text(logs.text),
        # an exception's message can be any size (a 20 MB repr): cut as the logs are
        error=unicode_text(capped_text(record["error"], MAX_ERROR_CHARS)),
        traceback=unicode_text(capped_text(record["traceback"], spec.options.max_log_chars)),
        artifacts=list(ctx._uploaded),
        seconds=time.perf_counter() - start,
        finished=_now(),
    )
    return record, files


#: The most of an error's ``Type: message`` (lines and all) a group's status keeps.
MAX_ERROR_CHARS = 4_000


def capped_text(text: str | None, max_chars: int) -> str | None:
    """``text`` cut to about ``max_chars``: its start and its end (where a
    traceback names the exception), with a note of what was cut between."""
    if text is None or len(text) <= max_chars:
        return text
    head = max_chars // 2
    tail = max_chars - head
    return f"{text[:head]}\n[... {len(text) - max_chars} characters cut ...]\n{text[len(text) - tail:]}"


def unicode_text(text: str | None) -> str | None:
    """``text`` with each lone surrogate written as its escape (``\\udce9``).
    A file name that is not UTF-8 (``os.listdir``, ``os.fsdecode``) holds one,
    and so does the message of an error about it or a print of it: pandas' and
    pyarrow's strings refuse it (``run.summary()`` raised for the whole run),
    and so do strict JSON readers of the group's status."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, also of one whose ``str()`` raises
    (a user's own class): the group's error, never a new one about it."""
    try:
        message = str(exc)
    except BaseException:  # noqa: B036 (anything a user's __str__ raises)
        message = f"<str() of this {type(exc).__name__} raised>"
    return f"{type(exc).__name__}: {message}"


def unshared(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` that changes made to it in place cannot reach
    back through: shallow under pandas' copy-on-write (pandas 3, or pandas 2
    with the option on; no row is copied until one is changed), deep
    without it."""
    return frame.copy(deep=not _COPY_ON_WRITE)


_COPY_ON_WRITE = int(pd.__version__.split(".")[0]) >= 3 or pd.options.mode.copy_on_write is True


def _call_with_retries(spec, record, ctx, frame, model, frame_again=None) -> Any:
    # The function may change the frame it gets in place (df["x"] /= 10,
    # drop(inplace=True)). Where the group's rows are read again after it, a
    # retry and predict's output beside the input columns, each call gets a
    # frame of its own; a train or DPF call without retries needs none. A
    # second data.to_pandas() in one call gets the rows as they came too:
    # made again (DataConnector._again), the group's frame left as it is
    own_frame = spec.options.max_retries > 0 or spec.kind == "predict"
    again = functools.partial(unshared, frame) if own_frame else frame_again
    for attempt in range(spec.options.max_retries + 1):
        record["attempts"] = attempt + 1
        data = DataConnector(unshared(frame) if own_frame else frame, again)
        try:
            if spec.kind == "predict":
                result = spec.func(data, model, ctx)
            else:
                result = spec.func(data, ctx)
        except _Superseded:
            raise
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, asyncio.CancelledError, a user's own
            # a BaseException let out of the task would fail every group of
            # the task, kill its worker, or (a class the client's event loop
            # does not expect) leave the run waiting for ever: it is this
            # group's error. A KeyboardInterrupt too: Ctrl-C reaches only a
            # process's main thread, never the worker thread running a group.
            record.update(
                status="FAILED",
                error=error_line(exc),
                traceback=traceback.format_exc(),
            )
            logger.debug("group %s failed (attempt %d)", record["path"], attempt + 1)
            continue
        if inspect.isawaitable(result) or inspect.isgenerator(result) or inspect.isasyncgen(result):
            # an async or generator __call__, or a wrapper of one, that
            # check_function could not see: none of its body ran
            _close_unrun(result)
            record.update(
                status="FAILED",
                error=f"the function returned a {type(result).__name__} (an async or generator function?): "
                      f"none of its body ran; make it a plain function that returns its result",
                traceback=None,
            )
            return None
        record.update(status="DONE", error=None, traceback=None)
        return result
    return None


def _close_unrun(result: Any) -> None:
    """Close a coroutine or generator that will never run (no "never
    awaited" warning on the worker)."""
    close = getattr(result, "close", None) if not inspect.isasyncgen(result) else None
    if callable(close):
        try:
            close()
        except Exception:  # a foreign awaitable's close: nothing to keep
            pass


def iter_groups(frame: pd.DataFrame, by: list) -> Iterator[tuple[tuple, pd.DataFrame]]:
    """``(key, rows)`` per group: one sort of the partition, then cheap slices
    (``groupby`` iteration would copy every group with a ``take``)."""
    groups = SortedGroups(frame, by)
    for number, key in enumerate(groups.keys):
        yield key, groups.rows(number)


class SortedGroups:
    """The groups of a partition: their keys, and each one's rows on demand.

    One sort of the partition (none when each group's rows are together
    already), then a slice per group, made only when asked for: a task of
    25,000 groups that sliced them all up front held 25,000 frames at once
    and spent 13% more per group than one of 2,500 (the garbage collector
    walked them over and over); sliced as they run, both cost the same.
    """

    def __init__(self, frame: pd.DataFrame, by: list):
        if frame.empty:
            self.keys: list[tuple] = []
            return
        if len(by) == 1:
            # what groupby(...).ngroup() computes for one column, without
            # building a groupby (codes in order of first appearance, NA a group)
            codes, _ = pd.factorize(frame[by[0]], sort=False, use_na_sentinel=False)
        else:
            codes = frame.groupby(by, dropna=False, sort=False, observed=True).ngroup().to_numpy()
        if (np.diff(codes) >= 0).all():
            # each group's rows are together already (data written or read per
            # group, a sorted index): no reordering copy
            self._ordered = frame
        else:
            self._ordered = frame.take(np.argsort(codes, kind="stable"))
        self._bounds = np.concatenate([[0], np.cumsum(np.bincount(codes))]).tolist()
        firsts = self._bounds[:-1]
        # key values from each group's first row, as Python objects (Timestamps,
        # not datetime64); a null as None, as the handle gives it (not NaN,
        # NaT or pd.NA, whose comparisons in a user's `if` fail or mislead)
        columns = []
        for column in by:
            values = self._ordered[column].iloc[firsts]
            listed = values.tolist()
            if values.hasnans:
                listed = [None if null else value for value, null in zip(listed, values.isna().tolist())]
            columns.append(listed)
        self.keys = list(zip(*columns))

    def merge_by_folder(self, rels: list[str]) -> list[str]:
        """Make the groups that share a folder (``rels``, one per group) one
        group, in the place of the first; returns the folders, one per group
        now. Values that are one group for the count (Dask's groupby, and
        the folder) may be two for ``pd.factorize`` here: with Dask's
        ``dataframe.convert-string`` off, an object column mixing
        ``datetime`` and ``np.datetime64`` of one instant. Run as two, the
        second group's model and status overwrote the first's (its rows
        lost, DONE)."""
        numbers_of: dict[str, list[int]] = {}
        for number, rel in enumerate(rels):
            numbers_of.setdefault(rel, []).append(number)
        sizes = [sum(self.size(number) for number in numbers) for numbers in numbers_of.values()]
        pieces = [self.rows(number) for numbers in numbers_of.values() for number in numbers]
        self._ordered = pd.concat(pieces)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.keys = [self.keys[numbers[0]] for numbers in numbers_of.values()]
        return list(numbers_of)

    def rows(self, number: int) -> pd.DataFrame:
        """The rows of group ``number`` (a slice of the sorted partition)."""
        return self._ordered.iloc[self._bounds[number] : self._bounds[number + 1]]

    def frame(self, number: int) -> pd.DataFrame:
        """The frame group ``number``'s function gets: its rows, with the
        plain RangeIndex the docs promise, not the rows' places in the
        partition (which depend on the partitioning): a function that adds a
        column built apart (out["date"] = df["date"] beside
        pd.Series(predictions)) aligns on it, and got NaN for every group
        but its partition's first. Set on the slice: no copy, a few us."""
        group = self.rows(number)
        group.index = pd.RangeIndex(len(group))
        return group

    def size(self, number: int) -> int:
        """How many rows group ``number`` has."""
        return self._bounds[number + 1] - self._bounds[number]


class _PendingWrites:
    """Finished groups of one task whose files are not written yet.

    The files of a batch of groups are written together, models (or
    outputs) first and statuses last, so that a status never lands before
    its model. Why batch: a few file system calls after every group were
    measured to slow the user's own function down by about a third (its
    caches go cold), and on object stores one ``fs.pipe`` uploads a whole
    batch concurrently. A batch is written when it holds ``max_groups``
    groups or ``max_bytes``, or is ``max_seconds`` old (statuses in storage,
    the progress another process sees, lag by at most that), and at once
    after a group that took ``slow_group_seconds`` or more (not in a predict,
    whose batches each cost a read of the training run): next to such a
    group the writes cost nothing, and a lost worker loses less. The age
    limit holds while the next group runs too: a timer thread writes a batch
    that comes of age then (a slow group would otherwise hold back the
    statuses of the fast ones before it for as long as it runs).
    """

    def __init__(self, spec: RunSpec, heartbeat: "_Heartbeat", max_groups: int = 1000,
                 max_bytes: int = 32 * 2**20, max_seconds: float = 0.5, slow_group_seconds: float = 0.02):
        self.spec = spec
        self.heartbeat = heartbeat
        self.max_groups, self.max_bytes, self.max_seconds = max_groups, max_bytes, max_seconds
        self.slow_group_seconds = slow_group_seconds
        self.entries: list[tuple[dict, dict[str, bytes]]] = []
        self.nbytes = 0
        self.since = time.monotonic()
        self.written: list[dict] = []
        # the task's thread and the timer's take turns at the batch
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._timer_error: BaseException | None = None
        # predict: the training run was started again since the task began
        self.training_changed = False

    def add(self, record: dict, files: dict[str, bytes]) -> None:
        with self._lock:
            self._raise_timer_error()
            if not self.entries:
                self.since = time.monotonic()
            self.entries.append((record, files))
            self.nbytes += sum(len(data) for data in files.values())
            if (
                # (not a predict's: each of its batches reads the training run's
                # _run.json once, see _unless_training_changed; its timer keeps
                # the statuses at most max_seconds behind)
                (record["seconds"] >= self.slow_group_seconds and self.spec.kind != "predict")
                or len(self.entries) >= self.max_groups
                or self.nbytes >= self.max_bytes
                or time.monotonic() - self.since >= self.max_seconds
            ):
                self._flush()
            elif len(self.entries) == 1:
                self._start_timer()

    def kept(self, record: dict) -> None:
        """A group an earlier try of the task finished and stored: returned
        with the task's records as it is, not written again."""
        with self._lock:
            self.heartbeat.count(record["status"])
            self.written.append(_compact(record))

    def flush(self) -> None:
        """Write what is pending now (a task's end, fail_fast)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._raise_timer_error()
            self._flush()

    def _start_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.max_seconds, self._flush_when_due)
        self._timer.daemon = True
        self._timer.start()

    def _flush_when_due(self) -> None:
        with self._lock:
            if not self.entries or time.monotonic() - self.since < self.max_seconds:
                return
            try:
                self._flush()
                # and the progress bar hears of them now, not after the running group
                self.heartbeat.report()
            except BaseException as exc:  # raised in the task's thread, which the task reports
                self._timer_error = exc

    def _raise_timer_error(self) -> None:
        if self._timer_error is not None:
            error, self._timer_error = self._timer_error, None
            raise error

    def _flush(self) -> None:
        entries, self.entries, self.nbytes = self.entries, [], 0
        # big models streamed to local files (_save_pickle): removed once
        # written, or once they will never be (a run started again)
        local_files = [data.path for _, files in entries for data in files.values() if isinstance(data, LocalFile)]
        try:
            self._write(entries)
        finally:
            for local in local_files:
                if os.path.exists(local):
                    os.remove(local)

    def _write(self, entries: list[tuple[dict, dict[str, Any]]]) -> None:
        store = self.spec.store
        # the groups that found no model (the mark is never written)
        no_model = {id(record) for record, _ in entries if record.pop(_NO_MODEL, False)}
        if entries and self.heartbeat.check_superseded():
            self._drop(entries)
            return
        if self.spec.kind == "predict" and (no_model or any(record["status"] == "DONE" for record, _ in entries)):
            entries = self._unless_training_changed(entries, no_model)
        folders: set[str] = set()  # the groups' folders made for their models
        failed = store.write_many(
            {path: data for _, files in entries for path, data in files.items()}, made_folders=folders
        )
        statuses = {}
        status_paths = []
        for record, files in entries:
            lost = [path for path in files if path in failed]
            if lost and record["status"] == "DONE":
                error = failed[lost[0]]
                record.update(
                    status="INTERNAL_ERROR",
                    error=f"could not write {lost[0]}: {type(error).__name__}: {error}",
                    traceback="".join(traceback.format_exception(error)),
                    # nothing stored: the sizes of the model or output that
                    # is not there would count in the run's bytes
                    bytes=0,
                )
                if "output_rows" in record:
                    record["output_rows"] = 0
            path = store.path(record["path"], PARTITION_FILE)
            status_paths.append(path)
            statuses[path] = json.dumps(record, indent=None, default=str).encode()
        # compact, and without a rename on local disk: a half-written status
        # does not parse, and readers treat it as absent
        failed = store.write_many(statuses, atomic=False, made_folders=folders)
        for (record, _), path in zip(entries, status_paths):
            error = failed.get(path)
            if error is not None:
                _status_not_written(record, error)
            self.heartbeat.count(record["status"])
            # what the task returns; the full record is in storage now
            self.written.append(_compact(record))

    def _unless_training_changed(
        self, entries: list[tuple[dict, dict[str, bytes]]], no_model: frozenset[int] | set[int] = frozenset()
    ) -> list:
        """A predict's batch, its DONE groups FAILED (their outputs not
        written) if the training run was started again since this task began:
        an overwrite writes its ``_run.json`` before it deletes or writes a
        model, so while the training's attempt is still this predict's, every
        model read before this check is of that attempt. One small read per
        batch (a predict's batches are written at most every ``max_seconds``,
        see :meth:`add`); a run reading two trainings' models would otherwise
        be DONE. A read that fails makes the batch INTERNAL_ERROR: unchecked,
        its models cannot be vouched for.

        Its groups that found no model (:class:`_NoModel`, the ids of their
        records in ``no_model``) say so too when the training run changed:
        the start again had deleted their models (or the task read the
        training's statuses after it began), and their error said "never
        trained there" or "model file missing", untrue of the training run
        this predict began with."""
        training = self.spec.training_store
        unchecked = None
        if not self.training_changed:
            try:
                attempt = training.read_json(training.path(RUN_MANIFEST)).get("attempt")
            except FileNotFoundError:
                attempt = None  # deleted
            except Exception as exc:  # after the store's retries: the models cannot be vouched for
                attempt, unchecked = self.spec.training_attempt, exc
            self.training_changed = attempt != self.spec.training_attempt
        if not self.training_changed and unchecked is None:
            return entries
        for record, files in entries:
            if id(record) in no_model and self.training_changed:
                record.update(traceback=None)  # (the error below is all there is to say)
            elif record["status"] != "DONE":
                continue
            files.clear()
            record.update(output_rows=0, bytes=0)
            if unchecked is not None:
                record.update(
                    status="INTERNAL_ERROR",
                    error=f"could not read training run {training.run_id!r}'s _run.json to check that its "
                          f"models did not change while this predict ran: {type(unchecked).__name__}: "
                          f"{unchecked}; retry_failed() runs the group again",
                )
            else:
                record.update(
                    status="FAILED",
                    error=f"training run {training.run_id!r} was started again (or deleted) while this "
                          f"predict ran, so its models may be of either start; run the predict again "
                          f"(on_existing_artifacts='overwrite') once the training has ended",
                )
        return entries

    def _drop(self, entries: list[tuple[dict, dict[str, bytes]]]) -> None:
        """The run was started again elsewhere: its folders are that run's
        now, so these groups' files are not written; the task reports them
        CANCELLED, saying why."""
        reason = _superseded_message(self.spec)
        for record, _ in entries:
            record.update(status="CANCELLED", error=f"not written: {reason}", traceback=None)
            self.heartbeat.count(record["status"])
            self.written.append(_compact(record))


class _Superseded(BaseException):
    """Raised in a group, before one of its files is written, when its run
    was started again elsewhere. A BaseException, so that neither the user's
    ``except Exception`` nor the group's retries take it for a failure."""


def _superseded_message(spec: RunSpec) -> str:
    """Why a superseded run's groups were not written (read again: the
    answer that stopped the task is shared, not its sentence)."""
    return superseded_or_none(spec.store, spec.submission, ended_counts=True) or "the run was started again elsewhere"


def run_partition(
    spec: RunSpec, frame: pd.DataFrame, keep: pd.Index | None = None, index_to_column: str | None = None
) -> TaskRecords:
    """One task: every group of one partition, one after the other.

    ``keep``, when given, names the groups of this task (a partition split
    into several tasks); the partition's other rows are left to the others.
    ``index_to_column``: ``frame`` is a partition of a persisted frame whose
    named index the run makes a column (:func:`frame_index_as_column`).
    Returns one small record per group; the models stay in storage.
    """
    if isinstance(spec, SentSpec):
        spec = spec.load()
    frame = frame_index_as_column(frame, index_to_column)
    if keep is not None:
        frame = frame[_nulls_as_nan(keep).get_indexer(_group_index(frame, spec.by)) >= 0]
    if spec.columns is not None and list(frame.columns) != list(spec.columns):
        # a column Dask's shuffle left behind (its "_partitions", with a
        # MultiIndex of columns), or an input partition whose columns differ
        # from its meta's: the groups get the input's columns only, in order
        frame = in_meta_columns(frame, list(spec.columns))
        if len(frame.columns) != len(spec.columns):
            expected = set(spec.columns)
            frame = frame.drop(columns=[c for c in frame.columns if c not in expected])
    with keep_freed_memory(spec.options.reuse_freed_memory), freeze_older_objects():
        return _run_partition(spec, frame)


def _fragmented(frame: pd.DataFrame) -> bool:
    """Whether ``frame``'s columns lie in many more blocks than a copy would
    leave: a shuffle hands over one block per column.

    Each block costs the user function's every column selection on every
    group some time: after a shuffle, one copy of the partition made W1's
    50-row groups about 35 us faster each. Where the columns lie in a few
    blocks already (most input read or built whole), that copy is no
    gain and costs its own time: W2's 500-row groups ran 15-20 us slower
    each with it (benchmarks/README.md, 2026-11-29).
    """
    blocks = getattr(getattr(frame, "_mgr", None), "nblocks", None)  # pandas' own
    if blocks is None:
        return True
    # what a copy leaves: one block per numpy dtype, one per other column
    numpy_dtypes = {dtype for dtype in frame.dtypes if isinstance(dtype, np.dtype)}
    others = sum(not isinstance(dtype, np.dtype) for dtype in frame.dtypes)
    return blocks > 2 * (len(numpy_dtypes) + others)


def _run_partition(spec: RunSpec, frame: pd.DataFrame) -> TaskRecords:
    frame = frame.reset_index(drop=True)
    if _fragmented(frame):
        frame = frame.copy()  # consolidates the blocks
    heartbeat = _Heartbeat(spec)
    groups = SortedGroups(frame, spec.by)
    rels = [group_path(spec.by, key) for key in groups.keys]  # each group's folder
    if len(set(rels)) < len(rels):  # (rare: see SortedGroups.merge_by_folder)
        rels = groups.merge_by_folder(rels)
    # the per-group memory check is only needed if the whole partition is large
    check_memory = _partition_may_not_fit(spec, frame, heartbeat)
    training_statuses: dict[str, dict] = {}
    model_rels = rels  # each group's folder in the training run
    if spec.kind == "predict":
        # one batched read of this partition's training statuses
        training_statuses = spec.training_store.read_statuses(rels)
        # those not found: a zone-aware value stored in another zone, a long
        # value whose folder an earlier version named (see paths_in_zones)
        model_rels = _model_folders(spec, groups.keys, rels, training_statuses)
    pending = _PendingWrites(spec, heartbeat)
    # a task that starts after a cancel runs no group (once the cancel is
    # known in this process: asked now, or by another task under 0.5 s ago)
    cancelled = heartbeat.beat()
    # a local folder for files on their way to or from remote storage; a
    # local run writes in place and needs none
    remote_models = spec.kind == "predict" and not spec.training_store.is_local
    needs_scratch = remote_models or not spec.store.is_local
    scratch = scratch_folder() if needs_scratch else contextlib.nullcontext()
    # Dask runs a task again when its worker died while it ran (a group that
    # ran out of memory, crashed in native code): such a try goes carefully
    earlier = _statuses_of_an_earlier_try(spec, rels)
    careful = _CarefulTry(spec, pending, groups, rels, earlier) if earlier is not None else None
    if careful is None and rels and not cancelled:
        # a trace for the next try, should this one die before its first
        # batch of statuses is written (in its first groups): one small write
        _CarefulTry(spec, pending, groups, rels, {}).mark_first_group()
    with scratch as scratch_dir:
        model_prefetch = None
        if remote_models:
            model_prefetch = _ModelPrefetch(spec, model_rels, training_statuses, scratch_dir)
        for number, (key, rel, model_rel) in enumerate(zip(groups.keys, rels, model_rels)):
            group = groups.frame(number)
            if cancelled or heartbeat.beat():
                cancelled = True
                if careful is None or not careful.keep_if_stored(number):  # a stored DONE stays DONE
                    pending.add(_record(spec, key, rel, status="CANCELLED", rows=len(group), finished=_now()), {})
                continue
            if careful is not None:
                verdict = careful.before(number)
                if verdict == "failed" and spec.options.fail_fast:
                    pending.flush()
                    heartbeat.cancel_run()
                    cancelled = True
                if verdict != "run":
                    continue  # stored by an earlier try, or the group its worker died in
            record, files = run_group(
                spec, key, rel, group, heartbeat, training_statuses.get(model_rel), scratch_dir, check_memory,
                model_prefetch, model_rel, functools.partial(groups.frame, number),
            )
            pending.add(record, files)
            if careful is not None:
                careful.after()
            if spec.options.fail_fast and record["status"] != "DONE":
                pending.flush()
                heartbeat.cancel_run()
                cancelled = True
        pending.flush()
    # the last progress only: checking for a cancel now, with every group
    # done, would cost a round trip to the scheduler for nothing
    heartbeat.report()
    return TaskRecords(pending.written)


_FINAL = frozenset({"DONE", "FAILED", "CANCELLED", "INTERNAL_ERROR"})


def _statuses_of_an_earlier_try(spec: RunSpec, rels: list[str]) -> dict[str, dict] | None:
    """The statuses this run's earlier try of this task stored, by folder,
    or None if there was none (the usual case: one small read).

    Dask runs a task again on another worker when the worker running it
    died, which a group does that needs more memory than its worker has,
    crashes in native code or calls ``os._exit``. Run as before, the task
    would redo its finished groups and die in the same group again, until
    Dask gives up (``distributed.scheduler.allowed-failures``) and every group
    after that one is lost. An earlier try shows in storage: its first group's
    status (the mark it wrote before running it, or the group's outcome)
    carries this run's attempt. Then the task goes carefully
    (:class:`_CarefulTry`)."""
    if not rels:
        return None
    try:
        first = spec.store.read_json(spec.store.path(rels[0], PARTITION_FILE))
    except Exception:  # none yet (FileNotFoundError), or unreadable: no evidence
        return None
    if not isinstance(first, dict) or first.get("attempt") != spec.attempt:
        return None
    return spec.store.read_statuses(rels, spec.attempt)


# How many groups a careful try marks RUNNING at once (one batch of small
# writes; on an object store, one round of concurrent requests)
_CAREFUL_BATCH = 32


class _CarefulTry:
    """A task's try after an earlier try's worker died (see
    :func:`_statuses_of_an_earlier_try`), so that the group that takes
    its worker down fails alone and the task's other groups go on:

    - a group the earlier tries stored final is kept as stored, not run again;
    - the next groups are marked RUNNING in storage, a batch at a time, before
      they run, and their statuses are written when the batch is done: a try
      that dies leaves the groups of its batch marked;
    - a group marked with a batch is one of those: it runs alone, marked
      ``alone``, with its status written right after;
    - a group marked alone is the one its worker died in: FAILED, not run.

    So the group is found in two tries after the first (three deaths in all,
    within Dask's default four tries), at the cost of one batch of marks per
    32 groups and the suspects run one by one. A first try marks its first
    group alone the same way (as a batch of one), before it runs: a try that
    dies before its first batch of statuses is written leaves that trace,
    and its first group is then a suspect like any other. "Alone" is alone in its task:
    on a worker with several threads, other tasks may have been running in
    the same process when it died, and one of their groups may be the cause.
    Such a group is not blamed: it is INTERNAL_ERROR, saying so, and
    ``retry_failed()`` runs it again.
    """

    def __init__(self, spec: RunSpec, pending: "_PendingWrites", groups: "SortedGroups", rels: list[str],
                 earlier: dict[str, dict]):
        self.spec, self.pending, self.groups, self.rels, self.earlier = spec, pending, groups, rels, earlier
        self.marked_until = 0  # groups before this number have been marked or settled
        self.alone = False  # the group running now was marked alone

    def keep_if_stored(self, number: int) -> bool:
        """Keep group ``number`` as an earlier try stored it, if it is final there."""
        stored = self.earlier.get(self.rels[number])
        if stored is not None and stored.get("status") in _FINAL:
            self.pending.kept(stored)  # done by an earlier try: not again
            return True
        return False

    def before(self, number: int) -> str:
        """``"kept"``: an earlier try stored group ``number``; ``"failed"``: its
        worker died in it (or ``"lost"``: with other tasks beside it);
        ``"run"``: it is marked, run it."""
        if self.keep_if_stored(number):
            return "kept"
        rel, key = self.rels[number], self.groups.keys[number]
        stored = self.earlier.get(rel)
        # an earlier try may have died while it wrote this group's files
        self.spec.store.remove_temp_files(rel)
        if stored is not None and stored.get("alone"):
            record = _record(
                self.spec, key, rel, status="FAILED", rows=self.groups.size(number),
                error=_died_in_group_message(key),
            )
            if stored.get("others"):
                record.update(status="INTERNAL_ERROR", error=_died_in_group_message(key, others=stored["others"]))
            ttl = restarted_for_no_heartbeat(stored.get("worker"))
            if ttl is not None:
                record.update(error=no_heartbeat_message(key, ttl))
            self.pending.add(record, {})
            self.pending.flush()
            return "failed" if record["status"] == "FAILED" else "lost"
        self.alone = stored is not None  # marked with a batch when a worker died: now alone
        if self.alone:
            self._mark([number], alone=True)
        elif number >= self.marked_until:
            batch = range(number, min(number + _CAREFUL_BATCH, len(self.rels)))
            self._mark([n for n in batch if self.rels[n] not in self.earlier], alone=False)
            self.marked_until = batch.stop
        return "run"

    def mark_first_group(self) -> None:
        """A first try's mark of its first group only (see the class)."""
        self._mark([0], alone=False)

    def after(self) -> None:
        """A group marked alone has its status written at once: left pending,
        its mark would name it if the worker died in a later group."""
        if self.alone:
            self.pending.flush()

    def _mark(self, numbers: list[int], alone: bool) -> None:
        # what ran before is written first: a mark must never outlive its
        # group's finished status in a try that dies later
        self.pending.flush()
        if not numbers or self.pending.heartbeat.check_superseded():
            return
        extra = {"alone": True, "others": _other_tasks_running()} if alone else {"alone": False}
        extra["worker"] = _worker_address()  # see no_heartbeat_message
        marks = {
            self.spec.store.path(self.rels[n], PARTITION_FILE): json.dumps(_record(
                self.spec, self.groups.keys[n], self.rels[n], status="RUNNING", rows=self.groups.size(n),
                finished=_now(), **extra,
            ), default=str).encode()
            for n in numbers
        }
        self.spec.store.write_many(marks, atomic=False)


def _worker_address() -> str | None:
    try:
        return distributed.get_worker().address
    except Exception:  # not in a worker (unit tests)
        return None


def restarted_for_no_heartbeat(worker: str | None, client: distributed.Client | None = None) -> Any:
    """The worker-ttl (seconds) if the scheduler restarted (or removed) worker
    ``worker`` because it sent no heartbeat for longer than
    ``distributed.scheduler.worker-ttl``; None if it did not (or cannot be
    asked). A group that holds Python's GIL that long (native code that does
    not release it) leaves the worker no way to answer: without this, its
    error blamed memory or a crash, which the function did not do."""
    if not worker:
        return None
    try:
        events = (client or distributed.get_client()).get_events("scheduler")
    except Exception:  # an old scheduler, a closed client: the usual message then
        logger.debug("could not read the scheduler's events", exc_info=True)
        return None
    for _, msg in events:
        if isinstance(msg, dict) and msg.get("action") == "worker-ttl-timed-out" and worker in msg.get("workers", ()):
            return msg.get("ttl")
    return None


def no_heartbeat_text(ttl: Any) -> str:
    """Why a worker restarted for its worker-ttl of ``ttl`` seconds was, and
    what to do (the end of a group's error)."""
    return (
        f"the worker sent no heartbeat for over {ttl} s (distributed.scheduler.worker-ttl), most often "
        f"because a group held Python's GIL that long (native code that does not release it) and the "
        f"worker could not answer. Set distributed.scheduler.worker-ttl, where the scheduler starts, above "
        f"the longest group's time, then retry_failed() runs it again"
    )


def no_heartbeat_message(key: tuple, ttl: Any) -> str:
    """The error of a group that ran alone in its task when the scheduler
    restarted its worker for want of heartbeats, after ``ttl`` seconds (see
    :func:`restarted_for_no_heartbeat`)."""
    partition_id = key[0] if len(key) == 1 else key
    return (
        f"the scheduler restarted the worker process running group {partition_id!r} while the group ran: "
        + no_heartbeat_text(ttl)
    )


def _other_tasks_running() -> int:
    """How many other tasks this worker process is running now (its other
    threads'): if it dies, one of theirs may be the cause."""
    try:
        state = distributed.get_worker().state
        return max(len(state.executing) + len(state.long_running) - 1, 0)
    except Exception:  # not in a worker (unit tests), or another distributed
        return 0


def _died_in_group_message(
    key: tuple, then: str = "the task's other groups went on without it", others: int = 0
) -> str:
    """The error of a group its worker died in, in a try of its task that
    had marked it RUNNING alone (see :class:`_CarefulTry`); ``others``: how
    many other tasks ran in that worker process then (none: it is blamed)."""
    partition_id = key[0] if len(key) == 1 else key
    died = f"the worker process running group {partition_id!r} died while the group ran"
    # Dask's KilledWorker text ends its sentence (".../killed.html."): a
    # sentence follows ``then`` here, and "killed.html.. Unless" read as a typo
    then = then.rstrip(".")
    if others:
        return (
            f"{died} alone in its task, but {others} other task(s) ran in the same process then (a "
            f"worker with several threads), and a group of theirs may have been the cause; {then}. Run "
            f"it again with retry_failed(); on workers with one thread each, a group that takes its "
            f"worker down is named"
        )
    # a worker stopped from outside (a preempted node, a worker killed rather
    # than retired) dies the same way, and Dask counts it the same: on a
    # cluster that does that, a long group can meet it in two tries in a row
    return (
        f"{died}, in a later try of its task (Dask runs a task again when its worker dies): the "
        f"function, or saving its model, needs more memory than a worker has, or crashed the process "
        f"(native code, os._exit); {then}. Unless its workers were stopped from outside while it ran, "
        f"in each try (preempted or spot nodes, workers killed rather than retired): then the group is "
        f"not at fault, and retry_failed() runs it again"
    )


def _model_folders(spec: RunSpec, keys: list[tuple], rels: list[str], training_statuses: dict[str, dict]) -> list[str]:
    """Each group's folder in the training run. A time-zone-aware value that
    the training run stored in another zone (the input in UTC, the training
    data in Europe/Paris) has its model in that zone's folder; the statuses
    found there are added to ``training_statuses``."""
    candidates = {
        rel: paths_in_zones(spec.by, key, spec.training_zones)
        for key, rel in zip(keys, rels)
        if rel not in training_statuses
    }
    wanted = [path for paths in candidates.values() for path in paths]
    if not wanted:
        return rels
    training_statuses.update(spec.training_store.read_statuses(wanted))
    moved = {
        rel: next((path for path in paths if path in training_statuses), rel)
        for rel, paths in candidates.items()
    }
    return [moved.get(rel, rel) for rel in rels]


class TaskRecords(list):
    """What a task returns: its groups' records, one small dict each.

    A list, so that ``future.result()`` reads as one; a subclass, so that
    Dask pickles it whole. Dask sends a plain list of dicts as one message
    frame per dict: a task of 25,000 groups took 0.3 s to pack in the
    worker (its event loop, beside the next task) and 1-1.6 s until the
    client had it, against 0.016 s to pack as one pickle.
    """


def _compact(record: dict) -> dict:
    """What travels back to the client: the stored record without what the
    client already knows (attempt id) or what is empty, so that 200,000
    records stay small in the client's memory.

    A group's logs and traceback (up to ``max_log_chars`` each) stay in its
    stored ``_partition.json``, where the handle reads them when asked: 10,000
    groups that each print a page would otherwise keep hundreds of MB in the
    client and in the workers' task results. Except an INTERNAL_ERROR's,
    which may be about the very status that could not be written.
    """
    text_kept = record.get("status") == "INTERNAL_ERROR"
    return {
        key: value
        for key, value in record.items()
        if key in ("path", "status", "partition_id")
        or (key not in ("attempt", "submission", "finished") and value and (text_kept or key not in GROUP_TEXT))
    }


# --------------------------------------------------------------------------
# the client side


def versions() -> dict:
    import platform

    from . import __version__

    return {
        "dask_manymodel": __version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "pandas": pd.__version__,
        "python": platform.python_version(),
    }


def start_run(kind: str, func: Callable, dataframe: Any, **arguments: Any):
    """Validate, count, shuffle and submit a run; return its live handle.

    This is what ``ddf.manymodel.train``, ``ManyModelTraining.run`` and the
    others call (arguments as :func:`_start_run`). See
    :class:`dask_manymodel.ManyModelRun` for the handle. Called from a Dask
    task, it leaves the worker's thread pool while it waits on the cluster.
    """
    with outside_the_worker_pool():
        return _start_run(kind, func, dataframe, **arguments)


def _check_training_run(store: RunStore, training_run_id: Any, run_id: str, by: list) -> tuple[RunStore, dict]:
    """A predict's training run: its store and ``_run.json``, refused unless
    it is a training run by the same columns (one still going on, unless
    the groups this predict needs are trained)."""
    check_run_id(training_run_id, "training_run_id")
    if training_run_id == run_id:
        raise InvalidArgumentError(
            f"run_id {run_id!r} is the training run's id; give the inference run its own"
        )
    training_store = store.sibling(training_run_id)
    training_manifest = _read_manifest_or_none(training_store)
    if training_manifest is None:
        raise RunNotFoundError(
            f"training run {training_run_id!r} does not exist at {store.url_shown}; "
            f"train it first or check training_run_id and url"
        )
    if training_manifest.get("kind") != "train":
        raise InvalidArgumentError(
            f"run {training_run_id!r} at {store.url_shown} is a {training_manifest.get('kind')} "
            f"run, not a training run"
        )
    if list(training_manifest["partition_by"]) != [str(c) for c in by]:
        raise InvalidArgumentError(
            f"by={by!r} differs from the training run's partition_by "
            f"{training_manifest['partition_by']!r}"
        )
    if training_manifest["status"] == "IN_PROGRESS":
        _refuse_a_training_in_progress(training_store, training_manifest)
    return training_store, training_manifest


def _check_existing_run(
    store: RunStore,
    kind: str,
    by: list,
    on_existing_artifacts: str,
    serde: ModelSerde | None,
    training_run_id: str | None,
    training_manifest: dict | None,
) -> dict | None:
    """What is stored under the run's id, as ``on_existing_artifacts``
    allows: for a resume, the ``_run.json`` of the run it resumes (refused
    unless it is the same kind of run, by the same columns, serde and
    training run); otherwise None, refused with "error" when a run is there."""
    run_id = store.run_id
    if on_existing_artifacts == "resume":
        previous = _read_manifest_or_none(store)
        if previous is None:
            _refuse_a_fileset(store)
            raise RunNotFoundError(
                f"cannot resume run {run_id!r}: it does not exist at {store.url_shown}"
            )
        if previous.get("kind") != kind or previous.get("partition_by") != [str(c) for c in by]:
            raise InvalidArgumentError(
                f"cannot resume run {run_id!r}: it is a {previous.get('kind')} run by "
                f"{previous.get('partition_by')!r}, not a {kind} run by {[str(c) for c in by]!r}"
            )
        _check_resume_matches(previous, serde, training_run_id, training_manifest)
        return previous
    # (run_exists refuses a folder that is no run, a FileSet's among them,
    # which an overwrite would delete)
    if run_exists(store, likely=on_existing_artifacts == "overwrite") and on_existing_artifacts == "error":
        raise RunExistsError(_exists_message(run_id, store))
    return None


@dataclass(frozen=True)
class _TaskPlan:
    """Which task runs each group of a run: see :func:`_plan_tasks`."""

    npartitions: int  # the partitions the tasks read: the shuffle's, or the input's
    parts: np.ndarray  # per counted group, its partition (-1: it does not run)
    task_of_group: np.ndarray  # per counted group, its task (-1: it does not run)
    task_part: np.ndarray  # per task, the partition it reads
    task_keys: list  # per task, its groups' keys where its partition is split into tasks, else None
    task_rows: np.ndarray  # per task, its rows


def _plan_tasks(
    counts: pd.DataFrame,
    pending: np.ndarray,
    shuffle: bool,
    asked: int | None,
    default: int,
    input_npartitions: int,
) -> _TaskPlan:
    """Share the groups to run (``pending``, per row of ``counts``: the
    count's groups in its order) out to tasks. Shuffled, into the
    partitions ``asked`` for (``ExecutionOptions.npartitions``), else
    ``default``, at most one per group, balanced by rows, a task each. Not
    shuffled (the input is partitioned by the group columns already), each
    group runs where it is, in a task of its own input partition, large
    partitions split so that there are about ``default`` tasks.

    Tasks are numbered largest first (by rows) and started in that order: a
    big task started last would leave the other workers idle at the end.
    """
    sizes = counts[_ROWS].to_numpy()
    subtask = np.zeros(len(counts), dtype=np.int64)
    if shuffle:
        npartitions = min(asked or default, int(pending.sum()))
        parts = np.full(len(counts), -1, dtype=np.int64)
        parts[pending] = assign_groups(sizes[pending], npartitions)
    else:
        npartitions = input_npartitions
        parts = np.where(pending, counts[_HOME].to_numpy(), -1)
        subtask = split_partitions(parts, sizes, pending, default)
    # one task per (partition, subtask) with groups to run
    pending_index = np.flatnonzero(pending)
    stride = int(subtask.max()) + 1  # (partition, subtask) as one number
    pairs = parts[pending] * stride + subtask[pending]
    pair_ids, pair_of_group = np.unique(pairs, return_inverse=True)
    pair_rows = np.bincount(pair_of_group, weights=sizes[pending])
    largest_first = np.argsort(-pair_rows, kind="stable")  # pair of each task
    task_of_pair = np.empty(len(pair_ids), dtype=np.int64)
    task_of_pair[largest_first] = np.arange(len(pair_ids))
    task_of_pending = task_of_pair[pair_of_group]
    task_of_group = np.full(len(counts), -1, dtype=np.int64)
    task_of_group[pending_index] = task_of_pending
    task_part = (pair_ids // stride)[largest_first]
    # a partition split into several tasks: each keeps only its own groups
    split = np.bincount(task_part, minlength=npartitions) > 1
    task_keys = [
        counts.index[pending_index[task_of_pending == task]] if split[task_part[task]] else None
        for task in range(len(pair_ids))
    ]
    return _TaskPlan(
        npartitions=npartitions, parts=parts, task_of_group=task_of_group, task_part=task_part,
        task_keys=task_keys, task_rows=pair_rows[largest_first],
    )


def _submit_tasks(
    client: distributed.Client,
    name: str,
    spec_future: distributed.Future,
    partitions: list,
    plan: _TaskPlan,
    options: ExecutionOptions,
    index_to_column: str | None = None,
) -> list[distributed.Future]:
    """Submit the run's tasks (one per task of ``plan``, reading its
    partition of ``partitions``, see :func:`run_partition` for
    ``index_to_column``) in one go; returns their futures, largest task
    first."""
    # Tasks of about one size run where their input partition is: the
    # scheduler balances them by count, and nothing moves. Uneven tasks (a
    # split partition, a group much larger than the rest) are held in the
    # scheduler's queue instead and handed out, largest first, as worker
    # threads free up; left to locality, one worker got the big task and a
    # queue besides while the other idled at the end (W3 in benchmarks/).
    hand_out = bool(plan.task_rows.max() > 1.5 * plan.task_rows.mean())
    # Submitted as a graph of our own rather than through map_partitions:
    # query planning drops dask.annotate, and only these tasks (not the
    # shuffle) may carry resources such as {"GPU": 1}. One submission for
    # all of them, so that the scheduler sees them together.
    graph = {
        (name, task): _partition_task(
            (name, task), spec_future, partitions[part], plan.task_keys[task], hand_out, index_to_column
        )
        for task, part in enumerate(plan.task_part)
    }
    # largest first: the scheduler starts higher priorities first (a lambda,
    # so that it travels by value to a scheduler without dask_manymodel)
    with dask.annotate(priority=lambda key: -key[1] if isinstance(key, tuple) and key[0] == name else 0):
        return list(
            client.get(graph, list(graph), sync=False, resources=options.resources, retries=options.task_retries)
        )


def _start_run(
    kind: str,
    func: Callable,
    dataframe: Any,
    *,
    by: Any,
    url: str,
    run_id: str,
    storage_options: dict | None = None,
    serde: ModelSerde | None = None,
    on_existing_artifacts: str = "error",
    execution_options: ExecutionOptions | None = None,
    training_run_id: str | None = None,
    meta: pd.DataFrame | None = None,
):
    """:func:`start_run`'s work."""
    from .run import ManyModelRun, PartitionStatus, _aggregate

    # 1. everything that needs no compute -----------------------------------
    check_function(func, kind)
    warn_if_function_carries_large_data(func, kind)
    given = as_dask_dataframe(dataframe)
    ddf = index_as_column(given, by)
    check_reserved_columns(ddf)
    by = check_by(by, ddf)
    check_run_id(run_id)
    check_on_existing(on_existing_artifacts)
    # only None means the defaults: execution_options=[] (or 0, {}) ran with
    # them without a word, where {'npartitions': 2} is refused
    options = ExecutionOptions() if execution_options is None else execution_options
    if not isinstance(options, ExecutionOptions):
        raise InvalidArgumentError(
            f"execution_options must be an ExecutionOptions, got {type(options).__name__}"
        )
    store = RunStore(
        url,
        run_id,
        storage_options,
        retries=options.storage_retries,
        retry_backoff=options.storage_retry_backoff,
    )
    check_reachable(store)
    meta, output_schema = check_meta(meta, by)
    if options.shuffle == "always" or options.npartitions is not None:
        # a shuffle is certain: columns no shuffle carries are refused now,
        # not after the count has read (and computed) the whole input
        _shuffle_method(ddf, options.shuffle_method)

    training_store = training_manifest = training_zones = None
    if kind == "predict":
        training_store, training_manifest = _check_training_run(store, training_run_id, run_id, by)
        serde = _inference_serde(serde, training_manifest, training_run_id)
        training_zones = _training_zones(training_store, ddf, by)
    elif kind == "train":
        serde = check_serde(serde)
    else:
        serde = None
    previous = _check_existing_run(
        store, kind, by, on_existing_artifacts, serde, training_run_id, training_manifest
    )

    # 2. count rows per group: the only compute before anything is written --
    client = get_or_start_client()
    # before the first task: one the workers cannot load closes the worker
    check_workers_environment(client, serde)
    asked = check_workers_share_store(store, client)
    warn_if_no_workers(client)
    warn_if_no_worker_offers(options.resources, client)
    # read the input once: the count and the run both start from its
    # persisted partitions (a run persists its shuffled rows anyway, so this
    # needs no more memory); an input persisted already is read as it is
    lazy = ddf
    partitions = persisted_partitions(ddf)
    index_to_column = None  # what the count and the tasks do to each partition first
    if partitions is None:
        partitions, index_to_column = persisted_under_index_as_column(given, ddf)
    if partitions is None:
        ddf = client.persist(ddf)
        partitions = persisted_partitions(ddf) or _sorted_futures(ddf)
    counting = submit_count(
        ddf, by, client, partitions, with_bytes=bool(options.max_group_memory_fraction), index_to_column=index_to_column
    )
    attempt = previous["attempt"] if previous else uuid.uuid4().hex
    submission = uuid.uuid4().hex
    spec = RunSpec(
        kind=kind,
        run_id=run_id,
        attempt=attempt,
        by=by,
        func=func,
        store=store,
        serde=serde,
        options=options,
        # per submission, not per attempt: a resumed run must not find the
        # cancel event of the submission it resumes, nor its task keys
        cancel_event=f"manymodel-cancel-{submission}",
        progress_topic=PROGRESS_TOPIC,
        training_store=training_store,
        training_attempt=training_manifest.get("attempt") if training_manifest else None,
        training_zones=training_zones,
        submission=submission,
        output_schema=output_schema,
        columns=list(ddf.columns),
    )
    # loaded by a worker while the workers count; before anything is
    # written, so that a function that cannot be pickled or loaded leaves no
    # half-made run behind
    spec_future = send_spec(spec, client)
    try:
        counts = counting.result()
    except concurrent.futures.CancelledError as exc:
        if not any(future.cancelled() for future in partitions):
            raise
        # the persisted input is gone from the cluster: Dask names only the
        # count's task ("lost dependencies"), not what happened nor what to do
        raise InvalidArgumentError(
            f"cannot start run {run_id!r}: {INPUT_GONE}. Build the dataframe again from its source "
            f"(dd.read_parquet(...), then .persist() if you like) and start the run with it; to keep the "
            f"DONE groups of an earlier start (whose retry_failed() reads the gone partitions), pass "
            f"on_existing_artifacts='resume'. Nothing of this start was written"
        ) from exc
    except TypeError as exc:
        # also values of types that do not sort together (bytes next to ints
        # in an object column): "hashable scalars" alone misled, they are
        raise InvalidArgumentError(
            f"cannot group by {by!r}: {exc}; group values must be hashable scalars "
            f"(not lists or dicts), of types that compare with each other in each column "
            f"(not bytes next to numbers): make the column(s) one type (e.g. .astype(str))"
        ) from exc
    check_spec_loads(spec_future)
    if asked == 0:
        # a local folder, and no worker to ask before the count (a cluster
        # scaling up, adapt()): the count ran on the workers that came
        check_workers_see_local_folder(store, client)

    keys: pd.Index = counts.index
    sizes = counts[_ROWS].to_numpy()
    key_tuples = [_as_key_tuple(k, keys) for k in keys]
    _check_scalar_keys(by, key_tuples)
    groups = [
        {"partition_id": _json_key(k), "path": group_path(by, k), "rows": int(n)}
        for k, n in zip(key_tuples, sizes)
    ]
    paths = [g["path"] for g in groups]
    if len(set(paths)) != len(paths):
        # e.g. 1 and "1" in one object column share the folder "store=1"
        clash = collections.Counter(paths).most_common(1)[0][0]
        raise InvalidArgumentError(
            f"two different group values map to the same folder {clash!r}; make the "
            f"{by!r} column(s) one type (e.g. .astype(str))"
        )

    threads = planned_threads(client)
    shuffle = needs_shuffle(counts, ddf.npartitions, threads, options.shuffle, options.npartitions is not None)
    shuffle_method = _shuffle_method(ddf, options.shuffle_method) if shuffle else None
    refused = _too_big_to_shuffle(counts, options, client, shuffle_method) if shuffle else {}

    # 3. write the manifest (the run now exists) -----------------------------
    done_paths: set[str] = set()
    initial_records: list[dict] = []
    stale: list[str] = []
    moved: list[str] = []
    counted_paths = [g["path"] for g in groups]  # in the order of `sizes`
    if previous is not None:
        groups, done_paths, initial_records, stale, moved = _merge_for_resume(store, previous, groups)
    _check_case_clash(store, by, groups)  # with a resumed run's stored groups too
    # groups too big to shuffle: INTERNAL_ERROR now, left out of the shuffle
    refused_records = [
        _record(spec, key_tuples[position], counted_paths[position], status="INTERNAL_ERROR",
                rows=int(sizes[position]), error=error, finished=_now())
        for position, error in refused.items()
        if counted_paths[position] not in done_paths
    ]
    initial_records += refused_records  # (a resume keeps no outcome of a group it runs again)
    refused_paths = {r["path"] for r in refused_records}
    manifest = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "kind": kind,
        "partition_by": [str(c) for c in by],
        "serde": serde_to_manifest(serde) if serde is not None else None,
        "training_run_id": training_run_id,
        "training_attempt": spec.training_attempt,
        "created": previous["created"] if previous else _now(),
        "finished": None,
        "status": "IN_PROGRESS" if len(groups) > len(done_paths) else "SUCCESS",
        "attempt": attempt,
        "submission": submission,
        "n_groups": len(groups),
        "counts": {},
        "cancelled": False,
        "versions": versions(),
    }
    _write_manifest(store, manifest, on_existing_artifacts, delete_old=False)
    # from here until the tasks are submitted, a failure (the store, the
    # shuffle) must not leave the run IN_PROGRESS for good
    kept_done = sum(r["status"] == "DONE" for r in initial_records)
    with _marked_failed_if_it_fails(store, manifest, kept_done):
        if on_existing_artifacts == "overwrite":
            # the old files, once the new manifest makes their statuses stale
            store.delete_run(keep=(RUN_MANIFEST,))
        if moved:
            # the old folders of groups that run again in their folders of
            # today (see _merge_for_resume): only now, as a start refused
            # before its manifest deletes nothing
            remove_paths(store.fs, [store.path(path) for path in moved])
        # the outcomes the earlier pass stored for the groups that run again
        # (until they are gone, readers skip them: another submission's, see
        # ManyModelRun._read_statuses), and with them the model or
        # part-0.parquet an earlier start of such a group wrote (it may have
        # been killed after its file, before its status): a rerun that fails,
        # returns None or is cancelled writes none, and the old file stayed
        # beside its FAILED status, read by any hive reader of the run's
        # folder (pd.read_parquet counted a FAILED group's old predictions).
        # Of every group that runs again, status or not, in the one batched
        # delete. ctx.upload's files stay: their names are the user's.
        own_names = sorted(spec.own_file_names) if previous is not None else []  # (no earlier start: no files)
        doomed = [store.path(path, name) for path in counted_paths if path not in done_paths for name in own_names]
        doomed += [store.path(path, PARTITION_FILE) for path in stale]
        if doomed:
            store.delete_files(doomed)
        if previous is not None and store.is_local:
            # and the temp files of writes killed half-way (a worker out of
            # memory while a model of GBs streamed to its file): Dask's next
            # try of the task removes them (_CarefulTry), but where it gave
            # the task up, none came, and the rerun wrote its model beside
            # the dead one's file, which stayed for good
            for path in counted_paths:
                if path not in done_paths:
                    store.remove_temp_files(path)
        for record in refused_records:
            _write_status(spec, record)
        # kept in memory by the handle for retry_failed(); never written anywhere
        # ("input": the frame as given, which retry_failed() starts from: a
        # persisted one with a named index is then read as it is again)
        source = {
            "dataframe": lazy, "input": given, "execution_options": options, "meta": meta,
            "storage_options": storage_options,
        }
        todo = [p for p in counted_paths if p not in done_paths and p not in refused_paths]
        if not todo:
            # a resume whose data holds no group left to run: the outcomes stored
            # (DONE, or FAILED for a group no longer in the data) are final
            statuses = [PartitionStatus(r["status"]) for r in initial_records]
            statuses += [PartitionStatus.PENDING] * (len(groups) - len(initial_records))  # not in the data
            manifest.update(
                status=_aggregate(statuses, False, True).value,
                counts={status.value: n for status, n in collections.Counter(statuses).items()},
                finished=_now(),
            )
            logger.info("run %r has no group to run: it is a %s", run_id, manifest["status"])
            store.write_json(store.path(GROUPS_FILE), groups, indent=None)
            store.write_json(store.path(RUN_MANIFEST), manifest)
            return ManyModelRun(
                store=store, manifest=manifest, groups=groups, client=client, spec=spec, futures=[],
                meta=meta, initial_records=initial_records, source=source,
            )

        # 4. bring each group's rows into one partition ------------------------
        # counted groups in count order; DONE ones (resume) get -1 and are dropped
        pending = np.array([p not in done_paths and p not in refused_paths for p in counted_paths], dtype=bool)
        plan = _plan_tasks(
            counts, pending, shuffle, options.npartitions, default_npartitions(threads, len(todo)), ddf.npartitions
        )
        npartitions, parts = plan.npartitions, plan.parts
        by_path = {g["path"]: g for g in groups}
        for path, task in zip(counted_paths, plan.task_of_group):
            by_path[path]["task"] = int(task)
        store.write_json(store.path(GROUPS_FILE), groups, indent=None)
        if shuffle or done_paths:  # (refused groups only in a run that shuffles)
            tagged = ddf.map_partitions(
                _tag_partition,
                by,
                keys,
                parts,
                list(ddf._meta.columns),
                meta=ddf._meta.assign(**{PARTITION_COLUMN: np.int64(0)}),
                token="manymodel-assign",
            )
            if done_paths or refused_paths:
                tagged = tagged[tagged[PARTITION_COLUMN] >= 0]
            if shuffle:
                shuffle_kwargs = {"shuffle_method": shuffle_method} if shuffle_method else {}
                # explicit divisions 0..n: output partition i holds exactly the groups assigned to i
                ready = tagged.set_index(PARTITION_COLUMN, divisions=list(range(npartitions + 1)), **shuffle_kwargs)
            else:
                ready = tagged.drop(columns=PARTITION_COLUMN)
            ready = client.persist(ready)
            ordered = _sorted_futures(ready)
            index_to_column = None  # (made from ddf itself: its index is a column already)
        else:  # each task reads its input partition as it is
            ready, ordered = ddf, partitions
        assert len(ordered) == npartitions, (len(ordered), npartitions)

        # 5. one task per output partition --------------------------------------
        futures = _submit_tasks(
            client, f"manymodel-{kind}-{submission}", spec_future, ordered, plan, options, index_to_column
        )
        del ready, ordered  # the tasks hold them now
    return ManyModelRun(
        store=store, manifest=manifest, groups=groups, client=client, spec=spec, futures=futures,
        meta=meta, initial_records=initial_records, source=source,
    )


def _partition_task(
    key: tuple, spec: Any, frame: Any, keep: pd.Index | None, hand_out: bool, index_to_column: str | None = None
) -> Any:
    """The graph node of one task. ``hand_out`` marks it as a data producer,
    which the scheduler treats as root-ish: queued on the scheduler and
    given to the next free worker thread, not placed by data locality."""
    from dask._task_spec import Task

    try:
        return Task(key, run_partition, spec, frame, keep, index_to_column, _data_producer=hand_out)
    except TypeError:  # a Dask without the flag: placed by locality
        return Task(key, run_partition, spec, frame, keep, index_to_column)


# The column Dask's shuffles (tasks, p2p, disk) add to say where each row
# goes, and drop after: an input column of that name is dropped with it.
DASK_SHUFFLE_COLUMN = "_partitions"


def check_shuffle_labels(columns: pd.Index, why: str) -> None:
    """Refuse, before anything is written, the column labels that no shuffle
    of Dask's carries: ``_partitions`` (its own column: the groups got the
    input's columns less that one, silently) and a missing label (None,
    NaN: Dask checks each partition's labels against its meta's, NaN equals
    nothing, and every group was lost with its task)."""
    if DASK_SHUFFLE_COLUMN in columns:
        raise InvalidArgumentError(
            f"column {DASK_SHUFFLE_COLUMN!r} is the name of the column Dask's shuffle adds while it moves "
            f"the rows, and drops after, with the input's column of that name; {why}: rename it "
            f"(ddf.rename(columns={{{DASK_SHUFFLE_COLUMN!r}: ...}})); nothing is written"
        )
    unnamed = [c for c in columns if not isinstance(c, str) and pd.api.types.is_scalar(c) and pd.isna(c)]
    if unnamed:
        raise InvalidArgumentError(
            f"a column is labelled {unnamed[0]!r} (a missing value, not a name), which Dask cannot "
            f"shuffle: it matches no label, not even its own; {why}: name it "
            f"(ddf.columns = [...]); nothing is written"
        )


def p2p_loses(dtype: Any) -> bool:
    """Whether Dask's p2p shuffle fails on, or changes, a column of ``dtype``:
    pandas' ArrowDtype of a nested type (a list, a struct, a map) failed
    every group of the run (INTERNAL_ERROR: "data type 'list<item: int64>
    [pyarrow]' not understood", pandas reading its own Arrow metadata), and
    a decimal reached the groups as a column of Python objects. A
    categorical whose categories are not numpy's or text fails it or
    changes its values: pd.cut's bins (intervals) failed every group, times
    with a zone arrived in UTC without it, periods as periods, and a run
    keyed by such a column found none of its groups. A sparse column fails
    it. The tasks shuffle keeps them as they are."""
    if isinstance(dtype, pd.CategoricalDtype):
        categories = getattr(dtype.categories, "dtype", None)  # None: a categorical with no categories given
        return categories is not None and not isinstance(categories, (np.dtype, pd.StringDtype))
    if isinstance(dtype, pd.SparseDtype):
        return True
    arrow_type = getattr(dtype, "pyarrow_dtype", None)
    return arrow_type is not None and (pa.types.is_nested(arrow_type) or pa.types.is_decimal(arrow_type))


def _shuffle_method(ddf: dd.DataFrame, asked: str | None) -> str | None:
    """The shuffle's method: the one asked for (or set in Dask's config),
    else Dask's choice, except that Dask's p2p shuffle needs string column
    names (it fails in its last phase otherwise) and keeps Python objects
    only as far as Arrow does (a tuple fails, a list becomes an array): with
    such columns, the task-based shuffle. Columns that share a name are
    refused: no shuffle of Dask's keeps them as they are."""
    twice = ddf.columns[ddf.columns.duplicated()].unique().tolist()
    if twice:
        # p2p fails on them; tasks and disk hand the groups more columns than the input has
        raise InvalidArgumentError(
            f"column name(s) {twice[:3]!r} name more than one column, and this run must shuffle (its "
            f"groups are spread over the input's partitions), which Dask cannot do with such columns; "
            f"rename them (ddf.columns = [...]); nothing is written"
        )
    check_shuffle_labels(ddf.columns, "this run must shuffle (its groups are spread over the input's partitions)")
    not_strings = [c for c in ddf.columns if not isinstance(c, str)]
    if not not_strings:
        if asked is None and dask.config.get("dataframe.shuffle.method", None) is None:
            objects = [c for c, dtype in ddf._meta.dtypes.items() if dtype == object or p2p_loses(dtype)]
            if objects:
                # p2p sends rows through Arrow: tuples, mixed types fail every
                # group of the run, lists arrive as numpy arrays; pyarrow lists
                # and structs fail it too, decimals arrive as objects
                logger.debug("columns %r hold Python objects: shuffling with tasks, not p2p", objects[:3])
                return "tasks"
        return asked
    if asked == "p2p":
        raise InvalidArgumentError(
            f"shuffle_method='p2p' needs string column names, and {not_strings[:3]!r} are not; rename "
            f"them (ddf.columns = [str(c) for c in ddf.columns]) or use shuffle_method='tasks'"
        )
    return asked or "tasks"


@contextlib.contextmanager
def _marked_failed_if_it_fails(store: RunStore, manifest: dict, kept_done: int) -> Iterator[None]:
    """Between a run's ``_run.json`` and the submission of its tasks: if
    anything fails, mark the run ended (with the error) instead of leaving it
    IN_PROGRESS for good, and say in the error how to go on. A resume that
    keeps ``kept_done`` DONE groups is a PARTIAL_FAILURE (FAILURE means no
    group DONE), to be resumed again: an overwrite would throw them away."""
    try:
        yield
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        manifest.update(
            status="PARTIAL_FAILURE" if kept_done else "FAILURE",
            counts={"DONE": kept_done} if kept_done else {},
            finished=_now(),
            error=f"the run could not start: {reason}",
        )
        try:
            store.write_json(store.path(RUN_MANIFEST), manifest)
        except Exception:  # the store itself is what failed, most often
            logger.warning(
                "could not mark run %r at %s as failed", manifest["run_id"], store.url_shown, exc_info=True
            )
        advice = (
            f"run {manifest['run_id']!r} at {store.url_shown} was left unfinished (no task started); "
            f"start it again"
        )
        advice += (
            f" with on_existing_artifacts='resume' (or run.retry_failed()), which keeps its {kept_done:,} DONE groups"
            if kept_done
            else " with on_existing_artifacts='overwrite'"
        )
        if isinstance(exc, StorageError):
            raise StorageError(f"{exc}; {advice}") from exc
        exc.add_note(advice)
        raise


def _refuse_a_fileset(store: RunStore) -> None:
    """Raise if ``url/run_id`` holds a FileSet: a run and a FileSet share
    the URL's names, and ``on_existing_artifacts="overwrite"`` (which the
    error of an existing run suggests) deleted the snapshot, as it deletes
    an old run, and trained in its place."""
    from .fileset import CLAIM  # here: fileset.py imports this module

    if store.exists(store.path(CLAIM)):
        raise RunExistsError(
            f"{store.display()} holds a FileSet, not a run: a run cannot take its name (nor replace "
            f"it); choose another run_id, or delete the FileSet first (FileSet(url, "
            f"{store.run_id!r}).delete())"
        )


def _check_case_clash(store: RunStore, by: list, groups: list[dict]) -> None:
    """Refuse, before anything is written, group values whose folders differ
    only by case (``k=Store``, ``k=store``) on a store that takes them for one
    folder: each group would write its model over the other's, and both would
    read DONE, each with the model of whichever finished last. The store is
    asked only when two folders differ by case alone (a probe file: see
    :meth:`RunStore.ignores_case`)."""
    folded: dict[str, dict] = {}
    clash = None
    for group in groups:
        other = folded.setdefault(group["path"].lower(), group)
        if other is not group:
            clash = (other, group)
            break
    if clash is None or not store.ignores_case():
        return
    first, second = (json_key_to_partition_id(g["partition_id"]) for g in clash)
    raise InvalidArgumentError(
        f"group values {first!r} and {second!r} of {by!r} differ only by case, and the store at "
        f"{store.url_shown} takes file names that differ only by case for one (as macOS and Windows do by "
        f"default, and FAT/exFAT drives): their folders {clash[0]['path']!r} and {clash[1]['path']!r} "
        f"would be one, and each group would overwrite the other's model. Make the values differ "
        f"other than by case (e.g. .str.lower() if they are one group), or use a store that tells "
        f"case apart (a case-sensitive volume, an object store); nothing was written"
    )


def _exists_message(run_id: str, store: RunStore) -> str:
    return (
        f"run {run_id!r} already exists at {store.url_shown}; pass on_existing_artifacts='overwrite' "
        f"to replace it, 'resume' to run only its groups that are not DONE, or choose "
        f"another run_id"
    )


def _write_manifest(store: RunStore, manifest: dict, on_existing: str, delete_old: bool = True) -> None:
    """Make the run exist, so that no reader ever trusts a mix of two attempts.

    error: create ``_run.json`` exclusively; of two runs started at once with
    the same id, exactly one succeeds. overwrite: first the new manifest
    (with a new attempt id, so old ``_partition.json`` files stop counting),
    then delete the old files. resume: the manifest keeps its attempt id.
    """
    data = json.dumps(manifest, indent=1, default=str).encode()
    path = store.path(RUN_MANIFEST)
    try:
        if on_existing == "error":
            try:
                store.create_exclusive(path, data)
            except FileExistsError:
                raise RunExistsError(
                    _exists_message(manifest["run_id"], store)
                    + " (it was created while this run was being prepared)"
                ) from None
        else:
            store.write_bytes(path, data)
            if on_existing == "overwrite" and delete_old:
                store.delete_run(keep=(RUN_MANIFEST,))
    except PermissionError as exc:
        raise InvalidURLError(
            f"cannot write to {store.display()}: permission denied ({exc}); check the URL "
            f"and the credentials in storage_options"
        ) from exc


def _check_resume_matches(
    previous: dict, serde: ModelSerde | None, training_run_id: str | None, training_manifest: dict | None
) -> None:
    """A resumed run keeps its DONE groups, so it must write what they were
    written with: the same serde (another would leave the DONE models
    unreadable through the manifest's serde), and for predict the same
    training run, trained once (else the output mixes two of them)."""
    run_id = previous.get("run_id")
    advice = "resume it as it was started, or start it again with on_existing_artifacts='overwrite'"
    # compared as _run.json holds it (tuples become lists)
    asked = json.loads(json.dumps(serde_to_manifest(serde), default=str)) if serde is not None else None
    if asked is not None and previous.get("serde") not in (None, asked):
        written = previous["serde"]
        params = ", ".join(f"{name}={value!r}" for name, value in (written.get("params") or {}).items())
        raise InvalidArgumentError(
            f"cannot resume run {run_id!r} with serde {serde!r}: its DONE groups were written with "
            f"{written['class']}({params}); {advice}"
        )
    if training_manifest is None:
        return
    if previous.get("training_run_id") != training_run_id:
        raise InvalidArgumentError(
            f"cannot resume run {run_id!r} with training_run_id {training_run_id!r}: its DONE groups "
            f"used the models of training run {previous.get('training_run_id')!r}; {advice}"
        )
    if previous.get("training_attempt") not in (None, training_manifest.get("attempt")):
        raise InvalidArgumentError(
            f"cannot resume run {run_id!r}: training run {training_run_id!r} was trained again since "
            f"(its models changed), so the DONE groups used other models; start it again with "
            f"on_existing_artifacts='overwrite'"
        )


def _merge_for_resume(
    store: RunStore, previous: dict, counted: list[dict]
) -> tuple[list[dict], set[str], list[dict], list[str], list[str]]:
    """Groups of a resumed run: the stored ones plus any new ones in the data.

    Returns the merged group list, the paths of the groups already DONE
    (left untouched), their stored records, the groups that run again
    although this attempt stored an outcome for them (FAILED, CANCELLED, ...),
    and the folders to remove of groups that run again in another folder.
    Reads only: the caller deletes once its manifest is written.
    """
    try:
        stored_groups = store.read_run_file(GROUPS_FILE, list)
    except FileNotFoundError:
        stored_groups = []
    counted_paths = {g["path"] for g in counted}
    # a long value that an earlier version stored in a folder cut within a
    # character (see store.encode_value) runs again in its folder of today,
    # and its old folder goes (the caller removes it): else the run would
    # hold the group twice
    by = previous["partition_by"]
    moved = {
        g["path"] for g in stored_groups
        if g["path"] not in counted_paths
        and group_path(by, normalize_key(json_key_to_partition_id(g["partition_id"]), len(by))) in counted_paths
    }
    if moved:
        logger.info("run %r: %d group(s) stored by an earlier version run again in new folders, such as %r",
                    store.run_id, len(moved), min(moved))
        stored_groups = [g for g in stored_groups if g["path"] not in moved]
    merged = {g["path"]: {k: v for k, v in g.items() if k != "task"} for g in stored_groups}
    for group in counted:
        merged[group["path"]] = {**merged.get(group["path"], {}), **group}
    statuses = list(store.read_statuses(list(merged), previous["attempt"]).values())
    done_paths = {r["path"] for r in statuses if r.get("status") == "DONE"}
    rerun = {g["path"] for g in counted} - done_paths
    # groups that will not run again keep their stored outcome (DONE, or FAILED
    # for a group that is no longer in the data)
    kept = [r for r in statuses if r["path"] not in rerun]
    stale = [r["path"] for r in statuses if r["path"] in rerun]
    return list(merged.values()), done_paths, kept, stale, sorted(moved)


def _check_scalar_keys(by: list, key_tuples: list[tuple]) -> None:
    """Group values must be scalars: a list or array cannot name a folder."""
    for key in key_tuples:
        for column, value in zip(by, key):
            if isinstance(value, (list, tuple, dict, set, np.ndarray, pd.Series)):
                raise InvalidArgumentError(
                    f"column {column!r} holds {type(value).__name__} values such as {value!r}; "
                    f"group values must be hashable scalars (convert them, e.g. with "
                    f".astype(str))"
                )


def _json_key(key: tuple) -> Any:
    return key_to_json(key[0]) if len(key) == 1 else [key_to_json(v) for v in key]


def _refuse_a_training_in_progress(training_store: RunStore, manifest: dict) -> None:
    """A predict would fail the groups not trained yet, depending on timing,
    saying they were never trained. A run whose client died may say
    IN_PROGRESS with every group final: its groups tell (as restore_from)."""
    from .run import ManyModelRun, RunStatus

    try:
        groups = training_store.read_run_file(GROUPS_FILE, list)
    except FileNotFoundError:  # being set up right now
        groups = []
    training = ManyModelRun(store=training_store, manifest=manifest, groups=groups)
    if groups and training.status != RunStatus.IN_PROGRESS:
        return
    raise InvalidArgumentError(
        f"training run {training_store.run_id!r} at {training_store.url_shown} is still in progress: predict "
        f"once it has ended (run.wait()), or, if the process that ran it is gone, finish it first "
        f"(ddf.manymodel.train(..., on_existing_artifacts='resume')); nothing is written"
    )


def _read_manifest_or_none(store: RunStore) -> dict | None:
    try:
        return store.read_manifest()
    except FileNotFoundError:
        return None


def _training_zones(training_store: RunStore, ddf: dd.DataFrame, by: list) -> list[set[str]] | None:
    """The time zones of the training run's stored group values, per ``by``
    column, when the input's ``by`` columns may hold time-zone-aware values
    (a predict task then finds a model stored in another zone than its
    input's); None when they cannot, or the training run stored none."""
    if not any(_may_hold_zones(dtype) for dtype in ddf._meta[by].dtypes):
        return None
    try:
        stored = training_store.read_run_file(GROUPS_FILE, list)
    except Exception:  # a training run without its groups file: folders as they are
        logger.debug("could not read the groups of training run %r", training_store.run_id, exc_info=True)
        return None
    zones = stored_zones(stored, len(by))
    return zones if any(zones) else None


def _may_hold_zones(dtype: Any) -> bool:
    """Whether a column of ``dtype`` may hold time-zone-aware values."""
    if isinstance(dtype, pd.DatetimeTZDtype) or dtype == object:
        return True
    arrow = getattr(dtype, "pyarrow_dtype", None)  # pd.ArrowDtype(pa.timestamp("ns", tz="UTC"))
    return getattr(arrow, "tz", None) is not None


def _inference_serde(serde: ModelSerde | None, training_manifest: dict, training_run_id: str) -> ModelSerde:
    stored = training_manifest.get("serde") or {}
    if serde is None:
        rebuilt = serde_from_manifest(stored) if stored else None
        if rebuilt is None:
            raise InvalidArgumentError(
                f"cannot rebuild serde {stored.get('class')!r} of training run "
                f"{training_run_id!r}; pass serde= explicitly"
            )
        return rebuilt
    serde = check_serde(serde)
    if stored and serde.filename != stored.get("filename"):
        raise InvalidArgumentError(
            f"serde {serde!r} reads {serde.filename!r} but training run {training_run_id!r} "
            f"stored its models as {stored.get('filename')!r} with {stored.get('class')}; "
            f"pass a matching serde or leave serde=None"
        )
    return serde


def json_key_to_partition_id(data: Any) -> Any:
    """A stored partition_id back as a value (a tuple for several columns)."""
    if isinstance(data, list):
        return tuple(key_from_json(v) for v in data)
    return key_from_json(data)
