"""Runs on clusters whose workers change: a run started while the cluster
scales up (``cluster.scale(n)`` just called, ``cluster.adapt(...)``), on a
cluster of no worker, one that lost every worker, or after ``client.restart()``."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
import warnings

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, InvalidArgumentError, ManyModelRun, PartitionStatus, RunStatus

from .conftest import fit_line, group_zero_held, make_frame, poll


@pytest.fixture
def one_worker_cluster():
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        yield cluster, client


def test_a_run_started_while_the_cluster_scales_up_has_tasks_for_the_workers_to_come(one_worker_cluster, tmp_path):
    # as on a batch system: cluster.scale(3), and the run starts while the
    # workers wait in the queue (here: until the test opens the gate).
    # Sized for the one worker there at the start, the run had 4 tasks, and
    # the workers that came later found little or nothing to do
    cluster, client = one_worker_cluster
    gate = tmp_path / "gate"
    preload = tmp_path / "held_worker.py"
    preload.write_text(
        "import asyncio, os\n"
        "async def dask_setup(worker):\n"
        f"    while not os.path.exists({str(gate)!r}):\n"
        "        await asyncio.sleep(0.05)  # poll\n"
    )
    cluster.new_spec["options"] = dict(cluster.new_spec["options"], preload=[str(preload)])
    cluster.scale(3)
    ddf = dd.from_pandas(make_frame(n_groups=24, rows=10), npartitions=2)
    try:
        run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r1")
        assert len(client.nthreads()) == 1  # the others still held
    finally:
        gate.touch()

    assert len(run.futures) == 12  # 4 per thread of the 3 workers
    assert run.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    assert len(run.get_progress()["DONE"]) == 24


def test_a_run_started_on_an_adaptive_cluster_has_tasks_for_its_maximum(one_worker_cluster, tmp_path):
    # adaptive scaling asks for no more workers than there are tasks: sized
    # for the one worker there at the start (4 tasks), the run never had
    # more than 4 workers, whatever the maximum
    cluster, client = one_worker_cluster
    cluster.adapt(minimum=1, maximum=3)  # no task yet: it asks for no more worker
    ddf = dd.from_pandas(make_frame(n_groups=24, rows=10), npartitions=2)

    run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r1")

    assert len(run.futures) == 12  # 4 per thread of the 3 workers
    assert run.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    assert len(run.get_progress()["DONE"]) == 24


def test_a_run_on_a_cluster_without_a_plan_has_tasks_for_the_workers_there(one_worker_cluster, tmp_path):
    # an adaptive cluster with no maximum says nothing of the workers to come
    cluster, client = one_worker_cluster
    cluster.adapt(minimum=1, interval="1h")  # running, and adding no worker during the test
    ddf = dd.from_pandas(make_frame(n_groups=24, rows=10), npartitions=2)

    run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r1")

    assert len(run.futures) == 4  # the one worker's thread
    assert run.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS


def test_a_run_on_a_cluster_of_no_worker_says_so_and_starts_when_one_joins(tmp_path):
    # train() waits, before it returns a handle, until a worker joins: it
    # did so without a word on a cluster that asked for none
    with distributed.LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
        url = tmp_path / "models"
        started: dict = {}

        def start() -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                started["warnings"] = caught
                with client.as_current():
                    started["run"] = ddf.manymodel.train(fit_line, by="store", url=str(url), run_id="r1")

        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        try:
            poll(lambda: any("has no workers" in str(w.message) for w in started.get("warnings", [])))
            message = next(str(w.message) for w in started["warnings"] if "has no workers" in str(w.message))
            assert "until a worker joins" in message and "cluster.scale(" in message
            assert not (url / "r1").exists()  # nothing written while it waits
        finally:
            cluster.scale(1)  # as the warning says: the run starts
            thread.join(120)
        assert started["run"].wait(timeout=120, show_progress=False) is RunStatus.SUCCESS


def test_a_run_on_a_cluster_whose_workers_are_asked_for_does_not_warn(tmp_path):
    with distributed.LocalCluster(
        n_workers=0, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True):
        cluster.adapt(minimum=0, maximum=1)
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r1")
        assert run.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS


def test_a_run_over_partitions_a_restart_dropped_says_so_and_resumes_once_persisted_again(one_worker_cluster, tmp_path):
    # client.restart() drops every persisted partition: the run's count failed
    # with Dask's "('manymodel-count-...-combine-1', 0) cancelled for reason:
    # lost dependencies", naming neither the input nor what to do
    cluster, client = one_worker_cluster
    url = str(tmp_path / "models")
    def from_source():
        return dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)

    ddf = from_source().persist()
    distributed.wait(ddf)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert run.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    client.restart()

    with pytest.raises(InvalidArgumentError, match="persisted partitions are gone from the cluster") as caught:
        run.retry_failed()
    assert "Build the dataframe again from its source" in str(caught.value)
    assert "on_existing_artifacts='resume'" in str(caught.value)
    with pytest.raises(InvalidArgumentError, match="persisted partitions are gone"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r2")
    assert not (tmp_path / "models" / "r2").exists()

    with pytest.raises(InvalidArgumentError, match="persisted partitions are gone"):
        ddf.persist().manymodel.train(fit_line, by="store", url=url, run_id="r2")  # the same gone partitions
    again = from_source().persist()  # as the error says
    resumed = again.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    assert resumed.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    assert len(resumed.get_progress()["DONE"]) == 4


def _scattered_and_persisted(client):
    """A persisted frame of 4 groups made of scattered pieces: the cluster's
    copy is the only one, so a worker that dies takes its partitions for good."""
    frame = make_frame(n_groups=4, rows=10)
    ddf = dd.from_delayed(client.scatter([frame.iloc[:20], frame.iloc[20:]]), meta=frame.iloc[:0]).persist()
    distributed.wait(ddf)
    return ddf


def _kill_the_one_worker(client):
    """SIGKILL the cluster's one worker: its nanny starts another, without
    the partitions it held."""
    (worker_pid,) = client.run(os.getpid).values()
    os.kill(worker_pid, signal.SIGKILL)


def test_a_run_whose_persisted_input_went_with_its_worker_says_so_and_what_to_do(one_worker_cluster, tmp_path):
    # the worker holding a persisted frame's partitions died while the run
    # went on, and the frame held nothing to compute them again from: its
    # groups said they "were lost with the task running it", as for a task
    # that died, and retry_failed() then refused the gone partitions
    cluster, client = one_worker_cluster
    url = str(tmp_path / "models")
    ddf = _scattered_and_persisted(client)
    gate = tmp_path / "gate"
    run = ddf.manymodel.train(
        functools.partial(group_zero_held, str(gate)), by="store", url=url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=4),
    )
    poll(lambda: os.path.exists(os.path.join(url, "r1", "store=0", "_partition.json")), timeout=60)
    _kill_the_one_worker(client)
    try:
        assert run.wait(timeout=120, show_progress=False) is not RunStatus.SUCCESS
    finally:
        gate.touch()
    lost = [d for d in run.partition_details.values() if d.status is not PartitionStatus.DONE]
    assert lost
    for details in lost:
        assert details.status is PartitionStatus.INTERNAL_ERROR
        assert "persisted partitions are gone from the cluster" in details.error, details.error
        assert "Build the dataframe again from its source" in details.error
        assert "on_existing_artifacts='resume'" in details.error
        assert "lost with the task running it" not in details.error
    with pytest.raises(InvalidArgumentError, match="persisted partitions are gone"):
        run.retry_failed()  # as the groups' errors say


def test_whether_a_runs_persisted_input_is_gone_is_asked_once_for_all_its_lost_tasks(
    one_worker_cluster, tmp_path, monkeypatch
):
    # the answer reads every partition's future: asked for each task that
    # Dask cancelled, a run of 2,000 tasks took 16 s to end (the square of
    # its size: minutes for one of 10,000)
    from dask_manymodel import engine

    from .test_partitioning import every_group_held

    asked = []
    real = engine.persisted_input_gone
    monkeypatch.setattr(engine, "persisted_input_gone", lambda ddf: asked.append(1) or real(ddf))
    cluster, client = one_worker_cluster
    url = str(tmp_path / "models")
    ddf = _scattered_and_persisted(client)
    gate = tmp_path / "gate"
    run = ddf.manymodel.train(
        functools.partial(every_group_held, str(gate)), by="store", url=url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=4),
    )
    # one worker thread: one task runs (held), the others wait behind it
    poll(lambda: any(os.path.exists(os.path.join(url, "r1", f"store={g}", "_partition.json")) for g in range(4)),
         timeout=60)
    _kill_the_one_worker(client)
    try:
        assert run.wait(timeout=120, show_progress=False) is RunStatus.FAILURE
    finally:
        gate.touch()
    assert len({group["task"] for group in run._groups}) > 1
    for details in run.partition_details.values():
        assert "persisted partitions are gone from the cluster" in details.error, details.error
    assert len(asked) == 1


def test_cancel_of_a_run_whose_cluster_has_no_worker_left(tmp_path):
    # the cluster scaled to zero (its jobs hit their walltime, its nodes were
    # reclaimed) while the run waited: its tasks would never start to see the
    # cancel, and cancel() waited for them until its timeout, the run left
    # IN_PROGRESS in storage
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        url = str(tmp_path / "models")
        gate = str(tmp_path / "gate")
        ddf = dd.from_pandas(make_frame(n_groups=8, rows=10), npartitions=2)
        run = ddf.manymodel.train(
            functools.partial(group_zero_held, gate), by="store", url=url, run_id="r1",
            execution_options=ExecutionOptions(npartitions=4),
        )
        poll(lambda: run.partition_details[0].status is PartitionStatus.RUNNING)
        cluster.scale(0)
        poll(lambda: not client.nthreads())
        # and its nanny closed: one still up could start the worker again,
        # which, the gate open, finished every group before the cancel
        poll(lambda: not cluster.workers)
        open(gate, "w").close()  # (a worker that comes back would finish group 0)

        assert run.cancel(timeout=60) is RunStatus.CANCELLED
        statuses = set(run.summary()["status"])
        assert "CANCELLED" in statuses and statuses <= {"CANCELLED", "DONE"}
        stored = ManyModelRun.restore_from("r1", url)
        assert stored.status is RunStatus.CANCELLED and len(stored.summary()) == 8


def stopped_from_outside_twice(folder, data, ctx):
    """Group 0's worker is stopped (SIGTERM, as a preempted node's) while the
    group runs, in the first two tries of its task."""
    if ctx.partition_id == 0:
        tries = len(os.listdir(folder))
        if tries < 2:
            open(os.path.join(folder, str(tries)), "w").close()
            os.kill(os.getpid(), signal.SIGTERM)
            while True:
                time.sleep(0.05)  # poll: until the stop arrives
    return fit_line(data, ctx)


def test_a_group_whose_worker_is_stopped_from_outside_twice_is_not_only_blamed(one_worker_cluster, tmp_path):
    # on a cluster of preemptible nodes, a long group met a stop in two tries
    # in a row: FAILED, its error naming only memory or a crash of its own
    folder = tmp_path / "tries"
    folder.mkdir()
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=1)
    run = ddf.manymodel.train(
        functools.partial(stopped_from_outside_twice, str(folder)), by="store", url=str(tmp_path / "models"),
        run_id="r1", execution_options=ExecutionOptions(npartitions=1),
    )
    assert run.wait(timeout=120, show_progress=False) is RunStatus.PARTIAL_FAILURE
    error = run.partition_details[0].error
    assert "died while the group ran" in error and "needs more memory" in error
    assert "stopped from outside" in error and "retry_failed()" in error
    assert len(run.get_progress()["DONE"]) == 3


class _ClusterWithoutPlan:
    """As dask-kubernetes' KubeCluster: a Cluster with neither plan nor workers."""

    @property
    def plan(self):
        raise AttributeError("'_ClusterWithoutPlan' object has no attribute 'workers'")


