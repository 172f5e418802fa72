"""freeze_older_objects: a run task's full collections skip the objects the
worker held before it, and nothing stays frozen after the run."""

from __future__ import annotations

import gc

import dask.dataframe as dd

import dask_manymodel  # noqa: F401  (registers the accessor)
from dask_manymodel import RunStatus
from dask_manymodel._gc import freeze_older_objects

from .conftest import make_frame


def frozen_objects(data, ctx):
    return gc.get_freeze_count()


def test_a_run_task_freezes_older_objects_and_unfreezes_after(client, store_url):
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    run = ddf.manymodel.train(frozen_objects, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    # a worker holds tens of thousands of objects; all were frozen in the task
    assert all(run.get_model(store) > 10_000 for store in range(6))
    assert set(client.run(gc.get_freeze_count).values()) == {0}


def test_overlapping_tasks_unfreeze_when_the_last_ends():
    assert gc.get_freeze_count() == 0
    with freeze_older_objects():
        assert gc.get_freeze_count() > 0
        with freeze_older_objects():  # a second task, on another worker thread
            pass
        assert gc.get_freeze_count() > 0  # the first task still runs
    assert gc.get_freeze_count() == 0
