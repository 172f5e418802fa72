"""One place, however its URL is spelled: a relative local path, the root of
a memory:// store. Later reads (a worker's, or the client's after a chdir)
open the place the URL named when the run started. A password in the URL
is never shown."""

from __future__ import annotations

import importlib
import os
import pickle
from pathlib import Path

import dask.dataframe as dd
import fsspec
from fsspec.registry import known_implementations
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401  (registers ddf.manymodel)
from dask_manymodel import FileSet, ManyModelRun, RunExistsError, RunNotFoundError, RunStatus
from dask_manymodel.store import shown_url

from . import cred_fs
from .conftest import fit_line, make_frame


def save_extra(data, ctx):
    ctx.upload({"rows": len(data)}, "extra.pkl")


def read_extra_of_t1(data, ctx):
    # another run's file, under the same URL
    assert ctx.download("extra.pkl", run_id="t1") == {"rows": len(data)}


def fails_once(flag, data, ctx):
    if ctx.partition_id == 3 and not os.path.exists(flag):
        raise ValueError("not yet")
    return fit_line(data, ctx)


def test_a_relative_url_is_the_folder_it_named_at_the_start(client, tmp_path, monkeypatch):
    # the workers run in another working directory than the client's
    monkeypatch.chdir(tmp_path)
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    assert ddf.manymodel.dpf(save_extra, by="store", url="models", run_id="t1").wait(show_progress=False) == "SUCCESS"
    reader = ddf.manymodel.dpf(read_extra_of_t1, by="store", url="models", run_id="d1")
    assert reader.wait(show_progress=False) == RunStatus.SUCCESS, reader.summary()["error"].tolist()
    flag = str(tmp_path / "flag")
    run = ddf.manymodel.train(
        lambda data, ctx: fails_once(flag, data, ctx), by="store", url="models", run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert run.url == str(tmp_path / "models")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    open(flag, "w").close()
    assert run.retry_failed().wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", run.url).status == RunStatus.SUCCESS
    assert not os.path.exists(elsewhere / "models")


def test_the_root_of_a_memory_store(thread_client):
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_line, by="store", url="memory://", run_id=f"t-{os.getpid()}")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert run.url == "memory://"
    scores = ddf.manymodel.predict(
        lambda data, model, ctx: data.to_pandas()[["x"]], by="store", url="memory:///",
        training_run_id=run.run_id, run_id=f"p-{os.getpid()}",
    )
    assert scores.wait(show_progress=False) == RunStatus.SUCCESS, scores.summary()["error"].tolist()
    assert ManyModelRun.restore_from(run.run_id, run.url).get_model(2) is not None
    fileset = FileSet.make("memory://", f"f-{os.getpid()}", make_frame(n_groups=2, rows=5))
    assert fileset.files()[0].startswith("memory:///f-")
    assert len(fileset.to_dask_dataframe().compute()) == 10
    assert not os.path.exists("memory:")  # nothing written to a local folder of that name
    assert FileSet("memory:///", fileset.name).num_rows == 10  # another spelling of the root


@pytest.mark.parametrize("url, shown", [
    ("ftp://alice:pw@host/models", "ftp://alice:***@host/models"),
    ("simplecache::sftp://alice:pw@host:22/m", "simplecache::sftp://alice:***@host:22/m"),
    ("https://alice:p@ss:w@host/m?x=1", "https://alice:***@host/m?x=1"),  # the last "@" ends it
    ("ftp://alice@host/m", "ftp://alice@host/m"),
    ("ftp://host:21/m@x", "ftp://host:21/m@x"),
    ("s3://bucket/m", "s3://bucket/m"),
    ("/data/models", "/data/models"),
])
def test_shown_url_hides_only_a_password(url, shown):
    assert shown_url(url) == shown


def fit_and_save(data, ctx):
    url = ctx.upload(len(data), "rows.pkl")
    with fsspec.open(url, "rb") as f:  # the URL upload returns opens the file: it keeps the password
        assert pickle.load(f) == len(data)
    return fit_line(data, ctx)


def test_a_password_in_the_url_is_never_shown_or_stored(client, tmp_path):
    """ftp://user:password@host (sftp, smb, http basic auth): the password was
    in the run's repr and html, its error messages, and the errors stored in
    _partition.json ("model file <URL>/... is missing")."""
    secret = cred_fs.PASSWORD
    url = f"credfs://alice:{secret}@host{tmp_path}/models"
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(fit_and_save, by="store", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].tolist()
    assert run.url == url  # what opens the run again
    assert ManyModelRun.restore_from("r1", run.url).get_model(3)[1] == pytest.approx(3)
    for text in (repr(run), run._repr_html_()):
        assert "alice:***@host" in text and secret not in text
    with pytest.raises(RunExistsError) as exists:
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    with pytest.raises(RunNotFoundError) as missing:
        ManyModelRun.restore_from("r2", url)
    for error in (exists.value, missing.value):
        assert "alice:***@host" in str(error) and secret not in str(error)

    os.remove(tmp_path / "models" / "r1" / "store=2" / "model.pkl")
    scores = ddf.manymodel.predict(
        lambda data, model, ctx: data.to_pandas()[["x"]], by="store", url=url, training_run_id="r1", run_id="s1"
    )
    assert scores.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    error = scores.partition_details[2].error
    assert "is missing" in error and "alice:***@host" in error and secret not in error

    client.run(importlib.import_module, "tests.cred_fs")  # the workers write a FileSet by its URL
    fileset = FileSet.make(url, "fs1", ddf)
    assert "alice:***@host" in repr(fileset) and secret not in repr(fileset)
    assert len(pd.read_parquet(fileset.files()[0])) > 0  # its files' URLs open them
    for folder, _, files in os.walk(tmp_path / "models"):  # nothing stored holds it
        for name in files:
            assert secret.encode() not in Path(folder, name).read_bytes(), name


class _RefusedFileSystem(fsspec.AbstractFileSystem):
    """A backend that connects as it is made, as ftp:// and hdfs:// do, to a
    server that is not there."""

    protocol = "refused-here"

    def __init__(self, *args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")


def test_a_backend_that_cannot_connect_as_it_is_made_names_the_url(monkeypatch, client, ddf):
    """``ftp://host/models`` with no server there raised a bare
    ``ConnectionRefusedError: [Errno 111] Connection refused`` from train,
    restore_from and FileSet, naming no URL (s3:// says "cannot reach")."""
    from dask_manymodel import InvalidURLError

    monkeypatch.setitem(
        known_implementations, "refused-here", {"class": f"{__name__}._RefusedFileSystem"}
    )
    url = "refused-here://host/models"
    said = r"cannot reach 'refused-here://host/models': ConnectionRefusedError: .*Connection refused; check the URL"
    with pytest.raises(InvalidURLError, match=said):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    with pytest.raises(InvalidURLError, match=said):
        ManyModelRun.restore_from("r1", url)
    with pytest.raises(InvalidURLError, match=said):
        FileSet(url, "f1")


def test_a_backend_not_installed_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setitem(
        known_implementations,
        "not-installed-here",
        {"class": "no_such_backend_module.FileSystem", "err": "Install no-such-backend to use it"},
    )
    from dask_manymodel import InvalidURLError

    with pytest.raises(InvalidURLError, match="cannot open url 'not-installed-here://b/m': Install no-such-backend"):
        ManyModelRun.restore_from("r1", "not-installed-here://b/m")
