"""Watching runs: progress bars, progress read from storage, notebook display."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re

import dask.dataframe as dd
import numpy as np
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import ExecutionOptions, ManyModelRun, PartitionStatus, ReadOnlyRunError, RunStatus

from .conftest import (
    fit_line,
    group_zero_held,
    group_zero_held_aside,
    hold_until_released,
    make_frame,
    poll,
)


def broken_2(data, ctx):
    if ctx.partition_id == 2:
        raise ValueError("group 2 <is> broken & so\nthe second line")
    return fit_line(data, ctx)


def always_fails(data, ctx):
    raise RuntimeError(f"no model for <{ctx.partition_id}>")


@pytest.fixture
def finished(client, ddf, store_url):
    run = ddf.manymodel.train(broken_2, by="store", url=store_url, run_id="r1")
    run.wait(show_progress=False)
    return run


def test_wait_counts_groups_not_tasks(client, ddf, store_url, capsys):
    # 12 groups in 2 tasks: the bar counts the groups, failed ones included
    run = ddf.manymodel.train(broken_2, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    assert run.wait(show_progress=True) == RunStatus.PARTIAL_FAILURE
    captured = capsys.readouterr()
    final = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("train r1: 100%") and "12/12" in final and "group" in final, final
    # the outcome at the end, and not painted as a success (a full bar was green in a notebook)
    assert final.endswith("11 DONE, 1 FAILED]") and "\x1b[31m" in final, final
    assert captured.out == ""


def odd_fail_then_last_held(gate, data, ctx):
    """Odd groups fail until the file ``rerun`` lies beside ``gate``; then
    the sixth group to run waits at the gate (the groups of one task run one
    after the other, in the order their rows come)."""
    folder = os.path.dirname(gate)
    if not os.path.exists(os.path.join(folder, "rerun")):
        if ctx.partition_id % 2:
            raise ValueError("the first pass fails the odd groups")
        return len(data)
    open(os.path.join(folder, f"ran-{ctx.partition_id}"), "w").close()
    if sum(name.startswith("ran-") for name in os.listdir(folder)) == 6:
        hold_until_released(gate)
    return len(data)


def test_the_bar_of_a_rerun_counts_its_groups_as_they_finish(client, tmp_path, store_url):
    # retry_failed() keeps the 6 DONE groups; the bar then starts at 6 and
    # must move with each rerun group, not wait for the task to end
    gate = str(tmp_path / "gate")
    fn = functools.partial(odd_fail_then_last_held, gate)
    ddf = dd.from_pandas(make_frame(), npartitions=2)
    run = ddf.manymodel.train(fn, by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=1))
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    (tmp_path / "rerun").touch()
    rerun = run.retry_failed()
    assert len(rerun.futures) == 1
    try:
        # 6 kept + 5 rerun groups finished while the last one is held: their
        # statuses are written within half a second, and reported with them
        poll(lambda: rerun._finished_count() == 11)
        assert rerun.status == RunStatus.IN_PROGRESS
    finally:
        open(gate, "w").close()
    assert rerun.wait(show_progress=False) == RunStatus.SUCCESS
    assert rerun._finished_count() == 12


def test_a_task_that_runs_again_is_counted_once(store_url):
    """A task whose worker died runs again from its first group and reports
    its running totals from 0 again: the bar keeps each task's highest
    total, so it never passes the groups that are final."""
    from dask_manymodel.store import RunStore

    groups = [{"partition_id": n, "path": f"k={n}", "rows": 1, "task": n // 10} for n in range(20)]
    run = ManyModelRun(store=RunStore(store_url, "r1"), manifest={"run_id": "r1"}, groups=groups, futures=[])
    for task, done, failed in [(0, 5, 1), (1, 3, 0), (0, 2, 0), (0, 6, 1), (1, 4, 0)]:
        run._on_progress_event((0.0, {"task": task, "done": done, "failed": failed}))
    assert run._finished_count() == 7 + 4


def test_the_bar_of_a_rerun_starts_from_the_groups_kept(finished, capsys):
    """retry_failed() keeps the 11 DONE groups: the bar counted them as
    finished in its first moment, so its rate was thousands of groups a
    second and its ETA 0 however slow the groups run again."""
    rerun = finished.retry_failed()
    capsys.readouterr()
    assert rerun.wait(show_progress=True) == RunStatus.PARTIAL_FAILURE
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    assert "11/12" in lines[0] and "?group/s" in lines[0], lines[0]
    assert "12/12" in lines[-1] and "11 DONE, 1 FAILED" in lines[-1], lines[-1]


def test_show_progress_false_prints_nothing(client, ddf, store_url, capsys):
    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="quiet")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert capsys.readouterr() == ("", "")


def test_distributed_progress_over_the_runs_tasks(finished, capsys):
    capsys.readouterr()
    finished.progress(notebook=False)  # distributed's own bar, over the run's tasks
    assert "100% Completed" in capsys.readouterr().out
    if importlib.util.find_spec("ipywidgets"):
        # in a notebook: one widget bar per task prefix, here the run's alone
        widget = finished.progress(notebook=True)
        assert type(widget).__name__ == "MultiProgressWidget"
        assert widget.keys == {future.key for future in finished.futures}
        assert {key[0].rsplit("-", 1)[0] for key in widget.keys} == {"manymodel-train"}
    with pytest.raises(ReadOnlyRunError, match="restored from storage"):
        ManyModelRun.restore_from("r1", finished.url).progress()
    # the call that resumes it, in the accessor the docs teach (it named only the class API's .run)
    with pytest.raises(ReadOnlyRunError, match=r"call ddf\.manymodel\.train\(fn, by=\.\.\., url=\.\.\., "
                       r"run_id='r1', on_existing_artifacts='resume'\) with the data"):
        ManyModelRun.restore_from("r1", finished.url).retry_failed()


def test_progress_of_a_running_run_from_another_handle(client, store_url):
    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=2)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(functools.partial(group_zero_held_aside, gate), by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    # what another process would do: rebuild a handle from storage alone
    restored = ManyModelRun.restore_from("r1", store_url)
    seen = {}

    def partly_done() -> bool:
        progress = {k: len(v) for k, v in restored.get_progress().items()}
        if progress.get("DONE") and progress.get("PENDING") and restored.status == RunStatus.IN_PROGRESS:
            seen.update(progress)
            return True
        return False

    poll(partly_done)
    assert sum(seen.values()) == 20 and 0 < seen["DONE"] < 20
    assert "IN_PROGRESS" in repr(restored)
    open(gate, "w").close()  # group 0 may finish now
    run.wait(show_progress=False)
    assert restored.status == RunStatus.SUCCESS
    assert {k: len(v) for k, v in restored.get_progress().items()} == {"DONE": 20}
    with pytest.raises(ReadOnlyRunError):
        restored.wait()


def test_a_status_read_as_it_is_written_is_no_warning_while_the_run_goes_on(client, store_url, caplog):
    """Tasks write statuses in place (no rename), so a peek at a run in
    progress (run.summary(), run.status, a handle restored in another
    thread or process) can catch one cut short: no damage, but each such
    peek logged "ignoring ... status file(s) that are not JSON" as a WARNING. Once the
    run has ended, a status that does not parse is damage, still warned of."""
    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=2)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(functools.partial(group_zero_held_aside, gate), by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    restored = ManyModelRun.restore_from("r1", store_url)
    poll(lambda: bool(restored.get_progress().get("DONE")))
    done = restored.get_progress()["DONE"][0]
    # as a reader finds a status its task is writing: cut short
    status_file = os.path.join(store_url, "r1", done.path, "_partition.json")
    with open(status_file, "r+") as f:
        text = f.read()
        f.seek(0)
        f.truncate()
        f.write(text[: len(text) // 2])
    unreadable = f"ignoring 1 status file(s) that are not JSON, such as {status_file}:"

    def logged(records):
        return any(record.getMessage().startswith(unreadable) for record in records)

    with caplog.at_level(logging.DEBUG, logger="dask_manymodel.store"):
        peek = ManyModelRun.restore_from("r1", store_url)
        assert peek.partition_details[done.partition_id].status != PartitionStatus.DONE  # (read, left out)
        assert peek.summary()["status"].tolist().count("DONE") < 20
        run.summary()
    assert logged(caplog.records)  # it was read cut short ...
    assert not logged([r for r in caplog.records if r.levelno >= logging.WARNING])  # quietly
    open(gate, "w").close()
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dask_manymodel.store"):
        ManyModelRun.restore_from("r1", store_url).summary()
    assert logged(caplog.records)  # a finished run's: damage


def test_repr(finished):
    text = repr(finished)
    assert text == (
        f"<ManyModelRun train 'r1' PARTIAL_FAILURE (live) groups=12 [DONE=11, FAILED=1] "
        f"at {finished.url}/r1>"
    )
    restored = ManyModelRun.restore_from("r1", finished.url)
    assert repr(restored) == text.replace("(live)", "(restored)")


def test_repr_html(finished):
    page = finished._repr_html_()
    assert "<strong>PARTIAL_FAILURE</strong>, 12 groups" in page
    assert f"<code>{finished.url}/r1</code>" in page
    assert f'<a href="{finished.dashboard_link}" target="_blank">Dask dashboard</a>' in page
    assert re.search(r"<td>DONE</td><td[^>]*>11</td>", page) and re.search(r"<td>FAILED</td><td[^>]*>1</td>", page)
    # the failed group with the first line of its error, escaped
    assert "<code>2</code> FAILED: ValueError: group 2 &lt;is&gt; broken &amp; so</li>" in page
    assert "<is>" not in page and "second line" not in page
    restored = ManyModelRun.restore_from("r1", finished.url)._repr_html_()
    assert "restored from storage (no dashboard)" in restored and "href" not in restored


def test_repr_html_lists_a_few_failed_groups(client, ddf, store_url):
    run = ddf.manymodel.train(always_fails, by="store", url=store_url, run_id="bad")
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    page = run._repr_html_()
    assert "Failed groups (12):" in page and page.count("RuntimeError: no model for &lt;") == 5
    assert "… and 7 more" in page


def test_repr_of_a_run_in_progress(client, store_url):
    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=2)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(functools.partial(group_zero_held, gate), by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=2))
    text, page = repr(run), run._repr_html_()  # group 0 is held: the run is still going
    open(gate, "w").close()
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert "IN_PROGRESS (live) groups=20" in text and "<strong>IN_PROGRESS</strong>" in page
    assert re.search(r"\[(PENDING|RUNNING)=", text)


def test_a_finished_run_is_freed_once_its_handle_is_dropped(client, ddf, store_url):
    """Nothing of distributed's keeps a finished run (and its records) alive:
    a notebook that starts run after run on one client must not grow."""
    import gc
    import weakref

    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="freed")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    run_ref = weakref.ref(run)
    del run

    def freed():
        gc.collect()
        return run_ref() is None

    poll(freed, timeout=10)  # the collector thread lets go as it finishes


def test_running_means_a_worker_is_executing_the_groups_task(tmp_path):
    """Groups of a task waiting in a worker's queue were shown RUNNING too
    (the scheduler had handed the task out): only the executing task's are."""
    import json
    import logging

    import distributed

    gate = str(tmp_path / "release")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client:
        # each task reads one persisted partition: the scheduler hands all 4
        # to the worker at once; one executes, the others wait in its queue
        ddf = dd.from_pandas(make_frame(n_groups=20, rows=5), npartitions=4).persist()
        url = str(tmp_path / "m")
        run = ddf.manymodel.train(
            functools.partial(group_zero_held, gate), by="store", url=url, run_id="r1",
            execution_options=ExecutionOptions(shuffle="never"),
        )
        try:
            with open(os.path.join(url, "r1", "_groups.json")) as f:
                task_of = {g["partition_id"]: g["task"] for g in json.load(f)}

            def running() -> list:
                return [d.partition_id for d in run.get_progress().get("RUNNING", [])]

            def handed_out() -> int:
                return sum(len(keys) for keys in client.processing().values())

            # the held task is executing (once the scheduler heard of it), and
            # the scheduler has handed the worker a second task, which waits
            poll(lambda: 0 in running() and handed_out() == 4, timeout=30)
            assert {task_of[group] for group in running()} == {task_of[0]}
        finally:
            open(gate, "w").close()
        assert run.wait(show_progress=False) == RunStatus.SUCCESS


