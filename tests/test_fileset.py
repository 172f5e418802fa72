"""FileSet: immutable parquet snapshots, streamed to torch and TensorFlow."""

from __future__ import annotations

import os
import threading

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import (
    FileSet,
    FileSetDeletedError,
    FileSetExistsError,
    FileSetNotFoundError,
    InvalidArgumentError,
)


def frame(n=400):
    return pd.DataFrame({"i": np.arange(n), "x": np.arange(n) / 2, "s": [f"r{i}" for i in range(n)]})


@pytest.fixture(params=["local", "memory"])
def url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "sets")
    return f"memory://filesets/{tmp_path.name}"


def test_make_reopen_and_read(url):
    # more than ten files: they come in the partitions' order (part.2 before part.10)
    made = FileSet.make(url, "fs1", dd.from_pandas(frame(), npartitions=12))
    assert [f.rsplit("/", 1)[1].split(".")[1] for f in made.files()] == [str(i) for i in range(12)]
    assert made.num_rows == 400
    reopened = FileSet(url, "fs1")
    assert reopened.files() == made.files()
    back = reopened.to_dask_dataframe().compute()
    pd.testing.assert_frame_equal(back.reset_index(drop=True), frame(), check_dtype=False)


def test_existing_name_and_missing_name(url):
    FileSet.make(url, "fs1", frame())  # pandas input works too
    with pytest.raises(FileSetExistsError, match="already exists"):
        FileSet.make(url, "fs1", frame())
    with pytest.raises(FileSetNotFoundError, match="no FileSet 'nope'"):
        FileSet(url, "nope")
    with pytest.raises(InvalidArgumentError):
        FileSet.make(url, "../escape", frame())


def test_a_fileset_opened_as_a_run_and_a_run_opened_as_a_fileset_say_which_they_are(tmp_path):
    # FileSet(url, "r1") said "create it with FileSet.make", which refuses
    # a run's name; restore_from("fs1", url) said only "no run 'fs1'"
    from dask_manymodel import ManyModelRun, RunNotFoundError

    url = str(tmp_path / "store")
    FileSet.make(url, "fs1", frame(10))
    os.makedirs(f"{url}/r1")
    with open(f"{url}/r1/_run.json", "w") as f:
        f.write("{}")
    with pytest.raises(FileSetNotFoundError) as info:
        FileSet(url, "r1")
    assert str(info.value) == (
        f"no FileSet 'r1' at {url}: 'r1' there is a run of dask_manymodel; open it with "
        f"ManyModelRun.restore_from('r1', url), or give the name of a FileSet"
    )
    with pytest.raises(RunNotFoundError) as info:
        ManyModelRun.restore_from("fs1", url)
    assert str(info.value) == (
        f"no run 'fs1' at {url} (no _run.json): 'fs1' there is a FileSet; open it with FileSet(url, 'fs1'), "
        f"or give the run_id of a run"
    )


def test_global_shuffle_keeps_the_rows_and_changes_the_order(url):
    made = dd.from_pandas(frame(), npartitions=4).manymodel.to_fileset(url, "shuffled", shuffle=True)
    back = made.to_dask_dataframe().compute().reset_index(drop=True)
    assert back["i"].tolist() != list(range(400))
    # rows moved across partitions, not only within them
    first_file = pd.read_parquet(made.files()[0], storage_options=None) if url.startswith("/") else None
    if first_file is not None:
        assert first_file["i"].max() >= 100
    pd.testing.assert_frame_equal(back.sort_values("i").reset_index(drop=True), frame(), check_dtype=False)


def test_delete_makes_every_later_call_fail(url):
    made = FileSet.make(url, "gone", frame())
    made.delete()
    assert repr(made).endswith(": deleted)")
    for call in (made.files, made.to_dask_dataframe, lambda: made.to_torch_dataset(batch_size=2), made.delete):
        with pytest.raises(FileSetDeletedError, match="was deleted"):
            call()
    with pytest.raises(FileSetNotFoundError):
        FileSet(url, "gone")


