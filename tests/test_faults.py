"""Nothing is lost under faults: killed workers, a flaky store, failing
functions, retries and resume, concurrent runs, interrupted overwrites,
groups too big for a worker."""

from __future__ import annotations

import collections
import dataclasses
import errno
import functools
import json
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from pathlib import Path

import dask
import dask.dataframe as dd
import distributed
import fsspec
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import (
    ExecutionOptions,
    InvalidArgumentError,
    ManyModelError,
    ManyModelRun,
    ManyModelTraining,
    ModelSerde,
    PartitionStatus,
    PickleSerde,
    RunExistsError,
    RunStatus,
    StorageError,
)
from dask_manymodel.engine import RunSpec, _run_was_superseded, _write_manifest, superseded_by
from dask_manymodel.store import RunStore

from . import flaky_fs
from .conftest import (
    announce_cancel_event,
    cancel_checked_before_every_group,
    fit_line,
    held_until_cancelled,
    hold_until_released,
    make_frame,
    out_of_the_thread_pool,
    poll,
    set_worker_env,
)


def generated_frame(n_groups: int, rows: int, npartitions: int = 4) -> dd.DataFrame:
    """make_frame() split into chunks generated on the workers (small graphs)."""
    chunks = np.array_split(np.arange(n_groups), npartitions)
    return dd.from_map(lambda groups: make_frame(n_groups, rows).query("store in @groups"), list(chunks))


def fit_holding_group_zero(gate_dir, data, ctx):
    """Group 0 says which process runs it, then waits for the test's gate:
    that worker is surely mid-run when the test kills it."""
    if ctx.partition_id == 0:
        with open(os.path.join(gate_dir, f"holder-{os.getpid()}"), "w"):
            pass
        hold_until_released(os.path.join(gate_dir, "release"))
    return fit_line(data, ctx)


def test_a_killed_worker_loses_nothing(tmp_path):
    url = str(tmp_path / "models")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster) as client:
        ddf = generated_frame(240, 5)
        gate_dir = str(tmp_path)
        run = ddf.manymodel.train(functools.partial(fit_holding_group_zero, gate_dir), by="store", url=url,
                                  run_id="r1", execution_options=ExecutionOptions(npartitions=8))

        def holder() -> list[str]:
            return [name for name in os.listdir(gate_dir) if name.startswith("holder-")]

        poll(holder, timeout=60)
        victim = int(holder()[0].split("-")[1])
        assert victim in client.run(os.getpid).values()
        os.kill(victim, signal.SIGKILL)
        open(os.path.join(gate_dir, "release"), "w").close()  # group 0 may finish, on the other worker
        assert run.wait(show_progress=False, timeout=180) == RunStatus.SUCCESS
        for g in range(240):
            np.testing.assert_allclose(run.get_model(g), [1 + g / 10, g], atol=1e-6)
    manifest = json.loads(Path(url, "r1", "_run.json").read_text())
    assert manifest["status"] == "SUCCESS" and manifest["counts"] == {"DONE": 240}
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.SUCCESS
    assert list(restored.get_progress()) == ["DONE"]


@pytest.fixture
def flaky():
    flaky_fs.register()


def test_transient_store_failures_are_retried(client, flaky, tmp_path):
    log = tmp_path / "failures.log"
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=60, rows=5), npartitions=3)
    run = ddf.manymodel.train(
        fit_line, by="store", url=url, run_id="r1",
        storage_options={"fail_rate": 0.1, "log_path": str(log)},
        execution_options=ExecutionOptions(storage_retries=6, storage_retry_backoff=0.001),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert log.read_text().count("transient") >= 3  # failures really happened
    for g in (0, 29, 59):
        np.testing.assert_allclose(run.get_model(g), [1 + g / 10, g], atol=1e-9)


def test_a_permanent_store_failure_is_an_internal_error(client, flaky, tmp_path):
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line, by="store", url=url, run_id="r1",
        storage_options={"fail_paths": ["store=3/model.pkl"]},
        execution_options=ExecutionOptions(storage_retries=2, storage_retry_backoff=0.001),
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    details = run.partition_details[3]
    assert details.status == "INTERNAL_ERROR"
    assert "failed after 3 attempts" in details.error and "injected permanent failure" in details.error
    assert not os.path.exists(tmp_path / "models" / "r1" / "store=3" / "model.pkl")
    assert [d.partition_id for d in run.get_progress()["DONE"]] == [0, 1, 2, 4, 5]


def test_a_model_that_could_not_be_written_counts_no_bytes(client, flaky, tmp_path):
    """Its group said the size of the model that is not there: the run's
    bytes (summary()["bytes"].sum()) counted a file that was never stored."""
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line, by="store", url=url, run_id="r1", storage_options={"fail_paths": ["store=3/model.pkl"]},
        execution_options=ExecutionOptions(storage_retries=0),
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    summary = run.summary().set_index("partition_id")
    assert summary.loc[3, "status"] == "INTERNAL_ERROR" and summary.loc[3, "bytes"] == 0
    stored = json.loads((tmp_path / "models" / "r1" / "store=3" / "_partition.json").read_text())
    assert stored["bytes"] == 0
    on_disk = sum(os.path.getsize(tmp_path / "models" / "r1" / f"store={g}" / "model.pkl") for g in (0, 1, 2))
    assert summary["bytes"].sum() == on_disk


def test_a_store_failure_before_the_tasks_start_marks_the_run_failed(client, flaky, tmp_path):
    """_run.json is written, then _groups.json fails: the run stayed
    IN_PROGRESS with no groups for good, and the error did not say that a
    run was left behind (the same call then met RunExistsError)."""
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    options = ExecutionOptions(storage_retries=1, storage_retry_backoff=0.001)
    with pytest.raises(StorageError, match=r"_groups.json failed after 2 attempts: .*; run 'r1' at .* was left "
                       r"unfinished \(no task started\); start it again with on_existing_artifacts='overwrite'"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", execution_options=options,
                            storage_options={"fail_paths": ["_groups.json"]})
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.FAILURE
    assert restored.manifest["error"].startswith("the run could not start: StorageError: writing")
    again = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="overwrite")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS

    # an overwrite whose deletion of the old files fails: the same
    with pytest.raises(StorageError, match=r"deleting the old files of .* failed after 2 attempts: .*was left "
                       r"unfinished"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", execution_options=options,
                            storage_options={"fail_rm": True}, on_existing_artifacts="overwrite")
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.FAILURE


def another_model(data, ctx):
    return "another model"


def test_a_status_that_cannot_be_read_is_an_error_not_a_group_never_run(client, flaky, tmp_path):
    """A group's _partition.json that is there but cannot be read (access
    denied) was read as missing: a restored SUCCESS run showed the group
    PENDING, get_model said "it is PENDING", and a resume trained it again
    over its stored model."""
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    assert ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False) == RunStatus.SUCCESS
    model = tmp_path / "models" / "r1" / "store=2" / "model.pkl"
    stored = model.read_bytes()
    denied = {"deny_reads": ["store=2/_partition.json"]}
    unreadable = (r"cannot read flaky://\S*/r1/store=2/_partition.json of run 'r1' at .*: PermissionError: .*"
                  r"Permission denied.*the file is there, so the group's outcome is not known .* Make the "
                  r"file readable")
    restored = ManyModelRun.restore_from("r1", url, storage_options=denied)
    with pytest.raises(StorageError, match=unreadable):
        restored.get_progress()
    with pytest.raises(StorageError, match=unreadable):
        restored.get_model(2)
    with pytest.raises(StorageError, match=unreadable):
        ddf.manymodel.train(another_model, by="store", url=url, run_id="r1", on_existing_artifacts="resume",
                            storage_options=denied)
    assert model.read_bytes() == stored  # not trained again
    again = ManyModelRun.restore_from("r1", url)  # readable again: as it was
    assert again.status == RunStatus.SUCCESS and len(again.get_progress()["DONE"]) == 6
    np.testing.assert_allclose(again.get_model(2), [1.2, 2], atol=1e-9)


def test_a_final_status_the_store_refuses_is_said_once_with_what_to_do(client, tmp_path, caplog, monkeypatch):
    """The disk filled up (or turned read-only) after the groups were
    stored, before the final _run.json: the log said "collecting the results
    failed" with two tracebacks (the write tried twice over), and not what
    storage now shows or how to record the run."""
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    write_json = RunStore.write_json

    def disk_full_at_the_end(self, path, data, **kwargs):  # the client's final write only
        if path.endswith("/_run.json") and data.get("status") != "IN_PROGRESS":
            raise StorageError(f"writing {path} failed after 4 attempts: [Errno 28] No space left on device")
        return write_json(self, path, data, **kwargs)

    monkeypatch.setattr(RunStore, "write_json", disk_full_at_the_end)
    with caplog.at_level(logging.WARNING, "dask_manymodel"):
        run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("collecting the results" in m for m in messages)
    [warning] = [m for m in messages if "final status" in m]
    assert f"run 'r1' ended SUCCESS, but its final status could not be written to {url}/r1/_run.json" in warning
    assert "No space left on device" in warning and "on_existing_artifacts='resume'" in warning
    stored = json.loads((tmp_path / "models" / "r1" / "_run.json").read_text())
    assert stored["status"] == "IN_PROGRESS"
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.SUCCESS  # from the groups, as said
    monkeypatch.undo()  # space again: the resume the warning names records the run
    again = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS
    assert json.loads((tmp_path / "models" / "r1" / "_run.json").read_text())["status"] == "SUCCESS"


def group_0_fails(data, ctx):
    if ctx.partition_id == 0:
        raise ValueError("group 0 is bad")
    return len(data)


