"""GPU placement: only runs where torch sees a CUDA device (skipped elsewhere)."""

from __future__ import annotations

import logging

import dask.dataframe as dd
import numpy as np
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import ExecutionOptions, RunStatus

from .conftest import make_frame

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def train_on_gpu(data, ctx):
    import torch

    df = data.to_pandas()
    device = torch.device("cuda")
    x = torch.tensor(df[["x"]].to_numpy(), dtype=torch.float32, device=device)
    y = torch.tensor(df[["y"]].to_numpy(), dtype=torch.float32, device=device)
    model = torch.nn.Linear(1, 1).to(device)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    ctx.logger.warning("trained on %s", torch.cuda.get_device_name(0))
    return model.cpu()


async def _give_gpu(dask_worker):
    await dask_worker.set_resources(GPU=1)


def test_gpu_groups_run_on_the_gpu_worker(tmp_path):
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        gpu_worker, cpu_worker = sorted(cluster.scheduler.workers)
        # give one worker a GPU resource: only it may run the user-function tasks
        client.run(_give_gpu, workers=[gpu_worker])
        ddf = dd.from_pandas(make_frame(n_groups=6, rows=50), npartitions=2)
        run = ddf.manymodel.train(
            train_on_gpu, by="store", url=str(tmp_path), run_id="gpu",
            execution_options=ExecutionOptions(resources={"GPU": 1}, npartitions=3),
        )
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        assert {client.who_has(f)[f.key][0] for f in run.futures} == {gpu_worker}
        assert "trained on NVIDIA" in run.partition_details[0].logs
        model = run.get_model(4)
        np.testing.assert_allclose(model.weight.item(), 1.4, atol=1e-3)
        np.testing.assert_allclose(model.bias.item(), 4.0, atol=1e-3)
