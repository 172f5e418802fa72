"""Per-group cost of a train run of W1's work, counted in instructions
(valgrind's callgrind) rather than seconds: an A/B of versions of the code
that this host's noise cannot move (wall and CPU times of one version vary
by +-15% from minute to minute here; a count of instructions repeats).

    .venv/bin/python benchmarks/ab_instructions.py new=. old=<a worktree of the old commit>

Each version (``label=folder``: the folder goes first on ``PYTHONPATH``) runs
a child process under ``valgrind --tool=callgrind --separate-threads=yes``
twice: with one train run and with three of the same groups, on an
in-process cluster of one worker thread. The difference is two runs'
worth, without the imports and the cluster's start. The table gives, per
group, the instructions of the worker thread that runs the groups (found by
the LAPACK call of the fit: the user function, dask_manymodel's own work,
the writes), and of the whole process (adds the event loop's scheduling,
the shuffle, and the periodic work of the scheduler and the worker, which
grows with the run's wall time under valgrind: less repeatable). Each child
takes 2-3 minutes; the two of a version run at once.
"""
import argparse
import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np

FEATURES = [f"x{i}" for i in range(5)]


def fit(data, ctx):
    df = data.to_pandas()
    return np.linalg.lstsq(df[FEATURES].to_numpy(), df["y"].to_numpy(), rcond=None)[0]


def child(groups: int, runs: int) -> None:
    """The measured program: ``runs`` train runs of ``groups`` groups x 50 rows."""
    import dask.dataframe as dd
    import distributed
    import pandas as pd

    import dask_manymodel  # noqa: F401  (registers ddf.manymodel)

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(groups * 50, 5)), columns=FEATURES)
    frame["y"] = rng.normal(size=groups * 50)
    frame["g"] = np.repeat(np.arange(groups), 50)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
                                  silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as client:
        ddf = client.persist(dd.from_pandas(frame, npartitions=4, sort=False))
        for _ in range(runs):
            url = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
            try:  # (/dev/shm is memory: a failed run's files held it for good)
                assert ddf.manymodel.train(fit, by="g", url=url, run_id="r").wait(show_progress=False).value == "SUCCESS"
            finally:
                shutil.rmtree(url)


def count(folder: str, groups: int, runs: int) -> tuple[int, int]:
    """(worker thread's, whole process's) instructions of ``runs`` runs."""
    out = tempfile.mkdtemp(prefix="mm-callgrind-")
    try:
        env = dict(os.environ, PYTHONPATH=os.path.abspath(folder))
        subprocess.run(
            ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}/cg.out",
             sys.executable, os.path.abspath(__file__), "--child", str(groups), str(runs)],
            env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=out,
        )
        worker, total = 0, 0
        for path in glob.glob(f"{out}/cg.out-*"):
            with open(path) as file:
                text = file.read()
            summary = next(line for line in text.splitlines() if line.startswith(("summary:", "totals:")))
            instructions = int(summary.split()[1])
            total += instructions
            if "lstsq" in text:  # the thread that ran the groups' fits
                worker += instructions
        return worker, total
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("versions", nargs="+", help="label=folder, the folder put first on PYTHONPATH")
    parser.add_argument("--groups", type=int, default=500)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind)")
    rows = []
    for version in args.versions:
        label, _, folder = version.partition("=")
        with ThreadPoolExecutor(2) as pool:
            one, three = pool.map(lambda runs: count(folder or ".", args.groups, runs), (1, 3))
        per_group = [(b - a) / (2 * args.groups) for a, b in zip(one, three)]
        rows.append((label, *per_group))
    print(f"\n{args.groups} groups x 50 rows, instructions per group (two runs' difference):\n")
    print("| version | worker thread | whole process |")
    print("| --- | ---: | ---: |")
    for label, worker, total in rows:
        print(f"| {label} | {worker / 1e6:.3f} M | {total / 1e6:.3f} M |")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
