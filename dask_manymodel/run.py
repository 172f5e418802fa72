"""The run handle: statuses, per-group details, waiting, cancelling, restoring."""

from __future__ import annotations

import atexit
import collections.abc
import concurrent.futures
import contextlib
import datetime
import enum
import html
import json
import logging
import numbers
import os
import posixpath
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import dask.base
import distributed
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from .exceptions import (
    InvalidArgumentError,
    InvalidURLError,
    ManyModelError,
    ModelNotAvailableError,
    PartitionNotFoundError,
    ReadOnlyRunError,
    RunNotFoundError,
    RunTimeoutError,
)
from .options import check_flag
from .serde import ModelSerde, serde_from_manifest
from .store import (
    GROUP_TEXT,
    GROUPS_FILE,
    PARTITION_FILE,
    RUN_MANIFEST,
    RunStore,
    cat_files,
    group_path,
    is_null,
    keep_few_file_systems,
    normalize_key,
    paths_in_zones,
    stored_zones,
    without_pandas_metadata_of,
)

if TYPE_CHECKING:
    import dask.dataframe as dd

    from .engine import RunSpec

logger = logging.getLogger(__name__)

__all__ = ["Artifacts", "ManyModelRun", "PartitionDetails", "PartitionStatus", "RunStatus"]


class RunStatus(str, enum.Enum):
    """Status of a whole run.

    - ``IN_PROGRESS``: some group is not final yet.
    - ``SUCCESS``: every group is DONE (also a run of an empty frame).
    - ``PARTIAL_FAILURE``: some groups DONE, some not.
    - ``FAILURE``: no group DONE.
    - ``CANCELLED``: :meth:`ManyModelRun.cancel` stopped the run, or it was
      started again elsewhere while it ran.
    """

    SUCCESS = "SUCCESS"
    PARTIAL_FAILURE = "PARTIAL_FAILURE"
    FAILURE = "FAILURE"
    CANCELLED = "CANCELLED"
    IN_PROGRESS = "IN_PROGRESS"

    def __str__(self) -> str:
        return self.value


class PartitionStatus(str, enum.Enum):
    """Status of one group (partition) of a run.

    - ``PENDING``: its task has not started; a restored handle says PENDING
      for every group not final.
    - ``RUNNING``: not final, and a worker runs its task now (live handles).
    - ``DONE``: its model or output is stored (final).
    - ``FAILED``: the user function raised or returned something unusable,
      or its model could not be saved or loaded; ``error`` and
      ``traceback`` say why (final).
    - ``CANCELLED``: the run was cancelled, or ``fail_fast`` stopped it,
      before the group started (final).
    - ``INTERNAL_ERROR``: the store failed after its retries, its task was
      lost, or the group was too big for its worker (final).
    """

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INTERNAL_ERROR = "INTERNAL_ERROR"

    def __str__(self) -> str:
        return self.value


# how often cancel() looks again for tasks that no worker can run
_CANCEL_RECHECK_SECONDS = 0.5

FINAL_STATUSES = frozenset(
    {PartitionStatus.DONE, PartitionStatus.FAILED, PartitionStatus.CANCELLED, PartitionStatus.INTERNAL_ERROR}
)


class Artifacts:
    """The files a group saved with ``ctx.upload``, and its model file (train) or
    ``part-0.parquet`` (a predict group that returned a frame, one of no rows too)."""

    def __init__(self, store: RunStore, folder: str, names: list[str]):
        self._store = store
        self._folder = folder
        self._names = list(names)

    def __repr__(self) -> str:
        return f"Artifacts({self._names!r})"

    def list(self) -> list[str]:
        """Names of the group's artifacts."""
        return list(self._names)

    def _remote(self, name: str) -> str:
        if name not in self._names:
            raise PartitionNotFoundError(
                f"no artifact {name!r} in {self._store.display(self._folder)}; "
                f"it has {self._names!r}"
            )
        return self._store.path(self._folder, name)

    def download(self, name: str, local_path: str) -> str:
        """Copy artifact ``name`` to ``local_path`` and return the file's path.

        ``local_path`` may be a folder that exists, as Snowflake ML's
        ``download(filename, local_dir)`` takes one: the file goes into it
        under its own name (it raised IsADirectoryError).
        """
        remote = self._remote(name)
        if os.path.isdir(local_path):
            local_path = os.path.join(local_path, name)
            os.makedirs(os.path.dirname(local_path), exist_ok=True)  # a serde's file in a subfolder
        self._store.download_file(remote, local_path)
        return local_path

    def get(self, name: str, read_function: Callable[[str], Any] | None = None) -> Any:
        """Load artifact ``name``: with ``read_function(local_path)``, or
        unpickled. On local storage ``local_path`` is the stored file itself
        (no copy in the temp folder, as ``get_model``): read it, never
        change or delete it."""
        from .context import _check_callable, _pickle_read

        # both checked before the download: a name that is no text failed in
        # os.path.join, and a read_function that is no function after the copy
        remote = self._remote(name)
        _check_callable(read_function, "read_function", "f(local_path) that returns the object")
        with self._store.local_file(remote, name) as local:
            return (read_function or _pickle_read)(local)


# How many groups' logs and tracebacks one read takes at most, the group asked
# for and those after it in its listing (see _GroupTexts); each file holds up
# to 2 * max_log_chars of them.
_TEXT_READ_AHEAD = 100


class _GroupText:
    """A group's logs and traceback: as the handle has them, or read from the
    group's stored ``_partition.json`` the first time one is asked for (a
    live handle's records leave them out, see ``engine._compact``), with
    those of the next groups of its listing (:class:`_GroupTexts`)."""

    __slots__ = ("_store", "_folder", "_outcome", "_values", "_listing", "_place")

    def __init__(self, store: RunStore, folder: str, outcome: tuple | None, values: dict | None = None):
        self._store = store
        self._folder = folder
        # (attempt, submission, status) of the outcome the handle knows: the
        # stored text is read only if it is that outcome's (not a later
        # start's: an overwrite, or a resume that ran the group again)
        self._outcome = outcome
        self._values = values
        self._listing: _GroupTexts | None = None  # set by _GroupTexts.add
        self._place = 0

    def __getstate__(self) -> dict:
        # alone: a pickled group's details do not carry its whole listing
        return {name: getattr(self, name) for name in ("_store", "_folder", "_outcome", "_values")}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)
        self._listing, self._place = None, 0

    def get(self, name: str) -> Any:
        if self._values is None:
            if self._listing is not None:
                self._listing.read(self)
            else:
                self._take(self._read_alone())
        return self._values.get(name)

    def _read_alone(self) -> Any:
        try:
            return self._store.read_json(self._path)
        except (FileNotFoundError, ValueError):  # not written (yet), or being written
            return None

    @property
    def _path(self) -> str:
        return self._store.path(self._folder, PARTITION_FILE)

    def _take(self, stored: Any) -> None:
        """Keep the text of ``stored`` (the group's ``_partition.json``, or
        None), if it is of the outcome the handle knows."""
        if not (isinstance(stored, dict) and self._is_the_known_outcome(stored)):
            stored = {}
        self._values = {key: stored.get(key) for key in GROUP_TEXT}

    def _is_the_known_outcome(self, stored: dict) -> bool:
        attempt, submission, status = self._outcome
        return (
            stored.get("attempt") == attempt
            and stored.get("status") == status
            # a DONE group a resume kept has an earlier start's stamp; None:
            # written before statuses were stamped
            and (status == "DONE" or stored.get("submission") in (None, submission))
        )


class _GroupTexts:
    """The texts still to read of the groups of one listing (one
    ``get_progress()``, ``summary()``, ``partition_details.values()``...).

    The first one asked for is read alone. From the second on, a user goes
    through the listing (``for d in run.get_progress()["FAILED"]:
    print(d.traceback)``): the one asked for is read with the next groups of
    the same status not read yet, up to :data:`_TEXT_READ_AHEAD`, in one
    batched read (s3fs and gcsfs fetch them concurrently). Read one by one,
    each was a request after the last: 5,000 failed groups on an object
    store answering in 50 ms took over 4 minutes.
    """

    def __init__(self, store: RunStore):
        self._store = store
        self._asked = 0
        self._by_status: dict[Any, list[_GroupText]] = {}

    def add(self, text: _GroupText) -> None:
        same = self._by_status.setdefault(text._outcome[2], [])
        text._listing, text._place = self, len(same)
        same.append(text)

    def read(self, text: _GroupText) -> None:
        self._asked += 1
        wanted = [text]
        if self._asked > 1:
            same = self._by_status[text._outcome[2]]
            # (a bounded look: one read now and then of a group already read stops it early)
            for other in same[text._place + 1 : text._place + 2 * _TEXT_READ_AHEAD]:
                if len(wanted) == _TEXT_READ_AHEAD:
                    break
                if other._values is None:
                    wanted.append(other)
        if len(wanted) == 1:
            text._take(text._read_alone())
            return
        paths = {self._store.fs._strip_protocol(t._path): t for t in wanted}
        # (missing or cut short: not written yet, or being written)
        found = self._store.read_many_json(list(paths), being_written=True)
        for path, other in paths.items():
            other._take(found.get(path))


@dataclass
class PartitionDetails:
    """What is known about one group of a run.

    Attributes
    ----------
    partition_id : object
        The group value (a tuple when the run has several ``by`` columns).
    status : PartitionStatus
    error : str or None
        What went wrong in a FAILED or INTERNAL_ERROR group, as ``Type:
        message``: the whole message, which may span lines (about 4,000
        characters at most; ``dask-manymodel show`` prints its first line).
    traceback : str or None
        Read from the group's stored status the first time it is asked for.
    logs : str
        What the user function printed or logged (capped); read as the
        traceback is.
    seconds : float
        Time the group took in its worker: the function's calls (its
        retries too), a predict's model read, and making the model's or
        output's file (with a serde that writes in memory, as
        ``PickleSerde`` does, and for a predict's output, the upload goes
        after, with a batch of groups' files, and is not in it). 0.0 for a
        group that did not run. A group a resume kept DONE keeps the
        seconds of the start that ran it.
    rows : int
        Rows of the group's input: those the function got.
    bytes : int
        Size of the file the run stored for the group: its model (train)
        or its ``part-0.parquet`` (predict). 0 for a DPF group, and for a
        group that stored none (FAILED, CANCELLED, a predict that returned None);
        files saved with ``ctx.upload`` are not counted.
    path : str
        Folder of the group, relative to the run.
    attempts : int
        How many times the function was called for the group in the start
        of the run that recorded its outcome: 1, plus the retries of
        ``ExecutionOptions(max_retries=...)`` it took. 0 when it was not
        called: CANCELLED, too big for its worker, no model to predict with,
        lost with its task, or its worker process died in it (then the
        error says so). A resume or ``retry_failed()`` that runs the group
        again counts from 0 again.
    output_rows : int or None
        Rows a predict group returned and stored (0 for None or an empty
        frame); None in train and DPF runs.
    artifacts : Artifacts
        ``list()``, ``get(name)``, ``download(name, local_path)``.
    """

    partition_id: Any
    status: PartitionStatus
    error: str | None = None
    seconds: float = 0.0
    rows: int = 0
    bytes: int = 0
    path: str = ""
    attempts: int = 0
    artifacts: Artifacts | None = field(default=None, repr=False)
    output_rows: int | None = field(default=None, repr=False)
    _text: _GroupText | None = field(default=None, repr=False, compare=False)

    @property
    def traceback(self) -> str | None:
        """The traceback of a FAILED / INTERNAL_ERROR group (read from storage when first asked for)."""
        return self._text.get("traceback") if self._text is not None else None

    @property
    def logs(self) -> str:
        """What the function printed or logged (read from storage when first asked for)."""
        return (self._text.get("logs") if self._text is not None else None) or ""

    @property
    def stage_artifacts_manager(self) -> Artifacts | None:
        """Snowflake ML's name for :attr:`artifacts`."""
        return self.artifacts


def _executing_keys(name: str, dask_scheduler=None) -> list:
    """On the scheduler: the keys of task group ``name`` being executed."""
    return [
        ts.key
        for ws in dask_scheduler.workers.values()
        for ts in ws.executing
        if isinstance(ts.key, tuple) and ts.key[0] == name
    ]


_EMPTY_SUMMARY_DTYPES = {
    "status": "str", "seconds": "float64", "rows": "int64", "bytes": "int64", "attempts": "int64",
    "error": "object", "path": "str",
}


def _connected(client: distributed.Client | None) -> bool:
    """Whether ``client`` is connected to its scheduler. One that lost it
    (the scheduler was killed or closed, the network broke) is
    ``"connecting"`` for its reconnect timeout (``Client(timeout=)``,
    ``distributed.comm.timeouts.connect``, 30 s by default), then
    ``"closed"``; Dask cancels every future of the client as the connection
    drops. A call to the scheduler meanwhile (``run_on_scheduler``, a
    ``distributed.Event``) waited out that whole timeout, then raised:
    ``summary()``, ``get_progress()``, a notebook's display of the handle and
    ``wait()`` froze for 30 s, and ``cancel()`` raised "ConnectionPool is
    closed". Without a scheduler the handle asks none and reads storage."""
    return client is not None and client.status == "running"


def _aggregate(statuses: list[PartitionStatus], cancelled: bool, finished: bool) -> RunStatus:
    if not finished:
        return RunStatus.IN_PROGRESS
    if cancelled:
        return RunStatus.CANCELLED
    done = sum(s == PartitionStatus.DONE for s in statuses)
    if done == len(statuses):
        return RunStatus.SUCCESS
    if done == 0:
        return RunStatus.FAILURE
    return RunStatus.PARTIAL_FAILURE


