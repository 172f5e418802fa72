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


@pytest.fixture(scope="module")
def gpu_cluster():
    """Two worker processes; only the first offers a GPU resource."""
    import distributed

    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        gpu_worker, _ = sorted(cluster.scheduler.workers)
        # give one worker a GPU resource: only it may run the user-function tasks
        client.run(_give_gpu, workers=[gpu_worker])
        yield client, gpu_worker


ON_THE_GPU = ExecutionOptions(resources={"GPU": 1}, npartitions=3)


def test_gpu_groups_run_on_the_gpu_worker(tmp_path, gpu_cluster):
    client, gpu_worker = gpu_cluster
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=50), npartitions=2)
    run = ddf.manymodel.train(
        train_on_gpu, by="store", url=str(tmp_path), run_id="gpu", execution_options=ON_THE_GPU,
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert {client.who_has(f)[f.key][0] for f in run.futures} == {gpu_worker}
    assert "trained on NVIDIA" in run.partition_details[0].logs
    model = run.get_model(4)
    np.testing.assert_allclose(model.weight.item(), 1.4, atol=1e-3)
    np.testing.assert_allclose(model.bias.item(), 4.0, atol=1e-3)


def train_and_keep_on_gpu(data, ctx):
    """As train_on_gpu, but returns the module where it lives: on the GPU."""
    return train_on_gpu(data, ctx).to("cuda")


def predict_on_gpu(data, model, ctx):
    import torch

    df = data.to_pandas()
    assert next(model.parameters()).device.type == "cpu"  # the serde loads on the CPU
    model = model.to("cuda")
    x = torch.tensor(df[["x"]].to_numpy(), dtype=torch.float32, device="cuda")
    with torch.no_grad():
        prediction = model(x).cpu().numpy()[:, 0]
    return df.assign(pred=prediction, device=torch.cuda.get_device_name(0))


@pytest.mark.parametrize("weights_only", [False, True])
def test_a_model_left_on_the_gpu_loads_on_the_cpu_and_predicts_on_the_gpu(tmp_path, gpu_cluster, weights_only):
    """TorchSerde's map_location="cpu": a module returned while on the GPU
    (whole, or its state_dict) is read back with CPU tensors, so a client
    without a GPU can load it; inference moves it to the GPU again."""
    import torch

    from dask_manymodel import TorchSerde

    client, gpu_worker = gpu_cluster
    serde = TorchSerde(weights_only=True, model_factory=lambda: torch.nn.Linear(1, 1)) if weights_only else TorchSerde()
    frame = make_frame(n_groups=6, rows=50)
    ddf = dd.from_pandas(frame, npartitions=2)
    run = ddf.manymodel.train(
        train_and_keep_on_gpu, by="store", url=str(tmp_path), run_id="gpu", serde=serde,
        execution_options=ON_THE_GPU,
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].dropna().tolist()
    model = run.get_model(3)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    np.testing.assert_allclose(model.weight.item(), 1.3, atol=1e-3)

    scores = ddf.manymodel.predict(
        predict_on_gpu, by="store", url=str(tmp_path), training_run_id="gpu", run_id="gpu-scores",
        serde=serde, execution_options=ON_THE_GPU,
    )
    assert scores.wait(show_progress=False) == RunStatus.SUCCESS, scores.summary()["error"].dropna().tolist()
    assert {client.who_has(f)[f.key][0] for f in scores.futures} == {gpu_worker}
    out = scores.to_dask_dataframe().compute()
    assert len(out) == len(frame)
    assert out["device"].str.startswith("NVIDIA").all()
    store = out["store"].astype("int64")
    np.testing.assert_allclose(out["pred"], (1 + store / 10) * out["x"] + store, atol=1e-3)
