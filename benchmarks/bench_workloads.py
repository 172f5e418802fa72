"""The issue-7 workloads: dask_manymodel against a serial pandas loop and
Dask's groupby.apply, doing the same per-group work (a 5-feature least-squares
fit, pickled, one file per group in a local folder).

    python benchmarks/bench_workloads.py            # all workloads
    python benchmarks/bench_workloads.py W1 W3      # some (W1-spread: W1 with every
                                                    # group's rows in every partition;
                                                    # W1-floor, W2-floor: per-group costs
                                                    # piece by piece, in one process;
                                                    # count: the count before a run;
                                                    # read: reading a predict run's output)

Times exclude cluster start and data generation (the data is persisted on
the workers first). Every way runs once per round, after an untimed warm-up
round; seconds are medians over --repeats rounds (default 3),
ratios are medians of the per-round ratios.
Ray Data's map_groups and Spark's applyInPandas run the same work when installed
(``pip install -e ".[compare]"``; skipped otherwise, or with --skip-others), each in rounds of its own.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _others import installed_engines  # noqa: E402
from _common import (  # noqa: E402
    dask_groupby_apply,
    fit,
    fresh_folder,
    local_cluster,
    make_dask,
    make_pandas,
    manymodel_train,
    median_ratio,
    no_fit,
    print_table,
    save,
    serial_loop,
    timed_rounds,
)


def persisted(client, sizes, spread=False):
    import distributed

    ddf = make_dask(sizes, spread=spread).persist()
    distributed.wait(ddf)
    return ddf


def three_ways(client, title: str, sizes: np.ndarray, repeats: int, spread: bool = False,
               without_fit: bool = False) -> None:
    """``without_fit`` adds the serial loop and dask_manymodel with the fit
    taken out (the model is 0): what each way costs besides the work."""
    pdf = make_pandas(sizes)
    ddf = persisted(client, sizes, spread)
    ways = {
        "serial pandas loop": lambda folder: serial_loop(pdf, folder),
        "dask groupby.apply": lambda folder: dask_groupby_apply(ddf, folder),
        "dask_manymodel": lambda folder: manymodel_train(ddf, folder),
    }
    if without_fit:
        ways["serial pandas loop, no fit"] = lambda folder: serial_loop(pdf, folder, work=no_fit)
        ways["dask_manymodel, no fit"] = lambda folder: manymodel_train(ddf, folder, work=no_fit)
    times = timed_rounds(ways, repeats)
    print_table(title, times, "serial pandas loop", "dask groupby.apply")
    if not spread and not SKIP_OTHERS:  # spread: the same pandas data, Ray and Spark would repeat themselves
        others(pdf, times, repeats)


SKIP_OTHERS = False  # --skip-others


def others(pdf, times: dict[str, list[float]], repeats: int) -> None:
    """Ray Data and Spark, each in rounds of its own beside the serial loop
    (see ``_others``), and compared with dask_manymodel through that loop."""
    ours_vs_serial = median_ratio(times["dask_manymodel"], times["serial pandas loop"])
    for name, engine in installed_engines().items():
        with engine(pdf) as job:
            their = timed_rounds({"serial pandas loop": lambda folder: serial_loop(pdf, folder), name: job}, repeats)
        vs_serial = median_ratio(their[name], their["serial pandas loop"])
        print(f"{name:<34}{statistics.median(their[name]):>10.2f}{vs_serial:>11.2f}"
              f"   (own rounds; serial loop {statistics.median(their['serial pandas loop']):.2f} s; "
              f"dask_manymodel / {name.split()[0]}: {ours_vs_serial / vs_serial:.2f})")


def heavy_fit(df):
    """W3's work grows with rows: 60 fits of the whole group."""
    for _ in range(59):
        fit(df)
    return fit(df)