def test_a_status_its_task_could_not_write_is_written_as_the_run_ends(client, flaky, tmp_path):
    """Group 0 failed, and the store failed as its task wrote the FAILED
    status: the handle said INTERNAL_ERROR, but storage kept the RUNNING mark
    the task writes before its first group, so that restore_from and the CLI
    showed the ended run's group 0 RUNNING for good (and a group with no
    mark PENDING), where _run.json counted it INTERNAL_ERROR. The client
    writes such statuses as the run ends."""
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    # writes of group 0's status: 1 the task's mark, 2 its batch, 3 the batch's
    # file again alone (after which the task gives up), 4 the client's
    storage_options = {"fail_nth": {"store=0/_partition.json": [2, 3]}, "count_dir": str(tmp_path)}
    run = ddf.manymodel.train(
        group_0_fails, by="store", url=url, run_id="r1", storage_options=storage_options,
        execution_options=ExecutionOptions(npartitions=1, storage_retries=0),
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    live = run.summary().set_index("partition_id")
    assert live["status"].to_dict() == {0: "INTERNAL_ERROR", 1: "DONE", 2: "DONE", 3: "DONE"}
    # with what became of the group: the user's error, which the write's took the place of
    assert live.loc[0, "error"].startswith(
        "could not write the status of group store=0 (it had ended FAILED: ValueError: group 0 is bad): writing "
    )
    assert "injected failure" in live.loc[0, "error"]
    stored = json.loads((tmp_path / "models" / "r1" / "store=0" / "_partition.json").read_text())
    assert stored["status"] == "INTERNAL_ERROR" and stored["attempt"] == run.manifest["attempt"]
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.summary().set_index("partition_id")[["status", "error"]].equals(live[["status", "error"]])
    assert restored.manifest["counts"] == {"DONE": 3, "INTERNAL_ERROR": 1}
    assert "injected failure writing" in restored.partition_details[0].traceback
    again = run.retry_failed()
    assert again.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert again.partition_details[0].status == PartitionStatus.FAILED
    assert again.partition_details[0].error == "ValueError: group 0 is bad"


def test_statuses_cut_short_by_a_full_disk_are_one_warning(client, tmp_path, caplog):
    """A disk that fills up mid-run cuts short the status of every group
    that finishes after (they are written without a rename): each read of
    the run logged one warning per such file, thousands of lines a read."""
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    assert ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False) == RunStatus.SUCCESS
    for group in (1, 3, 4):
        status = tmp_path / "models" / "r1" / f"store={group}" / "_partition.json"
        status.write_bytes(status.read_bytes()[:20])
    with caplog.at_level(logging.WARNING, "dask_manymodel"):
        progress = ManyModelRun.restore_from("r1", url).get_progress()
    assert [d.partition_id for d in progress["DONE"]] == [0, 2, 5]
    assert [d.partition_id for d in progress["PENDING"]] == [1, 3, 4]  # as not run: no model trusted
    [warning] = [r.getMessage() for r in caplog.records if "status file" in r.getMessage()]
    assert warning.startswith("ignoring 3 status file(s) that are not JSON, such as ")
    assert "_partition.json: cut short (a full disk" in warning


def test_get_model_of_a_run_on_local_disk_needs_no_room_in_the_temp_folder(client, tmp_path, monkeypatch):
    """The models on a big shared disk, the client's temp folder a small
    one (a login node's /tmp): get_model copied each model there first, and
    failed with "downloading ... failed after 4 attempts: [Errno 28] No
    space left on device" for a model it could read where it is."""
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=3, rows=5), npartitions=1)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS

    def temp_folder_full(self, path, local_path):
        raise StorageError(f"downloading {path} failed after 4 attempts: [Errno 28] No space left on device")

    monkeypatch.setattr(RunStore, "download_file", temp_folder_full)
    for handle in (run, ManyModelRun.restore_from("r1", url)):
        np.testing.assert_allclose(handle.get_model(2), [1.2, 2], atol=1e-9)
    os.remove(tmp_path / "models" / "r1" / "store=1" / "model.pkl")
    with pytest.raises(ManyModelError, match=r"group 1 of run 'r1' is DONE, but its model file .*/r1/store=1/"
                       r"model.pkl is missing"):
        run.get_model(1)


class LoadsAFileOfItsOwn:
    """A model that opens a file of its own as it is unpickled (a
    vocabulary, a lookup table saved beside the code)."""

    def __init__(self, path):
        self.path = path

    def __setstate__(self, state):
        self.__dict__.update(state)
        with open(self.path) as f:
            self.table = f.read()


def test_get_model_says_which_file_the_models_own_loading_misses(client, tmp_path):
    """A FileNotFoundError of the model's own unpickling was said as the
    model file missing ("is DONE, but its model file .../model.pkl is
    missing (deleted since?)"; in a predict, "model file .../model.pkl is
    missing"), with the model file there."""
    url = str(tmp_path / "models")
    table = tmp_path / "table.txt"
    table.write_text("a b c")
    ddf = dd.from_pandas(make_frame(n_groups=2, rows=5), npartitions=1)
    run = ddf.manymodel.train(functools.partial(keeps_a_table, str(table)), by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", url).get_model(1).table == "a b c"
    table.unlink()
    with pytest.raises(FileNotFoundError, match="table.txt") as raised:
        ManyModelRun.restore_from("r1", url).get_model(1)
    assert not isinstance(raised.value, ManyModelError)
    # a predict's group said the same: "model file .../model.pkl is missing"
    inf = ddf.manymodel.predict(predict_nothing, by="store", url=url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    error = inf.partition_details[1].error
    assert "PickleSerde could not read model file" in error and "table.txt" in error, error
    assert "is missing" not in error


def keeps_a_table(path, data, ctx):
    return LoadsAFileOfItsOwn(path)


def predict_nothing(data, model, ctx):
    return None


class DiskFullSerde(PickleSerde):
    """Writes a file (not in memory, as TorchSerde and TensorFlowSerde do);
    the disk fills up half-way through."""

    def write(self, model, file_path):
        with open(file_path, "wb") as f:
            f.write(b"half a model")
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_disk_that_fills_up_while_a_serde_writes_is_an_internal_error(client, tmp_path):
    """A serde that writes a file, on a full disk: the group was FAILED,
    "DiskFullSerde could not write the model of group 0 (a numpy.ndarray)",
    blaming the model, and no word of where."""
    url = str(tmp_path / "models")
    ddf = dd.from_pandas(make_frame(n_groups=2, rows=5), npartitions=1)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=DiskFullSerde(),
                              execution_options=ExecutionOptions(storage_retries=0))
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    details = run.partition_details[0]
    assert details.status == "INTERNAL_ERROR"
    assert re.search(r"DiskFullSerde could not write the model of group 0 to \S*/r1/store=0/\.tmp-\S*model.pkl: "
                     r"OSError: \[Errno 28\] No space left on device; that disk is full .*free space there, then "
                     r"run the group again \(run.retry_failed\(\)", details.error)
    assert sorted(os.listdir(tmp_path / "models" / "r1" / "store=0")) == ["_partition.json"]  # nothing half-written


def test_a_full_disk_a_writer_wraps_in_its_own_error_is_told_from_the_room_left(tmp_path, monkeypatch):
    """torch.save on a full disk raises RuntimeError("... unexpected pos
    1600 vs 1494"), with no OSError to say why."""
    from dask_manymodel import engine

    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1600 vs 1494")
    path = str(tmp_path / ".tmp-1-model.pt")
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**30, 2**30, 0))
    assert engine._disk_refused(torch_error, path)
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(2**30, 0, 2**30))
    assert not engine._disk_refused(torch_error, path)  # room left: the model's (or the serde's) fault
    assert engine._disk_refused(OSError(errno.EDQUOT, "Disk quota exceeded"), path)
    wrapped = RuntimeError("could not save")
    wrapped.__cause__ = OSError(errno.EROFS, "Read-only file system")
    assert engine._disk_refused(wrapped, path)
    looped_a, looped_b = ValueError("a"), ValueError("b")  # raise a from b, b from a: a chain that loops
    looped_a.__cause__, looped_b.__cause__ = looped_b, looped_a
    assert not engine._disk_refused(looped_a, path)  # ends (room left), not a loop for ever


def fails_odd_groups(data, ctx):
    if ctx.partition_id % 2:
        raise ValueError(f"group {ctx.partition_id} fails")
    return fit_line(data, ctx)


