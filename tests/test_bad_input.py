"""Bad input gets a clear error before any compute, and nothing is written."""

from __future__ import annotations

import json
import logging
import os
import re

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import dask_manymodel  # noqa: F401
from dask_manymodel import (
    ExecutionOptions,
    InvalidArgumentError,
    InvalidURLError,
    ManyModelError,
    ManyModelRun,
    ManyModelTraining,
    PartitionStatus,
    RunNotFoundError,
    RunStatus,
    StorageError,
)

from .conftest import fit_line, module_only_here


def no_args():
    return None


def three_args(data, model, ctx):
    return None


CASES = [
    # (id, keyword overrides, error class, message fragment)
    ("missing-by-column", {"by": "shop"}, InvalidArgumentError, "['shop'] not in the dataframe"),
    ("empty-by", {"by": []}, InvalidArgumentError, "is empty"),
    ("by-not-a-name", {"by": {"store": 1}}, InvalidArgumentError, "must name column(s): a column name or a list"),
    ("run-id-slash", {"run_id": "a/b"}, InvalidArgumentError, "run_id 'a/b' is not allowed"),
    ("run-id-dotdot", {"run_id": ".."}, InvalidArgumentError, "run_id '..' is not allowed"),
    ("run-id-whitespace", {"run_id": "my run"}, InvalidArgumentError, "run_id 'my run'"),
    ("run-id-empty", {"run_id": ""}, InvalidArgumentError, "run_id '' is not allowed"),
    # read from a file or input() without strip(): regex's $ matched before the newline
    ("run-id-newline", {"run_id": "r1\n"}, InvalidArgumentError, "run_id 'r1\\n' is not allowed"),
    ("func-not-callable", {"train_func": 42}, InvalidArgumentError, "must be callable"),
    ("func-no-args", {"train_func": no_args}, InvalidArgumentError, "must accept 2 positional"),
    ("func-three-args", {"train_func": three_args}, InvalidArgumentError, "must accept 2 positional"),
    ("unknown-on-existing", {"on_existing_artifacts": "merge"}, InvalidArgumentError, "'merge' is not one of"),
    ("serde-not-a-serde", {"serde": "pickle"}, InvalidArgumentError, "serde must be a ModelSerde"),
    ("unknown-protocol", {"url": "nosuchproto://bucket/x"}, InvalidURLError, "nosuchproto"),
    ("options-not-options", {"execution_options": {"npartitions": 2}}, InvalidArgumentError, "ExecutionOptions"),
    # empty, it was taken for "no options" and the run started
    ("options-empty", {"execution_options": []}, InvalidArgumentError, "execution_options must be an ExecutionOptions, got list"),
]


