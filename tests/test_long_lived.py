"""What a cluster kept up for days keeps of each run: nothing that grows
with the number of runs, in its workers, its scheduler or the client."""

from __future__ import annotations

import functools
import gc
import os
import uuid

import dask.dataframe as dd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import ExecutionOptions, PickleSerde, RunStatus
from dask_manymodel import store as store_module
from dask_manymodel.store import open_url

from . import flaky_fs
from .conftest import (
    announce_cancel_event, cancel_checked_before_every_group, fit_line, held_until_cancelled, make_frame, poll,
)

KEEP = 2  # file systems kept, for these tests (fewer runs than the real bound's)


def _keep_file_systems(n: int | None) -> int | None:
    """Set the bound in this process; returns the one it had (None: none)."""
    previous = getattr(store_module, "_KEEP_FILE_SYSTEMS", None)
    if n is None:
        if hasattr(store_module, "_KEEP_FILE_SYSTEMS"):
            del store_module._KEEP_FILE_SYSTEMS
    else:
        store_module._KEEP_FILE_SYSTEMS = n
    return previous


def _file_systems_of(tag: str) -> int:
    """How many flaky:// file systems with options of this test fsspec keeps here."""
    return sum(
        1 for fs in list(flaky_fs.FlakyLocalFileSystem._cache.values())
        if str(fs.storage_options.get("seed", "")).startswith(tag)
    )


@pytest.fixture
def few_file_systems_kept(client):
    before = _keep_file_systems(KEEP)
    on_workers = client.run(_keep_file_systems, KEEP)
    yield
    _keep_file_systems(before)
    for worker, previous in on_workers.items():
        client.run(_keep_file_systems, previous, workers=[worker])


def test_runs_with_new_credentials_each_keep_few_file_systems(client, tmp_path, few_file_systems_kept):
    """Runs whose storage_options change every time (temporary credentials:
    an STS session token, a SAS token, renewed for each nightly or hourly
    run) each left one file system in fsspec's instance cache of every worker
    and of the client, for good: on S3 an S3FileSystem and its botocore
    client, ~13 MB per run and worker (repro/rotate.py: 744 MB after 40 runs)."""
    flaky_fs.register()
    tag = f"rotated-{uuid.uuid4().hex}-"
    url = f"flaky://{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    runs = KEEP + 3
    for number in range(runs):
        options = {"seed": f"{tag}{number}"}  # stands for a new credential
        run = ddf.manymodel.train(fit_line, by="store", url=url, run_id=f"r{number}", storage_options=options)
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        del run
    on_workers = client.run(_file_systems_of, tag)
    assert all(1 <= kept <= KEEP for kept in on_workers.values()), on_workers
    assert _file_systems_of(tag) <= KEEP


def test_a_file_system_taken_out_of_the_cache_still_works(tmp_path, monkeypatch):
    """Only fsspec's cache lets go of it: whoever holds it (a run going on)
    goes on using it, and the same options open a working one again."""
    flaky_fs.register()
    monkeypatch.setattr(store_module, "_KEEP_FILE_SYSTEMS", KEEP, raising=False)
    tag = f"unit-{uuid.uuid4().hex}-"
    first, _ = open_url(f"flaky://{tmp_path}", {"seed": f"{tag}0"})
    for number in range(1, KEEP + 3):
        open_url(f"flaky://{tmp_path}", {"seed": f"{tag}{number}"})
    assert _file_systems_of(tag) == KEEP
    first.pipe_file(f"{tmp_path}/a.txt", b"still works")
    again, _ = open_url(f"flaky://{tmp_path}", {"seed": f"{tag}0"})
    assert again.cat_file(f"{tmp_path}/a.txt") == b"still works"


def _cancel_events(dask_scheduler) -> list[str]:
    """The runs' cancel events the scheduler holds."""
    return [name for name in dask_scheduler.extensions["events"]._events if str(name).startswith("manymodel-cancel-")]


def fail_on_group_1(data, ctx):
    if ctx.partition_id == 1:
        raise ValueError("group 1 fails")
    return fit_line(data, ctx)


def test_a_stopped_run_leaves_no_cancel_event_on_the_scheduler(client, store_url, tmp_path):
    """Each run that was cancelled, or stopped by fail_fast, left its cancel
    event set on the scheduler for as long as the cluster ran (Dask's Events
    end only when cleared)."""
    before = set(client.run_on_scheduler(_cancel_events))
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    stopped = ddf.manymodel.train(
        fail_on_group_1, by="store", url=store_url, run_id="fail-fast",
        execution_options=ExecutionOptions(fail_fast=True),
    )
    assert stopped.wait(show_progress=False) in (RunStatus.FAILURE, RunStatus.PARTIAL_FAILURE)

    gates = tmp_path / "gates"
    gates.mkdir()
    with cancel_checked_before_every_group(client):
        cancelled = ddf.manymodel.train(
            functools.partial(held_until_cancelled, str(gates)), by="store", url=store_url, run_id="cancelled",
        )
        announce_cancel_event(gates, cancelled)
        poll(lambda: any(name.startswith("running-") for name in os.listdir(gates)))
        assert cancelled.cancel() == RunStatus.CANCELLED

    assert set(client.run_on_scheduler(_cancel_events)) - before == set()


def _new_serde_class() -> type:
    """As a notebook cell that defines a serde, run again: a class of the
    same name, a new object each time (pickled by value to the workers)."""

    class CellSerde(PickleSerde):
        pass

    return CellSerde


def _serde_classes_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, type) and o.__name__ == "CellSerde")


def test_workers_let_go_of_the_serde_classes_of_ended_runs(client, store_url):
    """A serde class defined anew for each run (a notebook cell run again)
    stayed in every worker for good, with all its methods refer to: the
    answer to "does it write in memory?" was cached by class, never let go."""
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    for number in range(3):
        run = ddf.manymodel.train(
            fit_line, by="store", url=store_url, run_id=f"r{number}", serde=_new_serde_class()()
        )
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        del run
    # (the last run's class goes once its workers forget its spec)
    poll(lambda: all(alive <= 1 for alive in client.run(_serde_classes_alive).values()), timeout=10)


def test_filesets_made_with_new_credentials_each_keep_few_file_systems(client, tmp_path, few_file_systems_kept):
    """FileSet.make's write tasks were given a file system built from the
    make's storage_options, which every worker unpickled into fsspec's
    cache and kept for good: one per make and worker (on S3, an
    S3FileSystem and its botocore client each)."""
    from dask_manymodel import FileSet

    flaky_fs.register()
    tag = f"fileset-{uuid.uuid4().hex}-"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=4)
    for number in range(KEEP + 3):
        made = FileSet.make(
            f"flaky://{tmp_path}/sets", f"s{number}", ddf, shuffle=number % 2 == 1, seed=1,
            storage_options={"seed": f"{tag}{number}"},
        )
        assert made.num_rows == len(ddf)
    on_workers = client.run(_file_systems_of, tag)
    assert all(kept <= KEEP for kept in on_workers.values()), on_workers
    assert sum(on_workers.values()) >= 1  # the workers wrote with them
