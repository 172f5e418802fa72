"""Training runs end to end on a real LocalCluster with worker processes."""

from __future__ import annotations

import datetime
import functools
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import dask.dataframe as dd
import fsspec
import numpy as np
import pandas as pd
import pytest
from dask.utils import key_split
from fsspec.implementations.memory import MemoryFileSystem

import dask_manymodel  # noqa: F401  (registers the accessor)
from dask_manymodel import (
    DPF,
    ExecutionOptions,
    InvalidArgumentError,
    ManyModelRun,
    ManyModelTraining,
    ModelNotAvailableError,
    PartitionNotFoundError,
    PickleSerde,
    ReadOnlyRunError,
    RunStatus,
    RunTimeoutError,
)

from dask_manymodel.engine import _HEARTBEAT_SECONDS

from .conftest import (
    announce_cancel_event,
    cancel_checked_before_every_group,
    fit_line,
    group_zero_held,
    held_until_cancelled,
    make_frame,
    poll,
)


def expected_line(g: int) -> np.ndarray:
    return np.array([1 + g / 10, g])


def test_train_round_trip_and_layout(client, ddf, store_url):
    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert run.status == RunStatus.SUCCESS
    for g in (0, 7, 11):
        np.testing.assert_allclose(run.get_model(g), expected_line(g), atol=1e-9)
    np.testing.assert_allclose(run.get_model("7"), expected_line(7), atol=1e-9)

    root = os.path.join(store_url, "r1")
    assert os.path.isfile(os.path.join(root, "_run.json"))
    assert sorted(os.listdir(os.path.join(root, "store=3"))) == ["_partition.json", "model.pkl"]
    manifest = json.loads(Path(root, "_run.json").read_text())
    assert manifest["status"] == "SUCCESS"
    assert manifest["kind"] == "train" and manifest["partition_by"] == ["store"]
    assert manifest["serde"]["filename"] == "model.pkl"
    assert manifest["counts"] == {"DONE": 12}
    status = json.loads(Path(root, "store=3", "_partition.json").read_text())
    assert status["status"] == "DONE" and status["rows"] == 40 and status["bytes"] > 0

    progress = run.get_progress()
    assert list(progress) == ["DONE"] and len(progress["DONE"]) == 12
    summary = run.summary()
    assert len(summary) == 12 and set(summary["status"]) == {"DONE"}
    assert summary["rows"].sum() == 12 * 40
    assert set(run.partition_details) == set(range(12))