def manymodel_topics(dask_scheduler) -> list:
    return sorted(name for name in dask_scheduler._broker._topics if str(name).startswith("manymodel"))


def test_runs_share_one_progress_topic(client, ddf, store_url):
    """Each run subscribed a topic of its own, and the scheduler and the
    client kept every one of them (a handler and a log per run) for their
    lives: a cluster serving thousands of runs kept thousands."""
    before = len(client._event_handlers)
    for number in range(3):
        run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id=f"r{number}")
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert client.run_on_scheduler(manymodel_topics) == ["manymodel-progress"]
    assert len(client._event_handlers) <= before + 1


def _counting_status_reads(monkeypatch) -> list[int]:
    """How many groups each batched status read asks for, from now on."""
    from dask_manymodel.store import RunStore

    sizes: list[int] = []
    read = RunStore.read_statuses

    def counted(self, rels, *args, **kwargs):
        sizes.append(len(rels))
        return read(self, rels, *args, **kwargs)

    monkeypatch.setattr(RunStore, "read_statuses", counted)
    return sizes


def test_one_groups_details_read_that_group_alone(finished, monkeypatch, capsys):
    """partition_details[7], repr() and the CLI's logs read every group's
    status (200,000 files at 200,000 groups: ~10 s locally, minutes of
    requests on an object store), and a restored handle read them all again
    on every call."""
    from dask_manymodel import cli

    restored = ManyModelRun.restore_from("r1", finished.url)
    reads = _counting_status_reads(monkeypatch)
    assert restored.partition_details[2].error.startswith("ValueError: group 2")
    assert restored.partition_details[np.int64(7)].status.value == "DONE"
    assert 5 in restored.partition_details and 99 not in restored.partition_details
    assert len(restored.partition_details) == 12 and sorted(restored.partition_details) == list(range(12))
    assert reads == [1, 1, 1]  # (99 is no group: nothing to read)
    assert restored.summary()["status"].value_counts().to_dict() == {"DONE": 11, "FAILED": 1}
    assert {d.partition_id: d.status.value for d in restored.partition_details.values()}[2] == "FAILED"
    repr(restored), restored._repr_html_(), restored.get_progress()
    assert reads == [1, 1, 1, 12]  # a finished run's statuses are read once, then kept
    assert cli.main(["logs", finished.url, "r1", "2"]) == 0
    assert "ValueError: group 2" in capsys.readouterr().out
    assert reads[4:] == [1]
    assert cli.main(["show", finished.url, "r1"]) == 0
    assert "FAILED" in capsys.readouterr().out
    assert reads[5:] == [12]