def test_torch_streaming_with_workers_covers_every_row(tmp_path):
    torch = pytest.importorskip("torch")
    made = FileSet.make(str(tmp_path), "fs", dd.from_pandas(frame(), npartitions=5))
    for shuffle in (False, True):
        ds = made.to_torch_dataset(batch_size=32, shuffle=shuffle, drop_last_batch=False)
        rows = [v for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2) for v in b["i"].tolist()]
        assert sorted(rows) == list(range(400))
    ds = made.to_torch_dataset(batch_size=32, shuffle=True, seed=3)
    epoch1 = [v for b in ds for v in b["i"].tolist()]
    epoch2 = [v for b in ds for v in b["i"].tolist()]
    assert epoch1 != epoch2
    assert all(len(b["i"]) == 32 for b in ds)  # batches span files
    assert isinstance(next(iter(ds))["s"], list)


def test_tf_streaming(tmp_path):
    pytest.importorskip("tensorflow")
    made = FileSet.make(str(tmp_path), "fs", dd.from_pandas(frame(), npartitions=3))
    dataset = made.to_tf_dataset(batch_size=50, shuffle=True, seed=1)
    rows = [v for b in dataset for v in b["i"].numpy().tolist()]
    assert sorted(rows) == list(range(400)) and rows != list(range(400))
    assert next(iter(dataset))["s"].dtype.name == "string"


def missing_only_in_the_second_file(tmp_path):
    """Two files; the nullable columns have their one missing value in the second."""
    df = pd.DataFrame(
        {
            "k": pd.array([1, 2, 3, None], dtype="Int64"),
            "flag": pd.array([True, False, None, True], dtype="boolean"),
            "whole": pd.array([5, 6, 7, 8], dtype="Int64"),  # no missing value anywhere
        }
    )
    made = FileSet.make(str(tmp_path), "na", dd.from_pandas(df, npartitions=2))
    assert made._manifest["rows_per_file"] == [2, 2]
    return made


def test_torch_nullable_dtype_is_decided_by_the_whole_fileset(tmp_path):
    torch = pytest.importorskip("torch")
    made = missing_only_in_the_second_file(tmp_path)
    batches = list(made.to_torch_dataset(batch_size=1))
    assert [b["k"].dtype for b in batches] == [torch.float64] * 4  # not int64 for the first file
    assert [b["flag"].dtype for b in batches] == [torch.float64] * 4
    assert [b["whole"].dtype for b in batches] == [torch.int64] * 4
    values = {name: [v for b in batches for v in b[name].tolist()] for name in ("k", "flag", "whole")}
    assert values["k"][:3] == [1.0, 2.0, 3.0] and np.isnan(values["k"][3])
    assert values["flag"][:2] + values["flag"][3:] == [1.0, 0.0, 1.0] and np.isnan(values["flag"][2])
    assert values["whole"] == [5, 6, 7, 8]


def test_tf_nullable_dtype_is_decided_by_the_whole_fileset(tmp_path):
    tf = pytest.importorskip("tensorflow")
    made = missing_only_in_the_second_file(tmp_path)
    batches = list(made.to_tf_dataset(batch_size=1))
    assert [b["k"].dtype for b in batches] == [tf.float64] * 4
    assert [b["flag"].dtype for b in batches] == [tf.float64] * 4
    assert [b["whole"].dtype for b in batches] == [tf.int64] * 4
    k = [v for b in batches for v in b["k"].numpy().tolist()]
    flag = [v for b in batches for v in b["flag"].numpy().tolist()]
    assert k[:3] == [1.0, 2.0, 3.0] and np.isnan(k[3])  # never INT64_MIN
    assert flag[:2] + flag[3:] == [1.0, 0.0, 1.0] and np.isnan(flag[2])  # never True
    assert [v for b in batches for v in b["whole"].numpy().tolist()] == [5, 6, 7, 8]


