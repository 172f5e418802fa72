"""Shared pieces of the workload benchmarks: data, the per-group work, and
the three ways to run it (a serial pandas loop, Dask's groupby.apply,
dask_manymodel)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import pandas as pd

FEATURES = [f"x{i}" for i in range(5)]


def make_chunk(groups: np.ndarray, rows_per_group: np.ndarray, seed: int) -> pd.DataFrame:
    """Rows of some groups: y = x @ w_group + noise."""
    rng = np.random.default_rng(seed)
    key = np.repeat(groups, rows_per_group)
    x = rng.normal(size=(len(key), len(FEATURES)))
    weights = np.random.default_rng(12345).normal(size=(int(groups.max()) + 1, len(FEATURES)))
    frame = pd.DataFrame(x, columns=FEATURES)
    frame.insert(0, "g", key)
    frame["y"] = np.einsum("ij,ij->i", x, weights[key]) + rng.normal(scale=0.1, size=len(key))
    return frame


def make_dask(rows_per_group: np.ndarray, npartitions: int = 8, spread: bool = False):
    """The data as a Dask DataFrame generated on the workers (small graphs).

    By default each partition holds whole groups (as data written or read
    per group is). ``spread=True`` puts a share of every group's rows in
    every partition, so a run has to shuffle.
    """
    import dask.dataframe as dd

    groups = np.arange(len(rows_per_group))
    if spread:
        shares = [np.diff(np.linspace(0, n, npartitions + 1).astype(int)) for n in rows_per_group]
        parts = [(groups, np.array([share[p] for share in shares]), p) for p in range(npartitions)]
        return dd.from_map(lambda part: make_chunk(*part), parts)
    chunks = [c for c in np.array_split(groups, npartitions) if len(c)]
    return dd.from_map(lambda c: make_chunk(c, rows_per_group[c], int(c[0])), chunks)


def make_pandas(rows_per_group: np.ndarray, npartitions: int = 8) -> pd.DataFrame:
    groups = np.arange(len(rows_per_group))
    chunks = [c for c in np.array_split(groups, npartitions) if len(c)]
    return pd.concat([make_chunk(c, rows_per_group[c], int(c[0])) for c in chunks], ignore_index=True)


def fit(df: pd.DataFrame) -> np.ndarray:
    """The per-group work: a 5-feature least-squares fit. (The dtype is named
    because Ray Data hands groups over with pyarrow-backed columns.)"""
    x, y = df[FEATURES].to_numpy(dtype=np.float64), df["y"].to_numpy(dtype=np.float64)
    weights, *_ = np.linalg.lstsq(x, y, rcond=None)
    return weights


def save(folder: str, key, model) -> None:
    path = os.path.join(folder, f"g={key}")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.pkl"), "wb") as f:
        pickle.dump(model, f)


def serial_loop(pdf: pd.DataFrame, folder: str, work: Callable[[pd.DataFrame], object] = fit) -> None:
    for key, group in pdf.groupby("g", sort=False):
        save(folder, key, work(group))


def dask_groupby_apply(ddf, folder: str) -> None:
    def work(group: pd.DataFrame) -> int:
        save(folder, group.name, fit(group))  # pandas 3 hides the key column in apply
        return len(group)

    ddf.groupby("g").apply(work, meta=("rows", "int64")).compute()


def no_fit(df: pd.DataFrame) -> int:
    """In place of :func:`fit`, to measure what a way costs without the work."""
    return 0


def manymodel_train(ddf, folder: str, work: Callable[[pd.DataFrame], object] = fit, **kwargs):
    import dask_manymodel  # noqa: F401

    def train(data, ctx):
        return work(data.to_pandas())

    run = ddf.manymodel.train(train, by="g", url=folder, run_id="bench", **kwargs)
    status = run.wait(show_progress=False)
    assert status.value == "SUCCESS", run.summary()["error"].dropna().head()
    return run


_SCRATCH: list[str] = []
KEEP_FILES = False  # --keep-files: leave the scratch folder for the caller to delete later


def fresh_folder() -> str:
    """An empty folder for one timed run, removed when the benchmark exits.

    Not removed between runs on purpose: this disk skips recently deleted
    inodes when it allocates new ones (seen in ``perf``: ext4's
    ``recently_deleted``), so a run that starts right after another run's
    60,000 files were deleted creates its own files far slower, which would
    charge one way for another's clean-up. For the same reason, run the
    benchmarks minutes after any large delete, and with ``--keep-files``
    when one benchmark process follows another.
    """
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="mm-bench-"))
        _exit_on_sigterm()
        if KEEP_FILES:
            print(f"(files kept in {_SCRATCH[0]})")
            atexit.register(_say_what_is_kept, _SCRATCH[0])
        else:
            atexit.register(_remove_scratch, _SCRATCH[0])
    return tempfile.mkdtemp(dir=_SCRATCH[0])


def _exit_on_sigterm() -> None:
    """A SIGTERM (``timeout``, a CI job cancelled, ``kill``) ends the process
    as Ctrl-C does, through ``finally`` and ``atexit``: by default it ended
    it at once, and the scratch folder (GBs: W4 writes about 11 GB) stayed
    in the temp folder for good."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        # (forked children too, a multiprocessing pool's: one killed outright
        # while it waited for a task held the pool's lock, and the pool's
        # terminate() in the main process waited for that lock for good)
        signal.signal(signal.SIGTERM, lambda number, frame: sys.exit(128 + number))