def test_partition_details_copies_as_a_dict_and_reads_once_when_iterated(finished, monkeypatch):
    """Once a plain dict: it pickled and copied (now it held the live handle,
    which cannot be), and dict(d) or {k: d[k] for k in d} read every group
    once (a lookup per key read one group each: 140 s at 200,000 groups)."""
    import copy
    import pickle

    details = finished.partition_details
    for copied in (pickle.loads(pickle.dumps(details)), copy.deepcopy(details), copy.copy(details)):
        assert type(copied) is dict and sorted(copied) == list(range(12)) and copied[2].status.value == "FAILED"
    restored = ManyModelRun.restore_from("r1", finished.url)
    reads = _counting_status_reads(monkeypatch)
    d = restored.partition_details
    assert sorted(d) == list(range(12)) and reads == []  # keys alone read nothing
    as_dict = dict(d)
    assert {k: d[k].status.value for k in d}[2] == "FAILED" and as_dict[7].status.value == "DONE"
    assert reads == [12], reads  # one batched read, not one per key


def test_partition_details_shows_its_first_groups_only(finished, monkeypatch):
    """Its repr was every group's details (16 MB in a notebook's output, and
    saved with it, at 100,000 groups), read in full each time it was shown."""
    restored = ManyModelRun.restore_from("r1", finished.url)
    reads = _counting_status_reads(monkeypatch)
    text = repr(restored.partition_details)
    assert text.startswith("{0: PartitionDetails(partition_id=0") and "9: PartitionDetails" in text
    assert "10: PartitionDetails" not in text
    assert text.endswith("... (2 more groups: look one up with [partition_id], or see run.summary())}")
    assert reads == [10]