class _KeptRecord:
    """A group's record as a live handle keeps it: the common fields in
    slots, the rest (errors, logs, artifacts) in a dict only when present.

    A run of 200,000 groups keeps 200,000 of these; as dicts they took about
    three times the memory. Reads like the dict it was made from.
    """

    __slots__ = ("status", "seconds", "bytes", "attempts", "rows", "extra")
    _FIELDS = ("status", "seconds", "bytes", "attempts", "rows")

    def __init__(self, record: dict):
        self.status = record["status"]
        self.seconds = record.get("seconds")
        self.bytes = record.get("bytes")
        self.attempts = record.get("attempts")
        self.rows = record.get("rows")
        # the path is the key it is kept under, and partition_id is in the group list
        extra = {k: v for k, v in record.items() if k not in self._FIELDS and k not in ("path", "partition_id")}
        self.extra = extra or None

    def get(self, key: str, default: Any = None) -> Any:
        if key in self._FIELDS:
            value = getattr(self, key)
            return default if value is None else value
        return (self.extra or {}).get(key, default)

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value


_MISSING = object()


def _kept(record: Any) -> _KeptRecord:
    """A record as a handle keeps it (one read from storage, or kept already)."""
    return record if isinstance(record, _KeptRecord) else _KeptRecord(record)


# How long a task may go on writing after its run's _run.json says the run
# ended: it asks at most once per engine._HEARTBEAT_SECONDS (0.5 s), and a
# write it began just before takes a moment more.
_FENCE_SECONDS = 1.0


# The live runs of this process by submission, for the progress topic's
# handler; weakly, so that a finished run's handle (and its records, ~60 MB at
# 100,000 groups) goes when the user drops it.
_live_runs: "weakref.WeakValueDictionary[str, ManyModelRun]" = weakref.WeakValueDictionary()
# The clients whose progress topic is subscribed, once each per connection
# to a scheduler (``Client.unsubscribe_topic`` keeps the handler in the
# client, and a topic per run kept one topic per run in the scheduler), with
# that connection (``client.scheduler_comm``, weakly). A client that lost its
# scheduler and reconnected (to one started again at the same address) has a
# new connection, and the new scheduler knows none of its topics: Dask does
# not subscribe them again, and the progress bar of every later run stayed
# at 0 until a task ended.
_subscribed_clients: "weakref.WeakKeyDictionary[distributed.Client, weakref.ref]" = weakref.WeakKeyDictionary()
_subscribe_lock = threading.Lock()
_exit_hook_registered = False


def _forget_the_parents_runs() -> None:
    """In a process forked from one with runs going on (multiprocessing or a
    ProcessPoolExecutor with the 'fork' start method, celery's prefork):
    the runs are the parent's, followed there. The child's end (which runs
    :func:`end_live_runs`, a multiprocessing child's too) cancelled them
    through the client it inherited, whose event loop did not come along:
    the child never ended."""
    _live_runs.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_the_parents_runs)


# How long the interpreter's exit waits for a run still going on: first for
# cancel() (its running groups finish), then for its handle to record what was
# stored (the fence after a closed client takes _FENCE_SECONDS and the writes).
_EXIT_CANCEL_SECONDS = 10.0
_EXIT_RECORD_SECONDS = 30.0
# ... and how often it looks again whether a thread still waits on a run
_EXIT_WAITED_ON_RECHECK_SECONDS = 0.2
# A thread that left wait() this recently, the run going on, still counts as
# waiting on it: a loop of wait(timeout=...) that says the progress between
# (a summary() reads storage) is out of wait() for a moment each time
_EXIT_WAIT_AGAIN_SECONDS = 5.0


def end_live_runs() -> None:
    """Bring every run this process started and still follows to a final
    status in storage: a script that ends without ``wait()`` (or whose
    ``wait()`` an exception left) would otherwise leave its run IN_PROGRESS
    for good, since the interpreter kills the handle's collector thread. A
    run whose client still runs is cancelled (its running groups finish; one
    that takes longer than ``_EXIT_CANCEL_SECONDS`` has its tasks cut off);
    then the handle records the outcome as for a closed client.

    A run that another (non-daemon) thread is waiting on is not cancelled:
    the interpreter waits for that thread anyway, and this runs before it
    does (see :func:`_register_at_exit`), so a script whose main thread
    ended while its threads waited on their runs had those runs CANCELLED
    under their ``wait()``. Such runs are waited for first, as long as a
    thread waits on them (one may give up, ``wait(timeout=...)``, or go on
    to wait on a run it started earlier; one that left ``wait()`` less than
    ``_EXIT_WAIT_AGAIN_SECONDS`` ago and lives on counts as waiting, as a
    loop of ``wait(timeout=...)`` does). Ctrl-C while it waits ends the
    wait: those runs are cancelled as the others."""
    try:
        while True:
            waited_on = [run for run in _live_run_list() if run._waited_on_elsewhere()]
            if not waited_on:
                break
            waited_on[0]._finished.wait(_EXIT_WAITED_ON_RECHECK_SECONDS)
    except KeyboardInterrupt:
        # out of this hook, the interpreter would neither join the threads
        # nor end the runs: left IN_PROGRESS, their tasks going on
        logger.warning("interrupted while waiting for the runs that threads wait on: cancelling them")
    for run in _live_run_list():
        if run._finished.is_set():
            continue
        logger.warning(
            "run %r is still going on as the interpreter exits: cancelling it (call run.wait() to let it "
            "finish)", run.run_id,
        )
        try:
            if run._client.status == "running":
                try:
                    run.cancel(timeout=_EXIT_CANCEL_SECONDS)
                except RunTimeoutError:
                    run._client.cancel(run._futures)
        except Exception:  # the client closed meanwhile: the handle's fence ends the run
            logger.debug("could not cancel run %r", run.run_id, exc_info=True)
        if not run._finished.wait(_EXIT_RECORD_SECONDS):
            logger.warning("run %r could not record its final status; resume it to finish it", run.run_id)


def _live_run_list() -> list["ManyModelRun"]:
    """The live runs now. Listing a WeakValueDictionary raises RuntimeError
    when another thread starts or ends a run meanwhile; at the exit, which
    looks again and again while threads wait on their runs, that error
    would skip the rest of the interpreter's thread shutdown."""
    while True:
        try:
            return list(_live_runs.values())
        except RuntimeError:  # changed size during iteration: list again
            continue


def _register_at_exit(function: Callable[[], None]) -> None:
    """Have ``function`` run first as the interpreter exits, while the
    cluster's clients and an in-process scheduler still work. ``atexit``
    is too late: weakref finalizers (distributed closes its clusters and
    executors with them) and other handlers registered after this one run
    before it, and then the scheduler fails the run's tasks ("cannot schedule
    new futures after shutdown"). ``threading._register_atexit``, which
    concurrent.futures uses for the same reason, runs before any of them
    (the last registered first); private, hence the fallback."""
    try:
        threading._register_atexit(function)  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):  # not in this Python; or it is exiting already
        atexit.register(function)


def dashboard_link_of(client: distributed.Client) -> str | None:
    """``client.dashboard_link``, or None where Dask cannot make it: its
    ``distributed.dashboard.link`` template names an environment variable
    this process lacks (a JupyterHub image's "/user/{JUPYTERHUB_USER}/proxy/
    {port}/status", in a batch job of the same image). The KeyError failed
    the first run on the cluster started here, and every run's notebook view;
    Dask's scheduler only warns of it."""
    try:
        return client.dashboard_link
    except Exception:  # KeyError of the template, a client closing
        logger.debug("no dashboard link for this client", exc_info=True)
        return None


def _on_progress_event(event: tuple) -> None:
    """A task's progress report, to its run if that run is live here."""
    _, msg = event
    run = _live_runs.get(msg.get("submission")) if isinstance(msg, dict) else None
    if run is not None:
        run._on_progress_event(event)


def _follow_progress(run: "ManyModelRun", client: distributed.Client, topic: str) -> None:
    global _exit_hook_registered
    _live_runs[run._spec.submission] = run
    with _subscribe_lock:
        if not _exit_hook_registered:
            _register_at_exit(end_live_runs)
            _exit_hook_registered = True
        connection = client.scheduler_comm
        subscribed = _subscribed_clients.get(client)
        if connection is None or subscribed is None or subscribed() is not connection:
            client.subscribe_topic(topic, _on_progress_event)
            if connection is not None:
                _subscribed_clients[client] = weakref.ref(connection)


def _no_run_message(store: RunStore) -> str:
    """Why ``restore_from`` (and the CLI's show and logs) found no run, and
    what to do. The URL of a run's own folder (``url/r1`` for run ``r1``)
    is a common slip; it said only "no run 'r1' at url/r1"."""
    from .fileset import MANIFEST as FILESET_MANIFEST

    message = f"no run {store.run_id!r} at {store.url_shown} (no {RUN_MANIFEST})"
    try:
        inside_a_run = store.fs.exists(posixpath.join(store.base, RUN_MANIFEST))
        a_fileset = store.fs.exists(store.path(FILESET_MANIFEST))
    except Exception:  # only a hint: the store's own error is not this one's
        inside_a_run = a_fileset = False
    if a_fileset:
        return (
            f"{message}: {store.run_id!r} there is a FileSet; open it with FileSet(url, {store.run_id!r}), or give "
            f"the run_id of a run"
        )
    if inside_a_run:
        return (
            f"{message}: {store.url_shown} is itself the folder of a run; give the URL of the folder "
            f"that holds the runs' folders"
        )
    return f"{message}; check run_id and url (`dask-manymodel runs URL` lists the runs at URL)"