def test_a_resume_whose_start_fails_keeps_its_done_groups_and_says_to_resume(client, flaky, tmp_path):
    """It marked the run FAILURE ("no group DONE") with 3 DONE groups kept,
    and advised on_existing_artifacts='overwrite', which throws them away."""
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    run = ddf.manymodel.train(fails_odd_groups, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    options = ExecutionOptions(storage_retries=0)
    with pytest.raises(StorageError, match=r"no task started\); start it again with on_existing_artifacts="
                       r"'resume' \(or run.retry_failed\(\)\), which keeps its 3 DONE groups"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume",
                            execution_options=options, storage_options={"fail_paths": ["_groups.json"]})
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.PARTIAL_FAILURE
    assert restored.manifest["counts"] == {"DONE": 3}
    assert restored.manifest["error"].startswith("the run could not start: StorageError")
    again = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS


def fail_first_attempt(data, ctx):
    """Fails the first time each of groups 0, 10, 20, ... runs (marker files count attempts)."""
    marker = os.path.join(os.environ["MANYMODEL_TEST_MARKERS"], f"{ctx.partition_id}")
    if ctx.partition_id % 10 == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError(f"flaky group {ctx.partition_id}")
    return fit_line(data, ctx)


def test_max_retries_reruns_failing_groups(client, tmp_path, monkeypatch):
    markers = tmp_path / "markers"
    markers.mkdir()
    set_worker_env(client, "MANYMODEL_TEST_MARKERS", str(markers))
    ddf = dd.from_pandas(make_frame(n_groups=30, rows=5), npartitions=3)
    run = ddf.manymodel.train(
        fail_first_attempt, by="store", url=str(tmp_path / "m"), run_id="r1",
        execution_options=ExecutionOptions(max_retries=1),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    attempts = run.summary().set_index("partition_id")["attempts"]
    assert attempts[[0, 10, 20]].tolist() == [2, 2, 2] and attempts[5] == 1
    # DONE on its second attempt: nothing of the first one's error is kept
    retried = ManyModelRun.restore_from("r1", str(tmp_path / "m")).partition_details[10]
    assert (retried.status, retried.error, retried.traceback) == ("DONE", None, None)
    assert run.summary()["error"].isna().all()


def fail_group_zero_hold_the_others(folder, data, ctx):
    """Group 0 fails; every other group waits until the run is cancelled,
    out of its worker's thread pool: group 0's task may be queued behind it
    on the same worker, or need the output of a p2p shuffle pinned there
    (a gate that held the others in their thread deadlocked once in CI)."""
    if ctx.partition_id == 0:
        raise ValueError("group 0 is broken")
    with out_of_the_thread_pool():
        return held_until_cancelled(folder, data, ctx)


def test_fail_fast_cancels_the_rest(client, tmp_path):
    """A group that fails stops the run's other tasks at their next group.

    Group 0 is alone in its task (it has more rows than all the others
    together), the others wait for the cancel: the other task runs at most
    the one group it was in when group 0 failed. Left free, the other task
    ran all its 30 groups now and then before group 0's task even started
    (3 runs in 40): which worker starts first is not fixed."""
    pdf = make_frame(n_groups=60, rows=5)
    pdf = pd.concat([pdf[pdf["store"] == 0]] * 100 + [pdf[pdf["store"] > 0]], ignore_index=True)
    ddf = dd.from_pandas(pdf, npartitions=2)
    gates = tmp_path / "gates"
    gates.mkdir()
    # the workers ask whether the run was cancelled before every group, not
    # every half second: the groups after the held one see the cancel
    with cancel_checked_before_every_group(client):
        run = ddf.manymodel.train(
            functools.partial(fail_group_zero_hold_the_others, str(gates)), by="store", url=str(tmp_path / "m"),
            run_id="r1", execution_options=ExecutionOptions(fail_fast=True, npartitions=2),
        )
        announce_cancel_event(gates, run)
        status = run.wait(show_progress=False)
    progress = {outcome: len(groups) for outcome, groups in run.get_progress().items()}
    assert [d.partition_id for d in run.get_progress()["FAILED"]] == [0]
    # the other task's group held when group 0 failed ends DONE, unless that
    # task started after the cancel; none after it runs
    assert progress in ({"FAILED": 1, "DONE": 1, "CANCELLED": 58}, {"FAILED": 1, "CANCELLED": 59}), progress
    assert status == (RunStatus.PARTIAL_FAILURE if "DONE" in progress else RunStatus.FAILURE)
    ran = sorted(name for name in os.listdir(gates) if name.startswith("running-"))
    assert len(ran) == progress.get("DONE", 0), ran


def fail_when_flag(data, ctx):
    if os.path.exists(os.environ["MANYMODEL_TEST_FLAG"]) and ctx.partition_id % 10 == 3:
        raise RuntimeError(f"group {ctx.partition_id} failed this time")
    return fit_line(data, ctx)


def first_pass_failing_3_13_23(client, tmp_path, train, frame: pd.DataFrame):
    """Run ``train`` while the flag file exists (groups 3, 13, 23 fail);
    returns the run, the flag and the URL."""
    flag = tmp_path / "flag"
    flag.touch()
    set_worker_env(client, "MANYMODEL_TEST_FLAG", str(flag))
    url = str(tmp_path / "m")
    run = dd.from_pandas(frame, npartitions=3).manymodel.train(train, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    return run, flag, url


def test_retry_failed_and_resume_touch_only_groups_not_done(client, tmp_path):
    frame = make_frame(n_groups=30, rows=5)
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_when_flag, frame)
    ddf = dd.from_pandas(frame, npartitions=3)
    failed = sorted(d.partition_id for d in run.get_progress()["FAILED"])
    assert failed == [3, 13, 23]
    mtimes = {g: os.stat(os.path.join(url, "r1", f"store={g}", "model.pkl")).st_mtime_ns for g in (0, 5, 29)}

    flag.unlink()
    retried = run.retry_failed()
    # the 27 kept DONE records, compact as a task's (as stored, ~2.5x train's
    # client memory at 200,000 groups): no attempt, submission or timestamps
    kept = [retried._records[f"store={g}"] for g in (0, 5, 29)]
    assert all(record.get("attempt") is None and record.get("finished") is None for record in kept)
    assert retried.wait(show_progress=False) == RunStatus.SUCCESS
    assert len(retried.partition_details) == 30
    for g, mtime in mtimes.items():
        assert os.stat(os.path.join(url, "r1", f"store={g}", "model.pkl")).st_mtime_ns == mtime
    np.testing.assert_allclose(retried.get_model(13), [2.3, 13], atol=1e-9)
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.SUCCESS

    # resume through the class API after a restore: nothing left to do
    flag.touch()  # would fail groups 3, 13, 23 again if they were re-run
    resumed = ManyModelTraining(fail_when_flag, stage_name=url).run(
        partition_by="store", dataframe=ddf, run_id="r1", on_existing_artifacts="resume"
    )
    assert resumed.wait(show_progress=False) == RunStatus.SUCCESS
    assert os.stat(os.path.join(url, "r1", "store=0", "model.pkl")).st_mtime_ns == mtimes[0]


def say_which_pass(data, ctx):
    flagged = os.path.exists(os.environ["MANYMODEL_TEST_FLAG"])
    print("first pass" if flagged else "second pass")
    if flagged and ctx.partition_id % 10 == 3:
        raise RuntimeError(f"group {ctx.partition_id} failed this time")
    return fit_line(data, ctx)


def test_a_handle_shows_no_text_of_a_later_pass(client, tmp_path):
    """After retry_failed(), the first handle's FAILED group showed the
    second pass's logs (its status file is the second pass's now)."""
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, say_which_pass, make_frame(n_groups=30, rows=5))
    flag.unlink()
    retried = run.retry_failed()
    assert retried.wait(show_progress=False) == RunStatus.SUCCESS
    first = run.partition_details[3]
    assert first.status == PartitionStatus.FAILED and first.logs == "" and first.traceback is None
    for handle in (retried, ManyModelRun.restore_from("r1", url)):
        details = handle.partition_details
        assert details[3].logs == "second pass\n" and details[0].logs == "first pass\n"  # kept DONE


def fail_once_then_hold(data, ctx):
    """Groups 3, 13, 23 fail while the flag exists; run again, they wait
    for the release file."""
    if ctx.partition_id % 10 == 3:
        if os.path.exists(os.environ["MANYMODEL_TEST_FLAG"]):
            raise RuntimeError(f"group {ctx.partition_id} failed this time")
        hold_until_released(os.environ["MANYMODEL_TEST_FLAG"] + "-release")
    return fit_line(data, ctx)


def test_while_failed_groups_run_again_a_reader_sees_the_run_in_progress(client, tmp_path, monkeypatch):
    """The first pass's FAILED statuses belong to the same attempt: a reader
    took them for the retry's and called the retried run PARTIAL_FAILURE
    while its groups still ran."""
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_once_then_hold, make_frame(n_groups=30, rows=5))
    flag.unlink()
    # and at the moment the retry's _run.json is written (its stale statuses
    # were deleted after it, and a reader then saw PARTIAL_FAILURE)
    seen = []
    write_bytes = RunStore.write_bytes

    def read_when_the_manifest_is_written(store, path, data, **kwargs):
        write_bytes(store, path, data, **kwargs)
        if path.endswith("_run.json") and json.loads(data)["status"] == "IN_PROGRESS":
            seen.append(ManyModelRun.restore_from("r1", url).status)

    monkeypatch.setattr(RunStore, "write_bytes", read_when_the_manifest_is_written)
    retried = run.retry_failed()
    monkeypatch.undo()
    try:
        assert seen == [RunStatus.IN_PROGRESS]
        restored = ManyModelRun.restore_from("r1", url)
        assert restored.status == RunStatus.IN_PROGRESS
        assert sorted(d.partition_id for d in restored.get_progress()["PENDING"]) == [3, 13, 23]
        assert len(restored.get_progress()["DONE"]) == 27
    finally:
        (tmp_path / "flag-release").touch()
    assert retried.wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.SUCCESS


def restored_as_while_it_ran(url: str) -> ManyModelRun:
    """A handle of run r1 (ended) restored as if while it ran: from its
    _run.json saying IN_PROGRESS, which is then put back as it was."""
    path = os.path.join(url, "r1", "_run.json")
    with open(path) as f:
        ended = f.read()
    with open(path, "w") as f:
        json.dump({**json.loads(ended), "status": "IN_PROGRESS", "finished": None}, f)
    watcher = ManyModelRun.restore_from("r1", url)
    with open(path, "w") as f:
        f.write(ended)
    return watcher


