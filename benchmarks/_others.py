"""The same per-group work through Ray Data's ``map_groups`` and Spark's
``applyInPandas``, for the workload benchmarks. Both are optional
(``pip install -e ".[compare]"``); a way whose package is missing is skipped.

Each engine is started for its own rounds and stopped after them, so that
its idle processes do not take CPU from the Dask ways' rounds; the serial
pandas loop runs in the same rounds as the yardstick.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from typing import Callable, Iterator

import pandas as pd

from _common import fit, save

# Ray's and Spark's worker processes import this folder's modules (the
# per-group function refers to _common's fit and save by name)
_BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
_RESULT_SCHEMA = "g long, rows long"


def _fit_and_save(folder: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The per-group work of every way: fit, pickle, one file per group.
    Returns one row per group, so the caller can check every group ran."""

    def work(group: pd.DataFrame) -> pd.DataFrame:
        key = int(group["g"].iloc[0])
        save(folder, key, fit(group))
        return pd.DataFrame({"g": [key], "rows": [len(group)]})

    return work


def _with_benchmarks_on_path() -> None:
    """Put this folder on PYTHONPATH, which the engines' worker processes inherit."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _BENCHMARKS not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_BENCHMARKS, *paths])


@contextlib.contextmanager
def ray_map_groups(pdf: pd.DataFrame, cpus: int = 2, blocks: int = 8) -> Iterator[Callable[[str], None]]:
    """Ray started on ``cpus`` CPUs with ``pdf`` materialized in its object
    store; yields a job that runs the work with ``ds.groupby("g").map_groups``."""
    import ray

    _with_benchmarks_on_path()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=2 * 2**30)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        # blocks cut here: Ray's own split (np.array_split of a DataFrame)
        # hands back arrays under pandas 3
        bounds = [len(pdf) * i // blocks for i in range(blocks + 1)]
        dataset = ray.data.from_pandas([pdf.iloc[a:b] for a, b in zip(bounds, bounds[1:])]).materialize()
        n_groups = pdf["g"].nunique()

        def job(folder: str) -> None:
            out = dataset.groupby("g").map_groups(_fit_and_save(folder), batch_format="pandas").materialize()
            assert out.count() == n_groups, (out.count(), n_groups)

        yield job
    finally:
        ray.shutdown()


@contextlib.contextmanager
def spark_apply_in_pandas(pdf: pd.DataFrame, cpus: int = 2, partitions: int = 8) -> Iterator[Callable[[str], None]]:
    """A local Spark session on ``cpus`` cores with ``pdf`` cached in it;
    yields a job that runs the work with ``groupBy("g").applyInPandas``.
    Spark's own defaults otherwise (shuffle partitions, adaptive execution)."""
    from pyspark.sql import SparkSession

    _with_benchmarks_on_path()
    warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas", FutureWarning)
    os.environ["PYSPARK_PYTHON"] = sys.executable  # this venv's Python, with pandas and pyarrow
    spark = (
        SparkSession.builder.master(f"local[{cpus}]")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        frame = spark.createDataFrame(pdf).repartition(partitions).cache()
        frame.count()
        n_groups = pdf["g"].nunique()

        def job(folder: str) -> None:
            out = frame.groupBy("g").applyInPandas(_fit_and_save(folder), schema=_RESULT_SCHEMA)
            assert out.count() == n_groups

        yield job
    finally:
        spark.stop()


OTHER_ENGINES = {
    "ray data map_groups": ("ray", ray_map_groups),
    "spark applyInPandas": ("pyspark", spark_apply_in_pandas),
}


def installed_engines() -> dict[str, Callable]:
    """The other engines whose package is installed; says which are skipped."""
    found = {}
    for name, (package, engine) in OTHER_ENGINES.items():
        if importlib.util.find_spec(package) is None:
            print(f"({package} is not installed: {name} skipped)")
        else:
            found[name] = engine
    return found