def skew(client, repeats: int) -> None:
    import dask_manymodel  # noqa: F401

    total = 1_000_000
    sizes = np.full(200, int(total * 0.6 / 199))
    sizes[0] = int(total * 0.4)
    pdf = make_pandas(sizes)
    ddf = persisted(client, sizes)
    groups = [group for _, group in pdf.groupby("g")]
    works: list[list[float]] = []

    def serial_work(folder):
        """Each group's work in this process, one after the other: the ideal's input."""
        work = []
        for group in groups:
            start = time.perf_counter()
            heavy_fit(group)
            work.append(time.perf_counter() - start)
        works.append(work)

    def ours(folder):
        run = ddf.manymodel.train(lambda data, ctx: heavy_fit(data.to_pandas()), by="g", url=folder, run_id="w3")
        assert run.wait(show_progress=False).value == "SUCCESS"

    # The same work on two plain forked processes (no Dask, no files), largest
    # group first: what two cores give when both run this work at once.
    global _W3_GROUPS
    _W3_GROUPS = groups
    largest_first = sorted(range(len(groups)), key=lambda i: -len(groups[i]))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        def two_processes(folder):
            for _ in pool.imap_unordered(_w3_group_work, largest_first, chunksize=1):
                pass

        # the ideal is measured in every round, just before the runs it judges
        times = timed_rounds(
            {"serial work": serial_work, "two plain processes": two_processes, "dask_manymodel": ours}, repeats
        )
        # the pool's worker processes (a private attribute: Pool names no public one)
        pool_pids = [process.pid for process in pool._pool]
        cpu = {
            "two plain processes": cpu_seconds(client, two_processes, pool_pids=pool_pids),
            "dask_manymodel": cpu_seconds(client, ours),
        }
        fit_alone = fit_cpu_two_at_once(client, pool, groups)
    works = works[1:]  # works[0] is the warm-up round's
    ideals = [max(sum(work) / 2, max(work)) for work in works]
    print("\nW3 skew: 200 groups, group 0 holds 40% of the rows, work grows with rows (medians over rounds)")
    print(f"{'total work (serial)':<34}{statistics.median(sum(w) for w in works):>10.2f}")
    print(f"{'largest group':<34}{statistics.median(max(w) for w in works):>10.2f}")
    print(f"{'ideal max(total/2, largest)':<34}{statistics.median(ideals):>10.2f}")
    for name in ("two plain processes", "dask_manymodel"):
        seconds = times[name]
        print(f"{name:<34}{statistics.median(seconds):>10.2f}   "
              f"{median_ratio(seconds, ideals):.2f}x ideal (per round: "
              f"{', '.join(f'{t / i:.2f}' for t, i in zip(seconds, ideals))})")
    parts = list(cpu["dask_manymodel"])
    print(f"\nCPU seconds in one run (medians of 3 more runs, untimed)\n{'':<34}" + "".join(f"{p:>24}" for p in parts))
    for name, seconds in cpu.items():
        print(f"{name:<34}" + "".join(f"{seconds[part]:>24.2f}" for part in parts))
    print("CPU seconds of the fit alone on 40 small groups per process, two processes at once (medians of 5): "
          + ", ".join(f"{name} {seconds:.2f}" for name, seconds in fit_alone.items()))


def fit_cpu_two_at_once(client, pool, groups, rounds: int = 5) -> dict[str, float]:
    """The W3 fit alone, no engine around it: CPU seconds of 40 groups in each
    of two plain processes at once, and in each of the two Dask workers at once
    with the settings a run task applies (freed memory kept, gc frozen)."""
    shares = [range(1, 41), range(41, 81)]
    workers = list(client.scheduler_info()["workers"])[:2]
    scattered = [client.scatter([groups[i] for i in share], workers=[w]) for share, w in zip(shares, workers)]
    plain, in_workers = [], []
    for _ in range(rounds):
        plain.append(sum(pool.map(_w3_fit_cpu, shares, chunksize=1)))
        in_workers.append(sum(client.gather([
            client.submit(_fit_cpu_with_run_settings, data, workers=[w], pure=False)
            for data, w in zip(scattered, workers)
        ])))
    return {"two plain processes": statistics.median(plain), "two Dask workers": statistics.median(in_workers)}


