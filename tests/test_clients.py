"""Runs on clients other than the one test cluster: asynchronous clients, and
a run whose cluster is not the default client's."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading

import dask
import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, FileSet, InvalidArgumentError, ManyModelRun, RunStatus

from .conftest import fit_line, group_zero_held, make_frame, poll


def test_an_asynchronous_client_is_refused_before_anything_is_written(tmp_path):
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(), npartitions=2)

    async def start_in_the_event_loop():
        async with distributed.LocalCluster(
            n_workers=1, processes=False, asynchronous=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster, distributed.Client(cluster, asynchronous=True):
            with pytest.raises(InvalidArgumentError, match="synchronous Dask client.*asyncio.to_thread"):
                ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
            # a FileSet too (it made one of no rows, the name taken)
            with pytest.raises(InvalidArgumentError, match="synchronous Dask client"):
                FileSet.make(url, "s1", ddf)

    asyncio.run(start_in_the_event_loop())
    assert not os.path.exists(os.path.join(url, "r1"))
    assert not os.path.exists(os.path.join(url, "s1"))


def fails_until_flag(flag, data, ctx):
    if ctx.partition_id % 3 == 0 and not os.path.exists(flag):
        raise ValueError("not yet")
    return fit_line(data, ctx)


def test_progress_and_retry_failed_use_the_runs_own_cluster(client, tmp_path):
    # the session's client is the default; the run goes to a second cluster,
    # where its input is persisted
    flag = str(tmp_path / "flag")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as other_cluster, distributed.Client(other_cluster, set_as_default=False) as other:
        ddf = other.persist(dd.from_pandas(make_frame(), npartitions=2))
        with other.as_current():
            run = ddf.manymodel.train(
                lambda data, ctx: fails_until_flag(flag, data, ctx), by="store", url=str(tmp_path / "m"),
                run_id="r1", execution_options=ExecutionOptions(npartitions=2),
            )
        assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
        # distributed's bar over the run's tasks asked the default client's
        # scheduler, which never heard of them: it waited for ever
        shown = threading.Thread(target=run.progress, kwargs={"notebook": False}, daemon=True)
        shown.start()
        shown.join(60)
        assert not shown.is_alive()
        open(flag, "w").close()
        # started on the default client, the retry lost the persisted input
        again = run.retry_failed()
        assert again.wait(show_progress=False) == RunStatus.SUCCESS
        assert {f.client for f in again.futures} == {other}


def test_a_run_on_a_client_that_is_not_the_default_is_collected(tmp_path):
    """A client made with set_as_default=False and used through
    ``client.as_current()``, with no default client besides: the handle's
    collector thread (which has none of the starting thread's as_current
    context) asked Dask's as_completed for the default client's loop, "No
    clients found", and every group of the run became INTERNAL_ERROR."""
    url = str(tmp_path / "m")
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=False) as own:
        with pytest.raises(ValueError, match="No clients found"):
            distributed.default_client()  # nothing for the collector to fall back on
        with own.as_current():
            run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
            assert run.wait(timeout=120, show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].tolist()
        assert {f.client for f in run.futures} == {own}
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.SUCCESS
    assert restored.summary()["status"].tolist() == ["DONE"] * 4


ENDS_WITHOUT_WAIT = r"""
import functools, os, sys, time
import dask.dataframe as dd, distributed, logging, numpy as np, pandas as pd
import dask_manymodel
import dask_manymodel.run
dask_manymodel.run._FENCE_SECONDS = 3.0  # as a slow store's writes: the collector's end takes a while
dask_manymodel.run._EXIT_CANCEL_SECONDS = 1.0  # the held groups below never finish: cut off soon

def held_mean(gate, data, ctx):
    # held until a file that nobody writes: the run is still going on when the script ends
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll
    return float(data.to_pandas()["x"].mean())

if __name__ == "__main__":
    url, mode = sys.argv[1], sys.argv[2]
    slow_mean = functools.partial(held_mean, url + ".never")
    frame = pd.DataFrame({"store": np.repeat(np.arange(8), 2), "x": np.arange(16.0)})
    ddf = dd.from_pandas(frame, npartitions=2)
    if mode == "with":  # the block closes the client while the run goes on
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0",
                                      silence_logs=logging.ERROR) as cluster, distributed.Client(cluster):
            run = ddf.manymodel.train(slow_mean, by="store", url=url, run_id="r1")
    else:  # the embedded LocalCluster, left to the interpreter's exit
        run = ddf.manymodel.train(slow_mean, by="store", url=url, run_id="r1")
    # ... and the script ends without run.wait()
"""