def test_a_handle_restored_while_a_run_ran_sees_its_resume_end(client, tmp_path):
    """Restored while the first pass ran, a handle kept that pass's
    _run.json: the retry's FAILED statuses (another start's) were skipped,
    and it said IN_PROGRESS for ever."""
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_when_flag, make_frame(n_groups=30, rows=5))
    watcher = restored_as_while_it_ran(url)
    retried = run.retry_failed()  # the flag is there: 3, 13 and 23 fail again
    assert retried.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert watcher.status == RunStatus.PARTIAL_FAILURE
    assert sorted(d.partition_id for d in watcher.get_progress()["FAILED"]) == [3, 13, 23]


def test_a_handle_restored_before_a_resume_catches_up_with_its_groups(client, tmp_path, monkeypatch):
    """Restored while the first pass ran and read again between the resume's
    _run.json and its _groups.json, a handle kept the first pass's groups for
    good: the resume's new group missing (get_model: not found), the kept
    FAILED one hidden, IN_PROGRESS after the end."""
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_once_then_hold, make_frame(n_groups=30, rows=5))
    flag.unlink()
    watcher = restored_as_while_it_ran(url)
    write_bytes = RunStore.write_bytes

    def read_when_the_manifest_is_written(store, path, data, **kwargs):
        write_bytes(store, path, data, **kwargs)
        if path.endswith("_run.json") and json.loads(data)["status"] == "IN_PROGRESS":
            watcher.status  # in the window before the resume's _groups.json

    monkeypatch.setattr(RunStore, "write_bytes", read_when_the_manifest_is_written)
    changed = dd.from_pandas(make_frame(n_groups=31, rows=5).query("store != 23"), npartitions=3)
    resumed = changed.manymodel.train(fail_once_then_hold, by="store", url=url, run_id="r1",
                                      on_existing_artifacts="resume")
    monkeypatch.undo()
    try:
        progress = {k: sorted(d.partition_id for d in v) for k, v in watcher.get_progress().items() if k != "DONE"}
        assert progress == {"PENDING": [3, 13, 30], "FAILED": [23]}
    finally:
        (tmp_path / "flag-release").touch()
    assert resumed.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert watcher.status == RunStatus.PARTIAL_FAILURE and len(watcher.summary()) == 31
    np.testing.assert_allclose(watcher.get_model(30), [4.0, 30], atol=1e-9)


def test_a_group_no_longer_in_the_data_keeps_its_outcome_while_a_resume_runs(client, tmp_path):
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_once_then_hold, make_frame(n_groups=30, rows=5))
    flag.unlink()
    without_23 = dd.from_pandas(make_frame(n_groups=30, rows=5).query("store != 23"), npartitions=3)
    resumed = without_23.manymodel.train(fail_once_then_hold, by="store", url=url, run_id="r1",
                                         on_existing_artifacts="resume")
    try:
        restored = ManyModelRun.restore_from("r1", url)
        progress = restored.get_progress()
        assert restored.status == RunStatus.IN_PROGRESS
        assert sorted(d.partition_id for d in progress["PENDING"]) == [3, 13]
        assert [d.partition_id for d in progress["FAILED"]] == [23]
    finally:
        (tmp_path / "flag-release").touch()
    assert resumed.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE


def test_a_resume_that_cannot_start_keeps_the_earlier_outcomes(client, tmp_path, monkeypatch):
    """A version that deleted the earlier pass's FAILED statuses before
    writing the resume's _run.json lost their errors and tracebacks when
    that write failed (the groups then PENDING in a PARTIAL_FAILURE run)."""
    run, flag, url = first_pass_failing_3_13_23(client, tmp_path, fail_when_flag, make_frame(n_groups=30, rows=5))
    write_bytes = RunStore.write_bytes

    def refuse_the_resumes_manifest(store, path, data, **kwargs):
        if path.endswith("_run.json") and json.loads(data)["status"] == "IN_PROGRESS":
            raise PermissionError("the store refuses this write")
        write_bytes(store, path, data, **kwargs)

    monkeypatch.setattr(RunStore, "write_bytes", refuse_the_resumes_manifest)
    with pytest.raises(ManyModelError):
        run.retry_failed()
    monkeypatch.undo()
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.PARTIAL_FAILURE
    failed = restored.get_progress()["FAILED"]
    assert sorted(d.partition_id for d in failed) == [3, 13, 23]
    assert all("failed this time" in d.error and "RuntimeError" in d.traceback for d in failed)


