"""DataConnector -> PyTorch: batches, dtypes, NaN, strings, workers, seeds."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from dask_manymodel import DataConnector, InvalidArgumentError

torch = pytest.importorskip("torch")
DataLoader = torch.utils.data.DataLoader


@pytest.fixture
def frame():
    n = 103
    return pd.DataFrame(
        {
            "f64": np.arange(n, dtype="float64"),
            "f32": np.arange(n, dtype="float32"),
            "i64": np.arange(n, dtype="int64"),
            "flag": np.arange(n) % 3 == 0,
            "nan": np.where(np.arange(n) % 5 == 0, np.nan, 1.0),
            "name": pd.array([f"row{i}" if i % 7 else None for i in range(n)], dtype="string"),
        }
    )


def rows_of(batches, column="i64"):
    return [v for b in batches for v in b[column].tolist()]


def test_batches_keep_dtypes_nan_and_strings(frame):
    batches = list(DataConnector.from_pandas(frame).to_torch_dataset(batch_size=10))
    assert len(batches) == 10  # 103 rows, the short last batch dropped
    first = batches[0]
    assert first["f64"].dtype == torch.float64 and first["f32"].dtype == torch.float32
    assert first["i64"].dtype == torch.int64 and first["flag"].dtype == torch.bool
    assert all(v.shape == (10,) for k, v in first.items() if k != "name")
    assert torch.isnan(first["nan"][0]) and first["nan"][1] == 1.0
    assert first["name"][:2] == [None, "row1"] and isinstance(first["name"], list)


def test_drop_last_false_keeps_the_short_batch(frame):
    batches = list(DataConnector.from_pandas(frame).to_torch_dataset(batch_size=10, drop_last_batch=False))
    assert [len(b["i64"]) for b in batches] == [10] * 10 + [3]
    assert rows_of(batches) == list(range(103))


def test_single_rows_without_batch_size(frame):
    rows = list(DataConnector.from_pandas(frame.head(3)).to_torch_dataset())
    assert len(rows) == 3 and rows[1]["i64"].item() == 1 and rows[1]["name"] == "row1"


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [False, True])
def test_two_loader_workers_cover_every_row_once(frame, shuffle, drop_last):
    ds = DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, shuffle=shuffle, drop_last_batch=drop_last)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    rows = rows_of(batches)
    assert len(rows) == len(set(rows))  # no row twice
    if drop_last:
        assert len(batches) == 12 and len(rows) == 96  # 12 full batches of 8
    else:
        assert sorted(rows) == list(range(103))
    assert (rows == sorted(rows)) is (not shuffle)


def test_loader_workers_started_with_spawn_get_the_dataset(frame, tmp_path):
    """DataLoader workers started with spawn (Dask's workers start their
    children so; macOS; Python 3.14's forkserver) pickle the dataset: the
    class was local to a function ("Can't pickle local object")."""
    from dask_manymodel import FileSet

    made = FileSet.make(str(tmp_path), "fs", frame[["i64", "f64"]])
    for ds in (DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, shuffle=True, seed=1),
               made.to_torch_dataset(batch_size=8, drop_last_batch=False)):
        loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn")
        rows = rows_of(list(loader))
        assert len(rows) == len(set(rows)) and set(rows) <= set(range(103)) and len(rows) >= 96


def test_shuffle_changes_every_epoch_and_seed_reproduces(frame):
    data = DataConnector.from_pandas(frame)
    ds = data.to_torch_dataset(batch_size=10, shuffle=True, seed=42, drop_last_batch=False)
    epoch1, epoch2 = rows_of(ds), rows_of(ds)
    assert epoch1 != epoch2 and sorted(epoch1) == sorted(epoch2)
    again = data.to_torch_dataset(batch_size=10, shuffle=True, seed=42, drop_last_batch=False)
    assert rows_of(again) == epoch1 and rows_of(again) == epoch2
    other = data.to_torch_dataset(batch_size=10, shuffle=True, seed=7)
    assert rows_of(other) != epoch1


def test_seeded_loader_with_workers_is_reproducible(frame):
    data = DataConnector.from_pandas(frame)

    def one_epoch():
        ds = data.to_torch_dataset(batch_size=10, shuffle=True, seed=1)
        loader = DataLoader(ds, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0))
        return rows_of(loader)

    assert one_epoch() == one_epoch()


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8", True])
def test_bad_batch_size(frame, bad):
    with pytest.raises(InvalidArgumentError, match="batch_size must be a positive int"):
        DataConnector.from_pandas(frame).to_torch_dataset(batch_size=bad)


def test_datapipe_is_the_same_data(frame):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # where torch dropped datapipes
        pipe = DataConnector.from_pandas(frame).to_torch_datapipe(batch_size=10, drop_last_batch=False)
    assert rows_of(pipe) == list(range(103))


@pytest.mark.parametrize(
    "values, dtype, expected",
    [
        (pd.array([1.5, None], dtype="Float32"), torch.float32, [1.5, None]),  # floats keep their width
        (pd.array([1.5, None], dtype="float32[pyarrow]"), torch.float32, [1.5, None]),
        (pd.array([2**53 + 1, 7], dtype="Int64"), torch.int64, [2**53 + 1, 7]),  # no missing: stays int
        (pd.array([3, None], dtype="Int64"), torch.float64, [3.0, None]),
        (pd.array([3, None], dtype="UInt8"), torch.float64, [3.0, None]),
        (pd.array([True, False], dtype="boolean"), torch.bool, [True, False]),
        (pd.array([True, None], dtype="boolean"), torch.float64, [1.0, None]),
    ],
)
def test_nullable_columns(values, dtype, expected):
    batch = next(iter(DataConnector.from_pandas(pd.DataFrame({"c": values})).to_torch_dataset(batch_size=2)))
    assert batch["c"].dtype == dtype
    assert [None if v != v else v for v in batch["c"].tolist()] == expected  # NaN as None


def edit_in_place_each_epoch(dataset, column):
    """Two epochs; every batch is changed in place, as a training step may do."""
    epochs = []
    for _ in range(2):
        seen = []
        for batch in dataset:
            seen += batch[column].reshape(-1).tolist()  # single rows are 0-d
            batch[column] -= 1000
        epochs.append(seen)
    return epochs


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("batch_size", [None, 4])
def test_editing_a_batch_in_place_does_not_change_later_epochs(frame, shuffle, batch_size):
    data = DataConnector.from_pandas(frame)
    options = dict(batch_size=batch_size, shuffle=shuffle, drop_last_batch=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # where torch dropped datapipes
        pipe = data.to_torch_datapipe(**options)
    for ds in (data.to_torch_dataset(**options), pipe):
        for epoch in edit_in_place_each_epoch(ds, "f64"):
            assert sorted(epoch) == list(range(103))


def test_set_epoch_makes_the_order_a_function_of_seed_and_epoch(frame):
    data = DataConnector.from_pandas(frame)
    ds = data.to_torch_dataset(batch_size=8, shuffle=True, seed=7)
    run = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        run.append(rows_of(ds))
    assert run[0] != run[1] != run[2]
    resumed = data.to_torch_dataset(batch_size=8, shuffle=True, seed=7)  # from a checkpoint at epoch 2
    resumed.set_epoch(2)
    assert rows_of(resumed) == run[2]
    ds.set_epoch(1)
    assert rows_of(ds) == run[1] and rows_of(ds) == run[1]  # set_epoch(1) again, and iterating again


@pytest.mark.parametrize("bad", [-1, 1.7, "2", None, True])
def test_set_epoch_refuses_what_is_no_epoch_number_at_once(frame, bad):
    # -1 failed only at the next iteration, in numpy ("expected non-negative
    # integer"); 1.7 was taken as 1; "a" and None raised int()'s own errors
    ds = DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, shuffle=True, seed=7)
    with pytest.raises(InvalidArgumentError) as info:
        ds.set_epoch(bad)
    assert str(info.value) == f"set_epoch() takes the epoch's number, an int >= 0, got {bad!r}"
    ds.set_epoch(np.int64(2))
    assert len(rows_of(ds)) == 96


def test_set_epoch_with_loader_workers_covers_the_epoch_once(frame):
    data = DataConnector.from_pandas(frame)
    direct = data.to_torch_dataset(batch_size=8, shuffle=True, seed=7)
    direct.set_epoch(2)
    ds = data.to_torch_dataset(batch_size=8, shuffle=True, seed=7)
    rows_of(ds)  # an epoch already run here must not matter
    ds.set_epoch(2)
    batches = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(b["i64"].tolist() for b in batches) == sorted(b["i64"].tolist() for b in direct)


def test_loader_workers_without_set_epoch_change_the_order_every_epoch(frame):
    ds = DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, shuffle=True, seed=7, drop_last_batch=False)
    loader = DataLoader(ds, batch_size=None, num_workers=2, generator=torch.Generator().manual_seed(0))
    first, second = rows_of(loader), rows_of(loader)
    assert first != second and sorted(first) == sorted(second)


def test_single_rows_keep_the_column_dtype():
    df = pd.DataFrame(
        {
            "f64": [0.123456789012345],
            "f16": np.array([1.5], "float16"),
            "i8": np.array([-3], "int8"),
            "u8": np.array([7], "uint8"),
            "u64": np.array([2**64 - 1], "uint64"),
            "flag": [True],
        }
    )
    row = next(iter(DataConnector.from_pandas(df).to_torch_dataset()))  # batch_size=None
    expected = {"f64": torch.float64, "f16": torch.float16, "i8": torch.int8, "u8": torch.uint8,
                "u64": torch.uint64, "flag": torch.bool}
    assert {name: t.dtype for name, t in row.items()} == expected
    assert all(t.shape == () for t in row.values())
    assert row["f64"].item() == 0.123456789012345 and row["i8"].item() == -3 and row["u64"].item() == 2**64 - 1


def test_datetimes_and_timedeltas_are_int64_nanoseconds_whatever_their_unit():
    when = pd.to_datetime(["2020-01-01 00:00", "2020-01-02 00:00"])
    ns = [1577836800 * 10**9, 1577923200 * 10**9]
    df = pd.DataFrame(
        {
            "us": when.as_unit("us"),
            "s": when.as_unit("s"),
            "paris": when.tz_localize("Europe/Paris"),  # one hour ahead of UTC
            "arrow": pd.Series(when).astype("timestamp[ms][pyarrow]"),
            "span": pd.to_timedelta([1, 2], unit="s").as_unit("us"),
        }
    )
    batch = next(iter(DataConnector.from_pandas(df).to_torch_dataset(batch_size=2)))
    assert {name: t.dtype for name, t in batch.items()} == dict.fromkeys(df.columns, torch.int64)
    assert batch["us"].tolist() == batch["s"].tolist() == batch["arrow"].tolist() == ns
    assert batch["paris"].tolist() == [v - 3600 * 10**9 for v in ns]  # since the epoch in UTC
    assert batch["span"].tolist() == [10**9, 2 * 10**9]


def test_pyarrow_dates_are_int64_nanoseconds_of_their_midnight():
    """read_parquet(dtype_backend="pyarrow") reads a parquet date as
    date32[day][pyarrow]: it raised NotImplementedError: as_unit not
    implemented for date32[day]."""
    import datetime

    import pyarrow as pa

    days = pd.array([datetime.date(2020, 1, 1), None], dtype=pd.ArrowDtype(pa.date32()))
    batch = next(iter(DataConnector.from_pandas(pd.DataFrame({"day": days})).to_torch_dataset(batch_size=2)))
    assert batch["day"].dtype == torch.int64
    assert batch["day"].tolist() == [1577836800 * 10**9, -(2**63)]  # a missing one as NaT


@pytest.mark.parametrize(
    "values", [pd.period_range("2020-01", periods=2, freq="M"), pd.interval_range(0, 2)], ids=["period", "interval"]
)
def test_a_column_with_no_numeric_form_names_itself_and_the_way_out(values):
    """It raised TypeError: float() argument must be a string or a real
    number, not 'Period', naming no column."""
    df = pd.DataFrame({"x": [1.0, 2.0], "when": values})
    with pytest.raises(InvalidArgumentError, match=r"column 'when' \((period|interval).*no numeric form.*convert it"):
        DataConnector.from_pandas(df).to_torch_dataset(batch_size=1)


def test_datetimes_outside_the_nanosecond_range_name_the_column():
    df = pd.DataFrame({"far": np.array(["3000-01-01"], "datetime64[s]")})
    with pytest.raises(InvalidArgumentError, match="column 'far'.*nanosecond range"):
        DataConnector.from_pandas(df).to_torch_dataset(batch_size=1)


@pytest.mark.parametrize(
    "columns, message",
    [([0, "0"], r"columns 0 and '0' both become the key '0'.*rename"), (["a", "a"], r"column 'a' appears twice.*rename")],
)
def test_column_names_that_share_a_key_are_refused(columns, message):
    df = pd.DataFrame([[1.0, 2.0]], columns=columns)
    with pytest.raises(InvalidArgumentError, match=message):
        DataConnector.from_pandas(df).to_torch_dataset(batch_size=1)


@pytest.mark.parametrize("bad", [-1, 2.5, True, "1"])
def test_bad_seed_is_refused_up_front(frame, bad):
    with pytest.raises(InvalidArgumentError, match="seed must be a non-negative int or None"):
        DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, shuffle=True, seed=bad)


@pytest.mark.parametrize("flag", ["shuffle", "drop_last_batch"])
@pytest.mark.parametrize("bad", ["no", "False", None, 0, {"anon": True}])
def test_a_flag_that_is_not_true_or_false_is_refused(frame, flag, bad):
    # shuffle="no" (truthy) shuffled; a flag read from a config as text or
    # left None said nothing
    with pytest.raises(InvalidArgumentError) as info:
        DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, **{flag: bad})
    assert str(info.value).startswith(f"{flag} must be True or False, got {bad!r}")
    assert list(DataConnector.from_pandas(frame).to_torch_dataset(batch_size=8, **{flag: np.bool_(False)}))


def test_numpy_ints_are_accepted_for_seed_and_limit(frame):
    data = DataConnector.from_pandas(frame)
    seeded = data.to_torch_dataset(batch_size=8, shuffle=True, seed=np.int64(3))
    assert rows_of(seeded) == rows_of(data.to_torch_dataset(batch_size=8, shuffle=True, seed=3))
    assert len(data.to_pandas(limit=np.int64(2))) == 2


def train_with_loader_workers(data, ctx):
    ds = data.to_torch_dataset(batch_size=8, shuffle=True, seed=3)
    return sorted(v for b in DataLoader(ds, batch_size=None, num_workers=2) for v in b["x"].tolist())


def test_loader_workers_inside_a_run_on_non_daemonic_workers(tmp_path):
    """The way docs/connectors.md gives to DataLoader workers inside a run;
    it failed on every group: Dask's workers start their children with spawn."""
    import logging

    import dask
    import dask.dataframe as dd
    import distributed

    import dask_manymodel  # noqa: F401
    from dask_manymodel import RunStatus

    pdf = pd.DataFrame({"g": np.repeat([0, 1], 32), "x": np.arange(64.0)})
    with dask.config.set({"distributed.worker.daemon": False}), distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster, distributed.Client(cluster):
        run = dd.from_pandas(pdf, npartitions=1).manymodel.train(
            train_with_loader_workers, by="g", url=str(tmp_path), run_id="r1"
        )
        assert run.wait(timeout=240, show_progress=False) == RunStatus.SUCCESS, run.summary()["error"].tolist()
        assert run.get_model(1) == list(np.arange(32.0, 64.0))
