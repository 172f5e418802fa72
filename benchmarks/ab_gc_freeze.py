"""A/B: dask_manymodel's run tasks with and without freezing the worker's
older objects from the garbage collector (``dask_manymodel._gc``).

    python benchmarks/ab_gc_freeze.py              # W1 and W2, 8 rounds each
    python benchmarks/ab_gc_freeze.py W2 --rounds 12

One cluster, the same persisted data; each round runs both ways, in an
order that alternates from round to round (this machine's speed drifts, see
``_common.timed_rounds``). Prints median seconds and the median of the
per-round ratios frozen / not frozen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import distributed
import numpy as np

from _common import fresh_folder, local_cluster, make_dask, manymodel_train

WORKLOADS = {"W1": np.full(20_000, 50), "W2": np.full(2_000, 500)}


def _set_freezing(enabled: bool) -> None:
    """In a worker: let run tasks freeze older objects, or not."""
    import contextlib

    from dask_manymodel import _gc, engine

    engine.freeze_older_objects = _gc.freeze_older_objects if enabled else contextlib.nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workloads", nargs="*", default=list(WORKLOADS), help="W1, W2 (default: both)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}: choose from {list(WORKLOADS)}")
    cluster, client = local_cluster()
    print(f"{'workload':<10}{'not frozen':>12}{'frozen':>10}{'frozen / not':>14}")
    try:
        for workload in args.workloads:
            ddf = make_dask(WORKLOADS[workload]).persist()
            distributed.wait(ddf)
            manymodel_train(ddf, fresh_folder())  # warm-up, not timed
            times: dict[bool, list[float]] = {False: [], True: []}
            for round_number in range(args.rounds):
                for frozen in (False, True) if round_number % 2 == 0 else (True, False):
                    client.run(_set_freezing, frozen)
                    folder = fresh_folder()
                    os.sync()
                    start = time.perf_counter()
                    manymodel_train(ddf, folder)
                    times[frozen].append(time.perf_counter() - start)
            ratio = statistics.median(f / n for f, n in zip(times[True], times[False]))
            print(
                f"{workload:<10}{statistics.median(times[False]):>11.2f}s"
                f"{statistics.median(times[True]):>9.2f}s{ratio:>14.3f}"
            )
            del ddf
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