def test_torch_editing_a_batch_in_place_does_not_change_later_epochs(tmp_path):
    pytest.importorskip("torch")
    from tests.test_connectors_torch import edit_in_place_each_epoch

    made = FileSet.make(str(tmp_path), "fs", dd.from_pandas(frame(), npartitions=3))
    for shuffle in (False, True):
        ds = made.to_torch_dataset(batch_size=32, shuffle=shuffle, drop_last_batch=False)
        for epoch in edit_in_place_each_epoch(ds, "i"):
            assert sorted(epoch) == list(range(400))


def test_shuffled_make_with_a_seed_is_reproducible(tmp_path):
    orders = [
        FileSet.make(str(tmp_path), f"s{i}", dd.from_pandas(frame(), npartitions=4), shuffle=True, seed=3)
        .to_dask_dataframe()
        .compute()["i"]
        .tolist()
        for i in range(3)
    ]
    assert orders[0] == orders[1] == orders[2] and orders[0] != list(range(400))
    assert sorted(orders[0]) == list(range(400))
    # the accessor's to_fileset takes the seed too (it raised TypeError)
    made = dd.from_pandas(frame(), npartitions=4).manymodel.to_fileset(str(tmp_path), "a", shuffle=True, seed=3)
    assert made.to_dask_dataframe().compute()["i"].tolist() == orders[0]


@pytest.mark.parametrize("shuffle", [False, True])
def test_make_keeps_a_named_index_as_a_column(tmp_path, shuffle):
    indexed = dd.from_pandas(frame(), npartitions=2).set_index("i")
    made = FileSet.make(str(tmp_path), "idx", indexed, shuffle=shuffle)
    assert made._manifest["columns"] == ["i", "x", "s"]
    back = made.to_dask_dataframe().compute().sort_values("i").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, frame(), check_dtype=False)
    unnamed = FileSet.make(str(tmp_path), "plain", frame().set_index(np.arange(400) + 1000))
    assert unnamed._manifest["columns"] == ["i", "x", "s"]  # an unnamed index is dropped


_make_a_started, _make_b_done = threading.Event(), threading.Event()


def _held_until_make_b_is_done(df):
    _make_a_started.set()
    assert _make_b_done.wait(30), "make B never returned"  # a deadline, not a sleep
    return df


def test_two_makes_of_one_name_at_once_one_is_refused(tmp_path):
    # make A holds its rows until make B of the same name has returned;
    # B starts once A's rows are being computed (A's folder may be there, empty)
    started, b_done = _make_a_started, _make_b_done
    started.clear(), b_done.clear()
    source = dd.from_pandas(frame(40).assign(src="A"), npartitions=2)
    slow = source.map_partitions(_held_until_make_b_is_done, meta=source._meta)
    outcome = {}

    def make_a():
        try:
            outcome["A"] = FileSet.make(str(tmp_path), "snap", slow)
        except Exception as exc:  # reported below
            outcome["A"] = exc

    with dask.config.set(scheduler="threads"):
        thread = threading.Thread(target=make_a)
        thread.start()
        try:
            assert started.wait(30)
            with pytest.raises(FileSetExistsError, match="already exists"):
                FileSet.make(str(tmp_path), "snap", frame(3).assign(src="B"))
        finally:
            b_done.set()
            thread.join()
    assert isinstance(outcome["A"], FileSet), outcome["A"]
    back = FileSet(str(tmp_path), "snap").to_dask_dataframe().compute()
    assert back["src"].tolist() == ["A"] * 40


