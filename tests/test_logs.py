"""What a group prints or logs is captured per group, stored, and capped."""

from __future__ import annotations

import json
import logging
import os
import datetime
import sys
import threading
import time

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, ManyModelRun, RunStatus
from dask_manymodel._logs import LogBuffer, capture_logs

from .conftest import fit_line, make_frame


def noisy(data, ctx):
    print(f"hello from {ctx.partition_id}")
    print(f"stderr of {ctx.partition_id}", file=sys.stderr)
    ctx.logger.info("rows=%d", len(data.to_pandas()))
    ctx.logger.debug("debug is below ctx.logger's level")
    logging.getLogger("somebody.else").error("a library logs too")
    logging.getLogger("somebody.else").info("below the root logger's WARNING")
    if ctx.partition_id == 2:
        raise ValueError("group 2 is broken")
    return fit_line(data, ctx)


def test_prints_and_log_records_are_kept_per_group_and_stored(client, ddf, store_url):
    run = ddf.manymodel.train(noisy, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    details = run.partition_details
    logs = details[5].logs
    lines = logs.splitlines()
    assert lines[:2] == ["hello from 5", "stderr of 5"]
    assert lines[2].endswith("INFO dask_manymodel.user: rows=40")
    assert lines[3].endswith("ERROR somebody.else: a library logs too")
    assert len(lines) == 4  # nothing below the loggers' levels, nothing of other groups
    # a failed group keeps its logs too, beside its traceback
    assert details[2].logs.startswith("hello from 2\n") and "ValueError" in details[2].traceback
    # stored in the group's _partition.json, and read back by a restored handle
    with open(f"{store_url}/r1/store=5/_partition.json") as f:
        assert json.load(f)["logs"] == logs
    assert ManyModelRun.restore_from("r1", store_url).partition_details[5].logs == logs


def _set_time_zone(tz: str | None) -> str | None:
    """In a worker: set the process's local time zone; return the earlier TZ."""
    before = os.environ.get("TZ")
    if tz is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = tz
    time.tzset()
    return before


def logs_the_time(data, ctx):
    ctx.logger.info("fitting")
    return 1


def test_log_times_are_utc_whatever_the_workers_time_zone(client, ddf, store_url):
    # workers of one cluster may run under other TZ settings than each other
    # and the client; each group's log lines said its worker's local time,
    # without a zone (hours off from its UTC `finished`, and from each other)
    before = client.run(_set_time_zone, "Asia/Tokyo")  # UTC+9, no summer time
    try:
        run = ddf.manymodel.train(logs_the_time, by="store", url=store_url, run_id="r1")
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
    finally:
        for worker, tz in before.items():
            client.run(_set_time_zone, tz, workers=[worker])
    with open(f"{store_url}/r1/store=3/_partition.json") as f:
        stored = json.load(f)
    stamp, rest = stored["logs"].split(" ", 1)
    assert rest == "INFO dask_manymodel.user: fitting\n"
    assert stamp.endswith("Z"), stamp
    logged = datetime.datetime.fromisoformat(stamp)
    finished = datetime.datetime.fromisoformat(stored["finished"])
    assert abs((finished - logged).total_seconds()) < 60, (stamp, stored["finished"])


def chatty(data, ctx):
    for i in range(2000):
        print(f"line {i} of group {ctx.partition_id}")
    return 1


def test_logs_are_capped_with_a_note(client, ddf, store_url):
    run = ddf.manymodel.train(chatty, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(max_log_chars=500))
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    logs = run.partition_details[7].logs
    note = "\n[logs truncated at 500 characters]\n"
    assert logs.endswith(note)
    kept = logs[: -len(note)]
    assert len(kept) == 500 and kept.startswith("line 0 of group 7\nline 1 of group 7\n")
    with open(f"{store_url}/r1/store=7/_partition.json") as f:
        assert json.load(f)["logs"] == logs


def second_start(data, ctx):
    print("the second start")
    return fit_line(data, ctx)


def test_logs_and_tracebacks_stay_in_storage_until_asked_for(client, ddf, store_url):
    # what the tasks hand back (and the live handle keeps) is the small record;
    # 10,000 groups that print a page would otherwise be GBs in the client
    run = ddf.manymodel.train(noisy, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    returned = [record for future in run.futures for record in future.result()]
    assert len(returned) == 12 and not any("logs" in r or "traceback" in r for r in returned)
    assert any("group 2 is broken" in (r.get("error") or "") for r in returned)  # the one-line error travels
    restored = ManyModelRun.restore_from("r1", store_url)
    for handle in (run, restored):
        assert handle.summary().set_index("partition_id").loc[2, "error"] == "ValueError: group 2 is broken"
        details = handle.partition_details
        assert details[5].logs.startswith("hello from 5\n")
        assert details[2].traceback.rstrip().endswith("ValueError: group 2 is broken")
        assert details[5].traceback is None
        assert "logs" not in repr(details[5])
    # the run started again over it: the old handle's groups have no text of the new start's
    again = ddf.manymodel.train(second_start, by="store", url=store_url, run_id="r1", on_existing_artifacts="overwrite")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS
    old = run.partition_details
    assert old[2].error == "ValueError: group 2 is broken" and old[2].traceback is None and old[5].logs == ""


def huge_failure(data, ctx):
    if ctx.partition_id == 3:
        raise ValueError("bad value " + "x" * 1_000_000)
    return 1


def test_a_huge_error_message_is_cut_in_the_status(client, ddf, store_url):
    run = ddf.manymodel.train(huge_failure, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(max_log_chars=1_000))
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    with open(f"{store_url}/r1/store=3/_partition.json") as f:
        stored = json.load(f)
    assert stored["error"].startswith("ValueError: bad value xxx") and len(stored["error"]) < 4_100
    assert "characters cut" in stored["error"]
    # the traceback keeps its start and its end, where the exception is named
    assert stored["traceback"].startswith("Traceback (most recent call last)")
    assert "ValueError: bad value" in stored["traceback"] and len(stored["traceback"]) < 1_100
    assert run.partition_details[3].error == stored["error"]


def test_log_buffer_cuts_at_the_cap_and_notes_it_once():
    buffer = LogBuffer(10)
    buffer.write("12345")
    assert buffer.text == "12345" and not buffer.truncated
    buffer.write("67890abc")
    buffer.write("more")
    assert buffer.truncated and buffer.text == "1234567890\n[logs truncated at 10 characters]\n"


def test_capture_is_per_thread():
    """Two threads capturing at once: each keeps only its own prints and records."""
    barrier = threading.Barrier(2, timeout=10)
    texts = {}

    def work(name):
        with capture_logs(10_000) as buffer:
            for i in range(50):
                print(f"{name} {i}")
                logging.getLogger("test.capture").warning("%s record %d", name, i)
                if i % 10 == 0:
                    barrier.wait()  # keep the two threads writing side by side
        texts[name] = buffer.text

    threads = [threading.Thread(target=work, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, other in (("a", "b"), ("b", "a")):
        lines = texts[name].splitlines()
        assert [line for line in lines if " record " not in line] == [f"{name} {i}" for i in range(50)]
        assert sum(f"{name} record" in line for line in lines) == 50
        assert not any(line.startswith(f"{other} ") or f"{other} record" in line for line in lines)


_running: set = set()
_overlapped = threading.Event()
_turns = threading.Condition()
_last_printer: list = [None]


def threaded_logger(data, ctx):
    """Prints step by step, first waiting (bounded) until another group runs
    in the other thread of this worker, then taking turns with it line by
    line (while it runs), so that their prints interleave."""
    me = ctx.partition_id
    with _turns:
        _running.add(me)
        if len(_running) > 1:
            _overlapped.set()
        _turns.notify_all()
    try:
        _overlapped.wait(timeout=20)
        with _turns:
            together = len(_running) > 1
        for i in range(20):
            with _turns:
                # my turn once the other group printed since my last line, or is gone
                _turns.wait_for(lambda: _last_printer[0] != me or len(_running) < 2, timeout=20)
                print(f"group {me} step {i}")
                _last_printer[0] = me
                _turns.notify_all()
        return together
    finally:
        with _turns:
            _running.discard(me)
            _turns.notify_all()


def test_two_threads_of_one_worker_do_not_mix_logs(tmp_path):
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster):
        ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
        run = ddf.manymodel.train(threaded_logger, by="store", url=str(tmp_path), run_id="r1",
                                  execution_options=ExecutionOptions(npartitions=2))
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        # the first group of each task ran alongside the other task's
        assert sum(run.get_model(g) for g in range(4)) >= 2
        for g, details in run.partition_details.items():
            assert details.logs.splitlines() == [f"group {g} step {i}" for i in range(20)]


@pytest.mark.parametrize("cap", [0, 1])
def test_tiny_caps(cap):
    with capture_logs(cap) as buffer:
        print("xy")
    assert buffer.text == "xy"[:cap] + f"\n[logs truncated at {cap} characters]\n"


def test_the_routed_streams_still_look_like_the_originals():
    """Libraries ask sys.stdout for its encoding or file descriptor."""
    original = sys.stdout
    with capture_logs() as buffer:
        assert sys.stdout is not original
        assert sys.stdout.encoding == original.encoding
        assert sys.stdout.isatty() == original.isatty()
        sys.stdout.writelines(["a\n", "b\n"])
    assert buffer.text == "a\nb\n"


def writes_bytes_and_warns(data, ctx):
    """Every group warns from one code location; group 2 writes bytes to stdout."""
    import warnings

    warnings.warn(f"deprecated thing used by {ctx.partition_id}")
    warnings.warn("the same text from every group")
    if ctx.partition_id == 2:
        try:
            sys.stdout.write(b"raw bytes\n")
        except TypeError as exc:
            print(f"caught: {exc}")
    return len(data)


def test_each_group_keeps_its_own_warnings_and_bytes_fail_at_the_write(client, store_url):
    """Python shows a warning once per code location: only the first group
    of each task had it. Bytes written to stdout were kept and broke the
    join of the logs after the group: every group of the task was lost."""
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=1)
    run = ddf.manymodel.train(
        writes_bytes_and_warns, by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=1),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    for group, details in run.partition_details.items():
        assert f"UserWarning: deprecated thing used by {group}" in details.logs
        assert "UserWarning: the same text from every group" in details.logs
    assert "caught: write() argument must be str, not bytes" in run.partition_details[2].logs


_earlier_contexts: list = []


def closes_stdout_and_keeps_its_context(data, ctx):
    """Group 0 closes sys.stdout and keeps its ctx; group 1 prints and uploads
    through group 0's ctx after group 0 returned (as a thread left running would)."""
    if ctx.partition_id == 0:
        sys.stdout.close()
        _earlier_contexts.append(ctx)
        return 0
    print(f"group {ctx.partition_id} prints", flush=True)
    if ctx.partition_id == 1:
        try:
            _earlier_contexts[-1].upload("late", "late.txt")
        except Exception as exc:
            print(f"late upload: {type(exc).__name__}: {exc}")
    return 1


def test_a_group_closing_stdout_or_using_its_context_late_breaks_nothing(client, store_url):
    """sys.stdout.close() in one group closed the worker's stream: every later
    group of the worker failed at its next print. An upload through a group's
    ctx after its function returned went into a folder already DONE, unlisted."""
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=1)
    run = ddf.manymodel.train(
        closes_stdout_and_keeps_its_context, by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=1),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    details = run.partition_details
    assert all(f"group {g} prints" in details[g].logs for g in (1, 2, 3))
    assert ("late upload: InvalidArgumentError: ctx.upload('late.txt') of group 0 came after the group's "
            "function returned") in details[1].logs
    assert "late.txt" not in os.listdir(os.path.join(store_url, "r1", details[0].path))
    again = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r2")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS


def _configure_logging_as_an_app_does() -> None:
    """What a user's module does as the workers import it, after
    dask_manymodel: dictConfig, whose disable_existing_loggers is True
    unless told otherwise."""
    import logging.config

    import dask_manymodel.context  # noqa: F401  (the workers have it before the user's module)

    logging.config.dictConfig({
        "version": 1,
        "handlers": {"console": {"class": "logging.StreamHandler"}},
        "root": {"level": "INFO", "handlers": ["console"]},
    })


def logs_through_ctx(data, ctx):
    ctx.logger.info("fitting group %s", ctx.partition_id)
    return len(data)


def test_ctx_logger_is_kept_when_a_users_module_configured_logging_with_dict_config(tmp_path):
    """A module of the user's that called logging.config.dictConfig(...) as
    it was imported disabled the dask_manymodel.user logger, which existed
    already: ctx.logger's records were missing from every group's logs."""
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client:
        client.run(_configure_logging_as_an_app_does)
        ddf = dd.from_pandas(make_frame(n_groups=2, rows=5), npartitions=1)
        run = ddf.manymodel.train(logs_through_ctx, by="store", url=str(tmp_path / "models"), run_id="r1")
        assert run.wait(timeout=60, show_progress=False) == RunStatus.SUCCESS
        for store in (0, 1):
            assert f"INFO dask_manymodel.user: fitting group {store}" in run.partition_details[store].logs
