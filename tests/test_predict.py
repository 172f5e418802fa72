"""Inference runs: models loaded per group on the workers, output as Dask and parquet."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import textwrap

import dask.dataframe as dd
import fsspec.implementations.memory
import numpy as np
import pandas as pd
import pyarrow
import pyarrow.dataset as pa_dataset
import pytest
from dask.utils import key_split

import dask_manymodel  # noqa: F401
from dask_manymodel.run import _with_group_columns
from dask_manymodel import (
    ExecutionOptions,
    InvalidArgumentError,
    ManyModelInference,
    ManyModelRun,
    PickleSerde,
    RunNotFoundError,
    RunStatus,
)

from .conftest import fit_line, make_frame


def predict_frame(data, model, ctx):
    df = data.to_pandas()
    return df.assign(pred=np.polyval(model, df["x"].to_numpy()))


@pytest.fixture
def trained(client, ddf, store_url):
    run = ddf.manymodel.train(fit_line, by="store", url=store_url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    return run


def test_train_then_predict_matches_a_hand_fit(trained, ddf, store_url):
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    assert {key_split(f.key) for f in inf.futures} == {"manymodel-predict"}
    scores = inf.to_dask_dataframe()
    assert list(scores.columns) == ["store", "x", "y", "pred"]
    result = scores.compute()
    assert len(result) == 12 * 40
    pdf = make_frame()
    for g in (2, 9):  # fit by hand with pandas/numpy, compare
        group = pdf[pdf["store"] == g]
        slope, intercept = np.polyfit(group["x"], group["y"], 1)
        got = result[result["store"] == g].sort_values("x")
        np.testing.assert_allclose(got["pred"], slope * group.sort_values("x")["x"] + intercept, atol=1e-9)
    assert os.path.isfile(os.path.join(store_url, "s1", "store=2", "part-0.parquet"))


def test_output_is_a_hive_dataset(trained, ddf, store_url):
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    inf.wait(show_progress=False)
    path = os.path.join(store_url, "s1")
    via_dask = dd.read_parquet(path).compute()
    assert len(via_dask) == 480 and set(via_dask.columns) == {"x", "y", "pred", "store"}
    table = pa_dataset.dataset(path, partitioning="hive").to_table().to_pandas()
    assert len(table) == 480
    assert sorted(table["store"].astype(int).unique()) == list(range(12))
    expected = inf.to_dask_dataframe().compute()
    pd.testing.assert_series_equal(
        table.sort_values("x")["pred"].reset_index(drop=True),
        expected.sort_values("x")["pred"].reset_index(drop=True),
    )


def test_output_rows_come_in_group_order_from_a_live_and_a_restored_handle(trained, ddf, store_url):
    """The groups were dealt round robin to the frame's partitions, whose
    count was the live run's task count but 8 for a restored handle: one
    run's output came in two orders (0, 3, 6, 9, 1, ... against 0, 8, 1, 9,
    2, ...). Now consecutive groups share a partition, in the run's order."""
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1",
                                execution_options=ExecutionOptions(npartitions=3))
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS and len(inf.futures) == 3
    live = inf.to_dask_dataframe().compute().reset_index(drop=True)
    restored = ManyModelRun.restore_from("s1", store_url).to_dask_dataframe().compute().reset_index(drop=True)
    assert live["store"].drop_duplicates().tolist() == list(range(12)) == inf.summary()["partition_id"].tolist()
    pd.testing.assert_frame_equal(live, restored)


def test_missing_and_failed_models(client, store_url):
    train_data = dd.from_pandas(make_frame(n_groups=4), npartitions=2)

    def fail_group_1(data, ctx):
        if ctx.partition_id == 1:
            raise ValueError("no model for 1")
        return fit_line(data, ctx)

    train_data.manymodel.train(fail_group_1, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    new = dd.from_pandas(make_frame(n_groups=6), npartitions=2)  # groups 4, 5 were never trained
    inf = new.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    details = inf.partition_details
    assert [g for g, d in details.items() if d.status == "DONE"] == [0, 2, 3]
    assert details[1].error == "group 1 has no model in training run 'r1': it ended FAILED there"
    assert details[5].error == "group 5 has no model in training run 'r1' (it was never trained there)"
    assert sorted(inf.to_dask_dataframe().compute()["store"].unique()) == [0, 2, 3]


def test_corrupt_model_file_fails_only_that_group(trained, ddf, store_url):
    with open(os.path.join(store_url, "r1", "store=3", "model.pkl"), "wb") as f:
        f.write(b"not a pickle")
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    error = inf.partition_details[3].error
    assert "could not read model file" in error and "store=3/model.pkl" in error
    assert inf.partition_details[4].status == "DONE"


def test_wrong_serde_is_refused_before_compute(trained, ddf, store_url):
    with pytest.raises(InvalidArgumentError, match="stored its models as 'model.pkl'"):
        ddf.manymodel.predict(
            predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1",
            serde=PickleSerde(filename="other.pkl"),
        )
    assert not os.path.exists(os.path.join(store_url, "s1"))


def test_unknown_training_run(client, ddf, store_url):
    with pytest.raises(RunNotFoundError, match="training run 'nope' does not exist"):
        ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="nope", run_id="s1")


def test_by_must_match_the_training_run(trained, store_url):
    other = dd.from_pandas(make_frame().rename(columns={"store": "shop"}), npartitions=1)
    with pytest.raises(InvalidArgumentError, match="differs from the training run"):
        other.manymodel.predict(predict_frame, by="shop", url=store_url, training_run_id="r1", run_id="s1")


def return_series(data, model, ctx):
    df = data.to_pandas()
    return pd.Series(np.polyval(model, df["x"].to_numpy()), index=df.index, name="score")


def return_array(data, model, ctx):
    return np.polyval(model, data.to_pandas()["x"].to_numpy())


def return_none(data, model, ctx):
    return None


def return_a_string(data, model, ctx):
    return "oops"