def test_a_make_whose_claim_another_make_took_over_leaves_the_name_to_it(tmp_path, monkeypatch):
    """On a store whose exclusive create is a check and then a write (a GCS
    emulator ignoring the precondition did so), both makes "won": one
    manifest replaced the other, and the loser's caller was told it made
    the FileSet. The claim is read again before the manifest."""
    from dask_manymodel.store import RunStore

    create = RunStore.create_exclusive

    def raced(self, path, data):  # the other make writes its claim right after ours
        create(self, path, data)
        self.fs.pipe_file(path, b'{"id": "other"}')
        self.fs.pipe_file(path.replace("_fileset.claim", "part.0.other.parquet"), b"the other make's rows")

    monkeypatch.setattr(RunStore, "create_exclusive", raced)
    with pytest.raises(FileSetExistsError, match="already exists"):
        FileSet.make(str(tmp_path), "snap", frame(40))
    left = sorted(p.name for p in (tmp_path / "snap").iterdir())
    assert left == ["_fileset.claim", "part.0.other.parquet"]  # ours gone, the other's kept


def test_make_at_memory_with_worker_processes_is_refused(client):
    """Each worker process wrote its files into its own memory: the FileSet
    was made with 0 files and 0 rows, and reading it failed."""
    from dask_manymodel import InvalidURLError
    from dask_manymodel.store import open_url

    with pytest.raises(InvalidURLError, match="in-memory and private to each process"):
        FileSet.make("memory://sets-on-processes", "s1", dd.from_pandas(frame(), npartitions=2))
    fs, _ = open_url("memory://sets-on-processes")
    assert not fs.exists("/sets-on-processes/s1")


def test_a_make_that_fails_leaves_nothing_and_frees_the_name(url):
    def broken(df):  # the other partitions' files may be written by then
        if df["i"].min() >= 300:
            raise RuntimeError("bad partition")
        return df

    failing = dd.from_pandas(frame(), npartitions=4).map_partitions(broken, meta=frame().iloc[:0])
    with pytest.raises(RuntimeError, match="bad partition"):
        FileSet.make(url, "half", failing)
    with pytest.raises(FileSetNotFoundError):
        FileSet(url, "half")
    assert FileSet.make(url, "half", frame()).num_rows == 400


def _broken_first_partition(df):
    if df["i"].min() == 0:
        raise RuntimeError("bad partition")
    return df


def test_a_failed_make_removes_what_its_other_tasks_write_late_and_raises_its_own_error(tmp_path, monkeypatch):
    """A task of the failed compute (still running on a worker when another
    failed) wrote its file while the make removed the folder: "OSError:
    Directory not empty" was raised in place of the partition's own error,
    and the file stayed under the name."""
    from dask_manymodel import fileset

    remove, calls = fileset.remove_paths, []

    def racing(fs, paths):  # the first removal meets another task's late file
        calls.append(paths)
        if len(calls) == 1:
            (tmp_path / "late" / "part.1.late.parquet").write_bytes(b"written late")
            raise OSError(39, "Directory not empty")
        remove(fs, paths)

    monkeypatch.setattr(fileset, "remove_paths", racing)
    source = dd.from_pandas(frame(40), npartitions=2).map_partitions(_broken_first_partition, meta=frame().iloc[:0])
    with pytest.raises(RuntimeError, match="bad partition"):
        FileSet.make(str(tmp_path), "late", source)
    assert not (tmp_path / "late").exists() and len(calls) == 2
    assert FileSet.make(str(tmp_path), "late", frame(3)).num_rows == 3


def test_a_handle_never_reads_a_fileset_made_again_under_its_name(url):
    pytest.importorskip("torch")
    FileSet.make(url, "snap", frame(6))
    reader = FileSet(url, "snap")
    streamed = reader.to_torch_dataset(batch_size=2)  # built before the delete, read after
    FileSet(url, "snap").delete()
    FileSet.make(url, "snap", frame(3).assign(i=[100, 101, 102]))
    for call in (reader.files, reader.to_dask_dataframe, lambda: reader.num_rows, reader.delete):
        with pytest.raises(FileSetDeletedError, match="made again under the same name"):
            call()
    with pytest.raises(FileSetDeletedError, match="is gone"):
        list(streamed)
    assert FileSet(url, "snap").to_dask_dataframe().compute()["i"].tolist() == [100, 101, 102]