@pytest.mark.parametrize("mode", ["with", "embedded"])
def test_a_script_that_ends_while_its_run_goes_on_leaves_the_run_ended(tmp_path, mode):
    """The handle's collector thread was killed by the interpreter's exit
    while it recorded the end (after the client closed): ``_run.json`` said
    IN_PROGRESS for good, with groups never given a status."""
    url = str(tmp_path / "models")
    out = subprocess.run(
        [sys.executable, "-c", ENDS_WITHOUT_WAIT, url, mode], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.manifest["status"] != "IN_PROGRESS", (restored.manifest, out.stderr[-3000:])
    assert restored.status in {RunStatus.CANCELLED, RunStatus.FAILURE, RunStatus.PARTIAL_FAILURE, RunStatus.SUCCESS}
    statuses = restored.summary()["status"]
    assert statuses.isin(["DONE", "CANCELLED", "INTERNAL_ERROR"]).all(), statuses.value_counts()
    assert restored.manifest["counts"] == statuses.value_counts().to_dict()
    if mode == "embedded":  # its client still ran: cancelled, as run.cancel() does
        assert restored.status == RunStatus.CANCELLED
        assert "cancelling it (call run.wait() to let it finish)" in out.stderr


ENDS_WHILE_THREADS_WAIT = r"""
import functools, logging, os, signal, sys, threading, time
import dask.dataframe as dd, distributed, numpy as np, pandas as pd
import dask_manymodel
from dask_manymodel import ExecutionOptions, ManyModelRun

def zero_heartbeat():  # the workers ask whether the run was cancelled before every group
    from dask_manymodel import engine
    engine._HEARTBEAT_SECONDS = 0.0

def held(gate, data, ctx):  # every group waits until the interpreter exits
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll
    return len(data)

def in_function(thread, name):
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_code.co_name != name:
        frame = frame.f_back
    return frame is not None

def poll(condition):
    deadline = time.monotonic() + 60
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)  # poll

LOOPS = [0]  # how many times wait_in_a_loop's wait() timed out
LOOKS = [0]  # how many times the exit hook looked whether a thread waits on the run

def counted(looks_whether_waited_on):
    def look():
        LOOKS[0] += 1
        return looks_whether_waited_on()
    return look

def open_gate_at_exit(gate, loops=0):  # a daemon: the interpreter does not wait for it
    poll(lambda: in_function(threading.main_thread(), "_shutdown"))
    then = LOOPS[0]
    poll(lambda: LOOPS[0] >= then + loops)  # (that many times out of wait() while the exit waits)
    open(gate, "w").close()

def ctrl_c_at_exit():  # a daemon: Ctrl-C while the exit waits for the run
    poll(lambda: in_function(threading.main_thread(), "end_live_runs"))
    os.kill(os.getpid(), signal.SIGINT)

def wait_in_a_loop(run):  # as a script that says the progress every few seconds
    while True:
        try:
            print("wait() returned", run.wait(timeout=0.3, show_progress=False).value)
            return
        except dask_manymodel.RunTimeoutError:
            LOOPS[0] += 1
            # out of wait() (as a script saying the progress between waits) until the
            # exit hook has looked at least once, or ended the run
            then = LOOKS[0]
            poll(lambda: LOOKS[0] > then or run._finished.is_set())

def wait_in_thread(run, timeout):
    try:
        print("wait() returned", run.wait(timeout=timeout, show_progress=False).value)
    except dask_manymodel.RunTimeoutError:
        print("wait() gave up")

if __name__ == "__main__":
    url, mode = sys.argv[1], sys.argv[2]
    gate = url + ".gate"
    dask_manymodel.run._EXIT_CANCEL_SECONDS = 1.0  # held groups that nobody waits for: cut off soon
    client = distributed.Client(distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR))
    client.run(zero_heartbeat)
    frame = pd.DataFrame({"store": np.repeat(np.arange(8), 2), "x": np.arange(16.0)})
    ddf = dd.from_pandas(frame, npartitions=2)
    run = ddf.manymodel.train(functools.partial(held, gate), by="store", url=url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    # "gives up": the thread waits 3 s, and the groups are held for good
    waiter = threading.Thread(target=wait_in_thread, args=(run, 3 if mode == "gives up" else None))
    if mode == "polls":
        run._waited_on_elsewhere = counted(run._waited_on_elsewhere)
        waiter = threading.Thread(target=wait_in_a_loop, args=(run,))
    waiter.start()
    poll(lambda: in_function(waiter, "wait"))
    if mode in ("waits", "polls"):
        threading.Thread(target=open_gate_at_exit, args=(gate, 4 if mode == "polls" else 0), daemon=True).start()
    if mode == "ctrl-c":
        threading.Thread(target=ctrl_c_at_exit, daemon=True).start()
    # ... and the main thread ends; the interpreter waits for `waiter`
"""


@pytest.mark.parametrize("mode", ["waits", "polls", "gives up"])
def test_a_run_a_thread_waits_on_goes_on_when_the_main_thread_ends(tmp_path, mode):
    """The exit hook (which runs before the interpreter waits for its
    threads) cancelled every run still going on, also those that threads
    of the script were waiting on: run.wait() in a thread returned
    CANCELLED, with the warning to call run.wait(). A thread that gives up
    waiting (a timeout) leaves its run to the hook again; one that waits in a
    loop of wait(timeout=...), saying the progress between, does not (the
    hook, looking every 0.2 s, caught it between two waits and cancelled
    the run)."""
    url = str(tmp_path / "models")
    out = subprocess.run(
        [sys.executable, "-c", ENDS_WHILE_THREADS_WAIT, url, mode], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    restored = ManyModelRun.restore_from("r1", url)
    if mode in ("waits", "polls"):
        assert "wait() returned SUCCESS" in out.stdout, (out.stdout, out.stderr[-3000:])
        assert "cancelling it" not in out.stderr
        assert restored.status == RunStatus.SUCCESS
        assert restored.summary()["status"].tolist() == ["DONE"] * 8
    else:  # held until the groups' own deadline (60 s), then SUCCESS, had the exit waited on
        assert "wait() gave up" in out.stdout, (out.stdout, out.stderr[-3000:])
        assert "cancelling it" in out.stderr
        assert restored.status != RunStatus.SUCCESS
        assert "DONE" not in restored.summary()["status"].tolist()


def test_ctrl_c_while_the_exit_waits_for_a_run_a_thread_waits_on_cancels_it(tmp_path):
    """Ctrl-C while the exit hook waited for a run that a thread waits on
    left the hook (a traceback, "Exception ignored in: <module 'threading'>"),
    and with it the interpreter's joining of the threads: the run was left
    IN_PROGRESS, its tasks going on, which the docs say only SIGKILL and
    SIGTERM do."""
    url = str(tmp_path / "models")
    out = subprocess.run(
        [sys.executable, "-c", ENDS_WHILE_THREADS_WAIT, url, "ctrl-c"], capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "interrupted while waiting for the runs that threads wait on: cancelling them" in out.stderr, out.stderr[-3000:]
    assert "wait() returned CANCELLED" in out.stdout, (out.stdout, out.stderr[-3000:])
    with open(os.path.join(url, "r1", "_run.json")) as f:
        assert json.load(f)["status"] == "CANCELLED"


CANCELS_THEN_DIES = r"""
import functools, os, signal, sys
import dask.dataframe as dd, distributed
import dask_manymodel
from dask_manymodel import ExecutionOptions, RunTimeoutError
from tests.conftest import hold_until_released, make_frame, poll

address, url, gates = sys.argv[1:]

def held(gates, data, ctx):  # each task's first group runs until the test releases it
    open(os.path.join(gates, f"running-{ctx.partition_id}"), "w").close()
    hold_until_released(os.path.join(gates, "release"))
    return len(data)

client = distributed.Client(address)
ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
run = ddf.manymodel.train(functools.partial(held, gates), by="store", url=url, run_id="r1",
                          execution_options=ExecutionOptions(npartitions=2))  # a task per worker
poll(lambda: len([n for n in os.listdir(gates) if n.startswith("running-")]) == 2)
try:
    run.cancel(timeout=1)  # the running groups hold it
except RunTimeoutError:
    print("cancel() timed out", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # before the run ends and its final status is written
"""


def test_a_cancelled_run_whose_client_died_reads_cancelled_when_restored(cluster, tmp_path):
    """The flag that tells a run.cancel() from a fail_fast stop (both leave
    the groups not run CANCELLED) was written to _run.json only with the
    final status: a client that died before that (killed after cancel()
    timed out on a long group) left a run that restore_from, the CLI and
    resumes read as PARTIAL_FAILURE (FAILURE had no group finished)."""
    url, gates = str(tmp_path / "models"), tmp_path / "gates"
    gates.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", CANCELS_THEN_DIES, cluster.scheduler_address, url, str(gates)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == -9 and "cancel() timed out" in out.stdout, (out.stdout, out.stderr[-3000:])
    (gates / "release").touch()  # the running groups end DONE; their tasks' next groups CANCELLED

    def restored_status():
        return ManyModelRun.restore_from("r1", url).status

    poll(lambda: restored_status() != RunStatus.IN_PROGRESS, timeout=60)
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.manifest["status"] == "IN_PROGRESS"  # its client never wrote the end
    assert sorted(restored.summary()["status"]) == ["CANCELLED", "CANCELLED", "DONE", "DONE"]
    assert restored.status == RunStatus.CANCELLED


def test_the_exit_lists_the_live_runs_again_when_another_thread_changed_them(monkeypatch):
    """Listing the live runs (a WeakValueDictionary) raises RuntimeError
    when another thread starts or ends a run meanwhile; raised in the exit
    hook, it skipped the rest of the interpreter's thread shutdown."""
    import dask_manymodel.run as run_module

    class ChangedOnce(dict):
        calls = 0

        def values(self):
            ChangedOnce.calls += 1
            if ChangedOnce.calls == 1:
                raise RuntimeError("dictionary changed size during iteration")
            return super().values()

    monkeypatch.setattr(run_module, "_live_runs", ChangedOnce())
    run_module.end_live_runs()
    assert ChangedOnce.calls >= 2


def run_of_halves(url, data, ctx):
    """A group's function that starts a run of its own (a model per half of
    the group) and waits for it."""
    halves = dd.from_pandas(data.to_pandas().assign(half=lambda df: df.index % 2), npartitions=1)
    inner = halves.manymodel.train(fit_line, by="half", url=url, run_id=f"inner-{ctx.partition_id}")
    return str(inner.wait(timeout=60, show_progress=False).value)


def test_a_run_started_inside_a_group_does_not_deadlock_its_worker(tmp_path):
    """The inner run's start waited on its count with the one worker thread
    held by the group that waited on it: a deadlock, which cancel() could
    not end. It leaves the worker's thread pool while it waits, as
    distributed.worker_client() does."""
    url = str(tmp_path / "models")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster):
        ddf = dd.from_pandas(make_frame(n_groups=2, rows=10), npartitions=1)
        outer = ddf.manymodel.train(
            lambda data, ctx: run_of_halves(url, data, ctx), by="store", url=url, run_id="outer"
        )
        assert outer.wait(timeout=90, show_progress=False) == RunStatus.SUCCESS, outer.summary()["error"].tolist()
        assert [outer.get_model(store) for store in (0, 1)] == ["SUCCESS", "SUCCESS"]
        assert ManyModelRun.restore_from("inner-1", url).summary()["status"].tolist() == ["DONE", "DONE"]


def make_a_fileset(url, shuffle):
    """A pipeline's step, run as a Dask task: snapshot a frame as a FileSet."""
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=10), npartitions=2)
    return len(FileSet.make(url, f"snapshot-{shuffle}", ddf, shuffle=shuffle).to_dask_dataframe())


