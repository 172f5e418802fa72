"""The whole flow against a real S3 server on 127.0.0.1 (moto), through s3fs."""

from __future__ import annotations

import logging
import socket

import dask
import dask.dataframe as dd
import distributed
import numpy as np
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import ExecutionOptions, ManyModelRun, RunStatus

from . import flaky_fs
from .conftest import fit_line, make_frame
from .test_faults import assert_wrote_nothing_more, generated_frame, start_again_while_group_zero_holds

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

SECRET = "s3cr3t-never-stored"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_options():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "eu-west-1"},
        "skip_instance_cache": True,
    }
    s3fs.S3FileSystem(**options).mkdir("models")
    yield options
    server.stop()


def predict_frame(data, model, ctx):
    df = data.to_pandas()
    return df.assign(pred=np.polyval(model, df["x"].to_numpy()))


def test_train_predict_restore_on_s3(client, s3_options):
    url = "s3://models/flow"
    ddf = dd.from_pandas(make_frame(n_groups=8, rows=10), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    inf = ddf.manymodel.predict(
        predict_frame, by="store", url=url, training_run_id="r1", run_id="s1", storage_options=s3_options
    )
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    scores = inf.to_dask_dataframe().compute()
    assert len(scores) == 80
    np.testing.assert_allclose(scores["pred"], scores["y"], atol=1e-9)  # exact lines

    restored = ManyModelRun.restore_from("r1", url, storage_options=s3_options)
    assert restored.status == RunStatus.SUCCESS
    np.testing.assert_allclose(restored.get_model(6), [1.6, 6], atol=1e-9)
    restored_scores = ManyModelRun.restore_from("s1", url, storage_options=s3_options)
    assert len(restored_scores.to_dask_dataframe().compute()) == 80

    fs = s3fs.S3FileSystem(**s3_options)
    objects = fs.find("models/flow")
    assert "models/flow/r1/store=6/model.pkl" in objects
    assert "models/flow/s1/store=6/part-0.parquet" in objects
    for path in objects:
        assert SECRET.encode() not in fs.cat_file(path), path


def test_a_run_started_again_writes_nothing_more_on_s3(client, s3_options, tmp_path, caplog):
    """As tests/test_faults.py's test of it, on S3: the first start reads the
    second one's _run.json through s3fs, and writes no object after it."""
    url = "s3://models/fence"
    with caplog.at_level(logging.WARNING, "dask_manymodel"):
        first, second = start_again_while_group_zero_holds(client, url, str(tmp_path), storage_options=s3_options)
    assert s3fs.S3FileSystem(**s3_options).find("models/fence/r1") == ["models/fence/r1/_run.json"]
    assert_wrote_nothing_more(first, second, caplog, storage_options=s3_options)


def test_transient_s3_failures_are_retried(client, s3_options, tmp_path):
    flaky_fs.register_s3()
    log = tmp_path / "failures.log"
    options = dict(s3_options, fail_rate=0.15, log_path=str(log))
    ddf = dd.from_pandas(make_frame(n_groups=30, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line, by="store", url="flakys3://models/flaky", run_id="r1", storage_options=options,
        execution_options=ExecutionOptions(storage_retries=6, storage_retry_backoff=0.001),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert log.read_text().count("transient") >= 2
    restored = ManyModelRun.restore_from("r1", "s3://models/flaky", storage_options=s3_options)
    assert restored.status == RunStatus.SUCCESS
    np.testing.assert_allclose(restored.get_model(17), [2.7, 17], atol=1e-9)


def test_predict_downloads_the_models_in_batches(client, s3_options, tmp_path):
    flaky_fs.register_s3()
    ddf = dd.from_pandas(make_frame(n_groups=30, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url="s3://models/batched", run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    log = tmp_path / "reads.log"
    inf = ddf.manymodel.predict(
        predict_frame, by="store", url="flakys3://models/batched", training_run_id="r1", run_id="s1",
        storage_options=dict(s3_options, log_path=str(log), log_reads=True),
        execution_options=ExecutionOptions(npartitions=2),
    )
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    scores = inf.to_dask_dataframe().compute()
    np.testing.assert_allclose(scores["pred"], scores["y"], atol=1e-9)
    lines = log.read_text().splitlines()
    # every model came down once, in one request of many per task
    models = sorted(line.split(" ", 1)[1] for line in lines if line.startswith("file ") and line.endswith("model.pkl"))
    assert models == sorted(f"models/batched/r1/store={store}/model.pkl" for store in range(30))
    batches = [int(line.split()[1]) for line in lines if line.startswith("batch ")]
    assert len(batches) == len(inf.futures) == 2
    assert sum(batches) == 30


def test_a_missing_model_fails_only_its_own_group(client, s3_options):
    ddf = dd.from_pandas(make_frame(n_groups=10, rows=5), npartitions=2)
    url = "s3://models/missing"
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    s3fs.S3FileSystem(**s3_options).rm("models/missing/r1/store=4/model.pkl")
    inf = ddf.manymodel.predict(
        predict_frame, by="store", url=url, training_run_id="r1", run_id="s1", storage_options=s3_options
    )
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    progress = inf.get_progress()
    assert [d.partition_id for d in progress["FAILED"]] == [4]
    assert "store=4/model.pkl is missing" in progress["FAILED"][0].error
    assert len(progress["DONE"]) == 9


@pytest.mark.parametrize("where", ["local", "s3"])
def test_brackets_in_a_url_are_part_of_the_name(client, s3_options, tmp_path, where):
    """fsspec reads a path with [ ] in it as a pattern when it is given to
    rm, cat or get: an overwrite under models[12] deleted the run of the
    same id under models1 on S3, a restored run could not read its statuses,
    and a FileSet under data[v1] read back no rows."""
    from dask_manymodel import FileSet

    base, options = (str(tmp_path), None) if where == "local" else ("s3://models/brackets", s3_options)
    ddf = dd.from_pandas(make_frame(n_groups=6, rows=5), npartitions=2)
    sibling, mine = f"{base}/models1", f"{base}/models[12]"
    for url in (sibling, mine):
        assert ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=options).wait(
            show_progress=False
        ) == RunStatus.SUCCESS
    again = ddf.manymodel.train(
        fit_line, by="store", url=mine, run_id="r1", storage_options=options, on_existing_artifacts="overwrite"
    )
    assert again.wait(show_progress=False) == RunStatus.SUCCESS
    for url in (sibling, mine):
        restored = ManyModelRun.restore_from("r1", url, storage_options=options)
        assert restored.status == RunStatus.SUCCESS and len(restored.get_progress()["DONE"]) == 6
        np.testing.assert_allclose(restored.get_model(2), [1.2, 2], atol=1e-9)

    FileSet.make(f"{base}/sets1", "s1", ddf, storage_options=options)
    doomed = FileSet.make(f"{base}/sets[12]", "s1", ddf, storage_options=options)
    assert len(doomed.to_dask_dataframe().compute()) == 30
    doomed.delete()
    assert len(FileSet(f"{base}/sets1", "s1", storage_options=options).to_dask_dataframe().compute()) == 30


def test_a_missing_bucket_is_refused_before_compute(client, s3_options):
    """It was found after the count, as a raw FileNotFoundError that named
    no URL (fs.exists of the URL is just False)."""
    from dask_manymodel import InvalidURLError

    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    with pytest.raises(InvalidURLError, match="'no-such-bucket' does not exist; an object store's bucket must exist"):
        ddf.manymodel.train(fit_line, by="store", url="s3://no-such-bucket/x", run_id="r1", storage_options=s3_options)
    # and a FileSet (it was the backend's FileNotFoundError)
    from dask_manymodel import FileSet

    with pytest.raises(InvalidURLError, match="'no-such-bucket' does not exist; an object store's bucket must exist"):
        FileSet.make("s3://no-such-bucket/sets", "s1", ddf, storage_options=s3_options)


def _recorded(endpoint: str, action) -> list[dict]:
    """The S3 requests (``method``, ``url``, ...) the server saw while
    ``action`` ran, from any process (moto's recorder; it writes its file,
    "moto_recording", in the working directory)."""
    import json

    import requests

    requests.post(f"{endpoint}/moto-api/recorder/reset-recording")
    requests.post(f"{endpoint}/moto-api/recorder/start-recording")
    try:
        action()
    finally:
        requests.post(f"{endpoint}/moto-api/recorder/stop-recording")
    recorded = requests.get(f"{endpoint}/moto-api/recorder/download-recording").text
    return [json.loads(line) for line in recorded.splitlines() if line.strip()]


def _listings(endpoint: str, action) -> list[str]:
    """The S3 listing requests the server saw while ``action`` ran (moto's recorder)."""
    return [entry["url"] for entry in _recorded(endpoint, action) if "list-type=2" in entry["url"]]


def test_an_overwrite_lists_the_old_run_once(client, s3_options, tmp_path, monkeypatch):
    """fsspec's recursive rm of the group folders listed each one in turn:
    a request per group before any file went (an hour of listings at
    100,000 groups on a store answering in 40 ms)."""
    from dask_manymodel.store import RunStore

    url = "s3://models/listed-once"
    ddf = dd.from_pandas(make_frame(n_groups=30, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    store = RunStore(url, "r1", s3_options)
    monkeypatch.chdir(tmp_path)  # where the recorder writes its file, "moto_recording"
    listings = _listings(
        s3_options["client_kwargs"]["endpoint_url"], lambda: store.delete_run(keep=("_run.json",))
    )
    assert len(listings) == 1, listings
    assert store.fs.find(store.root) == [f"{store.root}/_run.json"]


def test_runs_lists_the_runs_another_process_wrote_since_its_last_listing(s3_options, capsys):
    """`dask-manymodel runs` from Python (cli.main, as a notebook calls it
    every morning): s3fs keeps a listing for as long as its file system
    lives (one per storage_options, for the process), so the runs that the
    nightly job wrote since the first call were never listed."""
    import json

    from dask_manymodel.cli import main

    url = "s3://models/nightly-listing"
    # fsspec's cached file system, as a user's storage_options give it
    options = {key: value for key, value in s3_options.items() if key != "skip_instance_cache"}
    nightly = s3fs.S3FileSystem(**s3_options)  # another process: a file system of its own

    def nightly_run(run_id):
        manifest = {"format_version": 1, "run_id": run_id, "kind": "train", "partition_by": ["store"],
                    "status": "SUCCESS", "n_groups": 0, "created": "2026-11-01T02:00:00+00:00"}
        nightly.pipe({f"models/nightly-listing/{run_id}/_run.json": json.dumps(manifest).encode(),
                      f"models/nightly-listing/{run_id}/_groups.json": b"[]"})

    nightly_run("2026-11-01")
    assert main(["runs", url, "--storage-options", json.dumps(options)]) == 0
    assert "2026-11-01" in capsys.readouterr().out
    nightly_run("2026-11-02")
    assert main(["runs", url, "--storage-options", json.dumps(options)]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == ["2026-11-01", "2026-11-02"]


def fit_line_unless_store_ends_in_3(data, ctx):
    if ctx.partition_id % 10 == 3:
        print(f"store {ctx.partition_id} ends in 3")
        raise ValueError(f"store {ctx.partition_id} ends in 3")
    return fit_line(data, ctx)


def test_retry_failed_deletes_the_old_statuses_in_batches(client, s3_options, tmp_path, monkeypatch):
    """A resume (here retry_failed()) deletes the stored status of each group
    it runs again before its tasks start. It did so one DELETE request per
    group, one after another: minutes of requests on S3 with thousands of
    failed groups. Now S3's batch delete takes up to 1,000 a request."""
    url = "s3://models/stale-statuses"
    ddf = dd.from_pandas(make_frame(n_groups=40, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line_unless_store_ends_in_3, by="store", url=url, run_id="r1", storage_options=s3_options
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    # models an earlier start of two failed groups wrote (killed before their
    # statuses): deleted in the same request, else read beside a FAILED status
    s3 = s3fs.S3FileSystem(**s3_options)
    stale = [f"models/stale-statuses/r1/store={group}/model.pkl" for group in (3, 13)]
    for path in stale:
        s3.pipe_file(path, b"an old model")
    monkeypatch.chdir(tmp_path)  # where the recorder writes its file
    again = []
    requests = _recorded(s3_options["client_kwargs"]["endpoint_url"], lambda: again.append(run.retry_failed()))
    deletes = [
        entry for entry in requests
        if entry["method"] == "DELETE" or (entry["method"] == "POST" and "delete" in entry["url"])
    ]
    assert len(deletes) == 1, [f"{entry['method']} {entry['url']}" for entry in deletes]
    assert again[0].wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    progress = again[0].get_progress()
    assert sorted(d.partition_id for d in progress["FAILED"]) == [3, 13, 23, 33]
    assert all(d.error == f"ValueError: store {d.partition_id} ends in 3" for d in progress["FAILED"])
    assert len(progress["DONE"]) == 36
    s3.invalidate_cache()
    assert not any(s3.exists(path) for path in stale)
    assert s3.exists("models/stale-statuses/r1/store=0/model.pkl")


@pytest.mark.parametrize("handle", ["live", "restored"])
def test_the_tracebacks_of_many_groups_are_read_together(client, s3_options, handle, monkeypatch):
    """``for d in run.get_progress()["FAILED"]: print(d.traceback)`` read
    each group's stored status alone, one request after another: 5,000
    failed groups on a store answering in 50 ms took over 4 minutes. The
    first text asked for is still read alone; from the second on, the next
    groups of the listing of the same status are read with it, at once."""
    from dask_manymodel import run as run_module

    url = f"s3://models/tracebacks-{handle}"
    ddf = dd.from_pandas(make_frame(n_groups=100, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        fit_line_unless_store_ends_in_3, by="store", url=url, run_id="r1", storage_options=s3_options
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    if handle == "restored":
        run = ManyModelRun.restore_from("r1", url, storage_options=s3_options)
    failed = run.get_progress()["FAILED"]
    assert len(failed) == 10
    waits = _s3_waits(monkeypatch)
    monkeypatch.setattr(run_module, "_TEXT_READ_AHEAD", 4, raising=False)
    texts = [(d.traceback, d.logs) for d in failed]
    for d, (traceback, logs) in zip(failed, texts):
        assert f"ValueError: store {d.partition_id} ends in 3" in traceback
        assert logs == f"store {d.partition_id} ends in 3\n"
    # the first alone, then the other nine 4 at a time (it was one wait per group)
    assert len(waits) == 4, waits
    assert [d.traceback for d in failed] == [traceback for traceback, _ in texts]  # read once
    assert len(waits) == 4
    # a DONE group's logs are read alone, and not with the FAILED ones
    waits.clear()
    done = run.get_progress()["DONE"]
    assert done[0].logs == "" and len(waits) == 1


def _s3_waits(monkeypatch) -> list[str]:
    """The names of this process's blocking calls into an s3fs file system
    from now on (each is one wait on the store, however many concurrent
    requests it makes): fsspec's sync methods all go through fsspec.asyn.sync."""
    import fsspec.asyn

    waits: list[str] = []
    sync = fsspec.asyn.sync

    def counted(loop, func, *args, **kwargs):
        owner = getattr(func, "__self__", None) or (args[0] if args else None)
        if isinstance(owner, s3fs.S3FileSystem):
            waits.append(func.__name__)
        return sync(loop, func, *args, **kwargs)

    monkeypatch.setattr(fsspec.asyn, "sync", counted)
    return waits


def test_a_filesets_files_are_read_and_deleted_together(client, s3_options, tmp_path, monkeypatch):
    """FileSet.make opened each file it wrote to count its rows, and so did
    streaming to torch or TensorFlow to find the columns with nulls: a HEAD
    and a GET per file, one file after another. delete() deleted the files
    one request each. Now the footers come in one batched read, and the
    files go in S3's batches: the same waits and requests for 2 files or 12."""
    from dask_manymodel import FileSet

    waits = _s3_waits(monkeypatch)
    monkeypatch.chdir(tmp_path)  # where moto's recorder writes its file
    endpoint = s3_options["client_kwargs"]["endpoint_url"]
    seen = {}
    for n_files in (2, 12):
        ddf = dd.from_pandas(make_frame(n_groups=24, rows=5), npartitions=n_files)
        waits.clear()
        fileset = FileSet.make("s3://models/footers", f"f{n_files}", ddf, storage_options=s3_options)
        made = len(waits)
        assert fileset.num_rows == 120 and len(fileset.files()) == n_files
        waits.clear()
        fileset._source()  # what to_torch_dataset and to_tf_dataset read first
        sourced = len(waits)
        deletes = [
            entry for entry in _recorded(endpoint, fileset.delete)
            if entry["method"] == "DELETE" or (entry["method"] == "POST" and "delete" in entry["url"])
        ]
        seen[n_files] = (made, sourced, len(deletes))
        assert s3fs.S3FileSystem(**s3_options).find(f"models/footers/f{n_files}") == []
    assert seen[2] == seen[12], seen


def test_a_filesets_dask_dataframe_reads_its_manifest_once(s3_options, tmp_path, monkeypatch):
    """to_dask_dataframe() checked that the FileSet was still there (a read
    of _fileset.json), then called files(), which read it again."""
    from dask_manymodel import FileSet

    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    FileSet.make("s3://models/read-once", "f", ddf, storage_options=s3_options)
    fileset = FileSet("s3://models/read-once", "f", storage_options=s3_options)
    monkeypatch.chdir(tmp_path)  # where moto's recorder writes its file
    made = {}
    requests = _recorded(
        s3_options["client_kwargs"]["endpoint_url"], lambda: made.update(frame=fileset.to_dask_dataframe())
    )
    manifest_reads = [entry for entry in requests if entry["url"].split("?")[0].endswith("/_fileset.json")]
    assert len(manifest_reads) == 1, manifest_reads
    assert len(made["frame"].compute()) == 20


def test_a_filesets_delete_reads_its_manifest_twice_at_most(s3_options, tmp_path, monkeypatch):
    """delete() read _fileset.json three times (a request each): to see
    whether a delete of it had been cut short, to check the FileSet was
    still there, and to check the manifest it removes is its own. The
    first is read only where the FileSet is not there."""
    from dask_manymodel import FileSet

    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    fileset = FileSet.make("s3://models/delete-reads", "f", ddf, storage_options=s3_options)
    monkeypatch.chdir(tmp_path)  # where moto's recorder writes its file
    requests = _recorded(s3_options["client_kwargs"]["endpoint_url"], fileset.delete)
    manifest_reads = [
        entry for entry in requests
        if entry["method"] == "GET" and entry["url"].split("?")[0].endswith("/_fileset.json")
    ]
    assert len(manifest_reads) == 2, manifest_reads
    assert s3fs.S3FileSystem(**s3_options).find("models/delete-reads/f") == []  # (and it was deleted)


def test_a_predict_runs_output_columns_are_read_from_a_files_footer(client, s3_options, tmp_path, monkeypatch):
    """to_dask_dataframe() of a predict run without meta= learned its
    columns by reading the first group's output file whole on the client:
    all of it, however many rows that group returned."""
    url = "s3://models/footer-only"
    ddf = generated_frame(2, 200_000, npartitions=2)  # made on the workers: no big graph
    assert ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options).wait(
        show_progress=False
    ) == RunStatus.SUCCESS
    scores = ddf.manymodel.predict(
        predict_frame, by="store", url=url, training_run_id="r1", run_id="s1", storage_options=s3_options
    )
    assert scores.wait(show_progress=False) == RunStatus.SUCCESS
    restored = ManyModelRun.restore_from("s1", url, storage_options=s3_options)
    restored.summary()  # the statuses, read before the recording
    monkeypatch.chdir(tmp_path)  # where moto's recorder writes its file
    made = {}
    requests = _recorded(
        s3_options["client_kwargs"]["endpoint_url"], lambda: made.update(frame=restored.to_dask_dataframe())
    )
    fs = s3fs.S3FileSystem(**s3_options)
    size = fs.size("models/footer-only/s1/store=0/part-0.parquet")
    assert size > 1_000_000
    read = 0
    for entry in requests:
        if entry["method"] == "GET" and entry["url"].split("?")[0].endswith("/part-0.parquet"):
            first, last = entry["headers"]["Range"].split("=")[1].split("-")
            read += (int(last) if last else size - 1) - int(first) + 1
    assert 0 < read < size // 10, (read, size)
    frame = made["frame"]
    assert list(frame.columns) == ["store", "x", "y", "pred"]
    assert dict(frame.compute().dtypes) == dict(frame.dtypes)


def test_each_small_file_is_read_in_one_request(client, s3_options, tmp_path, monkeypatch):
    """s3fs (since 2025) reads a whole file by asking its size first: every
    _run.json, _groups.json and _partition.json read was a HEAD then a GET,
    and a missing status a HEAD then a listing (is it a folder?). Restoring
    a run and reading its 40 statuses made 84 requests; now 42."""
    url = "s3://models/one-request-each"
    ddf = dd.from_pandas(make_frame(n_groups=40, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    s3fs.S3FileSystem(**s3_options).rm_file("models/one-request-each/r1/store=7/_partition.json")
    monkeypatch.chdir(tmp_path)  # where the recorder writes its file
    progress = {}

    def read():
        progress.update(ManyModelRun.restore_from("r1", url, storage_options=s3_options).get_progress())

    requests = _recorded(s3_options["client_kwargs"]["endpoint_url"], read)
    assert [d.partition_id for d in progress["PENDING"]] == [7]  # its status is gone
    assert len(progress["DONE"]) == 39
    shown = sorted(f"{entry['method']} {entry['url'].split('?')[0].rsplit('/', 2)[-2:]}" for entry in requests)
    assert len(requests) == 42, shown  # _run.json, _groups.json and 40 statuses
    assert {entry["method"] for entry in requests} == {"GET"}, shown


def test_an_overwrite_start_lists_the_old_run_once(client, s3_options, tmp_path, monkeypatch):
    """Whether the run exists was a listing of its folder (a page of 1,000
    group folders a request), and the overwrite then listed it all again to
    delete it. Now a HEAD of its _run.json says it exists."""
    from urllib.parse import unquote

    url = "s3://models/overwrite-listed-once"
    ddf = dd.from_pandas(make_frame(n_groups=30, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    monkeypatch.chdir(tmp_path)  # where the recorder writes its file, "moto_recording"
    again = []
    listings = _listings(
        s3_options["client_kwargs"]["endpoint_url"],
        lambda: again.append(ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1",
                                                 storage_options=s3_options, on_existing_artifacts="overwrite")),
    )
    # (a probe of one key, max-keys=1, whether the folder is one, lists no group)
    of_the_run = [
        entry for entry in listings if "overwrite-listed-once/r1/" in unquote(entry) and "max-keys=1&" not in entry
    ]
    assert len(of_the_run) == 1, listings
    assert again[0].wait(show_progress=False) == RunStatus.SUCCESS
    with pytest.raises(dask_manymodel.RunExistsError, match="already exists"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)


_INHERITED = {}  # what a forked child has without pickling (a pool's arguments are pickled)


def _rows_of_inherited(key: str) -> int:
    fileset = _INHERITED[key]
    return fileset.num_rows + len(fileset.to_dask_dataframe().compute())


def test_a_fileset_handle_on_s3_works_in_a_forked_process(s3_options):
    """multiprocessing's 'fork': the handle's S3FileSystem, made in the
    parent, refused every call in the child ("This class is not fork-safe")."""
    import multiprocessing

    from dask_manymodel import FileSet

    _INHERITED["handle"] = FileSet.make(
        "s3://models/forked", "handle", make_frame(n_groups=2, rows=5), storage_options=s3_options
    )
    with dask.config.set(scheduler="synchronous"), multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_rows_of_inherited, ["handle"]) == [20]


def test_a_fileset_on_s3_streams_through_forked_dataloader_workers(s3_options):
    """torch's DataLoader forks its workers on Linux: the FileSet's
    S3FileSystem, made in the parent, refused every read there
    ("RuntimeError: This class is not fork-safe"), so
    DataLoader(fileset.to_torch_dataset(), num_workers=2) failed."""
    torch = pytest.importorskip("torch")
    from dask_manymodel import FileSet

    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=4)
    fileset = FileSet.make("s3://models/forked", "f1", ddf, storage_options=s3_options)
    loader = torch.utils.data.DataLoader(
        fileset.to_torch_dataset(batch_size=4, drop_last_batch=False), batch_size=None, num_workers=2,
        multiprocessing_context="fork",
    )
    rows = sorted(v for batch in loader for v in batch["x"].tolist())
    assert rows == sorted(ddf["x"].compute().tolist())


def _trained_and_predicted(url: str, s3_options: dict) -> tuple:
    """A train run r1 of two groups and a predict run s1 with its models, both SUCCESS."""
    ddf = dd.from_pandas(make_frame(n_groups=2, rows=5), npartitions=1)
    trained = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", storage_options=s3_options)
    assert trained.wait(show_progress=False) == RunStatus.SUCCESS
    predicted = ddf.manymodel.predict(
        predict_frame, by="store", url=url, training_run_id="r1", run_id="s1", storage_options=s3_options
    )
    assert predicted.wait(show_progress=False) == RunStatus.SUCCESS
    return trained, predicted


def _what_a_forked_child_reads(key: str) -> list:
    trained, predicted = _INHERITED[key]
    artifacts = trained.partition_details[1].artifacts
    return [
        trained.get_model(1).round(6).tolist(),
        artifacts.get(artifacts.list()[0]).round(6).tolist(),
        len(predicted.to_dask_dataframe().compute()),
    ]


def test_run_handles_on_s3_work_in_a_forked_process(s3_options):
    """A live or restored run handle used in a process forked from the one
    that made it (multiprocessing's 'fork', a DataLoader worker's copy):
    get_model, an artifact and a predict run's output failed there with
    "RuntimeError: This class is not fork-safe" (the run's S3FileSystem,
    made in the parent, kept its event loop there)."""
    import multiprocessing

    url = "s3://models/forked-runs"
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster):
        trained, predicted = _trained_and_predicted(url, s3_options)
    _INHERITED["live"] = trained, predicted
    _INHERITED["restored"] = tuple(
        ManyModelRun.restore_from(run_id, url, storage_options=s3_options) for run_id in ("r1", "s1")
    )
    expected = trained.get_model(1).round(6).tolist()
    with dask.config.set(scheduler="synchronous"), multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.map(_what_a_forked_child_reads, ["live", "restored"]) == [[expected, expected, 10]] * 2


def test_a_predict_runs_output_is_read_in_a_process_forked_from_the_clients(client, s3_options):
    """A DataLoader worker (forked) of a session with a Client, reading a
    predict run's output under dask.config.set(scheduler="synchronous"):
    to_dask_dataframe() asked the inherited Client whether its workers have
    dask_manymodel, and waited for ever (the Client's event loop stayed in
    the parent), though the frame is computed in the child itself."""
    import multiprocessing

    url = "s3://models/forked-output"
    _INHERITED["output"] = _trained_and_predicted(url, s3_options)[1]
    with dask.config.set(scheduler="synchronous"), multiprocessing.get_context("fork").Pool(1) as pool:
        read = pool.map_async(_rows_of_output, ["output"])
        assert read.get(timeout=30) == [10]  # it waited for ever


def _rows_of_output(key: str) -> int:
    return len(_INHERITED[key].to_dask_dataframe().compute())


def _refusal_of_output(key: str) -> str:
    from dask_manymodel import InvalidArgumentError

    try:
        _INHERITED[key].to_dask_dataframe()
    except InvalidArgumentError as exc:
        return str(exc)
    return "not refused"


def test_a_predict_runs_output_on_the_parents_client_is_refused_in_a_forked_process(client, s3_options):
    """Without a scheduler of its own, a forked child's to_dask_dataframe()
    would be computed on the inherited Client, which never answers there:
    it waited for ever; it is refused, saying what to do, as a run is."""
    import multiprocessing

    url = "s3://models/forked-refused"
    _INHERITED["refused"] = _trained_and_predicted(url, s3_options)[1]
    with multiprocessing.get_context("fork").Pool(1) as pool:
        [message] = pool.map_async(_refusal_of_output, ["refused"]).get(timeout=30)  # it waited for ever
    assert "forked from" in message and "Make a client in this process" in message
