"""Where things live: the storage layout, group keys as path segments, and
atomic writes over fsspec.

Layout of one run (hive style, so any parquet tool can read predict output)::

    URL/RUN_ID/_run.json                  manifest (never credentials)
    URL/RUN_ID/_groups.json               every group of the run, written before compute
    URL/RUN_ID/<col>=<value>/model.pkl    the serde's file
    URL/RUN_ID/<col>=<value>/_partition.json   status of the group, written last

A group value becomes one path segment ``<col>=<percent-encoded value>``.
Every byte that could change the meaning of a path (``/``, ``\\``, ``%``,
NUL, ``~``) is percent-encoded, and the segment always starts with
``<col>=``, so no value can name ``.``, ``..`` or a folder outside its own.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import posixpath
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import quote

import fsspec
import numpy as np
import pandas as pd
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .exceptions import InvalidArgumentError, InvalidURLError, StorageError

logger = logging.getLogger(__name__)

RUN_MANIFEST = "_run.json"
#: The storage layout this code writes and reads (``format_version`` in
#: ``_run.json``); a run of a later layout is refused, never misread or
#: rewritten in this one by a resume.
FORMAT_VERSION = 1
# what every reader of a run's manifest relies on
_MANIFEST_KEYS = ("kind", "partition_by", "status")
GROUPS_FILE = "_groups.json"
PARTITION_FILE = "_partition.json"

#: What hive readers (pyarrow, Spark) read back as null.
NULL_SEGMENT = "__HIVE_DEFAULT_PARTITION__"
#: File systems cap a name at 255 bytes: the whole segment ``<col>=<value>``.
MAX_NAME_BYTES = 255
#: Longer values keep a prefix and a hash; a value takes this many characters
#: at most, fewer where the column's name leaves less of MAX_NAME_BYTES.
MAX_SEGMENT_CHARS = 200
_HASH_CHARS = 16
# the least room a value needs: the null marker, or a shortened value's "~" and hash
_MIN_VALUE_CHARS = max(len(NULL_SEGMENT), _HASH_CHARS + 1)

T = TypeVar("T")


# --------------------------------------------------------------------------
# group keys <-> path segments and JSON


def is_null(value: Any) -> bool:
    """True for None, NaN, NaT and pd.NA (what ``groupby(dropna=False)`` yields)."""
    if value is None:
        return True
    if type(value) is int or type(value) is str:  # the usual keys, without pd.isna
        return False
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # list-likes
        return False


def _as_pandas_time(value: Any) -> Any:
    """A date-time or duration as pandas' own type: numpy's (of any unit) and
    Python's have other texts (``.item()`` of a ns datetime64 is an int), so
    equal values would name different folders."""
    try:
        if isinstance(value, (np.datetime64, datetime.datetime)) and not isinstance(value, pd.Timestamp):
            return pd.Timestamp(value)
        if isinstance(value, (np.timedelta64, datetime.timedelta)) and not isinstance(value, pd.Timedelta):
            return pd.Timedelta(value)
    except (ValueError, OverflowError):  # beyond pandas' range: left as it is
        pass
    return value


def _as_text(value: Any) -> str:
    value = _as_pandas_time(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        # 1.0 == 1 and -0.0 == 0.0 for Python and pandas (one group, found by
        # merge): one folder too. A column of int keys with a missing value is
        # float64, and must still find the models trained on its ints.
        return str(int(value))
    if isinstance(value, (pd.Timestamp, datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, pd.Timedelta):
        return value.isoformat()
    return str(value)


# what quote() below leaves as it is (less "~")
_NEEDS_NO_QUOTING = re.compile(r"[A-Za-z0-9_.\-]*")


def _encode_text(text: str) -> str:
    # quote() leaves only letters, digits and "_.-~" alone; "~" is taken as
    # the marker of a shortened segment, so it is encoded too.
    if _NEEDS_NO_QUOTING.fullmatch(text):
        return text  # most keys and column names: a third of quote()'s time
    return quote(text, safe="", errors="surrogatepass").replace("~", "%7E")


# the escape of a UTF-8 byte that starts a character of 2, 3 or 4 bytes, and of
# one that continues it
_LEAD_ESCAPE = re.compile(r"%(?:C[2-9A-F]|D[0-9A-F]|E[0-9A-F]|F[0-4])")
_CONTINUATION_ESCAPE = re.compile(r"%[89AB][0-9A-F]")


def _whole_characters(prefix: str) -> str:
    """``prefix`` (percent-encoded, ending at a whole escape) without the
    escapes of a last character that it holds only part of."""
    end = len(prefix)
    continuations = 0
    while end >= 3 and _CONTINUATION_ESCAPE.fullmatch(prefix, end - 3, end):
        end -= 3
        continuations += 1
    if end >= 3 and _LEAD_ESCAPE.fullmatch(prefix, end - 3, end):
        lead = int(prefix[end - 2:end], 16)
        length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
        if continuations < length - 1:
            return prefix[: end - 3]
    return prefix


def encode_value(value: Any, max_chars: int = MAX_SEGMENT_CHARS, *, cut_within_characters: bool = False) -> str:
    """Turn one group value into the part of a path segment after ``=``.

    The mapping is deterministic, so the same value always finds the same
    folder (``7`` and ``"7"`` share one, and so do ``7.0``, and ``0.0`` and
    ``-0.0``: equal values are one group for pandas); it never yields ``/``, ``\\``, an
    empty name of its own, or more than ``max_chars`` characters (a longer
    one keeps a prefix of whole characters and a hash of the whole value).
    ``cut_within_characters``: the prefix as earlier versions cut it, at a
    whole ``%XX`` escape but maybe within a character's UTF-8 bytes (where
    their runs keep the models of long values: see :func:`paths_in_zones`).

    Examples
    --------
    >>> encode_value("a/b")
    'a%2Fb'
    >>> encode_value(None)
    '__HIVE_DEFAULT_PARTITION__'
    >>> encode_value(7.0), encode_value(7.5)
    ('7', '7.5')
    """
    if type(value) is int or type(value) is str:
        text = str(value)  # the usual keys: never null, their own text
    elif is_null(value):
        return NULL_SEGMENT
    else:
        text = _as_text(value)
    encoded = _encode_text(text)
    if encoded == NULL_SEGMENT:  # the string itself, not a null
        encoded = "%5F" + encoded[1:]
    if len(encoded) > max_chars:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        prefix = encoded[: max(0, max_chars - _HASH_CHARS - 1)]
        # do not cut a %XX escape in half
        cut = prefix.rfind("%", len(prefix) - 2)
        if cut != -1:
            prefix = prefix[:cut]
        if not cut_within_characters:
            # nor a character's UTF-8 bytes ("%D0" of "%D0%B0"): hive readers
            # decode the folder name, and pyarrow refuses the whole dataset
            # over one name that is not UTF-8
            prefix = _whole_characters(prefix)
        encoded = f"{prefix}~{digest[:_HASH_CHARS]}"
    return encoded


@functools.lru_cache(maxsize=256)
def column_segment(column: str) -> tuple[str, int]:
    """A ``by`` column's encoded name, and how many characters its values may
    take so that the segment ``<name>=<value>`` stays within
    :data:`MAX_NAME_BYTES` (encoded names are ASCII: characters are bytes).

    Raises
    ------
    InvalidArgumentError
        The name leaves too little room for a value (even a null, or a
        shortened value's hash).
    """
    name = _encode_text(column)
    room = MAX_NAME_BYTES - len(name) - 1
    if room < _MIN_VALUE_CHARS:
        raise InvalidArgumentError(
            f"partition_by/by column {column!r} is too long for a folder name: encoded it takes "
            f"{len(name)} bytes, and its groups' folders '<column>=<value>' may take "
            f"{MAX_NAME_BYTES} bytes, {_MIN_VALUE_CHARS} of them for the value; rename the column "
            f"(ddf.rename(columns=...)) to at most {MAX_NAME_BYTES - 1 - _MIN_VALUE_CHARS} bytes "
            f"encoded (ASCII letters, digits and _.- take one byte, other characters three per UTF-8 byte)"
        )
    return name, min(MAX_SEGMENT_CHARS, room)


def group_path(by: Sequence[str], key: Sequence[Any], *, cut_within_characters: bool = False) -> str:
    """Relative folder of one group: ``col=value`` segments joined by ``/``,
    each within :data:`MAX_NAME_BYTES` (``cut_within_characters``: see
    :func:`encode_value`)."""
    segments = []
    for col, value in zip(by, key):
        name, room = column_segment(str(col))
        segments.append(f"{name}={encode_value(value, room, cut_within_characters=cut_within_characters)}")
    return "/".join(segments)


def key_to_json(value: Any) -> Any:
    """A group value as JSON that :func:`key_from_json` turns back into it
    (date-times with their time zone's name, durations as pd.Timedelta, inf and
    -inf tagged: JSON has no such numbers)."""
    value = _as_pandas_time(value)
    if isinstance(value, np.generic):
        value = value.item()
    if is_null(value):
        return None
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isinf(value):
            # json.dumps would write Infinity, which is no JSON: the run's
            # _groups.json and the group's _partition.json would then break
            # every strict reader (jq, JavaScript, Go, DuckDB's read_json)
            return {"__float__": str(value)}
        return value
    if isinstance(value, pd.Timestamp):
        return {"__timestamp__": value.isoformat(), "tz": str(value.tz) if value.tz else None}
    if isinstance(value, pd.Timedelta):
        return {"__timedelta__": value.isoformat()}
    if isinstance(value, datetime.date):
        return {"__date__": value.isoformat()}
    return {"__str__": str(value)}


def key_from_json(data: Any) -> Any:
    """Inverse of :func:`key_to_json`."""
    if isinstance(data, dict):
        if "__timestamp__" in data:
            value = pd.Timestamp(data["__timestamp__"])
            if value.tz is not None and data.get("tz"):
                try:  # the text has only the offset (+01:00); the name says Europe/Paris
                    value = value.tz_convert(data["tz"])
                except Exception:  # a name pandas cannot parse: the offset it is
                    logger.debug("time zone %r not known here; keeping %s", data["tz"], value)
            return value
        if "__timedelta__" in data:
            return pd.Timedelta(data["__timedelta__"])
        if "__date__" in data:
            return datetime.date.fromisoformat(data["__date__"])
        if "__float__" in data:
            return float(data["__float__"])
        return data.get("__str__")
    return data


def normalize_key(partition_id: Any, n_columns: int) -> tuple:
    """A user's partition_id as a tuple with one value per ``by`` column."""
    if n_columns == 1:
        if isinstance(partition_id, tuple) and len(partition_id) == 1:
            return partition_id
        return (partition_id,)
    if not isinstance(partition_id, (tuple, list)) or len(partition_id) != n_columns:
        raise KeyError(
            f"partition_id {partition_id!r} must be a tuple of {n_columns} values, "
            f"one per partition_by column"
        )
    return tuple(partition_id)


def stored_zones(groups: list[dict], n_columns: int) -> list[set[str]]:
    """Per ``by`` column, the time zone names of the group values a run
    stored (the entries of its ``_groups.json``)."""
    zones: list[set[str]] = [set() for _ in range(n_columns)]
    for group in groups:
        stored = group.get("partition_id")
        for i, value in enumerate(stored if isinstance(stored, list) else [stored]):
            if i < n_columns and isinstance(value, dict) and value.get("tz"):
                zones[i].add(value["tz"])
    return zones


def paths_in_zones(by: Sequence[str], key: Sequence[Any], zones: Sequence[set[str]] | None) -> list[str]:
    """The other folders ``key`` may have in a run whose stored values are in
    ``zones`` (per column, :func:`stored_zones`; None: in no zone). A time-zone-aware value
    names its folder in its own zone (``...+01:00``), so the same instant
    stored in another zone is in another folder; pandas calls the two equal.
    A long value that a run of an earlier version stored may have its folder
    cut within a character (see :func:`encode_value`)."""
    choices = []
    for i, value in enumerate(key):
        options = [value]
        if isinstance(value, datetime.datetime) and value.tzinfo is not None and zones:
            for tz in sorted(zones[i]):
                try:
                    options.append(pd.Timestamp(value).tz_convert(tz))
                except Exception:  # a zone name pandas cannot parse here
                    continue
        choices.append(options)
    own = group_path(by, key)
    paths = dict.fromkeys(
        group_path(by, moved, cut_within_characters=old)
        for moved in itertools.product(*choices)
        for old in (False, True)
    )
    paths.pop(own, None)
    return list(paths)


# --------------------------------------------------------------------------
# the file system


def open_url(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """``fsspec.core.url_to_fs`` with errors that say what to do."""
    if not isinstance(url, (str, os.PathLike)) or not str(url):
        raise InvalidURLError(f"url must be a non-empty string or path, got {url!r}")
    if storage_options is not None and not isinstance(storage_options, dict):
        raise InvalidArgumentError(f"storage_options must be a dict, got {type(storage_options).__name__}")
    try:
        fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    except ValueError as exc:  # unknown protocol
        raise InvalidURLError(
            f"cannot open url {shown_url(url)!r}: {exc}; use a local path or an fsspec URL "
            f"such as file://, memory://, s3:// or gs://"
        ) from exc
    except ImportError as exc:
        raise InvalidURLError(
            f"cannot open url {shown_url(url)!r}: {exc} (install the fsspec backend it names)"
        ) from exc
    except FileNotFoundError as exc:
        # a relative path is made absolute with os.getcwd(), which fails when
        # the working directory was deleted since (a job's folder cleaned
        # up): a bare "[Errno 2] No such file or directory", naming nothing
        try:
            os.getcwd()
        except FileNotFoundError:
            raise InvalidURLError(
                f"cannot open url {shown_url(url)!r}: it is a relative path, and this process's working "
                f"directory no longer exists (deleted after the process started in it); give an absolute "
                f"path, or os.chdir() to a folder that exists"
            ) from exc
        raise
    except OSError as exc:
        # a backend that connects as it is made (ftp://, hdfs://) and cannot:
        # a bare "ConnectionRefusedError: [Errno 111] Connection refused",
        # naming no URL, where one that connects later (s3://) says this
        raise InvalidURLError(
            f"cannot reach {shown_url(url)!r}: {type(exc).__name__}: {exc}; check the URL and storage_options"
        ) from exc
    if _is_local(fs) and path.startswith("~"):
        # os.path.expanduser leaves "~" as it is when no home is known: HOME
        # unset and this user id not in the password database (a container
        # run under an arbitrary user id, as OpenShift does), or "~name" of
        # no such user. The path stayed relative: the run went into a folder
        # "~" of this working directory, and workers in another one found no
        # run (every group CANCELLED, "deleted while it ran")
        head = path.split("/", 1)[0]
        if head == "~":
            uid = f"user id {os.getuid()}" if hasattr(os, "getuid") else "this user"
            why = (
                f"HOME is not set and {uid} has no entry in the password database; give an absolute "
                f"path, or set HOME"
            )
        else:
            why = f"there is no user {head[1:]!r} here; give an absolute path"
        raise InvalidURLError(
            f"cannot open url {shown_url(url)!r}: {head!r} names no home folder here ({why}). "
            f"A folder named {head!r} in the working directory is './{head}'"
        )
    return keep_few_file_systems(fs), path.rstrip("/") or "/"


# fsspec keeps every file system instance it makes for the life of the
# process, one per distinct set of storage_options (its instance cache,
# cleared only by clear_instance_cache()). A cluster kept up for days whose
# runs each bring new temporary credentials (STS session tokens, SAS tokens,
# OAuth tokens) kept one S3FileSystem per run, with its botocore client (~13 MB),
# in every worker and in the client, for good. dask_manymodel keeps in that
# cache only the few it used last; runs still going on hold their own.
_KEEP_FILE_SYSTEMS = 8
_used_file_systems: "OrderedDict[tuple[type, str], None]" = OrderedDict()
_used_file_systems_lock = threading.Lock()


def keep_few_file_systems(fs: Any) -> Any:
    """Note that ``fs`` is used now, and take the file systems that
    dask_manymodel used least recently beyond :data:`_KEEP_FILE_SYSTEMS` out
    of fsspec's instance cache (so that they go once nothing holds them).
    Returns ``fs``. Called wherever a process gets a file system for a run:
    :func:`open_url` and a :class:`RunStore` or file system unpickled in a task."""
    cls = type(fs)
    token = getattr(fs, "_fs_token_", None)
    if not isinstance(token, str) or not getattr(cls, "cachable", False):
        return fs
    with _used_file_systems_lock:
        _used_file_systems[(cls, token)] = None
        _used_file_systems.move_to_end((cls, token))
        while len(_used_file_systems) > _KEEP_FILE_SYSTEMS:
            (old_cls, old_token), _ = _used_file_systems.popitem(last=False)
            cache = getattr(old_cls, "_cache", None)
            # not the one fsspec's S3FileSystem.current() names: it reads it from the cache
            if cache is None or getattr(old_cls, "_latest", None) == old_token:
                continue
            with getattr(old_cls, "_instantiation_lock", contextlib.nullcontext()):
                cache.pop(old_token, None)
    return fs


#: How many forks lie between this process and the first one: a file system
#: noted at another count was made in an ancestor (see _ThisProcessFileSystem).
#: Counted at each fork rather than asking os.getpid(), a system call, at
#: each use of a run's file system (several a group).
_forks_here = 0


def _count_fork() -> None:
    global _forks_here
    _forks_here += 1


os.register_at_fork(after_in_child=_count_fork)


class _ThisProcessFileSystem:
    """A file system attribute that is made again in a process forked from
    the one that made it: torch's DataLoader forks its workers (Linux's
    default), as multiprocessing's 'fork' does, and an asynchronous file
    system (s3fs, gcsfs, adlfs) refused every call there with "RuntimeError:
    This class is not fork-safe" (its event loop stayed in the parent).
    Made again as fsspec makes one where it is unpickled. Used by
    :class:`RunStore` (a run handle's reads), and by a FileSet handle and
    its streaming source."""

    def __set_name__(self, owner, name):
        self.name = f"_{name.lstrip('_')}_made"

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        fs, forks = getattr(obj, self.name)
        if forks != _forks_here:  # made before a fork (or unpickled from another process: made here, harmless)
            fs = keep_few_file_systems(type(fs)(*fs.storage_args, **fs.storage_options))
            setattr(obj, self.name, (fs, _forks_here))
        return fs

    def __set__(self, obj, fs):
        setattr(obj, self.name, (fs, _forks_here))


def resolved_url(url: Any, fs: fsspec.AbstractFileSystem, base: str) -> str:
    """``url`` as it is shown and opened again later, in another process or
    working directory: a local path as fsspec resolved it (absolute, ``~``
    expanded), a root URL (``memory://``) with its ``://`` kept; any other
    URL as written, without a trailing ``/``."""
    if _is_local(fs):
        return base
    text = str(url).rstrip("/")
    if text.endswith(":"):  # "memory://" itself: "memory:" would read as a local path
        return text + "//"
    return text or fs.unstrip_protocol(base)


def without_pandas_metadata_of(table: Any, names: set[str]) -> Any:
    """``table`` (a pyarrow Table) with the entries of columns ``names``
    taken out of its pandas metadata, so that a reader converts those columns
    by their Arrow type alone (pandas cannot read back its own entry of a pyarrow list:
    "data type 'list<item: int64>[pyarrow]' not understood")."""
    metadata = dict(table.schema.metadata or {})
    if b"pandas" not in metadata:
        return table
    pandas_meta = json.loads(metadata[b"pandas"])
    pandas_meta["columns"] = [c for c in pandas_meta["columns"] if c.get("name") not in names]
    metadata[b"pandas"] = json.dumps(pandas_meta).encode()
    return table.replace_schema_metadata(metadata)


# the scheme and authority (``user:password@host:port``) of one URL of a chain
_AUTHORITY = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)([^/?#]*)")


def shown_url(url: Any) -> str:
    """``url`` as shown in reprs, messages, logs and stored errors: the
    password of a ``user:password@host`` (ftp, sftp, smb, http basic auth)
    as ``***``, in each URL of a chain (``simplecache::ftp://...``) too; a
    URL without one unchanged. Never for opening: the password is gone.

    >>> shown_url("simplecache::ftp://alice:s3cret@host/models")
    'simplecache::ftp://alice:***@host/models'
    """

    def hide(match: re.Match) -> str:
        # split as urllib (and so fsspec) does: the last "@" ends the user info
        userinfo, at, host = match[2].rpartition("@")
        user, _, password = userinfo.partition(":")
        return f"{match[1]}{user}:***@{host}" if at and password else match[0]

    return "::".join(_AUTHORITY.sub(hide, part, count=1) for part in str(url).split("::"))


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


# fsspec reads a path holding one of these as a glob pattern when it is
# given to rm, cat, ... ("models[12]" matches the folder "models1")
_GLOB_CHARS = re.compile(r"[*?\[]")


def any_read_as_pattern(paths: Sequence[str]) -> bool:
    """Whether fsspec (or Dask) would expand one of ``paths`` as a glob pattern."""
    return any(_GLOB_CHARS.search(path) for path in paths)


#: The fields of a group's status that the handle reads only when asked
#: (see RunStore.read_statuses).
GROUP_TEXT = ("logs", "traceback")

# How many status files one batched read holds at once (each up to ~64 KB
# with a group's logs and traceback).
_STATUS_READ_CHUNK = 1_000


def read_file(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole of one file, in one request on an object store.

    s3fs (since 2025) reads a whole file by asking its size first (a HEAD,
    to read a big file in parts), and for a missing file asks again whether
    it is a folder (a listing): every small JSON file of a run cost two
    requests, one after the other. A read from byte 0 to the end is one
    GET. An empty file, which S3 refuses such a range of (416), and any
    other error are read again as a whole, which says them as before."""
    try:
        return fs.cat_file(path, start=0)
    except FileNotFoundError:
        raise
    except Exception:
        logger.debug("reading %s from byte 0 failed; reading it whole", path, exc_info=True)
        return fs.cat_file(path)


def cat_files(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | Exception]:
    """The contents of these files, those missing left out, in one batched
    read (s3fs and gcsfs fetch them concurrently, one request each: see
    :func:`read_file`); never expands a path as a glob pattern (fsspec's
    ``cat`` of a list does).

    A file that is there but cannot be read (access denied, an I/O error)
    is not missing: its exception stands in for its contents, for the caller
    to raise or show. Read as missing, a group whose status cannot be read
    would look never run, and a resume would train it again over its model.
    """
    found: dict[str, bytes | Exception] = {}
    if not any_read_as_pattern(paths):
        # (fsspec's cat_ranges reads each path as it is named)
        contents = fs.cat_ranges(list(paths), [0] * len(paths), [None] * len(paths), on_error="return")
        found = dict(zip(paths, contents))
    again = [
        path for path in paths
        if path not in found or (isinstance(found[path], Exception) and not isinstance(found[path], FileNotFoundError))
    ]
    for path in again:  # an empty file, an error, or a name fsspec would read as a pattern
        try:
            # (read from byte 0 already, where it failed: whole now, as read_file would next)
            found[path] = fs.cat_file(path) if path in found else read_file(fs, path)
        except Exception as exc:
            found[path] = exc
    return {path: data for path, data in found.items() if not isinstance(data, FileNotFoundError)}


def remove_paths(fs: fsspec.AbstractFileSystem, paths: list[str]) -> None:
    """Delete these files and folders (with what they hold); never expands a
    path as a glob pattern (fsspec's ``rm`` does), so that a run under
    ``models[12]`` cannot delete the files of one under ``models1``. What
    another deleter removed meanwhile is no error: two overwrites of one run
    started at once (two threads, two processes) both delete its old files,
    and fsspec's ``rm`` raised FileNotFoundError for the first file the
    other had removed, failing the start that had taken the run over."""
    if not any_read_as_pattern(paths):
        try:
            fs.rm(paths, recursive=True)
            return
        except FileNotFoundError:  # one went meanwhile: the rest one by one
            pass
    for path in paths:
        if _is_local(fs):
            _remove_local(fs._strip_protocol(path))
            continue
        # an object store has files only: each one under the path
        with contextlib.suppress(FileNotFoundError):
            remove_files(fs, fs.find(path) if fs.isdir(path) else [path])


def _remove_local(local: str, tries: int = 5) -> None:
    """Delete a local file or folder that another deleter may be deleting
    too: ``shutil.rmtree`` raises FileNotFoundError for a file removed
    between its listing and its unlink, so it lists again."""
    for attempt in range(tries):
        try:
            if os.path.isdir(local) and not os.path.islink(local):
                shutil.rmtree(local)
            elif os.path.lexists(local):
                os.remove(local)
            return
        except FileNotFoundError:
            if not os.path.lexists(local):
                return  # the other deleter finished it
            if attempt == tries - 1:
                raise


def remove_files(fs: fsspec.AbstractFileSystem, files: list[str]) -> None:
    """Delete these files, on an object store in the store's batches (S3
    deletes 1,000 keys a request), not one request per file; one by one
    where fsspec would read a name as a glob pattern. A file gone already
    is no error."""
    if not files:
        return
    # local disk and memory:// delete one file a call anyway, and their rm of
    # a list stops at the first file missing (then it went one by one after
    # all): a resume asks to delete the model of every group it runs again,
    # and a FAILED group has none
    batched = not (_is_local(fs) or isinstance(fs, MemoryFileSystem))
    if batched and not any_read_as_pattern(files):
        try:
            fs.rm(files)  # not recursive: fsspec lists nothing
            return
        except FileNotFoundError:  # one was gone: the rest one by one
            pass
    for name in files:
        try:
            fs.rm_file(name)
        except FileNotFoundError:
            pass


# OSErrors that no retry can change, raised at once as they are (naming
# their path): a name too long, a symlink loop (ELOOP) or a read-only disk
# (EROFS), which were retried as if the store were slow, and failed after a
# second of backoff
_NOT_TRANSIENT = {errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS}


def with_retries(
    action: Callable[[], T], *, what: str, retries: int = 3, backoff: float = 0.1
) -> T:
    """Run ``action``; on ``OSError`` try again up to ``retries`` times with
    exponential backoff and jitter, then raise :class:`StorageError`."""
    for attempt in range(retries + 1):
        try:
            return action()
        except (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise  # retrying cannot change these
        except OSError as exc:
            if exc.errno in _NOT_TRANSIENT:
                raise  # nor these
            if attempt == retries:
                raise StorageError(f"{what} failed after {retries + 1} attempts: {exc}") from exc
            delay = backoff * (2**attempt) * (0.5 + random.random())
            logger.debug("%s failed (%s); retrying in %.2fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _write_local(path: str, data: bytes, temp: str | None) -> None:
    """Write a local file with plain system calls; through ``temp`` and a
    rename (atomic) when ``temp`` is given."""
    target = temp or path
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        if temp:
            os.replace(temp, path)
    except BaseException:
        if temp and os.path.exists(temp):
            os.remove(temp)
        raise


def _make_folder(folder: str) -> None:
    """``os.makedirs(folder, exist_ok=True)``, in one system call when the
    parent exists and the folder does not (a group's new folder in its
    run's): makedirs would first look at the parent."""
    try:
        os.mkdir(folder)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise  # a file of that name: as makedirs would
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A temp folder for files on their way to or from remote storage (a
    model to upload or to read, an artifact), removed after.

    In a Dask worker it is made in the worker's local directory: the folder
    its cluster gave it for scratch (``dask worker --local-directory``,
    Dask's ``temporary-directory``, dask-jobqueue's ``local_directory``),
    where Dask spills and shuffles too; elsewhere in Dask's
    ``temporary-directory`` where that is set and writable here, else in
    Python's (TMPDIR).
    On HPC nodes and in pods /tmp is often small (in memory, or the
    container's own layer): a model of GBs filled it, "No space left on
    device", while the scratch disk set aside for the workers had room."""
    return tempfile.TemporaryDirectory(prefix="manymodel-", dir=_scratch_parent())


def _scratch_parent() -> str | None:
    distributed = sys.modules.get("distributed")  # (never imported for this: the CLI has no worker)
    if distributed is not None:
        try:
            return distributed.get_worker().local_directory
        except (ValueError, AttributeError):  # not in a worker's task (the client, a thread of one's own)
            pass
    dask = sys.modules.get("dask")
    folder = dask.config.get("temporary-directory", None) if dask is not None else None
    if not isinstance(folder, str):
        return None
    folder = os.path.expanduser(folder)
    # one this process may write in: a dask config shared with the workers
    # (a site's dask.yaml, a DASK_TEMPORARY_DIRECTORY for the batch jobs) names
    # their scratch disk, which on the client's machine may be missing, or
    # there and not the user's (a login node's /scratch, read-only here):
    # get_model of a run on S3 failed with "[Errno 30] Read-only file system".
    # Dask's own workers fall back likewise, to another folder.
    if os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
        return folder
    return None


TEMP_PREFIX = ".tmp-"
# what os.link raises on a file system without hard links: FAT and exFAT
# drives (EPERM on Linux, ENOTSUP on macOS), some SMB and FUSE mounts
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _temp_name(path: str, tag: str) -> str:
    """A temp name beside ``path``: hidden (hive readers skip it) and ending in
    the real name, so writers that pick a format from the extension (Keras)
    still work."""
    folder, name = posixpath.split(path)
    temp = f"{TEMP_PREFIX}{tag}-{name}"
    if len(temp.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        # a long name (up to the 255 bytes a file system allows) must still
        # have a temp name that fits: the tag and the extension alone
        temp = f"{TEMP_PREFIX}{tag}{posixpath.splitext(name)[1][:100]}"
    return posixpath.join(folder, temp)


class _Tries:
    """The retries of :meth:`RunStore.write_many`'s files: the store's, none
    after a file that failed them all, the store's again after a file written."""

    def __init__(self, retries: int):
        self.full = self.retries = retries

    def run(self, write: Callable[[], None], path: str, failed: dict[str, Exception]) -> None:
        try:
            write()
        except StorageError as exc:  # (with_retries': every try failed) the store may be down
            failed[path] = exc
            self.retries = 0
        except Exception as exc:  # refused at once for this file alone (permissions, not a folder)
            failed[path] = exc
        else:
            self.retries = self.full


class LocalFile:
    """A file on this machine's disk that stands for its contents among the
    ``{path: bytes}`` of :meth:`RunStore.write_many` (a big model's pickle,
    streamed there): uploaded from the file, never read whole into memory.
    ``len()`` is the file's size, as the bytes' would be."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"LocalFile({self.path!r})"


class RunStore:
    """The files of one run under ``url/run_id``, written atomically.

    A :class:`RunStore` pickles (fsspec file systems do), so the same object
    is used on the client and inside worker tasks. ``storage_options`` go to
    fsspec only; nothing here writes them anywhere.

    Parameters
    ----------
    url : str
        Base URL of the runs (any fsspec URL or a local path).
    run_id : str
        Folder of this run under ``url``.
    storage_options : dict, optional
        Passed to fsspec, e.g. credentials or an endpoint.
    retries : int
        How many times a failed object write or read is retried.
    """

    fs = _ThisProcessFileSystem()  # a run handle used in a forked process

    def __init__(
        self,
        url: str,
        run_id: str,
        storage_options: dict | None = None,
        *,
        retries: int = 3,
        retry_backoff: float = 0.1,
    ):
        self.run_id = run_id
        fs, base = open_url(url, storage_options)
        # the URL as resolved here: a task or a later call in another working
        # directory opens the same place (see sibling())
        self.url = resolved_url(url, fs, base)
        self.fs = fs
        self.base = base
        self.root = posixpath.join(base, run_id)
        self.retries = retries
        self.retry_backoff = retry_backoff

    def __repr__(self) -> str:
        return f"RunStore({self.url_shown!r}, {self.run_id!r})"

    def __setstate__(self, state: dict) -> None:
        # a task's copy (the run's spec, a restored handle sent to the
        # workers): its file system was made or found in fsspec's cache there
        self.__dict__.update(state)
        self.fs = keep_few_file_systems(self.__dict__["_fs_made"][0])  # made for this process

    def sibling(self, run_id: str) -> "RunStore":
        """Run ``run_id`` under the same URL, on the same file system, with
        nothing resolved again (a worker's working directory may differ)."""
        other = copy.copy(self)
        other.run_id = run_id
        other.root = posixpath.join(self.base, run_id)
        return other

    @property
    def is_local(self) -> bool:
        """Whether the run lives on this machine's disk (files can be read in place)."""
        return _is_local(self.fs)

    @property
    def is_in_memory(self) -> bool:
        """Whether the run lives in fsspec's memory:// (private to each process)."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "memory" in protocols

    # paths -------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Absolute path (for ``self.fs``) of a file under the run's folder."""
        return posixpath.join(self.root, *[p for p in parts if p])

    def _shown(self, path: str) -> str:
        """A path of ``self.fs`` as the user would type it: one in the run's
        folder as :meth:`display` spells it (``unstrip_protocol`` of a
        LocalFileSystem subclass says ``file://`` in fsspec before 2025)."""
        folder = self.root.rstrip("/") + "/"
        stripped = self.fs._strip_protocol(path)
        if stripped.startswith(folder):
            return self.display(stripped[len(folder):])
        # (http's paths are whole URLs, with their user info)
        return path if self.is_local else shown_url(self.fs.unstrip_protocol(path))

    @property
    def url_shown(self) -> str:
        """The base URL as messages and reprs show it: without a password
        (:func:`shown_url`)."""
        return shown_url(self.url)

    def url_of(self, *parts: str) -> str:
        """The URL of a file of this run, to open it again (with any password
        the URL was given)."""
        return "/".join([self.url, self.run_id, *[p for p in parts if p]])

    def display(self, *parts: str) -> str:
        """The URL a user would type for a file of this run, as shown in
        messages and reprs: without a password (:func:`shown_url`)."""
        return shown_url(self.url_of(*parts))

    # writes ----------------------------------------------------------
    def _retry(self, action: Callable[[], T], what: str, retries: int | None = None) -> T:
        retries = self.retries if retries is None else retries
        return with_retries(action, what=what, retries=retries, backoff=self.retry_backoff)

    @staticmethod
    def _commit_local(path: str, fill: Callable[[str], None], *, exclusive: bool = False) -> int:
        """Local disk: ``fill`` a temp file beside ``path``, then commit it in one
        step (rename, or a hard link that fails if ``path`` exists). Returns its size."""
        _make_folder(posixpath.dirname(path))
        tmp = _temp_name(path, uuid.uuid4().hex)
        try:
            fill(tmp)
            size = os.path.getsize(tmp)
            if exclusive:
                try:
                    os.link(tmp, path)  # raises FileExistsError if path exists
                except OSError as exc:
                    if exc.errno not in _NO_HARD_LINKS:
                        raise
                    # claimed by a create that fails if path exists, then filled
                    # in one step; a reader between the two finds it empty
                    # (unreadable, as a file being written)
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
                    os.replace(tmp, path)
            else:
                os.replace(tmp, path)  # atomic on POSIX
            return size
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_bytes(self, path: str, data: bytes, *, atomic: bool = True, retries: int | None = None) -> None:
        """Write ``data`` to ``path`` so that a reader sees all of it or none.

        ``atomic=False`` skips the temp name and rename on local disk: only for
        JSON status files, where a reader that catches one half-written cannot
        parse it and treats it as absent (a JSON object has no valid prefix).
        ``retries``: the store's own when None.
        """

        def write() -> None:
            if _is_local(self.fs):
                if atomic:
                    _make_folder(posixpath.dirname(path))
                _write_local(path, data, _temp_name(path, uuid.uuid4().hex) if atomic else None)
            else:
                # one PUT: object stores commit it whole or not at all
                self.fs.pipe_file(path, data)

        self._retry(write, f"writing {path}", retries)

    def write_many(
        self, files: dict[str, bytes], *, atomic: bool = True, made_folders: set[str] | None = None
    ) -> dict[str, Exception]:
        """Write many small files in one go; return the ones that still failed
        after retries, as ``{path: error}``.

        Local disk: straight system calls, each folder made once, and (when
        ``atomic``) a temp name renamed into place; a batch of a task's
        files costs a few calls per file and no per-file set-up. Object
        stores: one ``fs.pipe`` of them all (s3fs and gcsfs upload them
        concurrently), and if that fails, each one again on its own.

        A value that is a :class:`LocalFile` is uploaded from that file.

        Once a file has failed every try, the next ones get one try each,
        until one is written: a store that went down (or a full disk) took
        the retries' backoff (~0.7 s by default) for every file, and a run
        of thousands of groups hours to end with every group INTERNAL_ERROR.

        ``made_folders``, when given, holds local folders known to exist; the
        ones made here are added, so that a second batch into the same
        folders (a task's statuses after its models) skips them.
        """
        failed: dict[str, Exception] = {}
        tries = _Tries(self.retries)
        local_files = {path: data for path, data in files.items() if isinstance(data, LocalFile)}
        if local_files:
            files = {path: data for path, data in files.items() if path not in local_files}
            for path, local in local_files.items():
                tries.run(lambda: self.upload_file(local.path, path, retries=tries.retries), path, failed)
        if not files:
            return failed
        if self.is_local:
            token = uuid.uuid4().hex[:12]
            folders: set[str] = made_folders if made_folders is not None else set()
            for number, (path, data) in enumerate(files.items()):
                folder = posixpath.dirname(path)
                temp = _temp_name(path, f"{token}-{number}") if atomic else None

                def write() -> None:
                    if folder not in folders:
                        _make_folder(folder)
                        folders.add(folder)
                    _write_local(path, data, temp)

                tries.run(lambda: self._retry(write, f"writing {path}", tries.retries), path, failed)
            return failed
        try:
            self.fs.pipe(dict(files))
            return failed
        except Exception:
            logger.debug("writing %d files at once failed; one by one now", len(files), exc_info=True)
        for path, data in files.items():
            tries.run(lambda: self.write_bytes(path, data, atomic=atomic, retries=tries.retries), path, failed)
        return failed

    def write_via_file(self, path: str, fill: Callable[[str], None], scratch_dir: str) -> int:
        """Have ``fill(local_path)`` write a file, and commit it at ``path`` atomically.

        On a local store the file is written next to its target under a
        temporary name and renamed (no copy); elsewhere it is written in
        ``scratch_dir`` and uploaded in one go. Returns its size in bytes.
        """
        if _is_local(self.fs):
            return self._retry(lambda: self._commit_local(path, fill), f"writing {path}")
        local = os.path.join(scratch_dir, posixpath.basename(path))
        try:
            fill(local)
            size = os.path.getsize(local)
            self.upload_file(local, path)
            return size
        finally:
            if os.path.exists(local):
                os.remove(local)

    def upload_file(self, local_path: str, path: str, *, retries: int | None = None) -> None:
        """Copy a local file to ``path`` atomically (temp name and rename, or
        one upload); ``retries``: the store's own when None."""

        def upload() -> None:
            if _is_local(self.fs):
                self._commit_local(path, lambda tmp: self.fs.put_file(local_path, tmp))
            else:
                # multipart uploads commit only when the last part lands
                self.fs.put_file(local_path, path)

        self._retry(upload, f"uploading {path}", retries)

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` only if nothing is there yet.

        Raises ``FileExistsError`` if the object exists, also when another
        process created it a moment earlier. Local folders use a hard link of a
        finished temp file (atomic and exclusive); object stores use a
        conditional PUT where the backend supports one (S3's If-None-Match),
        and fsspec's check-then-write elsewhere.
        """

        tries = 0

        def create() -> None:
            nonlocal tries
            tries += 1
            if _is_local(self.fs):
                self._commit_local(path, lambda tmp: _write_local(tmp, data, None), exclusive=True)
                return
            try:
                self.fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    raise FileExistsError(path) from exc
                raise

        try:
            self._retry(create, f"creating {path}")
        except FileExistsError:
            # an earlier try failed: it may have landed with its answer lost
            # (an object store's 500, a connection dropped after the PUT), and
            # the file found is then this very create's. Taken for another's,
            # a run refused itself ("created while this run was being
            # prepared"), its _run.json left IN_PROGRESS for good, and a
            # FileSet's claim kept the name
            if tries > 1 and self._holds(path, data):
                return
            raise

    def _holds(self, path: str, data: bytes) -> bool:
        """Whether ``path`` holds exactly ``data`` (False if it cannot be read)."""
        try:
            return read_file(self.fs, path) == data
        except Exception:
            return False

    def write_json(self, path: str, data: Any, *, indent: int | None = 1, atomic: bool = True) -> None:
        self.write_bytes(path, json.dumps(data, indent=indent, default=str).encode(), atomic=atomic)

    # reads -----------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        return self._retry(lambda: read_file(self.fs, path), f"reading {path}")

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def read_run_file(self, name: str, shape: type) -> Any:
        """One of the run's own JSON files (``_run.json``, ``_groups.json``),
        which must hold a ``shape`` (dict, list). Raises FileNotFoundError if it
        is missing and :class:`StorageError`, naming the file, if it is damaged:
        cut short, edited by hand, or written by another tool."""
        try:
            value = self.read_json(self.path(name))
        except ValueError as error:  # not JSON, or not UTF-8
            raise self.damaged(name, f"it is not JSON ({error})") from None
        if not isinstance(value, shape):
            raise self.damaged(name, f"it holds a {type(value).__name__}, not a JSON {shape.__name__}")
        return value

    def read_manifest(self) -> dict:
        """The run's ``_run.json``, with the keys every reader relies on
        (errors as :meth:`read_run_file`)."""
        from .run import RunStatus  # here: run.py imports this module

        manifest = self.read_run_file(RUN_MANIFEST, dict)
        version = manifest.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            raise self.damaged(RUN_MANIFEST, f"its format_version is {version!r}, not a whole number")
        if version > FORMAT_VERSION:
            raise StorageError(
                f"run {self.run_id!r} at {self.url_shown} was written by a later dask_manymodel (storage format "
                f"{version}; this one reads format {FORMAT_VERSION}): upgrade dask_manymodel (pip install "
                f"-U dask-manymodel) to read or resume it"
            )
        missing = [key for key in _MANIFEST_KEYS if key not in manifest]
        if missing:
            raise self.damaged(RUN_MANIFEST, f"it has no {', '.join(missing)}")
        if manifest["status"] not in {status.value for status in RunStatus}:
            raise self.damaged(RUN_MANIFEST, f"its status {manifest['status']!r} is not a run status")
        return manifest

    def damaged(self, name: str, why: str) -> StorageError:
        """The error for one of the run's own files that is not as dask_manymodel wrote it."""
        return StorageError(
            f"run {self.run_id!r} at {self.url_shown} cannot be read: its {name} is damaged ({why}); it was "
            f"cut short or changed by something other than dask_manymodel. Run it again with "
            f"on_existing_artifacts='overwrite', or use another run"
        )

    def read_many_json(self, paths: list[str], being_written: bool = False) -> dict[str, Any]:
        """Read many small JSON files at once; missing ones are left out, and
        so are ones that do not parse, with a warning unless ``being_written``.

        Raises :class:`StorageError`, naming the file, if one is there but
        cannot be read (after the store's retries)."""
        if not paths:
            return {}
        unreadable: list[str] = []

        def read() -> dict[str, bytes | Exception]:
            unreadable.clear()
            found = cat_files(self.fs, paths)
            unreadable[:] = [path for path, data in found.items() if isinstance(data, Exception)]
            if unreadable:
                raise found[unreadable[0]]  # retried if it may pass (an I/O error, a dropped connection)
            return found

        try:
            found = self._retry(read, f"reading {len(paths)} status files")
        except Exception as exc:
            if not unreadable:
                raise
            if isinstance(exc, PermissionError):
                why = "the file is there, so"
                advice = "Make the file readable (the store's permissions, or the disk) and try again"
            else:  # after the retries: the store down or unreachable as much as the file unreadable
                why = "it may be there, so"
                advice = "Try again once the store answers (or, if the file is unreadable, make it readable)"
            raise StorageError(
                f"cannot read {self._shown(unreadable[0])} of run {self.run_id!r} at "
                f"{self.url_shown}: {type(exc).__name__}: {exc}; {why} the group's outcome is not known "
                f"(it is not taken as never run: a resume would run it again over its files). {advice}"
            ) from exc
        out = {}
        damaged = []
        for path, data in found.items():
            try:
                out[self.fs._strip_protocol(path)] = json.loads(data)
            except ValueError:
                damaged.append(path)
        if damaged:
            # one line, not one per file: a disk that filled up mid-run cuts
            # short the status of every group that finished after. While the
            # run goes on, its tasks write statuses in place: one caught as
            # it is written is no damage worth a warning
            (logger.debug if being_written else logger.warning)(
                "ignoring %d status file(s) that are not JSON, such as %s: cut short (a full disk, a killed "
                "writer) or being written; their groups read as not run", len(damaged), damaged[0],
            )
        return out

    def read_statuses(
        self, rels: Sequence[str], attempt: str | None = None, *, being_written: bool = False
    ) -> dict[str, dict]:
        """The groups' stored ``_partition.json``, by group folder (those
        missing or damaged left out), in batched reads; with ``attempt``,
        only those of that attempt of the run. ``being_written``: the run is
        in progress, so a status caught while its task writes it (in place,
        not renamed: see ``engine._PendingWrites._flush``) reads cut short;
        that is no damage, and is left out without a warning.

        Without the groups' logs and traceback (up to ``max_log_chars`` each):
        a run of 100,000 groups that print would need GBs to hold them all at
        once; a handle reads one group's when asked. Read in chunks, so that
        only one chunk's files are in memory whole.
        """
        from .run import PartitionStatus  # here: run.py imports this module

        known = {status.value for status in PartitionStatus}
        files = {self.path(rel, PARTITION_FILE): rel for rel in rels}
        paths = list(files)
        statuses = {}
        for start in range(0, len(paths), _STATUS_READ_CHUNK):
            for path, status in self.read_many_json(paths[start:start + _STATUS_READ_CHUNK], being_written).items():
                if path not in files:
                    continue
                if not isinstance(status, dict) or status.get("status") not in known:
                    logger.warning("ignoring status file %s: it holds no group status", path)
                    continue
                if attempt is None or status.get("attempt") == attempt:
                    for key in GROUP_TEXT:
                        status.pop(key, None)
                    statuses[files[path]] = status
        return statuses

    @contextlib.contextmanager
    def local_file(self, path: str, name: str):
        """A local path to read the file at ``path`` from: on local disk the
        stored file itself (a model of GBs needs no room in the temp folder,
        often a small disk of its own), elsewhere a copy named ``name`` in a
        temp folder, removed after. Raises FileNotFoundError if it is missing."""
        if self.is_local:
            if not os.path.isfile(path):
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            yield path
            return
        with scratch_folder() as tmp:
            local = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(local), exist_ok=True)  # a serde's file in a subfolder
            self.download_file(path, local)
            yield local

    def download_file(self, path: str, local_path: str) -> None:
        self._retry(lambda: self.fs.get_file(path, local_path), f"downloading {path}")

    def download_many(self, paths: list[str], local_paths: list[str]) -> None:
        """Download many files in one go: one ``fs.get`` of them all (s3fs
        and gcsfs fetch them concurrently). Raises if any one failed, after
        retries; then any of the local files may be missing or incomplete."""
        for local_path in local_paths:
            os.makedirs(os.path.dirname(local_path), exist_ok=True)
        def download() -> None:
            if any_read_as_pattern(paths):  # fs.get would expand them as patterns
                for path, local_path in zip(paths, local_paths):
                    self.fs.get_file(path, local_path)
            else:
                self.fs.get(list(paths), list(local_paths))

        self._retry(download, f"downloading {len(paths)} files")

    def ignores_case(self) -> bool:
        """Whether this store takes two names that differ only by case for one
        (macOS and Windows do by default, and so do FAT/exFAT drives and some
        SMB mounts): group folders ``k=Store`` and ``k=store`` would then be
        one folder. A probe file is written in the URL's folder (where the run
        folders are), looked up by its name in upper case, and removed. False
        when the probe cannot be written: writing the run fails on its own,
        with its own error."""
        name = f"{TEMP_PREFIX}{uuid.uuid4().hex}-case-probe"
        probe = posixpath.join(self.base, name)
        try:
            self.write_bytes(probe, b"")
        except OSError:
            logger.debug("could not write %s to see whether the store ignores case", probe, exc_info=True)
            return False
        try:
            return self.exists(posixpath.join(self.base, name.upper()))
        finally:
            with contextlib.suppress(OSError):
                self.fs.rm_file(probe)

    def exists(self, path: str) -> bool:
        return self._retry(lambda: self.fs.exists(path), f"checking {path}")

    def remove_temp_files(self, rel: str) -> None:
        """Remove the temp files a writer killed mid-write left in group
        folder ``rel`` (local disk only: an object store's write is one PUT
        and leaves none). A finished write renames its temp file, and an
        interrupted one removes it, but a process that is killed does neither."""
        if not self.is_local:
            return
        for folder, subfolders, names in os.walk(self.path(rel)):
            for name in names:
                if name.startswith(TEMP_PREFIX):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(folder, name))

    def delete_files(self, paths: list[str]) -> None:
        """Remove these files; those already gone are no error. On an object
        store in batches (:func:`remove_files`): a resume, ``retry_failed()``
        among them, deletes the stored status and the model or output file of
        every group it runs again before its tasks start, and one request per
        file, one after another,
        took minutes with thousands of failed groups."""
        self._retry(lambda: remove_files(self.fs, paths), f"deleting {len(paths)} file(s) of {self.root}")
        self.fs.invalidate_cache(self.root)

    def delete_run(self, keep: tuple[str, ...] = ()) -> None:
        """Remove the run folder's contents, except the top-level files in ``keep``."""
        def delete() -> None:
            # listed again on every try: a failed try may have deleted some
            self.fs.invalidate_cache(self.root)  # workers wrote here behind the cache's back
            if isinstance(self.fs, (LocalFileSystem, MemoryFileSystem)):  # folders of their own
                try:
                    entries = self.fs.ls(self.root, detail=False)
                except FileNotFoundError:
                    return
                doomed = [e for e in entries if posixpath.basename(e.rstrip("/")) not in keep]
                if doomed:
                    remove_paths(self.fs, doomed)
                return
            # An object store holds files only: one listing of all of them.
            # fsspec's recursive rm of the group folders lists each folder in
            # turn, one request at a time (an hour of listings at 100,000
            # groups on a store answering in 40 ms).
            top = self.fs._strip_protocol(self.root).rstrip("/")
            doomed = [
                name for name in self.fs.find(self.root)
                if not (posixpath.dirname(name) == top and posixpath.basename(name) in keep)
            ]
            remove_files(self.fs, doomed)

        self._retry(delete, f"deleting the old files of {self.root}")
        # fsspec caches listings; a stale cache would show deleted files
        self.fs.invalidate_cache(self.root)
