"""Watching runs: progress bars, reprs, captured logs, the command line."""

from __future__ import annotations

import logging
import subprocess
import sys

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import ExecutionOptions, ManyModelRun, RunStatus
from dask_manymodel.cli import main

from .conftest import fit_line, make_frame, poll


def noisy(data, ctx):
    print(f"hello from {ctx.partition_id}")
    ctx.logger.warning("rows=%d", len(data))
    logging.getLogger("somebody.else").error("a library logs too")
    if ctx.partition_id == 2:
        raise ValueError("group 2 <is> broken")
    return fit_line(data, ctx)


@pytest.fixture
def finished(client, ddf, store_url):
    run = ddf.manymodel.train(noisy, by="store", url=store_url, run_id="r1")
    run.wait(show_progress=False)
    return run


def test_wait_shows_groups_not_tasks(client, ddf, store_url, capsys):
    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    run.wait(show_progress=True)
    err = capsys.readouterr().err
    assert "12/12" in err and "group" in err
    quiet = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r2")
    quiet.wait(show_progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_logs_are_captured_per_group_and_stored(finished, store_url):
    details = finished.partition_details
    assert "hello from 5" in details[5].logs and "rows=40" in details[5].logs
    assert "a library logs too" in details[5].logs
    assert "hello from 4" not in details[5].logs
    restored = ManyModelRun.restore_from("r1", store_url)
    assert restored.partition_details[5].logs == details[5].logs


def chatty(data, ctx):
    for i in range(2000):
        print(f"line {i} of group {ctx.partition_id}")
    return 1


def test_logs_are_capped_with_a_note(client, ddf, store_url):
    run = ddf.manymodel.train(chatty, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(max_log_chars=500))
    run.wait(show_progress=False)
    logs = run.partition_details[0].logs
    assert logs.startswith("line 0 of group 0")
    assert logs.endswith("[logs truncated at 500 characters]\n")
    assert len(logs) < 600


def threaded_logger(data, ctx):
    import time

    for i in range(20):
        print(f"group {ctx.partition_id} step {i}")
        time.sleep(0.005)  # interleave with the other thread of this worker
    return 1


def test_two_threads_of_one_worker_do_not_mix_logs(tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster):
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
        run = ddf.manymodel.train(threaded_logger, by="store", url=str(tmp_path), run_id="r1",
                                  execution_options=ExecutionOptions(npartitions=2))
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        for g, details in run.partition_details.items():
            lines = details.logs.strip().splitlines()
            assert lines == [f"group {g} step {i}" for i in range(20)]


def test_reprs(finished):
    text = repr(finished)
    assert "PARTIAL_FAILURE" in text and "DONE=11" in text and "FAILED=1" in text and "r1" in text
    page = finished._repr_html_()
    assert "PARTIAL_FAILURE" in page and "dashboard" in page and finished.dashboard_link in page
    assert "group 2 &lt;is&gt; broken" in page and "<is>" not in page


def test_restored_progress_while_running(client, store_url, capsys):
    def slow(data, ctx):
        import time

        time.sleep(0.1)  # simulated work
        return 1

    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=2)
    run = ddf.manymodel.train(slow, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    restored = ManyModelRun.restore_from("r1", store_url)

    def some_done_some_pending() -> bool:
        progress = restored.get_progress()
        return "DONE" in progress and "PENDING" in progress

    poll(some_done_some_pending)
    assert restored.status == RunStatus.IN_PROGRESS
    run.wait(show_progress=False)
    assert restored.status == RunStatus.SUCCESS
    capsys.readouterr()
    run.progress(notebook=False)  # distributed's own bar over the run's tasks
    assert "100% Completed" in capsys.readouterr().out


def test_cli_runs_show_logs(finished, store_url, capsys):
    assert main(["runs", store_url]) == 0
    out = capsys.readouterr().out
    assert "run_id" in out and "r1" in out and "PARTIAL_FAILURE" in out and "12" in out
    assert main(["show", store_url, "r1"]) == 0
    out = capsys.readouterr().out
    assert "DONE" in out and "slowest groups" in out and "ValueError: group 2 <is> broken" in out
    assert main(["logs", store_url, "r1", "2"]) == 0
    out = capsys.readouterr().out
    assert "group 2: FAILED" in out and "hello from 2" in out and "Traceback" in out


def test_cli_errors(store_url, capsys):
    assert main(["show", store_url, "missing"]) == 2
    assert "no run 'missing'" in capsys.readouterr().err
    assert main(["runs", "nosuchproto://x"]) == 2
    assert "nosuchproto" in capsys.readouterr().err
    assert main(["runs", store_url + "/does-not-exist"]) == 2


def test_cli_demo_as_a_console_script(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dask_manymodel.cli", "demo", "--groups", "30", "--rows", "20", "--url", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Dask dashboard: http" in out.stdout and "training run 'demo-train': SUCCESS" in out.stdout
    assert "rows scored: 600" in out.stdout
