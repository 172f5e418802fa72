"""Losing the Dask scheduler during a run: the scheduler killed or closed,
the client's connection to it gone. The client then tries to reconnect for
its ``timeout`` before it closes; the handle must neither wait that out nor
fail with Dask's internals, and storage must tell the truth for a resume."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import uuid

import dask
import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, InvalidArgumentError, ManyModelError, ManyModelRun, RunStatus

from .conftest import make_frame, out_of_the_thread_pool, poll

# The client's reconnect timeout in these tests: long, so that a call that
# waits it out is seen by the client's status (still "connecting" after a
# call that did not wait), not by timing it.
RECONNECT_SECONDS = 90


def noted_and_zero_held(folder, data, ctx):
    """A train function: notes each call in ``folder`` (a file per call), and
    group 0 waits out of its worker's thread pool until ``folder/gate``
    exists, so that the run stays in progress while the others finish."""
    open(os.path.join(folder, f"ran-{ctx.partition_id}-{uuid.uuid4().hex}"), "w").close()
    if ctx.partition_id == 0:
        with out_of_the_thread_pool():
            poll(lambda: os.path.exists(os.path.join(folder, "gate")), timeout=120)
    return len(data)


def within(seconds: float, call):
    """``call()`` in a daemon thread (one that hangs does not hold the
    tests): what it returned, or the error it raised; fails if it has not
    ended after ``seconds``, a third of the client's reconnect timeout, which
    a call that waits it out takes."""
    outcome: list = []

    def calling() -> None:
        try:
            outcome.append(call())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=calling, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} waits on the lost scheduler"
    return outcome[0]


def calls_per_group(folder) -> dict[int, int]:
    calls: dict[int, int] = {}
    for name in os.listdir(folder):
        if name.startswith("ran-"):
            group = int(name.split("-")[1])
            calls[group] = calls.get(group, 0) + 1
    return calls


@pytest.fixture
def run_that_lost_its_scheduler(tmp_path):
    """A run whose groups 1-3 are DONE and group 0 runs, when the scheduler
    of its cluster closes under it; yields (run, client, url, folder)."""
    folder = tmp_path / "calls"
    folder.mkdir()
    url = str(tmp_path / "models")
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )
    client = distributed.Client(cluster, timeout=RECONNECT_SECONDS, set_as_default=True)
    try:
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
        run = ddf.manymodel.train(
            functools.partial(noted_and_zero_held, str(folder)), by="store", url=url, run_id="r1",
            execution_options=ExecutionOptions(npartitions=4),
        )
        poll(lambda: len(run.get_progress().get("DONE", [])) == 3, timeout=120)  # poll
        client.sync(cluster.scheduler.close)
        poll(lambda: client.status != "running", timeout=30)  # poll
        yield run, client, url, str(folder)
    finally:
        (folder / "gate").touch()
        client.close()
        # the cluster asks its closed scheduler first: each ask waited out
        # the connect timeout (30 s)
        with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
            cluster.close()


def test_reads_and_cancel_of_a_run_whose_scheduler_is_gone_do_not_wait_out_the_reconnect(run_that_lost_its_scheduler):
    # summary(), get_progress() and a notebook's display asked the scheduler
    # which groups ran, which waited out the client's reconnect timeout (30 s
    # by default); cancel() waited it out too, then raised Dask's
    # "RuntimeError: ConnectionPool is closed"
    run, client, url, _ = run_that_lost_its_scheduler
    shown = within(RECONNECT_SECONDS / 3, lambda: repr(run))  # read at once: the run goes on
    assert "DONE=3" in shown
    summary = within(RECONNECT_SECONDS / 3, run.summary)
    assert list(summary.sort_values("partition_id")["status"])[1:] == ["DONE"] * 3

    status = within(RECONNECT_SECONDS / 3, lambda: run.cancel(timeout=60))
    # the run ends in a second without a cancel (its tasks were lost with the
    # scheduler): on a loaded host that second may pass before the cancel
    expected = {
        RunStatus.CANCELLED: {"DONE": 3, "CANCELLED": 1},
        RunStatus.PARTIAL_FAILURE: {"DONE": 3, "INTERNAL_ERROR": 1},
    }
    assert status in expected
    assert run.wait(timeout=0, show_progress=False) is status
    stored = ManyModelRun.restore_from("r1", url)
    assert stored.status is status
    assert stored.manifest["counts"] == expected[status]
    assert client.status == "connecting"
    # (it waited 30 s, then raised OSError)
    refused = within(RECONNECT_SECONDS / 3, lambda: run.progress(notebook=False))
    assert isinstance(refused, ManyModelError) and "lost its scheduler" in str(refused)


def test_a_run_started_on_a_client_that_lost_its_scheduler_is_refused_at_once(run_that_lost_its_scheduler):
    # train() and retry_failed() on the default client while it tries to
    # reconnect waited that out (30 s by default), then raised Dask's
    # "CommClosedError: ConnectionPool closing" or "Timed out trying to connect"
    run, client, url, folder = run_that_lost_its_scheduler
    assert client.status == "connecting"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
    started = within(
        RECONNECT_SECONDS / 3,
        lambda: ddf.manymodel.train(functools.partial(noted_and_zero_held, folder), by="store", url=url, run_id="r2"),
    )
    assert isinstance(started, InvalidArgumentError), started
    assert "lost its scheduler" in str(started) and "nothing was started" in str(started)
    assert not os.path.exists(os.path.join(url, "r2"))  # nothing written
    assert run.wait(timeout=RECONNECT_SECONDS / 3, show_progress=False) is RunStatus.PARTIAL_FAILURE
    retried = within(RECONNECT_SECONDS / 3, run.retry_failed)
    assert isinstance(retried, InvalidArgumentError) and "lost its scheduler" in str(retried), retried
    assert ManyModelRun.restore_from("r1", url).manifest["counts"] == {"DONE": 3, "INTERNAL_ERROR": 1}


def test_a_run_whose_scheduler_is_gone_ends_in_storage_and_resumes_on_another_cluster(
    run_that_lost_its_scheduler, client
):
    # ``client`` is the session cluster's: another cluster than the lost one
    run, lost_client, url, folder = run_that_lost_its_scheduler
    # the run's end did not wait for the reconnect to give up
    assert run.wait(timeout=RECONNECT_SECONDS / 3, show_progress=False) is RunStatus.PARTIAL_FAILURE
    stored = ManyModelRun.restore_from("r1", url)
    assert stored.status is RunStatus.PARTIAL_FAILURE
    assert stored.manifest["counts"] == {"DONE": 3, "INTERNAL_ERROR": 1}
    error = stored.partition_details[0].error
    assert "lost with the task running it" in error and "scheduler" in error

    with client.as_current():
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
        open(os.path.join(folder, "gate"), "w").close()
        resumed = ddf.manymodel.train(
            functools.partial(noted_and_zero_held, folder), by="store", url=url, run_id="r1",
            on_existing_artifacts="resume",
        )
        assert resumed.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    calls = calls_per_group(folder)
    assert {group: calls[group] for group in (1, 2, 3)} == {1: 1, 2: 1, 3: 1}  # DONE groups not run again
    assert calls[0] >= 2
    assert ManyModelRun.restore_from("r1", url).manifest["counts"] == {"DONE": 4}


def last_group_held(gate, data, ctx):
    """A train function: group 5 waits until the file ``gate`` exists."""
    if ctx.partition_id == 5:
        poll(lambda: os.path.exists(gate), timeout=120)
    return len(data)


def one_worker_cluster_at(port: int) -> distributed.LocalCluster:
    return distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, scheduler_port=port, dashboard_address=":0",
        silence_logs=logging.ERROR,
    )


def test_the_progress_of_a_run_started_after_the_client_reconnected_to_a_new_scheduler(tmp_path):
    # the client subscribed the progress topic once for its life; a scheduler
    # started again at the same address knows none of its topics (Dask does
    # not subscribe them again as it reconnects), so the progress bar of every
    # later run stayed at 0 until a task ended
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=1)
    first = one_worker_cluster_at(port)
    with distributed.Client(first.scheduler_address, timeout=RECONNECT_SECONDS, set_as_default=True) as client:
        with first:
            open(tmp_path / "open", "w").close()
            run = ddf.manymodel.train(
                functools.partial(last_group_held, str(tmp_path / "open")), by="store", url=url, run_id="r1"
            )
            assert run.wait(timeout=60, show_progress=False) is RunStatus.SUCCESS
        poll(lambda: client.status != "running", timeout=30)  # poll
        with one_worker_cluster_at(port):
            poll(lambda: client.status == "running", timeout=60)  # poll
            gate = str(tmp_path / "gate")
            run = ddf.manymodel.train(
                functools.partial(last_group_held, gate), by="store", url=url, run_id="r2",
                execution_options=ExecutionOptions(npartitions=1),
            )
            try:
                poll(lambda: run._finished_count() == 5, timeout=60)  # poll: the bar's count, from the events
            finally:
                open(gate, "w").close()
            assert run.wait(timeout=60, show_progress=False) is RunStatus.SUCCESS


def test_dask_progress_bar_of_a_run_whose_tasks_a_restart_cancelled_says_so(tmp_path):
    # client.restart() mid-run: the scheduler forgot the run's tasks, and
    # run.progress() (Dask's bar over them) waited on them for ever
    folder = tmp_path / "calls"
    folder.mkdir()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
        run = ddf.manymodel.train(
            functools.partial(noted_and_zero_held, str(folder)), by="store", url=str(tmp_path / "models"),
            run_id="r1", execution_options=ExecutionOptions(npartitions=4),
        )
        poll(lambda: len(run.get_progress().get("DONE", [])) == 3, timeout=120)  # poll
        client.restart()
        (folder / "gate").touch()
        assert run.wait(timeout=60, show_progress=False) is RunStatus.PARTIAL_FAILURE

        outcome: list = []

        def bar() -> None:
            try:
                outcome.append(run.progress(notebook=False))
            except Exception as exc:
                outcome.append(exc)

        waiting = threading.Thread(target=bar, daemon=True)  # a daemon: the bug's wait must not hold the tests
        waiting.start()
        waiting.join(60)
        assert not waiting.is_alive(), "run.progress() waits for tasks the restart cancelled"
        assert isinstance(outcome[0], ManyModelError)
        assert "cancelled outside the run (client.restart()" in str(outcome[0])
        assert "run.get_progress()" in str(outcome[0])
