"""What a user function receives: :class:`DataConnector` (the group's rows)
and :class:`PartitionContext` (who it is, and a place to save files)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import posixpath
import shutil
from typing import TYPE_CHECKING, Any, Callable

import cloudpickle
import numpy as np
import pandas as pd

from .exceptions import InvalidArgumentError
from .store import PARTITION_FILE, group_path, normalize_key, scratch_folder

if TYPE_CHECKING:
    import tensorflow as tf
    import torch.utils.data

    from .store import RunStore

__all__ = ["DataConnector", "PartitionContext"]

USER_LOGGER_NAME = "dask_manymodel.user"
# ctx.logger.info(...) must reach the group's captured logs even though the
# root logger stays at WARNING in worker processes; a level the user set wins
_USER_LOGGER = logging.getLogger(USER_LOGGER_NAME)  # looked up once, not per group
if _USER_LOGGER.level == logging.NOTSET:
    _USER_LOGGER.setLevel(logging.INFO)


class DataConnector:
    """The rows of one group, ready for pandas, PyTorch or TensorFlow.

    The frame includes the ``by`` columns. Build one outside a run with
    :meth:`from_pandas`.

    Examples
    --------
    >>> import pandas as pd
    >>> data = DataConnector.from_pandas(pd.DataFrame({"x": [1, 2, 3]}))
    >>> data.to_pandas(limit=2)
       x
    0  1
    1  2
    """

    def __init__(self, frame: pd.DataFrame, _again: Callable[[], pd.DataFrame] | None = None):
        if not isinstance(frame, pd.DataFrame):
            raise InvalidArgumentError(
                f"DataConnector needs a pandas DataFrame, got {type(frame).__name__}"
            )
        self._frame = frame
        # In a run: makes the group's frame again, as it came (the engine cuts
        # it from the task's partition once more), for a call after
        # to_pandas() handed the frame itself out. Without it, each
        # to_pandas() hands out a shallow copy, which costs more than the
        # rest of a small group's handling (~115,000 instructions, pandas 3).
        self._again = _again
        self._handed_out = False

    def _rows(self) -> pd.DataFrame:
        """The group's rows as they came, not as a caller of
        :meth:`to_pandas` may have changed the frame it got."""
        if self._handed_out:
            self._frame = self._again()
            self._handed_out = False
        return self._frame

    @classmethod
    def from_pandas(cls, df: pd.DataFrame) -> "DataConnector":
        """Wrap a pandas DataFrame (for notebooks and tests).

        Parameters
        ----------
        df : pandas.DataFrame
            The group's rows, ``by`` columns included if the function reads them.

        Returns
        -------
        DataConnector
        """
        return cls(df)

    @property
    def columns(self) -> list[str]:
        """Column names of the group's frame."""
        return list(self._rows().columns)

    def __len__(self) -> int:
        return len(self._rows())

    def __repr__(self) -> str:
        return f"DataConnector(rows={len(self)}, columns={self.columns})"

    def to_pandas(self, limit: int | None = None) -> pd.DataFrame:
        """The group's rows as a pandas DataFrame (the first ``limit`` rows if given).

        Each call gives a frame of its own, as Snowflake ML's reads the data
        again: change it as you like, the next ``to_pandas()`` and
        ``to_torch_dataset()`` still get the group's rows (a ``df.pop("y")``
        took the column from every later call). No row is copied for it
        (pandas' copy-on-write, pandas 3; under pandas 2 without it, writes
        into values in place, such as ``df["x"] /= 10``, still reach the
        group's rows within one call): in a run the first call gets the
        group's frame itself, a later one the frame made again. A
        retry (``ExecutionOptions(max_retries=)``) gets the rows as they were
        before the failed call, and a predict's returned Series or array sits
        beside the input columns as they were, not as the function left them.
        """
        if limit is None:
            if self._again is None:
                return self._rows().copy(deep=False)
            frame = self._rows()
            self._handed_out = True  # the next call makes the group's frame again
            return frame
        if not isinstance(limit, (int, np.integer)) or isinstance(limit, bool) or limit < 0:
            raise InvalidArgumentError(f"limit must be a non-negative int or None, got {limit!r}")
        return self._rows().iloc[: int(limit)]  # a frame of its own already

    def _source(self):
        from .connectors._batching import FrameSource

        return FrameSource(self._rows())

    def to_torch_dataset(
        self,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        drop_last_batch: bool = True,
        seed: int | None = None,
    ) -> torch.utils.data.IterableDataset:
        """The rows as a ``torch.utils.data.IterableDataset`` of ``dict[column -> Tensor]``.

        Use it as ``DataLoader(ds, batch_size=None, num_workers=k)``. Each item
        has exactly ``batch_size`` rows (a smaller last one only with
        ``drop_last_batch=False``); ``batch_size=None`` yields single rows.
        Numeric columns keep their dtype, missing floats are NaN, strings
        come as Python lists. With ``num_workers=k`` each worker yields a
        disjoint share of the batches. Dask workers are daemonic: set
        ``distributed.worker.daemon: False`` to use ``num_workers > 0`` in a run.

        Parameters
        ----------
        batch_size : int, optional
            Rows per item; None (default) yields single rows.
        shuffle : bool
            Shuffle the rows, in a new order each epoch (each pass over it).
        drop_last_batch : bool
            Drop a last batch of fewer than ``batch_size`` rows (default True).
        seed : int, optional
            Seed of the shuffle (an int >= 0): the same seed gives the same
            orders, epoch by epoch. None: a new seed each time.

        Returns
        -------
        torch.utils.data.IterableDataset

        Examples
        --------
        >>> import pandas as pd
        >>> data = DataConnector.from_pandas(pd.DataFrame({"x": [1.0, 2.0, 3.0]}))
        >>> [b["x"].tolist() for b in data.to_torch_dataset(batch_size=2)]  # doctest: +SKIP
        [[1.0, 2.0]]
        """
        from .connectors.torch import make_torch_dataset

        return make_torch_dataset(
            self._source(), batch_size=batch_size, shuffle=shuffle,
            drop_last_batch=drop_last_batch, seed=seed,
        )

    def to_torch_datapipe(
        self,
        *,
        batch_size: int | None = None,
        shuffle: bool = False,
        drop_last_batch: bool = True,
        seed: int | None = None,
    ) -> torch.utils.data.IterableDataset:
        """As :meth:`to_torch_dataset`, as a datapipe where torch still has them
        (else the same dataset, with a DeprecationWarning)."""
        from .connectors.torch import make_torch_datapipe

        return make_torch_datapipe(
            self._source(), batch_size=batch_size, shuffle=shuffle,
            drop_last_batch=drop_last_batch, seed=seed,
        )

    def to_tf_dataset(
        self,
        *,
        batch_size: int,
        shuffle: bool = False,
        drop_last_batch: bool = True,
        seed: int | None = None,
    ) -> tf.data.Dataset:
        """The rows as a ``tf.data.Dataset`` of ``dict[column -> Tensor]`` batches
        (strings as ``tf.string``); works with ``model.fit``.

        Parameters
        ----------
        batch_size : int
            Rows per batch (required).
        shuffle, drop_last_batch, seed
            As for :meth:`to_torch_dataset`.

        Returns
        -------
        tf.data.Dataset
        """
        from .connectors.tensorflow import make_tf_dataset

        return make_tf_dataset(
            self._source(), batch_size=batch_size, shuffle=shuffle,
            drop_last_batch=drop_last_batch, seed=seed,
        )


