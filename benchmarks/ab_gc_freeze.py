"""A/B: dask_manymodel's run tasks with and without freezing the worker's
older objects from the garbage collector (``dask_manymodel._gc``).

    python benchmarks/ab_gc_freeze.py              # W1 and W2, 8 rounds each
    python benchmarks/ab_gc_freeze.py W2 --rounds 12

One cluster, the same persisted data; after an untimed warm-up round, each
round runs both ways, in an order that alternates from round to round (this
machine's speed drifts, see ``_common.timed_rounds``). Prints median seconds and the median of the
per-round ratios frozen / not frozen.
"""

from __future__ import annotations

import argparse
import statistics

import distributed
import numpy as np

from _common import local_cluster, make_dask, manymodel_train, median_ratio, timed_rounds

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

            def frozen_or_not(frozen: bool):
                def job(folder: str) -> None:
                    client.run(_set_freezing, frozen)  # a few ms, in both ways alike
                    manymodel_train(ddf, folder)

                return job

            times = timed_rounds(
                {"not frozen": frozen_or_not(False), "frozen": frozen_or_not(True)}, args.rounds, alternate=True
            )
            print(
                f"{workload:<10}{statistics.median(times['not frozen']):>11.2f}s"
                f"{statistics.median(times['frozen']):>9.2f}s"
                f"{median_ratio(times['frozen'], times['not frozen']):>14.3f}"
            )
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