def test_class_api_and_memory_store(thread_client):
    ddf = dd.from_pandas(make_frame(n_groups=5), npartitions=2)
    url = "memory://class-api"
    run = ManyModelTraining(fit_line, stage_name=url, serde=PickleSerde()).run(
        partition_by="store",
        dataframe=ddf,
        run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    np.testing.assert_allclose(run.get_model(4), expected_line(4), atol=1e-9)
    restored = ManyModelRun.restore_from("r1", url)
    assert restored.status == RunStatus.SUCCESS
    np.testing.assert_allclose(restored.get_model(4), expected_line(4), atol=1e-9)


def columns_and_rows(data, ctx):
    df = data.to_pandas()
    return list(df.columns), sorted(df["x"].round(9))


def test_a_pandas_frame_with_a_multiindex_is_grouped_by_its_levels(client, tmp_path):
    """A pandas frame from groupby(...).agg() or a pivot has a MultiIndex,
    which Dask lacks: the class API failed with pandas' NotImplementedError
    ("isna is not defined for MultiIndex"). Its named levels are columns, as
    a named index is, and by names them as pandas' groupby would."""
    frame = make_frame(n_groups=4, rows=6).assign(day=np.tile(np.arange(3), 8))
    daily = frame.groupby(["store", "day"]).agg(x=("x", "sum"))  # MultiIndex (store, day)
    run = ManyModelTraining(columns_and_rows, stage_name=str(tmp_path)).run(
        partition_by="store", dataframe=daily, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].dropna().tolist()[:1]
    for store, rows in daily.groupby(level="store"):
        assert run.get_model(store) == (["store", "day", "x"], sorted(rows["x"].round(9)))
    both = ManyModelTraining(columns_and_rows, stage_name=str(tmp_path)).run(
        partition_by=["store", "day"], dataframe=daily, run_id="r2")
    assert both.wait(show_progress=False) == RunStatus.SUCCESS
    assert len(both.summary()) == len(daily) == 12


def test_storage_options_are_never_written(thread_client):
    import fsspec

    ddf = dd.from_pandas(make_frame(n_groups=3), npartitions=1)
    url = "memory://secret-check"
    run = ddf.manymodel.train(
        fit_line, by="store", url=url, run_id="r1", storage_options={"secret_token": "hunter2"}
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    fs = fsspec.filesystem("memory")
    files = fs.find("/secret-check")
    assert len(files) >= 7
    for path in files:
        assert b"hunter2" not in fs.cat_file(path), path


def failing_on_odd(data, ctx):
    df = data.to_pandas()
    ctx.logger.warning("group %s has %d rows", ctx.partition_id, len(df))
    print("printed by", ctx.partition_id)
    if ctx.partition_id % 2:
        raise ValueError(f"odd group {ctx.partition_id}")
    return fit_line(data, ctx)


def test_errors_in_some_groups(client, ddf, store_url):
    run = ddf.manymodel.train(failing_on_odd, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    progress = run.get_progress()
    assert sorted(d.partition_id for d in progress["DONE"]) == [0, 2, 4, 6, 8, 10]
    failed = {d.partition_id: d for d in progress["FAILED"]}
    assert sorted(failed) == [1, 3, 5, 7, 9, 11]
    assert failed[3].error == "ValueError: odd group 3"
    assert "Traceback" in failed[3].traceback and "failing_on_odd" in failed[3].traceback
    assert "group 3 has 40 rows" in failed[3].logs and "printed by 3" in failed[3].logs
    with pytest.raises(ModelNotAvailableError, match=r"FAILED: ValueError: odd group 3 \(its traceback and logs: "
                       r"run.partition_details\[3\]\)"):
        run.get_model(3)
    with pytest.raises(PartitionNotFoundError, match="no group 99"):
        run.get_model(99)
    stored = json.loads(Path(store_url, "r1", "store=3", "_partition.json").read_text())
    assert stored["status"] == "FAILED" and "odd group 3" in stored["traceback"]
    assert not os.path.exists(os.path.join(store_url, "r1", "store=3", "model.pkl"))


def always_failing(data, ctx):
    raise RuntimeError("nope")


def test_all_groups_failing_is_failure(client, ddf, store_url):
    run = ddf.manymodel.train(always_failing, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.FAILURE


def failing_but_group_zero(data, ctx):
    if ctx.partition_id != 0:
        raise ValueError(f"group {ctx.partition_id} is broken")
    return fit_line(data, ctx)


def test_one_group_done_of_many_is_a_partial_failure(client, ddf, store_url):
    """FAILURE says no group is DONE: a run with one DONE group (its model
    there to use, to keep on a resume) is a PARTIAL_FAILURE."""
    run = ddf.manymodel.train(failing_but_group_zero, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    assert run.manifest["counts"] == {"DONE": 1, "FAILED": 11}
    assert ManyModelRun.restore_from("r1", store_url).status == RunStatus.PARTIAL_FAILURE


def test_a_cancel_that_stops_no_group_leaves_a_success(client, store_url, tmp_path):
    """Cancelled while its last groups ran, a run whose every group still
    ended DONE is a SUCCESS: nothing was cancelled, every model is there."""
    ddf = dd.from_pandas(make_frame(n_groups=2, rows=5), npartitions=2)
    gates = tmp_path / "gates"
    gates.mkdir()
    run = ddf.manymodel.train(
        functools.partial(held_until_cancelled, str(gates)), by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),  # a task, and a worker, per group
    )
    announce_cancel_event(gates, run)
    poll(lambda: {"running-0", "running-1"} <= set(os.listdir(gates)))
    assert run.cancel() == RunStatus.SUCCESS
    assert run.manifest["counts"] == {"DONE": 2}
    assert ManyModelRun.restore_from("r1", store_url).status == RunStatus.SUCCESS


class UsersOwnInterrupt(BaseException):
    pass


def raising_base_exceptions(data, ctx):
    """Groups 1, 3 and 5 raise what is not an Exception; the others train."""
    import asyncio

    if ctx.partition_id == 1:
        raise asyncio.CancelledError("a library's own timeout")
    if ctx.partition_id == 3:
        sys.exit("giving up on this group")
    if ctx.partition_id == 5:
        raise UsersOwnInterrupt("stop this one")
    if ctx.partition_id == 7:
        raise KeyboardInterrupt("a library's own stop")
    if ctx.partition_id == 9:
        raise UnprintableError()
    return fit_line(data, ctx)


class UnprintableError(Exception):
    def __str__(self):
        raise RuntimeError("this error cannot say what it is")


def test_a_group_raising_a_base_exception_fails_alone(client, ddf, store_url):
    """Not only Exceptions: such an error used to fail every group of its
    task (CancelledError), kill the worker (SystemExit), or leave the run
    waiting for ever (a class of the user's own)."""
    run = ddf.manymodel.train(
        raising_base_exceptions, by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    assert run.wait(timeout=120, show_progress=False) == RunStatus.PARTIAL_FAILURE
    progress = run.get_progress()
    assert sorted(d.partition_id for d in progress["DONE"]) == [0, 2, 4, 6, 8, 10, 11]
    errors = {d.partition_id: d.error for d in progress["FAILED"]}
    assert errors == {
        1: "CancelledError: a library's own timeout",
        3: "SystemExit: giving up on this group",
        5: "UsersOwnInterrupt: stop this one",
        # Ctrl-C never reaches a worker's thread: this one is the group's (it killed the worker)
        7: "KeyboardInterrupt: a library's own stop",
        # was INTERNAL_ERROR, about the str() that failed
        9: "UnprintableError: <str() of this UnprintableError raised>",
    }
    assert ManyModelRun.restore_from("r1", store_url).status == RunStatus.PARTIAL_FAILURE


EDGE_VALUES = ["a/b", "..", ".", "", "ü/ñ", "x" * 300, "%2F", "a\\b", "__HIVE_DEFAULT_PARTITION__"]


def test_edge_values_round_trip(client, tmp_path):
    url = str(tmp_path / "models")
    pdf = pd.DataFrame({"key": pd.Series(EDGE_VALUES + [None], dtype=object).repeat(3).to_numpy()})
    pdf["x"] = np.arange(len(pdf), dtype=float)
    pdf["y"] = 2 * pdf["x"]

    def keep_key(data, ctx):
        return {"key": ctx.partition_id, "rows": len(data)}

    run = dd.from_pandas(pdf, npartitions=2).manymodel.train(keep_key, by="key", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    for value in EDGE_VALUES:
        assert run.get_model(value) == {"key": value, "rows": 3}
    null_model = run.get_model(None)
    assert null_model["rows"] == 3 and pd.isna(null_model["key"])
    # every file is inside the run folder, one folder per group
    root = os.path.realpath(os.path.join(url, "r1"))
    folders = set()
    for dirpath, _, files in os.walk(tmp_path):
        for name in files:
            real = os.path.realpath(os.path.join(dirpath, name))
            assert real.startswith(root + os.sep), real
            if name == "model.pkl":
                folders.add(os.path.dirname(real))
    assert len(folders) == len(EDGE_VALUES) + 1
    assert os.path.isdir(os.path.join(root, "key=__HIVE_DEFAULT_PARTITION__"))


class _CaseBlindMemoryFS(MemoryFileSystem):
    """memory:// that takes names differing only by case for one, as macOS and
    Windows do by default, and FAT/exFAT drives (without keeping the case)."""

    protocol = ("caseblind",)
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return MemoryFileSystem._strip_protocol(str(path).removeprefix("caseblind://")).lower()


def _keep_key(data, ctx):
    return {"key": ctx.partition_id, "rows": len(data)}


CASE_KEYS = ["Store", "store", "STORE"]


def test_keys_that_differ_by_case_are_refused_on_a_store_that_ignores_case(thread_client):
    """"Store" and "store" name the folders k=Store and k=store: one folder on
    macOS, Windows or a FAT drive. Every group wrote its model over the
    others', all read DONE (the run a SUCCESS), and get_model("store") gave
    the model of "STORE"."""
    fsspec.register_implementation("caseblind", _CaseBlindMemoryFS, clobber=True)
    _CaseBlindMemoryFS.store.clear()
    pdf = pd.DataFrame({"k": np.repeat(CASE_KEYS, 3), "y": np.arange(9.0)})
    with pytest.raises(InvalidArgumentError, match=r"differ only by case.*'k=STORE' and 'k=Store'"):
        dd.from_pandas(pdf, npartitions=2).manymodel.train(_keep_key, by="k", url="caseblind://runs", run_id="r1")
    assert _CaseBlindMemoryFS.store == {}  # nothing written, the probe removed
    # a resume brings in "store" beside the stored "Store"
    first = dd.from_pandas(pdf[pdf["k"] == "Store"], npartitions=1)
    run = first.manymodel.train(_keep_key, by="k", url="caseblind://runs", run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    stored = {path: file.getvalue() for path, file in _CaseBlindMemoryFS.store.items()}
    second = dd.from_pandas(pdf[pdf["k"] == "store"], npartitions=1)
    with pytest.raises(InvalidArgumentError, match=r"'Store' and 'store' of \['k'\] differ only by case"):
        second.manymodel.train(_keep_key, by="k", url="caseblind://runs", run_id="r1", on_existing_artifacts="resume")
    assert {path: file.getvalue() for path, file in _CaseBlindMemoryFS.store.items()} == stored

    # where case tells names apart, each key keeps its own folder and model
    url = "memory://case-sensitive"
    run = dd.from_pandas(pdf, npartitions=2).manymodel.train(_keep_key, by="k", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert [run.get_model(key) for key in CASE_KEYS] == [{"key": key, "rows": 3} for key in CASE_KEYS]
    files = fsspec.filesystem("memory").find("/case-sensitive")
    assert not [f for f in files if "case-probe" in f]
    fsspec.filesystem("memory").rm("/case-sensitive", recursive=True)


def _fails_on_a_file_name_that_is_not_utf8(data, ctx):
    name = os.fsdecode(b"caf\xe9.csv")  # as os.listdir gives it: with a surrogate
    print("reading", name)
    if ctx.partition_id == "bad":
        raise ValueError(f"{name} has no column 'price'")
    return 1


def test_a_group_that_prints_or_raises_a_surrogate_leaves_readable_text(client, tmp_path):
    """A file name that is not UTF-8 in a group's error or prints: run.summary() raised UnicodeEncodeError for the whole run
    (pandas' and pyarrow's strings refuse a lone surrogate), and the
    group's _partition.json held it as an escape that strict JSON readers refuse."""
    url = str(tmp_path / "models")
    frame = dd.from_pandas(pd.DataFrame({"k": ["bad", "good"], "v": [1, 2]}), npartitions=1)
    run = frame.manymodel.train(_fails_on_a_file_name_that_is_not_utf8, by="k", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    summary = run.summary().set_index("partition_id")
    assert summary.loc["bad", "error"] == "ValueError: caf\\udce9.csv has no column 'price'"
    details = run.partition_details["bad"]
    assert "reading caf\\udce9.csv" in details.logs and "caf\\udce9.csv" in details.traceback
    for group in ("k=bad", "k=good"):
        with open(os.path.join(url, "r1", group, "_partition.json"), encoding="utf-8") as f:
            text = f.read()
        # a lone surrogate's escape reads back as one, which no UTF-8 holds
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_infinite_keys_leave_strict_json_for_other_tools(client, tmp_path):
    # a run's JSON files are read by tools other than Python's json (jq, a
    # dashboard in JavaScript): the inf and -inf groups must not make them
    # invalid JSON, and still come back as floats
    url = str(tmp_path / "models")
    pdf = pd.DataFrame({"key": [1.5, np.inf, -np.inf, 2.0] * 2, "x": 1.0})
    run = dd.from_pandas(pdf, npartitions=2).manymodel.train(
        lambda data, ctx: len(data), by="key", url=url, run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    root = os.path.join(url, "r1")
    _strict_json(os.path.join(root, "_run.json"))
    groups = _strict_json(os.path.join(root, "_groups.json"))
    assert len(groups) == 4
    for name in ("key=inf", "key=-inf", "key=1.5", "key=2"):
        assert _strict_json(os.path.join(root, name, "_partition.json"))["status"] == "DONE"
    restored = ManyModelRun.restore_from("r1", url)
    ids = restored.summary()["partition_id"].tolist()
    assert sorted(ids) == [-np.inf, 1.5, 2.0, np.inf] and all(type(v) is float for v in ids)
    assert restored.get_model(np.inf) == 2 and restored.get_model(-np.inf) == 2


def test_typed_keys_ints_dates_and_strings_with_na(client, tmp_path):
    url = str(tmp_path / "models")
    days = pd.to_datetime(["2024-01-01", "2024-01-02"])
    pdf = pd.DataFrame(
        {
            "day": np.repeat(days, 4),
            "shop": pd.array(["a", "b", None, "a", "a", "b", None, "a"], dtype="string"),
            "n": np.arange(8),
        }
    )

    def count(data, ctx):
        return len(data.to_pandas())

    run = dd.from_pandas(pdf, npartitions=2).manymodel.train(
        count, by=["day", "shop"], url=url, run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert run.get_model((days[0], "a")) == 2
    assert run.get_model((days[1], None)) == 1
    assert os.path.isfile(os.path.join(url, "r1", "day=2024-01-01T00%3A00%3A00", "shop=a", "model.pkl"))
    restored = ManyModelRun.restore_from("r1", url)
    assert (days[0], "a") in restored.partition_details


def the_id_inside(data, ctx):
    return repr(ctx.partition_id)


def test_the_function_sees_a_null_group_as_the_handle_gives_it(client, tmp_path):
    # None inside the function, as in partition_details and summary(): not
    # pd.NA (whose `==` in an `if` raises), NaN or NaT
    pdf = pd.DataFrame({
        "text": pd.array(["N", None], dtype="string"),
        "number": [1.0, np.nan],
        "day": pd.to_datetime(["2020-01-01", None]),
        "x": [1.0, 2.0],
    })
    for column in ["text", "number", "day"]:
        run = dd.from_pandas(pdf, npartitions=1).manymodel.train(
            the_id_inside, by=column, url=str(tmp_path / "models"), run_id=column
        )
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        assert None in run.partition_details
        assert run.get_model(None) == "None"
    both = dd.from_pandas(pdf, npartitions=1).manymodel.train(
        the_id_inside, by=["text", "day"], url=str(tmp_path / "models"), run_id="both"
    )
    assert both.wait(show_progress=False) == RunStatus.SUCCESS
    assert both.get_model((None, None)) == "(None, None)"


def test_a_long_column_name_and_a_long_value_fit_in_a_folder_name(client, tmp_path):
    url = str(tmp_path / "models")
    column = "customer_segment_identifier_for_the_regional_sales_model"  # 56 characters
    values = ["v" * 300, "v" * 299 + "w", "short"]
    pdf = pd.DataFrame({column: values, "x": [1.0, 2.0, 3.0]})

    def keep_key(data, ctx):
        return ctx.partition_id

    run = dd.from_pandas(pdf, npartitions=1).manymodel.train(keep_key, by=column, url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert [run.get_model(value) for value in values] == values
    assert all(len(name.encode()) <= 255 for name in os.listdir(os.path.join(url, "r1")))
    restored = ManyModelRun.restore_from("r1", url)
    assert sorted(d.partition_id for d in restored.get_progress()["DONE"]) == sorted(values)


def count_rows(data, ctx):
    return len(data.to_pandas())


def test_temporal_keys_round_trip_through_ids_and_lookups(client, tmp_path):
    url = str(tmp_path / "models")
    lags = pd.DataFrame({"lag": pd.to_timedelta(["1h", "2h", "2h"]), "x": [1.0, 2.0, 3.0]})
    run = dd.from_pandas(lags, npartitions=1).manymodel.train(count_rows, by="lag", url=url, run_id="td")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    ids = list(run.summary()["partition_id"])
    assert all(isinstance(pid, pd.Timedelta) for pid in ids)
    assert [run.get_model(pid) for pid in ids] == [1, 2]
    for same in (datetime.timedelta(hours=2), np.timedelta64(2, "h"), np.timedelta64(7200, "s")):
        assert run.get_model(same) == 2
    restored = ManyModelRun.restore_from("td", url)
    progress_ids = [d.partition_id for d in restored.get_progress()["DONE"]]
    assert sorted(progress_ids) == [pd.Timedelta("1h"), pd.Timedelta("2h")]
    assert [restored.get_model(pid) for pid in sorted(progress_ids)] == [1, 2]

    days = pd.DataFrame({"day": pd.to_datetime(["2020-01-01", "2020-01-02"]).as_unit("ns"), "x": [1.0, 2.0]})
    run = dd.from_pandas(days, npartitions=1).manymodel.train(count_rows, by="day", url=url, run_id="dt")
    run.wait(show_progress=False)
    for same in (days["day"].to_numpy()[0], np.datetime64("2020-01-01", "D"), datetime.datetime(2020, 1, 1)):
        assert run.get_model(same) == 1

    paris = pd.DataFrame({"ts": pd.to_datetime(["2020-01-01", "2020-07-01"]).tz_localize("Europe/Paris"),
                          "x": [1.0, 2.0]})
    run = dd.from_pandas(paris, npartitions=1).manymodel.train(count_rows, by="ts", url=url, run_id="tz")
    run.wait(show_progress=False)
    for handle in (run, ManyModelRun.restore_from("tz", url)):
        pid = handle.summary()["partition_id"][0]
        assert str(pid.tz) == "Europe/Paris" and pid == paris["ts"][0]
        # the same instant in another zone, as pandas' get_group finds it
        assert handle.get_model(paris["ts"][0].tz_convert("UTC")) == 1
        assert handle.get_model(paris["ts"][1].tz_convert("Asia/Tokyo").to_pydatetime()) == 1


def test_a_restored_handle_travels_to_the_workers_and_a_live_one_says_why_not(client, ddf, store_url):
    """Both failed to pickle with internal errors ("cannot pickle
    '_thread.lock'", "Can't pickle local object"): a restored handle reads
    storage only, and loading models on the workers with it is natural."""
    run = ddf.manymodel.train(failing_on_odd, by="store", url=store_url, run_id="r1")
    run.wait(show_progress=False)
    with pytest.raises(TypeError, match=r"live handle of run 'r1' cannot be pickled .*restore_from\('r1', url\)"):
        pickle.dumps(run)
    restored = ManyModelRun.restore_from("r1", store_url)
    models = client.gather(client.map(lambda key: list(restored.get_model(key)), [0, 2, 4]))
    for key, model in zip([0, 2, 4], models):
        np.testing.assert_allclose(model, expected_line(key), atol=1e-9)
    again = pickle.loads(pickle.dumps(restored))
    assert again.status == RunStatus.PARTIAL_FAILURE and again.partition_details[5].error == "ValueError: odd group 5"
    np.testing.assert_allclose(again.get_model(4), expected_line(4), atol=1e-9)


def test_restore_from_a_fresh_process(client, ddf, store_url):
    run = ddf.manymodel.train(failing_on_odd, by="store", url=store_url, run_id="r1")
    run.wait(show_progress=False)
    script = textwrap.dedent(
        f"""
        import json
        from dask_manymodel import ManyModelRun
        run = ManyModelRun.restore_from("r1", {store_url!r})
        progress = run.get_progress()
        print(json.dumps({{
            "status": run.status.value,
            "done": sorted(d.partition_id for d in progress["DONE"]),
            "failed_error": run.partition_details[5].error,
            "model": list(run.get_model(4)),
        }}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "PARTIAL_FAILURE"
    assert result["done"] == [0, 2, 4, 6, 8, 10]
    assert result["failed_error"] == "ValueError: odd group 5"
    np.testing.assert_allclose(result["model"], expected_line(4), atol=1e-9)

    restored = ManyModelRun.restore_from("r1", store_url)
    assert restored.read_only
    with pytest.raises(ReadOnlyRunError):
        restored.wait()
    with pytest.raises(ReadOnlyRunError):
        restored.cancel()


def test_overwrite_replaces_the_old_run(client, store_url):
    old = dd.from_pandas(make_frame(n_groups=6), npartitions=2)
    old.manymodel.train(fit_line, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    new = dd.from_pandas(make_frame(n_groups=3, seed=1), npartitions=2)
    from dask_manymodel import RunExistsError

    with pytest.raises(RunExistsError, match="on_existing_artifacts='overwrite'"):
        new.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    run = new.manymodel.train(
        fit_line, by="store", url=store_url, run_id="r1", on_existing_artifacts="overwrite"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert sorted(os.listdir(os.path.join(store_url, "r1"))) == [
        "_groups.json", "_run.json", "store=0", "store=1", "store=2"
    ]
    restored = ManyModelRun.restore_from("r1", store_url)
    assert len(restored.partition_details) == 3
    with pytest.raises(PartitionNotFoundError):
        restored.get_model(5)

@pytest.mark.parametrize("on_existing", ["overwrite", "error"])
def test_a_folder_that_is_no_run_is_never_overwritten(client, tmp_path, on_existing):
    """url="~", run_id="Documents" (or a FileSet's name) with overwrite
    deleted every file of the folder; "error" advised that overwrite."""
    from dask_manymodel import FileSet, RunExistsError

    home = str(tmp_path)
    os.makedirs(os.path.join(home, "Documents", "thesis"))
    with open(os.path.join(home, "Documents", "thesis", "chapter1.tex"), "w") as f:
        f.write("years of work")
    FileSet.make(home, "snap", pd.DataFrame({"a": range(5)}))
    snap_files = sorted(os.listdir(os.path.join(home, "snap")))
    ddf = dd.from_pandas(make_frame(n_groups=2), npartitions=2)
    expected = {"Documents": "Documents holds files .* but no _run.json", "snap": "snap holds a FileSet, not a run"}
    for run_id, message in expected.items():
        with pytest.raises(RunExistsError, match=message) as caught:
            ddf.manymodel.train(fit_line, by="store", url=home, run_id=run_id, on_existing_artifacts=on_existing)
        assert "on_existing_artifacts='overwrite'" not in str(caught.value)
    assert sorted(os.listdir(os.path.join(home, "Documents"))) == ["thesis"]
    assert os.listdir(os.path.join(home, "Documents", "thesis")) == ["chapter1.tex"]
    assert sorted(os.listdir(os.path.join(home, "snap"))) == snap_files
    assert FileSet(home, "snap").to_dask_dataframe().compute()["a"].tolist() == list(range(5))
    # a folder with only the temp file of a _run.json whose writer was killed is the run's own
    os.makedirs(os.path.join(home, "r1"))
    open(os.path.join(home, "r1", ".tmp-0123-_run.json"), "w").close()
    run = ddf.manymodel.train(fit_line, by="store", url=home, run_id="r1", on_existing_artifacts="overwrite")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS



def save_through_context(data, ctx):
    df = data.to_pandas()
    ctx.upload({"mean": float(df["x"].mean())}, "stats.pkl")
    ctx.upload(df["y"].sum(), "ysum.txt", write_function=lambda obj, path: Path(path).write_text(str(obj)))
    if ctx.partition_id == 1:
        # read what another group of this run saved (group 0 runs first in its task
        # or not: download from the previous run instead)
        pass


def test_dpf_saves_artifacts(client, ddf, store_url):
    run = DPF(save_through_context, stage_name=store_url).run(
        partition_by="store", dataframe=ddf, run_id="d1"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    details = run.partition_details[2]
    assert details.artifacts.list() == ["stats.pkl", "ysum.txt"]
    expected = make_frame().query("store == 2")
    assert details.artifacts.get("stats.pkl") == {"mean": pytest.approx(expected["x"].mean())}
    text = details.artifacts.get("ysum.txt", read_function=lambda p: Path(p).read_text())
    assert float(text) == pytest.approx(expected["y"].sum())
    # a name that is no text failed in os.path.join (TypeError), a
    # read_function that is no function only after the download
    with pytest.raises(PartitionNotFoundError, match=r"^no artifact None in .*; it has \['stats.pkl', 'ysum.txt'\]$"):
        details.artifacts.get(None)
    with pytest.raises(InvalidArgumentError, match="^read_function must be a function f\\(local_path\\) that returns "
                       "the object, or None; got 'text'$"):
        details.artifacts.get("ysum.txt", read_function="text")

    def read_previous(data, ctx):
        return ctx.download("stats.pkl", partition_id=0, run_id="d1")

    later = ddf.manymodel.train(read_previous, by="store", url=store_url, run_id="t2")
    assert later.wait(show_progress=False) == RunStatus.SUCCESS
    assert later.get_model(5) == details.artifacts.get("stats.pkl") | {
        "mean": pytest.approx(make_frame().query("store == 0")["x"].mean())
    }


def upload_with_a_write_function_that_is_no_function(data, ctx):
    ctx.upload({"a": 1}, "stats.txt", write_function="text")


def download_with_a_read_function_that_is_no_function(data, ctx):
    ctx.upload({"a": 1}, "stats.pkl")
    return ctx.download("stats.pkl", read_function="pickle")


def test_a_context_read_or_write_function_that_is_no_function_names_it(client, ddf, store_url):
    # the group failed with "TypeError: 'str' object is not callable", from
    # inside the context, naming no argument
    for number, (func, message) in enumerate([
        (upload_with_a_write_function_that_is_no_function,
         "InvalidArgumentError: write_function must be a function f(obj, local_path) that writes the file, or None; "
         "got 'text'"),
        (download_with_a_read_function_that_is_no_function,
         "InvalidArgumentError: read_function must be a function f(local_path) that returns the object, or None; "
         "got 'pickle'"),
    ]):
        run = DPF(func, stage_name=store_url).run(partition_by="store", dataframe=ddf, run_id=f"d{number}")
        assert run.wait(show_progress=False) == RunStatus.FAILURE
        assert run.partition_details[0].error == message


def upload_under_the_models_name(data, ctx):
    ctx.upload("not the model", "model.pkl")
    return 1


def download_from_beside_the_url(data, ctx):
    return ctx.download("secret.txt", run_id="..", read_function=lambda path: Path(path).read_text())


def upload_a_long_name(data, ctx):
    name = "m" * 230  # within the 255 bytes of a file name; its temp name was not
    ctx.upload({"group": ctx.partition_id}, name)
    return ctx.download(name)


def test_artifact_names_the_run_uses_or_that_reach_beside_the_url(client, ddf, store_url):
    """The model's own name was overwritten without a word (the group's
    artifact list named it twice); run_id='..' read beside the URL; a name of
    230 characters failed after four retries (its temp name was too long)."""
    run = ddf.manymodel.train(upload_under_the_models_name, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    assert "artifact filename 'model.pkl' is the run's own file" in run.partition_details[0].error
    outside = ddf.manymodel.train(download_from_beside_the_url, by="store", url=store_url, run_id="r2")
    assert outside.wait(show_progress=False) == RunStatus.FAILURE
    assert "run_id '..' is not allowed" in outside.partition_details[0].error
    long_name = ddf.manymodel.train(upload_a_long_name, by="store", url=store_url, run_id="r3")
    assert long_name.wait(show_progress=False) == RunStatus.SUCCESS, long_name.summary()["error"].dropna().tolist()
    assert long_name.get_model(3) == {"group": 3}


def download_what_was_never_uploaded(data, ctx):
    return ctx.download("stats.pkl", partition_id=0, run_id="d1")


def test_downloading_a_missing_artifact_names_its_url(thread_client, ddf):
    """On memory:// (and on object stores) the file system's error named the
    path without its protocol: 'FileNotFoundError: /m/d1/store=0/stats.pkl'."""
    url = "memory://missing-artifact/m"
    try:
        assert ddf.manymodel.train(fit_line, by="store", url=url, run_id="d1").wait(show_progress=False) == (
            RunStatus.SUCCESS
        )
        run = ddf.manymodel.train(download_what_was_never_uploaded, by="store", url=url, run_id="d2")
        assert run.wait(show_progress=False) == RunStatus.FAILURE
        assert run.partition_details[3].error == (
            "FileNotFoundError: [Errno 2] no file 'stats.pkl' in group 0 of run 'd1' (ctx.upload saves one): "
            f"'{url}/d1/store=0/stats.pkl'"
        )
    finally:
        MemoryFileSystem().rm("/missing-artifact", recursive=True)


def upload_a_folder_or_nothing(data, ctx):
    def folder(obj, path):
        os.makedirs(os.path.join(path, "variables"))
        with open(os.path.join(path, "variables", "weights.bin"), "wb") as f:
            f.write(b"w")

    def nothing(obj, path):
        pass

    ctx.upload(1, "saved", write_function=folder if ctx.partition_id % 2 else nothing)
    return 1


def save_beside_the_null_group(data, ctx):
    ctx.upload(f"stats of {ctx.partition_id}", "stats.pkl")


def read_the_null_groups(data, ctx):
    return ctx.download("stats.pkl", partition_id=None, run_id="d1")


def upload_under_the_models_folder(data, ctx):
    ctx.upload("not the model", "weights")
    return {"group": ctx.partition_id}


def test_artifacts_of_folders_the_null_group_and_a_serdes_subfolder(client, ddf, store_url):
    """A write_function that made a folder stored an empty folder (DONE, the
    files lost); download(partition_id=None) read the caller's own group;
    with a serde writing 'weights/model.pkl' an upload named 'weights' was an
    INTERNAL_ERROR and artifacts.get() of the model raised FileNotFoundError."""
    written = ddf.manymodel.train(upload_a_folder_or_nothing, by="store", url=store_url, run_id="r1")
    assert written.wait(show_progress=False) == RunStatus.FAILURE
    assert "write_function made a folder for artifact 'saved'" in written.partition_details[1].error
    assert "write_function wrote no file for artifact 'saved'" in written.partition_details[2].error

    frame = pd.DataFrame({"k": pd.array(["a", None, "b"], dtype="string"), "x": [1.0, 2.0, 3.0]})
    keys = dd.from_pandas(frame, npartitions=1)
    saved = DPF(save_beside_the_null_group, stage_name=store_url).run(partition_by="k", dataframe=keys, run_id="d1")
    assert saved.wait(show_progress=False) == RunStatus.SUCCESS
    read = keys.manymodel.train(read_the_null_groups, by="k", url=store_url, run_id="r2")
    assert read.wait(show_progress=False) == RunStatus.SUCCESS
    assert read.get_model("b") == "stats of None"

    nested = PickleSerde("weights/model.pkl")
    clash = ddf.manymodel.train(upload_under_the_models_folder, by="store", url=store_url, run_id="r3", serde=nested)
    assert clash.wait(show_progress=False) == RunStatus.FAILURE
    assert "artifact filename 'weights' is the run's own file" in clash.partition_details[0].error
    fine = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r4", serde=nested)
    assert fine.wait(show_progress=False) == RunStatus.SUCCESS
    artifacts = fine.partition_details[4].artifacts
    assert artifacts.list() == ["weights/model.pkl"]
    np.testing.assert_allclose(artifacts.get("weights/model.pkl"), fine.get_model(4))


def test_summary_keeps_group_values_as_they_are(client, store_url):
    """With a null group pandas made the int ids floats, and a large one then
    named another group; an empty run's columns were all object."""
    big = 2**53 + 1
    frame = pd.DataFrame({"k": pd.array([big, big + 2, None], dtype="Int64"), "x": [1.0, 2.0, 3.0]})
    run = dd.from_pandas(frame, npartitions=1).manymodel.train(lambda d, ctx: len(d), by="k", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    summary = run.summary()
    assert sorted(summary["partition_id"].tolist(), key=str) == [big, big + 2, None]
    assert [run.get_model(value) for value in summary["partition_id"]] == [1, 1, 1]
    empty = dd.from_pandas(frame.iloc[:0], npartitions=1).manymodel.train(
        lambda d, ctx: len(d), by="k", url=store_url, run_id="r2"
    )
    assert empty.wait(show_progress=False) == RunStatus.SUCCESS
    assert empty.summary().dtypes.to_dict() == summary.dtypes.to_dict()


def test_wait_returns_a_final_status_even_if_collecting_fails(client, ddf, store_url, monkeypatch):
    """Any error while the client collected the results (the store failing
    under it, a bug of ours) ended the collector, and wait() returned
    IN_PROGRESS, which it promises never to return."""
    def failing_finalize(self):
        raise RuntimeError("the store went away while the run ended")

    monkeypatch.setattr(ManyModelRun, "_finalize", failing_finalize)
    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS  # every group's result had come back
    assert run.status == RunStatus.SUCCESS


def test_cancel_stops_before_the_next_group(client, store_url, tmp_path):
    ddf = dd.from_pandas(make_frame(n_groups=40, rows=5), npartitions=2)
    gates = tmp_path / "gates"
    gates.mkdir()
    with cancel_checked_before_every_group(client):
        run = ddf.manymodel.train(
            functools.partial(held_until_cancelled, str(gates)), by="store", url=store_url, run_id="r1",
            execution_options=ExecutionOptions(npartitions=2),
        )
        announce_cancel_event(gates, run)
        poll(lambda: any(name.startswith("running-") for name in os.listdir(gates)))
        assert run.cancel() == RunStatus.CANCELLED
    progress = run.get_progress()
    assert 1 <= len(progress["DONE"]) < 40
    assert len(progress["CANCELLED"]) >= 1
    assert set(progress) <= {"DONE", "CANCELLED"}
    restored = ManyModelRun.restore_from("r1", store_url)
    assert restored.status == RunStatus.CANCELLED
    stored = restored.get_progress()
    assert set(stored) <= {"DONE", "CANCELLED"}  # nothing left RUNNING or PENDING
    assert len(stored["DONE"]) == len(progress["DONE"])


def test_wait_timeout_and_progress_while_running(client, store_url):
    ddf = dd.from_pandas(make_frame(n_groups=8, rows=5), npartitions=2)
    gate = os.path.join(store_url, "..", "release")
    run = ddf.manymodel.train(
        functools.partial(group_zero_held, gate), by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    with pytest.raises(RunTimeoutError):
        run.wait(timeout=0.1, show_progress=False)  # group 0 is held
    assert run.status == RunStatus.IN_PROGRESS
    assert "IN_PROGRESS" in repr(run)
    open(gate, "w").close()
    assert run.wait(show_progress=True) == RunStatus.SUCCESS


def test_task_names_and_one_task_per_partition(client, ddf, store_url):
    run = ddf.manymodel.train(
        fit_line, by="store", url=store_url, run_id="r1", execution_options=ExecutionOptions(npartitions=3)
    )
    run.wait(show_progress=False)
    assert len(run.futures) == 3
    assert {key_split(f.key) for f in run.futures} == {"manymodel-train"}
    dpf = DPF(lambda data, ctx: None, stage_name=store_url).run(partition_by="store", dataframe=ddf, run_id="d1")
    dpf.wait(show_progress=False)
    assert {key_split(f.key) for f in dpf.futures} == {"manymodel-dpf"}


def test_a_task_result_travels_as_one_pickle_not_a_frame_per_group(client, store_url):
    """A task's records are still a list of dicts to whoever reads the
    future, but Dask packs them as one object: a plain list of dicts would
    go as one message frame per group (25,000 groups: 1-1.6 s to reach the
    client instead of 0.02-0.2 s)."""
    from distributed.protocol import dumps, to_serialize

    frame = dd.from_pandas(make_frame(n_groups=300, rows=2), npartitions=1)
    run = frame.manymodel.train(
        fit_line, by="store", url=store_url, run_id="r1", execution_options=ExecutionOptions(npartitions=1)
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    (records,) = [future.result() for future in run.futures]
    assert isinstance(records, list) and len(records) == 300
    assert {record["status"] for record in records} == {"DONE"}
    assert len(dumps({"data": to_serialize(records)})) < 10  # a plain list: 302 frames


def test_groups_are_balanced_largest_first(client, store_url):
    sizes = [400] + [10] * 40
    pdf = pd.DataFrame({"store": np.repeat(np.arange(len(sizes)), sizes), "x": 1.0, "y": 1.0})
    run = dd.from_pandas(pdf, npartitions=4).manymodel.train(
        lambda data, ctx: os.getpid(), by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(npartitions=2),
    )
    run.wait(show_progress=False)
    tasks = {g["path"]: g["task"] for g in run._groups}
    big_task = tasks["store=0"]
    # the 400-row group shares its task with no other group: 40 x 10 rows fill the other
    assert [path for path, task in tasks.items() if task == big_task] == ["store=0"]


def test_zero_rows_is_an_empty_success(client, store_url):
    empty = dd.from_pandas(make_frame().iloc[:0], npartitions=1)
    run = empty.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    assert run.summary().empty
    assert ManyModelRun.restore_from("r1", store_url).status == RunStatus.SUCCESS


def test_resources_only_on_user_function_tasks(tmp_path):
    import logging

    import distributed

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0",
        resources={"GPU": 1}, silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
        gate = str(tmp_path / "release")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = ddf.manymodel.train(
                functools.partial(group_zero_held, gate), by="store", url="memory://gpu", run_id="r1",
                execution_options=ExecutionOptions(resources={"GPU": 1}, npartitions=2),
            )
        assert not [w for w in caught if "offers resources" in str(w.message)]  # the worker offers GPU=1

        def restrictions(dask_scheduler):
            return {
                str(ts.key): ts.resource_restrictions or {}
                for ts in dask_scheduler.tasks.values()
            }

        # snapshot while the shuffle's output still waits for the train tasks
        seen: dict = {}

        def both_train_tasks_seen() -> bool:
            seen.update(client.run_on_scheduler(restrictions))
            return sum("manymodel-train" in key for key in seen) == 2

        poll(both_train_tasks_seen)
        open(gate, "w").close()
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        ours = {k: v for k, v in seen.items() if "manymodel-train" in k}
        others = {k: v for k, v in seen.items() if "manymodel-train" not in k}
        assert len(ours) == 2 and all(v == {"GPU": 1} for v in ours.values())
        assert others and not any(others.values())


def test_resources_no_worker_offers_get_a_warning_and_the_run_waits_for_one(tmp_path):
    import logging

    import distributed

    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp", dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, distributed.Client(cluster) as client:
        ddf = dd.from_pandas(make_frame(n_groups=4), npartitions=2)
        with pytest.warns(UserWarning) as caught:
            run = ddf.manymodel.train(
                fit_line, by="store", url=str(tmp_path), run_id="r1",
                execution_options=ExecutionOptions(resources={"GPU": 1}),
            )
        message = str(caught[0].message)
        assert "no worker of the cluster offers resources={'GPU': 1} now" in message
        assert "its 1 worker(s) offer no resources" in message and '--resources "GPU=1"' in message
        poll(lambda: "no-worker" in client.run_on_scheduler(
            lambda dask_scheduler: [ts.state for ts in dask_scheduler.tasks.values()]))
        assert run.status == RunStatus.IN_PROGRESS
        # a worker that offers it joins, started as the warning says: the run goes on there
        worker = subprocess.Popen(
            [sys.executable, "-m", "dask", "worker", cluster.scheduler_address, "--nthreads", "1",
             "--resources", "GPU=1", "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            assert run.wait(show_progress=False, timeout=120) == RunStatus.SUCCESS
        finally:
            worker.terminate()
            worker.wait(30)


def test_cancel_of_a_run_whose_tasks_no_worker_can_run(client, ddf, tmp_path):
    with pytest.warns(UserWarning, match="no worker of the cluster offers resources"):
        run = ddf.manymodel.train(
            fit_line, by="store", url=str(tmp_path), run_id="r1",
            execution_options=ExecutionOptions(resources={"GPU": 1}),
        )
    # at once, while the tasks may still wait for their input: they would never start to see the cancel
    assert run.cancel(timeout=60) == RunStatus.CANCELLED
    assert set(run.summary()["status"]) == {"CANCELLED"}
    stored = ManyModelRun.restore_from("r1", str(tmp_path))
    assert stored.status == RunStatus.CANCELLED and len(stored.summary()) == 12
    assert set(stored.summary()["status"]) == {"CANCELLED"}


def fit_scaled(scale, data, ctx):
    return fit_line(data, ctx) * scale[0]


class ScaledFit:
    def __init__(self, table):
        self.table = table

    def train(self, data, ctx):
        return fit_scaled(self.table, data, ctx)


def test_a_function_that_carries_large_data_gets_a_warning(client, ddf, tmp_path, monkeypatch):
    from dask_manymodel import engine

    monkeypatch.setattr(engine, "_LARGE_FUNCTION_BYTES", 2**20)  # 1 MiB instead of 100
    weights = np.ones(2**18)  # 2 MiB
    small = np.ones(10)

    def train_with_weights(data, ctx):
        return fit_line(data, ctx) * weights[0] * small[0]

    with pytest.warns(UserWarning) as caught:
        run = ddf.manymodel.train(train_with_weights, by="store", url=str(tmp_path), run_id="r1")
    message = str(caught[0].message)
    assert "train_with_weights carries 'weights' (2.00 MiB) to every worker" in message
    assert "small" not in message and "merge that part into the dataframe" in message
    assert run.wait(show_progress=False) == RunStatus.SUCCESS  # a warning only

    with pytest.warns(UserWarning, match=r"carries 'argument 0' \(2.00 MiB\)"):
        run = ddf.manymodel.train(functools.partial(fit_scaled, weights), by="store", url=str(tmp_path),
                                  run_id="r2")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS

    with pytest.warns(UserWarning, match=r"carries 'self.table' \(2.00 MiB\)"):
        run = ddf.manymodel.train(ScaledFit(weights).train, by="store", url=str(tmp_path), run_id="r3")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS

    # a closure whose variable is set only after the call: looking at it must not stop the run from
    # starting (its groups then fail as they would anyway: the function was sent without the value)
    def uses_a_later_value(data, ctx):
        return fit_line(data, ctx) * later

    run = ddf.manymodel.train(uses_a_later_value, by="store", url=str(tmp_path), run_id="r4")
    later = 1.0
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    assert "later" in run.partition_details[0].error


def test_a_warning_names_the_users_line(client, ddf, tmp_path, monkeypatch):
    """A warning named a line of the package (a fixed stacklevel), and Python
    shows a warning once per line it names: a notebook's second run with the
    same problem, from another cell, got none. It names the caller's line,
    from either API."""
    from dask_manymodel import ManyModelTraining, engine

    monkeypatch.setattr(engine, "_LARGE_FUNCTION_BYTES", 2**20)  # 1 MiB instead of 100
    weights = np.ones(2**18)  # 2 MiB

    def train_with_weights(data, ctx):
        return fit_line(data, ctx) * weights[0]

    def start(run_id):  # the same line of this file starts every run
        return ddf.manymodel.train(train_with_weights, by="store", url=str(tmp_path), run_id=run_id)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per line named
        runs = [start("r1"), start("r2")]
        runs.append(ManyModelTraining(train_with_weights, str(tmp_path)).run(
            partition_by="store", dataframe=ddf, run_id="r3"))
    carried = [w for w in caught if "carries 'weights'" in str(w.message)]
    # start()'s line (for one run or both: Python forgets what it showed when a
    # filter changes, as the cluster's code does) and the class API's
    assert len(carried) >= 2 and {os.path.basename(w.filename) for w in carried} == {"test_train.py"}
    assert len({w.lineno for w in carried}) == 2
    assert all(run.wait(show_progress=False) == RunStatus.SUCCESS for run in runs)


def test_embedded_cluster_without_a_client(tmp_path):
    script = textwrap.dedent(
        f"""
        import logging
        import dask.dataframe as dd, pandas as pd, numpy as np
        import dask_manymodel
        logging.basicConfig(level=logging.INFO)
        pdf = pd.DataFrame({{"g": np.repeat([1, 2, 3], 5), "x": np.arange(15.0)}})
        run = dd.from_pandas(pdf, npartitions=2).manymodel.train(
            lambda data, ctx: len(data), by="g", url={str(tmp_path)!r}, run_id="r1")
        print("STATUS", run.wait(show_progress=False).value, run.get_model(2))
        # the user closes the embedded client: the next run starts another
        # cluster, and the first one's workers stop
        import distributed
        first = distributed.get_client()
        first.close()
        again = dd.from_pandas(pdf, npartitions=2).manymodel.train(
            lambda data, ctx: len(data), by="g", url={str(tmp_path)!r}, run_id="r2")
        print("AGAIN", again.wait(show_progress=False).value, first.cluster.status.name)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert "STATUS SUCCESS 5" in out.stdout, out.stderr[-3000:]
    assert "started a LocalCluster" in out.stderr and "dashboard at http" in out.stderr
    assert "AGAIN SUCCESS closed" in out.stdout, out.stderr[-3000:]


def test_the_embedded_clusters_workers_outlive_an_interrupt(tmp_path):
    """Jupyter's stop button sends SIGINT to the kernel's process group: the
    embedded cluster's workers died, and every later run waited for ever."""
    script = textwrap.dedent(
        f"""
        import os, signal, time
        import dask.dataframe as dd, pandas as pd, numpy as np
        import distributed
        import dask_manymodel

        def restarted_and_ignoring(client, first):
            try:  # a worker going away fails the call: ask again
                pids = client.run(os.getpid)
                ignoring = client.run(lambda: signal.getsignal(signal.SIGINT) == signal.SIG_IGN)
            except Exception:
                return False
            return len(pids) == 2 and set(pids.values()) != set(first.values()) and all(ignoring.values())

        pdf = pd.DataFrame({{"g": np.repeat([1, 2, 3], 5), "x": np.arange(15.0)}})
        ddf = dd.from_pandas(pdf, npartitions=2)
        run = ddf.manymodel.train(lambda data, ctx: len(data), by="g", url={str(tmp_path)!r}, run_id="r1")
        print("FIRST", run.wait(show_progress=False).value)
        client = distributed.get_client()
        # a worker the nanny starts again (after a crash) is covered too
        first = client.run(os.getpid)
        os.kill(next(iter(first.values())), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not restarted_and_ignoring(client, first):
            assert time.monotonic() < deadline, "no worker restarted"
            time.sleep(0.2)  # poll
        pids = client.run(os.getpid)
        for pid in pids.values():
            os.kill(pid, signal.SIGINT)  # as the stop button: every process of the group
        again = ddf.manymodel.train(lambda data, ctx: len(data), by="g", url={str(tmp_path)!r}, run_id="r2")
        print("AGAIN", again.wait(timeout=60, show_progress=False).value, client.run(os.getpid) == pids)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert "FIRST SUCCESS" in out.stdout, out.stderr[-3000:]
    assert "AGAIN SUCCESS True" in out.stdout, out.stderr[-3000:]


def test_tasks_of_a_run_share_the_cancel_check(client, cluster, store_url):
    """Asking whether the run was cancelled is a round trip to the scheduler:
    a worker asks at most once per heartbeat for all of a run's tasks, not
    once at the start of every task."""
    handlers = cluster.scheduler.handlers  # the scheduler runs in this process
    original = handlers["event_is_set"]
    asked = []

    def counting(name=None):
        asked.append(name)
        return original(name=name)

    handlers["event_is_set"] = counting
    try:
        ddf = dd.from_pandas(make_frame(n_groups=80, rows=5), npartitions=4)
        started = time.monotonic()
        run = ddf.manymodel.train(
            fit_line, by="store", url=store_url, run_id="r1", execution_options=ExecutionOptions(npartitions=40)
        )
        assert run.wait(show_progress=False) == RunStatus.SUCCESS
        elapsed = time.monotonic() - started
    finally:
        handlers["event_is_set"] = original
    n_tasks = len(run.futures)
    assert n_tasks >= 20
    # two workers, each asking at its first task and then once per heartbeat at most
    allowed = 2 * (elapsed / _HEARTBEAT_SECONDS + 1)
    assert 1 <= len(asked) <= min(allowed, n_tasks - 1), (len(asked), n_tasks, elapsed)


_calls_per_group: dict = {}


def changes_its_rows_then_fails_once(data, ctx):
    """Changes the frame in place; its first call per group then fails."""
    df = data.to_pandas()
    total = float(df["x"].sum())
    df["x"] = df["x"] / 10
    df.drop(columns=["y"], inplace=True)
    _calls_per_group[ctx.partition_id] = _calls_per_group.get(ctx.partition_id, 0) + 1
    if _calls_per_group[ctx.partition_id] == 1:
        raise ConnectionError("a flaky service")
    return total


def test_a_retry_gets_the_groups_rows_as_they_were(client, ddf, store_url):
    """A retry got the frame its first attempt had changed in place: a model
    of x / 10 said SUCCESS (or a KeyError for the dropped column)."""
    run = ddf.manymodel.train(
        changes_its_rows_then_fails_once, by="store", url=store_url, run_id="r1",
        execution_options=ExecutionOptions(max_retries=1),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    expected = ddf.compute().groupby("store")["x"].sum()
    for group, details in run.partition_details.items():
        assert details.attempts == 2
        assert run.get_model(group) == pytest.approx(expected[group])


def a_generator(data, ctx):
    yield data.to_pandas()


async def a_coroutine(data, ctx):
    return len(data)


class _AsyncCallable:
    async def __call__(self, data, ctx):
        ctx.upload(len(data), "rows")


def test_a_callable_whose_call_runs_nothing_fails_its_groups(client, ddf, store_url):
    """An object with an async __call__ passes the up-front check: its groups
    were DONE having run nothing (no file uploaded)."""
    run = DPF(_AsyncCallable(), stage_name=store_url).run(partition_by="store", dataframe=ddf, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    assert "the function returned a coroutine (an async or generator function?): none of its body ran" in (
        run.partition_details[0].error)


@pytest.mark.parametrize("func, what", [(a_generator, "a generator function"), (a_coroutine, "an async function")])
def test_a_generator_or_async_function_is_refused_before_anything_runs(client, ddf, store_url, func, what):
    """Calling one runs none of its body: a DPF run was SUCCESS having done nothing."""
    with pytest.raises(InvalidArgumentError, match=f"is {what}: calling it runs none of its body"):
        DPF(func, stage_name=store_url).run(partition_by="store", dataframe=ddf, run_id="r1")
    with pytest.raises(InvalidArgumentError, match=f"is {what}"):
        ddf.manymodel.train(func, by="store", url=store_url, run_id="r1")
    assert not os.path.exists(store_url)


class _UnpicklableWithSystemExit:
    def __reduce__(self):
        raise SystemExit("this model refuses to be saved")


def returns_a_model_that_exits_when_pickled(data, ctx):
    return _UnpicklableWithSystemExit() if ctx.partition_id == 2 else 1


def test_a_model_whose_pickling_raises_any_base_exception_fails_its_group(client, ddf, store_url):
    run = ddf.manymodel.train(returns_a_model_that_exits_when_pickled, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    failed = run.partition_details[2]
    assert failed.status == "FAILED"  # was INTERNAL_ERROR
    assert "could not write the model of group 2" in failed.error
    assert "SystemExit: this model refuses to be saved" in failed.error


def test_a_handle_of_a_deleted_run_says_so(client, ddf, store_url):
    """Its models said "it is PENDING", as if the run were still going."""
    import shutil

    from dask_manymodel import RunNotFoundError

    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    restored = ManyModelRun.restore_from("r1", store_url)
    shutil.rmtree(os.path.join(store_url, "r1"))
    for handle in (run, restored):
        with pytest.raises(RunNotFoundError, match="run 'r1' no longer exists at .*deleted since"):
            handle.get_model(1)


def test_a_handle_of_a_run_overwritten_since_says_so(client, ddf, store_url):
    """A handle of last night's run, kept in a notebook while tonight's job
    overwrote the run: its models said "group 1 of run 'r1' has no model: it
    is PENDING" (the handle reads its own start's groups only)."""
    from dask_manymodel import RunNotFoundError

    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    restored = ManyModelRun.restore_from("r1", store_url)
    tonight = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1", on_existing_artifacts="overwrite")
    assert tonight.wait(show_progress=False) == RunStatus.SUCCESS
    for handle in (run, restored):
        with pytest.raises(RunNotFoundError, match="run 'r1' at .* was started again .* since this handle was made"):
            handle.get_model(1)
    np.testing.assert_allclose(ManyModelRun.restore_from("r1", store_url).get_model(1), [1.1, 1], atol=1e-9)
