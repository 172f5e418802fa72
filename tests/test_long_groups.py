"""Groups that run long, and groups that hold Python's GIL while they do."""

from __future__ import annotations

import ctypes
import logging

import dask
import distributed
import pandas as pd
import pytest

import dask.dataframe as dd
import dask_manymodel  # noqa: F401


def gil_held_in_group_zero(data, ctx):
    """A train function whose group 0 holds the GIL (a call through
    ``ctypes.PyDLL`` keeps it) until its worker is killed."""
    if ctx.partition_id == 0:
        ctypes.PyDLL(None).sleep(60)
    return len(data)


@pytest.mark.parametrize("allowed_failures", [0, 3])
def test_a_group_holding_the_gil_past_the_worker_ttl_says_so(tmp_path, allowed_failures):
    """Its worker sends no heartbeat, and the scheduler restarts it after
    ``worker-ttl`` (5 s at least). The group's error said the function ran
    out of memory or crashed; it now names the worker-ttl and the GIL. With
    no retries Dask gives the task up (the client decides the outcome); with
    Dask's default, a later try of the task fails the group."""
    config = {"distributed.scheduler.worker-ttl": "1s", "distributed.scheduler.allowed-failures": allowed_failures}
    with dask.config.set(config), distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.CRITICAL
    ) as cluster, distributed.Client(cluster, set_as_default=True):
        frame = pd.DataFrame({"g": [0, 1, 2, 3] * 3, "x": range(12)})
        run = dd.from_pandas(frame, npartitions=2).manymodel.train(
            gil_held_in_group_zero, by="g", url=str(tmp_path / "models"), run_id="r"
        )
        run.wait(timeout=120, show_progress=False)
        details = run.partition_details[0]
    assert details.status.value in ("FAILED", "INTERNAL_ERROR")
    assert "distributed.scheduler.worker-ttl" in details.error
    assert "GIL" in details.error
    assert "run out of memory" not in details.error
