"""Workers whose Python environment differs from the client's (a cluster's
image against the user's laptop): what they lack is said before any task
runs, and nothing is written."""

from __future__ import annotations

import logging
import os
import pickle
import socket

import cloudpickle
import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel
from dask_manymodel import FileSet, InvalidArgumentError, MissingDependencyError, RunStatus, TorchSerde
from dask_manymodel import engine
from tests.conftest import fit_line, make_frame, module_only_here

# a worker preload (inline code) that makes modules look not installed there
HIDE = """
import sys

class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {hidden!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, _Hide())
"""


def _cluster_client(preload: str):
    cluster = distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR, preload=[preload],
    )
    return cluster, distributed.Client(cluster, set_as_default=True)


@pytest.fixture
def workers_without(request):
    cluster, client = _cluster_client(HIDE.format(hidden=set(request.param)))
    with cluster, client:
        yield client


@pytest.fixture
def ddf():
    return dd.from_pandas(make_frame(n_groups=4, rows=10), npartitions=2)


@pytest.mark.timeout(60)  # it hung: the workers could not load the count's tasks
@pytest.mark.parametrize("workers_without", [["dask_manymodel"]], indirect=True)
def test_workers_without_dask_manymodel_are_said_before_anything_runs(workers_without, ddf, tmp_path):
    url = str(tmp_path / "models")
    with pytest.raises(MissingDependencyError) as info:
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    message = str(info.value)
    assert "dask_manymodel cannot be imported on 1 of the cluster's 1 worker(s)" in message
    assert "No module named 'dask_manymodel'" in message
    assert f"dask_manymodel {dask_manymodel.__version__}" in message and "workers' environment" in message
    assert not os.path.exists(url)
    # the worker is still there (a task it could not unpickle closed it)
    assert len(workers_without.nthreads()) == 1



@pytest.mark.timeout(60)  # it hung: the workers could not load the shuffle's tasks
@pytest.mark.parametrize("workers_without", [["dask_manymodel"]], indirect=True)
def test_a_shuffled_fileset_on_workers_without_dask_manymodel_is_refused(workers_without, ddf, tmp_path):
    url = str(tmp_path / "filesets")
    with pytest.raises(MissingDependencyError, match="dask_manymodel cannot be imported on 1 of the cluster's"):
        FileSet.make(url, "shuffled", ddf, shuffle=True, seed=1)
    assert not os.path.exists(os.path.join(url, "shuffled"))
    # unshuffled, Dask's own to_parquet writes it: that needs nothing of ours there
    assert FileSet.make(url, "plain", ddf).to_dask_dataframe().shape[0].compute() == len(ddf)

@pytest.mark.parametrize("workers_without", [["torch"]], indirect=True)
def test_workers_without_the_serdes_module_are_said_before_any_group_trains(workers_without, ddf, tmp_path):
    url = str(tmp_path / "models")
    with pytest.raises(MissingDependencyError) as info:
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=TorchSerde())
    message = str(info.value)
    assert "torch cannot be imported on 1 of the cluster's 1 worker(s)" in message
    assert "which TorchSerde reads and writes models with" in message and "workers' environment" in message
    assert not os.path.exists(url)
    # a serde that needs nothing more runs there
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False, timeout=60) == RunStatus.SUCCESS



def train_with_a_torch_dataset(data, ctx):
    data.to_torch_dataset(batch_size=4)
    return 1


@pytest.mark.parametrize("workers_without", [["torch"]], indirect=True)
def test_a_package_missing_on_the_worker_that_runs_a_group_is_said_to_be_missing_there(workers_without, ddf, tmp_path):
    run = ddf.manymodel.train(train_with_a_torch_dataset, by="store", url=str(tmp_path / "models"), run_id="r1")
    assert run.wait(show_progress=False, timeout=60) == RunStatus.FAILURE
    errors = set(run.summary()["error"])
    assert len(errors) == 1, errors
    worker = next(iter(workers_without.nthreads()))
    assert errors.pop() == (
        f"MissingDependencyError: torch is required for this, and this Dask worker ({worker}) does not have "
        f"it; install it in the workers' environment (their image), not only on the client: `pip install "
        f"'dask-manymodel[torch]'`"
    )