@pytest.mark.parametrize("overrides, error, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_anything_is_written(client, ddf, tmp_path, overrides, error, fragment):
    url = str(tmp_path / "models")
    kwargs = {"train_func": fit_line, "by": "store", "url": url, "run_id": "r1"} | overrides
    train_func = kwargs.pop("train_func")
    with pytest.raises(error) as info:
        ddf.manymodel.train(train_func, **kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ManyModelError)
    assert not os.path.exists(url)


def test_a_by_column_in_the_local_time_zone_is_refused(client, tmp_path):
    # dateutil's tzlocal() is each process's own zone: with workers under
    # another TZ than the client, their groups' folders were others than
    # the client's, and the groups were INTERNAL_ERROR "not run"
    import dateutil.tz

    url = str(tmp_path / "models")
    stamps = pd.to_datetime(["2024-01-01", "2024-06-01"]).tz_localize("UTC").tz_convert(dateutil.tz.tzlocal())
    pdf = pd.DataFrame({"ts": stamps.repeat(3), "x": np.arange(6.0), "y": np.arange(6.0) * 2})
    for frame, by in ((pdf, "ts"), (pdf.set_index("ts"), "ts"), (pdf.assign(k=1), ["k", "ts"])):
        with pytest.raises(InvalidArgumentError, match=r"column 'ts' is in the time zone tzlocal\(\).*tz_convert\('UTC'\)"):
            dd.from_pandas(frame, npartitions=2).manymodel.train(fit_line, by=by, url=url, run_id="r1")
    assert not os.path.exists(url)
    # a named zone is taken
    named = dd.from_pandas(pdf.assign(ts=pdf["ts"].dt.tz_convert("UTC")), npartitions=2)
    assert named.manymodel.train(fit_line, by="ts", url=url, run_id="r1").wait(show_progress=False) == RunStatus.SUCCESS


def test_bad_execution_options():
    with pytest.raises(InvalidArgumentError, match="npartitions must be a positive int"):
        ExecutionOptions(npartitions=0)
    for resources in ("GPU", {"GPU": "1"}, {"GPU": 0}, {"GPU": True}, {1: 1}):
        with pytest.raises(InvalidArgumentError, match="resources must be a dict of names to positive amounts"):
            ExecutionOptions(resources=resources)
    assert ExecutionOptions(resources={"GPU": 1, "MEMORY": 2.5e9}).resources == {"GPU": 1, "MEMORY": 2.5e9}
    for options, message in [
        ({"npartitions": True}, "npartitions must be a positive int or None, got True"),
        ({"fail_fast": "no"}, "fail_fast must be True or False, got 'no'"),
        ({"storage_retry_backoff": -1}, "storage_retry_backoff must be a number of seconds >= 0, got -1"),
        ({"storage_retry_backoff": "fast"}, "storage_retry_backoff must be a number of seconds >= 0, got 'fast'"),
        ({"storage_retry_backoff": float("nan")}, "storage_retry_backoff must be a number of seconds >= 0, got nan"),
        ({"max_log_chars": True}, "max_log_chars must be an int >= 0, got True"),
        ({"max_group_memory_fraction": True}, "max_group_memory_fraction must be in (0, 1] or None, got True"),
        ({"shuffle": "never", "npartitions": 5}, "ExecutionOptions(shuffle='never') runs the input's own "
         "partitions, and npartitions=5 asks for a shuffle into 5 tasks; give one or the other"),
    ]:
        with pytest.raises(InvalidArgumentError) as info:
            ExecutionOptions(**options)
        assert str(info.value) == message
    assert ExecutionOptions(storage_retry_backoff=0, fail_fast=True).storage_retry_backoff == 0


@pytest.mark.parametrize("by", [pd.Index(["store"]), np.array(["store"])], ids=["Index", "array"])
def test_by_as_an_index_or_an_array_names_its_columns(client, ddf, tmp_path, by):
    """As pandas' groupby takes them; they raised a raw TypeError (unhashable)."""
    run = ddf.manymodel.train(fit_line, by=by, url=str(tmp_path), run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS and run.partition_by == ["store"]


def count_tasks_run(dask_scheduler) -> int:
    return sum(1 for ts in dask_scheduler.tasks.values() if "manymodel-count" in str(ts.key))


def test_a_url_that_cannot_hold_the_run_is_refused_before_compute(client, ddf, tmp_path):
    """A file where a folder must be was found only after the count (and
    retried as if the store were flaky); the error was raw."""
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "r1").write_text("not a folder either")
    for url, fragment in [
        (str(afile), f"'{afile}' is a file, not a folder"),
        (str(tmp_path / "m"), f"cannot write run 'r1' to '{tmp_path / 'm'}': '{tmp_path / 'm' / 'r1'}' is a file"),
    ]:
        with pytest.raises(InvalidURLError, match=re.escape(fragment)):
            ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="overwrite")
    assert client.run_on_scheduler(count_tasks_run) == 0
    assert afile.read_text() == "not a folder"


def test_restore_from_checks_storage_options_as_train_does(tmp_path):
    """It raised TypeError: url_to_fs() argument after ** must be a mapping."""
    for options in ([("key", "a")], "x"):
        with pytest.raises(InvalidArgumentError, match="storage_options must be a dict, got "):
            ManyModelRun.restore_from("r1", str(tmp_path), options)