def _check_timeout(timeout: Any, call: str) -> float | None:
    """``wait()``'s and ``cancel()``'s ``timeout``: None, or seconds >= 0.
    Checked first: a text failed deep inside with a TypeError (for cancel(),
    after it had already asked the run to stop), and NaN waited for ever."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) or not timeout >= 0:
        raise InvalidArgumentError(
            f"{call}: timeout must be a number of seconds >= 0, or None to wait as long as it takes; "
            f"got {timeout!r}"
        )
    return float(timeout)


class ManyModelRun:
    """Handle on a many-model run: live (it started the run) or restored
    (read-only, from storage, in any process).

    Use :meth:`wait` to block with a progress bar, :meth:`get_progress` and
    :meth:`summary` to inspect groups, :meth:`get_model` to load one, and
    :meth:`restore_from` to reopen a run from its URL.
    """

    def __init__(
        self,
        *,
        store: RunStore,
        manifest: dict,
        groups: list[dict],
        client: distributed.Client | None = None,
        spec: "RunSpec | None" = None,
        futures: list[distributed.Future] | None = None,
        meta: pd.DataFrame | None = None,
        serde: ModelSerde | None = None,
        initial_records: list[dict] | None = None,
        source: dict | None = None,
    ):
        self._store = store
        self._manifest = manifest
        self._set_groups(groups)
        # the start of the run whose _groups.json the handle has (None: not
        # sure; a handle restored while a start was setting up may have the
        # earlier start's, see _catch_up_groups)
        running = manifest.get("status") == RunStatus.IN_PROGRESS.value
        self._groups_submission = manifest.get("submission") if futures is not None or not running else None
        self._client = client
        self._spec = spec
        self._futures = futures
        self._meta = meta
        self._serde = serde
        self._lock = threading.Lock()
        # records of groups that this run does not (re)run: a resumed run's DONE groups
        # (compact: a resume's statuses as stored took ~2.5x train's client memory at 200,000 groups)
        from .engine import _compact

        self._records: dict[str, Any] = {r["path"]: _KeptRecord(_compact(r)) for r in initial_records or []}
        # outcomes read from storage before their task handed them back (a live handle's)
        self._stored_outcomes: dict[str, _KeptRecord] = {}
        # a finished run's outcomes as read once (a restored handle's)
        self._settled: dict[str, _KeptRecord] | None = None
        # a restored handle of a run in progress: the final outcomes read so
        # far, with the start of the run (attempt, submission) they belong
        # to (see _read_statuses); None: none trusted
        self._final_read: tuple[tuple, dict[str, _KeptRecord]] | None = None
        self._initial_count = len(self._records)
        self._source = source
        # per task, the most groups its progress events said were finished
        self._task_progress: dict[Any, int] = {}
        self._finished = threading.Event()
        self._cancel_event_set = False  # by this handle (see _clear_cancel_event)
        # writes of _run.json by cancel() and by the collector as the run ends
        # come one at a time, and cancel() writes none once the run ends (see _record_cancel)
        self._manifest_lock = threading.Lock()
        self._ending = False
        # the threads in wait() now, and when others left it (see end_live_runs)
        self._waiting: list[threading.Thread] = []
        self._pid = os.getpid()  # the process that follows the run (see _refuse_where_it_waits_for_ever)
        self._left_wait: dict[threading.Thread, float] = {}
        if self.read_only:
            self._finished.set()
            return
        if not futures:
            self._finished.set()
            return
        _follow_progress(self, client, spec.progress_topic)
        self._collector = threading.Thread(
            target=self._collect, name=f"manymodel-collect-{self.run_id}", daemon=True
        )
        self._collector.start()

    # ------------------------------------------------------------------
    # identity

    @property
    def run_id(self) -> str:
        return self._store.run_id

    @property
    def url(self) -> str:
        """Base URL the run lives under (``url/run_id`` is its folder), as
        given: a password in it (``ftp://user:password@host``) is kept, so
        that the URL opens the run again; reprs and messages show it as ``***``.
        A local path (relative, ``~/...`` or ``file://...``) is the absolute
        path it resolved to, so that it opens the run from any working
        directory: ``url="models"`` gives ``"/home/me/models"``."""
        return self._store.url

    @property
    def kind(self) -> str:
        """``"train"``, ``"predict"`` or ``"dpf"``."""
        return self._manifest["kind"]

    @property
    def partition_by(self) -> list[str]:
        return list(self._manifest["partition_by"])

    @property
    def read_only(self) -> bool:
        """True for a handle rebuilt by :meth:`restore_from`."""
        return self._futures is None

    @property
    def futures(self) -> list[distributed.Future]:
        """The Dask futures of the run's tasks: one per output partition of the
        shuffle or, without one, per input partition (a large one split into
        several tasks; see ``ExecutionOptions.shuffle``)."""
        if self.read_only:
            raise ReadOnlyRunError(f"run {self.run_id!r} was restored from storage; it has no futures")
        return list(self._futures)

    @property
    def dashboard_link(self) -> str | None:
        """The Dask dashboard's link of the run's cluster; None on a restored
        handle, or where Dask cannot make it (see :func:`dashboard_link_of`)."""
        return dashboard_link_of(self._client) if self._client is not None else None

    @property
    def manifest(self) -> dict:
        """A copy of the run's ``_run.json``."""
        return dict(self._manifest)

    # ------------------------------------------------------------------
    # live collection (background thread of a live handle)

    def _on_progress_event(self, event: tuple) -> None:
        _, msg = event
        finished = int(msg.get("done", 0)) + int(msg.get("failed", 0))
        task = msg.get("task")
        with self._lock:
            self._task_progress[task] = max(self._task_progress.get(task, 0), finished)

    def _collect(self) -> None:
        try:
            cut_off: dict[int, BaseException] = {}  # cancelled outside the run: may still be running
            # lost tasks whose stored statuses could not be read (the store
            # failing under the client just then): read again once the other
            # tasks have ended. Given up at once, the handle ended the run
            # with every task still running counted INTERNAL_ERROR, while
            # those went on to store their groups DONE
            unread: dict[int, BaseException] = {}
            # on the run's client's loop: as_completed takes the default
            # client's, and this thread has none of the starting thread's
            # ``client.as_current()`` (a client made with set_as_default=False:
            # "No clients found", and every group of the run INTERNAL_ERROR)
            for future in distributed.as_completed(self._futures, loop=self._client.loop):
                task_index = future.key[1]
                try:
                    records = future.result()
                except BaseException as exc:  # KilledWorker, CancelledError, a bug of ours
                    if isinstance(exc, concurrent.futures.CancelledError) and not self._manifest.get("cancelled"):
                        cut_off[task_index] = exc
                        continue
                    try:
                        records = self._task_lost(task_index, exc)
                    except Exception:
                        logger.debug("run %r: could not read what lost task %d stored; reading it again at the "
                                     "run's end", self.run_id, task_index, exc_info=True)
                        unread[task_index] = exc
                        continue
                self._keep(records)
            if cut_off:
                self._fence_cut_off_tasks()
                # asked once: it reads every partition's future, and asked
                # for each task, a run of thousands took minutes to end
                input_gone = self._persisted_input_gone()
                for task_index, exc in cut_off.items():
                    self._keep(self._task_lost(task_index, exc, input_gone))
            for task_index, exc in unread.items():  # (fails as before if the store still fails)
                self._keep(self._task_lost(task_index, exc))
            self._keep(self._unreported())
        except Exception as exc:
            logger.exception("collecting the results of run %r failed", self.run_id)
            self._finalize_after_failure(exc)
        else:
            # every outcome is collected: a store that refuses _run.json now
            # (full, read-only) is said as that, not as a failure to collect
            try:
                self._finalize()
            except Exception as exc:
                self._final_status_not_written(exc)
        finally:
            _live_runs.pop(self._spec.submission, None)
            with self._lock:
                self._stored_outcomes = {}  # the collected records have them all now
            self._clear_cancel_event()
            self._finished.set()

    def _keep(self, records: list[dict]) -> None:
        with self._lock:
            for record in records:
                self._records[record["path"]] = _KeptRecord(record)

    def _fence_cut_off_tasks(self) -> None:
        """Some tasks were cancelled outside the run (``client.cancel``,
        ``client.restart``, a closed client). Dask forgets such a task, but
        one that was running goes on in its worker and writes its groups'
        files, so the groups it finishes must not be recorded as lost. First
        ``_run.json`` says the run ended: a task reads that before its next
        write and writes nothing more (within ``_HEARTBEAT_SECONDS``; see
        ``engine.superseded_by``); the run's cancel event stops it at its next
        group. After that window, :meth:`_task_lost` reads what the tasks
        stored and records the rest."""
        with self._manifest_lock:
            self._ending = True
        if self._superseded_by() is not None:
            return  # another start's folder now: nothing of ours is written
        fence = dict(self._manifest, finished=datetime.datetime.now(datetime.timezone.utc).isoformat())
        self._store.write_json(self._store.path(RUN_MANIFEST), fence)
        self._set_cancel_event()  # a closed client cannot: then the tasks stop at the fence
        time.sleep(_FENCE_SECONDS)  # the tasks' answers to "was the run ended?" expire

    def _finalize_after_failure(self, exc: Exception) -> None:
        """Collecting failed (a bug of ours, the store failing under the
        client): the groups not collected become INTERNAL_ERROR in this
        handle, so that ``wait()`` returns a final status; written to
        ``_run.json`` if the store lets us."""
        from .engine import _record

        with self._lock:
            for group in self._groups:
                if group["path"] not in self._records and group.get("task", 0) >= 0:
                    key = normalize_key(self._partition_id(group), len(self.partition_by))
                    record = _record(
                        self._spec, key, group["path"], rows=group.get("rows", 0), status="INTERNAL_ERROR",
                        error=f"this client could not collect the group's result: {type(exc).__name__}: {exc}",
                    )
                    self._records[group["path"]] = _KeptRecord(record)
        try:
            self._finalize()
        except Exception as write_error:
            self._final_status_not_written(write_error)

    def _final_status_not_written(self, exc: Exception) -> None:
        """The store refused the final ``_run.json``: the handle keeps its
        status, and the warning says what storage shows and what to do."""
        if self._manifest.get("status") == RunStatus.IN_PROGRESS.value:  # _finalize failed before setting it
            self._manifest["status"] = _aggregate(self._final_statuses(), False, True).value
        logger.warning(
            "run %r ended %s, but its final status could not be written to %s (%s: %s). Until it is, its "
            "_run.json says IN_PROGRESS: restore_from and the CLI tell its status from the groups' stored "
            "statuses (those the store refused too read as not run). Once the store takes writes again "
            "(free space, permissions), run it again with on_existing_artifacts='resume': that records its "
            "status, and runs its groups that are not DONE",
            self.run_id, self._manifest["status"], self._store.display(RUN_MANIFEST), type(exc).__name__, exc,
        )

    def _persisted_input_gone(self) -> bool:
        """Whether the run's input is a persisted frame some of whose
        partitions are gone from the cluster for good: Dask cancels the
        tasks that read them."""
        from .engine import persisted_input_gone

        return (
            self._source is not None
            and _connected(self._client)  # a lost scheduler took everything: its cancel says so
            and persisted_input_gone(self._source.get("input", self._source["dataframe"]))
        )

    def _task_lost(self, task_index: int, exc: BaseException, input_gone: bool = False) -> list[dict]:
        """A whole task failed: its groups without a final status become
        INTERNAL_ERROR (CANCELLED when :meth:`cancel` dropped the task before
        it started). ``input_gone``: the run's persisted input is gone
        (:meth:`_persisted_input_gone`)."""
        from .engine import (
            INPUT_GONE, _died_in_group_message, no_heartbeat_message, no_heartbeat_text, restarted_for_no_heartbeat,
        )

        dropped = self._manifest.get("cancelled") and isinstance(exc, concurrent.futures.CancelledError)
        killed = type(exc).__name__ == "KilledWorker"
        # Dask cancels the tasks that read a persisted partition gone for
        # good: said as that, with what to do (retry_failed() is refused)
        input_gone = input_gone and isinstance(exc, concurrent.futures.CancelledError) and not dropped
        superseded = self._superseded_by()
        ttl_by_worker: dict[str | None, Any] = {}  # the scheduler's events are read once per worker

        def heartbeat_ttl(worker: str | None) -> Any:
            """The worker-ttl if the scheduler restarted ``worker`` for want
            of heartbeats (a group held the GIL): not out of memory then."""
            if worker not in ttl_by_worker:
                ttl_by_worker[worker] = restarted_for_no_heartbeat(worker, self._client)
            return ttl_by_worker[worker]

        paths = [g["path"] for g in self._groups if g.get("task") == task_index]
        stored = self._read_statuses(paths)
        # a task's first try marks its first group RUNNING before it runs
        # any (engine.run_partition): nothing stored, no try of it began.
        # Unless the task raised its error itself: then a try of it ran, and
        # failed before that mark (the training run unreadable, the store down)
        began = (not killed and not isinstance(exc, concurrent.futures.CancelledError)) or any(
            stored.get(path) is not None for path in paths
        )
        records = []
        decided = []  # the outcomes decided here, written together
        for group in self._groups:
            if group.get("task") != task_index:
                continue
            existing = stored.get(group["path"])
            if existing is not None and existing.get("status") in FINAL_STATUSES:
                records.append(existing)
                continue
            key = normalize_key(self._partition_id(group), len(self.partition_by))
            ttl = heartbeat_ttl(existing.get("worker")) if killed and not dropped and existing is not None else None
            if dropped:
                outcome = {"status": "CANCELLED"}
            elif (
                existing is not None
                and existing.get("status") == "RUNNING"
                and existing.get("alone")
                and existing.get("attempt") == self._manifest.get("attempt")
                and killed
            ):  # the task's last try ran it alone: its worker died in this group
                others = existing.get("others") or 0  # other tasks ran beside it: not proven
                outcome = {
                    "status": "INTERNAL_ERROR" if others else "FAILED",
                    "error": _died_in_group_message(
                        key, f"Dask gave the task up: {type(exc).__name__}: {exc}", others=others
                    ),
                }
                if not others and self._spec.options.fail_fast:
                    self._set_cancel_event()
            else:
                if not killed:
                    why = ""
                elif ttl is not None:
                    why = "; the scheduler restarted its worker: " + no_heartbeat_text(ttl)
                else:
                    why = "; its worker may have run out of memory"
                group_named = f"group {self._partition_id(group)!r} ({group.get('rows', 0):,} rows)"
                if input_gone:
                    error = (
                        f"{group_named} was {'lost with its task' if began else 'not run'}: {INPUT_GONE}, and "
                        f"Dask cancelled the task that reads them ({_with_cause(exc)}). Build the dataframe "
                        f"again from its source (dd.read_parquet(...), then .persist() if you like) and start "
                        f"the run again with it and on_existing_artifacts='resume': its DONE groups are kept "
                        f"(retry_failed() reads the gone partitions)"
                    )
                elif began:
                    error = f"{group_named} was lost with the task running it: {_with_cause(exc)}{why}"
                else:
                    error = (
                        f"{group_named} was not run: its task was cancelled or lost before it began: "
                        f"{_with_cause(exc)}{why}"
                    )
                outcome = {"status": "INTERNAL_ERROR", "error": error}
            if ttl is not None and existing.get("alone"):  # it ran alone: the GIL hold was this group's
                outcome["error"] = f"{no_heartbeat_message(key, ttl)}; Dask gave the task up: {type(exc).__name__}"
            decided.append(self._client_outcome(group, key, superseded, **outcome))
            records.append(decided[-1])
        self._write_client_outcomes(decided, superseded)
        return records

    def _client_outcome(self, group: dict, key: tuple, superseded: str | None, **outcome: Any) -> dict:
        """A group's outcome decided here, not by its task, to be written as
        its status (:meth:`_write_client_outcomes`), unless the folder is
        another run's now (kept here only)."""
        from .engine import _record

        record = _record(self._spec, key, group["path"], rows=group.get("rows", 0), **outcome)
        if superseded is not None:
            record.update(status="CANCELLED", error=f"not written: {superseded}")
        return record

    def _write_client_outcomes(self, records: list[dict], superseded: str | None) -> None:
        """Write :meth:`_client_outcome`'s records as their groups' statuses,
        in one batch: one at a time, each with its own retries, a store that
        refused writes (a full disk) held the collector ~0.7 s per group of
        a lost task, an hour for one of 5,000 groups."""
        from .engine import _write_statuses

        if superseded is None and records:
            _write_statuses(self._spec, records)

    def _unreported(self) -> list[dict]:
        """Groups of this start's tasks that no task reported, every task
        having ended: INTERNAL_ERROR, written, so that a run is never SUCCESS
        with a group that never ran (a task that did not find a group's rows
        in its partition, as keys pandas read differently from the count's
        once did, would otherwise leave it PENDING under a SUCCESS)."""
        missing = [
            group for group in self._groups
            if isinstance(group.get("task"), int) and group["task"] >= 0 and group["path"] not in self._records
        ]
        if not missing:
            return []
        logger.warning("run %r: %d group(s) were not run by their task", self.run_id, len(missing))
        superseded = self._superseded_by()
        records = [
            self._client_outcome(
                group, normalize_key(self._partition_id(group), len(self.partition_by)), superseded,
                status="INTERNAL_ERROR",
                error=(
                    f"group {self._partition_id(group)!r} ({group.get('rows', 0):,} rows) was not run: its "
                    f"task ended without finding its rows (did the input change since the count? is it "
                    f"deterministic?); resume the run to run it"
                ),
            )
            for group in missing
        ]
        self._write_client_outcomes(records, superseded)
        return records

    def _set_cancel_event(self) -> None:
        """Tell the run's tasks to stop before their next group (fail_fast for
        a group the client FAILED, a task cancelled outside the run)."""
        self._cancel_event_set = True
        if not _connected(self._client):
            return  # the tasks stop at the fence (_fence_cut_off_tasks) instead
        try:
            distributed.Event(self._spec.cancel_event, client=self._client).set()
        except Exception:  # the client is closed: the tasks go on
            logger.debug("could not set the cancel event of run %r", self.run_id, exc_info=True)

    def _final_statuses(self) -> list[PartitionStatus]:
        """Every group's status at the run's end, PENDING for a group with no
        outcome. Only a resume leaves one: a group that its earlier start
        never ran (its client was killed first) and that the resumed data
        lacks, so that no task runs it. Left out, such a run was SUCCESS,
        with a PENDING group in ``summary()`` and counts in ``_run.json``
        that did not add up to ``n_groups`` (the same resume with no group
        left to run was PARTIAL_FAILURE, see ``engine._start_run``)."""
        statuses = [PartitionStatus(r["status"]) for r in self._records.values()]
        unrun = sum(group["path"] not in self._records for group in self._groups)
        return statuses + [PartitionStatus.PENDING] * unrun

    def _clear_cancel_event(self) -> None:
        """Every task of the run has ended: the scheduler may forget the run's
        cancel event. A set event stays on the scheduler until it is cleared
        (Dask's Events have no other end): a cluster kept up for days kept one
        per run that was cancelled or stopped by fail_fast. A task cut off
        outside the run that still goes on stops at the fence in ``_run.json``
        (``engine.superseded_by``)."""
        if not (self._manifest.get("cancelled") or self._spec.options.fail_fast or self._cancel_event_set):
            return  # never set: nothing to forget (and no round trip)
        if not _connected(self._client):
            return  # no scheduler to forget it (see _connected)
        try:
            # clearing an event no one waits on deletes it
            distributed.Event(self._spec.cancel_event, client=self._client).clear()
        except Exception:  # the client is closed: the cluster went, or goes on without it
            logger.debug("could not clear the cancel event of run %r", self.run_id, exc_info=True)

    def _finalize(self) -> None:
        with self._manifest_lock:
            self._ending = True
        superseded = self._superseded_by()
        statuses = self._final_statuses()
        counts = {s.value: statuses.count(s) for s in PartitionStatus if statuses.count(s)}
        cancelled = bool(self._manifest.get("cancelled")) or superseded is not None
        status = _aggregate(statuses, cancelled and PartitionStatus.CANCELLED in statuses, True)
        self._manifest.update(
            status=status.value,
            counts=counts,
            finished=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        )
        if superseded is not None:
            # the run's _run.json is the other start's now: writing ours over
            # it would make that run's statuses stop counting
            logger.warning(
                "%s; this handle's final status (%s) is not written there, and its groups that "
                "finished after that were not written (CANCELLED here)", superseded, status.value,
            )
            return
        self._store_statuses_not_stored()
        self._store.write_json(self._store.path(RUN_MANIFEST), self._manifest)

    def _store_statuses_not_stored(self) -> None:
        """Write the statuses that their task (or this client) could not
        store, the store failing just then, as this handle recorded them
        (INTERNAL_ERROR, saying why), before the run's final ``_run.json``.
        Left out, storage kept what it had before: no status (a restored
        handle and the CLI said PENDING), or the RUNNING mark a task writes
        before it runs a group (see ``engine._CarefulTry``), shown for good
        under a run that had ended, whose counts said INTERNAL_ERROR. A
        status that fails again stays as it is, as the run's final status
        would (see :meth:`_final_status_not_written`)."""
        from .engine import STATUS_NOT_STORED, _now, _record

        with self._lock:
            unstored = {path: kept for path, kept in self._records.items() if kept.get(STATUS_NOT_STORED)}
        files = {}
        for path, kept in unstored.items():
            group = self._group_of_path(path)
            if group is None:
                continue
            fields = {name: kept.get(name) for name in _KeptRecord._FIELDS if kept.get(name) is not None}
            fields.update((name, value) for name, value in kept.extra.items() if name != STATUS_NOT_STORED)
            key = normalize_key(self._partition_id(group), len(self.partition_by))
            record = _record(self._spec, key, path, **fields)
            record["finished"] = _now()  # (a record this client made has one)
            files[path] = json.dumps(record, indent=None, default=str).encode()
        if not files:
            return
        failed = self._store.write_many(
            {self._store.path(path, PARTITION_FILE): data for path, data in files.items()}, atomic=False
        )
        with self._lock:
            for path in files:
                if self._store.path(path, PARTITION_FILE) not in failed:
                    unstored[path].extra.pop(STATUS_NOT_STORED, None)
        if failed:
            logger.warning(
                "run %r: the statuses of %d group(s) could not be written either (such as %s: %s); until a "
                "resume writes them, restore_from and the CLI show those groups as they were stored before "
                "(not run, or RUNNING)", self.run_id, len(failed), next(iter(failed)), next(iter(failed.values())),
            )

    def _superseded_by(self) -> str | None:
        """Why this run may no longer write into its folder (it was started
        again elsewhere, or deleted), or None. A failed read is no evidence."""
        from .engine import superseded_or_none

        submission = self._manifest.get("submission")
        return None if submission is None else superseded_or_none(self._store, submission)

    # ------------------------------------------------------------------
    # status

    def _partition_id(self, group: dict) -> Any:
        from .engine import json_key_to_partition_id

        return json_key_to_partition_id(group["partition_id"])

    def _read_statuses(self, paths: list[str]) -> dict[str, dict]:
        """Stored ``_partition.json`` of these groups that belong to this
        attempt. While the run is in progress, a group that runs in it (a
        task of ``_groups.json``) counts only an outcome of this start of the
        run, or DONE: a resume deletes the earlier start's other outcomes of
        the groups it runs again only after its ``_run.json`` says
        IN_PROGRESS, and a reader in between would call the run finished."""
        self._refresh_if_running()
        # while the run goes on, its tasks write statuses in place: one read
        # as it is written is cut short, which is no damage worth a warning
        # (one per peek at a live run's summary() or status)
        running = self._manifest.get("status") == RunStatus.IN_PROGRESS.value
        start = (self._manifest.get("attempt"), self._manifest.get("submission"))
        known = self._final_read[1] if self._final_read is not None and self._final_read[0] == start else {}
        statuses: dict[str, Any] = self._store.read_statuses(
            [path for path in paths if path not in known], self._manifest.get("attempt"), being_written=running
        )
        statuses.update((path, known[path]) for path in paths if path in known)
        self._catch_up_groups(statuses)
        if self._manifest.get("status") != RunStatus.IN_PROGRESS.value:
            return statuses
        submission = self._manifest.get("submission")
        statuses = {
            path: status
            for path, status in statuses.items()
            if status.get("status") == "DONE"
            or status.get("submission") in (None, submission)  # None: written before statuses were stamped
            or (self._group_of_path(path) or {}).get("task", -1) < 0  # kept from an earlier start
        }
        if self.read_only:
            self._keep_final(start, known, statuses)
        return statuses

    def _keep_final(self, start: tuple, known: dict[str, _KeptRecord], statuses: dict[str, Any]) -> None:
        """A restored handle of a run in progress keeps the final outcomes it
        read (DONE, or of this very start of the run), so that the next
        ``status``, ``summary()`` or ``get_progress()`` reads only the groups
        still going (each read the whole run's statuses again: 2,000 GETs
        a look at a run of 2,000 groups on S3). Such an outcome changes only
        when the run is started again (a resume, ``retry_failed()``, an
        overwrite), in any process: that writes a new ``_run.json`` first,
        which the next read sees (see _refresh_if_running) and drops them.
        Not kept: another start's outcome other than DONE (of a group no
        longer in the data; or one a starting resume is about to delete)."""
        ours = {start[1]} - {None}  # (an old version's _run.json names no start)
        final = {
            path: _kept(status)
            for path, status in statuses.items()
            if status.get("status") == "DONE"
            or (status.get("status") in FINAL_STATUSES and status.get("submission") in ours)
        }
        self._final_read = (start, {**known, **final})  # one assignment: never a mix of two starts

    def _set_groups(self, groups: list[dict]) -> None:
        self._groups = groups
        self._path_index = {g["path"]: i for i, g in enumerate(groups)}
        self._zones: list[set] | None = None  # stored_zones(), made when first asked

    def _group_of_path(self, path: str) -> dict | None:
        index = self._path_index.get(path)
        return None if index is None else self._groups[index]

    def _refresh_if_running(self) -> None:
        """A restored handle of a run in progress reads its ``_run.json``
        again (one small read), and ``_groups.json`` when another start of
        the run wrote them: else it would never see a later resume end."""
        if not self.read_only or self._manifest.get("status") != RunStatus.IN_PROGRESS.value:
            return
        try:
            fresh = self._store.read_manifest()
        except Exception:  # gone or unreadable now: what the handle has
            self._final_read = None  # (deleted, maybe: read every group again)
            return
        if fresh.get("attempt") != self._manifest.get("attempt"):
            self._final_read = None  # (its files go: read every group again)
            return  # started over (an overwrite): another run than this handle's
        self._manifest = fresh  # its groups: _catch_up_groups

    def _catch_up_groups(self, statuses: dict[str, dict]) -> None:
        """A restored handle's ``_groups.json`` of the start its ``_run.json``
        names. A start writes ``_run.json`` before ``_groups.json``: so its
        groups are surely written once the run has ended, or once one of its
        groups has a status (its tasks start after); read before, they may
        be the earlier start's (a resume's new groups missing)."""
        start = self._manifest.get("submission")
        if not self.read_only or self._groups_submission == start:
            return
        n_groups = int(self._manifest.get("n_groups") or 0)
        sure = self._manifest.get("status") != RunStatus.IN_PROGRESS.value or any(
            status.get("submission") == start for status in statuses.values()
        )
        if sure or len(self._groups) < n_groups:  # fewer groups than the start has: an earlier list
            self._load_groups(start)
            if not sure and len(self._groups) < n_groups:
                self._groups_submission = None  # still the earlier list: the next read again

    def _load_groups(self, start: str | None) -> None:
        try:
            self._set_groups(self._store.read_run_file(GROUPS_FILE, list))
        except Exception:  # missing or being written: the next read
            return
        self._groups_submission = start

    def _current_records(self, paths: list[str] | None = None) -> dict[str, Any]:
        """The records of these groups (of every group without ``paths``) that
        have one: a live handle's collected records, with the outcomes
        storage has before their task hands them back; a restored handle's
        as stored. Outcomes read once are kept: final outcomes of this start
        do not change, and a restored handle of a finished run is a snapshot
        of it (read again with ``restore_from`` to see a later resume)."""
        if self.read_only:
            return self._restored_records(paths)
        with self._lock:
            records = dict(self._stored_outcomes)
            records.update(self._records)
        if not self._finished.is_set():
            # tasks report back when all their groups are done; storage knows
            # each group as soon as it finishes
            wanted = [g["path"] for g in self._groups] if paths is None else paths
            read = self._read_statuses([path for path in wanted if path not in records])
            kept = {path: _KeptRecord(record) for path, record in read.items() if record["status"] in FINAL_STATUSES}
            with self._lock:
                if not self._finished.is_set():  # (once finished, the collected records have them all)
                    self._stored_outcomes.update(kept)
            records.update(read)
        return _of_paths(records, paths)

    def _restored_records(self, paths: list[str] | None) -> dict[str, Any]:
        if self._settled is not None:  # the finished run's, as read before
            return _of_paths(self._settled, paths)
        if paths is not None:
            return self._read_statuses(paths)
        groups = self._groups
        read = [g["path"] for g in groups]
        records = self._read_statuses(read)
        if self._groups is not groups:  # caught up with a later start's groups: the new ones' too
            # (the statuses read are of the same _run.json; each status was
            # read again, two reads of every group's a first look at a run)
            records = {path: record for path, record in records.items() if path in self._path_index}
            read_set = set(read)
            new = [g["path"] for g in self._groups if g["path"] not in read_set]
            if new:
                records.update(self._read_statuses(new))
        if self._manifest.get("status") != RunStatus.IN_PROGRESS.value:
            self._settled = {path: _kept(record) for path, record in records.items()}
        return records

    def _refuse_where_it_waits_for_ever(self, what: str, call: str, stored: str = "") -> None:
        """Refuse what waits on the cluster while the run goes on where the
        cluster cannot answer. In the event loop of the run's client (an
        asyncio service's asynchronous client; the service started the run
        in a thread, as the start's error says), blocking the loop that
        brings the answers: ``wait()`` froze the service for ever,
        ``cancel()`` set nothing and timed out, and ``summary()`` got a
        coroutine ("'coroutine' object is not iterable"). In a process
        forked from the one that started the run, where neither the client's
        loop nor the handle's collecting thread came along: they waited for
        ever."""
        if self._pid != os.getpid():
            raise InvalidArgumentError(
                f"run {self.run_id!r} was started by process {self._pid}, which this one was forked from: "
                f"its live handle follows the run there only, and {what} would wait for ever here; read "
                f"the run as stored: ManyModelRun.restore_from({self.run_id!r}, url)"
            )
        if self._client is not None and self._client.asynchronous:
            raise InvalidArgumentError(
                f"run {self.run_id!r} is still going on, and {what} of its live handle waits on the Dask "
                f"cluster, which cannot answer while the call holds the client's event loop (an "
                f"asynchronous client's); call it from a thread: await asyncio.to_thread({call}){stored}"
            )

    def _running_tasks(self) -> set[int]:
        """The run's tasks a worker is executing, as the scheduler heard at
        the workers' last heartbeats (about a second behind). Not the tasks
        the scheduler has handed to a worker (``client.processing()``): those
        include the ones waiting in the worker's queue."""
        if self.read_only or self._finished.is_set() or not self._futures:
            return set()
        self._refuse_where_it_waits_for_ever(
            "reading its groups' statuses (summary(), get_progress(), partition_details)", "run.summary",
            f", or read them as stored: ManyModelRun.restore_from({self.run_id!r}, url).summary()",
        )
        if not _connected(self._client):
            return set()  # no scheduler to ask: the groups read as stored
        name = self._futures[0].key[0]
        try:
            executing = self._client.run_on_scheduler(_executing_keys, name)
        except Exception:
            return set()
        return {key[1] for key in executing}

    def _details(
        self, paths: list[str] | None = None, records: dict[str, Any] | None = None
    ) -> dict[str, PartitionDetails]:
        """``{path: PartitionDetails}`` of these groups (of every group
        without ``paths``), reading only their statuses (unless ``records``
        are those read already)."""
        records = self._current_records(paths) if records is None else records
        details = {}
        groups = self._groups if paths is None else [self._group_of_path(path) for path in paths]
        # (only for groups with no outcome: a display's failed groups need no scheduler)
        running = self._running_tasks() if any(group["path"] not in records for group in groups) else set()
        texts = _GroupTexts(self._store)  # read together when asked for, see there
        for group in groups:
            record = records.get(group["path"])
            if record is None:
                record = {"status": _not_finished(group, running), "rows": group.get("rows", 0)}
            details[group["path"]] = PartitionDetails(
                partition_id=self._partition_id(group),
                status=PartitionStatus(record["status"]),
                error=record.get("error"),
                seconds=float(record.get("seconds") or 0.0),
                rows=int(record.get("rows") or group.get("rows") or 0),
                bytes=int(record.get("bytes") or 0),
                path=group["path"],
                attempts=int(record.get("attempts") or 0),
                artifacts=Artifacts(self._store, group["path"], self._artifact_names(record)),
                output_rows=self._output_rows(record),
                _text=self._group_text(group["path"], record, texts),
            )
        return details

    def _group_text(self, folder: str, record: Any, texts: _GroupTexts) -> _GroupText | None:
        """The group's logs and traceback: as the record has them (an
        INTERNAL_ERROR's), or read from storage when asked for (records leave
        them out, see ``engine._compact`` and ``RunStore.read_statuses``)."""
        status = PartitionStatus(record["status"])
        if status not in FINAL_STATUSES:
            return None  # nothing stored yet
        outcome = (self._manifest.get("attempt"), self._manifest.get("submission"), status.value)
        if any(record.get(key) for key in GROUP_TEXT):
            return _GroupText(self._store, folder, outcome, {key: record.get(key) for key in GROUP_TEXT})
        text = _GroupText(self._store, folder, outcome)
        texts.add(text)
        return text

    def _output_rows(self, record: dict) -> int | None:
        """Rows a DONE predict group returned; a live handle's records leave
        out a 0 (see ``_compact``), a stored one keeps it: both say 0."""
        if self.kind == "predict" and record.get("status") == "DONE":
            return int(record.get("output_rows") or 0)
        return record.get("output_rows")

    def _artifact_names(self, record: dict) -> list[str]:
        names = list(record.get("artifacts") or [])
        serde = self._manifest.get("serde")
        if record.get("status") == "DONE" and self.kind == "train" and serde:
            names.insert(0, serde["filename"])
        # a predict group that returned a frame of no rows stored its
        # part-0.parquet too (one returned None stored nothing): the file's
        # bytes tell, not its rows, which left the stored file out of list()
        if record.get("status") == "DONE" and self.kind == "predict" and (
            record.get("bytes") or record.get("output_rows")
        ):
            from .engine import OUTPUT_FILE

            names.append(OUTPUT_FILE)
        return names

    @property
    def status(self) -> RunStatus:
        """The run's :class:`RunStatus` now (IN_PROGRESS until every group is final)."""
        if not self.read_only:
            if not self._finished.is_set():
                return RunStatus.IN_PROGRESS
            return RunStatus(self._manifest["status"])
        stored = RunStatus(self._manifest["status"])
        if stored != RunStatus.IN_PROGRESS:
            return stored
        # the client that ran it may have died before writing the final status
        return self._status_of(self._current_records())

    def _status_of(self, records: dict[str, Any]) -> RunStatus:
        """A restored handle's status of a run whose ``_run.json`` says
        IN_PROGRESS, from these records of its groups (as read now)."""
        statuses = [PartitionStatus(r["status"]) for r in records.values()]
        # _groups.json may be missing (being written, or an interrupted overwrite)
        all_groups_known = len(self._groups) >= int(self._manifest.get("n_groups") or 0)
        # a stored status may be a task's RUNNING mark, written before the
        # group runs (engine._CarefulTry): a run whose every group has a
        # status, some of them such marks, still goes on (it read FAILURE or
        # PARTIAL_FAILURE while its last groups ran, and predict took it for ended)
        finished = (
            all_groups_known
            and len(records) == len(self._groups)
            and all(status in FINAL_STATUSES for status in statuses)
        )
        return _aggregate(statuses, PartitionStatus.CANCELLED in statuses and bool(self._manifest.get("cancelled")), finished)

    @property
    def partition_details(self) -> "PartitionDetailsMapping":
        """``{partition_id: PartitionDetails}`` for every group of the run, as
        a read-only mapping that reads a group's status when it is looked up
        (``run.partition_details[7]`` reads group 7's alone) and every
        group's in one batched read when iterated over with values."""
        return PartitionDetailsMapping(self)

    def get_progress(self) -> dict[str, list[PartitionDetails]]:
        """Groups by status: ``{"DONE": [PartitionDetails, ...], "FAILED": [...]}``.

        Only statuses that occur are keys.
        """
        progress: dict[str, list[PartitionDetails]] = {}
        for details in self._details().values():
            progress.setdefault(details.status.value, []).append(details)
        return progress

    def summary(self) -> pd.DataFrame:
        """One row per group: partition_id, status, seconds, rows, bytes, attempts, error, path.

        Each column is the :class:`PartitionDetails` field of that name. The
        rows come in the run's group order; the counts per status
        (``summary()["status"].value_counts()``) are those of
        :meth:`get_progress`, and, once the run has ended, of ``counts`` in
        its ``_run.json``.
        """
        return self._summary_of(self._details())

    def _summary_and_status(self) -> tuple[pd.DataFrame, RunStatus]:
        """``summary()`` and ``status`` from one read of the groups' statuses
        (``dask-manymodel show`` of a run in progress read them twice)."""
        if not self.read_only or self._manifest["status"] != RunStatus.IN_PROGRESS.value:
            return self.summary(), self.status
        records = self._current_records()
        stored = RunStatus(self._manifest["status"])  # read again: it may have ended meanwhile
        status = stored if stored != RunStatus.IN_PROGRESS else self._status_of(records)
        return self._summary_of(self._details(records=records)), status

    def _summary_of(self, details: dict[str, PartitionDetails]) -> pd.DataFrame:
        rows = [
            {
                "partition_id": d.partition_id,
                "status": d.status.value,
                "seconds": d.seconds,
                "rows": d.rows,
                "bytes": d.bytes,
                "attempts": d.attempts,
                "error": d.error,
                "path": d.path,
            }
            for d in details.values()
        ]
        columns = ["partition_id", "status", "seconds", "rows", "bytes", "attempts", "error", "path"]
        frame = pd.DataFrame(rows, columns=columns)
        # the group values as they are: pandas would make ints with a null
        # group floats (large ones then name another group)
        frame["partition_id"] = pd.Series([row["partition_id"] for row in rows], index=frame.index, dtype=object)
        if not rows:  # the dtypes a run with groups has
            frame = frame.astype(_EMPTY_SUMMARY_DTYPES)
        return frame

    def _finished_count(self) -> int:
        """Groups final so far, for the progress bar: those known before the
        tasks started (a resume's DONE groups) and what each task reported, or
        the records collected, whichever is more."""
        with self._lock:
            from_events = self._initial_count + sum(self._task_progress.values())
            return max(len(self._records), from_events)

    # ------------------------------------------------------------------
    # waiting and cancelling

    def wait(self, timeout: float | None = None, show_progress: bool = True) -> RunStatus:
        """Block until every group is final; return the final :class:`RunStatus`.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait (>= 0); then :class:`RunTimeoutError` (the run
            goes on). None waits as long as it takes.
        show_progress : bool
            Show a tqdm bar of finished groups (DONE or FAILED) out of all
            groups, on stderr; in a notebook with ipywidgets, a widget.
            numpy's bools are taken; anything else (a text such as "no",
            which is truthy) raises :class:`InvalidArgumentError`.

        Returns
        -------
        RunStatus
            SUCCESS, PARTIAL_FAILURE, FAILURE or CANCELLED.

        Raises
        ------
        RunTimeoutError
            ``timeout`` passed first.
        ReadOnlyRunError
            On a restored handle: it did not start the work.
        InvalidArgumentError
            ``timeout`` is not a number of seconds >= 0 (nor None), or
            ``show_progress`` is not True or False.
        """
        if self.read_only:
            raise ReadOnlyRunError(
                f"run {self.run_id!r} was restored from storage: it cannot be waited on; "
                f"read .status or .get_progress() instead"
            )
        timeout = _check_timeout(timeout, "wait()")
        show_progress = check_flag(show_progress, "wait(): show_progress")
        from ._client import outside_the_worker_pool

        if not self._finished.is_set():
            self._refuse_where_it_waits_for_ever("wait()", "run.wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = threading.current_thread()
        with self._lock:
            self._waiting.append(waiter)
        bar = None
        try:
            if show_progress:
                from tqdm.auto import tqdm

                # starting from the groups final already (a resume's DONE ones):
                # counted as finished in its first moment, they made the rate
                # thousands of groups a second and the ETA 0 for a rerun of slow groups
                total = len(self._groups)
                bar = tqdm(
                    total=total, initial=min(self._finished_count(), total), desc=f"{self.kind} {self.run_id}",
                    unit="group",
                )
            with outside_the_worker_pool():  # (in a Dask task: see start_run)
                while not self._finished.wait(0.2):
                    if bar is not None:
                        bar.update(min(self._finished_count(), len(self._groups)) - bar.n)
                    if deadline is not None and time.monotonic() > deadline:
                        raise RunTimeoutError(
                            f"run {self.run_id!r} did not finish within {timeout}s; it goes on, "
                            f"call wait() again or cancel()"
                        )
            if bar is not None:
                self._end_bar(bar)
        finally:
            with self._lock:
                self._waiting.remove(waiter)
                self._left_wait = {t: left for t, left in self._left_wait.items() if t.is_alive()}
                self._left_wait[waiter] = time.monotonic()
            if bar is not None:
                bar.close()
        return self.status

    def _waited_on_elsewhere(self) -> bool:
        """Whether a thread other than this one, which the interpreter waits
        for as it exits (not a daemon), is in :meth:`wait` on this run while
        it goes on."""
        current = threading.current_thread()
        recently = time.monotonic() - _EXIT_WAIT_AGAIN_SECONDS
        with self._lock:
            waiting = self._waiting + [t for t, left in self._left_wait.items() if left > recently]
        return not self._finished.is_set() and any(
            thread is not current and not thread.daemon and thread.is_alive() for thread in waiting
        )

    def _end_bar(self, bar) -> None:
        """The bar at the run's end: the groups that ran (not those
        cancelled before they started, nor those a resume left PENDING),
        the count per status, and red unless the run is SUCCESS (tqdm
        paints a full bar green)."""
        counts = self._counts()
        ended = {status.value for status in FINAL_STATUSES} - {PartitionStatus.CANCELLED.value}
        ran = sum(n for status, n in counts.items() if status in ended)
        bar.update(ran - bar.n)
        bar.set_postfix_str(", ".join(f"{n:,} {status}" for status, n in counts.items()), refresh=False)
        if self.status != RunStatus.SUCCESS:
            bar.colour = "red"

    def cancel(self, timeout: float | None = 60) -> RunStatus:
        """Stop the run: running tasks stop before their next group, and groups
        not yet started become CANCELLED. Returns the final status once every
        task has stopped.

        Tasks that no worker can run, because they need resources no worker
        offers (``ExecutionOptions(resources=...)``) or because the cluster
        has no worker left (scaled to zero, its jobs or nodes gone), would
        never start; they are dropped, and their groups become CANCELLED
        too.

        Parameters
        ----------
        timeout : float or None
            Seconds to wait for the run to stop (default 60); None waits as
            long as it takes.

        Returns
        -------
        RunStatus
            The final status: CANCELLED, or how the run ended if it had
            ended already.

        Raises
        ------
        RunTimeoutError
            The run has not stopped after ``timeout`` seconds.
        InvalidArgumentError
            ``timeout`` is not a number of seconds >= 0 (nor None); raised
            before the run is asked to stop.
        ReadOnlyRunError
            On a restored handle.
        """
        if self.read_only:
            raise ReadOnlyRunError(f"run {self.run_id!r} was restored from storage: it cannot be cancelled")
        timeout = _check_timeout(timeout, "cancel()")
        if self._finished.is_set():
            return self.status
        self._refuse_where_it_waits_for_ever("cancel()", "run.cancel")
        self._record_cancel()
        # a client that lost its scheduler (killed, closed, restarting) cannot
        # set the event: it raised "ConnectionPool is closed" here, or waited
        # out the client's reconnect timeout. Dask cancelled every task of the
        # run with the connection; the collector fences them and records their
        # groups (CANCELLED, the run being cancelled), as waited for below
        self._cancel_event_set = True
        if _connected(self._client):
            distributed.Event(self._spec.cancel_event, client=self._client).set()
        from ._client import outside_the_worker_pool

        deadline = None if timeout is None else time.monotonic() + timeout
        with outside_the_worker_pool():  # (in a Dask task: see start_run)
            while True:
                # tasks that need resources no worker offers, or on a cluster of
                # no worker, would never start to see the event: drop them, their
                # groups become CANCELLED. Asked
                # again while waiting: a task may reach the scheduler only now, or
                # lose the one worker that could run it
                unrunnable = self._tasks_no_worker_can_run()
                if unrunnable:
                    self._client.cancel([f for f in self._futures if f.key in unrunnable and not f.done()])
                if self._finished.wait(_CANCEL_RECHECK_SECONDS):
                    # (the run may have ended just as the event was set)
                    self._clear_cancel_event()
                    return self.status
                if deadline is not None and time.monotonic() > deadline:
                    raise RunTimeoutError(f"run {self.run_id!r} did not stop within {timeout}s")

    def _record_cancel(self) -> None:
        """Mark the run cancelled in ``_run.json`` (``cancelled: true``)
        before its tasks are told to stop. Its groups not run become
        CANCELLED as a ``fail_fast`` stop leaves them, and only this flag
        tells the two apart: a client that died before writing the final
        status (killed, or a script that ended after ``cancel()`` timed
        out) left a restored handle reading the run as PARTIAL_FAILURE or
        FAILURE. A store that refuses the write does not stop the cancel."""
        with self._manifest_lock:
            self._manifest["cancelled"] = True
            if self._ending:
                return  # the collector writes the run's end, this flag with it
            if self._superseded_by() is not None:
                return  # another start's _run.json now: not ours to write
            try:
                self._store.write_json(self._store.path(RUN_MANIFEST), self._manifest)
            except Exception as exc:
                logger.warning(
                    "could not record the cancel of run %r in %s (%s: %s): cancelling it anyway; should this "
                    "client end before the run does, its _run.json will not say it was cancelled",
                    self.run_id, self._store.display(RUN_MANIFEST), type(exc).__name__, exc,
                )

    def _tasks_no_worker_can_run(self) -> set:
        """Keys of this run's tasks that have not started and that no worker
        of the cluster can run now: they need resources that none offers, or
        there is no worker (a cluster scaled to zero, or whose workers all
        went: cancel() waited for ever for them to start)."""
        from .engine import some_worker_offers, workers_resources

        if not _connected(self._client):
            return set()  # no scheduler to ask, and Dask cancelled the run's tasks with the connection
        needs = self._spec.options.resources  # every task of the run needs the same
        offered = workers_resources(self._client)
        if offered is None or (offered and (not needs or some_worker_offers(needs, offered))):
            return set()
        keys = [f.key for f in self._futures]
        try:
            # only tasks that have not started: dropping one cuts nothing short
            return set(self._client.run_on_scheduler(
                lambda dask_scheduler: [
                    key for key in keys
                    if key in dask_scheduler.tasks
                    and dask_scheduler.tasks[key].state in ("released", "waiting", "queued", "no-worker")
                ]
            ))
        except Exception:  # the scheduler is gone or busy: cancel as before
            logger.debug("could not ask the scheduler for the run's tasks", exc_info=True)
            return set()

    def retry_failed(self, *, show_progress: bool = False) -> "ManyModelRun":
        """Run again every group that is not DONE; DONE groups are left untouched.

        Waits for this run to finish first, then starts a resumed run (same
        run_id, same attempt) over the same dataframe and returns its handle.
        The groups run the same function over the same (lazy) dataframe:
        data fixed at its source is read again; to change the function, start
        the run again with it and ``on_existing_artifacts="resume"``. A
        restored handle has no dataframe: use
        ``ddf.manymodel.train(..., on_existing_artifacts="resume")`` (or
        ``predict``, or the class API's ``.run``).

        Parameters
        ----------
        show_progress : bool
            Show :meth:`wait`'s progress bar while this run finishes (default
            False); the new run's handle is returned at once.

        Returns
        -------
        ManyModelRun
            The live handle of the resumed run.

        Raises
        ------
        ReadOnlyRunError
            On a restored handle, or one whose dataframe is not known.
        """
        if self.read_only or self._source is None:
            call = {
                "train": "ddf.manymodel.train(fn, by=..., url=..., ",
                "predict": f"ddf.manymodel.predict(fn, by=..., url=..., training_run_id="
                           f"{self._manifest.get('training_run_id')!r}, ",
            }.get(self.kind, "DPF(fn, stage_name=url).run(partition_by=..., dataframe=ddf, ")
            raise ReadOnlyRunError(
                f"run {self.run_id!r} was restored from storage and has no dataframe; call "
                f"{call}run_id={self.run_id!r}, on_existing_artifacts='resume') with the data"
            )
        self.wait(show_progress=check_flag(show_progress, "retry_failed(): show_progress"))
        # on the run's own cluster (where its input may be persisted), not the
        # default client's; one closed since: the active client, as any run
        running = self._client.status == "running"
        with self._client.as_current() if running else contextlib.nullcontext():
            return self._start_again()

    def _start_again(self) -> "ManyModelRun":
        from .engine import start_run

        spec = self._spec
        return start_run(
            spec.kind,
            spec.func,
            self._source.get("input", self._source["dataframe"]),
            by=spec.by,
            url=self._store.url,
            run_id=self.run_id,
            storage_options=self._source["storage_options"],
            serde=spec.serde,
            on_existing_artifacts="resume",
            execution_options=self._source["execution_options"],
            training_run_id=self._manifest.get("training_run_id"),
            meta=self._source["meta"],
        )

    def progress(self, **kwargs: Any) -> Any:
        """Dask's own progress bar over the run's tasks (those of :attr:`futures`,
        so it counts tasks; :meth:`wait` counts groups).

        Parameters
        ----------
        **kwargs
            Passed to :func:`distributed.progress`: ``notebook=False`` for a
            text bar, ``multi=True`` (the default) for one bar per task prefix.

        Returns
        -------
        distributed.diagnostics.progressbar.MultiProgressWidget or None
            In a notebook the widget (make it the cell's last expression to
            show it); in a terminal None, after printing a bar until every
            task has finished.

        Raises
        ------
        ReadOnlyRunError
            On a restored handle: it has no futures; use :meth:`get_progress`.
        ManyModelError
            The run's client was closed, or lost its scheduler; or tasks of
            the run were cancelled outside it (``client.restart()``,
            ``client.cancel()``).
        """
        futures = self.futures
        if self._client.status in ("closing", "closed"):
            raise ManyModelError(
                f"the Dask client of run {self.run_id!r} is closed; read run.get_progress() "
                f"or run.status instead"
            )
        if not _connected(self._client):
            raise ManyModelError(
                f"the Dask client of run {self.run_id!r} lost its scheduler (it is {self._client.status!r}); "
                f"read run.get_progress() or run.status instead"
            )
        # the scheduler forgot such a task, and Dask's bar waited on it for ever
        cancelled = sum(future.cancelled() for future in futures)
        if cancelled:
            raise ManyModelError(
                f"{cancelled:,} of the {len(futures):,} tasks of run {self.run_id!r} were cancelled outside the "
                f"run (client.restart(), client.cancel(), or its scheduler was lost), and Dask's bar would wait "
                f"for them for ever; read run.get_progress() or run.status instead"
            )
        # the run's own scheduler, not the default client's
        kwargs.setdefault("scheduler", self._client.scheduler.address)
        return distributed.progress(futures, **kwargs)

    # ------------------------------------------------------------------
    # models

    def _model_serde(self) -> ModelSerde:
        if self._serde is not None:
            return self._serde
        if self._spec is not None and self._spec.serde is not None:
            return self._spec.serde
        entry = self._manifest.get("serde")
        serde = serde_from_manifest(entry) if entry else None
        if serde is None:
            raise InvalidArgumentError(
                f"run {self.run_id!r} was saved with serde {entry!r}, which cannot be rebuilt "
                f"here; pass serde= to restore_from"
            )
        return serde

    def _group_for(self, partition_id: Any) -> dict:
        try:
            key = normalize_key(partition_id, len(self.partition_by))
        except KeyError as exc:
            raise PartitionNotFoundError(str(exc.args[0])) from None
        path = self._stored_path(key)
        if path not in self._path_index:
            sample = [self._partition_id(g) for g in self._groups[:5]]
            raise PartitionNotFoundError(
                f"run {self.run_id!r} has no group {partition_id!r} (folder {path!r}); "
                f"groups include {sample!r}"
            )
        return self._groups[self._path_index[path]]

    def _stored_path(self, key: tuple) -> str:
        """The folder of ``key`` as the run stored it: the same instant given
        in another time zone is found in the zone the run stored it in, as
        pandas finds it in any zone (:func:`paths_in_zones`)."""
        path = group_path(self.partition_by, key)
        if path in self._path_index:
            return path
        if self._zones is None:
            self._zones = stored_zones(self._groups, len(self.partition_by))
        for candidate in paths_in_zones(self.partition_by, key, self._zones):
            if candidate in self._path_index:
                return candidate
        return path

    def _check_not_started_again(self) -> None:
        """Raise if the run this handle reads is gone: deleted, or started
        again (an overwrite: another attempt) since the handle was made. A
        handle reads only its own attempt's groups, so all of them read as
        not run then (a handle of last night's run kept while tonight's job
        overwrites it said "it is PENDING")."""
        try:
            stored = self._store.read_manifest()
        except FileNotFoundError:
            raise RunNotFoundError(
                f"run {self.run_id!r} no longer exists at {self._store.url_shown} (deleted since this handle "
                f"was made?)"
            ) from None
        except ManyModelError:  # damaged: what the group's status says
            return
        if stored.get("attempt") != self._manifest.get("attempt"):
            raise RunNotFoundError(
                f"run {self.run_id!r} at {self._store.url_shown} was started again (on_existing_artifacts="
                f"'overwrite') since this handle was made, and its models are the new start's; "
                f"ManyModelRun.restore_from({self.run_id!r}, url) reads the run as it is now"
            )

    def get_model(self, partition_id: Any) -> Any:
        """Load the model of one group through the run's serde.

        Parameters
        ----------
        partition_id : object
            The group's value (a tuple when the run has several ``by``
            columns; None for the group of missing keys).

        Returns
        -------
        object
            The model, as the serde reads it.

        Raises
        ------
        InvalidArgumentError
            The run is not a train run (predict and DPF runs have no models).
        PartitionNotFoundError
            The run has no such group.
        ModelNotAvailableError
            The group did not finish DONE (the message says how it ended).
        RunNotFoundError
            The run was deleted, or started again (overwritten), since the
            handle was made.
        """
        if self.kind != "train":
            raise InvalidArgumentError(f"run {self.run_id!r} is a {self.kind} run; it has no models")
        group = self._group_for(partition_id)
        record = self._read_statuses([group["path"]]).get(group["path"])
        if record is None:
            self._check_not_started_again()
        if record is None or record.get("status") != "DONE":
            status = record.get("status") if record else "PENDING"
            error = f": {record.get('error')}" if record and record.get("error") else ""
            if status in ("FAILED", "INTERNAL_ERROR"):
                error += f" (its traceback and logs: run.partition_details[{partition_id!r}])"
            raise ModelNotAvailableError(
                f"group {partition_id!r} of run {self.run_id!r} has no model: it is {status}{error}"
            )
        serde = self._model_serde()
        with contextlib.ExitStack() as stack:
            try:
                # on local disk read in place: no copy in the temp folder
                local = stack.enter_context(
                    self._store.local_file(self._store.path(group["path"], serde.filename), serde.filename)
                )
            except FileNotFoundError:
                raise ModelNotAvailableError(
                    f"group {partition_id!r} of run {self.run_id!r} is DONE, but its model file "
                    f"{self._store.display(group['path'], serde.filename)} is missing (deleted since?)"
                ) from None
            # not in the try: a FileNotFoundError of the model's own loading
            # (a file it opens as it is unpickled) names that file, not this one
            return serde.read(local)

    # ------------------------------------------------------------------
    # inference output

    def to_dask_dataframe(self) -> dd.DataFrame:
        """The frames an inference run's groups returned, as a lazy Dask DataFrame.

        The schema (``meta``) is the ``meta=`` given to ``predict``, or else
        the frame of the first DONE group (in the run's group order) that
        returned rows (its named index kept as columns); the user function is
        never called on fake data. Every computed partition has exactly meta's
        columns in meta's order: a column only some groups returned is
        dropped, and one a group did not return is nulls of meta's dtype (as
        pandas' reindex where the dtype has no null: NaN as float64 for int64;
        for bool, pandas' nullable ``boolean`` with ``<NA>``).

        The ``by`` columns come first, with each group's value and the dtype
        of the input's column (a null group holds that dtype's NaN, NaT or
        NA; a restored handle infers the dtype from all the group values;
        Python dates, times and decimals are pandas' ``ArrowDtype``),
        unless ``meta=`` names them: then they keep meta's dtype and place.
        The rows come group by group in the run's group order (that of
        :meth:`summary`), each group's as its function returned them, the
        same from a live handle and a restored one. Column names are text, as
        parquet stores them (a ``by`` column ``0`` is ``"0"``); columns of
        dates, times, decimals, bytes, lists and structs are pandas'
        ``ArrowDtype`` of their stored type. Besides the groups' statuses
        and, without ``meta=``, the footer of the first group's file (for the
        schema), nothing is read until the frame is computed. The same rows are a
        hive-partitioned parquet dataset at ``url/run_id`` for any parquet
        reader.

        Raises
        ------
        InvalidArgumentError
            The run is not an inference run, or is still in progress, or no
            group returned rows and ``predict`` was given no ``meta=``.
        """
        import dask.dataframe as dd

        from .engine import OUTPUT_FILE

        if self.kind != "predict":
            raise InvalidArgumentError(f"run {self.run_id!r} is a {self.kind} run; only predict runs have output")
        if self.status == RunStatus.IN_PROGRESS:
            raise InvalidArgumentError(f"run {self.run_id!r} is in progress; call wait() first")
        details = [d for d in self._details().values() if d.status == PartitionStatus.DONE and d.output_rows]
        by = self.partition_by
        items = [
            (self._store.path(d.path, OUTPUT_FILE), normalize_key(d.partition_id, len(by)))
            for d in details
        ]
        if self._meta is not None:
            base = self._meta.iloc[:0]
        elif items:
            base = _columns_of_file(self._store.fs, items[0][0])
        else:
            raise InvalidArgumentError(
                f"run {self.run_id!r} stored no output (no group returned rows); pass meta= "
                f"to predict to get an empty frame"
            )
        meta = _with_group_columns(base, by, self._by_dtypes())
        if any(isinstance(meta[col].dtype, pd.CategoricalDtype) for col in by):
            keys = [normalize_key(self._partition_id(g), len(by)) for g in self._groups]
            meta = _with_all_categories(meta, by, keys)
        if not items:
            return dd.from_pandas(meta, npartitions=1)
        _check_the_workers_can_read()
        n_chunks = max(1, min(len(items), len(self._futures or []) or 8))
        # consecutive groups per partition, so that the rows come in the run's
        # group order whatever the number of partitions: dealt round robin,
        # a live handle (one partition per task) and a restored one (8) of
        # the same run computed the same rows in different orders
        chunks = [items[len(items) * i // n_chunks : len(items) * (i + 1) // n_chunks] for i in range(n_chunks)]
        return dd.from_map(
            _read_output, chunks, fs=self._store.fs, by=by, layout=meta, meta=meta,
            enforce_metadata=False, label="manymodel-read-output",
        )

    def _by_dtypes(self) -> list:
        """The dtype of each ``by`` column in the output: the input's, so that a
        null group (NaN, NaT, NA) keeps the column's type. A restored handle has
        no input: there, what pandas infers from all the run's group values."""
        if self._source is not None:
            columns = self._source["dataframe"]._meta
            dtypes = [columns[col].dtype for col in self._spec.by]
            if object not in dtypes:  # (the group values are not needed: one pass over 200,000 groups spared)
                return dtypes
        keys = [normalize_key(self._partition_id(g), len(self.partition_by)) for g in self._groups]
        if self._source is None:
            dtypes = [_inferred_dtype([key[i] for key in keys]) for i in range(len(self.partition_by))]
        return [_kept_group_dtype(dtype, [key[i] for key in keys]) for i, dtype in enumerate(dtypes)]

    # ------------------------------------------------------------------
    # restore

    @classmethod
    def restore_from(
        cls,
        run_id: str,
        url: str | None = None,
        storage_options: dict | None = None,
        *,
        serde: ModelSerde | None = None,
        stage_name: str | None = None,
    ) -> "ManyModelRun":
        """Rebuild a read-only handle of run ``run_id`` stored under ``url``.

        ``stage_name=`` is another name for ``url``, as the class API and
        Snowflake ML's ``restore_from(run_id=, stage_name=)`` call it.

        Works from any process, after the client that started the run is gone.
        ``wait()``, ``cancel()``, ``progress()``, ``futures`` and
        ``retry_failed()`` raise :class:`ReadOnlyRunError`. The handle
        can be pickled, so it may go to the workers (``client.map(lambda key:
        restored.get_model(key), keys)``); a live handle cannot. A missing
        run raises :class:`RunNotFoundError`; a run whose ``_run.json`` or
        ``_groups.json`` is damaged raises :class:`StorageError` naming the file.

        Parameters
        ----------
        run_id : str
            The run's folder under ``url``.
        url : str
            Where runs live, as given to ``train``/``predict``.
        storage_options : dict, optional
            Passed to fsspec; never written anywhere.
        serde : ModelSerde, optional
            How :meth:`get_model` reads models; default the serde recorded in
            the run's ``_run.json`` (give one that cannot be rebuilt from it,
            or ``TorchSerde(weights_only=True, model_factory=...)``).
        stage_name : str, optional
            Another name for ``url``; give one of the two.

        Returns
        -------
        ManyModelRun

        Examples
        --------
        >>> run = ManyModelRun.restore_from("r1", "s3://bucket/models")  # doctest: +SKIP
        >>> run.status  # doctest: +SKIP
        <RunStatus.SUCCESS: 'SUCCESS'>
        """
        from .engine import check_run_id, check_serde

        if stage_name is not None:
            if url is not None:
                raise InvalidArgumentError(
                    f"restore_from() got url={url!r} and stage_name={stage_name!r}: they are one argument "
                    f"(stage_name is its name in the class API); give one"
                )
            url = stage_name
        if url is None:
            raise InvalidArgumentError(
                f"restore_from({run_id!r}) needs the URL the run is stored under: "
                f"ManyModelRun.restore_from(run_id, url) (or stage_name=url)"
            )
        check_run_id(run_id)
        if serde is not None:
            check_serde(serde)
        store = RunStore(url, run_id, storage_options)
        try:
            manifest = store.read_manifest()
        except FileNotFoundError:
            raise RunNotFoundError(_no_run_message(store)) from None
        except ManyModelError:
            raise
        except Exception as exc:  # the backend's own: credentials, an endpoint that refuses, DNS
            raise InvalidURLError(
                f"cannot read run {run_id!r} at {store.url_shown!r}: {type(exc).__name__}: {exc}; check the URL "
                f"and storage_options"
            ) from exc
        stored = manifest.get("serde") or {}
        if serde is not None and stored.get("filename") and serde.filename != stored["filename"]:
            raise InvalidArgumentError(
                f"serde {serde!r} reads {serde.filename!r}, but run {run_id!r} stored its models as "
                f"{stored['filename']!r} with {stored.get('class')}; pass a serde that reads those "
                f"files, or leave serde out"
            )
        try:
            groups = store.read_run_file(GROUPS_FILE, list)
        except FileNotFoundError:
            # a run in progress is being set up right now, one whose start
            # failed may have none, and a run of no group is SUCCESS before
            # it is written; a run whose tasks ran had one
            if manifest["status"] in (RunStatus.SUCCESS, RunStatus.PARTIAL_FAILURE) and manifest.get("n_groups"):
                raise store.damaged(GROUPS_FILE, "it is missing") from None
            groups = []
        return cls(store=store, manifest=manifest, groups=groups, serde=serde)

    # ------------------------------------------------------------------
    # pickling: a restored handle reads storage only, so it may travel to the
    # workers (``client.map(lambda key: restored.get_model(key), keys)``)

    def __getstate__(self) -> dict:
        if not self.read_only:
            raise TypeError(
                f"the live handle of run {self.run_id!r} cannot be pickled or copied: it follows the run's "
                f"tasks on this client. Send the run_id and url instead, and use "
                f"ManyModelRun.restore_from({self.run_id!r}, url) where the run is needed"
            )
        state = dict(self.__dict__)
        del state["_lock"], state["_finished"], state["_manifest_lock"]  # remade by __setstate__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._manifest_lock = threading.Lock()
        self._finished = threading.Event()
        self._finished.set()

    # ------------------------------------------------------------------
    # display

    def _statuses(self, shown: bool = False) -> dict[str, PartitionStatus | str]:
        """Each group's status, by path (no :class:`PartitionDetails` made).
        ``shown``: for a display, which must not fail: in the client's event
        loop, where the running tasks cannot be asked for, a group with no
        outcome yet is ``"RUNNING or PENDING"``."""
        records = self._current_records()
        try:
            running = self._running_tasks()
        except InvalidArgumentError:
            if not shown:
                raise
            running = None
        return {
            group["path"]: PartitionStatus(records[group["path"]]["status"]) if group["path"] in records
            else _RUNNING_OR_PENDING if running is None else _not_finished(group, running)
            for group in self._groups
        }

    def _counts(self, statuses: dict[str, PartitionStatus | str] | None = None) -> dict[str, int]:
        """Groups per status, in the order of :class:`PartitionStatus`; only those that occur."""
        found = collections.Counter((self._statuses() if statuses is None else statuses).values())
        counts = {s.value: found[s] for s in PartitionStatus if found[s]}
        if found[_RUNNING_OR_PENDING]:
            counts[_RUNNING_OR_PENDING] = found[_RUNNING_OR_PENDING]
        return counts

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self._counts(self._statuses(shown=True)).items())
        mode = "restored" if self.read_only else "live"
        return (
            f"<ManyModelRun {self.kind} {self.run_id!r} {self.status.value} ({mode}) "
            f"groups={len(self._groups)} [{counts}] at {self._store.display()}>"
        )

    #: how many failed groups the notebook display lists
    _HTML_FAILED_SHOWN = 5

    def _repr_html_(self) -> str:
        """Jupyter display: status, groups per status, where the run lives, the
        dashboard link, and the first failed groups with their errors."""
        statuses = self._statuses(shown=True)
        counts = self._counts(statuses)
        status = self.status.value
        esc = html.escape
        rows = "".join(
            f"<tr><td>{esc(name)}</td><td style='text-align:right'>{n:,}</td></tr>"
            for name, n in counts.items()
        )
        failed = [p for p, s in statuses.items() if s in (PartitionStatus.FAILED, PartitionStatus.INTERNAL_ERROR)]
        shown = self._details(failed[: self._HTML_FAILED_SHOWN]).values()
        items = "".join(
            f"<li><code>{esc(repr(d.partition_id))}</code> {esc(d.status.value)}: "
            f"{esc(d.error.splitlines()[0] if d.error else '(no error message)')}</li>"
            for d in shown
        )
        if len(failed) > len(shown):
            items += f"<li>… and {len(failed) - len(shown):,} more (see <code>.summary()</code>)</li>"
        link = self.dashboard_link
        if link:
            dashboard = f'<a href="{esc(link)}" target="_blank">Dask dashboard</a>'
        else:
            dashboard = "restored from storage (no dashboard)" if self.read_only else "no dashboard"
        return (
            f"<div class='manymodel-run'>"
            f"<p><strong>ManyModelRun</strong> {esc(self.kind)} <code>{esc(self.run_id)}</code>: "
            f"<strong>{esc(status)}</strong>, {len(self._groups):,} groups</p>"
            f"<p>at <code>{esc(self._store.display())}</code> · {dashboard}</p>"
            f"<table><tr><th>status</th><th>groups</th></tr>{rows}</table>"
            + (f"<p>Failed groups ({len(failed):,}):</p><ul>{items}</ul>" if failed else "")
            + "</div>"
        )


def _with_cause(exc: BaseException) -> str:
    """``Type: message`` of a task's error, and of what caused it: Dask's
    "P2P ... failed during transfer phase" says nothing without its cause."""
    from .engine import error_line

    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return error_line(exc) + (f" (caused by {error_line(cause)})" if cause is not None else "")


# A display's status of a group with no outcome yet, where the scheduler
# cannot be asked whether its task runs (see ManyModelRun._statuses)
_RUNNING_OR_PENDING = "RUNNING or PENDING"


def _not_finished(group: dict, running: set[int]) -> PartitionStatus:
    """The status of a group with no outcome yet: RUNNING while a worker
    executes its task, else PENDING."""
    return PartitionStatus.RUNNING if group.get("task") in running else PartitionStatus.PENDING


def _of_paths(records: dict[str, Any], paths: list[str] | None) -> dict[str, Any]:
    """``records`` of these groups that have one (a copy of all without ``paths``)."""
    return dict(records) if paths is None else {path: records[path] for path in paths if path in records}


class PartitionDetailsMapping(collections.abc.Mapping):
    """``run.partition_details``: ``{partition_id: PartitionDetails}``, read
    from the run when used. Looking one group up reads that group's status
    alone (with 200,000 groups, reading them all took ~10 s, and minutes of
    requests on an object store); ``values()`` and ``items()`` read every
    group's in one batched read, and so does the first lookup after each
    pass over the keys (``dict(d)``, ``{k: d[k] for k in d}``), whose
    lookups then share that read for the groups it found final (a group
    still going is read again when looked up). Keys are found as
    :meth:`ManyModelRun.get_model` finds them (``7`` and ``np.int64(7)``
    alike, a tuple for several ``by`` columns, None for the null group).
    Pickled or copied, it is a plain dict of the details as they are then."""

    def __init__(self, run: ManyModelRun):
        self._run = run
        self._iterated = False
        self._read_together: dict[str, PartitionDetails] | None = None

    def __getitem__(self, partition_id: Any) -> PartitionDetails:
        path = self._run._group_for(partition_id)["path"]  # PartitionNotFoundError is a KeyError
        if self._read_together is None and self._iterated:
            # keys, then a lookup per key: one read for all, not one per key
            self._read_together = self._run._details()
        together = (self._read_together or {}).get(path)
        if together is not None and together.status in FINAL_STATUSES:
            return together  # a final outcome does not change
        return self._run._details([path])[path]  # one still going: as it is now

    def __iter__(self):
        # each pass over the keys reads again (once), on its first lookup
        self._iterated, self._read_together = True, None
        return (self._run._partition_id(group) for group in self._run._groups)

    def __len__(self) -> int:
        return len(self._run._groups)

    def values(self) -> list[PartitionDetails]:  # type: ignore[override]
        return list(self._run._details().values())

    def items(self) -> list[tuple[Any, PartitionDetails]]:  # type: ignore[override]
        return [(details.partition_id, details) for details in self._run._details().values()]

    def __reduce__(self):
        return dict, (dict(self.items()),)

    def __repr__(self) -> str:
        # the first groups only: a notebook displaying it showed (and saved)
        # every group's details, 16 MB at 100,000 groups, after reading them all
        groups = self._run._groups
        shown = self._run._details([group["path"] for group in groups[:_REPR_GROUPS]])
        text = ", ".join(f"{details.partition_id!r}: {details!r}" for details in shown.values())
        if len(groups) > _REPR_GROUPS:
            text += (
                f", ... ({len(groups) - _REPR_GROUPS:,} more groups: look one up with [partition_id], "
                f"or see run.summary())"
            )
        return "{" + text + "}"


#: How many groups ``repr(run.partition_details)`` shows.
_REPR_GROUPS = 10


def _constant_column(value: Any, dtype: Any, index: pd.Index) -> pd.Series:
    """``value`` on every row of ``index``, as a column of ``dtype``; a null
    becomes that dtype's own null (NaN, NaT, pd.NA). A dtype without one:
    NaN as float64 for ints, as pandas' reindex gives, and pd.NA as pandas'
    nullable ``boolean`` for bools (``pd.array([None], dtype=bool)`` would
    say False). Not reindex's NaN as object for bools: Dask's
    ``dataframe.convert-string`` turned that partition's column into text,
    the group's nulls into ``<NA>`` strings and, concatenated with a group
    that returned the column, its True into ``"True"``."""
    if isinstance(dtype, np.dtype) and dtype.kind == "b" and is_null(value):
        one = pd.array([None], dtype="boolean")
    elif isinstance(dtype, np.dtype) and dtype.kind in "iu" and is_null(value):
        one = np.array([np.nan], dtype=np.float64)
    else:
        try:
            one = pd.array([value], dtype=dtype)
        except (TypeError, ValueError):  # a value the dtype cannot hold: as it is
            one = pd.array([value], dtype=object)
    return pd.Series(one.take(np.zeros(len(index), dtype=np.intp)), index=index)


def _inferred_dtype(values: list) -> Any:
    """What pandas infers for a restored run's group values, except that
    bools with a null are pandas' nullable boolean (pandas says object,
    which Dask would turn into the strings "True" and "False")."""
    if not values:
        return np.dtype(object)
    dtype = pd.Series(values).dtype
    bools = [isinstance(v, (bool, np.bool_)) for v in values]
    if dtype == object and any(bools) and all(b or is_null(v) for b, v in zip(bools, values)):
        return pd.BooleanDtype()
    return dtype


def _kept_group_dtype(dtype: Any, values: list) -> Any:
    """``dtype``, except that a column of Python objects whose group values
    are dates, times or decimals (``ddf["day"].dt.date``) is pandas'
    ArrowDtype of their type, as the output's other such columns are
    (:func:`_kept_as_arrow`): as ``object``, Dask's
    ``dataframe.convert-string`` turned them into their text ("2020-01-01")."""
    if dtype != object:
        return dtype
    present = [value for value in values if not is_null(value)]
    try:
        arrow_type = pa.array(present).type
    except (pa.ArrowException, TypeError, ValueError):  # mixed types: left as they are
        return dtype
    if present and _kept_as_arrow(arrow_type) and not pa.types.is_nested(arrow_type):
        return pd.ArrowDtype(arrow_type)
    return dtype


def _with_all_categories(meta: pd.DataFrame, by: list[str], keys: list[tuple]) -> pd.DataFrame:
    """A categorical ``by`` column whose categories lack some group values
    (Dask's unknown categories after ``astype("category")``, or meta's empty
    ones) gets them added, sorted after its own: pandas would make each such
    value NaN."""
    for i, col in enumerate(by):
        dtype = meta[col].dtype
        if not isinstance(dtype, pd.CategoricalDtype):
            continue
        own = [] if _unknown_categories(dtype) else list(dtype.categories)
        values = {key[i] for key in keys if not is_null(key[i])}
        if _unknown_categories(dtype) or not values <= set(own):
            extra = sorted(values - set(own), key=lambda value: (str(type(value)), value))
            meta[col] = meta[col].astype(pd.CategoricalDtype(own + extra, ordered=dtype.ordered))
    return meta


def _unknown_categories(dtype: pd.CategoricalDtype) -> bool:
    """Whether Dask's meta holds a placeholder for categories not known yet."""
    from dask.dataframe.utils import UNKNOWN_CATEGORIES

    return dtype.categories is not None and UNKNOWN_CATEGORIES in dtype.categories


def _with_group_columns(meta: pd.DataFrame, by: list[str], dtypes: list) -> pd.DataFrame:
    """``meta`` (no rows) with the ``by`` columns it lacks put in front, with
    ``dtypes``; a ``by`` column it has already stays as given, dtype and place."""
    meta = meta.copy()
    missing = [(col, dtype) for col, dtype in zip(by, dtypes) if col not in meta.columns]
    for place, (col, dtype) in enumerate(missing):
        meta.insert(place, col, pd.Series([], dtype=dtype, index=meta.index))
    return meta


def _columns_of_file(fs, path: str) -> pd.DataFrame:
    """One output file's columns and index as an empty frame, converted as
    the partitions are, from the file's footer alone: a group's output may
    be millions of rows, which the client read whole for their dtypes.
    (A categorical column has no categories here: each group has its own.)"""
    with fs.open(path, "rb") as f:
        return _arrow_to_pandas(pq.read_schema(f).empty_table())


def _as_layout(frame: pd.DataFrame, by: list[str], key: tuple, layout: pd.DataFrame) -> pd.DataFrame:
    """One group's stored frame laid out as ``layout`` (the run's meta):
    exactly its columns, in its order, so that every partition agrees with
    meta. The ``by`` columns hold the group's values with the layout's dtype,
    as hive readers put them from the path; a column the group did not
    return is nulls of the layout's dtype; one beyond the layout is dropped."""
    values = dict(zip(by, key))
    columns = {}
    for col in layout.columns:
        if col in values:
            columns[col] = _constant_column(values[col], layout[col].dtype, frame.index)
        elif col in frame.columns:
            columns[col] = _as_arrow_dtype_of(frame[col], layout[col].dtype)
        else:
            columns[col] = _constant_column(None, layout[col].dtype, frame.index)
    return pd.DataFrame(columns, index=frame.index)


def _as_arrow_dtype_of(column: pd.Series, dtype: Any) -> pd.Series:
    """A group's column in the layout's ArrowDtype (:func:`_kept_as_arrow`)
    where it has another type: a group whose dates or lists were all None
    stored arrow's null type, which pandas reads as objects, and the
    partition's column was objects where meta said dates. A column that
    does not convert stays as it is (pandas' concat reconciles it)."""
    if not isinstance(dtype, pd.ArrowDtype) or column.dtype == dtype:
        return column
    try:
        return column.astype(dtype)
    except (TypeError, ValueError, pa.ArrowException):
        return column


# A partition's output files are read a batch at a time: up to this many
# files, sized from the files seen so far to about this many bytes (a batch's
# bytes and tables are held at once, beside the frames made so far).
_BATCH_FILES = 256
_BATCH_BYTES = 32 * 2**20


def _check_the_workers_can_read() -> None:
    """The output is read by dask_manymodel's own function on the workers
    of the active client: on workers without it (another team's cluster,
    reading the run's results) Dask closed them and the compute waited for
    ever. Checked when the frame is made, the read itself stays lazy."""
    from .engine import check_workers_environment

    try:
        client = distributed.get_client()
    except ValueError:  # Dask's local schedulers: this process has dask_manymodel
        return
    if getattr(dask.base.get_scheduler(), "__self__", None) is not client:
        # computed here, not on the client's workers (dask.config.set(
        # scheduler="synchronous")): as in a process forked from the client's
        # (a DataLoader worker), where the client's event loop stayed in the
        # parent and the check waited for ever
        return
    from ._client import _inherited, _synchronous

    if client in _inherited:
        # the parent's client, in a forked process: the frame's compute (and
        # the check) would wait on it for ever; say what to do instead
        _synchronous(client)
    if not client.asynchronous:
        check_workers_environment(client)


def _read_output(items: list[tuple[str, tuple]], fs, by: list[str], layout: pd.DataFrame) -> pd.DataFrame:
    """Read the output files of some groups into one frame laid out as
    ``layout`` (runs on a worker).

    The files are fetched a batch at a time, each batch in one read (s3fs
    and gcsfs fetch its files concurrently). A batch whose files share one
    schema (always with ``meta=``, and whenever the groups returned the same
    dtypes) is concatenated as Arrow tables and converted to pandas at once:
    a group's own read and conversion cost ~1.5 ms, most of the read before.
    Otherwise each group's frame is laid out alone. pandas' concat of the
    frames then reconciles their dtypes, as it did group by group.
    """
    keep_few_file_systems(fs)  # unpickled here: made or found in fsspec's cache
    frames = []
    start, batch_files = 0, min(16, _BATCH_FILES)
    while start < len(items):
        batch = items[start:start + batch_files]
        blobs = _read_files(fs, [path for path, _ in batch])
        size = sum(len(blob) for blob in blobs)
        tables = []
        for i, blob in enumerate(blobs):  # read with the pandas metadata, as pd.read_parquet reads
            tables.append(pq.ParquetFile(pa.BufferReader(blob)).read(use_pandas_metadata=True))
            blobs[i] = None  # let each file's bytes go once decoded
        frames.extend(_batch_as_layout(tables, [key for _, key in batch], by, layout))
        start += len(batch)
        batch_files = max(1, min(_BATCH_FILES, _BATCH_BYTES * len(batch) // max(size, 1)))
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _batch_as_layout(tables: list, keys: list[tuple], by: list[str], layout: pd.DataFrame) -> list[pd.DataFrame]:
    """Some groups' stored tables as frames laid out as ``layout``: one
    frame when they share a plain schema, else one per group."""
    if not _one_plain_schema([table.schema for table in tables]):
        return [_as_layout(_arrow_to_pandas(table), by, key, layout) for table, key in zip(tables, keys)]
    rows = [table.num_rows for table in tables]
    frame = _arrow_to_pandas(pa.concat_tables(tables))
    tables.clear()
    return [_as_layout_of_groups(frame, by, keys, rows, layout)]


def _read_files(fs, paths: list[str]) -> list[bytes]:
    """The contents of these files, in their order, in one batched read
    (:func:`~dask_manymodel.store.cat_files`). A missing file says so; any
    other error (access denied, a dropped connection) is raised as it is."""
    found = {fs._strip_protocol(path): data for path, data in cat_files(fs, paths).items()}
    blobs = []
    for path in paths:
        data = found.get(fs._strip_protocol(path))
        if data is None:
            raise FileNotFoundError(f"the output file {path} is missing: it was deleted since the run ended")
        if isinstance(data, BaseException):
            raise data
        blobs.append(data)
    return blobs


def _one_plain_schema(schemas: list) -> bool:
    """Whether these files' frames concatenate as one Arrow table to what
    pandas' concat of them would give: the same schema and pandas metadata,
    and no categorical (each group's own categories: pandas' concat makes
    differing ones object, Arrow would merge them)."""
    first = schemas[0]
    return not any(pa.types.is_dictionary(field.type) for field in first) and all(
        schema.equals(first, check_metadata=True) for schema in schemas[1:]
    )


def _kept_as_arrow(arrow_type: pa.DataType) -> bool:
    """Types pandas converts to columns of Python objects other than text
    (dates, times, decimals, bytes, lists, structs, maps), which Dask's
    ``dataframe.convert-string`` then turned into their text in
    ``to_dask_dataframe`` ("2020-01-01", "[1 2]", "{'u': 1}"). A pyarrow
    list's own pandas metadata ("list<item: int64>[pyarrow]") pandas cannot
    even read back. Such columns are pandas' ArrowDtype of their type, as
    ``dd.read_parquet`` makes dates and decimals."""
    t = pa.types
    return (
        t.is_date(arrow_type) or t.is_time(arrow_type) or t.is_decimal(arrow_type)
        or t.is_binary(arrow_type) or t.is_large_binary(arrow_type) or t.is_fixed_size_binary(arrow_type)
        or (t.is_nested(arrow_type) and not t.is_dictionary(arrow_type))
    )


def _arrow_to_pandas(table) -> pd.DataFrame:
    """``table`` as pandas converts what it reads (string dtypes, time
    zones: the conversion ``pd.read_parquet`` does), through its reader of an
    in-memory Arrow file; the columns :func:`_kept_as_arrow` says, as
    pandas' ArrowDtype of their type."""
    kept = [(i, field.name) for i, field in enumerate(table.schema) if _kept_as_arrow(field.type)]
    arrow_columns = [table.column(i) for i, _ in kept]
    if kept:
        names = {name for _, name in kept}
        # (their entries too: pandas would apply them to the columns left)
        table = without_pandas_metadata_of(table.drop_columns(list(names)), names)
    sink = pa.BufferOutputStream()
    feather.write_feather(table, sink, compression="uncompressed")
    frame = pd.read_feather(pa.BufferReader(sink.getvalue()))
    for (position, name), column in zip(kept, arrow_columns):
        frame.insert(position, name, pd.arrays.ArrowExtensionArray(column))
    return frame


def _as_layout_of_groups(
    frame: pd.DataFrame, by: list[str], keys: list[tuple], rows: list[int], layout: pd.DataFrame
) -> pd.DataFrame:
    """The stored frames of several groups, concatenated into ``frame``
    (``rows`` of each in turn), laid out as ``layout``: what
    :func:`_as_layout` of each group, concatenated, gives."""
    columns = {}
    for col in layout.columns:
        if col in by:
            values = [key[by.index(col)] for key in keys]
            columns[col] = _group_values_column(values, rows, layout[col].dtype)
        elif col in frame.columns:
            columns[col] = _as_arrow_dtype_of(frame[col], layout[col].dtype)
        else:
            columns[col] = _constant_column(None, layout[col].dtype, frame.index)
    return pd.DataFrame(columns, index=frame.index)


def _group_values_column(values: list, rows: list[int], dtype: Any) -> pd.Series:
    """Each group's value on each of its rows, as a column of ``dtype``;
    what concatenating :func:`_constant_column` of each group gives."""
    if not any(is_null(value) for value in values):
        try:
            distinct = pd.array(values, dtype=dtype)
        except (TypeError, ValueError):
            pass
        else:
            return pd.Series(distinct.take(np.repeat(np.arange(len(values)), rows)))
    # a null (its dtype's own, or NaN for ints) or a value the dtype cannot
    # hold: group by group, as pandas' concat reconciles them
    parts = [_constant_column(value, dtype, pd.RangeIndex(n)) for value, n in zip(values, rows)]
    return pd.concat(parts, ignore_index=True)