def test_make_drops_an_index_named_like_a_column(tmp_path):
    indexed = dd.from_pandas(frame(), npartitions=2).set_index("i", drop=False)
    made = FileSet.make(str(tmp_path), "same", indexed)
    assert made._manifest["columns"] == ["i", "x", "s"]
    back = made.to_dask_dataframe().compute().sort_values("i").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, frame(), check_dtype=False)


def test_a_delete_removes_only_its_own_fileset(url, monkeypatch):
    """Another process deleted the FileSet and made a new one under its
    name just after this handle's delete() had checked it: the delete
    removed the whole folder, the new FileSet with it."""
    made = FileSet.make(url, "snap", frame(6))
    check_alive = FileSet._check_alive

    def someone_else_makes_it_again(self):
        check_alive(self)
        monkeypatch.setattr(FileSet, "_check_alive", check_alive)
        FileSet(url, "snap").delete()
        FileSet.make(url, "snap", frame(3))

    monkeypatch.setattr(FileSet, "_check_alive", someone_else_makes_it_again)
    made.delete()
    again = FileSet(url, "snap")
    assert again.to_dask_dataframe().compute()["i"].tolist() == [0, 1, 2]
    with pytest.raises(FileSetDeletedError):
        made.files()
    # a stray file in the folder goes with the FileSet: the name can be made again
    import fsspec

    fs, _ = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{again.files()[0].rsplit('/', 1)[0]}/notes.txt", b"stray")
    again.delete()
    assert FileSet.make(url, "snap", frame(2)).num_rows == 2


def test_a_delete_leaves_a_fileset_made_during_its_sweep(tmp_path, monkeypatch):
    """The sweep of leftovers removed the folder as a whole, with the files
    of a FileSet that another process made right after the sweep's listing."""
    url = str(tmp_path / "sets")
    made = FileSet.make(url, "snap", frame(6))
    fs = made._fs
    real_ls = fs.ls

    def list_then_someone_makes_it(path, *args, **kwargs):
        listing = real_ls(path, *args, **kwargs)
        if path.rstrip("/").endswith("/snap"):  # the sweep's listing
            monkeypatch.undo()
            FileSet.make(url, "snap", frame(3))
        return listing

    monkeypatch.setattr(fs, "ls", list_then_someone_makes_it)
    made.delete()
    assert FileSet(url, "snap").num_rows == 3


def test_a_delete_cut_short_by_the_store_is_finished_by_deleting_again(tmp_path):
    """The store failed half-way through delete()'s deletes, after the
    manifest: a second delete() raised FileSetDeletedError, FileSet(url,
    name) said "create it with FileSet.make", and make said "already
    exists" (the claim and half the files were left): the name was taken
    for good. Now the error says to call delete() again, which finishes."""
    from . import flaky_fs

    flaky_fs.register()
    url = f"flaky://{tmp_path}/sets"
    made = FileSet.make(url, "snap", dd.from_pandas(frame(40), npartitions=4),
                        storage_options={"fail_rm_nth": [1], "count_dir": str(tmp_path)})
    with pytest.raises(OSError, match="injected failure half-way through a delete") as raised:
        made.delete()
    assert "deleted only in part (it cannot be opened now); call delete() on this handle again" in str(
        raised.value.__notes__
    )
    left = sorted(os.listdir(tmp_path / "sets" / "snap"))
    assert "_fileset.claim" in left and len(left) == 3  # its claim, and 2 of its 4 files
    with pytest.raises(FileSetNotFoundError):
        FileSet(url, "snap")
    made.delete()
    assert not os.listdir(tmp_path / "sets" / "snap")  # (an empty folder: flaky:// is no local disk to us)
    with pytest.raises(FileSetDeletedError, match="was deleted"):
        made.delete()
    assert FileSet.make(url, "snap", frame(3)).num_rows == 3


