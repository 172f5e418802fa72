"""Shared fixtures: one real LocalCluster with worker processes per session."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Callable, Iterator

import distributed
import numpy as np
import pandas as pd
import pytest

import dask.dataframe as dd

# Worker processes unpickle the test modules' functions by reference: let them
# import the ``tests`` package too.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter


@pytest.fixture(scope="session")
def cluster():
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster:
        yield cluster


@pytest.fixture
def client(cluster):
    with distributed.Client(cluster, set_as_default=True) as client:
        yield client


@pytest.fixture
def thread_client():
    """An in-process cluster: memory:// is shared only between threads."""
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        yield client


@pytest.fixture
def children_temp(tmp_path, monkeypatch):
    """The temp folder (TMPDIR) of the processes the test starts, in
    ``tmp_path``: the README's and the docs' examples and the notebooks make
    their runs' folders with ``tempfile.mkdtemp()`` and never delete them,
    and every run of the suite left them in /tmp."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture
def store_url(tmp_path):
    return str(tmp_path / "models")


def make_frame(n_groups: int = 12, rows: int = 40, seed: int = 0) -> pd.DataFrame:
    """y = slope_g * x + g, with slope_g = 1 + g / 10, per group g."""
    rng = np.random.default_rng(seed)
    store = np.repeat(np.arange(n_groups), rows)
    x = rng.normal(size=len(store))
    return pd.DataFrame({"store": store, "x": x, "y": (1 + store / 10) * x + store})


@pytest.fixture
def ddf():
    return dd.from_pandas(make_frame(), npartitions=3)


def fit_line(data, ctx):
    """A train function: least squares slope and intercept of y on x."""
    df = data.to_pandas()
    return np.polyfit(df["x"].to_numpy(), df["y"].to_numpy(), 1)


def module_only_here(tmp_path, monkeypatch, name: str, code: str):
    """A module importable in this process only (the workers started before
    it existed): written to ``tmp_path``, imported, and gone again after the
    test."""
    folder = tmp_path / "modules_only_here"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    module = __import__(name)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def poll(condition: Callable[[], bool], timeout: float = 30, interval: float = 0.05) -> None:
    """Wait until ``condition()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)  # poll


def hold_until_released(gate: str, timeout: float = 120) -> None:
    """Inside a user function: wait until the test creates the file ``gate``
    (every worker process sees the same disk), so that a run stays in
    progress exactly as long as the test needs."""
    poll(lambda: os.path.exists(gate), timeout)


def group_zero_held(gate, data, ctx):
    """A train function (bind ``gate`` with functools.partial): group 0
    waits for the test's gate, so its task stays running while the others
    finish. Each group's model is its row count."""
    if ctx.partition_id == 0:
        hold_until_released(gate)
    return len(data)


@contextlib.contextmanager
def out_of_the_thread_pool() -> Iterator[None]:
    """Inside a user function, around a wait on the test: the group leaves
    its worker's thread pool while it waits (``distributed.secede()``) and
    takes a thread again after (``rejoin()``, once a thread is free), so it
    keeps no other task from starting on that worker.

    Which task a worker runs first is not fixed: a held group in the one
    thread of a worker kept waiting the tasks queued behind it there, and
    the output partitions of a p2p shuffle, which Dask pins to a worker
    before the run's tasks start. A test that held group 0 and waited for
    other groups then timed out now and then (their shuffle output was
    pinned to group 0's worker, while the other worker idled), and one that
    held other groups until group 0's failure deadlocked in CI (group 0's
    task never started). Not for a test that needs the groups behind the
    held ones not to start (a cancel that must find groups still PENDING):
    held aside, each worker may start every task of the run at once."""
    distributed.secede()
    try:
        yield
    finally:
        distributed.rejoin()


def group_zero_held_aside(gate, data, ctx):
    """:func:`group_zero_held`, with group 0 waiting out of its worker's
    thread pool (:func:`out_of_the_thread_pool`): for a test that waits,
    while group 0 is held, for the run's other groups to finish."""
    if ctx.partition_id == 0:
        with out_of_the_thread_pool():
            hold_until_released(gate)
    return len(data)


def held_until_cancelled(folder, data, ctx):
    """A train function (bind ``folder`` with functools.partial): each group
    notes that it runs (a ``running-<id>`` file in ``folder``), then waits
    until the run's cancel event is set; the test writes the event's name to
    ``folder/cancel_event``. So a run is in progress exactly until the test
    cancels it, and a group that was running then still finishes DONE."""
    with open(os.path.join(folder, f"running-{ctx.partition_id}"), "w"):
        pass
    name_file = os.path.join(folder, "cancel_event")
    poll(lambda: os.path.exists(name_file))
    with open(name_file) as f:
        event = distributed.Event(f.read())
    # if the cancel never comes, the first group to give up makes the rest
    # fail at once instead of each waiting out its own deadline
    gave_up = os.path.join(folder, "gave-up")
    try:
        poll(lambda: event.is_set() or os.path.exists(gave_up))
    except AssertionError:
        open(gave_up, "w").close()
        raise
    if not event.is_set():
        raise AssertionError("another group gave up waiting for the cancel")
    return fit_line(data, ctx)


def announce_cancel_event(folder, run) -> None:
    """Tell :func:`held_until_cancelled`'s groups which event is the run's
    cancel (written whole: they may read it at any moment)."""
    staged = os.path.join(folder, "cancel_event.staged")
    with open(staged, "w") as f:
        f.write(run._spec.cancel_event)
    os.replace(staged, os.path.join(folder, "cancel_event"))


def _set_heartbeat(seconds: float) -> None:
    from dask_manymodel import engine

    engine._HEARTBEAT_SECONDS = seconds


@contextlib.contextmanager
def cancel_checked_before_every_group(client: distributed.Client) -> Iterator[None]:
    """Inside the block the workers ask whether the run was cancelled before
    every group, not at most every ``_HEARTBEAT_SECONDS``: a test can then
    tell exactly which groups run after a cancel without slowing the groups
    down to outlast the interval."""
    from dask_manymodel import engine

    client.run(_set_heartbeat, 0.0)
    try:
        yield
    finally:
        client.run(_set_heartbeat, engine._HEARTBEAT_SECONDS)


def _set_env(name: str, value: str) -> None:
    os.environ[name] = value


def set_worker_env(client: distributed.Client, name: str, value: str) -> None:
    """Set an environment variable in every worker process (and this one)."""
    os.environ[name] = value
    client.run(_set_env, name, value)
