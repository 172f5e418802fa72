"""Shared fixtures: one real LocalCluster with worker processes per session."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

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


def _set_env(name: str, value: str) -> None:
    os.environ[name] = value


def set_worker_env(client: distributed.Client, name: str, value: str) -> None:
    """Set an environment variable in every worker process (and this one)."""
    os.environ[name] = value
    client.run(_set_env, name, value)