def test_a_resume_with_no_group_left_to_run_ends_with_the_stored_outcomes(client, tmp_path):
    """The failed group is no longer in the data: nothing runs, and the run
    is final at once (it stayed IN_PROGRESS for good)."""
    frame = make_frame(n_groups=6, rows=5)
    _, _, url = first_pass_failing_3_13_23(client, tmp_path, fail_when_flag, frame)
    without_3 = dd.from_pandas(frame[frame.store != 3], npartitions=2)
    resumed = without_3.manymodel.train(fail_when_flag, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    assert resumed.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    stored = json.loads(Path(url, "r1", "_run.json").read_text())
    assert (stored["status"], stored["counts"]) == ("PARTIAL_FAILURE", {"DONE": 5, "FAILED": 1})
    assert stored["finished"] is not None
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.PARTIAL_FAILURE


def test_a_resume_whose_data_lacks_a_group_never_run_is_no_success(client, tmp_path, capsys):
    """Its earlier start was killed before group 5 ran (no status), and the
    data resumed with has no group 5: nothing runs it. The run said SUCCESS,
    with group 5 PENDING in its summary and _run.json's counts one group
    short; the same resume with no group left to run said PARTIAL_FAILURE."""
    frame = make_frame(n_groups=6, rows=5)
    _, _, url = first_pass_failing_3_13_23(client, tmp_path, fail_when_flag, frame)
    # what a client killed before group 5 ran leaves
    os.remove(os.path.join(url, "r1", "store=5", "_partition.json"))
    manifest = json.loads(Path(url, "r1", "_run.json").read_text())
    Path(url, "r1", "_run.json").write_text(json.dumps({**manifest, "status": "IN_PROGRESS", "counts": {}}))
    Path(os.environ["MANYMODEL_TEST_FLAG"]).unlink()  # group 3 runs DONE now
    without_5 = dd.from_pandas(frame[frame.store != 5], npartitions=2)
    resumed = without_5.manymodel.train(fail_when_flag, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    capsys.readouterr()
    assert resumed.wait(show_progress=True) == RunStatus.PARTIAL_FAILURE
    assert resumed.get_progress()["PENDING"][0].partition_id == 5
    # the bar counts the groups that ran (it said 100%, 6/6)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "5/6" in final and final.endswith("1 PENDING, 5 DONE]"), final
    stored = json.loads(Path(url, "r1", "_run.json").read_text())
    assert (stored["status"], stored["counts"]) == ("PARTIAL_FAILURE", {"PENDING": 1, "DONE": 5})
    assert sum(stored["counts"].values()) == stored["n_groups"] == 6
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.PARTIAL_FAILURE


def test_a_resume_with_no_group_left_to_run_and_a_group_never_run_is_no_success(client, tmp_path):
    """As above, with every group of the data DONE already, so that nothing
    runs (the run ends at its start): it said SUCCESS, its counts one group
    short of n_groups."""
    frame = make_frame(n_groups=6, rows=5)
    url = str(tmp_path / "m")
    run = dd.from_pandas(frame, npartitions=2).manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    # what a client killed before group 5 ran leaves
    os.remove(os.path.join(url, "r1", "store=5", "_partition.json"))
    manifest = json.loads(Path(url, "r1", "_run.json").read_text())
    Path(url, "r1", "_run.json").write_text(json.dumps({**manifest, "status": "IN_PROGRESS", "counts": {}}))
    without_5 = dd.from_pandas(frame[frame.store != 5], npartitions=2)
    resumed = without_5.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    assert resumed.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    stored = json.loads(Path(url, "r1", "_run.json").read_text())
    assert (stored["status"], stored["counts"]) == ("PARTIAL_FAILURE", {"DONE": 5, "PENDING": 1})
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.PARTIAL_FAILURE


class JsonSerde(ModelSerde):
    filename = "model.json"

    def write(self, model, file_path):
        with open(file_path, "w") as f:
            json.dump(list(model), f)

    def read(self, file_path):
        with open(file_path) as f:
            return json.load(f)


def constant_a(data, ctx):
    return "A"


def constant_b(data, ctx):
    return "B"


def predict_constant(data, model, ctx):
    return data.to_pandas().assign(model=model)


def test_a_resume_must_write_what_its_done_groups_were_written_with(client, tmp_path):
    """Another serde would leave the DONE models unreadable; another training
    run, or one trained again since, would mix two sets of models."""
    url = str(tmp_path / "m")
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    before = Path(url, "r1", "_run.json").read_text()
    with pytest.raises(InvalidArgumentError, match=r"cannot resume run 'r1' with serde JsonSerde\(filename="
                       r"'model.json'\): its DONE groups were written with dask_manymodel.serde.PickleSerde"
                       r"\(filename='model.pkl'\); resume it as it was started"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=JsonSerde(), on_existing_artifacts="resume")
    assert Path(url, "r1", "_run.json").read_text() == before

    for run_id, function in (("a", constant_a), ("b", constant_b)):
        ddf.manymodel.train(function, by="store", url=url, run_id=run_id).wait(show_progress=False)
    scores = ddf.manymodel.predict(predict_constant, by="store", url=url, training_run_id="a", run_id="p")
    assert scores.wait(show_progress=False) == RunStatus.SUCCESS
    with pytest.raises(InvalidArgumentError, match="with training_run_id 'b': its DONE groups used the models "
                       "of training run 'a'"):
        ddf.manymodel.predict(predict_constant, by="store", url=url, training_run_id="b", run_id="p",
                              on_existing_artifacts="resume")
    ddf.manymodel.train(constant_b, by="store", url=url, run_id="a", on_existing_artifacts="overwrite").wait(
        show_progress=False
    )
    with pytest.raises(InvalidArgumentError, match="training run 'a' was trained again since"):
        ddf.manymodel.predict(predict_constant, by="store", url=url, training_run_id="a", run_id="p",
                              on_existing_artifacts="resume")
    assert set(scores.to_dask_dataframe().compute()["model"]) == {"A"}


def last_group_held(gate, data, ctx):
    """Group 9, the last of its task, waits for the test's gate."""
    if ctx.partition_id == 9:
        hold_until_released(gate)
    return fit_line(data, ctx)


def test_finished_groups_reach_storage_while_a_slow_group_runs(client, tmp_path):
    """A batch of statuses is written at the latest half a second after its
    first group finished, also while the next group still runs (they waited
    for it: a killed client then left them unwritten)."""
    url, gate = str(tmp_path / "m"), str(tmp_path / "release")
    ddf = dd.from_pandas(make_frame(n_groups=10, rows=5), npartitions=1)
    run = ddf.manymodel.train(
        functools.partial(last_group_held, gate), by="store", url=url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=1),
    )
    try:
        def nine_done_in_storage() -> bool:
            return len(ManyModelRun.restore_from("r1", url).get_progress().get("DONE", [])) == 9

        poll(nine_done_in_storage, timeout=20)
        assert ManyModelRun.restore_from("r1", url).status == RunStatus.IN_PROGRESS
    finally:
        open(gate, "w").close()
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert len(ManyModelRun.restore_from("r1", url).get_progress()["DONE"]) == 10


def exit_in_group_3(data, ctx):
    """Group 3 takes its worker process down, every time it is tried."""
    if ctx.partition_id == 3:
        os._exit(1)
    return fit_line(data, ctx)


def test_a_group_that_kills_every_worker_it_runs_on_fails_alone(tmp_path):
    """Dask tries the task on one worker after another; each dies. The run's
    spec must outlive them all: scattered to the workers, it was lost with
    the last one that held it, and every task of the run not yet finished
    was cancelled with it ("already forgotten"). Group 3 is the first of its
    task: the first try's mark of its first group names it to the next."""
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        # no shuffle, so that nothing but the dead workers' own tasks is redone:
        # 4 partitions of 3 whole groups each, read as they are
        ddf = dd.from_pandas(make_frame(n_groups=12, rows=5), npartitions=4)
        run = ddf.manymodel.train(
            exit_in_group_3, by="store", url=str(tmp_path), run_id="r1",
            execution_options=ExecutionOptions(shuffle="never"),
        )
        assert run.wait(timeout=240, show_progress=False) == RunStatus.PARTIAL_FAILURE
        details = run.partition_details
        lost = sorted(g for g, d in details.items() if d.status != PartitionStatus.DONE)
        assert lost == [3], lost
        assert details[3].status == PartitionStatus.FAILED and "died while the group ran" in details[3].error


def store_down_as_the_first_group_runs(folder, data, model, ctx):
    """A predict function: the first group to run takes the store down (the
    file ``down``, see flaky_fs), notes its id in ``held`` and waits, out of
    its worker's thread pool, for the file ``gate``; so the next task to
    start on the worker cannot read the training run, and fails whole."""
    try:
        os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return data.to_pandas().assign(pred=model)
    open(os.path.join(folder, "down"), "w").close()
    with open(os.path.join(folder, "held.staged"), "w") as f:
        f.write(json.dumps(ctx.partition_id))
    os.replace(os.path.join(folder, "held.staged"), os.path.join(folder, "held"))
    with out_of_the_thread_pool():
        hold_until_released(os.path.join(folder, "gate"))
    return data.to_pandas().assign(pred=model)


def test_a_lost_task_whose_statuses_cannot_be_read_then_ends_no_other_task(flaky, tmp_path):
    """A task was lost while the store was down, so the client could not
    read what it had stored: the handle gave the whole run up at once.
    wait() returned while the other tasks still ran, every group
    INTERNAL_ERROR ("could not collect"), and those tasks went on to store
    their groups DONE under a _run.json left IN_PROGRESS for good. Now the
    lost task is read again once the others have ended."""
    folder = tmp_path / "notes"
    folder.mkdir()
    url = f"flaky://{tmp_path}/models"
    log = tmp_path / "failures.log"
    options = {"down_while": str(folder / "down"), "log_path": str(log)}
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    # one worker thread: the tasks start one after the other
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        assert ddf.manymodel.train(count_rows, by="store", url=url, run_id="t1", storage_options=options).wait(
            show_progress=False) == RunStatus.SUCCESS
        run = ddf.manymodel.predict(
            functools.partial(store_down_as_the_first_group_runs, str(folder)), by="store", url=url,
            training_run_id="t1", run_id="p1", storage_options=options,
            execution_options=ExecutionOptions(npartitions=2, task_retries=0, storage_retries=1,
                                               storage_retry_backoff=0.001),
        )
        # the client tried to read what the lost task stored, with the store down
        poll(lambda: log.exists() and "/p1/store=" in log.read_text(), timeout=60)
        assert run.status == RunStatus.IN_PROGRESS  # the held group's task still runs
        (folder / "down").unlink()
        (folder / "gate").touch()
        assert run.wait(timeout=120, show_progress=False) == RunStatus.PARTIAL_FAILURE
    held = json.loads((folder / "held").read_text())
    task_of = {g["partition_id"]: g["task"] for g in run._groups}
    live = run.summary().set_index("partition_id")["status"].to_dict()
    assert live == {g: "DONE" if task_of[g] == task_of[held] else "INTERNAL_ERROR" for g in range(4)}
    lost = [g for g in range(4) if live[g] == "INTERNAL_ERROR"]
    assert "was lost with the task running it: StorageError: cannot read" in run.partition_details[lost[0]].error
    restored = ManyModelRun.restore_from("p1", url)
    assert restored.status == RunStatus.PARTIAL_FAILURE
    assert restored.summary().set_index("partition_id")["status"].to_dict() == live
    assert restored.manifest["counts"] == {"DONE": 4 - len(lost), "INTERNAL_ERROR": len(lost)}


def test_an_exclusive_create_whose_answer_was_lost_is_no_other_writers(client, flaky, tmp_path):
    """The store took the exclusive create of _run.json (or of a FileSet's
    claim) but its answer was lost (an object store's 500, a connection
    dropped after the PUT): the retry found the file, taken for another
    start's. The run refused itself ("it was created while this run was
    being prepared"), leaving its _run.json IN_PROGRESS for good; the FileSet
    said "already exists", its claim keeping the name."""
    from dask_manymodel import FileSet

    url = f"flaky://{tmp_path}/models"
    options = {"lost_answer_nth": {"_run.json": [1], "_fileset.claim": [1]}, "count_dir": str(tmp_path),
               "log_path": str(tmp_path / "failures.log")}
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.SUCCESS
    assert FileSet.make(url, "fs1", ddf, storage_options=options).num_rows == 20
    lost = [line for line in (tmp_path / "failures.log").read_text().splitlines() if line.startswith("lost answer")]
    assert [line.rsplit("/", 1)[1] for line in lost] == ["_run.json", "_fileset.claim"]
    # another writer's file is still another's
    with pytest.raises(RunExistsError, match="already exists"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=options)


def exit_in_group_0(data, ctx):
    if ctx.partition_id == 0:
        os._exit(1)
    return len(data)


def test_a_lost_groups_status_the_client_could_not_write_is_written_as_the_run_ends(flaky, tmp_path):
    """The client's own write of a lost group's status failed once: as the
    run ended, writing it again raised TypeError (the record the client had
    made carried its 'finished'), so that the run's final _run.json was not
    written either, and said IN_PROGRESS though the store took writes again."""
    url = f"flaky://{tmp_path}/models"
    # writes of group 0's status: 1 its task's mark, 2 and 3 the client's (the
    # batch, then the file alone), 4 the client's again as the run ends
    options = {"fail_nth": {"store=0/_partition.json": [2, 3]}, "count_dir": str(tmp_path)}
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        run = dd.from_pandas(make_frame(n_groups=4, rows=3), npartitions=1).manymodel.train(
            exit_in_group_0, by="store", url=url, run_id="r1", storage_options=options,
            execution_options=ExecutionOptions(npartitions=1, storage_retries=0),
        )
        assert run.wait(timeout=120, show_progress=False) == RunStatus.FAILURE
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.manifest["status"] == "FAILURE" and restored.manifest["counts"] == {"INTERNAL_ERROR": 4}
    assert restored.summary()["status"].tolist() == ["INTERNAL_ERROR"] * 4
    assert restored.partition_details[0].error.startswith(
        "could not write the status of group store=0 (it had ended INTERNAL_ERROR: group 0 (3 rows) was lost with "
        "the task running it: KilledWorker"
    )


def disk_full_as_group_0_kills_its_worker(full, data, ctx):
    if ctx.partition_id == 0:
        open(full, "w").close()
        os._exit(1)
    return len(data)


def test_the_statuses_of_a_lost_task_are_written_in_one_batch(flaky, tmp_path):
    """The client wrote the outcome of each group of a lost task on its
    own, with the store's retries each: with the disk full, the collector
    spent the retries' backoff (~0.7 s by default) on every group, an hour
    for a task of 5,000 groups, before wait() returned."""
    url = f"flaky://{tmp_path}/models"
    log = tmp_path / "failures.log"
    full = tmp_path / "full"
    n_groups = 30
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        run = dd.from_pandas(make_frame(n_groups=n_groups, rows=3), npartitions=1).manymodel.train(
            functools.partial(disk_full_as_group_0_kills_its_worker, str(full)), by="store", url=url, run_id="r1",
            storage_options={"full_while": str(full), "log_path": str(log)},
            execution_options=ExecutionOptions(npartitions=1, storage_retries=3, storage_retry_backoff=0.001),
        )
        assert run.wait(timeout=120, show_progress=False) == RunStatus.FAILURE
    errors = run.summary()["error"]
    assert errors.str.startswith("could not write the status of group store=").all()
    assert errors.str.contains("No space left on device").all()
    refused = [line for line in log.read_text().splitlines() if line.endswith("/_partition.json")]
    # twice (the lost task's, then as the run ended, see _store_statuses_not_stored) each
    # batch's write, its first file's 4 tries and the others' one; one by one, 4 tries each
    assert len(refused) == 2 * (1 + 4 + n_groups - 1)


def test_two_runs_with_one_id_at_once(client, tmp_path):
    url = str(tmp_path / "m")
    ddf = dd.from_pandas(make_frame(n_groups=10, rows=5), npartitions=2)
    barrier = threading.Barrier(2)
    outcomes: list = []

    def start() -> None:
        barrier.wait()
        try:
            outcomes.append(ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1"))
        except RunExistsError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    errors = [o for o in outcomes if isinstance(o, RunExistsError)]
    runs = [o for o in outcomes if not isinstance(o, RunExistsError)]
    assert len(errors) == 1 and len(runs) == 1
    assert "already exists" in str(errors[0])
    assert runs[0].wait(show_progress=False) == RunStatus.SUCCESS
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.SUCCESS
    assert restored.manifest["attempt"] == runs[0].manifest["attempt"]
    assert len(restored.get_progress()["DONE"]) == 10


class FileOnlySerde(ModelSerde):
    """A serde without to_bytes: each model is written at once, not with its task's batch."""

    filename = "model.json"

    def write(self, model, file_path):
        with open(file_path, "w") as f:
            json.dump(np.asarray(model).tolist(), f)

    def read(self, file_path):
        with open(file_path) as f:
            return json.load(f)


def test_fail_fast_stops_at_a_group_whose_model_could_not_be_stored(client, flaky, tmp_path):
    # not only a FAILED group (the user function raised): one INTERNAL_ERROR,
    # the store refusing its model after the retries, stops the run too (a
    # serde without to_bytes writes each model at once, not with the batch)
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=12, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line, by="store", url=url, run_id="r1", serde=FileOnlySerde(),
        storage_options={"fail_paths": [f"store={g}/model.json" for g in range(6)]},
        execution_options=ExecutionOptions(fail_fast=True, npartitions=1, storage_retries=0),
    )
    run.wait(show_progress=False)
    statuses = collections.Counter(d.status.value for d in run.partition_details.values())
    # one task runs the groups one after the other: the first of the six
    # that cannot be stored comes by the seventh group at the latest
    assert statuses["INTERNAL_ERROR"] == 1 and statuses["CANCELLED"] >= 5, statuses


def upload_holding_group_zero(gate_dir, data, ctx):
    """A DPF function: group 0 holds like fit_holding_group_zero, then each group uploads a file."""
    fit_holding_group_zero(gate_dir, data, ctx)
    ctx.upload(len(data), "rows.pkl")


def start_again_while_group_zero_holds(client, url, gate_dir, writes="batched", storage_options=None):
    """Start a one-task run whose group 0 holds (so all its groups finish
    later), then begin a second start of it as an overwrite begins: its
    _run.json (a new attempt and submission), then the old files go
    (engine._write_manifest). Let group 0 finish; return the first start's
    handle, finished, and the second start's manifest."""
    ddf = dd.from_pandas(make_frame(n_groups=20, rows=2), npartitions=2)
    options = ExecutionOptions(npartitions=1)
    with cancel_checked_before_every_group(client):
        if writes == "by ctx.upload":
            first = ddf.manymodel.dpf(functools.partial(upload_holding_group_zero, gate_dir), by="store", url=url,
                                      run_id="r1", storage_options=storage_options, execution_options=options)
        else:
            serde = {"by the serde at once": FileOnlySerde(), "by write() when to_bytes says None": BytesSometimes()}
            serde = serde.get(writes)
            first = ddf.manymodel.train(functools.partial(fit_holding_group_zero, gate_dir), by="store", url=url,
                                        run_id="r1", serde=serde, storage_options=storage_options,
                                        execution_options=options)
        poll(lambda: any(name.startswith("holder-") for name in os.listdir(gate_dir)))
        store = RunStore(url, "r1", storage_options)
        second = dict(store.read_json(store.path("_run.json")), attempt="second-attempt", submission="second")
        _write_manifest(store, second, "overwrite")
        open(os.path.join(gate_dir, "release"), "w").close()  # group 0 finishes now, after the overwrite
        first.wait(show_progress=False, timeout=120)
    return first, second


def assert_wrote_nothing_more(first, second, caplog, storage_options=None) -> None:
    """What the first start of :func:`start_again_while_group_zero_holds` must leave."""
    assert first.status == RunStatus.CANCELLED
    cancelled = first.get_progress()["CANCELLED"]
    assert sorted(d.partition_id for d in cancelled) == list(range(20))
    for details in cancelled:
        assert "not written: run 'r1'" in details.error and "was started again" in details.error
    assert any("was started again" in r.getMessage() and "not written" in r.getMessage() for r in caplog.records)
    restored = ManyModelRun.restore_from("r1", first.url, storage_options=storage_options)
    assert restored.manifest == second  # the second start's, not written over
    assert "DONE" not in restored.get_progress()  # the first start's statuses do not count


class BytesSometimes(PickleSerde):
    """A serde that keeps no model in memory: to_bytes says None, write() saves it."""

    def to_bytes(self, model):
        return None

    def write(self, model, file_path):
        with open(file_path, "wb") as f:
            f.write(PickleSerde.to_bytes(self, model))


def _set_model_bytes_in_memory(limit: int) -> None:
    from dask_manymodel import engine

    engine._MODEL_BYTES_IN_MEMORY = limit


@pytest.mark.parametrize("writes", ["batched", "by the serde at once", "by write() when to_bytes says None",
                                    "by ctx.upload", "a pickle streamed to its file"])
def test_a_run_started_again_elsewhere_writes_nothing_more(client, tmp_path, caplog, writes):
    """A batch job retried while its first try still runs: the second start
    overwrites the run, and the first one's tasks and client must write
    nothing more into folders that are the second one's now (before this, the
    first one's group 0 wrote its files and status after the overwrite, and
    its client wrote its own _run.json over the second one's at the end)."""
    url = str(tmp_path / "m")
    if writes == "a pickle streamed to its file":  # as a big model's is (engine._save_pickle)
        client.run(_set_model_bytes_in_memory, 0)
    try:
        with caplog.at_level(logging.WARNING, "dask_manymodel"):
            first, second = start_again_while_group_zero_holds(client, url, str(tmp_path), writes)
    finally:
        client.run(_set_model_bytes_in_memory, 32 * 2**20)
    assert os.listdir(os.path.join(url, "r1")) == ["_run.json"]  # no group's file or status
    assert_wrote_nothing_more(first, second, caplog)


def test_what_counts_as_started_again(tmp_path):
    store = RunStore(str(tmp_path / "m"), "r1")
    spec = RunSpec(kind="train", run_id="r1", attempt="a1", by=["store"], func=fit_line, store=store, serde=None,
                   options=ExecutionOptions(), cancel_event="c", progress_topic="p", submission="mine")
    path = store.path("_run.json")
    assert "was deleted" in superseded_by(store, "mine")  # no _run.json: the run was deleted
    store.write_bytes(path, b'{"attempt": "a1", "submission": "mine"}')
    assert superseded_by(store, "mine") is None
    assert not _run_was_superseded(spec)
    store.write_bytes(path, b'{"attempt": "a1"}')  # written by an older dask_manymodel: not this start's
    assert "was started again" in superseded_by(store, "mine")
    store.write_bytes(path, b'{"attempt": "a2", "submission": "theirs"}')
    assert "attempt 'a2'" in superseded_by(store, "mine")
    store.write_bytes(path, b'{"attempt": "a2", "subm')  # half-written by a non-atomic writer
    with pytest.raises(ValueError):
        superseded_by(store, "mine")
    assert not _run_was_superseded(dataclasses.replace(spec, submission="another"))  # no evidence: go on
    assert not _run_was_superseded(dataclasses.replace(spec, submission=None))  # not fenced
    store.write_bytes(path, b'{"attempt": "a2", "submission": "theirs"}')
    assert _run_was_superseded(dataclasses.replace(spec, submission="a third"))


def test_an_interrupted_overwrite_never_mixes_runs(client, flaky, tmp_path):
    url = f"flaky://{tmp_path}/models"
    old = dd.from_pandas(make_frame(n_groups=10, rows=5), npartitions=2)
    assert old.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False) == RunStatus.SUCCESS
    new = dd.from_pandas(make_frame(n_groups=10, rows=5, seed=7), npartitions=2)
    with pytest.raises(StorageError, match="half-way"):
        new.manymodel.train(
            fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="overwrite",
            storage_options={"fail_rm": True},
            execution_options=ExecutionOptions(storage_retries=0),
        )
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status != RunStatus.SUCCESS
    assert "DONE" not in restored.get_progress()  # the old groups no longer count
    survivors = [g for g in range(10) if os.path.exists(tmp_path / "models" / "r1" / f"store={g}" / "model.pkl")]
    assert survivors  # some old files are still there, and still not served:
    with pytest.raises(LookupError):  # PartitionNotFoundError or ModelNotAvailableError
        restored.get_model(survivors[0])


