"""DataConnector -> TensorFlow: batches, dtypes, strings, shuffling, model.fit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dask_manymodel import DataConnector, InvalidArgumentError

tf = pytest.importorskip("tensorflow")


@pytest.fixture
def data():
    n = 50
    return DataConnector.from_pandas(
        pd.DataFrame(
            {
                "x": np.arange(n, dtype="float32"),
                "i": np.arange(n, dtype="int64"),
                "nan": np.where(np.arange(n) % 4 == 0, np.nan, 2.0),
                "s": [f"s{i}" if i % 9 else None for i in range(n)],
            }
        )
    )


def rows(dataset):
    return [v for b in dataset for v in b["i"].numpy().tolist()]


def test_batches_dtypes_and_strings(data):
    batches = list(data.to_tf_dataset(batch_size=8))
    assert len(batches) == 6
    first = batches[0]
    assert first["x"].dtype == tf.float32 and first["i"].dtype == tf.int64 and first["s"].dtype == tf.string
    assert first["x"].shape == (8,)
    assert np.isnan(first["nan"].numpy()[0])
    assert first["s"].numpy().tolist()[:2] == [b"", b"s1"]  # a missing string is ""


def test_drop_last_and_cardinality(data):
    assert int(data.to_tf_dataset(batch_size=8).cardinality()) == 6
    kept = data.to_tf_dataset(batch_size=8, drop_last_batch=False)
    assert int(kept.cardinality()) == 7 and rows(kept) == list(range(50))
    # a batch size that divides the rows leaves no short, nor empty, last batch
    even = data.to_tf_dataset(batch_size=10, drop_last_batch=False)
    assert int(even.cardinality()) == 5 and [len(b["i"]) for b in even] == [10] * 5


def test_shuffle_per_epoch_and_seed(data):
    ds = data.to_tf_dataset(batch_size=10, shuffle=True, seed=5)
    first, second = rows(ds), rows(ds)
    assert first != second and sorted(first) == sorted(second) == list(range(50))
    assert rows(data.to_tf_dataset(batch_size=10, shuffle=True, seed=5)) == first


def test_the_orders_of_a_seed_and_a_global_seed_repeat_and_checkpoint(data, tmp_path):
    """As TensorFlow's own shuffle(seed=): the same seed= and global seed
    give the same orders. A version that counted epochs in a tf.Variable
    (to follow seed= alone) could neither be checkpointed nor built inside
    a tf.function: not kept."""
    orders = []
    for _ in range(2):
        tf.keras.utils.set_random_seed(123)
        ds = data.to_tf_dataset(batch_size=10, shuffle=True, seed=7)
        orders.append([rows(ds), rows(ds)])
    assert orders[0] == orders[1] and orders[0][0] != orders[0][1]
    iterator = iter(data.to_tf_dataset(batch_size=10, shuffle=True, seed=7))
    next(iterator)
    saved = tf.train.Checkpoint(it=iterator).save(str(tmp_path / "ckpt"))  # raised for the tf.Variable
    assert saved

    @tf.function
    def first_batch_sum():
        return next(iter(data.to_tf_dataset(batch_size=10, shuffle=True, seed=7)))["i"][0]

    first_batch_sum()


def test_works_with_model_fit(data):
    inputs = tf.keras.Input(shape=(1,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    dataset = data.to_tf_dataset(batch_size=10, shuffle=True).map(lambda b: (tf.reshape(b["x"], (-1, 1)), b["x"]))
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    assert len(history.history["loss"]) == 2


def test_batch_size_is_required_and_positive(data):
    with pytest.raises(InvalidArgumentError, match="got 0"):
        data.to_tf_dataset(batch_size=0)
    with pytest.raises(InvalidArgumentError, match="got None"):
        data.to_tf_dataset(batch_size=None)


def test_bytes_that_are_not_text_pass_through():
    df = pd.DataFrame({"x": [1.0, 2.0, 3.0], "payload": [b"\x00\xff", b"ok", None], "s": ["\u00e9", "b", "c"]})
    batch = next(iter(DataConnector.from_pandas(df).to_tf_dataset(batch_size=3)))
    assert batch["payload"].dtype == tf.string
    assert batch["payload"].numpy().tolist() == [b"\x00\xff", b"ok", b""]
    assert batch["s"].numpy().tolist() == ["\u00e9".encode(), b"b", b"c"]  # text beside it: UTF-8


def test_columns_of_objects_name_themselves():
    """Decimals, pyarrow lists and lists in an object column raised
    TensorFlow's "Failed to convert a NumPy array to a Tensor" or numpy's
    "setting an array element with a sequence", naming no column; a pyarrow
    dictionary of text still passes as text."""
    import decimal

    import pyarrow as pa

    columns = {
        "price": pd.array([decimal.Decimal("1.25")] * 2, dtype=pd.ArrowDtype(pa.decimal128(10, 2))),
        "pair": pd.array([[1, 2]] * 2, dtype=pd.ArrowDtype(pa.list_(pa.int64()))),
        "listed": pd.Series([[1, 2]] * 2, dtype=object),
    }
    for name, values in columns.items():
        df = pd.DataFrame({"x": [1.0, 2.0], name: values})
        with pytest.raises(InvalidArgumentError, match=f"column '{name}' holds .*which a tf.Tensor cannot hold"):
            DataConnector.from_pandas(df).to_tf_dataset(batch_size=2)
    text = pd.array(["a", "b"], dtype=pd.ArrowDtype(pa.dictionary(pa.int32(), pa.string())))
    batch = next(iter(DataConnector.from_pandas(pd.DataFrame({"t": text})).to_tf_dataset(batch_size=2)))
    assert batch["t"].numpy().tolist() == [b"a", b"b"]


@pytest.mark.parametrize("flag", ["shuffle", "drop_last_batch"])
def test_a_flag_that_is_not_true_or_false_is_refused(data, flag):
    with pytest.raises(InvalidArgumentError, match=f"^{flag} must be True or False, got 'no'$"):
        data.to_tf_dataset(batch_size=8, **{flag: "no"})


@pytest.mark.parametrize("bad", [-1, 2.5, True, "1"])
def test_bad_seed(data, bad):
    with pytest.raises(InvalidArgumentError, match="seed must be a non-negative int or None"):
        data.to_tf_dataset(batch_size=8, seed=bad)


def test_a_filesets_list_column_names_itself(tmp_path):
    """A FileSet's schema read failed on a pyarrow list column (TypeError:
    data type 'list<item: int64>[pyarrow]' not understood); streamed, its
    lists raised TensorFlow's "Unsupported object type numpy.ndarray"."""
    import dask.dataframe as dd
    import pyarrow as pa

    from dask_manymodel import FileSet

    pairs = pd.array([[1, 2]] * 8, dtype=pd.ArrowDtype(pa.list_(pa.int64())))
    source = dd.from_pandas(pd.DataFrame({"x": np.arange(8.0), "pair": pairs}), npartitions=2)
    made = FileSet.make(str(tmp_path / "sets"), "lists", source)
    # raised in the dataset's generator: TensorFlow passes it on as its own error, with the message
    with pytest.raises(tf.errors.InvalidArgumentError, match="column 'pair' holds lists or structs, which a tf.Tensor"):
        next(iter(made.to_tf_dataset(batch_size=4)))


_KILLED_AFTER_AN_EPOCH = """
import os
import numpy as np, pandas as pd
from dask_manymodel import DataConnector
data = DataConnector.from_pandas(pd.DataFrame({"x": np.arange(20.0), "i": np.arange(20)}))
for shuffle in (False, True):
    assert len(list(data.to_tf_dataset(batch_size=4, shuffle=shuffle, seed=3))) == 5
os._exit(0)  # as a worker killed for its memory: no clean exit
"""


def test_a_process_killed_after_to_tf_dataset_leaves_no_file_in_the_temp_folder(tmp_path):
    """TensorFlow's autograph converted the dataset's functions through a
    __autograph_generated_file*.py in the temp folder, removed only when the
    process exits cleanly: each worker killed after a group used
    to_tf_dataset left one in /tmp for good."""
    import os
    import subprocess
    import sys

    temp = tmp_path / "tmp"
    temp.mkdir()
    env = dict(os.environ, TMPDIR=str(temp), TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-c", _KILLED_AFTER_AN_EPOCH], env=env, check=True, timeout=120)
    assert os.listdir(temp) == []
