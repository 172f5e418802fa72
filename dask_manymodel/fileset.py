"""FileSet: an immutable parquet snapshot of a dataframe at a URL, streamed
file by file to PyTorch and TensorFlow.

Layout::

    URL/NAME/_fileset.claim        written first, exclusively: one ``make`` owns the name
    URL/NAME/part.0.<id>.parquet   the rows (written by Dask's to_parquet)
    URL/NAME/_fileset.json         manifest: id, files, rows, columns; written last

A FileSet exists once its manifest does; ``make`` refuses an existing name.
The id (also in the file names) tells a handle that its FileSet was deleted
and made again under the same name.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import posixpath
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .connectors._batching import Columns, Rebatcher, check_batch_size, check_flag, check_seed
from .engine import (
    as_dask_dataframe,
    check_reachable,
    check_shuffle_labels,
    check_workers_environment,
    check_workers_share_store,
    index_as_column,
    p2p_loses,
)
from .exceptions import FileSetDeletedError, FileSetExistsError, FileSetNotFoundError, InvalidArgumentError
from .store import (
    RUN_MANIFEST, RunStore, _is_local, _ThisProcessFileSystem, any_read_as_pattern, keep_few_file_systems,
    open_url, read_file, remove_files, remove_paths, resolved_url, shown_url, without_pandas_metadata_of,
)

__all__ = ["FileSet"]

if TYPE_CHECKING:
    import dask.dataframe as dd
    import tensorflow as tf
    import torch.utils.data

MANIFEST = "_fileset.json"
CLAIM = "_fileset.claim"

logger = logging.getLogger(__name__)


def _remove_half_made(fs, root: str) -> None:
    """Remove what a failed make wrote. Tasks of its compute that were
    running when one failed go on writing for a moment ("Directory not
    empty" on local disk): tried again a few times; a failure is logged,
    never raised over the make's own error."""
    for attempt in range(6):
        try:
            remove_paths(fs, [root])
            fs.invalidate_cache(root)
            # (an object store may keep a folder marker, "name/", which s3fs before 2025 lists)
            if not fs.exists(root) or all(name.endswith("/") for name in fs.find(root)):
                return
        except OSError:
            pass
        time.sleep(0.1 * 2**attempt)  # (3 s in all) the failed compute's other tasks finish their files
    logger.warning("could not remove the files of the failed FileSet make at %s; delete the folder by hand", root)


def _own_files(fs, root: str, fileset_id: str) -> list[str]:
    """The part files in ``root`` of the FileSet whose id is ``fileset_id``."""
    suffix = f".{fileset_id}.parquet"
    return [path for path in fs.ls(root, detail=False) if path.endswith(suffix)]


def _check_labels(columns: Any, shuffle: bool) -> None:
    """Column labels the files cannot hold, refused before the claim: Dask
    said "parquet doesn't support non-string column names" without naming
    them, and a label None or NaN passed that check and failed every write
    task with a KeyError about 'nan'. Duplicate names, which Dask refused
    in a message of pyarrow's, are said so too."""
    not_text = [c for c in columns if not isinstance(c, str)]
    if not_text:
        raise InvalidArgumentError(
            f"column label(s) {not_text[:3]!r:.200} are not text, and the FileSet's parquet files name "
            f"columns by text; rename them (ddf.columns = [str(c) for c in ddf.columns]); nothing is written"
        )
    twice = pd.Index(columns)[pd.Index(columns).duplicated()].unique().tolist()
    if twice:
        raise InvalidArgumentError(
            f"column name(s) {twice[:3]!r:.200} name more than one column, and a parquet file holds each "
            f"name once; rename them (ddf.columns = [...]); nothing is written"
        )
    if shuffle:
        check_shuffle_labels(columns, "FileSet.make(shuffle=True) shuffles the rows")


class _ClaimLost(Exception):
    """Another make of the same name claimed it over this one."""


def _check_workers_share(store: RunStore, shuffle: bool = False) -> None:
    """memory:// with worker processes: each would write its files into its
    own memory, and the FileSet would be made with no rows. With ``shuffle``,
    the workers need dask_manymodel too (its functions shuffle the rows):
    without it, Dask closed the workers and make() waited for ever."""
    import distributed

    from ._client import _synchronous

    try:
        client = distributed.get_client()
    except ValueError:  # no cluster: Dask's local scheduler, in this process
        return
    client = _synchronous(client)  # an asynchronous one: refused here, first
    check_workers_share_store(store, client)
    if shuffle:
        check_workers_environment(client)


_SHUFFLE_COLUMN = "__manymodel_shuffle__"


def _objects_as_arrow(frame: pd.DataFrame, positions: list[int]) -> pd.DataFrame:
    """A pandas frame whose columns of Python objects other than text (lists,
    arrays, bytes: those at ``positions``, see object_columns_not_text) are
    pyarrow columns, which parquet stores as they are:
    Dask writes no column of objects (it takes the file's types from a
    placeholder value), and its convert-string made them text before
    ("[0.  0.5]"). A column mixing values of no common type is refused,
    naming it, before anything is written."""
    converted = frame.copy(deep=False)
    for i in positions:
        try:
            values = pa.array(frame.iloc[:, i], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InvalidArgumentError(
                f"column {frame.columns[i]!r} holds Python objects that parquet cannot store as one type "
                f"({exc}); convert it first (to one type, or with .astype(str))"
            ) from exc
        converted.isetitem(i, pd.Series(pd.arrays.ArrowExtensionArray(values), index=frame.index))
    return converted


def _check_typed(ddf: dd.DataFrame) -> None:
    """Columns whose parquet type Dask cannot tell from the frame's meta,
    refused before the claim, naming them. Dask's to_parquet takes each
    file's schema from a placeholder row of the meta; a column of Python
    objects (``dtype=object``: ``ddf.x.apply(embed, meta=("x", object))``,
    or a frame made with convert-string off) has the placeholder ``object()``
    under pandas 3, and every make of it failed with pyarrow's "ArrowInvalid:
    Could not convert <object object at ...>", naming no column. Unlike a
    pandas frame's (see :func:`_objects_as_arrow`), its values cannot be
    looked at without computing the frame twice: the user gives the type."""
    placeholder = ddf._meta_nonempty
    untyped = []
    for i, name in enumerate(placeholder.columns):
        if placeholder.dtypes.iloc[i] != object:
            continue
        try:
            pa.array(placeholder.iloc[:, i], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            untyped.append(name)
    if untyped:
        raise InvalidArgumentError(
            f"column(s) {untyped[:3]!r:.200} of the Dask dataframe hold Python objects (dtype object), and "
            f"the FileSet's parquet files need each column's type before its values are computed; give "
            f"it one first: ddf = ddf.astype({{{untyped[0]!r:.100}: pd.ArrowDtype(pa.list_(pa.float64()))}}) "
            f"for arrays or lists of numbers, pd.ArrowDtype(pa.binary()) for bytes, \"string\" for text "
            f"(a pandas frame's columns of arrays are stored as lists without it); nothing is written"
        )


def _check_name(name: Any) -> str:
    from .engine import check_run_id

    return check_run_id(name, "FileSet name")


def _order_by_random_key(df: pd.DataFrame) -> pd.DataFrame:
    # Dask's shuffle leaves the order of rows inside an output partition to
    # chance (it depends on which task finished first): sorting by the seeded
    # random key makes the same input and seed give the same snapshot.
    return df.sort_values(_SHUFFLE_COLUMN, kind="stable").drop(columns=[_SHUFFLE_COLUMN])


def _random_keys(df: pd.DataFrame, seed: int, partition_info=None) -> pd.DataFrame:
    number = partition_info["number"] if partition_info else 0
    rng = np.random.default_rng([seed, number, 1])
    return df.assign(**{_SHUFFLE_COLUMN: rng.integers(0, 2**62, len(df))})


class FileSet:
    """An immutable parquet snapshot: reopen with ``FileSet(url, name)``.

    Parameters
    ----------
    url : str
        Folder (any fsspec URL or local path) holding FileSets.
    name : str
        The FileSet's folder under ``url``.
    storage_options : dict, optional
        Passed to fsspec.

    Raises
    ------
    FileSetNotFoundError
        No FileSet of that name exists.
    """

    _fs = _ThisProcessFileSystem()  # a handle used in a forked process

    def __init__(self, url: str, name: str, storage_options: dict | None = None):
        self.name = _check_name(name)
        self._storage_options = storage_options
        self._fs, base = open_url(url, storage_options)
        self.url = resolved_url(url, self._fs, base)
        self._root = posixpath.join(base, name)
        self._deleted = False
        self._manifest = self._read_manifest()
        if self._manifest is None:
            # a run's name: "create it with FileSet.make" would be refused
            if self._fs.exists(posixpath.join(self._root, RUN_MANIFEST)):
                raise FileSetNotFoundError(
                    f"no FileSet {name!r} at {shown_url(self.url)}: {name!r} there is a run of dask_manymodel; open "
                    f"it with ManyModelRun.restore_from({name!r}, url), or give the name of a FileSet"
                )
            raise FileSetNotFoundError(
                f"no FileSet {name!r} at {shown_url(self.url)}; create it with FileSet.make(url, name, dataframe)"
            )

    def _read_manifest(self) -> dict | None:
        self._fs.invalidate_cache(self._root)
        try:
            return json.loads(read_file(self._fs, posixpath.join(self._root, MANIFEST)))
        except FileNotFoundError:
            return None

    def __repr__(self) -> str:
        state = "deleted" if self._deleted else f"{len(self._manifest['files'])} files, {self._manifest['rows']} rows"
        return f"FileSet({shown_url(self.url)!r}, {self.name!r}: {state})"

    @classmethod
    def make(
        cls,
        url: str,
        name: str,
        dataframe: Any,
        shuffle: bool = False,
        *,
        storage_options: dict | None = None,
        seed: int | None = None,
    ) -> "FileSet":
        """Write ``dataframe`` (Dask or pandas) as a new FileSet and return it.

        With ``shuffle=True`` the rows are shuffled globally (across
        partitions) before writing; the same input and ``seed`` give the
        same files in the same row order. A named index is kept as a column;
        an unnamed one is dropped.

        Parameters
        ----------
        url : str
            Folder (any fsspec URL or local path) holding FileSets.
        name : str
            The new FileSet's folder under ``url``.
        dataframe : dask.dataframe.DataFrame or pandas.DataFrame
            The rows to write.
        shuffle : bool
            Shuffle the rows globally before writing (default False).
        storage_options : dict, optional
            Passed to fsspec; never written anywhere.
        seed : int, optional
            Seed of the shuffle (an int >= 0); None: a new one each time.

        Returns
        -------
        FileSet

        Raises
        ------
        FileSetExistsError
            A FileSet (or anything) already exists under that name.
        """
        _check_name(name)
        shuffle = check_flag(shuffle, "shuffle")
        seed = check_seed(seed)
        fs, base = open_url(url, storage_options)
        url = resolved_url(url, fs, base)  # as the workers writing the files must read it
        root = posixpath.join(base, name)
        claim = RunStore(url, name, storage_options)
        # as a run checks its URL: a missing bucket, bad credentials, a file
        # where the folder must be are said so now, not as a backend's error
        check_reachable(claim)
        _check_workers_share(claim, shuffle)
        exists = FileSetExistsError(
            f"FileSet {name!r} already exists at {shown_url(url)}; FileSets are immutable: "
            f"choose another name or delete() the old one"
        )
        if fs.exists(root) and fs.ls(root):
            if fs.exists(posixpath.join(root, RUN_MANIFEST)):
                raise FileSetExistsError(
                    f"{shown_url(url)}/{name} holds the run {name!r}, not a FileSet: a FileSet cannot take a run's "
                    f"name; choose another name"
                )
            if not fs.exists(posixpath.join(root, MANIFEST)):
                # what a make or delete cut short leaves (its process killed, its
                # store failing): "already exists ... delete() the old one", where
                # FileSet(url, name) finds none to delete, kept the name for good
                raise FileSetExistsError(
                    f"FileSet {name!r} already exists at {shown_url(url)}, unfinished (no {MANIFEST}): another "
                    f"FileSet.make of it is writing it now, or a make or delete of it was cut short (its process "
                    f"killed, its store failing) and left its files. If none is running, delete the folder "
                    f"{shown_url(url)}/{name} by hand, then make it again; or choose another name"
                )
            raise exists
        # a named index is kept as a column, as DataFrame.to_parquet keeps it
        # (one named like a column is dropped, as a run drops it)
        ddf = index_as_column(as_dask_dataframe(dataframe, _objects_as_arrow), None)
        _check_labels(ddf.columns, shuffle)
        _check_typed(ddf)
        # Claimed in one exclusive write before anything else: two makes of
        # one name at once would otherwise both pass the check above and
        # write their files into one folder.
        fileset_id = uuid.uuid4().hex[:12]
        try:
            claim.create_exclusive(claim.path(CLAIM), json.dumps({"id": fileset_id}).encode())
        except FileExistsError:
            raise exists from None
        try:
            cls._write(fs, url, root, name, ddf, shuffle, seed, storage_options, fileset_id)
        except _ClaimLost:
            # another make wrote the name's claim over ours (a store whose
            # exclusive create is a check, then a write): its files stay
            remove_files(fs, _own_files(fs, root, fileset_id))
            raise exists from None
        except BaseException:
            _remove_half_made(fs, root)  # nothing half-written: the name is free again
            raise
        return cls(url, name, storage_options)

    @staticmethod
    def _write(fs, url, root, name, ddf, shuffle, seed, storage_options, fileset_id) -> None:
        """Write the rows, then the manifest."""
        if shuffle:
            seed = int(np.random.SeedSequence().entropy % 2**62) if seed is None else seed
            keyed = ddf.map_partitions(_random_keys, seed, meta=ddf._meta.assign(**{_SHUFFLE_COLUMN: np.int64(0)}))
            # Dask's p2p shuffle fails on a pyarrow list or struct column (the
            # make failed after its compute): the tasks shuffle then, unless
            # Dask's config names a method
            method = {}
            if dask.config.get("dataframe.shuffle.method", None) is None and any(map(p2p_loses, ddf.dtypes)):
                method = {"shuffle_method": "tasks"}
            ddf = keyed.shuffle(on=_SHUFFLE_COLUMN, **method).map_partitions(_order_by_random_key, meta=ddf._meta)
        # the id in every file name: a handle of a deleted FileSet never reads
        # the files of a new one made under the same name
        # Each write task notes its file system in keep_few_file_systems:
        # every worker kept the one it unpickled for each make's
        # storage_options in fsspec's cache for good (a new credential per
        # make: one S3FileSystem and its botocore client each). Dask's own
        # here is ``fs`` (fsspec's cache gives it the same instance); given
        # as filesystem=, Dask would read [ ] in the URL as a pattern.
        noting = ddf.map_partitions(
            _file_system_noter(), fs, meta=ddf._meta, enforce_metadata=False, token="fileset-fs"
        )
        writing = noting.to_parquet(
            f"{url}/{name}", write_index=False, storage_options=storage_options,
            write_metadata_file=False, name_function=lambda number: f"part.{number}.{fileset_id}.parquet",
            compute=False,
        )
        import distributed

        from ._client import _synchronous, outside_the_worker_pool

        try:
            client = distributed.get_client()
        except ValueError:  # no Dask cluster: Dask's own scheduler
            writing.compute()
        else:
            # on the cluster even under dask.config.set(scheduler="threads"):
            # the shuffle Dask picked (p2p, for the client) runs on its workers
            # only. (An asynchronous client, which would write nothing, was
            # refused before the claim.) Made inside a Dask task (a pipeline's
            # step), the wait leaves the worker's thread pool: the writes
            # waited for a thread that the waiting task held, for ever.
            with outside_the_worker_pool():
                _synchronous(client).compute(writing).result()
        fs.invalidate_cache(root)
        files = sorted(_own_files(fs, root, fileset_id), key=lambda p: int(posixpath.basename(p).split(".")[1]))
        rows = [footer.num_rows for footer in _footers(fs, files)]
        manifest = {
            "name": name,
            "id": fileset_id,
            "files": [posixpath.basename(p) for p in files],
            "rows_per_file": rows,
            "rows": int(sum(rows)),
            "columns": [str(c) for c in ddf.columns],
            "shuffled": bool(shuffle),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        # The claim, read again: a store without a true exclusive create (its
        # check, then its write) may have let another make of the name claim
        # it meanwhile; the manifest goes only under a claim that is ours.
        if json.loads(read_file(fs, posixpath.join(root, CLAIM))).get("id") != fileset_id:
            raise _ClaimLost()
        # with the store's retries, as a run's files: a failure of this last
        # write alone threw the whole snapshot away, its compute with it
        RunStore(url, name, storage_options).write_bytes(
            posixpath.join(root, MANIFEST), json.dumps(manifest, indent=1).encode()
        )

    # ------------------------------------------------------------------
    def _check_alive(self) -> None:
        """Raise if this handle's FileSet is gone: deleted through this handle,
        or (one small read of the manifest) through another handle or process,
        perhaps made again since under the same name, which is another FileSet."""
        if not self._deleted:
            stored = self._read_manifest()
            if stored is not None and _identity(stored) == _identity(self._manifest):
                return
            how = "deleted" if stored is None else "deleted and made again under the same name"
            raise FileSetDeletedError(
                f"FileSet {self.name!r} at {shown_url(self.url)} was {how} after this handle opened it; "
                f"reopen it with FileSet(url, name), or make a new one with FileSet.make"
            )
        raise FileSetDeletedError(
            f"FileSet {self.name!r} at {shown_url(self.url)} was deleted; make a new one with FileSet.make"
        )

    def files(self) -> list[str]:
        """URLs of the parquet files, in order: under the URL as it was given
        (with a password it holds, so that they open the files), a local path
        (relative, ``~/...`` or ``file://...``) as the absolute path it
        resolved to."""
        self._check_alive()
        return self._urls()

    def _urls(self) -> list[str]:
        return [f"{self.url}/{self.name}/{f}" for f in self._manifest["files"]]

    def fileset_stage_location(self) -> str:
        """The URL of the FileSet's folder, ending in ``/`` (Snowflake ML's
        name: its ``sfc://@stage/name/``); the files of :meth:`files` are in it."""
        self._check_alive()
        return f"{self.url}/{self.name}/"

    @property
    def num_rows(self) -> int:
        """The number of rows (from the manifest)."""
        self._check_alive()
        return int(self._manifest["rows"])

    def _paths(self) -> list[str]:
        return [posixpath.join(self._root, f) for f in self._manifest["files"]]

    def _source(self) -> "_FileSource":
        self._check_alive()
        return _FileSource(self._fs, self._paths(), int(self._manifest["rows"]))

    def to_dask_dataframe(self) -> dd.DataFrame:
        """The rows as a lazy Dask DataFrame."""
        import dask.dataframe as dd

        self._check_alive()
        paths = self._paths()
        with self._fs.open(paths[0], "rb") as f:
            schema = pq.read_schema(f)
        if not any_read_as_pattern(paths) and not _nested(schema):
            # (not files(): it reads the manifest again, as checked above)
            return dd.read_parquet(self._urls(), storage_options=self._storage_options)
        # Dask reads a path with [ ] * ? in it as a pattern (data[v1] found
        # nothing), and cannot read a pyarrow list column back (pandas'
        # metadata of it): each file read as it is named instead
        meta = _to_pandas(schema.empty_table())
        # by a function of dask_manymodel on the workers: on workers without
        # it (another team's cluster reading the FileSet), Dask closed them
        # and the compute waited for ever, as for a run's output
        from .run import _check_the_workers_can_read

        _check_the_workers_can_read()
        return dd.from_map(_read_parquet_file, paths, fs=self._fs, meta=meta, label="fileset-read")

    def to_torch_dataset(
        self, *, batch_size: int | None = None, shuffle: bool = False, drop_last_batch: bool = True,
        seed: int | None = None,
    ) -> torch.utils.data.IterableDataset:
        """Stream the files as a torch ``IterableDataset`` of ``dict[column -> Tensor]``.

        Files are read one at a time (never the whole set into memory). With
        ``shuffle=True`` file order and row order change every epoch. With
        DataLoader workers each worker reads a disjoint share of the files;
        with ``drop_last_batch=True`` each drops its own short last batch.

        Parameters
        ----------
        batch_size : int, optional
            Rows per item; None (default) yields single rows.
        shuffle : bool
            Shuffle file order and row order, anew each epoch.
        drop_last_batch : bool
            Drop a last batch of fewer than ``batch_size`` rows (default True).
        seed : int, optional
            Seed of the shuffle (an int >= 0): the same seed gives the same
            orders, epoch by epoch. None: a new seed each time.

        Returns
        -------
        torch.utils.data.IterableDataset
        """
        from .connectors.torch import make_torch_dataset

        return make_torch_dataset(
            self._source(), batch_size=batch_size, shuffle=shuffle, drop_last_batch=drop_last_batch, seed=seed
        )

    def to_torch_datapipe(
        self, *, batch_size: int | None = None, shuffle: bool = False, drop_last_batch: bool = True,
        seed: int | None = None,
    ) -> torch.utils.data.IterableDataset:
        """As :meth:`to_torch_dataset`, as a datapipe where torch still has them."""
        from .connectors.torch import make_torch_datapipe

        return make_torch_datapipe(
            self._source(), batch_size=batch_size, shuffle=shuffle, drop_last_batch=drop_last_batch, seed=seed
        )

    def to_tf_dataset(
        self, *, batch_size: int, shuffle: bool = False, drop_last_batch: bool = True, seed: int | None = None,
    ) -> tf.data.Dataset:
        """Stream the files as a ``tf.data.Dataset`` of ``dict[column -> Tensor]`` batches.

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
            self._source(), batch_size=batch_size, shuffle=shuffle, drop_last_batch=drop_last_batch, seed=seed
        )

    def delete(self) -> None:
        """Remove the FileSet's files; every later call on this handle raises.

        A delete cut short (the store failing part-way) is finished by
        calling ``delete()`` again on the same handle."""
        own_id = self._manifest.get("id")
        try:
            self._check_alive()
        except FileSetDeletedError:
            if self._deleted or own_id is None or not self._cut_short_delete(own_id):
                raise
        if own_id is None:  # made before FileSets had ids: the folder, as then
            remove_paths(self._fs, [posixpath.join(self._root, MANIFEST)])
            remove_paths(self._fs, [self._root])
        else:
            # Only this FileSet's own files, each name file read again just
            # before it goes: another process may have deleted it and made a
            # new one under the name since the check above.
            # The manifest first: from then on nobody can open a half-deleted set.
            self._remove_if_ours(MANIFEST, own_id)
            try:
                # named with the id: never another set's. In the store's batches
                # (S3 deletes 1,000 a request), not a request per file
                remove_files(self._fs, self._paths())
                self._remove_if_ours(CLAIM, own_id)
                self._remove_leftovers()
            except Exception as exc:
                exc.add_note(
                    f"FileSet {self.name!r} at {shown_url(self.url)} was deleted only in part (it cannot be "
                    f"opened now); call delete() on this handle again to finish"
                )
                raise
        self._fs.invalidate_cache(self._root)
        self._deleted = True

    def _cut_short_delete(self, own_id: str) -> bool:
        """Whether a delete of this FileSet, which :meth:`_check_alive` found
        gone, was cut short after its manifest went: the name's claim is
        still its own (made again since, the claim is the new FileSet's).
        Taken for a FileSet deleted by another handle, the delete raised
        FileSetDeletedError, and what was left kept the name for good:
        ``FileSet(url, name)`` found no FileSet, and ``make`` refused the
        folder that was not empty."""
        try:
            return json.loads(read_file(self._fs, posixpath.join(self._root, CLAIM))).get("id") == own_id
        except (FileNotFoundError, ValueError, AttributeError):
            return False

    def _remove_if_ours(self, name: str, own_id: str) -> None:
        path = posixpath.join(self._root, name)
        try:
            ours = json.loads(read_file(self._fs, path)).get("id") == own_id
        except (FileNotFoundError, ValueError, AttributeError):
            return
        if ours:
            with contextlib.suppress(FileNotFoundError):
                self._fs.rm_file(path)

    def _remove_leftovers(self) -> None:
        """What else is in the folder (a stray file, a writer's temp file),
        unless another FileSet has claimed the name since: else the name
        could not be made again (``make`` refuses a folder that is not empty)."""
        self._fs.invalidate_cache(self._root)
        try:
            left = self._fs.ls(self._root, detail=False)
        except FileNotFoundError:
            return
        if {posixpath.basename(p.rstrip("/")) for p in left} & {MANIFEST, CLAIM}:
            return
        # what was listed, never the folder as a whole: a make of the name
        # right after the listing writes files the listing did not see
        for path in left:
            with contextlib.suppress(FileNotFoundError):
                remove_paths(self._fs, [path])
        if _is_local(self._fs):  # the emptied folder (an object store has none)
            with contextlib.suppress(OSError):
                os.rmdir(self._root)  # only if empty


def _identity(manifest: dict) -> tuple:
    # FileSets made before the id was added are told apart by their creation time
    return manifest.get("id"), manifest.get("created")


def _file_system_noter():
    """A function ``(partition, fs) -> partition`` that notes ``fs``, as a
    write task unpickled it on its worker (made or found in fsspec's cache
    there: the very one the task writes with, one pickle holds both), in
    keep_few_file_systems. Made in here, so that it travels by value: a
    FileSet that is not shuffled is written by Dask's own tasks, which
    workers without dask_manymodel run (there, the noting is left out)."""

    def noted(df, fs):
        try:
            from dask_manymodel.store import keep_few_file_systems
        except ImportError:
            return df
        keep_few_file_systems(fs)
        return df

    return noted


def _read_parquet_file(path: str, fs) -> pd.DataFrame:
    keep_few_file_systems(fs)  # unpickled here: made or found in fsspec's cache
    with fs.open(path, "rb") as f:
        return _to_pandas(pq.read_table(f))


def _nested(schema) -> set[str]:
    """The columns of pyarrow lists, structs and maps."""
    return {f.name for f in schema if pa.types.is_nested(f.type) and not pa.types.is_dictionary(f.type)}


def _to_pandas(table) -> pd.DataFrame:
    """``table.to_pandas()``, except that pandas cannot read back its own
    metadata of a pyarrow list or struct column ("TypeError: data type
    'list<item: int64>[pyarrow]' not understood": every read of such a
    FileSet failed): those columns are pandas' ArrowDtype of their type,
    as they were made."""
    nested = _nested(table.schema)
    if not nested:
        return table.to_pandas()
    table = without_pandas_metadata_of(table, nested)
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_nested(t) else None)


def _columns_with_missing(fs, paths: list[str]) -> frozenset[str]:
    """The columns with a missing value in any file, from the files' footers
    (the null counts of their column chunks; no data is read unless a chunk
    has no null count)."""
    found = set()
    for path, metadata in zip(paths, _footers(fs, paths)):
        names = set(metadata.schema.to_arrow_schema().names)
        for number in range(metadata.num_row_groups):
            group = metadata.row_group(number)
            for i in range(group.num_columns):
                chunk = group.column(i)
                name = chunk.path_in_schema
                if name not in names or name in found:
                    continue  # a nested column's leaf: never a tensor, its nulls do not matter
                stats = chunk.statistics
                if stats is not None and stats.has_null_count:
                    missing = stats.null_count > 0
                else:  # a writer that kept no statistics: count in the data
                    with fs.open(path, "rb") as f:
                        missing = pq.ParquetFile(f).read_row_group(number, columns=[name]).column(0).null_count > 0
                if missing:
                    found.add(name)
    return frozenset(found)


# How many bytes at the end of each parquet file one read takes to find its
# footer (metadata: schema, row groups, statistics, then its length and
# "PAR1"); a longer footer costs one more read of that file.
_TAIL_BYTES = 64 * 2**10


def _footers(fs, paths: list[str]) -> list[pq.FileMetaData]:
    """The footers (metadata) of these parquet files, in their order, from
    one batched read of their last bytes: s3fs and gcsfs fetch them
    concurrently, each in one request (a range from the end needs no size
    first). Each file opened in turn cost a HEAD and a GET, one file after
    another: a FileSet of 2,000 files waited on 4,000 requests to be made."""
    tails = fs.cat_ranges(list(paths), [-_TAIL_BYTES] * len(paths), [None] * len(paths))
    footers = []
    for path, tail in zip(paths, tails):
        if isinstance(tail, BaseException):
            raise tail
        length = struct.unpack("<I", tail[-8:-4])[0] if len(tail) >= 12 and tail[-4:] == b"PAR1" else None
        if length is not None and length + 8 <= len(tail):
            # the footer with a header: all pyarrow reads of a file to parse it
            footers.append(pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-8 - length:])))
        else:  # a longer footer, or no parquet file: read (and said) as before
            with fs.open(path, "rb") as f:
                footers.append(pq.ParquetFile(f).metadata)
    return footers


class _FileSource:
    """Batches streamed from parquet files, one file in memory at a time.

    Every file's chunk is converted to one schema, decided once from the
    whole set (a nullable int column with a missing value in any file is
    float64 in every batch), so batches agree with each other and with
    TensorFlow's signature.
    """

    fs = _ThisProcessFileSystem()  # a DataLoader's forked workers read the files

    def __init__(self, fs, paths: list[str], n_rows: int):
        self.fs = fs
        self.paths = paths
        self.n_rows = n_rows
        self.with_missing = _columns_with_missing(fs, paths)

    def _read(self, path: str) -> Columns:
        try:
            with self.fs.open(path, "rb") as f:
                table = pq.read_table(f)
        except FileNotFoundError:  # the file names hold the FileSet's id: never another set's rows
            raise FileSetDeletedError(
                f"{path} is gone: its FileSet was deleted while this dataset streamed it"
            ) from None
        return Columns.from_frame(_to_pandas(table), self.with_missing)

    @property
    def schema(self) -> dict[str, tuple[np.dtype, bool]]:
        with self.fs.open(self.paths[0], "rb") as f:
            empty = _to_pandas(pq.read_schema(f).empty_table())
        return Columns.from_frame(empty, self.with_missing).schema

    def epoch(self, rng, *, batch_size, shuffle, drop_last, share=0, n_shares=1):
        check_batch_size(batch_size)
        order = rng.permutation(len(self.paths)) if shuffle else np.arange(len(self.paths))
        mine = [self.paths[i] for i in order[share::n_shares]]
        rebatcher = Rebatcher(batch_size, drop_last)
        for path in mine:
            columns = self._read(path)
            # the file is read again every epoch: its arrays can be handed out
            # as they are, no later epoch sees what a user changes in a batch
            yield from rebatcher.feed(columns.take(rng.permutation(columns.n_rows)) if shuffle else columns.arrays)
        yield from rebatcher.finish()