def whole_or_spread(spread: bool, i: int) -> pd.DataFrame:
    """Group 0 of 1,000,000 rows: in partition 0 alone, or a quarter in each
    of 4 partitions (the run must shuffle); groups 1-4 of 10 rows."""
    if spread:
        big = pd.DataFrame({"store": 0, "x": np.ones(250_000), "y": np.ones(250_000), "z": np.ones(250_000)})
        small = pd.DataFrame({"store": i + 1, "x": np.ones(10), "y": np.ones(10), "z": np.ones(10)})
        return pd.concat([big, small], ignore_index=True)
    rows = 1_000_000 if i == 0 else 10
    return pd.DataFrame({"store": i, "x": np.ones(rows), "y": np.ones(rows), "z": np.ones(rows)})


@pytest.mark.parametrize("spread", [False, True], ids=["in-one-partition", "spread-so-it-shuffles"])
def test_a_group_too_big_for_its_worker(tmp_path, spread):
    """Spread over the input's partitions, such a group was shuffled onto
    one worker before any check, and killed the workers of the shuffle
    (every group of the run lost with them)."""
    url = str(tmp_path / "m")
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        memory_limit="1GiB", silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster):
        ddf = dd.from_map(functools.partial(whole_or_spread, spread), range(4 if spread else 5))
        run = ddf.manymodel.train(
            lambda data, ctx: len(data), by="store", url=url, run_id="r1",
            execution_options=ExecutionOptions(max_group_memory_fraction=0.02),
        )
        assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
        big = run.partition_details[0]
        assert big.status == "INTERNAL_ERROR"
        assert "group 0 has 1,000,000 rows" in big.error and "memory limit" in big.error
        assert ("too big to shuffle" in big.error) is spread
        assert [run.get_model(g) for g in range(1, 5)] == [10, 10, 10, 10]
        restored = ManyModelRun.restore_from("r1", url)
        assert restored.partition_details[0].error == big.error and restored.status == RunStatus.PARTIAL_FAILURE