def _remove_scratch(folder: str) -> None:
    # (millions of files after W4: minutes, and Ctrl-C meanwhile leaves the rest)
    print(f"(removing the benchmark's files in {folder})", flush=True)
    try:
        shutil.rmtree(folder, ignore_errors=True)
    except BaseException:
        print(f"(interrupted: delete what is left yourself: rm -rf {folder})", flush=True)
        raise


def _say_what_is_kept(folder: str) -> None:
    """--keep-files: where the files are and how much of the disk they take."""
    files, used = 0, 0
    for parent, folders, names in os.walk(folder):
        for name in [*folders, *names]:  # (a folder's own blocks too: W4 makes 880,000)
            files += 1
            with contextlib.suppress(OSError):
                used += os.lstat(os.path.join(parent, name)).st_blocks * 512
    print(f"(--keep-files: {files:,} files and folders, {used / 2**30:.2f} GiB of disk, kept in {folder}; "
          f"delete them (rm -rf {folder}) once done, long before the next benchmark)", flush=True)


def timed_rounds(
    jobs: dict[str, Callable[[str], object]], repeats: int = 3, alternate: bool = False
) -> dict[str, list[float]]:
    """Wall times of each ``job(fresh_folder)``, run in rounds: every way once
    per round, one after the other. This machine's speed drifts by 10-20%
    over minutes (a shared host), so ways compared inside one round see the
    same machine; ratios are then taken round by round (:func:`print_table`).
    A first round is not timed: it warms every way up (imports and pickled
    functions in the workers, pages of forked processes). ``alternate``
    reverses the order every other round, for A/B runs of two ways."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for round_number in range(repeats + 1):
        order = list(jobs.items())
        if alternate and round_number % 2:
            order.reverse()
        for name, job in order:
            folder = fresh_folder()
            # flush what earlier runs left for the kernel to write back: otherwise
            # that disk work lands on the cores during the next run
            os.sync()
            start = time.perf_counter()
            job(folder)
            if round_number:
                times[name].append(time.perf_counter() - start)
    return times


def median_ratio(times: list[float], baseline: list[float]) -> float:
    """Median over rounds of ``times[i] / baseline[i]``."""
    return statistics.median(t / b for t, b in zip(times, baseline))


def local_cluster():
    """2 single-thread worker processes, as the targets assume."""
    import distributed

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    )
    return cluster, distributed.Client(cluster)


def print_table(title: str, times: dict[str, list[float]], serial: str, apply: str | None) -> None:
    """Median seconds of each way, and the medians of its per-round ratios
    to the ways named ``serial`` and ``apply``."""
    print(f"\n{title}")
    print(f"{'way':<34}{'seconds':>10}{'vs serial':>11}{'vs apply':>10}")
    for name, seconds in times.items():
        vs_apply = f"{median_ratio(seconds, times[apply]):>10.2f}" if apply else f"{'':>10}"
        print(f"{name:<34}{statistics.median(seconds):>10.2f}{median_ratio(seconds, times[serial]):>11.2f}{vs_apply}")