@pytest.mark.parametrize("shuffle", [False, True])
def test_a_fileset_made_inside_a_task_does_not_deadlock_its_worker(tmp_path, shuffle):
    """FileSet.make waited on its writes with the one worker thread held by
    the task that made it: the step hung for ever (Dask's own compute, and
    a run, leave the worker's thread pool while they wait)."""
    url = str(tmp_path / "sets")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client:
        assert client.submit(make_a_fileset, url, shuffle, pure=False).result(timeout=60) == 30


def test_a_live_handle_used_in_the_event_loop_of_an_asynchronous_client_says_to_use_a_thread(tmp_path):
    """An asyncio service starts the run in a thread, as the start's error
    says; its handlers then use the handle in the loop. summary() got a
    coroutine ("'coroutine' object is not iterable"), wait() froze the
    loop it needed for ever, cancel() set nothing and timed out."""
    url = str(tmp_path / "models")
    gate = str(tmp_path / "gate")
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=10), npartitions=1)

    async def serve():
        async with distributed.LocalCluster(
            n_workers=1, processes=False, asynchronous=True, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster, distributed.Client(cluster, asynchronous=True):
            run = await asyncio.to_thread(
                ddf.manymodel.train, functools.partial(group_zero_held, gate), by="store", url=url, run_id="r1"
            )
            for call in (run.summary, run.get_progress, lambda: run.wait(timeout=5), lambda: run.cancel(timeout=5)):
                with pytest.raises(InvalidArgumentError, match=r"from a thread: await asyncio\.to_thread\(run\."):
                    call()
            assert "RUNNING or PENDING=3" in repr(run)
            assert "RUNNING or PENDING" in run._repr_html_()
            open(gate, "w").close()
            assert await asyncio.to_thread(run.wait, 60, False) == RunStatus.SUCCESS
            # once it has ended, nothing waits on the cluster: in the loop too
            assert run.wait() == RunStatus.SUCCESS
            assert run.summary()["status"].tolist() == ["DONE"] * 3

    asyncio.run(serve())


def _in_a_forked_child(target, *args) -> tuple:
    """Run ``target(*args)`` in a child forked from this process; what it
    returns, or ("still running",) if it has not ended within 30 s."""
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_send_back, args=(sending, target, *args))
    child.start()
    child.join(30)
    if child.is_alive():
        child.kill()
        child.join()
        return ("still running",)
    return receiving.recv() if receiving.poll() else ("no answer", child.exitcode)


