"""Rows/s of the data connectors against the limit and the naive ways.

One group of 1,000,000 rows x 16 float32 columns, batch 1,024, shuffle=True,
one epoch; each number is the median of 3 epochs. Run:

    python benchmarks/bench_connectors.py
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROWS, COLUMNS, BATCH = 1_000_000, 16, 1024


def timed(run, repeats: int = 3) -> float:
    """Median seconds of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    import torch

    from dask_manymodel import DataConnector, FileSet

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((ROWS, COLUMNS), dtype=np.float32), columns=[f"c{i}" for i in range(COLUMNS)])
    arrays = [frame[c].to_numpy() for c in frame.columns]
    data = DataConnector.from_pandas(frame)
    results = {}

    def numpy_limit():
        order = np.random.default_rng(1).permutation(ROWS)
        for start in range(0, ROWS - BATCH + 1, BATCH):
            index = order[start : start + BATCH]
            [torch.from_numpy(a[index]) for a in arrays]

    ours = data.to_torch_dataset(batch_size=BATCH, shuffle=True, seed=0)

    def torch_ours():
        for _ in ours:
            pass

    tensors = torch.utils.data.TensorDataset(*[torch.from_numpy(a) for a in arrays])

    def torch_naive():
        for _ in torch.utils.data.DataLoader(tensors, batch_size=BATCH, shuffle=True, drop_last=True):
            pass

    results["numpy gather (limit)"] = timed(numpy_limit)
    results["to_torch_dataset"] = timed(torch_ours)
    results["DataLoader(TensorDataset) (naive)"] = timed(torch_naive, repeats=1)

    import tensorflow as tf

    tf_ours = data.to_tf_dataset(batch_size=BATCH, shuffle=True, seed=0)
    tf_naive = tf.data.Dataset.from_tensor_slices(dict(zip(frame.columns, arrays))).shuffle(ROWS).batch(BATCH)

    def iterate(dataset):
        def run():
            for _ in dataset:
                pass

        return run

    results["to_tf_dataset"] = timed(iterate(tf_ours))
    results["from_tensor_slices.shuffle.batch (tf naive)"] = timed(iterate(tf_naive), repeats=1)

    with tempfile.TemporaryDirectory() as folder:
        import dask.dataframe as dd
        import pyarrow.parquet as pq

        fileset = FileSet.make(folder, "bench", dd.from_pandas(frame, npartitions=8))
        stream = fileset.to_torch_dataset(batch_size=BATCH, shuffle=True, seed=0)

        def fileset_stream():
            for _ in stream:
                pass

        def read_tables():
            for path in fileset.files():
                pq.read_table(path)

        results["FileSet.to_torch_dataset (8 files)"] = timed(fileset_stream)
        results["pyarrow.parquet.read_table (same files)"] = timed(read_tables)

    print(f"{'way':<46}{'seconds':>10}{'rows/s':>14}")
    for name, seconds in results.items():
        print(f"{name:<46}{seconds:>10.3f}{ROWS / seconds:>14,.0f}")
    limit = results["numpy gather (limit)"]
    print(f"\nto_torch_dataset: {limit / results['to_torch_dataset']:.2f}x the limit, "
          f"{results['DataLoader(TensorDataset) (naive)'] / results['to_torch_dataset']:.1f}x the naive way")
    print(f"to_tf_dataset: {limit / results['to_tf_dataset']:.2f}x the limit, "
          f"{results['from_tensor_slices.shuffle.batch (tf naive)'] / results['to_tf_dataset']:.1f}x tf naive")
    print(f"FileSet streaming: {results['pyarrow.parquet.read_table (same files)'] / results['FileSet.to_torch_dataset (8 files)']:.2f}x "
          f"plain read_table")


if __name__ == "__main__":
    main()