def test_a_make_whose_manifest_write_fails_once_is_made(tmp_path):
    """The manifest, the make's last write, was written without the store's
    retries, as a run's files are: one transient failure of it threw the
    whole snapshot away (its compute with it), raising the bare OSError."""
    from . import flaky_fs

    flaky_fs.register()
    url = f"flaky://{tmp_path}/sets"
    options = {"fail_nth": {"_fileset.json": [1]}, "count_dir": str(tmp_path), "log_path": str(tmp_path / "log")}
    made = FileSet.make(url, "snap", dd.from_pandas(frame(40), npartitions=2), storage_options=options)
    assert (tmp_path / "log").read_text().count("_fileset.json") == 1  # it did fail once
    assert FileSet(url, "snap").num_rows == made.num_rows == 40


def test_a_make_refused_by_what_a_cut_short_make_left_says_so(url):
    """A make whose process was killed after its claim (or whose clean-up
    the store refused) left files without a manifest: the next make said
    "already exists ... delete() the old one", and FileSet(url, name) found
    no FileSet to delete."""
    import fsspec

    made = FileSet.make(url, "snap", frame(6))
    fs, _ = fsspec.core.url_to_fs(url)
    folder = made.files()[0].rsplit("/", 1)[0]
    fs.rm_file(f"{folder}/_fileset.json")  # as a make killed before its last write leaves it
    with pytest.raises(FileSetNotFoundError):
        FileSet(url, "snap")
    with pytest.raises(FileSetExistsError, match=r"FileSet 'snap' already exists at .*, unfinished \(no "
                       r"_fileset.json\): another FileSet.make of it is writing it now, or a make or delete of it "
                       r"was cut short .* If none is running, delete the folder .*snap by hand"):
        FileSet.make(url, "snap", frame(3))
    fs.rm(folder, recursive=True)
    assert FileSet.make(url, "snap", frame(3)).num_rows == 3


def test_a_shuffled_make_runs_on_the_cluster_under_a_local_scheduler_setting(client, tmp_path):
    """dask.config.set(scheduler="threads") with a client: Dask picked its p2p
    shuffle (for the client) and ran it on the local scheduler, which failed
    ("P2P ... failed during transfer phase"); a run works there."""
    pdf = pd.DataFrame({"k": np.arange(200) % 5, "x": np.arange(200.0)})
    ddf = dd.from_pandas(pdf, npartitions=3)
    with dask.config.set(scheduler="threads"):
        made = FileSet.make(str(tmp_path), "shuffled", ddf, shuffle=True, seed=1)
    assert made.num_rows == 200
    assert sorted(made.to_dask_dataframe().compute()["x"]) == list(pdf["x"])


def keep_nothing(data, ctx):
    return 0


@pytest.mark.parametrize("how", ["error", "overwrite", "resume"])
def test_a_run_never_takes_the_name_of_a_fileset_in_the_same_url(client, tmp_path, how):
    """Nightly runs and their FileSets share one URL, and so its names. A
    run started under a FileSet's name said "run '2026-11-01' already exists
    ...; pass on_existing_artifacts='overwrite' to replace it", and the
    overwrite deleted the snapshot and trained in its place (a resume said
    the run did not exist)."""
    from dask_manymodel import RunExistsError

    url = str(tmp_path / "team")
    snapshot = FileSet.make(url, "2026-11-01", frame(20))
    ddf = dd.from_pandas(frame(20).assign(k=1), npartitions=1)
    with pytest.raises(RunExistsError, match="2026-11-01 holds a FileSet, not a run"):
        ddf.manymodel.train(keep_nothing, by="k", url=url, run_id="2026-11-01", on_existing_artifacts=how)
    assert snapshot.num_rows == 20 and FileSet(url, "2026-11-01").to_dask_dataframe().compute().shape == (20, 3)
    assert not (tmp_path / "team" / "2026-11-01" / "_run.json").exists()