def _send_back(sending, target, *args) -> None:
    sending.send(target(*args))


def _start_and_wait_on_the_parents(run, url):
    outcome = []
    for call in (
        lambda: dd.from_pandas(make_frame(n_groups=2, rows=10), npartitions=1).manymodel.train(
            fit_line, by="store", url=url, run_id="in-the-child"
        ),
        lambda: run.wait(timeout=5),
        # the statuses it read, if it needed no scheduler (see the test)
        lambda: " ".join(f"{row.partition_id}:{row.status}" for row in run.summary().itertuples()),
    ):
        try:
            result = call()
            outcome.append(result if isinstance(result, str) else "no error")
        except InvalidArgumentError as exc:
            outcome.append(str(exc))
    return tuple(outcome)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_process_forked_while_a_run_goes_on_ends_and_says_its_client_is_the_parents(client, tmp_path):
    """A child forked while the parent's run went on (multiprocessing with
    the 'fork' start method, celery's prefork) never ended: its exit
    cancelled the parent's run through the client it inherited, whose
    event loop did not come along. A run started there, or the inherited
    handle's wait(), waited for ever too."""
    url = str(tmp_path / "models")
    gate = str(tmp_path / "gate")
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=10), npartitions=1)
    run = ddf.manymodel.train(functools.partial(group_zero_held, gate), by="store", url=url, run_id="r1")
    assert _in_a_forked_child(int, "7") == 7  # unrelated work; the child ends
    started, waited, read = _in_a_forked_child(_start_and_wait_on_the_parents, run, url)
    assert "forked from" in started and "Make a client in this process" in started
    assert f"started by process {os.getpid()}" in waited and "restore_from" in waited
    # summary() asks the scheduler which tasks run only for groups storage
    # has nothing of: group 0's task marks it RUNNING before it runs it (a
    # trace for a later try), so once groups 1 and 2 are DONE (a loaded host,
    # a slow fork) every group is read from storage, rightly, with no error
    assert "forked from" in read or read == "0:RUNNING 1:DONE 2:DONE", read
    open(gate, "w").close()
    assert run.wait(timeout=60, show_progress=False) == RunStatus.SUCCESS
    assert not os.path.exists(os.path.join(url, "in-the-child"))


