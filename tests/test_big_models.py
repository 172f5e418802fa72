"""A big model (tens of MB here, GBs for users): how many copies of its bytes
a save holds at once, measured with tracemalloc (numpy's arrays are traced)."""

from __future__ import annotations

import logging
import os
import sys
import tracemalloc

import dask.dataframe as dd
import distributed
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import PickleSerde

MODEL_BYTES = 48 * 2**20  # over the engine's 32 MB of pickle kept in memory


class Holder:
    """A model of a class that pickles by reference to ``__main__`` (as one
    of a notebook's does in the process that made it)."""

    def __init__(self, weights):
        self.weights = weights


@pytest.fixture
def one_thread_client():
    """One worker thread in this process: tracemalloc sees its allocations,
    and one group runs at a time."""
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        yield client


def _extra_peak(action) -> float:
    """The most memory ``action()`` held at once beyond what was there
    before, in units of MODEL_BYTES."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return (tracemalloc.get_traced_memory()[1] - before) / MODEL_BYTES
    finally:
        tracemalloc.stop()


def test_pickle_serde_streams_a_big_model_to_its_file(tmp_path, monkeypatch):
    """write() pickled the whole model to bytes first (1.5 times its size as
    they grew), and a class of __main__ twice (2.1 times): now it streams."""
    monkeypatch.setattr(sys.modules["__main__"], "Holder", Holder, raising=False)
    monkeypatch.setattr(Holder, "__module__", "__main__")
    serde = PickleSerde()
    path = str(tmp_path / "model.pkl")
    for model in (np.ones(MODEL_BYTES // 8), Holder(np.ones(MODEL_BYTES // 8))):
        assert _extra_peak(lambda: serde.write(model, path)) < 0.2
        assert os.path.getsize(path) > MODEL_BYTES
        # to_bytes needs its one copy, never two
        assert _extra_peak(lambda: serde.to_bytes(model)) < 1.3
        loaded = serde.read(path)
        weights = loaded.weights if isinstance(loaded, Holder) else loaded
        assert weights.shape == (MODEL_BYTES // 8,) and weights[-1] == 1.0


def big_model(data, ctx):
    return np.full(MODEL_BYTES // 8, float(data.to_pandas()["x"].iloc[0]))


def test_training_a_big_model_holds_no_second_copy_of_it(one_thread_client, tmp_path):
    """The train task pickled each model to bytes before writing them: a
    worker held 2.6 times a big model's size (3.2 for a class of __main__).
    Now a big pickle streams to its file, renamed into place; the model
    itself is the one copy, and gone once its group is saved."""
    ddf = dd.from_pandas(pd.DataFrame({"g": [0, 1], "x": [1.0, 2.0]}), npartitions=1)
    url = str(tmp_path / "models")
    runs = []

    def train():
        runs.append(ddf.manymodel.train(big_model, by="g", url=url, run_id="big"))
        runs[0].wait()

    assert _extra_peak(train) < 1.5
    run = runs[0]
    summary = run.summary()
    assert summary["status"].tolist() == ["DONE", "DONE"]
    assert (summary["bytes"] > MODEL_BYTES).all()
    assert run.get_model(1)[-1] == 2.0 and run.get_model(0).nbytes == MODEL_BYTES
    leftovers = [name for _, _, names in os.walk(url) for name in names if name.startswith(".tmp-")]
    assert leftovers == []


def test_a_big_model_is_uploaded_after_its_group_let_go_of_it(one_thread_client):
    """memory:// stands for a remote store. The big pickle goes through the
    worker's scratch folder and is uploaded with the task's batch, once the
    group's model is gone (an upload beside the model held both: s3fs reads
    up to 500 MB of a file at once); the small model goes with its batch.
    The one copy left is the one memory:// keeps."""
    import fsspec

    def fit(data, ctx):
        return np.arange(int(data.to_pandas()["x"].iloc[0]), dtype="float64")

    ddf = dd.from_pandas(pd.DataFrame({"g": [0, 1], "x": [3, MODEL_BYTES // 8]}), npartitions=1)
    url = "memory://big-models-upload"
    runs = []

    def train():
        runs.append(ddf.manymodel.train(fit, by="g", url=url, run_id="mixed"))
        runs[0].wait()

    try:
        assert _extra_peak(train) < 1.6
        run = runs[0]
        assert run.summary()["status"].tolist() == ["DONE", "DONE"]
        assert run.get_model(0).tolist() == [0.0, 1.0, 2.0]
        assert run.get_model(1)[-1] == MODEL_BYTES // 8 - 1
    finally:
        fsspec.filesystem("memory").rm(url, recursive=True)


def test_a_local_runs_artifacts_are_written_and_read_in_place(client, tmp_path):
    """On local disk ctx.upload wrote the artifact in the temp folder and
    copied it in, and ctx.download and Artifacts.get copied it out to read
    it: an artifact of GBs needed that much room in /tmp (often small, or
    in memory) where docs/deployment.md says a local run needs none. Now
    its file is written beside its place and renamed, and read where it is."""
    url = str(tmp_path / "models")
    log = tmp_path / "paths.log"

    def note(path):
        with open(log, "a") as f:
            f.write(path + "\n")

    def write(obj, path):
        note(path)
        np.save(path, obj)

    def read(path):
        note(path)
        return np.load(path)

    def fit(data, ctx):
        ctx.upload(np.arange(4.0), "emb.npy", write_function=write)
        return float(ctx.download("emb.npy", read_function=read).sum())

    ddf = dd.from_pandas(pd.DataFrame({"g": [0], "x": [1.0]}), npartitions=1)
    run = ddf.manymodel.train(fit, by="g", url=url, run_id="r")
    run.wait(show_progress=False)
    assert run.summary()["status"].tolist() == ["DONE"] and run.get_model(0) == 6.0
    assert run.partition_details[0].artifacts.get("emb.npy", read).tolist() == [0.0, 1.0, 2.0, 3.0]
    written, *read_at = log.read_text().splitlines()
    stored = os.path.join(url, "r", "g=0", "emb.npy")
    assert os.path.dirname(written) == os.path.dirname(stored) and os.path.basename(written).startswith(".tmp-")
    assert read_at == [stored, stored]
    assert sorted(os.listdir(os.path.dirname(stored))) == ["_partition.json", "emb.npy", "model.pkl"]


class DiesWhilePickled:
    """Pickled after a big array has streamed to its temp file: takes its
    worker process down (as running out of memory does) while ``gate`` exists."""

    def __init__(self, gate):
        self.gate = gate

    def __reduce__(self):
        if os.path.exists(self.gate):
            os._exit(1)
        return (DiesWhilePickled, (self.gate,))


def big_model_whose_worker_dies(gate, data, ctx):
    return [np.ones(MODEL_BYTES // 8), DiesWhilePickled(gate)]


def test_a_resume_removes_the_temp_file_of_a_worker_killed_while_it_wrote_a_model(tmp_path):
    """A worker killed while a big model streamed to its temp file left the
    file (as big as the model) in the group's folder. Where Dask gave the
    task up (no careful try came to remove it), retry_failed() wrote the
    group DONE beside it, and it stayed for good."""
    import dask
    import functools

    gate, url = tmp_path / "gate", str(tmp_path / "models")
    gate.touch()
    ddf = dd.from_pandas(pd.DataFrame({"g": [0], "x": [1.0]}), npartitions=1)
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.CRITICAL,
    ) as cluster, distributed.Client(cluster):
        run = ddf.manymodel.train(functools.partial(big_model_whose_worker_dies, str(gate)), by="g", url=url,
                                  run_id="r1")
        run.wait(show_progress=False)
        assert run.summary()["status"].tolist() == ["INTERNAL_ERROR"]
        folder = os.path.join(url, "r1", "g=0")
        left = [name for name in os.listdir(folder) if name.startswith(".tmp-")]
        assert len(left) == 1 and os.path.getsize(os.path.join(folder, left[0])) > MODEL_BYTES  # the killed write's
        gate.unlink()
        again = run.retry_failed()
        again.wait(show_progress=False)
    assert again.summary()["status"].tolist() == ["DONE"]
    assert sorted(os.listdir(folder)) == ["_partition.json", "model.pkl"]
