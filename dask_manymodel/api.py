"""The class API (as in Snowflake ML's ManyModelTraining): a thin layer over
:func:`dask_manymodel.engine.start_run`, shared with the accessor."""

from __future__ import annotations

from typing import Any, Callable

import pandas as pd

from .engine import check_function, check_run_id, start_run
from .options import ExecutionOptions
from .run import ManyModelRun
from .serde import ModelSerde

__all__ = ["DPF", "ManyModelInference", "ManyModelTraining"]


class DPF:
    """Run ``func(data, ctx)`` once per group; it saves what it wants with ``ctx.upload``.

    Parameters
    ----------
    func : callable
        ``func(data: DataConnector, ctx: PartitionContext) -> None``.
    stage_name : str
        Base URL of the runs (any fsspec URL or a local path).
    storage_options : dict, optional
        Passed to fsspec, never stored.
    """

    _kind = "dpf"

    def __init__(self, func: Callable, stage_name: str, *, storage_options: dict | None = None):
        self.func = check_function(func, self._kind)
        self.stage_name = stage_name
        self.storage_options = storage_options

    def _extra(self) -> dict:
        return {}

    def run(
        self,
        *,
        partition_by: str | list[str],
        dataframe: Any,
        run_id: str,
        on_existing_artifacts: str = "error",
        execution_options: ExecutionOptions | None = None,
    ) -> ManyModelRun:
        """Start the run and return its live :class:`ManyModelRun` handle.

        Parameters
        ----------
        partition_by : str or list of str
            Column(s) whose values define the groups (a named index counts as
            a column). Rows whose key is missing form a group of their own.
        dataframe : dask.dataframe.DataFrame or pandas.DataFrame
            The rows; a pandas frame is split into a few partitions (the
            named levels of its index, a MultiIndex too, become columns).
        run_id : str
            Folder of the run under ``stage_name``.
        on_existing_artifacts : {"error", "overwrite", "resume"}
            What to do when the run already exists: refuse, replace it, or
            run only its groups that are not DONE.
        execution_options : ExecutionOptions, optional

        Returns
        -------
        ManyModelRun
        """
        return start_run(
            self._kind,
            self.func,
            dataframe,
            by=partition_by,
            url=self.stage_name,
            run_id=run_id,
            storage_options=self.storage_options,
            on_existing_artifacts=on_existing_artifacts,
            execution_options=execution_options,
            **self._extra(),
        )


class ManyModelTraining(DPF):
    """Train one model per group: ``train_func(data, ctx)`` returns the model,
    which ``serde`` saves as ``stage_name/run_id/<col>=<value>/<serde.filename>``.

    Parameters
    ----------
    train_func : callable
        ``train_func(data: DataConnector, ctx: PartitionContext) -> model``.
    stage_name : str
        Base URL of the runs (any fsspec URL or a local path).
    serde : ModelSerde, optional
        How models become files; default :class:`PickleSerde`.
    storage_options : dict, optional
        Passed to fsspec, never stored.

    Examples
    --------
    >>> def train(data, ctx):  # doctest: +SKIP
    ...     df = data.to_pandas()
    ...     return LinearRegression().fit(df[["x"]], df["y"])
    >>> run = ManyModelTraining(train, "s3://bucket/models").run(  # doctest: +SKIP
    ...     partition_by="store", dataframe=ddf, run_id="r1")
    >>> run.wait()  # doctest: +SKIP
    """

    _kind = "train"

    def __init__(
        self,
        train_func: Callable,
        stage_name: str,
        serde: ModelSerde | None = None,
        *,
        storage_options: dict | None = None,
    ):
        super().__init__(train_func, stage_name, storage_options=storage_options)
        self.serde = serde

    def _extra(self) -> dict:
        return {"serde": self.serde}


class ManyModelInference(DPF):
    """Run ``inference_func(data, model, ctx)`` per group with the model of
    training run ``training_run_id``; returned frames are stored as hive
    parquet and read back with ``run.to_dask_dataframe()``.

    Parameters
    ----------
    inference_func : callable
        ``inference_func(data: DataConnector, model, ctx: PartitionContext)``
        returns a DataFrame, a Series or array of one value per row, or None
        (see ``ddf.manymodel.predict``).
    stage_name : str
        Base URL of the runs: the training run's and this one's.
    training_run_id : str
        The train run under ``stage_name`` whose models are used.
    serde : ModelSerde, optional
        How the models are read; default the training run's serde.
    storage_options : dict, optional
        Passed to fsspec, never stored.
    meta : pandas.DataFrame, dict or list, optional
        The output's schema (see ``ddf.manymodel.predict``).
    """

    _kind = "predict"

    def __init__(
        self,
        inference_func: Callable,
        stage_name: str,
        training_run_id: str,
        serde: ModelSerde | None = None,
        *,
        storage_options: dict | None = None,
        meta: pd.DataFrame | None = None,
    ):
        super().__init__(inference_func, stage_name, storage_options=storage_options)
        self.training_run_id = check_run_id(training_run_id, "training_run_id")
        self.serde = serde
        self.meta = meta

    def _extra(self) -> dict:
        return {"serde": self.serde, "training_run_id": self.training_run_id, "meta": self.meta}