def test_no_workers_on_a_cluster_that_cannot_say_what_it_asked_for_is_not_said_to_ask_for_none():
    # after KubeCluster(n_workers=0).scale(10), its pods pending, the warning
    # said "none are asked for": untrue, and the user had just asked for 10
    from types import SimpleNamespace

    from dask_manymodel import engine

    client = SimpleNamespace(
        nthreads=dict, cluster=_ClusterWithoutPlan(), scheduler=SimpleNamespace(address="tcp://10.0.0.1:8786")
    )
    with pytest.warns(UserWarning, match="has no workers") as caught:
        engine.warn_if_no_workers(client)
    message = str(caught[0].message)
    assert "none are asked for" not in message, message
    assert "its _ClusterWithoutPlan does not say whether any are asked for" in message
    assert "until a worker joins" in message


def test_workers_that_left_are_forgotten_by_the_environment_check(one_worker_cluster, tmp_path):
    # each run asks only new workers what they have installed, remembering who
    # was asked: an elastic cluster's workers that left stayed remembered for good
    from dask_manymodel import engine

    cluster, client = one_worker_cluster
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
    first = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r1")
    assert first.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    (gone,) = client.nthreads()
    cluster.scale(2)
    client.wait_for_workers(2, timeout=60)
    client.retire_workers([gone], close_workers=True)
    poll(lambda: gone not in client.nthreads(), timeout=60)

    second = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path / "models"), run_id="r2")
    assert second.wait(timeout=120, show_progress=False) is RunStatus.SUCCESS
    remembered = {address for (address, _), _ in engine._found_on_workers[client]}
    assert remembered == set(client.nthreads())