@pytest.mark.parametrize(
    "func, column",
    [(predict_frame, "pred"), (return_series, "score"), (return_array, "prediction")],
)
def test_return_types(trained, ddf, store_url, func, column):
    inf = ddf.manymodel.predict(func, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    result = inf.to_dask_dataframe().compute()
    assert column in result.columns and len(result) == 480
    row = result[result["store"] == 5].iloc[0]
    np.testing.assert_allclose(row[column], np.polyval(trained.get_model(5), row["x"]), atol=1e-9)


def test_none_stores_nothing(trained, ddf, store_url):
    inf = ddf.manymodel.predict(return_none, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    assert not os.path.exists(os.path.join(store_url, "s1", "store=0", "part-0.parquet"))
    # 0 rows, on the live handle as on a restored one (the live one said None)
    assert inf.partition_details[0].output_rows == 0
    assert ManyModelRun.restore_from("s1", store_url).partition_details[0].output_rows == 0
    with pytest.raises(InvalidArgumentError, match="stored no output"):
        inf.to_dask_dataframe()
    meta = pd.DataFrame({"store": pd.Series([], dtype="int64"), "pred": pd.Series([], dtype=float)})
    with_meta = ManyModelInference(return_none, stage_name=store_url, training_run_id="r1", meta=meta).run(
        partition_by="store", dataframe=ddf, run_id="s2"
    )
    with_meta.wait(show_progress=False)
    assert len(with_meta.to_dask_dataframe().compute()) == 0


def empty_for_group_0_none_for_group_1(data, model, ctx):
    if ctx.partition_id == 1:
        return None
    frame = predict_frame(data, model, ctx)
    return frame.iloc[:0] if ctx.partition_id == 0 else frame


def test_the_output_of_no_rows_a_group_stored_is_among_its_artifacts(trained, ddf, store_url):
    """A group that returned a frame of no rows stores its part-0.parquet
    (read by hive readers), but artifacts.list() left it out."""
    inf = ddf.manymodel.predict(empty_for_group_0_none_for_group_1, by="store", url=store_url,
                                training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    assert os.path.exists(os.path.join(store_url, "s1", "store=0", "part-0.parquet"))
    for handle in (inf, ManyModelRun.restore_from("s1", store_url)):
        details = handle.partition_details
        assert details[0].output_rows == 0 and details[0].artifacts.list() == ["part-0.parquet"]
        assert details[1].output_rows == 0 and details[1].artifacts.list() == []  # None: no file
        assert details[2].artifacts.list() == ["part-0.parquet"]
        empty = details[0].artifacts.get("part-0.parquet", pd.read_parquet)
        assert len(empty) == 0 and "pred" in empty.columns


def test_a_wrong_return_type_fails_the_group(trained, ddf, store_url):
    inf = ddf.manymodel.predict(return_a_string, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    assert "returned a str" in inf.partition_details[0].error


def test_restore_an_inference_run_in_a_fresh_process(trained, ddf, store_url):
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    inf.wait(show_progress=False)
    script = textwrap.dedent(
        f"""
        import json
        from dask_manymodel import ManyModelRun
        run = ManyModelRun.restore_from("s1", {store_url!r})
        frame = run.to_dask_dataframe().compute(scheduler="sync")
        print(json.dumps({{"status": run.status.value, "kind": run.kind, "rows": len(frame),
                           "stores": sorted(int(s) for s in frame["store"].unique())}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": "SUCCESS", "kind": "predict", "rows": 480, "stores": list(range(12))}


class CountingSerde(PickleSerde):
    """Appends a line to a file on every read: counts model loads across processes."""

    def __init__(self, filename="model.pkl", log_path=None):
        super().__init__(filename)
        self.log_path = log_path

    def read(self, file_path):
        with open(self.log_path, "a") as f:
            f.write("read\n")
        return super().read(file_path)


def test_each_model_is_loaded_once_per_group(trained, ddf, store_url, tmp_path):
    log = tmp_path / "reads.log"
    inf = ddf.manymodel.predict(
        predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1",
        serde=CountingSerde(log_path=str(log)),
    )
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    assert log.read_text().count("read") == 12
    assert ManyModelRun.restore_from("s1", store_url).status == RunStatus.SUCCESS


def test_predict_output_stays_on_the_workers(trained, ddf, store_url):
    """The engine sends back one small record per group, never the frames."""
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    inf.wait(show_progress=False)
    records = [r for f in inf.futures for r in f.result()]
    assert len(records) == 12
    assert json.loads(json.dumps(records)) == records  # plain JSON: no frames, no models
    assert max(len(json.dumps(r)) for r in records) < 2_000
    assert all(r["output_rows"] == 40 for r in records)


def fit_nothing(data, ctx):
    return 0.0


def predict_one(data, model, ctx):
    return data.to_pandas().assign(pred=1.0)


def _year(column):
    return column.dt.year.max()


def _total(column):
    return column.sum()


@pytest.mark.parametrize(
    "keys, use",
    [
        ({"k": [1.0, 2.0, np.nan, 1.0]}, {"k": _total}),
        ({"k": pd.array([1, 2, None, 1], dtype="Int64")}, {"k": _total}),
        ({"k": pd.to_datetime(["2020-01-01", "2020-01-02", None, "2020-01-01"])}, {"k": _year}),
        (
            {"k": pd.to_datetime(["2020-01-01", "2020-01-02", None, "2020-01-01"]).tz_localize("Europe/Paris")},
            {"k": _year},
        ),
        (
            {"k": [1.0, np.nan, np.nan, 1.0], "t": pd.to_datetime(["2020-01-01", None, "2020-01-02", "2020-01-01"])},
            {"k": _total, "t": _year},
        ),
    ],
    ids=["float-nan", "Int64-NA", "datetime-NaT", "tz-aware-NaT", "two-columns"],
)
def test_a_null_group_keeps_the_by_columns_dtype(client, store_url, keys, use):
    pdf = pd.DataFrame({**keys, "x": [1.0, 2.0, 3.0, 4.0]})
    by = list(keys)
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by=by, url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(predict_one, by=by, url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    out = inf.to_dask_dataframe()
    assert [out.dtypes[col] for col in by] == [pdf[col].dtype for col in by]
    for part in out.to_delayed():  # the null group's partition too
        assert dict(part.compute().dtypes) == dict(out.dtypes)
    for col, op in use.items():
        assert op(out[col]).compute() == op(pdf[col])
    # a restored handle has no input: it infers the dtypes from the group values
    restored = ManyModelRun.restore_from("s1", store_url).to_dask_dataframe()
    assert dict(restored.compute().dtypes) == dict(restored.dtypes)


def mean_of_x(data, ctx):
    return float(data.to_pandas()["x"].mean())


def predict_with_mean(data, model, ctx):
    return data.to_pandas().assign(pred=model)


@pytest.mark.parametrize("where", ["local", "memory", "local, pyarrow timestamps"])
def test_predict_finds_models_trained_in_another_time_zone(request, tmp_path, where):
    """The same instants in UTC find the models trained on Europe/Paris values
    (their folders are named in each value's own zone); an instant the
    training run never saw still has no model."""
    request.getfixturevalue("thread_client" if where == "memory" else "client")
    url = f"memory://tz-{os.getpid()}-{id(tmp_path)}" if where == "memory" else str(tmp_path / "models")
    when = pd.to_datetime(["2020-01-01", "2020-07-01", "2020-01-01", "2020-07-01"]).tz_localize("Europe/Paris")
    paris = pd.DataFrame({"ts": when, "store": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    by = ["ts", "store"]
    dd.from_pandas(paris, npartitions=2).manymodel.train(mean_of_x, by=by, url=url, run_id="r1").wait(
        show_progress=False
    )
    utc = pd.concat([paris, paris.iloc[:1].assign(ts=pd.Timestamp("2021-01-01", tz="Europe/Paris"))])
    utc["ts"] = utc["ts"].dt.tz_convert("UTC")
    if "pyarrow" in where:
        utc["ts"] = utc["ts"].astype(pd.ArrowDtype(pyarrow.timestamp("ns", tz="UTC")))
    inf = dd.from_pandas(utc, npartitions=2).manymodel.predict(
        predict_with_mean, by=by, url=url, training_run_id="r1", run_id="s1"
    )
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    done = inf.summary().set_index("status")
    assert len(done.loc[["DONE"]]) == 4
    assert "never trained there" in done.loc["FAILED", "error"]
    out = inf.to_dask_dataframe().compute()
    assert str(out["ts"].dt.tz) in ("UTC", "+00:00")
    assert sorted(out["pred"]) == [1.0, 2.0, 3.0, 4.0]  # each group's own model: its x


def test_predict_of_zone_aware_values_from_a_training_run_without_zones(client, store_url):
    """A training run on naive dates (no zone stored) and a predict input in
    UTC: the groups have no model, and say so (FAILED), not a TypeError that
    lost every group of the task (INTERNAL_ERROR)."""
    naive = pd.DataFrame({"ts": pd.to_datetime(["2020-01-01", "2020-01-02"]), "x": [1.0, 2.0]})
    dd.from_pandas(naive, npartitions=1).manymodel.train(mean_of_x, by="ts", url=store_url, run_id="r1").wait(
        show_progress=False
    )
    utc = naive.assign(ts=naive["ts"].dt.tz_localize("UTC"))
    inf = dd.from_pandas(utc, npartitions=1).manymodel.predict(
        predict_with_mean, by="ts", url=store_url, training_run_id="r1", run_id="s1"
    )
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    summary = inf.summary()
    assert list(summary["status"]) == ["FAILED", "FAILED"]
    assert all("never trained there" in error for error in summary["error"])


def test_meta_with_or_without_the_by_column(client, store_url):
    pdf = pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    # a by column in meta is used as given: its dtype, its place
    given = pd.DataFrame({"x": pd.Series([], dtype="float64"), "pred": pd.Series([], dtype="float64"),
                          "k": pd.Series([], dtype="float64")})
    # without one, the by column goes first with the input's dtype
    expected = {
        "with": (["x", "pred", "k"], ["float64", "float64", "float64"]),
        "without": (["k", "x", "pred"], ["int64", "float64", "float64"]),
    }
    for name, meta in [("with", given), ("without", given[["x", "pred"]])]:
        inf = ddf.manymodel.predict(
            predict_one, by="k", url=store_url, training_run_id="r1", run_id=f"s-{name}", meta=meta
        )
        assert inf.wait(show_progress=False) == RunStatus.SUCCESS
        out = inf.to_dask_dataframe()
        computed = out.compute()
        assert (list(out.columns), [str(t) for t in out.dtypes]) == expected[name]
        assert (list(computed.columns), [str(t) for t in computed.dtypes]) == expected[name]
        assert sorted(computed["k"]) == [1, 1, 2, 2]
    # an empty input: the frame is meta itself, with no second "k"
    empty = dd.from_pandas(pdf.iloc[:0], npartitions=1)
    inf = empty.manymodel.predict(
        predict_one, by="k", url=store_url, training_run_id="r1", run_id="s-empty", meta=given
    )
    inf.wait(show_progress=False)
    assert list(inf.to_dask_dataframe().compute().columns) == ["x", "pred", "k"]


def keep_x(data, model, ctx):
    return data.to_pandas()[["x"]]


def test_a_categorical_by_column_keeps_its_values(client, store_url):
    # astype("category") on a Dask frame leaves the categories unknown in
    # meta; the output's categories are then the run's group values
    pdf = pd.DataFrame({"region": ["b", "a", "b", "a"], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2).astype({"region": "category"})
    ddf.manymodel.train(fit_nothing, by="region", url=store_url, run_id="r1").wait(show_progress=False)
    for run_id, meta in [("s1", None), ("s2", pd.DataFrame({"x": pd.Series([], dtype="float64"),
                                                            "region": pd.Series([], dtype="category")}))]:
        inf = ddf.manymodel.predict(keep_x, by="region", url=store_url, training_run_id="r1", run_id=run_id,
                                    meta=meta)
        assert inf.wait(show_progress=False) == RunStatus.SUCCESS
        out = inf.to_dask_dataframe()
        assert list(out.dtypes["region"].categories) == ["a", "b"]
        got = out.compute().sort_values("x")
        assert got["region"].tolist() == ["b", "a", "b", "a"]
        assert got["region"].dtype == out.dtypes["region"]


def bool_and_int_for_group_1(data, model, ctx):
    df = data.to_pandas()[["x"]]
    return df.assign(extra=7, flag=True) if ctx.partition_id == 1 else df


def test_columns_a_group_did_not_return_are_nulls(client, store_url):
    # as pandas' reindex: NaN in float64 for int64; pd.NA in boolean for bool
    # (not False, which a bool column would make of a missing value)
    ddf = dd.from_pandas(pd.DataFrame({"store": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]}), npartitions=1)
    ddf.manymodel.train(fit_nothing, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    meta = pd.DataFrame({"x": pd.Series([], dtype="float64"), "extra": pd.Series([], dtype="int64"),
                         "flag": pd.Series([], dtype="bool")})
    inf = ddf.manymodel.predict(bool_and_int_for_group_1, by="store", url=store_url, training_run_id="r1",
                                run_id="s1", meta=meta)
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    got = inf.to_dask_dataframe().compute().set_index("store")
    assert got.loc[1, "extra"].tolist() == [7, 7] and got.loc[1, "flag"].tolist() == [True, True]
    assert got.loc[2, "extra"].isna().all() and got["extra"].dtype == "float64"
    assert got.loc[2, "flag"].isna().all()


@pytest.mark.parametrize("npartitions", [1, 2])
def test_a_bool_column_a_group_did_not_return_stays_bool(client, store_url, npartitions):
    # its nulls were objects, which Dask's convert-string made text: the
    # group's partition held "<NA>" strings (out.flag.sum() raised), and in
    # one partition with a group that returned it, True became "True"
    ddf = dd.from_pandas(pd.DataFrame({"store": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]}), npartitions=1)
    ddf.manymodel.train(fit_nothing, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    meta = pd.DataFrame({"x": pd.Series([], dtype="float64"), "flag": pd.Series([], dtype="bool")})
    inf = ddf.manymodel.predict(bool_and_int_for_group_1, by="store", url=store_url, training_run_id="r1",
                                run_id="s1", meta=meta, execution_options=ExecutionOptions(npartitions=npartitions))
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    out = inf.to_dask_dataframe()
    got = out.compute().set_index("store")
    assert got["flag"].dtype == "boolean"
    assert got.loc[1, "flag"].tolist() == [True, True] and got.loc[2, "flag"].isna().all()
    assert out["flag"].sum().compute() == 2


def test_a_restored_run_gives_bool_groups_as_booleans_and_all_null_ones_not(client, store_url):
    pdf = pd.DataFrame({"flag": pd.array([True, False, None, True], dtype="boolean"), "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by="flag", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(keep_x, by="flag", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    restored = ManyModelRun.restore_from("s1", store_url).to_dask_dataframe()
    assert restored.dtypes["flag"] == "boolean"
    got = restored.compute().sort_values("x")
    assert got["flag"].dtype == "boolean"
    assert got["flag"].tolist()[:2] == [True, False] and got["flag"].isna().tolist() == [False, False, True, False]
    # a column of nulls only is no bool column
    nulls = pd.DataFrame({"store": [1, 2], "region": pd.array([None, None], dtype="string"), "x": [1.0, 2.0]})
    by = ["store", "region"]
    ddf = dd.from_pandas(nulls, npartitions=1)
    ddf.manymodel.train(fit_nothing, by=by, url=store_url, run_id="r2").wait(show_progress=False)
    ddf.manymodel.predict(keep_x, by=by, url=store_url, training_run_id="r2", run_id="s2").wait(show_progress=False)
    assert ManyModelRun.restore_from("s2", store_url).to_dask_dataframe().dtypes["region"] != "boolean"


def test_equal_keys_of_another_dtype_find_the_same_models(client, store_url):
    trained_on = pd.DataFrame({"store": [1, 1, 2, 0], "x": [1.0, 2.0, 3.0, 4.0]})
    train = dd.from_pandas(trained_on, npartitions=1)
    train.manymodel.train(fit_nothing, by="store", url=store_url, run_id="r1").wait(show_progress=False)
    # a missing key makes pandas turn the ints into float64 (and 0 may come as -0.0)
    new = pd.DataFrame({"store": [1.0, 2.0, np.nan, -0.0], "x": [5.0, 6.0, 7.0, 8.0]})
    inf = dd.from_pandas(new, npartitions=1).manymodel.predict(
        predict_one, by="store", url=store_url, training_run_id="r1", run_id="s1"
    )
    inf.wait(show_progress=False)
    statuses = {d.partition_id: d.status for d in inf.partition_details.values()}
    assert [statuses[k] for k in (1.0, 2.0, 0.0)] == ["DONE", "DONE", "DONE"]
    assert sorted(inf.to_dask_dataframe().compute()["store"]) == [-0.0, 1.0, 2.0]
    # Int64 keys with a NA group: summary() shows them as floats, get_model takes them
    nullable = pd.DataFrame({"store": pd.array([1, 2, None], dtype="Int64"), "x": [1.0, 2.0, 3.0]})
    run = dd.from_pandas(nullable, npartitions=1).manymodel.train(
        fit_nothing, by="store", url=store_url, run_id="r2"
    )
    run.wait(show_progress=False)
    assert [run.get_model(pid) for pid in run.summary()["partition_id"]] == [0.0, 0.0, 0.0]
    # -0.0 and 0.0 are one group for pandas: one folder, found by either
    signed = pd.DataFrame({"k": [-0.0, 0.0, 2.0], "x": [1.0, 2.0, 3.0]})
    run = dd.from_pandas(signed, npartitions=1).manymodel.train(fit_nothing, by="k", url=store_url, run_id="r3")
    run.wait(show_progress=False)
    assert os.path.isdir(os.path.join(store_url, "r3", "k=0"))
    assert run.get_model(0.0) == run.get_model(-0.0) == 0.0


def sum_per_day(data, model, ctx):
    return data.to_pandas().groupby("day")[["x"]].sum()  # indexed by "day"


def columns_vary_by_group(data, model, ctx):
    df = data.to_pandas().assign(pred=1.0)
    return df if ctx.partition_id == 1 else df.assign(extra="e")


def test_a_named_index_is_kept_as_a_column(client, store_url):
    pdf = pd.DataFrame({"k": [1, 1, 1, 2], "day": ["mon", "mon", "tue", "mon"], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(sum_per_day, by="k", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    out = inf.to_dask_dataframe().compute().sort_values(["k", "day"]).reset_index(drop=True)
    expected = pdf.groupby(["k", "day"])[["x"]].sum().reset_index()
    pd.testing.assert_frame_equal(out, expected, check_dtype=False)


def test_every_partition_has_exactly_metas_columns(client, store_url):
    pdf = pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(columns_vary_by_group, by="k", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    out = inf.to_dask_dataframe()  # meta is the first group's frame: with or without "extra"
    for part in out.to_delayed():
        assert list(part.compute().columns) == list(out.columns)
    computed = out.compute()
    assert list(computed.columns) == list(out.columns) and len(computed) == 4
    # meta= given: a column no group returned is nulls of its dtype, one not in meta is dropped
    meta = pd.DataFrame({"missing": pd.Series([], dtype="Int64"), "pred": pd.Series([], dtype="float64")})
    inf = ddf.manymodel.predict(
        columns_vary_by_group, by="k", url=store_url, training_run_id="r1", run_id="s2", meta=meta
    )
    inf.wait(show_progress=False)
    out = inf.to_dask_dataframe()
    computed = out.compute()
    assert list(out.columns) == list(computed.columns) == ["k", "missing", "pred"]
    assert dict(computed.dtypes) == dict(out.dtypes)
    assert computed["missing"].isna().all() and (computed["pred"] == 1.0).all()


def label_some(data, model, ctx):
    df = data.to_pandas()[["x"]]
    # group 1: all None (arrow's null type), ints in a column meta says is float
    label = [None] * len(df) if ctx.partition_id == 1 else ["ok"] * len(df)
    # a nullable Int64 in one group, floats in the other, and categories of its own
    count = pd.array(range(len(df)), dtype="Int64") if ctx.partition_id == 1 else np.arange(len(df)) + 0.5
    return df.assign(label=label, count=count, kind=pd.Categorical([f"k{ctx.partition_id}"] * len(df)))


def test_meta_types_every_groups_file_for_any_parquet_reader(client, store_url):
    pdf = pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    # a dict, as Dask's meta= takes one
    inf = ddf.manymodel.predict(label_some, by="k", url=store_url, training_run_id="r1", run_id="s1",
                                meta={"x": "f8", "label": "str", "count": "f8"})
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    read = pd.read_parquet(f"{store_url}/s1")  # the folder, with a plain reader
    assert len(read) == 4 and read["label"].isna().sum() == 2
    assert str(read["count"].dtype) == "float64" and sorted(read["count"]) == [0.0, 0.5, 1.0, 1.5]
    computed = inf.to_dask_dataframe().compute()
    assert list(computed.columns) == ["k", "x", "label", "count"] and len(computed) == 4
    # an empty category in meta (no categories yet) types nothing: each group keeps its own
    meta = pd.DataFrame({"x": pd.Series([], dtype="f8"), "kind": pd.Series([], dtype="category")})
    kinds = ddf.manymodel.predict(label_some, by="k", url=store_url, training_run_id="r1", run_id="s3", meta=meta)
    assert kinds.wait(show_progress=False) == RunStatus.SUCCESS
    assert sorted(kinds.to_dask_dataframe().compute()["kind"].astype(str)) == ["k1", "k1", "k2", "k2"]
    # a value that does not convert to meta's type fails its group, saying so
    bad = ddf.manymodel.predict(label_some, by="k", url=store_url, training_run_id="r1", run_id="s2",
                                meta={"x": "f8", "label": "int64", "count": "f8"})
    assert bad.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    error = bad.partition_details[2].error
    assert "column 'label'" in error and "meta's int64" in error


@pytest.mark.parametrize("meta", ["x", ["pred"], pd.Series([], dtype=float), 3])
def test_a_meta_that_is_not_a_frame_is_refused_before_the_run(client, store_url, meta):
    pdf = pd.DataFrame({"k": [1, 2], "x": [1.0, 2.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    with pytest.raises(InvalidArgumentError, match="meta must describe the output frame"):
        ddf.manymodel.predict(predict_one, by="k", url=store_url, training_run_id="r1", run_id="s1", meta=meta)
    assert not os.path.exists(f"{store_url}/s1")


@pytest.mark.parametrize("meta", [{}, [], pd.DataFrame(), {"k": "i8"}], ids=["dict", "list", "frame", "by-only"])
def test_a_meta_of_no_output_column_is_refused_before_the_run(client, store_url, meta):
    # meta={} gave a SUCCESS run whose output read back as the by column
    # alone: every column the function returned was left out
    pdf = pd.DataFrame({"k": [1, 2], "x": [1.0, 2.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    with pytest.raises(InvalidArgumentError, match=r"names no column besides the by columns \['k'\]"):
        ddf.manymodel.predict(predict_one, by="k", url=store_url, training_run_id="r1", run_id="s1", meta=meta)
    assert not os.path.exists(f"{store_url}/s1")


def test_a_meta_dtype_pandas_does_not_know_is_named():
    # a meta of many columns was shown cut at 80 characters: the misspelt
    # dtype to fix was not in the message
    from dask_manymodel.engine import check_meta

    meta = {f"feature_{i}": "float64" for i in range(10)} | {"prediction": "flaot64"}
    with pytest.raises(InvalidArgumentError) as info:
        check_meta(meta, ["k"])
    assert str(info.value).endswith(
        ": column 'prediction' has dtype 'flaot64', which pandas does not know (data type 'flaot64' not understood)"
    )


def series_named(name):
    def predict(data, model, ctx):
        return pd.Series(data.to_pandas()["x"].to_numpy() * 10, name=name)

    return predict


def test_a_returned_series_keeps_its_name_and_may_not_take_a_by_columns(client, store_url):
    pdf = pd.DataFrame({"k": [1, 1, 2], "x": [1.0, 2.0, 3.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    zero = ddf.manymodel.predict(series_named(0), by="k", url=store_url, training_run_id="r1", run_id="s0")
    assert zero.wait(show_progress=False) == RunStatus.SUCCESS
    assert list(zero.to_dask_dataframe().columns) == ["k", "x", "0"]  # as to_frame() names it
    empty = ddf.manymodel.predict(series_named(""), by="k", url=store_url, training_run_id="r1", run_id="se")
    assert empty.wait(show_progress=False) == RunStatus.SUCCESS
    assert list(empty.to_dask_dataframe().columns) == ["k", "x", "prediction"]
    lost = ddf.manymodel.predict(series_named("k"), by="k", url=store_url, training_run_id="r1", run_id="sk")
    assert lost.wait(show_progress=False) == RunStatus.FAILURE
    assert "named 'k', a by column" in lost.partition_details[1].error


def column_1_times_ten(data, model, ctx):
    return data.to_pandas()[1] * 10  # a Series named 1, as the input's column


def named_0_after_the_by_column(data, model, ctx):
    return data.to_pandas()[1].rename("0")


def with_a_text_1_beside_the_int_1(data, model, ctx):
    return data.to_pandas()[[1]].assign(**{"1": 5.0})


def test_output_columns_are_matched_as_parquet_names_them_by_text(client, store_url):
    """Input labels 0 and 1 (a frame of int labels): a Series named 1
    joined the frame as a column "1" beside its 1, and a frame with 1 and
    "1" was stored as is: the groups were DONE with a file of two columns
    "1", which to_dask_dataframe (and pd.read_parquet) refused after the
    run. A Series named "0" beside the by column 0 was DONE, and lost: the
    output's column "0" held the group's value."""
    pdf = pd.DataFrame({0: [1, 1, 2, 2], 1: [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=2)
    ddf.manymodel.train(fit_nothing, by=0, url=store_url, run_id="r1").wait(show_progress=False)
    replaced = ddf.manymodel.predict(column_1_times_ten, by=0, url=store_url, training_run_id="r1", run_id="s1")
    assert replaced.wait(show_progress=False) == RunStatus.SUCCESS
    out = replaced.to_dask_dataframe().compute()
    assert list(out.columns) == ["0", "1"]
    assert sorted(out["1"]) == [10.0, 20.0, 30.0, 40.0]  # it replaced the input's column
    lost = ddf.manymodel.predict(named_0_after_the_by_column, by=0, url=store_url, training_run_id="r1",
                                 run_id="s2")
    assert lost.wait(show_progress=False) == RunStatus.FAILURE
    assert "named '0', a by column" in lost.partition_details[1].error
    clash = ddf.manymodel.predict(with_a_text_1_beside_the_int_1, by=0, url=store_url, training_run_id="r1",
                                  run_id="s3")
    assert clash.wait(show_progress=False) == RunStatus.FAILURE
    assert "columns [1, '1'] are all named ['1'] in parquet" in clash.partition_details[2].error


def column_1_and_a_prediction(data, model, ctx):
    return data.to_pandas()[[1]].assign(p=2.0)


def test_a_meta_of_int_labels_names_the_outputs_columns_by_their_text(client, store_url):
    """meta={1: float} matched no column of the files (which parquet names
    "1"): the column was NaN in every row; a meta naming the by column 0 gave
    the output both 0 (all NaN) and "0"."""
    ddf = dd.from_pandas(pd.DataFrame({0: [1, 1, 2, 2], 1: [1.0, 2.0, 3.0, 4.0]}), npartitions=2)
    ddf.manymodel.train(fit_nothing, by=0, url=store_url, run_id="r1").wait(show_progress=False)
    meta = pd.DataFrame({0: pd.Series([], dtype="int64"), 1: pd.Series([], dtype="float64"),
                         "p": pd.Series([], dtype="float64")})
    inf = ddf.manymodel.predict(column_1_and_a_prediction, by=0, url=store_url, training_run_id="r1",
                                run_id="s1", meta=meta)
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    lazy = inf.to_dask_dataframe()
    out = lazy.compute()
    assert list(lazy.columns) == list(out.columns) == ["0", "1", "p"]
    assert sorted(out["1"]) == [1.0, 2.0, 3.0, 4.0] and sorted(out["0"]) == [1, 1, 2, 2]
    clash = pd.DataFrame({1: pd.Series([], dtype="float64"), "1": pd.Series([], dtype="float64")})
    with pytest.raises(InvalidArgumentError, match=r"meta's columns \[1, '1'\] are named by text"):
        ddf.manymodel.predict(column_1_and_a_prediction, by=0, url=store_url, training_run_id="r1", run_id="s2",
                              meta=clash)
    assert not os.path.exists(os.path.join(store_url, "s2"))


def dates_decimals_lists_and_dicts(data, model, ctx):
    import datetime
    import decimal

    import pyarrow as pa

    n = len(data.to_pandas())
    return pd.DataFrame({
        "day": [datetime.date(2020, 1, ctx.partition_id)] * n,
        "price": [decimal.Decimal("1.25")] * n,
        "pair": [[ctx.partition_id, 1]] * n,
        "info": [{"u": ctx.partition_id}] * n,
        "blob": [b"ab"] * n,
        "quantiles": pd.array([[0.1, 0.9]] * n, dtype=pd.ArrowDtype(pa.list_(pa.float64()))),
        "label": ["a"] * n,
    })


def test_output_columns_of_objects_keep_their_values(client, store_url):
    """Dask's convert-string turned every column of Python objects that
    to_dask_dataframe read into text: a date was "2020-01-01", a list
    "[1 1]", a dict "{'u': 1}"; a pyarrow list column raised TypeError: data
    type 'list<item: double>[pyarrow]' not understood (pandas' reading of its
    own metadata). They come back as pandas' ArrowDtype of their type."""
    import datetime
    import decimal

    ddf = dd.from_pandas(pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]}), npartitions=2)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(dates_decimals_lists_and_dicts, by="k", url=store_url, training_run_id="r1",
                                run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    for handle in (inf, ManyModelRun.restore_from("s1", store_url)):
        lazy = handle.to_dask_dataframe()
        out = lazy.compute()
        assert out.dtypes.to_dict() == lazy.dtypes.to_dict()
        row = out[out["k"] == 2].iloc[0]
        assert row["day"] == datetime.date(2020, 1, 2)
        assert row["price"] == decimal.Decimal("1.25")
        assert list(row["pair"]) == [2, 1] and row["info"] == {"u": 2} and row["blob"] == b"ab"
        assert list(row["quantiles"]) == [0.1, 0.9]
        assert row["label"] == "a" and pd.api.types.is_string_dtype(out["label"].dtype)


def rows_of_x(data, model, ctx):
    return data.to_pandas()[["x"]]


def test_a_by_column_of_dates_keeps_them_in_the_output(client, store_url):
    """Grouped by day (``ddf["when"].dt.date``, a column of Python dates),
    the output's by column was their text ("2020-01-01": Dask's
    convert-string turned the input's object dtype into strings), so that
    ``out[out.day == datetime.date(2020, 1, 1)]`` found nothing. It is
    pandas' date32 ArrowDtype, as the output's other date columns are."""
    import datetime

    import pyarrow as pa

    frame = pd.DataFrame({"when": pd.date_range("2020-01-01", periods=8, freq="12h"), "x": np.arange(8.0)})
    frame.loc[3, "when"] = pd.NaT  # a null group too
    ddf = dd.from_pandas(frame, npartitions=2)
    ddf = ddf.assign(day=ddf["when"].dt.date)
    assert ddf["day"].dtype == object
    ddf.manymodel.train(fit_nothing, by="day", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(rows_of_x, by="day", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    for handle in (inf, ManyModelRun.restore_from("s1", store_url)):
        lazy = handle.to_dask_dataframe()
        out = lazy.compute()
        assert lazy["day"].dtype == out["day"].dtype == pd.ArrowDtype(pa.date32())
        assert sorted(out.loc[out["day"] == datetime.date(2020, 1, 1), "x"]) == [0.0, 1.0]
        assert out.loc[out["day"].isna(), "x"].tolist() == [3.0]


def dates_and_lists_none_in_group_2(data, model, ctx):
    import datetime

    n = len(data.to_pandas())
    none = ctx.partition_id == 2
    return pd.DataFrame({"day": [None if none else datetime.date(2020, 1, 1)] * n,
                         "pair": [None if none else [1, 2]] * n})


def test_a_group_whose_dates_or_lists_are_all_none_reads_in_metas_type(client, store_url):
    """Its file holds arrow's null type: read alone, its columns were
    objects in a partition whose meta said dates and lists."""
    import pyarrow as pa

    ddf = dd.from_pandas(pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]}), npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(dates_and_lists_none_in_group_2, by="k", url=store_url, training_run_id="r1",
                                run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    lazy = inf.to_dask_dataframe()
    out = lazy.compute()
    assert lazy.dtypes.to_dict() == out.dtypes.to_dict()
    assert out["pair"].dtype == pd.ArrowDtype(pa.list_(pa.int64()))
    assert out["day"].isna().tolist() == [False, False, True, True]


def times_ten_after_sorting_by_t(data, model, ctx):
    df = data.to_pandas().sort_values("t")  # a time series, sorted as the docs advise
    return (df["t"] * 10).rename("pred")  # the sorted frame's labels


def times_ten_indexed_by_date(data, model, ctx):
    df = data.to_pandas()
    return pd.Series((df["t"] * 10).to_numpy(), index=pd.date_range("2024-01-01", periods=len(df)), name="pred")


def times_ten_indexed_by_day(data, model, ctx):
    df = data.to_pandas().set_index("day")  # each group's days 0..n-1, not in row order
    return (df["t"] * 10).rename("pred")


def test_a_returned_series_of_the_sorted_frame_is_aligned_on_its_index(client, store_url):
    """The docs say "as df.assign(name=series)", which aligns on the index;
    the values were taken by position, so a Series computed from the group's
    frame sorted by its time put each prediction beside another row
    (t=3 got 10). A Series whose index is not the frame's is taken in row
    order: also one indexed by a column (set_index("day")) whose values
    happen to be the frame's labels 0..n-1 in another order, which was
    aligned on them as if it were the frame's (t=3 got 20)."""
    pdf = pd.DataFrame({"k": [1, 2, 1, 1, 2, 1], "t": [3, 9, 1, 4, 8, 2], "day": [2, 1, 0, 3, 0, 1]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    for run_id, predict in [("s1", times_ten_after_sorting_by_t), ("s2", times_ten_indexed_by_date),
                            ("s3", times_ten_indexed_by_day)]:
        run = ddf.manymodel.predict(predict, by="k", url=store_url, training_run_id="r1", run_id=run_id)
        assert run.wait(show_progress=False) == RunStatus.SUCCESS, run.summary()
        out = run.to_dask_dataframe().compute()
        assert out["t"].tolist() == [3, 1, 4, 2, 9, 8]  # each group's rows as they came
        assert (out["pred"] == out["t"] * 10).all(), out


def start_the_training_again(url, data, model, ctx):
    # what another process's overwrite of the training run does first; each
    # group does it (the two groups may run at once, in two tasks), atomically
    path = os.path.join(url, "r1", "_run.json")
    with open(path) as f:
        manifest = json.load(f)
    with open(f"{path}.{ctx.partition_id}", "w") as f:
        json.dump({**manifest, "attempt": f"another-start-{ctx.partition_id}"}, f)
    os.replace(f"{path}.{ctx.partition_id}", path)
    return data.to_pandas().assign(pred=1.0)


def test_a_predict_never_mixes_the_models_of_two_trainings(client, store_url):
    """The training run, overwritten by another process while a predict ran,
    gave some groups the old models and some the new, and the predict said
    SUCCESS."""
    import functools

    pdf = pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    inf = ddf.manymodel.predict(functools.partial(start_the_training_again, store_url), by="k", url=store_url,
                                training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    for details in inf.partition_details.values():
        assert "training run 'r1' was started again (or deleted) while this predict ran" in details.error
    assert not any(name.startswith("part-") for _, _, names in os.walk(f"{store_url}/s1") for name in names)


def overwrite_the_training(url):
    """What another process's overwrite of the training run 'r1' does: its
    _run.json with a new attempt first, then the old groups' files go."""
    import shutil

    folder = os.path.join(url, "r1")
    with open(os.path.join(folder, "_run.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(folder, "_run.json.new"), "w") as f:
        json.dump({**manifest, "attempt": "the-overwrite"}, f)
    os.replace(os.path.join(folder, "_run.json.new"), os.path.join(folder, "_run.json"))
    for name in os.listdir(folder):
        if name.startswith("k="):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def overwrite_the_training_in_the_first_group(url, data, model, ctx):
    with open(os.path.join(url, "r1", "_run.json")) as f:
        if json.load(f)["attempt"] != "the-overwrite":
            overwrite_the_training(url)
    return data.to_pandas().assign(pred=1.0)


def overwrite_the_training_as_the_input_is_read(url, frame):
    overwrite_the_training(url)
    return frame


@pytest.mark.parametrize("when", ["while a group runs", "before the tasks start"])
def test_groups_whose_models_an_overwrite_took_say_the_training_started_again(client, store_url, when):
    """A predict reading a nightly training run that another process
    overwrote meanwhile: the groups that found their models gone said "model
    file ... is missing", or "group 2 has no model in training run 'r1' (it
    was never trained there)" when their task started after the overwrite's
    deletion, untrue of the training the predict began with; only the groups
    that found a model said the training was started again."""
    import functools

    pdf = pd.DataFrame({"k": [1, 1, 2, 2], "x": [1.0, 2.0, 3.0, 4.0]})
    ddf = dd.from_pandas(pdf, npartitions=1)
    ddf.manymodel.train(fit_nothing, by="k", url=store_url, run_id="r1").wait(show_progress=False)
    options = None
    if when == "while a group runs":  # the group after it, in the same task, finds its model file gone
        func = functools.partial(overwrite_the_training_in_the_first_group, store_url)
        options = ExecutionOptions(npartitions=1)
    else:  # the tasks read the training's statuses after the overwrite began
        func = predict_one
        ddf = ddf.map_partitions(functools.partial(overwrite_the_training_as_the_input_is_read, store_url), meta=pdf.iloc[:0])
    inf = ddf.manymodel.predict(func, by="k", url=store_url, training_run_id="r1", run_id="s1",
                                execution_options=options)
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    errors = {key: details.error for key, details in inf.partition_details.items()}
    assert set(errors) == {1, 2}
    for error in errors.values():
        assert "training run 'r1' was started again (or deleted) while this predict ran" in error, errors
    restored = ManyModelRun.restore_from("s1", store_url)
    assert all("was started again" in d.error for d in restored.partition_details.values())
    assert not any(name.startswith("part-") for _, _, names in os.walk(f"{store_url}/s1") for name in names)


def test_a_batch_whose_training_check_cannot_be_made_is_not_written(tmp_path):
    """A failed read of the training run's _run.json wrote the batch
    unchecked (its models could be of another start)."""
    from dask_manymodel import ExecutionOptions
    from dask_manymodel.engine import RunSpec, _PendingWrites, _record
    from dask_manymodel.store import RunStore

    class Unreadable(RunStore):
        def read_json(self, path):
            raise PermissionError(f"denied: {path}")

    store = RunStore(str(tmp_path), "s1")
    spec = RunSpec(kind="predict", run_id="s1", attempt="a", by=["k"], func=predict_one, store=store,
                   serde=PickleSerde(), options=ExecutionOptions(), cancel_event="c", progress_topic="p",
                   training_store=Unreadable(str(tmp_path), "r1"), training_attempt="t")
    entries = [(_record(spec, (1,), "k=1", status="DONE", output_rows=2), {store.path("k=1", "part-0.parquet"): b"x"}),
               (_record(spec, (2,), "k=2", status="FAILED", error="its own"), {})]
    kept = _PendingWrites(spec, heartbeat=None)._unless_training_changed(entries)
    assert kept[0][0]["status"] == "INTERNAL_ERROR" and kept[0][1] == {}
    assert "could not read training run 'r1''s _run.json" in kept[0][0]["error"] and "denied" in kept[0][0]["error"]
    assert kept[1][0]["error"] == "its own"


def _group_frames_case(name):
    """(by, layout, [(key, the frame a group stored)]) of one shape of output."""
    utc = "Europe/Paris"
    same = lambda i: pd.DataFrame({  # noqa: E731  one schema in every group
        "x": np.arange(3, dtype="int64") + i, "y": [0.5, np.nan, 1.5],
        "s": ["a", None, f"g{i}"], "t": pd.array(["u", pd.NA, "v"], dtype="string[pyarrow]"),
        "n": pd.array([1, None, 3], dtype="Int64"), "b": pd.array([True, None, False], dtype="boolean"),
        "when": pd.date_range("2026-01-01", periods=3, tz=utc), "gap": pd.to_timedelta([1, 2, 3], unit="s"),
        "lists": [[1, 2], [], [i]], 0: [1, 2, 3],
    })
    if name == "one schema":
        groups = [((i,), same(i)) for i in range(5)]
        return ["store"], _with_group_columns(same(0).iloc[:0], ["store"], [np.dtype("int64")]), groups
    if name == "dtypes differ":
        groups = [((1,), pd.DataFrame({"x": [1, 2], "z": ["a", "b"]})), ((2,), pd.DataFrame({"x": [0.5]})),
                  ((3,), pd.DataFrame({"x": [3], "z": [None]})), ((4,), pd.DataFrame({"x": ["text"]}))]
        return ["store"], _with_group_columns(groups[0][1].iloc[:0], ["store"], [np.dtype("int64")]), groups
    if name == "batches differ":  # with two groups a batch: one at once, one group by group, one at once
        frames = [pd.DataFrame({"x": [1, 2]}), pd.DataFrame({"x": [3]}), pd.DataFrame({"x": [0.5]}),
                  pd.DataFrame({"x": ["text"]}), pd.DataFrame({"x": [4]}), pd.DataFrame({"x": [5, 6]})]
        groups = [((i,), frame) for i, frame in enumerate(frames)]
        return ["store"], _with_group_columns(frames[0].iloc[:0], ["store"], [np.dtype("int64")]), groups
    if name == "categoricals":
        groups = [((i,), pd.DataFrame({"c": pd.Categorical(["a", f"c{i}"]), "x": [1.0, 2.0]})) for i in range(3)]
        return ["store"], _with_group_columns(groups[0][1].iloc[:0], ["store"], [np.dtype("int64")]), groups
    if name == "null and odd keys":
        by = ["store", "region", "day", "flag"]
        keys = [(1, "north", pd.Timestamp("2026-01-01", tz=utc), True), (np.nan, None, pd.NaT, None),
                (2, "south", pd.Timestamp("2026-01-02", tz=utc), False)]
        groups = [(key, pd.DataFrame({"x": [1.0, 2.0]})) for key in keys]
        layout = _with_group_columns(pd.DataFrame({"x": [1.0], "never": [1]}).iloc[:0], by, [
            np.dtype("int64"), pd.StringDtype("pyarrow"), pd.DatetimeTZDtype(tz=utc), np.dtype("bool")])
        return by, layout, groups
    if name == "categorical keys":
        dtype = pd.CategoricalDtype(["b", "a"])
        groups = [(("a",), pd.DataFrame({"x": [1.0]})), (("b",), pd.DataFrame({"x": [2.0, 3.0]}))]
        return ["store"], _with_group_columns(pd.DataFrame({"x": [1.0]}).iloc[:0], ["store"], [dtype]), groups
    raise AssertionError(name)


@pytest.mark.parametrize("batch_files", [None, 2])
@pytest.mark.parametrize("case", ["one schema", "dtypes differ", "batches differ", "categoricals",
                                  "null and odd keys", "categorical keys"])
def test_a_partition_of_output_reads_as_each_group_read_alone_and_concatenated(case, batch_files, monkeypatch):
    # to_dask_dataframe reads a partition's files a batch at a time, and
    # converts a batch at once when its files share a schema (batch_files=2:
    # several batches); it must give what reading each group's file with
    # pandas, laying it out and concatenating gives
    import fsspec
    import pyarrow.parquet as pq

    from dask_manymodel import run as run_module
    from dask_manymodel.run import _arrow_to_pandas, _as_layout, _columns_of_file, _one_plain_schema, _read_output

    def read_frame(path):
        with fs.open(path, "rb") as f:
            return _arrow_to_pandas(pq.ParquetFile(f).read(use_pandas_metadata=True))

    if batch_files is not None:
        monkeypatch.setattr(run_module, "_BATCH_FILES", batch_files)

    by, layout, groups = _group_frames_case(case)
    fs = fsspec.filesystem("memory")
    items = []
    for i, (key, frame) in enumerate(groups):
        path = f"/read-output-{case.replace(' ', '-')}/g[{i}]/part-0.parquet"  # a glob character too
        with fs.open(path, "wb") as f:
            pq.write_table(pyarrow.Table.from_pandas(frame, preserve_index=False), f)
        items.append((path, key))
    assert _one_plain_schema([pq.read_schema(fs.open(path)) for path, _ in items]) == (
        case not in ("dtypes differ", "batches differ", "categoricals"))
    # each file as the meta's is read: pd.read_parquet's conversion, with
    # lists (and other non-text objects) as pandas' ArrowDtype
    expected = pd.concat([_as_layout(read_frame(path), by, key, layout) for path, key in items],
                         ignore_index=True)
    # the schema to_dask_dataframe reads from a file's footer: the columns
    # and dtypes of the whole file read (a categorical has no categories yet)
    first = read_frame(items[0][0]).iloc[:0]
    footer = _columns_of_file(fs, items[0][0])
    assert list(footer.columns) == list(first.columns) and len(footer) == 0
    for column in first.columns:
        if isinstance(first[column].dtype, pd.CategoricalDtype):
            assert isinstance(footer[column].dtype, pd.CategoricalDtype)
        else:
            assert footer[column].dtype == first[column].dtype, column
    if case == "one schema":
        assert expected["lists"].dtype == pd.ArrowDtype(pyarrow.list_(pyarrow.int64()))
    pd.testing.assert_frame_equal(_read_output(items, fs, by, layout), expected)
    fs.rm_file(items[1][0])
    with pytest.raises(FileNotFoundError, match=r"g\[1\]/part-0.parquet is missing"):
        _read_output(items, fs, by, layout)


class _DeniedMemoryFileSystem(fsspec.implementations.memory.MemoryFileSystem):
    """memory:// whose group 1 cannot be read (as S3's access denied)."""

    def cat_file(self, path, *args, **kwargs):
        if "/g1/" in path:
            raise PermissionError(f"Access Denied: {path}")
        return super().cat_file(path, *args, **kwargs)


def test_an_output_file_that_cannot_be_read_says_why():
    """Every read error said the file was missing (deleted since the run ended)."""
    import pyarrow.parquet as pq

    from dask_manymodel.run import _read_output

    fs = _DeniedMemoryFileSystem(skip_instance_cache=True)
    items = []
    for i in range(3):
        path = f"/read-denied/g{i}/part-0.parquet"
        with fs.open(path, "wb") as f:
            pq.write_table(pyarrow.table({"x": [1.0]}), f)
        items.append((path, (i,)))
    layout = _with_group_columns(pd.DataFrame({"x": [1.0]}).iloc[:0], ["store"], [np.dtype("int64")])
    with pytest.raises(PermissionError, match="Access Denied: /read-denied/g1/part-0.parquet"):
        _read_output(items, fs, ["store"], layout)


def changes_its_rows_and_returns_a_series(data, model, ctx):
    df = data.to_pandas()
    df["x"] = (df["x"] - df["x"].mean()) / 10
    df["scratch"] = 1.0
    if ctx.partition_id == 2:
        return pd.DataFrame({"mixed": [1, "a"] + [None] * (len(df) - 2)})
    return np.polyval(model, df["x"].to_numpy())


def test_a_returned_series_sits_beside_the_input_as_it_was(trained, ddf, store_url):
    """The output took the frame the function had changed in place (its
    scratch column, x standardised); a frame pyarrow cannot store was an
    INTERNAL_ERROR, not the group's FAILED."""
    inf = ddf.manymodel.predict(changes_its_rows_and_returns_a_series, by="store", url=store_url,
                                training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    failed = inf.partition_details[2]
    assert failed.status == "FAILED" and "the returned frame cannot be stored as parquet" in failed.error
    out = inf.to_dask_dataframe().compute()
    assert "scratch" not in out.columns
    expected = ddf.compute()
    expected = expected[expected["store"] != 2]
    assert sorted(out["x"]) == sorted(expected["x"])


def only_the_by_column(data, model, ctx):
    return data.to_pandas()[["store"]]


def test_a_frame_of_only_by_columns_fails_its_group_instead_of_losing_its_rows(trained, ddf, store_url):
    """Its parquet file held no column and so no row: output_rows said 40, the output had none."""
    inf = ddf.manymodel.predict(only_the_by_column, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.FAILURE
    assert "no column besides the by columns ['store']" in inf.partition_details[0].error


def held_at_group_3(gate, data, ctx):
    from .conftest import hold_until_released

    if ctx.partition_id == 3:
        hold_until_released(gate)
    return fit_line(data, ctx)


def test_a_predict_with_a_training_still_in_progress_is_refused(client, ddf, store_url, tmp_path):
    """It was accepted, and the groups not trained yet failed, depending on
    timing, saying they were never trained there."""
    import functools

    gate = str(tmp_path / "gate")
    training = ddf.manymodel.train(functools.partial(held_at_group_3, gate), by="store", url=store_url,
                                   run_id="r1")
    try:
        with pytest.raises(InvalidArgumentError, match="training run 'r1' at .* is still in progress: predict "
                           "once it has ended"):
            ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
        assert not os.path.exists(os.path.join(store_url, "s1"))
    finally:
        open(gate, "w").close()
    assert training.wait(show_progress=False) == RunStatus.SUCCESS
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS


def test_a_model_whose_class_the_workers_lack_says_to_install_it_there(trained, ddf, store_url, tmp_path, monkeypatch):
    # group 3's model is of a class from a module only the client has (the
    # workers started before it existed): a cluster image without it
    name = f"model_classes_only_here_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("class Line:\n    def __init__(self, coef):\n        self.coef = coef\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    monkeypatch.setitem(sys.modules, name, module)
    with open(os.path.join(store_url, "r1", "store=3", "model.pkl"), "wb") as f:
        f.write(pickle.dumps(module.Line([1.0, 0.0])))
    inf = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="s1")
    assert inf.wait(show_progress=False) == RunStatus.PARTIAL_FAILURE
    error = inf.partition_details[3].error
    assert f"store=3/model.pkl: ModuleNotFoundError: No module named '{name}'; the workers need every module" in error
    assert "install it there, or send a single file with client.upload_file(path)" in error
    assert inf.partition_details[4].status == "DONE"


def _keep_rows(data, ctx):
    return len(data.to_pandas())


def _rows_and_model(data, model, ctx):
    return data.to_pandas().assign(model=model)


def _as_stored_by_an_earlier_version(folder: str, key: str) -> str:
    """Move the group ``key`` (of a run by ``k``) to the folder an earlier
    version named, cut within a letter; returns the folder of today."""
    from dask_manymodel.store import group_path

    new, old = (group_path(["k"], (key,), cut_within_characters=cut) for cut in (False, True))
    assert new != old
    os.rename(f"{folder}/{new}", f"{folder}/{old}")
    for name in ("_groups.json", f"{old}/_partition.json"):
        with open(f"{folder}/{name}") as f:
            text = f.read()
        with open(f"{folder}/{name}", "w") as f:
            f.write(text.replace(json.dumps(new), json.dumps(old)))
    return new


def test_long_non_ascii_values_leave_output_that_hive_readers_read(client, tmp_path):
    """A value of 34 Cyrillic letters is shortened, and its folder name was cut
    within a letter: pd.read_parquet (pyarrow) of the predict output refused
    the whole folder ("Partition segment was not valid UTF-8"). A run that an
    earlier version stored so still gives its models, and a resume moves the
    group to its folder of today."""
    url = str(tmp_path / "models")
    long_key = "Москва, улица Тверская, дом " + "Ж" * 10
    pdf = pd.DataFrame({"k": [long_key] * 3 + ["short"] * 2, "x": np.arange(5.0)})
    frame = dd.from_pandas(pdf, npartitions=2)
    run = frame.manymodel.train(_keep_rows, by="k", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    inf = frame.manymodel.predict(_rows_and_model, by="k", url=url, run_id="p1", training_run_id="r1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS
    read = pd.read_parquet(f"{url}/p1")
    assert sorted(read["model"]) == [2, 2, 3, 3, 3]
    shortened = set(read["k"].astype(str)) - {"short"}
    assert len(shortened) == 1 and long_key.startswith(shortened.pop().split("~")[0])  # prefix and hash

    new = _as_stored_by_an_earlier_version(f"{url}/r1", long_key)
    stored = ManyModelRun.restore_from("r1", url)
    assert stored.get_model(long_key) == 3
    again = frame.manymodel.predict(_rows_and_model, by="k", url=url, run_id="p2", training_run_id="r1")
    assert again.wait(show_progress=False) == RunStatus.SUCCESS
    assert sorted(again.to_dask_dataframe().compute()["model"]) == [2, 2, 3, 3, 3]
    resumed = frame.manymodel.train(_keep_rows, by="k", url=url, run_id="r1", on_existing_artifacts="resume")
    assert resumed.wait(show_progress=False) == RunStatus.SUCCESS
    assert sorted(resumed.summary()["partition_id"]) == sorted([long_key, "short"])
    assert resumed.get_model(long_key) == 3
    assert sorted(os.listdir(f"{url}/r1")) == sorted(["_groups.json", "_run.json", new, "k=short"])


def _keep_rows_and_upload(data, ctx):
    ctx.upload({"rows": len(data.to_pandas())}, "extra.pkl")
    return len(data.to_pandas())


def _rows_from_the_training_upload(data, model, ctx):
    return data.to_pandas().assign(model=ctx.download("extra.pkl", run_id="r1")["rows"])


def test_ctx_download_finds_a_long_values_file_in_a_run_of_an_earlier_version(client, tmp_path):
    """ctx.download(name, run_id=...) of a training run that an earlier
    version stored, whose long value's folder was cut within a letter: the
    file is found there, as get_model and predict find its model (it was a
    FileNotFoundError of the folder of today)."""
    url = str(tmp_path / "models")
    long_key = "Москва, улица Тверская, дом " + "Ж" * 10
    frame = dd.from_pandas(pd.DataFrame({"k": [long_key] * 3 + ["short"] * 2, "x": np.arange(5.0)}), npartitions=2)
    run = frame.manymodel.train(_keep_rows_and_upload, by="k", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    _as_stored_by_an_earlier_version(f"{url}/r1", long_key)
    inf = frame.manymodel.predict(_rows_from_the_training_upload, by="k", url=url, run_id="p1", training_run_id="r1")
    assert inf.wait(show_progress=False) == RunStatus.SUCCESS, inf.summary()["error"].tolist()
    assert sorted(inf.to_dask_dataframe().compute()["model"]) == [2, 2, 3, 3, 3]


def test_a_refused_resume_of_a_run_of_an_earlier_version_removes_no_folder(client, tmp_path, monkeypatch):
    """A resume moves a long value's group from the folder an earlier version
    named to its folder of today, running it again; one refused before its
    manifest is written ("nothing was written": here values that differ only
    by case on a store that ignores case) removed the old folder, and its
    model, all the same."""
    from dask_manymodel import store as store_module

    url = str(tmp_path / "models")
    long_key = "Москва, улица Тверская, дом " + "Ж" * 10
    pdf = pd.DataFrame({"k": [long_key] * 3 + ["short"] * 2, "x": np.arange(5.0)})
    run = dd.from_pandas(pdf, npartitions=2).manymodel.train(_keep_rows, by="k", url=url, run_id="r1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    _as_stored_by_an_earlier_version(f"{url}/r1", long_key)
    before = sorted(os.listdir(f"{url}/r1"))
    monkeypatch.setattr(store_module.RunStore, "ignores_case", lambda self: True)
    clashing = dd.from_pandas(pd.concat([pdf, pdf.iloc[3:].assign(k="Short")]), npartitions=2)
    with pytest.raises(InvalidArgumentError, match="differ only by case"):
        clashing.manymodel.train(_keep_rows, by="k", url=url, run_id="r1", on_existing_artifacts="resume")
    assert sorted(os.listdir(f"{url}/r1")) == before
    assert ManyModelRun.restore_from("r1", url).get_model(long_key) == 3


def a_series_of_one_row(data, model, ctx):
    return pd.Series([1.0])


def two_values_a_row(data, model, ctx):
    return np.zeros((len(data), 2))


@pytest.mark.parametrize("infer, says", [
    (a_series_of_one_row, r"the returned Series has 1 rows, the group 40"),
    (two_values_a_row, r"the returned array has shape \(40, 2\); return one value per row \(40,\)"),
])
def test_an_output_not_one_value_a_row_fails_the_group_and_says_its_shape(trained, ddf, store_url, infer, says):
    run = ddf.manymodel.predict(infer, by="store", url=store_url, training_run_id="r1", run_id="p1")
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    assert set(run.summary()["status"]) == {"FAILED"}
    assert all(re.search(says, d.error) for d in run.partition_details.values())
    assert not any(name.startswith("part-") for _, _, files in os.walk(os.path.join(store_url, "p1")) for name in files)


def test_a_train_run_has_no_output_and_a_predict_run_no_models(trained, ddf, store_url):
    run = ddf.manymodel.predict(predict_frame, by="store", url=store_url, training_run_id="r1", run_id="p1")
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    with pytest.raises(InvalidArgumentError, match="run 'p1' is a predict run; it has no models"):
        run.get_model(0)
    with pytest.raises(InvalidArgumentError, match="run 'r1' is a train run; only predict runs have output"):
        trained.to_dask_dataframe()