def _check_artifact_name(filename: str, taken: frozenset[str] = frozenset()) -> str:
    if (
        not isinstance(filename, str)
        or not filename
        or filename in {".", ".."}
        or "/" in filename
        or "\\" in filename
        or "\x00" in filename
    ):
        raise InvalidArgumentError(
            f"artifact filename {filename!r} must be a plain file name "
            f"(no '/', '\\', NUL, '.' or '..')"
        )
    if filename == PARTITION_FILE or filename.startswith("_"):
        raise InvalidArgumentError(
            f"artifact filename {filename!r} is reserved: names starting with '_' "
            f"belong to dask_manymodel"
        )
    # a serde's file in a subfolder ('weights/model.pt') takes the subfolder's name too
    if filename in taken or filename in {name.split("/", 1)[0] for name in taken}:
        raise InvalidArgumentError(
            f"artifact filename {filename!r} is the run's own file in this folder (the model, or "
            f"the inference output): choose another name"
        )
    return filename


def _check_callable(function: Any, name: str, shape: str) -> None:
    """``write_function``/``read_function``: None or a function. A value that
    is none failed after the file was written or read, as "TypeError: 'str'
    object is not callable" naming no argument."""
    if function is not None and not callable(function):
        raise InvalidArgumentError(f"{name} must be a function {shape}, or None; got {function!r:.200}")


