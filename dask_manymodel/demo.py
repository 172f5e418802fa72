"""The README's main job: train 1,000 per-store models on a LocalCluster."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

N_FEATURES = 5


def make_sales(
    n_stores: int = 1000, rows_per_store: int = 200, seed: int = 0, stores: np.ndarray | None = None
) -> pd.DataFrame:
    """Synthetic sales: per store, y = x @ w_store + noise (the weights depend
    only on the store, so chunks made separately agree)."""
    rng = np.random.default_rng(seed)
    stores = np.arange(n_stores) if stores is None else stores
    store = np.repeat(stores, rows_per_store)
    x = rng.normal(size=(len(store), N_FEATURES))
    weights = np.random.default_rng(1234).normal(size=(n_stores, N_FEATURES))
    y = np.einsum("ij,ij->i", x, weights[store]) + rng.normal(scale=0.1, size=len(store))
    frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(N_FEATURES)])
    frame.insert(0, "store", store)
    frame["y"] = y
    return frame


def fit_least_squares(data, ctx):
    """Train function: least-squares weights of y on x0..x4 for one store."""
    df = data.to_pandas()
    features = df[[f"x{i}" for i in range(N_FEATURES)]].to_numpy()
    weights, *_ = np.linalg.lstsq(features, df["y"].to_numpy(), rcond=None)
    ctx.logger.info("store %s: %d rows", ctx.partition_id, len(df))
    return weights


def predict_least_squares(data, model, ctx):
    """Inference function: add a ``pred`` column."""
    df = data.to_pandas()
    features = df[[f"x{i}" for i in range(N_FEATURES)]].to_numpy()
    return df[["store", "y"]].assign(pred=features @ model)


def rows_and_rmse(predictions) -> tuple[int, float]:
    """How many rows were scored, and the RMSE of ``pred`` against ``y``, in
    one pass over the inference output (``len()``, then the error's mean,
    read every output file twice)."""
    import dask

    errors = (predictions["y"] - predictions["pred"]) ** 2
    rows, mean = dask.compute(errors.size, errors.mean())
    return int(rows), float(np.sqrt(mean))


def run_demo(url: str, n_stores: int = 1000, rows_per_store: int = 200, n_workers: int = 2) -> int:
    """Train one model per store into ``url``, predict with them, print a
    summary. Returns 0 when both runs are a SUCCESS, else 1."""
    import dask.dataframe as dd
    import distributed

    import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
    from .run import dashboard_link_of
    from .store import shown_url

    _check_url(url)
    with distributed.LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client:
        print(f"Dask dashboard: {dashboard_link_of(client)}")
        # each partition is generated on a worker, so no data travels in the graph
        chunks = np.array_split(np.arange(n_stores), 8)
        sales = dd.from_map(
            lambda chunk: make_sales(n_stores, rows_per_store, seed=int(chunk[0]), stores=chunk),
            [c for c in chunks if len(c)],
        )
        run = sales.manymodel.train(
            fit_least_squares, by="store", url=url, run_id="demo-train",
            on_existing_artifacts="overwrite",
        )
        status = run.wait()
        print(f"training run {run.run_id!r}: {status.value}")
        summary = run.summary()
        print(summary["status"].value_counts().to_string())
        print(summary.head().to_string(index=False))

        scores = sales.manymodel.predict(
            predict_least_squares, by="store", url=url, training_run_id="demo-train",
            run_id="demo-scores", on_existing_artifacts="overwrite",
        )
        scored = scores.wait()
        print(f"inference run {scores.run_id!r}: {scored.value}")
        rows, rmse = rows_and_rmse(scores.to_dask_dataframe())
        print(f"rows scored: {rows}, RMSE {rmse:.4f}")
        print(f"models and scores are in {shown_url(url)}")
        # either run not a SUCCESS is a failure the command found (exit 1):
        # an inference run with groups FAILED exited 0
        return 0 if status.value == scored.value == "SUCCESS" else 1


def _check_url(url: str) -> None:
    """Refuse a ``url`` the demo's runs cannot be written to before its
    cluster starts: an unknown protocol, a missing bucket, a local folder
    that cannot be made, or memory:// (private to each process, and the
    demo's workers are processes of their own). They were refused by the
    first run, after seconds of starting and stopping worker processes."""
    from .engine import check_reachable
    from .exceptions import InvalidURLError
    from .store import RunStore

    store = RunStore(url, "demo-train")
    check_reachable(store)
    if store.is_in_memory:
        raise InvalidURLError(
            f"{store.url_shown!r} is in-memory and private to each process, and the demo's workers are "
            f"processes of their own; give a local folder (the default is ./manymodel-demo) or an object "
            f"store URL"
        )
