"""What a run's start pays to ask the workers whether they see a local
folder (``check_workers_see_local_folder``: a marker file and one
``client.run``), against a bare ``client.run``, on a LocalCluster of 2
single-thread worker processes.

    .venv/bin/python benchmarks/probe_cost.py [--calls 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import distributed

from dask_manymodel.engine import check_workers_see_local_folder
from dask_manymodel.store import RunStore


def timed_ms(call, calls: int) -> list[float]:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    calls = parser.parse_args().calls
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster) as client, tempfile.TemporaryDirectory() as folder:
        store = RunStore(f"{folder}/models", "r1")
        rows = {
            "folder probe": timed_ms(lambda: check_workers_see_local_folder(store, client), calls),
            "bare client.run": timed_ms(lambda: client.run(lambda: 1), calls),
        }
    print(f"{'call':<20}{'first ms':>10}{'median ms':>11}{'max ms':>9}   ({calls} calls each)")
    for name, times in rows.items():
        print(f"{name:<20}{times[0]:>10.1f}{statistics.median(times):>11.1f}{max(times):>9.1f}")


if __name__ == "__main__":
    main()