def test_class_api_checks_the_function_at_construction(tmp_path):
    with pytest.raises(InvalidArgumentError, match="must accept 2 positional"):
        ManyModelTraining(no_args, stage_name=str(tmp_path))


def test_restore_of_a_missing_run(tmp_path):
    with pytest.raises(RunNotFoundError) as info:
        ManyModelRun.restore_from("nope", str(tmp_path))
    assert str(info.value) == (
        f"no run 'nope' at {tmp_path} (no _run.json); check run_id and url (`dask-manymodel runs URL` lists the "
        f"runs at URL)"
    )


def test_restore_from_the_url_of_the_runs_own_folder_says_so(client, ddf, tmp_path):
    # restore_from("r1", "models/r1") said only "no run 'r1' at models/r1"
    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    with pytest.raises(RunNotFoundError) as info:
        ManyModelRun.restore_from("r1", f"{url}/r1")
    assert str(info.value) == (
        f"no run 'r1' at {url}/r1 (no _run.json): {url}/r1 is itself the folder of a run; give the URL of the "
        f"folder that holds the runs' folders"
    )


@pytest.mark.parametrize(
    "name, content, why",
    [
        ("_run.json", b"{ half a manifest", "its _run.json is damaged (it is not JSON"),
        ("_run.json", b"\xff\xfe", "its _run.json is damaged (it is not JSON"),
        ("_run.json", b"[1, 2]", "its _run.json is damaged (it holds a list, not a JSON dict)"),
        ("_run.json", b'{"kind": "train"}', "its _run.json is damaged (it has no partition_by, status)"),
        ("_groups.json", b'{"store=1": 1}', "its _groups.json is damaged (it holds a dict, not a JSON list)"),
    ],
)
def test_restore_of_a_damaged_run_names_the_file_and_what_to_do(client, ddf, tmp_path, name, content, why):
    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    with open(os.path.join(url, "r1", name), "wb") as f:
        f.write(content)
    with pytest.raises(StorageError, match=re.escape(f"run 'r1' at {url} cannot be read: {why}")) as info:
        ManyModelRun.restore_from("r1", url)
    assert "Run it again with on_existing_artifacts='overwrite'" in str(info.value)
    # and what the message says to do works
    again = ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="overwrite")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS
    assert ManyModelRun.restore_from("r1", url).status == RunStatus.SUCCESS


def keep_rows(data, model, ctx):
    return data.to_pandas()


@pytest.mark.parametrize("name", ["_run.json", "_groups.json"])
def test_predict_on_or_resume_of_a_damaged_run_says_which_file_before_writing(client, ddf, tmp_path, name):
    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    with open(os.path.join(url, "r1", name), "w") as f:
        f.write("{ half a file")
    damaged = re.escape(f"run 'r1' at {url} cannot be read: its {name} is damaged (it is not JSON")
    if name == "_run.json":  # predict reads only the training run's manifest before it starts
        with pytest.raises(StorageError, match=damaged):
            ddf.manymodel.predict(keep_rows, by="store", url=url, training_run_id="r1", run_id="s1")
        assert not os.path.exists(os.path.join(url, "s1"))
    with pytest.raises(StorageError, match=damaged):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")


def test_memory_url_with_worker_processes_is_refused(client, ddf):
    with pytest.raises(InvalidURLError, match="private to each process"):
        ddf.manymodel.train(fit_line, by="store", url="memory://x", run_id="r1")


def test_unhashable_group_values(client, tmp_path):
    import dask.dataframe as dd
    import pandas as pd

    import dask

    pdf = pd.DataFrame({"key": [[1], [2]], "x": [1.0, 2.0]})
    url = str(tmp_path / "models")
    # by default Dask turns object columns into strings ("[1]"), which group fine
    with dask.config.set({"dataframe.convert-string": False}):
        lists = dd.from_pandas(pdf, npartitions=1)
        with pytest.raises(InvalidArgumentError, match="hashable"):
            lists.manymodel.train(fit_line, by="key", url=url, run_id="r1")
    assert not os.path.exists(url)


