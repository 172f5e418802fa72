"""Workers whose Python environment differs from the client's (a cluster's
image against the user's laptop): what they lack is said before any task
runs, and nothing is written."""

from __future__ import annotations

import logging
import os

import dask.dataframe as dd
import distributed
import pytest

import dask_manymodel
from dask_manymodel import FileSet, MissingDependencyError, RunStatus, TorchSerde
from tests.conftest import fit_line, make_frame

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