def test_a_fileset_never_takes_the_name_of_a_run_in_the_same_url(client, tmp_path):
    url = str(tmp_path / "team")
    ddf = dd.from_pandas(frame(20).assign(k=1), npartitions=1)
    ddf.manymodel.train(keep_nothing, by="k", url=url, run_id="2026-11-01").wait(show_progress=False)
    with pytest.raises(FileSetExistsError, match="holds the run '2026-11-01', not a FileSet"):
        FileSet.make(url, "2026-11-01", frame(20))


@pytest.mark.parametrize(
    "columns, shuffle, message",
    [
        ([0, 1, 2], False, r"column label\(s\) \[0, 1, 2\] are not text"),
        (["i", np.nan, "s"], False, r"column label\(s\) \[nan\] are not text"),
        (["i", "x", "x"], False, r"column name\(s\) \['x'\] name more than one column"),
        (["i", "_partitions", "s"], True, r"column '_partitions' is the name of the column Dask's shuffle adds"),
    ],
    ids=["ints", "nan", "twice", "dasks-own"],
)
def test_make_refuses_labels_its_files_cannot_hold_before_writing(tmp_path, columns, shuffle, message):
    """Dask said "parquet doesn't support non-string column names" naming
    none; a NaN label failed every write task (KeyError: 'nan'), and a
    shuffled make of a column _partitions failed after its compute (Dask's
    shuffle drops its own column of that name)."""
    source = frame(40)
    source.columns = columns
    with pytest.raises(InvalidArgumentError, match=message):
        FileSet.make(str(tmp_path / "sets"), "fs1", dd.from_pandas(source, npartitions=2), shuffle=shuffle)
    assert not os.path.exists(tmp_path / "sets" / "fs1")


def test_make_refuses_a_shuffle_that_is_not_true_or_false_before_writing(tmp_path):
    # FileSet.make(url, name, ddf, {"anon": True}) (storage_options given
    # where shuffle goes) made a shuffled FileSet, as did shuffle="no"
    ddf = dd.from_pandas(frame(40), npartitions=2)
    for bad, hint in [({"anon": True}, " (storage_options is a keyword argument: storage_options={...})"),
                      ("no", "")]:
        with pytest.raises(InvalidArgumentError) as info:
            FileSet.make(str(tmp_path / "sets"), "fs1", ddf, bad)
        assert str(info.value) == f"shuffle must be True or False, got {bad!r}{hint}"
    assert not os.path.exists(tmp_path / "sets")


def test_a_pyarrow_list_column_reads_back(tmp_path):
    """pandas cannot read back its own metadata of a pyarrow list column
    (TypeError: data type 'list<item: int64>[pyarrow]' not understood): the
    FileSet was made, and every read of it failed."""
    import pyarrow as pa

    source = frame(40).assign(pair=pd.array([[1, 2]] * 40, dtype=pd.ArrowDtype(pa.list_(pa.int64()))))
    made = FileSet.make(str(tmp_path / "sets"), "lists", dd.from_pandas(source, npartitions=2))
    back = made.to_dask_dataframe().compute().reset_index(drop=True)
    assert back["pair"].dtype == pd.ArrowDtype(pa.list_(pa.int64()))
    assert back["pair"].tolist() == [[1, 2]] * 40 and back["i"].tolist() == list(range(40))