def test_a_read_only_store_is_refused_before_anything_is_written(client, flaky, tmp_path):
    from dask_manymodel import InvalidURLError

    ddf = dd.from_pandas(make_frame(n_groups=3, rows=5), npartitions=1)
    with pytest.raises(InvalidURLError, match="permission denied"):
        ddf.manymodel.train(fit_line, by="store", url=f"flaky://{tmp_path}/m", run_id="r1",
                            storage_options={"readonly": True})
    assert not os.path.exists(tmp_path / "m" / "r1" / "_run.json")


def first_group_held(folder, data, ctx):
    """The first group to run notes it (``running``), then waits for the
    file ``gate``; the others return at once."""
    running = os.path.join(folder, "running")
    if not os.path.exists(running):
        open(running, "w").close()
        hold_until_released(os.path.join(folder, "gate"))
    return len(data)


def _keys_in_worker(dask_worker) -> list[str]:
    return [str(key) for key in dask_worker.state.tasks]


@pytest.mark.parametrize("how", ["client.cancel", "future.cancel"])
def test_a_task_cancelled_outside_the_run_writes_nothing_over_what_the_client_recorded(
    client, ddf, tmp_path, how
):
    # Dask forgets a cancelled task, but one that was running goes on in its
    # worker: its groups finished after the client recorded them as lost made
    # storage say DONE where the handle and _run.json said INTERNAL_ERROR
    url = str(tmp_path / "models")
    run = ddf.manymodel.train(
        functools.partial(first_group_held, str(tmp_path)), by="store", url=url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=1),
    )
    poll(lambda: os.path.exists(tmp_path / "running"))
    if how == "client.cancel":
        client.cancel(run.futures)
    else:
        run.futures[0].cancel()
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    (tmp_path / "gate").touch()  # the task goes on now, with every group to write
    key = str(run.futures[0].key)
    poll(lambda: not any(key in keys for keys in client.run(_keys_in_worker).values()))
    live = run.summary().set_index("path")["status"]
    assert set(live) == {"INTERNAL_ERROR"} and len(live) == 12
    stored = ManyModelRun.restore_from("r1", url).summary().set_index("path")["status"]
    assert stored.sort_index().to_dict() == live.sort_index().to_dict()
    with open(os.path.join(url, "r1", "_run.json")) as f:
        assert json.load(f)["counts"] == {"INTERNAL_ERROR": 12}
    assert not any(name == "model.pkl" for _, _, names in os.walk(url) for name in names)


def every_group_held(folder, data, ctx):
    """Each group notes that it runs (``running-<id>``), then waits for the
    file ``gate``: a run's tasks beyond one per worker thread do not start
    until the test opens it."""
    open(os.path.join(folder, f"running-{ctx.partition_id}"), "w").close()
    hold_until_released(os.path.join(folder, "gate"))
    return len(data)


def test_groups_of_a_task_cancelled_before_it_started_say_they_were_not_run(client, ddf, tmp_path):
    # a task cancelled outside the run before any worker ran it: its groups
    # said they "were lost with the task running it", and no task ran them
    url = str(tmp_path / "models")
    run = ddf.manymodel.train(
        functools.partial(every_group_held, str(tmp_path)), by="store", url=url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=6),
    )
    poll(lambda: sum(name.startswith("running-") for name in os.listdir(tmp_path)) == 2, timeout=60)
    client.cancel(run.futures)
    try:
        assert run.wait(timeout=120, show_progress=False) is RunStatus.FAILURE
    finally:
        (tmp_path / "gate").touch()
    running = {int(name.split("-")[1]) for name in os.listdir(tmp_path) if name.startswith("running-")}
    started_tasks = {g["task"] for g in run._groups if g["partition_id"] in running}
    assert len(started_tasks) == 2
    stored = ManyModelRun.restore_from("r1", url).partition_details
    for group in run._groups:
        for details in (run.partition_details[group["partition_id"]], stored[group["partition_id"]]):
            assert details.status is PartitionStatus.INTERNAL_ERROR
            if group["task"] in started_tasks:
                assert "lost with the task running it" in details.error, details.error
            else:
                assert "was not run: its task was cancelled or lost before it began" in details.error, details.error
                assert "cancelled" in details.error  # Dask's own words stay


def fourth_group_kills_its_worker(folder, url, data, ctx):
    """Each group notes that it ran (a line in ``runs-<id>``). The fourth to
    run becomes the killer, once the first three's statuses are stored:
    it takes its worker process down, as it will in every try."""
    with open(os.path.join(folder, f"runs-{ctx.partition_id}"), "a") as f:
        f.write("ran\n")
    killer = os.path.join(folder, "killer")
    if not os.path.exists(killer) and sum(n.startswith("runs-") for n in os.listdir(folder)) == 4:
        with open(killer, "w") as f:
            f.write(str(ctx.partition_id))
        poll(lambda: sum(os.path.exists(os.path.join(url, "r1", f"store={n}", "_partition.json"))
                         for n in range(12)) >= 3)
    if os.path.exists(killer):
        with open(killer) as f:
            if f.read() == str(ctx.partition_id):
                os._exit(1)
    return len(data)


@pytest.mark.parametrize("tries", [4, 3, 1])
def test_a_group_that_kills_its_worker_fails_alone_and_its_task_goes_on(tmp_path, tries):
    """Dask runs the task again after its worker dies; that try skips the
    groups stored already and marks the next ones RUNNING before they run;
    the next try runs each marked group alone, and the one after that fails
    the group its worker died in and runs the rest (they were lost with the
    task before). Allowed only three tries, Dask gives the task up after the
    one that ran it alone: that group is FAILED, the rest lost; allowed one,
    it gives up at once: the groups not stored are lost."""
    folder, url = tmp_path / "notes", str(tmp_path / "models")
    folder.mkdir()
    with dask.config.set({"distributed.scheduler.allowed-failures": tries - 1}), distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        run = dd.from_pandas(make_frame(n_groups=12, rows=5), npartitions=2).manymodel.train(
            functools.partial(fourth_group_kills_its_worker, str(folder), url), by="store", url=url,
            run_id="r1", execution_options=ExecutionOptions(npartitions=1),
        )
        assert run.wait(timeout=240, show_progress=False) == RunStatus.PARTIAL_FAILURE
    killer = int((folder / "killer").read_text())
    details = run.partition_details
    if tries == 1:
        assert sorted(d.status.value for d in details.values()) == ["DONE"] * 3 + ["INTERNAL_ERROR"] * 9
        assert "KilledWorker" in details[killer].error and "may have run out of memory" in details[killer].error
        return
    assert details[killer].status == PartitionStatus.FAILED
    assert "died while the group ran" in details[killer].error
    runs = {int(p.name[5:]): len(p.read_text().splitlines()) for p in folder.glob("runs-*")}
    if tries == 4:
        assert {g for g, d in details.items() if d.status != PartitionStatus.DONE} == {killer}
        assert len(runs) == 12 and runs[killer] == 3  # the first try, with its batch, and alone
        assert sorted(runs.values()).count(1) == 11  # the others ran once: none was done again
    else:
        assert "Dask gave the task up: KilledWorker" in details[killer].error
        lost = {g for g, d in details.items() if d.status == PartitionStatus.INTERNAL_ERROR}
        assert len(lost) == 8 and killer not in lost and not set(runs) & lost  # never reached
    assert ManyModelRun.restore_from("r1", url).summary().set_index("partition_id")["status"].to_dict() == {
        g: d.status.value for g, d in details.items()
    }