@pytest.fixture
def no_client_active():
    """No Dask client active; the one a run connects or starts for itself
    (dask_manymodel._client._embedded) is closed after the test."""
    from dask_manymodel import _client

    with pytest.raises(ValueError):
        distributed.get_client()
    yield
    embedded, _client._embedded = _client._embedded, None
    if embedded is not None:
        cluster = embedded.cluster
        embedded.close()
        if cluster is not None:
            cluster.close()


def test_with_no_client_a_run_goes_to_the_scheduler_the_config_names_with_its_tls(no_client_active, tmp_path):
    """A deployment points ``distributed.Client()`` at its cluster with Dask's
    scheduler-address setting (DASK_SCHEDULER_ADDRESS), its TLS certificates
    in the same config: a run with no client made in code started a
    LocalCluster on the client's machine instead and trained there."""
    from distributed.security import Security

    security = Security.temporary()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", security=security,
        dashboard_address=":0", silence_logs=logging.ERROR,
    ) as cluster, dask.config.set({
        "scheduler-address": cluster.scheduler_address,
        "distributed.comm.require-encryption": True,
        "distributed.comm.tls.ca-file": security.tls_ca_file,
        "distributed.comm.tls.client.cert": security.tls_client_cert,
        "distributed.comm.tls.client.key": security.tls_client_key,
    }):
        ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
        run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1")
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        assert {f.client.scheduler.address for f in run.futures} == {cluster.scheduler_address}
        assert set(cluster.scheduler.task_prefixes) >= {"manymodel-train"}  # it ran there
        assert len(run.get_model(3)) == 2