def test_group_values_of_types_that_do_not_sort_together(client, tmp_path):
    """bytes next to ints in an object column: the error said only that group
    values must be "hashable scalars (not lists or dicts)", which they are."""
    import dask.dataframe as dd
    import pandas as pd

    import dask

    pdf = pd.DataFrame({"key": pd.Series([2, b"2"], dtype=object), "x": [1.0, 2.0]})
    url = str(tmp_path / "models")
    with dask.config.set({"dataframe.convert-string": False}):
        mixed = dd.from_pandas(pdf, npartitions=1)
        with pytest.raises(InvalidArgumentError, match=r"not supported between instances of 'bytes' and 'int'") as err:
            mixed.manymodel.train(fit_line, by="key", url=url, run_id="r1")
    assert "make the column(s) one type (e.g. .astype(str))" in str(err.value)
    assert not os.path.exists(url)


def test_errors_inherit_builtins():
    from dask_manymodel import PartitionNotFoundError, RunExistsError

    assert issubclass(RunExistsError, FileExistsError)
    assert issubclass(PartitionNotFoundError, KeyError)
    assert issubclass(InvalidArgumentError, ValueError)


class BrokenSerde(dask_manymodel.PickleSerde):
    def write(self, model, file_path):
        raise RuntimeError("disk full in serde")


def test_a_serde_whose_write_raises_fails_the_groups(client, ddf, tmp_path):
    from dask_manymodel import RunStatus

    run = ddf.manymodel.train(fit_line, by="store", url=str(tmp_path), run_id="r1", serde=BrokenSerde())
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    error = run.partition_details[4].error
    assert "BrokenSerde could not write the model of group 4" in error
    assert "numpy.ndarray" in error and "disk full in serde" in error
    assert not os.path.exists(tmp_path / "r1" / "store=4" / "model.pkl")


def unpicklable_model(data, ctx):
    import threading

    return {"lock": threading.Lock()}


