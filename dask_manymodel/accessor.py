"""``ddf.manymodel``: the accessor registered on Dask DataFrames.

Each method is a thin call into :func:`dask_manymodel.engine.start_run`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import dask.dataframe as dd
import pandas as pd

from .engine import start_run
from .exceptions import ManyModelError
from .options import ExecutionOptions
from .run import ManyModelRun
from .serde import ModelSerde

if TYPE_CHECKING:
    from .fileset import FileSet


def _no_hidden_attribute_errors(method: Callable) -> Callable:
    # Dask's __getattr__ turns an AttributeError raised inside an accessor into
    # "'DataFrame' object has no attribute 'manymodel'" (xarray issue 933), so
    # report it as something that keeps its message.
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except AttributeError as exc:
            raise ManyModelError(f"AttributeError: {exc}") from exc

    return wrapper


@dd.extensions.register_dataframe_accessor("manymodel")
class ManyModelAccessor:
    """One model per group of this Dask DataFrame.

    Examples
    --------
    >>> import dask_manymodel  # doctest: +SKIP
    >>> run = ddf.manymodel.train(train, by="store", url="/tmp/models", run_id="r1")  # doctest: +SKIP
    """

    def __init__(self, dask_obj: dd.DataFrame):
        self._obj = dask_obj

    @_no_hidden_attribute_errors
    def train(
        self,
        train_func: Callable,
        *,
        by: str | list[str],
        url: str,
        run_id: str,
        storage_options: dict | None = None,
        serde: ModelSerde | None = None,
        on_existing_artifacts: str = "error",
        execution_options: ExecutionOptions | None = None,
    ) -> ManyModelRun:
        """Train ``train_func(data, ctx)`` on every group; store each returned model.

        Parameters
        ----------
        train_func : callable
            ``train_func(data: DataConnector, ctx: PartitionContext) -> model``.
        by : str or list of str
            Column(s) whose values define the groups (a named index counts as
            a column). Rows whose key is missing form a group of their own.
        url : str
            Where runs live: a local path or any fsspec URL.
        run_id : str
            The run's folder under ``url``.
        storage_options : dict, optional
            Passed to fsspec; never written anywhere.
        serde : ModelSerde, optional
            How models become files; default :class:`PickleSerde`.
        on_existing_artifacts : {"error", "overwrite", "resume"}
            What to do when the run already exists: refuse, replace it, or
            run only its groups that are not DONE.
        execution_options : ExecutionOptions, optional

        Returns
        -------
        ManyModelRun
        """
        return start_run(
            "train",
            train_func,
            self._obj,
            by=by,
            url=url,
            run_id=run_id,
            storage_options=storage_options,
            serde=serde,
            on_existing_artifacts=on_existing_artifacts,
            execution_options=execution_options,
        )

    @_no_hidden_attribute_errors
    def predict(
        self,
        inference_func: Callable,
        *,
        by: str | list[str],
        url: str,
        training_run_id: str,
        run_id: str,
        storage_options: dict | None = None,
        serde: ModelSerde | None = None,
        on_existing_artifacts: str = "error",
        execution_options: ExecutionOptions | None = None,
        meta: pd.DataFrame | None = None,
    ) -> ManyModelRun:
        """Run ``inference_func(data, model, ctx)`` on every group with its trained model.

        The frames it returns are stored as hive-partitioned parquet under
        ``url/run_id`` and read back lazily with ``run.to_dask_dataframe()``.

        Parameters
        ----------
        inference_func : callable
            ``inference_func(data: DataConnector, model, ctx: PartitionContext)``
            returns a DataFrame; a Series or an array of one value per row,
            set beside the group's input columns as the column of its name
            (``prediction`` if it has none); or None for no rows.
        by : str or list of str
            The group column(s); the same as the training run's ``by``.
        url : str
            Where runs live: the training run's and this one's.
        training_run_id : str
            The train run under ``url`` whose models are used.
        run_id : str
            This run's folder under ``url``.
        storage_options : dict, optional
            Passed to fsspec; never written anywhere.
        serde : ModelSerde, optional
            How the models are read; default the training run's serde.
        on_existing_artifacts : {"error", "overwrite", "resume"}
            What to do when the run already exists: refuse, replace it, or
            run only its groups that are not DONE.
        execution_options : ExecutionOptions, optional
        meta : pandas.DataFrame, dict or list, optional
            The output's schema, as Dask's ``meta=`` takes it (an empty frame,
            or ``{"prediction": "f8"}``);
            by default the frame of the first DONE group (in the run's group
            order) that returned rows. A ``by`` column in ``meta`` is used as
            given (its dtype, its place); those it lacks go first, with the
            input's dtype.

        Returns
        -------
        ManyModelRun
        """
        return start_run(
            "predict",
            inference_func,
            self._obj,
            by=by,
            url=url,
            run_id=run_id,
            storage_options=storage_options,
            serde=serde,
            on_existing_artifacts=on_existing_artifacts,
            execution_options=execution_options,
            training_run_id=training_run_id,
            meta=meta,
        )

    @_no_hidden_attribute_errors
    def dpf(
        self,
        func: Callable,
        *,
        by: str | list[str],
        url: str,
        run_id: str,
        storage_options: dict | None = None,
        on_existing_artifacts: str = "error",
        execution_options: ExecutionOptions | None = None,
    ) -> ManyModelRun:
        """Run ``func(data, ctx)`` on every group; it saves files with ``ctx.upload``.

        What ``func`` returns is ignored. The arguments are those of
        :meth:`train`, less ``serde``.

        Returns
        -------
        ManyModelRun
        """
        return start_run(
            "dpf",
            func,
            self._obj,
            by=by,
            url=url,
            run_id=run_id,
            storage_options=storage_options,
            on_existing_artifacts=on_existing_artifacts,
            execution_options=execution_options,
        )

    @_no_hidden_attribute_errors
    def to_fileset(
        self, url: str, name: str, shuffle: bool = False, *, storage_options: dict | None = None,
        seed: int | None = None,
    ) -> FileSet:
        """Write this dataframe as an immutable :class:`~dask_manymodel.FileSet` (see ``FileSet.make``).

        Parameters
        ----------
        url : str
            Folder (any fsspec URL or local path) holding FileSets.
        name : str
            The new FileSet's folder under ``url``.
        shuffle : bool
            Shuffle the rows globally before writing (default False).
        storage_options : dict, optional
            Passed to fsspec; never written anywhere.
        seed : int, optional
            Makes a shuffled FileSet reproducible, as in ``FileSet.make``.

        Returns
        -------
        FileSet
        """
        from .fileset import FileSet

        return FileSet.make(url, name, self._obj, shuffle=shuffle, storage_options=storage_options, seed=seed)