def test_workers_with_another_dask_manymodel_are_warned_of(ddf, tmp_path):
    older = "import dask_manymodel\ndask_manymodel.__version__ = '0.0.1'\n"
    cluster, client = _cluster_client(older)
    with cluster, client:
        url = str(tmp_path / "models")
        with pytest.warns(UserWarning, match=(
            f"the workers have dask_manymodel 0.0.1, this client {dask_manymodel.__version__}: .*install "
            f"the same version on the client and the workers"
        )):
            run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
        assert run.wait(show_progress=False, timeout=60) == RunStatus.SUCCESS


# a worker preload: torch looks not installed in worker processes started
# once the file its path names exists (a worker restarted in a changed image)
HIDE_ONCE_MARKED = """
import os, sys

if os.path.exists({marker!r}):
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "torch":
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _Hide())
"""


def test_a_worker_restarted_at_the_same_address_is_asked_again(ddf, tmp_path):
    # the workers' answers were kept by address: a worker restarted at the
    # same one (a fixed --worker-port) in another environment was not asked
    # again, and every group of the run trained, then failed to save its model
    marker = tmp_path / "torch-gone"
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR,
        preload=[HIDE_ONCE_MARKED.format(marker=str(marker))], worker_port=port,
    ) as cluster, distributed.Client(cluster, set_as_default=True) as client:
        url = str(tmp_path / "models")
        (before,) = client.nthreads()
        run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=TorchSerde())
        assert run.wait(show_progress=False, timeout=60) == RunStatus.SUCCESS
        marker.touch()
        client.restart()
        assert list(client.nthreads()) == [before]  # the same address
        with pytest.raises(MissingDependencyError, match="torch cannot be imported on 1 of the cluster's 1 worker"):
            ddf.manymodel.train(fit_line, by="store", url=url, run_id="r2", serde=TorchSerde())
        assert not os.path.exists(os.path.join(url, "r2"))


def _load_where_sent(data: bytes):
    return pickle.loads(data).load()


def test_the_spec_goes_from_worker_to_worker_as_bytes(client, tmp_path, monkeypatch):
    # Passed from the worker that loaded it to one that lacks a module of the
    # function (a cluster of mixed images), the spec failed to unpickle inside
    # Dask's transfer, and that worker's tasks waited for ever. As bytes,
    # the task there fails and says why.
    name = f"only_on_the_first_worker_{os.getpid()}"
    module = module_only_here(tmp_path, monkeypatch, name, "def fit(data, ctx):\n    return 1\n")

    sent = engine.load_run_spec(cloudpickle.dumps(module.fit), "train function fit")  # where it loads
    moved = pickle.dumps(sent)  # as Dask passes it on
    with pytest.raises(InvalidArgumentError) as info:
        client.submit(_load_where_sent, moved, pure=False).result()  # the workers lack the module
    message = str(info.value)
    assert "the train function fit (or its serde) cannot be loaded on the workers" in message
    assert f"No module named '{name}'" in message and "client.upload_file(path)" in message


def predict_x(data, model, ctx):
    return data.to_pandas()[["x"]].rename(columns={"x": "prediction"})


@pytest.mark.timeout(90)  # the compute hung: the workers could not load the read's tasks
def test_an_output_read_on_workers_without_dask_manymodel_is_refused(client, ddf, tmp_path):
    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="t1").wait(show_progress=False)
    run = ddf.manymodel.predict(predict_x, by="store", url=url, run_id="p1", training_run_id="t1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    # another cluster reads the results: its workers lack dask_manymodel
    cluster, other = _cluster_client(HIDE.format(hidden={"dask_manymodel"}))
    with cluster, other:
        with pytest.raises(MissingDependencyError, match="dask_manymodel cannot be imported on 1 of the cluster's"):
            dask_manymodel.ManyModelRun.restore_from("p1", url).to_dask_dataframe().compute()


@pytest.mark.timeout(90)  # the compute hung: the workers could not load the read's tasks
def test_a_fileset_read_by_our_function_on_workers_without_dask_manymodel_is_refused(client, ddf, tmp_path):
    # a URL with [ ] * ? in it is read file by file by dask_manymodel's own
    # function (Dask would read it as a pattern), which such workers cannot load
    url = str(tmp_path / "data[v1]")
    FileSet.make(url, "plain", ddf)
    cluster, other = _cluster_client(HIDE.format(hidden={"dask_manymodel"}))
    with cluster, other:
        with pytest.raises(MissingDependencyError, match="dask_manymodel cannot be imported on 1 of the cluster's"):
            FileSet(url, "plain").to_dask_dataframe().compute()