def last_group_held(gate, data, ctx):
    """Group 19 (the last of its task: equal groups run in key order) waits for the gate."""
    if ctx.partition_id == 19:
        hold_until_released(gate)
    return len(data)


def test_a_live_handle_reads_a_finished_group_once_while_its_task_runs(client, store_url, monkeypatch):
    """summary() while the run went read every group its task had not
    handed back yet, on every call: 12-22 s a call at 200,000 groups."""
    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=1)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(functools.partial(last_group_held, gate), by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=1))
    # one task: its last group is held, the others finish and wait in storage
    # (all of them: a group finishing between two calls is rightly read once more)
    poll(lambda: run.summary()["status"].value_counts().get("DONE", 0) == 19)
    reads = _counting_status_reads(monkeypatch)
    done = (run.summary()["status"] == "DONE").sum()
    run.summary()
    assert len(reads) == 2 and reads[0] == 20 - done and reads[1] <= 20 - done, (reads, done)
    held = run.partition_details
    assert sorted(held) == list(range(20)) and held[19].status.value in ("PENDING", "RUNNING")
    open(gate, "w").close()
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert run.summary()["status"].eq("DONE").all()
    # a mapping held since then, once iterated over, still shows a group still going as it is now
    assert held[19].status.value == "DONE"