def _pickle_write(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        cloudpickle.dump(obj, f)


def _pickle_read(path: str) -> Any:
    with open(path, "rb") as f:
        return cloudpickle.load(f)


def not_one_file(path: str, writer: str, what: str) -> str | None:
    """What is wrong with what ``writer`` left at ``path``, where it was to
    write ``what`` as one file (a folder, such as a SavedModel, or nothing),
    or None if it is one file."""
    if os.path.isdir(path):
        return (
            f"{writer} made a folder for {what} where one file was asked for; write one file (pack a "
            f"folder, such as a SavedModel, into an archive)"
        )
    if not os.path.isfile(path):
        return f"{writer} wrote no file for {what}; it must write to the path it is given"
    return None


class _ThisGroup:
    """The default group of :meth:`PartitionContext.download`: not None,
    which is the null group's value."""

    def __repr__(self) -> str:
        return "<this group>"


_THIS_GROUP = _ThisGroup()


class PartitionContext:
    """Who the current group is, and where it may save and read files.

    Attributes
    ----------
    partition_id : object
        The group's value (a tuple when ``by`` has several columns).
    run_id : str
        The run this group belongs to.
    logger : logging.Logger
        The ``dask_manymodel.user`` logger, at INFO unless you set its level.
        Records logged here, anything printed to stdout or stderr, and
        records of other loggers that pass their own level (the root logger's
        default is WARNING) are kept in the group's ``PartitionDetails.logs``.
        Only the thread running the group is captured: threads the function
        starts itself are not.
    """

    def __init__(
        self,
        partition_id: Any,
        run_id: str,
        *,
        store: "RunStore",
        by: list[str],
        _before_write: Callable[[], None] | None = None,
        _taken_names: frozenset[str] = frozenset(),
    ):
        self.partition_id = partition_id
        self.run_id = run_id
        # logging.config.dictConfig(...) disables every logger that exists
        # already unless told disable_existing_loggers=False (its default is
        # True): a module of the user's that configures logging as it is
        # imported, on the workers after dask_manymodel, silenced ctx.logger
        # in every group's logs. A level the user set still wins.
        _USER_LOGGER.disabled = False
        self.logger = _USER_LOGGER
        self._store = store
        self._by = by
        self._uploaded: list[str] = []
        # the engine's check, before a file goes into the run's folder, that
        # the run was not started again elsewhere meanwhile
        self._before_write = _before_write
        # the files the engine writes into the group's folder itself
        self._taken_names = _taken_names
        self._closed = False

    def _close(self) -> None:
        """The group's function has returned: its status is being written."""
        self._closed = True

    def _refuse_if_closed(self, filename: str) -> None:
        if self._closed:
            raise InvalidArgumentError(
                f"ctx.upload({filename!r}) of group {self.partition_id!r} came after the group's function "
                f"returned (from a thread it left running?); its status is written without it. Upload "
                f"from the function itself, and join the threads it starts before it returns"
            )

    def __repr__(self) -> str:
        return f"PartitionContext(partition_id={self.partition_id!r}, run_id={self.run_id!r})"

    def _group_folder(self, partition_id: Any, run_id: str | None) -> tuple["RunStore", str]:
        store = self._store
        if run_id is not None and run_id != store.run_id:
            store = store.sibling(run_id)
        key = normalize_key(partition_id, len(self._by))
        return store, store.path(group_path(self._by, key))

    def upload(
        self,
        obj: Any,
        filename: str,
        write_function: Callable[[Any, str], None] | None = None,
    ) -> str:
        """Save ``obj`` as ``filename`` in this group's folder.

        Parameters
        ----------
        obj : object
            What to save.
        filename : str
            A plain file name (no folders). Names starting with ``_`` are
            reserved, and so are the run's own files in the folder (the
            serde's model file, a predict run's ``part-0.parquet``).
        write_function : callable, optional
            ``write_function(obj, local_path)`` writes the file; the default
            pickles ``obj`` with cloudpickle.

        Returns
        -------
        str
            The URL of the saved file, under the run's URL as given (with a
            password it holds, so that it opens the file), a local path as
            the absolute path it resolved to (see ``ManyModelRun.url``).
        """
        _check_artifact_name(filename, self._taken_names)
        self._refuse_if_closed(filename)
        _check_callable(write_function, "write_function", "f(obj, local_path) that writes the file")
        store, folder = self._group_folder(self.partition_id, None)
        write = write_function or _pickle_write
        target = posixpath.join(folder, filename)

        def fill(local: str) -> None:
            try:
                write(obj, local)
                # as for a serde: one file, or the upload would store an empty folder
                problem = not_one_file(local, "write_function", f"artifact {filename!r}")
                if problem:
                    raise InvalidArgumentError(f"{problem} (its second argument)")
            except BaseException:
                if os.path.isdir(local):
                    shutil.rmtree(local, ignore_errors=True)
                raise
            if self._before_write is not None:
                self._before_write()
            self._refuse_if_closed(filename)  # again: the file may have taken a while to write

        if store.is_local:
            # written beside its target and renamed into place, as a model is:
            # it was written in the temp folder and copied, a second copy of
            # an artifact of GBs on a disk (/tmp in a pod) that may not hold it
            made = not os.path.isdir(folder)
            try:
                store._commit_local(target, fill)
            except BaseException:
                if made:  # not written (a run started again since): no empty folder left of it
                    with contextlib.suppress(OSError):  # (not empty: another file of the group)
                        os.rmdir(folder)
                raise
        else:
            with scratch_folder() as tmp:
                local = os.path.join(tmp, filename)
                fill(local)
                store.upload_file(local, target)
        if filename not in self._uploaded:
            self._uploaded.append(filename)
        return store.url_of(group_path(self._by, normalize_key(self.partition_id, len(self._by))), filename)

    def download(
        self,
        filename: str,
        partition_id: Any = _THIS_GROUP,
        run_id: str | None = None,
        read_function: Callable[[str], Any] | None = None,
    ) -> Any:
        """Read a file saved by :meth:`upload`, from this group or another.

        Parameters
        ----------
        filename : str
            The name given to :meth:`upload`.
        partition_id : object, optional
            Another group of the same ``by`` columns; default this group.
            ``None`` is the null group's value, as everywhere.
        run_id : str, optional
            Another run under the same URL; default this run.
        read_function : callable, optional
            ``read_function(local_path)`` returns the object; the default
            unpickles. On local storage ``local_path`` is the stored file
            itself (no copy is made): read it, never change or delete it.
        """
        if not isinstance(filename, str) or "/" in filename or "\\" in filename or filename in {"", ".", ".."}:
            raise InvalidArgumentError(f"filename {filename!r} must be a plain file name")
        if run_id is not None:
            from .engine import check_run_id

            check_run_id(run_id)  # a folder of the URL, never one beside it ("..")
        _check_callable(read_function, "read_function", "f(local_path) that returns the object")
        partition_id = self.partition_id if partition_id is _THIS_GROUP else partition_id
        store, folder = self._group_folder(partition_id, run_id)
        read = read_function or _pickle_read
        key = normalize_key(partition_id, len(self._by))
        # and a long value's folder as an earlier version named it (cut
        # within a character, see store.encode_value), in a run it wrote
        folders = dict.fromkeys([folder, store.path(group_path(self._by, key, cut_within_characters=True))])
        with contextlib.ExitStack() as stack:
            for place in folders:
                try:
                    # on local disk the stored file itself, as get_model reads
                    # a model: no copy of it in the temp folder
                    local = stack.enter_context(store.local_file(posixpath.join(place, filename), filename))
                    break
                except FileNotFoundError:
                    continue
            else:
                # the file system's own error names its path without the
                # URL's protocol (memory://, s3://): the URL here, as the
                # library's other errors name the files of a run
                raise FileNotFoundError(
                    errno.ENOENT,
                    f"no file {filename!r} in group {partition_id!r} of run {store.run_id!r} (ctx.upload saves one)",
                    store.display(group_path(self._by, key), filename),
                )
            return read(local)

    # Snowflake ML's names for the two methods above: its examples (and so
    # the code moved over from it) call these, which raised AttributeError
    # and FAILED every group.
    def upload_to_stage(
        self,
        obj: Any,
        filename: str,
        write_function: Callable[[Any, str], None] | None = None,
    ) -> str:
        """Snowflake ML's name for :meth:`upload` (the same arguments)."""
        return self.upload(obj, filename, write_function)

    def download_from_stage(
        self,
        filename: str,
        stage_path: str | None = None,
        read_function: Callable[[str], Any] | None = None,
    ) -> Any:
        """Snowflake ML's name for :meth:`download` of this group's file.

        ``stage_path`` (a Snowflake stage folder) has no counterpart: read
        another group's or run's file with ``download(filename,
        partition_id=..., run_id=...)``.
        """
        if stage_path is not None:
            raise InvalidArgumentError(
                f"download_from_stage(stage_path={stage_path!r}) names a Snowflake stage folder; here a file of "
                f"another group or run is read with ctx.download({filename!r}, partition_id=<its group>, "
                f"run_id=<its run under the same URL>, read_function=...)"
            )
        return self.download(filename, read_function=read_function)