def _fit_cpu(frames) -> float:
    """CPU seconds of the W3 work on ``frames`` in this thread."""
    start = time.thread_time()
    for frame in frames:
        heavy_fit(frame)
    return time.thread_time() - start


def _w3_fit_cpu(share: range) -> float:
    """:func:`_fit_cpu` of some W3 groups in a forked process (the groups came with the fork)."""
    return _fit_cpu([_W3_GROUPS[index] for index in share])


def _fit_cpu_with_run_settings(frames) -> float:
    """:func:`_fit_cpu` in a worker, under a run task's settings."""
    from dask_manymodel._gc import freeze_older_objects
    from dask_manymodel._malloc import keep_freed_memory

    with keep_freed_memory(), freeze_older_objects():
        return _fit_cpu(frames)


def cpu_seconds(client, job, pool_pids=(), runs: int = 3) -> dict[str, float]:
    """Median CPU seconds that ``job`` costs each part of the machine: the
    run's work (the worker threads that run tasks, or the plain processes),
    the workers' other threads (event loop, monitors), and this process (the
    client, the scheduler and the nannies of a LocalCluster)."""
    import psutil

    def snapshot():
        this = psutil.Process().cpu_times()
        parts = {"this process": this.user + this.system, "work": 0.0, "workers' other threads": 0.0}
        for pid in pool_pids:
            times = psutil.Process(pid).cpu_times()
            parts["work"] += times.user + times.system
        for threads in client.run(_worker_thread_cpu).values():
            parts["work"] += threads["task threads"]
            parts["workers' other threads"] += threads["other threads"]
        return parts

    samples = []
    for _ in range(runs):
        before = snapshot()
        job(fresh_folder())
        after = snapshot()
        samples.append({part: after[part] - before[part] for part in after})
    return {part: statistics.median(sample[part] for sample in samples) for part in samples[0]}


def _worker_thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this worker's task threads and of its other threads."""
    import threading

    import psutil

    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    seconds = {"task threads": 0.0, "other threads": 0.0}
    for thread in psutil.Process().threads():
        kind = "task threads" if "Dask-Default-Threads" in names.get(thread.id, "") else "other threads"
        seconds[kind] += thread.user_time + thread.system_time
    return seconds


_W3_GROUPS: list = []


def _w3_group_work(index: int) -> None:
    """One W3 group's work in a forked process (the groups came with the fork)."""
    heavy_fit(_W3_GROUPS[index])


