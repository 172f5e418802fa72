"""Code moved over from Snowflake ML, written with its names, runs here.

Each test uses a name or call shape from Snowflake ML's documentation
(docs/snowflake.md lists them with their counterparts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_manymodel import (
    DPF,
    DataConnector,
    ExecutionOptions,
    FileSet,
    FileSetDeletedError,
    InvalidArgumentError,
    ManyModelRun,
    ManyModelTraining,
    PartitionStatus,
    RunStatus,
)


def sales() -> pd.DataFrame:
    return pd.DataFrame({"region": ["North", "North", "South"], "amount": [1.0, 2.0, 5.0]})


def snowflake_style_summary(data_connector, context):
    # as in Snowflake ML's "Process data with custom logic across partitions"
    df = data_connector.to_pandas()
    summary = {"region": context.partition_id, "total_sales": float(df["amount"].sum())}
    context.upload_to_stage(summary, "sales_summary.json",
                            write_function=lambda obj, path: Path(path).write_text(json.dumps(obj)))
    context.upload_to_stage(len(df), "count.pkl")
    assert context.download_from_stage("count.pkl") == len(df)
    assert context.download_from_stage(
        "sales_summary.json", read_function=lambda path: json.loads(Path(path).read_text())
    ) == summary


def test_context_upload_to_stage_and_download_from_stage(thread_client):
    run = DPF(snowflake_style_summary, "memory://sf-context").run(
        partition_by="region", dataframe=sales(), run_id="regional"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, {
        k: d.error for k, d in run.partition_details.items()
    }
    north = run.partition_details["North"].artifacts
    assert sorted(north.list()) == ["count.pkl", "sales_summary.json"]
    assert north.get("sales_summary.json", read_function=lambda p: json.loads(Path(p).read_text())) == {
        "region": "North", "total_sales": 3.0,
    }


def download_from_a_snowflake_stage_path(data_connector, context):
    context.download_from_stage("model.pkl", stage_path="@db.schema.stage/training_run/partition_0")


def test_download_from_stage_with_a_stage_path_says_what_to_use_instead(thread_client):
    run = DPF(download_from_a_snowflake_stage_path, "memory://sf-stage-path").run(
        partition_by="region", dataframe=sales(), run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.FAILURE
    details = run.partition_details["South"]
    assert details.status == PartitionStatus.FAILED
    assert "@db.schema.stage/training_run/partition_0" in details.error
    assert "ctx.download('model.pkl', partition_id=" in details.error


def test_partition_details_stage_artifacts_manager_downloads_into_a_folder(thread_client, tmp_path):
    run = DPF(snowflake_style_summary, "memory://sf-artifacts").run(
        partition_by="region", dataframe=sales(), run_id="regional"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS
    manager = run.partition_details["South"].stage_artifacts_manager  # Snowflake ML's name
    assert sorted(manager.list()) == ["count.pkl", "sales_summary.json"]
    # Snowflake ML: download(filename, local_dir) returns the local file's path
    local = manager.download("sales_summary.json", str(tmp_path))
    assert local == str(tmp_path / "sales_summary.json")
    assert json.loads(Path(local).read_text()) == {"region": "South", "total_sales": 5.0}
    # a file path still names the file itself
    assert manager.download("count.pkl", str(tmp_path / "n.pkl")) == str(tmp_path / "n.pkl")
    assert (tmp_path / "n.pkl").is_file()


def test_restore_from_takes_snowflakes_stage_name_keyword(thread_client):
    url = "memory://sf-restore"
    DPF(snowflake_style_summary, url).run(partition_by="region", dataframe=sales(), run_id="regional").wait(
        show_progress=False
    )
    # Snowflake ML: DPFRun.restore_from(run_id="regional_analytics_2024", stage_name="analytics_stage")
    restored = ManyModelRun.restore_from(run_id="regional", stage_name=url)
    assert restored.status == RunStatus.SUCCESS
    assert sorted(restored.partition_details) == ["North", "South"]
    assert ManyModelRun.restore_from("regional", url).status == RunStatus.SUCCESS  # positional as before
    with pytest.raises(InvalidArgumentError, match="they are one argument"):
        ManyModelRun.restore_from("regional", url, stage_name=url)
    with pytest.raises(InvalidArgumentError, match="needs the URL"):
        ManyModelRun.restore_from("regional")


def test_fileset_stage_location_is_the_folder_of_its_files(tmp_path):
    fileset = FileSet.make(str(tmp_path), "train_set", sales())
    location = fileset.fileset_stage_location()  # Snowflake ML's FileSet method
    assert location == f"{tmp_path}/train_set/"
    assert fileset.files() and all(f.startswith(location) for f in fileset.files())
    fileset.delete()
    with pytest.raises(FileSetDeletedError):
        fileset.fileset_stage_location()


def test_to_pandas_gives_each_call_a_frame_of_its_own():
    # Snowflake ML reads the data again on every to_pandas(): code moved over
    # pops the target off one frame and reads the group again later
    data = DataConnector.from_pandas(pd.DataFrame({"x": [1.0, 2.0, 3.0], "label": [0, 1, 0]}))
    first = data.to_pandas()
    first.pop("label")
    first["x"] = first["x"] / 3
    first.iloc[0, 0] = -1.0
    assert data.to_pandas().to_dict("list") == {"x": [1.0, 2.0, 3.0], "label": [0, 1, 0]}
    assert data.columns == ["x", "label"] and len(data) == 3
    limited = data.to_pandas(limit=2)
    limited.pop("x")
    assert data.to_pandas(limit=2).columns.tolist() == ["x", "label"]


def test_a_torch_dataset_after_a_popped_to_pandas_has_every_column():
    pytest.importorskip("torch")  # the torch extra (the rest of this file runs without it)
    data = DataConnector.from_pandas(pd.DataFrame({"x": [1.0, 2.0, 3.0], "label": [0, 1, 0]}))
    data.to_pandas().pop("label")
    assert sorted(next(iter(data.to_torch_dataset(batch_size=3)))) == ["label", "x"]


def pop_the_target_then_read_again(data_connector, context):
    df = data_connector.to_pandas()
    as_it_came = df.to_dict("list")
    y = df.pop("label")
    df.iloc[0, 0] = "changed"
    again = data_connector.to_pandas()
    assert again.to_dict("list") == as_it_came
    assert data_connector.columns == list(as_it_came) and len(data_connector) == len(y)
    del again["label"]
    again["extra"] = 1
    assert data_connector.to_pandas().to_dict("list") == as_it_came  # a third time too
    assert data_connector.to_pandas(limit=1).to_dict("list") == {k: v[:1] for k, v in as_it_came.items()}
    return float(y.sum())


@pytest.mark.parametrize("max_retries", [0, 1])
def test_a_function_that_changes_its_frame_can_read_the_group_again(thread_client, max_retries):
    # the group's frame itself on a first call, made again for a later one
    # (without retries); with retries, each try's frame of its own
    frame = pd.DataFrame({"region": ["a", "a", "b"], "label": [1.0, 2.0, 3.0]})
    run = ManyModelTraining(pop_the_target_then_read_again, "memory://sf-read-again").run(
        partition_by="region", dataframe=frame, run_id=f"r{max_retries}",
        execution_options=ExecutionOptions(max_retries=max_retries),
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, {k: d.error for k, d in run.partition_details.items()}
    assert run.get_model("a") == 3.0


def objects_seen(data, ctx):
    df = data.to_pandas()
    return [type(v).__name__ for v in df["emb"]], df["mixed"].tolist(), df["text"].tolist()


def test_a_pandas_frames_columns_of_arrays_reach_the_groups_as_arrays(thread_client):
    # Snowpark's ARRAY columns come to pandas as lists; embeddings as arrays.
    # Dask's convert-string made them text ("[0.  0.5]") on the way in.
    frame = pd.DataFrame({
        "store": ["a", "a", "b"],
        "emb": [np.array([0.0, 0.5]), np.array([1.0, 1.5]), [2.0, 2.5]],
        "mixed": pd.Series([1, "x", 2.5], dtype=object),
        "text": ["p", "q", "r"],
    })
    run = ManyModelTraining(objects_seen, "memory://sf-objects").run(
        partition_by="store", dataframe=frame, run_id="r1"
    )
    assert run.wait(show_progress=False) == RunStatus.SUCCESS, {k: d.error for k, d in run.partition_details.items()}
    assert run.get_model("a") == (["ndarray", "ndarray"], [1, "x"], ["p", "q"])
    assert run.get_model("b") == (["list"], [2.5], ["r"])


def _embeddings_and_bytes() -> pd.DataFrame:
    """Six rows: a column of numpy arrays, one of bytes, one of floats."""
    return pd.DataFrame({
        "emb": [np.array([i, i + 0.5]) for i in range(6)],
        "raw": [bytes([i, 255]) for i in range(6)],
        "y": np.arange(6.0),
    })


def test_fileset_make_stores_a_pandas_frames_arrays_as_lists_and_refuses_mixed_columns(tmp_path):
    frame = _embeddings_and_bytes()
    for shuffle in (False, True):
        fileset = FileSet.make(str(tmp_path), f"emb-{shuffle}", frame, shuffle=shuffle, seed=3)
        stored = fileset.to_dask_dataframe().compute().sort_values("y")
        assert [list(v) for v in stored["emb"]] == [[i, i + 0.5] for i in range(6)]  # not "[0.  0.5]"
        assert stored["raw"].tolist() == [bytes([i, 255]) for i in range(6)]
    mixed = frame.assign(id=pd.Series([1, "x", 2, 3, 4, 5], dtype=object))
    with pytest.raises(InvalidArgumentError, match="column 'id' holds Python objects"):
        FileSet.make(str(tmp_path), "mixed", mixed)
    assert not (tmp_path / "mixed").exists()  # nothing written: the name is free
    FileSet.make(str(tmp_path), "mixed", mixed.astype({"id": str}))


def test_a_fileset_of_a_pandas_frames_arrays_gives_torch_lists(tmp_path):
    pytest.importorskip("torch")  # the torch extra (the rest of this file runs without it)
    frame = _embeddings_and_bytes()
    for shuffle in (False, True):
        fileset = FileSet.make(str(tmp_path), f"emb-{shuffle}", frame, shuffle=shuffle, seed=3)
        batch = next(iter(fileset.to_torch_dataset(batch_size=6)))
        assert sorted(map(list, batch["emb"])) == [[i, i + 0.5] for i in range(6)]