def test_a_run_whose_last_groups_run_is_in_progress_as_restored(client, store_url, capsys):
    """Each task marks its first group RUNNING in storage before it runs it.
    With one group per task, every group of a run had a status while its
    last ones ran: restore_from(...).status, `dask-manymodel runs` and
    predict's check of its training took those marks for final (here
    PARTIAL_FAILURE) while the run went on."""
    from dask_manymodel import InvalidArgumentError
    from dask_manymodel.cli import main

    # one group per task; uneven, so that the scheduler hands the tasks out
    # largest first, and group 0's (the smallest, held) most often starts
    # last. Not always: it may start first, on the worker to which the p2p
    # shuffle pinned the other tasks' data; held aside, group 0 keeps none of
    # them waiting (they timed out the poll below 2-3 times in 40, before)
    frame = make_frame(n_groups=4, rows=40)
    frame = frame[(frame.store == 1) | (frame.index % 40 < 2 * (1 + frame.store))]
    ddf = dd.from_pandas(frame, npartitions=2)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(functools.partial(group_zero_held_aside, gate), by="store", url=store_url, run_id="r1",
                              execution_options=ExecutionOptions(npartitions=4))
    restored = ManyModelRun.restore_from("r1", store_url)
    try:
        # groups 1-3 DONE, group 0 running under its task's mark
        poll(lambda: [d.status.value for d in restored.partition_details.values()] == ["RUNNING"] + ["DONE"] * 3)
        assert restored.status == RunStatus.IN_PROGRESS
        assert "IN_PROGRESS" in repr(restored)
        capsys.readouterr()
        assert main(["runs", store_url]) == 0
        assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["r1", "train", "IN_PROGRESS"]
        with pytest.raises(InvalidArgumentError, match="training run 'r1' at .* is still in progress"):
            ddf.manymodel.predict(lambda data, model, ctx: None, by="store", url=store_url,
                                  training_run_id="r1", run_id="s1")
    finally:
        open(gate, "w").close()
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", store_url).status == RunStatus.SUCCESS