def scale(client, repeats: int) -> None:
    """W4: the same 5-row groups at 20,000 and 200,000 groups, the two sizes
    alternating in rounds (this host drifts), so that seconds per 1,000 groups
    are compared within each round."""
    import dask_manymodel  # noqa: F401

    sizes = (20_000, 200_000)
    frames = {n_groups: persisted(client, np.full(n_groups, 5)) for n_groups in sizes}
    runs: dict[int, tuple[int, int]] = {}

    def job(n_groups):
        def run_it(folder):
            before = client.run_on_scheduler(_count_tasks)
            run = manymodel_train(frames[n_groups], folder)
            runs[n_groups] = (len(run.futures), client.run_on_scheduler(_count_tasks) - before)
        return run_it

    times = timed_rounds({n_groups: job(n_groups) for n_groups in sizes}, repeats, alternate=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nW4 scale: groups x 5 rows, {repeats} rounds (medians; client MB is this process's peak RSS)")
    print(f"{'groups':>10}{'seconds':>10}{'s/1000 groups':>15}{'train tasks':>13}{'all tasks':>11}")
    for n_groups in sizes:
        seconds = statistics.median(times[n_groups])
        train_tasks, all_tasks = runs[n_groups]
        print(f"{n_groups:>10,}{seconds:>10.1f}{seconds / n_groups * 1000:>15.3f}{train_tasks:>13}{all_tasks:>11,}")
    small, large = sizes
    per_round = [(t_large / large) / (t_small / small) for t_small, t_large in zip(times[small], times[large])]
    print(f"s/1000 groups at {large:,} over {small:,}: {statistics.median(per_round):.2f} "
          f"(per round: {', '.join(f'{r:.2f}' for r in per_round)}); client peak {peak_mb:.0f} MB")


def _count_tasks(dask_scheduler):
    """How many tasks the scheduler has seen so far (all states, all prefixes)."""
    return int(sum(sum(tp.state_counts.values()) for tp in dask_scheduler.task_prefixes.values()))


def inference(client, repeats: int) -> None:
    import dask_manymodel  # noqa: F401

    sizes = np.full(2000, 500)
    pdf = make_pandas(sizes)
    ddf = persisted(client, sizes)
    models = fresh_folder()
    manymodel_train(ddf, models)
    serial_models = fresh_folder()
    serial_loop(pdf, serial_models)
    features = [f"x{i}" for i in range(5)]

    def serial(folder):
        for key, group in pdf.groupby("g", sort=False):
            with open(os.path.join(serial_models, f"g={key}", "model.pkl"), "rb") as f:
                model = pickle.load(f)
            out = group.assign(pred=group[features].to_numpy() @ model)
            path = os.path.join(folder, f"g={key}")
            os.makedirs(path, exist_ok=True)
            out.to_parquet(os.path.join(path, "part-0.parquet"))

    def ours(folder):
        def infer(data, model, ctx):
            df = data.to_pandas()
            return df.assign(pred=df[features].to_numpy() @ model)

        run_id = f"p{time.monotonic_ns()}"
        run = ddf.manymodel.predict(infer, by="g", url=models, training_run_id="bench", run_id=run_id)
        assert run.wait(show_progress=False).value == "SUCCESS"

    times = timed_rounds({"serial loop": serial, "dask_manymodel predict": ours}, repeats)
    print_table("Inference on W2 (2,000 groups x 500 rows): load the model, predict, write parquet",
                times, "serial loop", None)
    save  # noqa: B018 (shared helper, used by the serial loop)


def read_output(client, repeats: int, n_groups: int = 20_000, rows: int = 10) -> None:
    """Reading a predict run's output back (what users do next with it):
    ``to_dask_dataframe().compute()`` against pandas' reader of the same
    hive-partitioned parquet dataset at ``url/run_id`` (pyarrow's, in one
    process)."""
    import pandas as pd

    import dask_manymodel  # noqa: F401

    sizes = np.full(n_groups, rows)
    ddf = persisted(client, sizes)
    models = fresh_folder()
    manymodel_train(ddf, models, work=no_fit)
    features = [f"x{i}" for i in range(5)]

    def infer(data, model, ctx):
        df = data.to_pandas()
        return df.assign(pred=df[features].to_numpy().sum(axis=1))

    run = ddf.manymodel.predict(infer, by="g", url=models, training_run_id="bench", run_id="out")
    assert run.wait(show_progress=False).value == "SUCCESS"
    dataset = os.path.join(models, "out")
    expected_rows = int(sizes.sum())

    def ours(folder):
        assert len(run.to_dask_dataframe().compute()) == expected_rows

    def pandas_reader(folder):
        assert len(pd.read_parquet(dataset)) == expected_rows

    # Dask's own dd.read_parquet(url/run_id) is left out: one task per file,
    # it took 134 s here (2026-11-30), 20 times the others
    times = timed_rounds({"pd.read_parquet(url/run_id)": pandas_reader, "run.to_dask_dataframe()": ours}, repeats)
    print_table(f"Reading a predict run's output: {n_groups:,} groups x {rows} rows (one file per group)",
                times, "pd.read_parquet(url/run_id)", None)


def floor(repeats: int, n_groups: int = 20_000, rows: int = 50, name: str = "W1") -> None:
    """A workload's per-group costs, piece by piece, in this one process: what
    two cores can do at best with the work each way must do. The fit and the
    files are also run by two processes at once, as two workers run them:
    on this machine each then costs more (the two cores share their cache
    and memory; the disk its journal)."""
    from dask_manymodel.engine import iter_groups

    global _FLOOR_DATA
    pdf = make_pandas(np.full(n_groups, rows))
    frames = [group for _, group in pdf.groupby("g", sort=False)]
    models = [fit(group) for group in frames]
    blobs = [pickle.dumps(model) for model in models]
    # the serial loop's own input, cut in two as two partitions would be
    loop_halves = [pdf[pdf["g"] < n_groups // 2], pdf[pdf["g"] >= n_groups // 2]]
    _FLOOR_DATA = (frames, models, blobs, loop_halves)
    everything = range(n_groups)
    halves = [range(0, n_groups, 2), range(1, n_groups, 2)]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        def two_at_once(function):
            return lambda folder: pool.starmap(function, [(folder, half) for half in halves])

        times = timed_rounds(
            {
                "groupby iteration (serial loop)": lambda folder: [None for _ in pdf.groupby("g", sort=False)],
                "sort and slices (dask_manymodel)": lambda folder: [None for _ in iter_groups(pdf, ["g"])],
                "fit": lambda folder: [fit(group) for group in frames],
                "pickle.dumps": lambda folder: [pickle.dumps(model) for model in models],
                "save: folder + one file": lambda folder: _loop_files(folder, everything),
                "folder + model + status": lambda folder: _our_files(folder, everything),
                "fit, two processes at once": two_at_once(_fit_groups),
                "save, two processes at once": two_at_once(_loop_files),
                "folder + model + status, two at once": two_at_once(_our_files),
                "serial loop (all of it)": lambda folder: serial_loop(pdf, folder),
                "serial loop, two processes at once": lambda folder: pool.starmap(
                    _serial_loop_half, [(folder, 0), (folder, 1)]
                ),
            },
            repeats,
        )
    halved = median_ratio(times["serial loop, two processes at once"], times["serial loop (all of it)"])
    us = {name: statistics.median(seconds) / n_groups * 1e6 for name, seconds in times.items()}
    for both in ("fit, two processes at once", "save, two processes at once", "folder + model + status, two at once",
                 "serial loop, two processes at once"):
        us[both] *= 2  # per group in each process: each wrote half of the groups
    print(f"\n{name} floor: microseconds per group ({n_groups:,} groups x {rows} rows, medians; "
          f"'two at once': per group in each of two processes doing it at the same time)")
    for piece, value in us.items():
        print(f"{piece:<48}{value:>8.0f}")
    serial = us["groupby iteration (serial loop)"] + us["fit"] + us["save: folder + one file"]
    ours = us["sort and slices (dask_manymodel)"] + us["fit"] + us["pickle.dumps"]
    print(f"{'serial loop: iteration + fit + save':<48}{serial:>8.0f}")
    print(f"{'dask_manymodel: slices + fit + pickle + files':<48}{ours + us['folder + model + status']:>8.0f}")
    two = ours - us["fit"] + us["fit, two processes at once"] + us["folder + model + status, two at once"]
    print(f"best on 2 cores, as a share of the serial loop: "
          f"{(ours + us['folder + model + status']) / 2 / serial:.2f}x at one process's speed, "
          f"{two / 2 / serial:.2f}x with the fit and the files at two processes' "
          f"(the pieces alone: no scheduling, no shuffle)")
    print(f"the serial loop itself, each half of the groups in one of two processes at once: {halved:.2f}x "
          f"the serial loop (no Dask; the input cut in two beforehand)")


_FLOOR_DATA: tuple = ()  # (groups, models, pickled models) for the floor's forked processes


def _fit_groups(folder: str, groups: range) -> None:
    frames = _FLOOR_DATA[0]
    for i in groups:
        fit(frames[i])


def _loop_files(folder: str, groups: range) -> None:
    """The serial loop's files: a folder and one file per group."""
    models = _FLOOR_DATA[1]
    for i in groups:
        save(folder, i, models[i])


def _serial_loop_half(folder: str, half: int) -> None:
    serial_loop(_FLOOR_DATA[3][half], folder)


def _our_files(folder: str, groups: range) -> None:
    """What a task writes: per batch of 1,000 groups the models (a temp name
    and a rename each), then the statuses."""
    from dask_manymodel.store import RunStore

    blobs = _FLOOR_DATA[2]
    store = RunStore(folder, "floor")
    status = b'{"partition_id": 0, "path": "g=0", "status": "DONE", "seconds": 0.0003, "rows": 50, "bytes": 200}'
    groups = list(groups)
    for first in range(0, len(groups), 1000):
        batch = groups[first:first + 1000]
        made: set[str] = set()
        store.write_many({store.path(f"g={i}", "model.pkl"): blobs[i] for i in batch}, made_folders=made)
        store.write_many({store.path(f"g={i}", "_partition.json"): status for i in batch}, atomic=False,
                         made_folders=made)


def count(client, repeats: int) -> None:
    """The count before a run: per-partition tasks combined on the workers
    (what runs use, on their persisted input) against Dask's own
    map_partitions + groupby.agg graph."""
    from dask_manymodel.engine import _count_groups_graph, count_groups

    print("\nThe count pass (seconds, medians)")
    print(f"{'groups x rows':<20}{'tasks + combine':>17}{'dask graph':>12}")
    for n_groups, rows in ((2_000, 500), (200_000, 5)):
        ddf = persisted(client, np.full(n_groups, rows))
        times = timed_rounds(
            {
                "ours": lambda folder: count_groups(ddf, ["g"], client),
                "graph": lambda folder: _count_groups_graph(ddf, ["g"], client).result(),
            },
            max(repeats, 5),
        )
        print(f"{f'{n_groups:,} x {rows}':<20}{statistics.median(times['ours']):>17.3f}"
              f"{statistics.median(times['graph']):>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workloads", nargs="*",
                        default=["W1", "W1-spread", "W1-floor", "W2", "W2-floor", "W3", "W4", "predict"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-others", action="store_true",
                        help="leave Ray Data and Spark out even when they are installed (they take minutes)")
    parser.add_argument("--keep-files", action="store_true",
                        help="leave the written files (delete them later, not right before another benchmark)")
    args = parser.parse_args()
    _common.KEEP_FILES = args.keep_files
    global SKIP_OTHERS
    SKIP_OTHERS = args.skip_others
    cluster, client = local_cluster()
    try:
        for workload in args.workloads:
            if workload == "W1":
                three_ways(client, "W1 many small: 20,000 groups x 50 rows", np.full(20_000, 50), args.repeats)
            elif workload == "W1-spread":
                three_ways(client, "W1, every group's rows spread over all 8 partitions (a shuffle is needed)",
                           np.full(20_000, 50), args.repeats, spread=True)
            elif workload == "W2":
                three_ways(client, "W2 medium: 2,000 groups x 500 rows", np.full(2_000, 500), args.repeats,
                           without_fit=True)
            elif workload == "W3":
                skew(client, args.repeats)
            elif workload == "count":
                count(client, args.repeats)
            elif workload == "W1-floor":
                floor(args.repeats)
            elif workload == "W2-floor":
                floor(args.repeats, n_groups=2_000, rows=500, name="W2")
            elif workload == "W4":
                scale(client, args.repeats)
            elif workload == "predict":
                inference(client, args.repeats)
            elif workload == "read":
                read_output(client, args.repeats)
            sys.stdout.flush()
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    main()
