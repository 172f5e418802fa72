"""Inference against a training run on S3: models downloaded in batches
(many per request, fetched concurrently by s3fs) against one model per
request.

    python benchmarks/bench_remote_predict.py                 # 2,000 groups
    python benchmarks/bench_remote_predict.py --groups 500 --rounds 5

The S3 server is moto's ThreadedMotoServer on 127.0.0.1 in this process;
requests to it cost a few ms each, as a real object store's do (those cost
more). LocalCluster of 2 single-thread worker processes. The training run
is written once; after an untimed warm-up round, each round predicts both
ways, in alternating order (``_common.timed_rounds``), and the table gives
median seconds and the median per-round ratio.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics

import distributed
import numpy as np
import pandas as pd

from _common import FEATURES, local_cluster, make_dask, median_ratio, timed_rounds


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_batch_files(files: int) -> None:
    """In a worker: at most this many models per download request."""
    from dask_manymodel import engine

    engine._PREFETCH_FILES = files


def train(data, ctx):
    df = data.to_pandas()
    weights, *_ = np.linalg.lstsq(df[FEATURES].to_numpy(), df["y"].to_numpy(), rcond=None)
    return weights


def infer(data, model, ctx):
    df = data.to_pandas()
    return pd.DataFrame({"pred": df[FEATURES].to_numpy() @ model})


def main() -> None:
    import s3fs
    from moto.server import ThreadedMotoServer

    import dask_manymodel  # noqa: F401
    from dask_manymodel import engine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "bench", "secret": "bench", "skip_instance_cache": True,
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
    }
    s3fs.S3FileSystem(**options).mkdir("bench")
    cluster, client = local_cluster()
    try:
        ddf = make_dask(np.full(args.groups, 50)).persist()
        distributed.wait(ddf)
        url = "s3://bench/models"
        run = ddf.manymodel.train(train, by="g", url=url, run_id="trained", storage_options=options)
        assert run.wait(show_progress=False).value == "SUCCESS"
        runs = iter(range(10**6))  # a fresh run id for every predict run

        def predict_with(files_per_request: int):
            def job(folder: str) -> None:  # the models stay on S3; folder unused
                client.run(_set_batch_files, files_per_request)  # a few ms, in both ways alike
                inference = ddf.manymodel.predict(
                    infer, by="g", url=url, training_run_id="trained", run_id=f"p{next(runs)}",
                    storage_options=options,
                )
                assert inference.wait(show_progress=False).value == "SUCCESS"

            return job

        times = timed_rounds(
            {"one model per request": predict_with(1), "batched (this library)": predict_with(engine._PREFETCH_FILES)},
            args.rounds,
            alternate=True,
        )
        baseline = times["one model per request"]
        print(f"\nInference on S3 (moto), {args.groups:,} groups x 50 rows, medians of {args.rounds}")
        print(f"{'way':<28}{'seconds':>10}{'ratio':>8}")
        for name, seconds in times.items():
            print(f"{name:<28}{statistics.median(seconds):>10.2f}{median_ratio(seconds, baseline):>8.2f}")
    finally:
        client.close()
        cluster.close()
        server.stop()


if __name__ == "__main__":
    main()