def test_with_no_client_a_configured_scheduler_out_of_reach_is_named(no_client_active, tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{sock.getsockname()[1]}"
    ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
    with dask.config.set({"scheduler-address": address, "distributed.comm.timeouts.connect": "1s"}):
        with pytest.raises(InvalidArgumentError, match=f"scheduler-address setting.*{address}.*could not be conn"):
            ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1")
    assert not os.path.exists(tmp_path / "r1")  # nothing written


def test_a_dashboard_link_dask_cannot_make_is_none(no_client_active, tmp_path):
    """A JupyterHub image sets Dask's dashboard link template from an
    environment variable ("/user/{JUPYTERHUB_USER}/proxy/{port}/status"),
    which a batch job of the same image lacks: the first run, on the cluster
    started for it, failed with KeyError: 'JUPYTERHUB_USER' (Dask's scheduler
    only warns of it), and every run's notebook view too."""
    ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
    variable = f"MANYMODEL_UNSET_{os.getpid()}"
    assert variable not in os.environ
    with dask.config.set({"distributed.dashboard.link": "/user/{%s}/proxy/{port}/status" % variable}):
        run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1")
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        assert run.dashboard_link is None
        assert "no dashboard" in run._repr_html_()
    assert run.dashboard_link.startswith("http")  # a template it can fill again


def _train_in_a_forked_child(url):
    try:
        dd.from_pandas(make_frame(n_groups=2, rows=10), npartitions=1).manymodel.train(
            fit_line, by="store", url=url, run_id="in-the-child"
        )
    except InvalidArgumentError as exc:
        return str(exc)
    return "no error"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_of_a_tls_client_is_told_to_bring_the_security(tmp_path):
    """The refusal in a forked child said to make
    ``distributed.Client('tls://...')``: on a TLS cluster that fails in
    Dask's "TLS expects a `ssl_context` argument" without the parent's
    Security."""
    from distributed.security import Security

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", security=Security.temporary(),
        dashboard_address=":0", silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster):
        said = _in_a_forked_child(_train_in_a_forked_child, str(tmp_path))
    assert f"distributed.Client({cluster.scheduler_address!r}, security=...) with the same Security" in said