def count_rows(data, ctx):
    return len(data)


def careful_try(tmp_path, stored: dict, **options) -> dict:
    """Run one task in this process as a try after its worker died: ``stored``
    holds the statuses the earlier tries left (group id -> record fields);
    returns each group's record from the task, by group id."""
    from dask_manymodel.engine import _record, run_partition
    from dask_manymodel.store import group_path

    store = RunStore(str(tmp_path / "m"), "r1")
    submission = uuid.uuid4().hex  # answers to "was it superseded?" are shared per process
    spec = RunSpec(kind="train", run_id="r1", attempt="a1", by=["store"], func=count_rows, store=store,
                   serde=PickleSerde(), options=ExecutionOptions(**options), cancel_event="c",
                   progress_topic="p", submission=submission)
    store.write_json(store.path("_run.json"), {"attempt": "a1", "submission": submission})
    for group, fields in stored.items():
        rel = group_path(["store"], (group,))
        store.write_json(store.path(rel, "_partition.json"), _record(spec, (group,), rel, **fields))
    records = run_partition(spec, make_frame(n_groups=8, rows=3))
    return {r["partition_id"]: r for r in records}


def test_a_careful_try_keeps_what_is_stored_and_names_the_group_its_worker_died_in(tmp_path):
    got = careful_try(tmp_path, {0: {"status": "DONE"}, 1: {"status": "DONE"},
                                 2: {"status": "RUNNING", "alone": True, "others": 0},
                                 3: {"status": "RUNNING", "alone": False}})
    assert [got[g]["status"] for g in range(8)] == ["DONE", "DONE", "FAILED"] + ["DONE"] * 5
    assert "died while the group ran" in got[2]["error"]
    assert "bytes" not in got[0]  # kept as stored (with no model size), not run again


def test_a_careful_try_removes_what_a_killed_write_left(tmp_path):
    """A worker killed while it wrote a model (out of memory in torch.save)
    left the temp file in the group's folder for good; the try after it
    rewrote the group DONE beside it."""
    left = [tmp_path / "m" / "r1" / "store=3" / ".tmp-0a1b-model.pkl",  # marked with the batch that died
            tmp_path / "m" / "r1" / "store=5" / "sub" / ".tmp-2c3d-weights.pt"]  # a first try's: unmarked
    for path in left:
        path.parent.mkdir(parents=True)
        path.write_bytes(b"half a model")
    got = careful_try(tmp_path, {0: {"status": "DONE"}, 3: {"status": "RUNNING", "alone": False}})
    assert {r["status"] for r in got.values()} == {"DONE"}
    assert not any(path.exists() for path in left)
    assert (tmp_path / "m" / "r1" / "store=3" / "model.pkl").exists()


def test_a_careful_try_blames_no_group_when_other_tasks_ran_beside_it(tmp_path):
    # a worker with several threads: another task's group may have killed it
    got = careful_try(tmp_path, {0: {"status": "DONE"}, 2: {"status": "RUNNING", "alone": True, "others": 1}})
    assert got[2]["status"] == "INTERNAL_ERROR" and "1 other task(s) ran in the same process" in got[2]["error"]
    assert {got[g]["status"] for g in range(8) if g != 2} == {"DONE"}


def test_a_careful_try_with_fail_fast_cancels_after_the_group_its_worker_died_in(tmp_path):
    got = careful_try(tmp_path, {0: {"status": "DONE"}, 2: {"status": "RUNNING", "alone": True, "others": 0}},
                      fail_fast=True)
    assert [got[g]["status"] for g in range(8)] == ["DONE", "DONE", "FAILED"] + ["CANCELLED"] * 5


def test_a_careful_try_that_starts_cancelled_keeps_the_stored_groups(tmp_path, monkeypatch):
    from dask_manymodel import engine

    monkeypatch.setattr(engine._Heartbeat, "beat", lambda self: True)  # the run was cancelled
    got = careful_try(tmp_path, {0: {"status": "DONE"}, 1: {"status": "FAILED"}, 3: {"status": "DONE"}})
    assert [got[g]["status"] for g in range(4)] == ["DONE", "FAILED", "CANCELLED", "DONE"]
    with open(tmp_path / "m" / "r1" / "store=0" / "_partition.json") as f:
        assert json.load(f)["status"] == "DONE"


def test_a_group_that_its_task_did_not_report_is_never_counted_a_success(tmp_path, monkeypatch):
    """A task that ended without a group's record (as when keys that pandas
    read differently from the count were not found in its partition) left
    that group PENDING, and the run said SUCCESS."""
    from dask_manymodel import engine

    original = engine._run_partition

    def forgetting_group_3(spec, frame):
        return engine.TaskRecords(r for r in original(spec, frame) if r["partition_id"] != 3)

    monkeypatch.setattr(engine, "_run_partition", forgetting_group_3)  # the tasks run in this process
    url = str(tmp_path / "models")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster):
        run = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2).manymodel.train(
            fit_line, by="store", url=url, run_id="r1")
        assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    lost = ManyModelRun.restore_from("r1", url).partition_details[3]
    assert lost.status == "INTERNAL_ERROR" and "group 3 (5 rows) was not run" in lost.error
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.PARTIAL_FAILURE


def test_the_died_in_group_message_reads_as_sentences_after_dasks_own():
    # Dask's KilledWorker text ends with a period (".../killed.html."), and
    # the sentence about workers stopped from outside follows it
    from dask_manymodel import engine

    killed = (
        "Dask gave the task up: KilledWorker: Attempted to run task 'x' on 4 different workers, but all those "
        "workers died while running it. For more information see https://distributed.dask.org/en/stable/killed.html."
    )
    for others in (0, 2):
        message = engine._died_in_group_message((3,), killed, others=others)
        assert "killed.html. " in message and ".." not in message, message


def predict_when_flag(data, model, ctx):
    """A predict function: while the flag file exists, group 3 fails and group 4 returns None."""
    if os.path.exists(os.environ["MANYMODEL_TEST_FLAG"]) and ctx.partition_id in (3, 4):
        if ctx.partition_id == 3:
            raise RuntimeError("group 3 failed this time")
        return None
    return data.to_pandas()[["x"]].assign(pred=float(model[0]))


def as_if_killed_after_its_file(fs, run_folder: str) -> None:
    """Group 3 was killed after writing its file, before its status; group 4
    after its file, with its task's RUNNING mark as its status."""
    fs.rm_file(f"{run_folder}/store=3/_partition.json")
    path = f"{run_folder}/store=4/_partition.json"
    status = json.loads(fs.cat_file(path))
    status.update(status="RUNNING")
    fs.pipe_file(path, json.dumps(status).encode())


def test_a_rerun_that_writes_no_output_leaves_no_old_output_in_the_folder(client, tmp_path):
    """A group run again whose rerun FAILED (or returned None) kept the
    part-0.parquet an earlier start wrote: pd.read_parquet of the run's
    folder counted a FAILED group's old predictions."""
    url = str(tmp_path / "m")
    flag = tmp_path / "flag"
    set_worker_env(client, "MANYMODEL_TEST_FLAG", str(flag))
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="t").wait(show_progress=False)
    first = ddf.manymodel.predict(predict_when_flag, by="store", url=url, training_run_id="t", run_id="p")
    assert first.wait(show_progress=False) == RunStatus.SUCCESS
    folder = os.path.join(url, "p")
    as_if_killed_after_its_file(fsspec.filesystem("file"), folder)
    kept = os.stat(os.path.join(folder, "store=0", "part-0.parquet")).st_mtime_ns

    flag.touch()
    again = ddf.manymodel.predict(predict_when_flag, by="store", url=url, training_run_id="t", run_id="p",
                                  on_existing_artifacts="resume")
    assert again.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert again.partition_details[3].status == PartitionStatus.FAILED
    assert again.partition_details[4].status == PartitionStatus.DONE
    for group in (3, 4):
        assert os.listdir(os.path.join(folder, f"store={group}")) == ["_partition.json"]
    read = pd.read_parquet(folder)
    assert sorted(read["store"].astype(int).unique()) == [0, 1, 2, 5]
    assert len(read) == len(again.to_dask_dataframe().compute()) == 20
    assert os.stat(os.path.join(folder, "store=0", "part-0.parquet")).st_mtime_ns == kept  # DONE: untouched


def test_retry_failed_removes_an_old_model_its_rerun_did_not_replace(thread_client, tmp_path):
    """Also on an object store, and for a serde that writes through a file."""
    url = f"memory://reruns-{uuid.uuid4().hex}"
    flag = tmp_path / "flag"
    set_worker_env(thread_client, "MANYMODEL_TEST_FLAG", str(flag))
    fs = fsspec.filesystem("memory")
    try:
        ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
        run = ddf.manymodel.train(fail_when_flag, by="store", url=url, run_id="r", serde=FileOnlySerde())
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        folder = url.removeprefix("memory:/") + "/r"
        as_if_killed_after_its_file(fs, folder)

        flag.touch()  # fails group 3 (% 10 == 3) again
        again = run.retry_failed()
        assert again.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
        assert again.partition_details[3].status == PartitionStatus.FAILED
        assert sorted(fs.ls(f"{folder}/store=3", detail=False)) == [f"{folder}/store=3/_partition.json"]
        assert fs.exists(f"{folder}/store=4/model.json")  # written again by its rerun
        assert fs.exists(f"{folder}/store=0/model.json")  # DONE: kept
        assert again.get_model(0) == pytest.approx([1.0, 0.0])
    finally:
        fs.rm(url, recursive=True)