def test_a_shuffled_make_of_a_pyarrow_list_column_on_the_cluster(client, tmp_path):
    """Dask's p2p shuffle failed on it after the make's compute ("P2P ...
    failed during transfer phase"): such a make shuffles with tasks."""
    import pyarrow as pa

    source = frame(40).assign(pair=pd.array([[1, 2]] * 40, dtype=pd.ArrowDtype(pa.list_(pa.int64()))))
    made = FileSet.make(str(tmp_path / "sets"), "lists", dd.from_pandas(source, npartitions=3), shuffle=True, seed=1)
    back = made.to_dask_dataframe().compute()
    assert sorted(back["i"]) == list(range(40)) and back["pair"].tolist() == [[1, 2]] * 40
    pytest.importorskip("torch")  # an extra: the FileSet's checks above ran without it
    batch = next(iter(made.to_torch_dataset(batch_size=4)))
    assert [list(pair) for pair in batch["pair"]] == [[1, 2]] * 4


def test_footers_longer_than_the_tail_read_and_files_of_one_row(tmp_path):
    """The footers of a FileSet's files come from one read of each file's
    last 64 KiB: a longer footer (a frame of thousands of columns) is read
    through the file, and a file shorter than that read whole."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dask_manymodel.fileset import _TAIL_BYTES, _footers

    wide = pa.table({f"column_{i}": [float(i)] * 3 for i in range(3000)})
    narrow = pa.table({"x": [1]})
    pq.write_table(wide, tmp_path / "wide.parquet")
    pq.write_table(narrow, tmp_path / "narrow.parquet")
    assert pq.read_metadata(tmp_path / "wide.parquet").serialized_size > _TAIL_BYTES
    fs = fsspec.filesystem("file")
    footers = _footers(fs, [str(tmp_path / "wide.parquet"), str(tmp_path / "narrow.parquet")])
    assert [(f.num_rows, f.num_columns) for f in footers] == [(3, 3000), (1, 1)]


def test_a_dask_frames_column_of_objects_is_refused_naming_it_and_its_typed_form_is_stored(tmp_path):
    """A Dask column of Python objects (embeddings from an apply declared
    meta=object) failed every make with pyarrow's "ArrowInvalid: Could not
    convert <object object at ...>" (Dask's placeholder of its meta), naming
    no column: it is refused naming it, before anything is written, and the
    type it says to give stores the arrays as lists."""
    import pyarrow as pa

    ddf = dd.from_pandas(frame(6), npartitions=2)
    ddf = ddf.assign(emb=ddf["i"].apply(lambda i: np.array([i, i + 0.5]), meta=("emb", object)))
    with pytest.raises(InvalidArgumentError, match=r"column\(s\) \['emb'\] of the Dask dataframe hold Python objects"):
        FileSet.make(str(tmp_path / "sets"), "emb", ddf)
    assert not (tmp_path / "sets" / "emb").exists()  # nothing written: the name is free
    typed = ddf.astype({"emb": pd.ArrowDtype(pa.list_(pa.float64()))})
    made = FileSet.make(str(tmp_path / "sets"), "emb", typed, shuffle=True, seed=2)
    back = made.to_dask_dataframe().compute().sort_values("i")
    assert [list(v) for v in back["emb"]] == [[i, i + 0.5] for i in range(6)]


def test_a_pandas_frames_columns_of_objects_are_looked_at_once(tmp_path, monkeypatch):
    """FileSet.make looked at every column of objects of a pandas frame
    twice (its own scan, then as_dask_dataframe's): one pass each now."""
    seen = []
    infer_dtype = pd.api.types.infer_dtype

    def counted(values, *args, **kwargs):
        seen.append(getattr(values, "name", None))
        return infer_dtype(values, *args, **kwargs)

    monkeypatch.setattr(pd.api.types, "infer_dtype", counted)
    source = pd.DataFrame({
        "emb": [np.array([i, i + 0.5]) for i in range(4)], "t": pd.Series(list("abcd"), dtype=object), "i": range(4),
    })
    made = FileSet.make(str(tmp_path / "sets"), "once", source)
    assert sorted(n for n in seen if n in ("emb", "t")) == ["emb", "t"]
    back = made.to_dask_dataframe().compute()
    assert back["t"].tolist() == list("abcd") and [list(v) for v in back["emb"]] == [[i, i + 0.5] for i in range(4)]