def _as_if_its_client_was_killed(url: str, run_id: str, unfinished: list[int]) -> None:
    """A finished run's files as a client killed while its tasks ran leaves
    them: ``_run.json`` IN_PROGRESS, and no status for ``unfinished`` groups."""
    import json

    folder = os.path.join(url, run_id)
    with open(os.path.join(folder, "_run.json")) as f:
        manifest = json.load(f)
    manifest.update(status="IN_PROGRESS", counts={}, finished=None)
    with open(os.path.join(folder, "_run.json"), "w") as f:
        json.dump(manifest, f)
    for group in unfinished:
        os.remove(os.path.join(folder, f"store={group}", "_partition.json"))


def _statuses_of(run) -> dict:
    summary = run.summary()
    return dict(zip(summary["partition_id"], summary["status"]))


def test_a_restored_run_in_progress_reads_only_its_unfinished_groups_again(finished, monkeypatch, capsys):
    """A handle restored while its run is in progress (restore_from, the
    CLI) read every group's status on each status, summary() and
    get_progress(): 2,000 GETs a look at a run of 2,000 groups on S3, and
    the first look read them all twice. A final outcome does not change
    until the run is started again, and that writes a new _run.json first."""
    from dask_manymodel.cli import main

    truth = _statuses_of(finished)
    _as_if_its_client_was_killed(finished.url, "r1", unfinished=[4, 9])
    restored = ManyModelRun.restore_from("r1", finished.url)
    reads = _counting_status_reads(monkeypatch)
    assert restored.status == RunStatus.IN_PROGRESS
    assert reads == [12]  # (read twice: [12, 12])
    assert restored.summary()["status"].value_counts().to_dict() == {"DONE": 9, "PENDING": 2, "FAILED": 1}
    assert {k: len(v) for k, v in restored.get_progress().items()} == {"DONE": 9, "FAILED": 1, "PENDING": 2}
    assert restored.status == RunStatus.IN_PROGRESS and restored.partition_details[4].status.value == "PENDING"
    assert reads == [12, 2, 2, 2, 1]  # (each read all 12)
    expected = {**truth, 4: "PENDING", 9: "PENDING"}
    assert _statuses_of(restored) == expected
    # show: one read (with the first look's group list read again: [12, 12, 12])
    del reads[:]
    capsys.readouterr()
    assert main(["show", finished.url, "r1"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(": IN_PROGRESS") and "PENDING" in out
    assert reads == [12]

    # a resume (here from this process; another's is the same): the handle
    # sees its new _run.json, and what it reruns, not the outcomes it kept
    again = finished.retry_failed()
    assert again.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    del reads[:]
    assert restored.status == RunStatus.PARTIAL_FAILURE
    assert _statuses_of(restored) == truth
    assert reads == [12]  # (ended: read once, then kept)


def test_a_restored_run_in_progress_sees_an_overwrite_or_a_resume_start(client, store_url, monkeypatch):
    """The final outcomes a restored handle keeps are dropped as soon as its
    run is started again: a resume's outcomes of the groups it reruns (gone
    while they run), and an overwrite's deletion of the run it had."""
    import json

    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    run = ddf.manymodel.train(broken_2, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    _as_if_its_client_was_killed(store_url, "r1", unfinished=[5])
    restored = ManyModelRun.restore_from("r1", store_url)
    assert _statuses_of(restored)[2] == "FAILED"
    # a resume that has written its _run.json and deleted the outcome of the
    # group it runs again, before its tasks start (as engine._start_run does)
    manifest_path = os.path.join(store_url, "r1", "_run.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    with open(manifest_path, "w") as f:
        json.dump(dict(manifest, submission="a-resume-elsewhere"), f)
    os.remove(os.path.join(store_url, "r1", "store=2", "_partition.json"))
    statuses = _statuses_of(restored)
    assert statuses[2] == "PENDING" and statuses[0] == "DONE", statuses
    # an overwrite: a new attempt, and the old run's statuses deleted
    with open(manifest_path, "w") as f:
        json.dump(dict(manifest, attempt="an-overwrite-elsewhere"), f)
    os.remove(os.path.join(store_url, "r1", "store=0", "_partition.json"))
    assert _statuses_of(restored)[0] == "PENDING"
    reads = _counting_status_reads(monkeypatch)
    restored.summary()
    assert reads == [6]  # another attempt's run: nothing kept