def test_a_model_that_cannot_be_pickled(client, ddf, tmp_path):
    from dask_manymodel import RunStatus

    run = ddf.manymodel.train(unpicklable_model, by="store", url=str(tmp_path), run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    details = run.partition_details[2]
    assert details.status == "FAILED"
    assert "could not write the model of group 2 (a builtins.dict)" in details.error
    assert "lock" in details.error


class SerdeWithALock(dask_manymodel.PickleSerde):
    def __init__(self):
        import threading

        super().__init__()
        self.lock = threading.Lock()


def test_a_function_that_cannot_be_sent_to_the_workers_is_refused_before_writing(client, ddf, tmp_path):
    import threading

    lock = threading.Lock()

    def train_with_a_lock(data, ctx):
        with lock:
            return fit_line(data, ctx)

    url = str(tmp_path / "models")
    with pytest.raises(InvalidArgumentError) as info:
        ddf.manymodel.train(train_with_a_lock, by="store", url=url, run_id="r1")
    message = str(info.value)
    assert "the train function " in message and "train_with_a_lock cannot be sent to the workers" in message
    assert "cannot pickle '_thread.lock' object" in message and "inside the function" in message
    assert not os.path.exists(url)

    with pytest.raises(InvalidArgumentError, match="the serde SerdeWithALock cannot be sent.*only picklable attrib"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", serde=SerdeWithALock())
    assert not os.path.exists(url)

    storage = r"\(its storage_options\) cannot be sent.*storage_options that pickle"
    with pytest.raises(InvalidArgumentError, match=storage):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1",
                            storage_options={"auto_mkdir": True, "lock": lock})
    assert not os.path.exists(url)


def test_a_predict_function_that_cannot_be_sent_is_refused_before_writing(client, ddf, tmp_path):
    import threading

    url = str(tmp_path / "models")
    trained = ddf.manymodel.train(fit_line, by="store", url=url, run_id="t1")
    assert trained.wait(show_progress=False) == RunStatus.SUCCESS
    lock = threading.Lock()

    def predict_with_a_lock(data, model, ctx):
        with lock:
            return None

    with pytest.raises(InvalidArgumentError, match="the predict function .*predict_with_a_lock cannot be sent"):
        ddf.manymodel.predict(predict_with_a_lock, by="store", url=url, run_id="p1", training_run_id="t1")
    assert sorted(os.listdir(url)) == ["t1"]


def test_a_function_the_workers_cannot_load_is_refused_before_writing(client, ddf, tmp_path, monkeypatch):
    # a module only the client has (the workers started before it existed)
    name = f"only_on_the_client_{os.getpid()}"
    module = module_only_here(tmp_path, monkeypatch, name, "def helper(data):\n    return len(data)\n")

    def train_with_a_local_module(data, ctx):
        return module.helper(data.to_pandas())

    url = str(tmp_path / "models")
    with pytest.raises(InvalidArgumentError) as info:
        ddf.manymodel.train(train_with_a_local_module, by="store", url=url, run_id="r1")
    message = str(info.value)
    assert "train_with_a_local_module (or its serde) cannot be loaded on the workers" in message
    assert f"No module named '{name}'" in message and "client.upload_file(path)" in message
    assert not os.path.exists(url)


def test_a_by_column_name_too_long_for_a_folder_is_refused(client, ddf, tmp_path):
    url = str(tmp_path / "models")
    column = "store_" + "x" * 230
    with pytest.raises(InvalidArgumentError, match=re.escape(f"column {column!r} is too long")) as info:
        ddf.rename(columns={"store": column}).manymodel.train(fit_line, by=column, url=url, run_id="r1")
    assert "rename the column" in str(info.value)
    assert not os.path.exists(url)


def _edit_json(path, change):
    with open(path) as f:
        value = json.load(f)
    change(value)
    with open(path, "w") as f:
        json.dump(value, f)


def test_a_run_of_a_later_storage_format_is_refused_not_misread_nor_rewritten(client, ddf, tmp_path, capsys):
    from dask_manymodel.cli import main

    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    manifest = os.path.join(url, "r1", "_run.json")
    _edit_json(manifest, lambda m: m.update(format_version=2, layout="something new"))
    later = re.escape(f"run 'r1' at {url} was written by a later dask_manymodel (storage format 2; this one "
                      f"reads format 1): upgrade dask_manymodel")
    with pytest.raises(StorageError, match=later):
        ManyModelRun.restore_from("r1", url)
    with pytest.raises(StorageError, match=later):
        ddf.manymodel.predict(keep_rows, by="store", url=url, training_run_id="r1", run_id="s1")
    with pytest.raises(StorageError, match=later):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1", on_existing_artifacts="resume")
    with open(manifest) as f:
        assert json.load(f)["format_version"] == 2  # a resume did not write it in the older format
    assert main(["show", url, "r1"]) == 2 and "storage format 2" in capsys.readouterr().err
    assert main(["runs", url]) == 0 and "written by a later dask_manymodel (storage format 2)" in capsys.readouterr().out
    _edit_json(manifest, lambda m: m.update(format_version="1"))  # not a number: damaged, as restore_from says
    assert main(["runs", url]) == 0 and "unreadable _run.json" in capsys.readouterr().out


def test_statuses_no_dask_manymodel_writes_are_a_damaged_file_or_left_out(client, ddf, tmp_path, caplog):
    url = str(tmp_path / "models")
    ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1").wait(show_progress=False)
    run_folder = os.path.join(url, "r1")
    group = ManyModelRun.restore_from("r1", url).partition_details[1].path
    _edit_json(os.path.join(run_folder, group, "_partition.json"), lambda s: s.update(status="SKIPPED"))
    with caplog.at_level(logging.WARNING, logger="dask_manymodel.store"):
        restored = ManyModelRun.restore_from("r1", url)
        assert set(restored.summary()["status"]) <= set(PartitionStatus)  # was ValueError: 'SKIPPED'
        assert restored.partition_details[1].status != "SKIPPED"
    assert f"ignoring status file {os.path.join(run_folder, group, '_partition.json')}" in caplog.text
    _edit_json(os.path.join(run_folder, "_run.json"), lambda m: m.update(status="PAUSED"))
    with pytest.raises(StorageError, match=re.escape("its _run.json is damaged (its status 'PAUSED' is not a run")):
        ManyModelRun.restore_from("r1", url)
    _edit_json(os.path.join(run_folder, "_run.json"), lambda m: m.update(status="SUCCESS"))
    os.remove(os.path.join(run_folder, "_groups.json"))  # a finished run's: not "being set up"
    with pytest.raises(StorageError, match=re.escape("its _groups.json is damaged (it is missing)")):
        ManyModelRun.restore_from("r1", url)
    # a run of no group is SUCCESS before its _groups.json is written
    empty = ddf[ddf["store"] < 0].manymodel.train(fit_line, by="store", url=url, run_id="r0")
    assert empty.wait(show_progress=False) == RunStatus.SUCCESS
    os.remove(os.path.join(url, "r0", "_groups.json"))
    assert ManyModelRun.restore_from("r0", url).summary().empty


def test_by_columns_of_one_text_are_refused_saying_so(client, tmp_path):
    """by=[0, "0"] said it "names a column twice": two columns, whose
    groups' folders would both be named "0=..."."""
    ddf = dd.from_pandas(pd.DataFrame({0: [1, 2], "0": [3, 4], "x": [1.0, 2.0]}), npartitions=1)
    url = str(tmp_path / "models")
    with pytest.raises(InvalidArgumentError, match=r"\[0, '0'\] names columns whose names are one text.*rename one"):
        ddf.manymodel.train(fit_line, by=[0, "0"], url=url, run_id="r1")
    with pytest.raises(InvalidArgumentError, match=r"\['x', 'x'\] names a column twice"):
        ddf.manymodel.train(fit_line, by=["x", "x"], url=url, run_id="r1")
    assert not os.path.exists(url)


def test_by_forms_pandas_takes_are_refused_saying_what_to_do(client, ddf, tmp_path):
    """pandas' groupby takes a Series of values, a function, a pd.Grouper or
    an array of values as ``by``: a Dask Series was "not in the dataframe"
    (its whole structure printed), an array of a column's values "named a
    column twice" (every value listed), and a function or Grouper said
    nothing of what to do. Each is refused saying so, before compute."""
    url = str(tmp_path / "models")
    dated = ddf.assign(date=dd.to_datetime(ddf["store"], unit="D"))
    values = ddf["store"].compute().to_numpy()
    cases = [
        (ddf["store"] % 3, r"not a Series of group values \(got a dask Series named 'store'\).*ddf.assign\(group="
                           r".*to group by the column 'store' as it is, pass by='store'"),
        (ddf["store"].compute(), r"not a Series of group values \(got a pandas Series named 'store'\)"),
        (lambda label: label % 2, r"not a function \(got '.*<lambda>'\).*ddf.assign\(group=ddf.index.to_series"),
        (pd.Grouper(key="date", freq="MS"), r"not a pd.Grouper \(got pd.Grouper\(key='date', freq='MS'\)\): add its "
                                            r"bins as a column.*ddf\['date'\].dt.to_period\('M'\)"),
        (pd.Grouper(key="store"), r"not a pd.Grouper \(got pd.Grouper\(key='store'\)\): pass by='store'"),
        (values, r"column\(s\) \[np.int64\(0\), .*\] \(and 475 more\) not in the dataframe.*an array of group values"),
    ]
    for by, message in cases:
        with pytest.raises(InvalidArgumentError, match=message) as info:
            dated.manymodel.train(fit_line, by=by, url=url, run_id="r1")
        assert len(str(info.value)) < 700, str(info.value)
    assert not os.path.exists(url)


def test_a_wait_or_cancel_timeout_that_is_no_number_of_seconds_is_refused_first(client, store_url, tmp_path):
    # cancel(timeout="60") asked the run to stop, then died in a TypeError
    # ('float' + 'str'), and the run was cancelled anyway; wait(timeout=nan)
    # waited for ever
    import functools

    from .conftest import group_zero_held, make_frame

    gate = str(tmp_path / "release")
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        functools.partial(group_zero_held, gate), by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    for call, timeout in [(run.cancel, "60"), (run.cancel, -1), (run.wait, float("nan")), (run.wait, True)]:
        with pytest.raises(InvalidArgumentError) as info:
            call(timeout=timeout)
        assert str(info.value) == (
            f"{call.__name__}(): timeout must be a number of seconds >= 0, or None to wait as long as it "
            f"takes; got {timeout!r}"
        )
    open(gate, "w").close()
    assert run.wait(timeout=np.float64(60), show_progress=False) == RunStatus.SUCCESS  # not cancelled


def test_wait_takes_show_progress_as_the_connectors_take_their_flags(client, store_url, tmp_path, capfd):
    # wait(show_progress="no") drew the bar ("no" is truthy); numpy's bools
    # are taken, as ExecutionOptions and the connectors take them
    import functools

    from .conftest import group_zero_held, make_frame

    gate = str(tmp_path / "release")
    ddf = dd.from_pandas(make_frame(n_groups=4, rows=5), npartitions=2)
    run = ddf.manymodel.train(
        functools.partial(group_zero_held, gate), by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    for call, name in [(run.wait, "wait"), (run.retry_failed, "retry_failed")]:
        for value in ["no", "False", None, 0]:
            with pytest.raises(InvalidArgumentError) as info:
                call(show_progress=value)
            assert str(info.value) == f"{name}(): show_progress must be True or False, got {value!r}"
    assert run.status == RunStatus.IN_PROGRESS  # refused before waiting, and no rerun started
    open(gate, "w").close()
    assert run.wait(show_progress=np.bool_(False)) == RunStatus.SUCCESS
    assert "group" not in capfd.readouterr().err  # no bar drawn, not even an empty one


def test_execution_options_take_numpy_numbers_as_the_numbers_they_are():
    # npartitions=df["store"].nunique() // 2 on a numpy value was refused:
    # "npartitions must be a positive int or None, got np.int64(4)"
    options = ExecutionOptions(
        npartitions=np.int64(4), max_retries=np.int32(1), resources={"GPU": np.int64(1)},
        max_group_memory_fraction=np.float32(0.5),
    )
    assert (options.npartitions, options.max_retries, options.resources) == (4, 1, {"GPU": 1})
    assert type(options.npartitions) is int and type(options.resources["GPU"]) is int
    assert type(options.max_group_memory_fraction) is float
    flags = ExecutionOptions(fail_fast=np.bool_(True), reuse_freed_memory=np.bool_(False))
    assert (flags.fail_fast, flags.reuse_freed_memory) == (True, False) and type(flags.fail_fast) is bool
    for bad, message in [
        ({"npartitions": np.int64(0)}, "npartitions must be a positive int or None, got 0"),
        ({"npartitions": np.float64(4.0)}, "npartitions must be a positive int or None, got np.float64(4.0)"),
        ({"npartitions": np.bool_(True)}, "npartitions must be a positive int or None, got np.True_"),
    ]:
        with pytest.raises(InvalidArgumentError) as info:
            ExecutionOptions(**bad)
        assert str(info.value) == message


def never_computed(number):
    raise AssertionError("the frame was computed: the URL was not refused first")


@pytest.mark.parametrize("url", ["/proc/manymodel-x", "/proc/manymodel-x/models", "/sys/manymodel-x"])
def test_a_local_folder_that_cannot_be_made_is_refused_before_compute(client, tmp_path, url):
    """/proc and /sys take no new folder, from root either (whom os.access
    lets through): train went on to count the groups, then failed with the
    bare FileNotFoundError of the run's folder (/proc), naming no URL."""
    if not os.path.isdir("/proc/self") or not os.path.isdir("/sys/kernel"):
        pytest.skip("no /proc or /sys here")
    ddf = dd.from_map(never_computed, [0, 1], meta=pd.DataFrame({"store": [0], "x": [0.0], "y": [0.0]}))
    top = "/" + url.split("/")[1]
    with pytest.raises(InvalidURLError, match=f"^cannot write to '{url}': no folder can be made in '{top}' here "
                       r"\(.*\); give a folder on a disk that can be written \(not /proc or /sys\)$"):
        ddf.manymodel.train(fit_line, by="store", url=url, run_id="r1")
    # a folder that can be made is taken, and the probe leaves nothing behind
    url = str(tmp_path / "models")
    frame = pd.DataFrame({"store": [0, 1], "x": [0.0, 1.0], "y": [1.0, 2.0]})
    run = dd.from_pandas(frame, npartitions=1).manymodel.train(
        lambda data, ctx: len(data), by="store", url=url, run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert sorted(os.listdir(tmp_path)) == ["models"] and sorted(os.listdir(url)) == ["r1"]


def test_restore_from_takes_its_url_once():
    with pytest.raises(InvalidArgumentError, match="got url='/a' and stage_name='/b': they are one argument"):
        ManyModelRun.restore_from("r1", "/a", stage_name="/b")
    with pytest.raises(InvalidArgumentError, match=r"restore_from\('r1'\) needs the URL the run is stored under"):
        ManyModelRun.restore_from("r1")


def test_a_dataframe_of_another_type_or_a_multiindex_named_twice_is_refused(client, tmp_path):
    training = ManyModelTraining(fit_line, stage_name=str(tmp_path))
    with pytest.raises(InvalidArgumentError, match="dataframe must be a dask.dataframe.DataFrame or pandas.DataFrame, got list"):
        training.run(partition_by="store", dataframe=[1, 2], run_id="r1")
    frame = pd.DataFrame({"store": [1, 1], "h": [0, 1], "x": [0.0, 1.0], "y": [1.0, 2.0]}).set_index(["store", "h"])
    frame.index = frame.index.set_names(["a", "a"])
    with pytest.raises(InvalidArgumentError, match=r"MultiIndex names levels \['a', 'a'\], one of them twice"):
        training.run(partition_by="x", dataframe=frame, run_id="r1")
    assert not os.path.exists(tmp_path / "r1")


@pytest.mark.parametrize("values, says", [
    # an object column of tuples: each tuple was read as the values of as
    # many by columns, passed the check, and every group ended INTERNAL_ERROR
    # "not run: its task ended without finding its rows"
    ([(1, 2), (1, 2), (3,), (3,)], r"column 'g' holds tuple values such as \(1, 2\); group values must be hashable scalars"),
    ([1, "1", 1, "1"], "two different group values map to the same folder 'g=1'"),
])
def test_group_values_that_cannot_each_name_a_folder_are_refused_before_any_write(client, tmp_path, values, says):
    frame = pd.DataFrame({"g": pd.Series(values, dtype=object), "x": np.arange(4.0)})
    with pytest.raises(InvalidArgumentError, match=says):
        ManyModelTraining(fit_line, stage_name=str(tmp_path)).run(partition_by="g", dataframe=frame, run_id="r1")
    assert not os.path.exists(tmp_path / "r1")


@pytest.mark.parametrize("limit", [-1, True, 1.5, "2"])
def test_to_pandas_refuses_a_limit_that_is_no_count_of_rows(limit):
    from dask_manymodel import DataConnector

    data = DataConnector.from_pandas(pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(InvalidArgumentError, match=f"limit must be a non-negative int or None, got {re.escape(repr(limit))}"):
        data.to_pandas(limit=limit)
    with pytest.raises(InvalidArgumentError, match="DataConnector needs a pandas DataFrame, got list"):
        DataConnector.from_pandas([1, 2])
