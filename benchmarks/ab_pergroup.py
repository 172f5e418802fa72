"""Per-group cost of a train run of W1's work (5,000 groups x 50 rows), on
an in-process cluster of one thread, files on tmpfs (/dev/shm): an A/B of
two versions of the code without the host's disk in the way.

    .venv/bin/python benchmarks/ab_pergroup.py NEW
    PYTHONPATH=<a worktree of the old commit> .venv/bin/python benchmarks/ab_pergroup.py OLD
"""
import logging, statistics, sys, tempfile, time, shutil
import numpy as np, pandas as pd, dask.dataframe as dd, distributed
import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
FEAT = [f"x{i}" for i in range(5)]
def fit(data, ctx):
    df = data.to_pandas()
    X = df[FEAT].to_numpy(); y = df["y"].to_numpy()
    return np.linalg.lstsq(X, y, rcond=None)[0]
if __name__ == "__main__":
    n = 5000
    rng = np.random.default_rng(0)
    pdf = pd.DataFrame(rng.normal(size=(n * 50, 5)), columns=FEAT)
    pdf["y"] = rng.normal(size=n * 50); pdf["g"] = np.repeat(np.arange(n), 50)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", silence_logs=logging.ERROR) as c, distributed.Client(c) as client:
        ddf = client.persist(dd.from_pandas(pdf, npartitions=4, sort=False))
        times = []
        for i in range(4):
            url = tempfile.mkdtemp(dir="/dev/shm")
            try:  # (/dev/shm is memory: a failed or interrupted run's files held it for good)
                t = time.perf_counter()
                assert ddf.manymodel.train(fit, by="g", url=url, run_id="r").wait(show_progress=False).value == "SUCCESS"
                if i: times.append(time.perf_counter() - t)
            finally:
                shutil.rmtree(url)
        print(sys.argv[1], f"median {statistics.median(times):.3f} s, {statistics.median(times)/n*1e6:.0f} us/group", [round(x, 3) for x in times])
