"""TensorFlow adapter: a ``tf.data.Dataset`` of ``dict[column -> Tensor]`` batches.

Batches are cut from whole numpy columns and handed to TensorFlow one batch
at a time (``from_generator`` with a fixed signature); strings become
``tf.string`` (missing strings become ``""``). Each pass over the dataset is
one epoch, with a new order when ``shuffle=True`` (reproducible with ``seed``).
"""

from __future__ import annotations

import numpy as np

from .._compat import import_optional
from ..exceptions import InvalidArgumentError
from ._batching import check_batch_size, check_flag, check_seed, count_batches, epoch_rng, new_seed


def _strings(values: np.ndarray) -> np.ndarray:
    values = np.where(values == None, "", values)  # noqa: E711 (elementwise)
    try:
        return values.astype(str)
    except UnicodeDecodeError:
        # bytes that are not ASCII (a binary column): tf.string holds raw
        # bytes, so hand them over as they are, and text as UTF-8
        return np.array([v if isinstance(v, bytes) else str(v).encode() for v in values], dtype=object)


def _not_a_tensor(name: str, what: str, exc: BaseException | None = None) -> InvalidArgumentError:
    because = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
    return InvalidArgumentError(
        f"column {name!r} holds {what}, which a tf.Tensor cannot hold{because}; TensorFlow takes numbers "
        f"and text: convert the column first (to numbers, one column per item of a list, or .astype(str))"
    )


def _tensor_values(name: str, values: np.ndarray, is_string: bool) -> np.ndarray:
    """A column's values as TensorFlow takes them: text as ``_strings``; a
    column of lists or other objects is refused naming it (TensorFlow's own
    "setting an array element with a sequence" named none)."""
    if not is_string:
        # a FileSet's pyarrow lists and structs, streamed: TensorFlow's own
        # "Unsupported object type numpy.ndarray" named no column
        if values.dtype == object and len(values) and isinstance(values[0], (np.ndarray, list, tuple, dict)):
            raise _not_a_tensor(name, "lists or structs")
        return values
    try:
        return _strings(values)
    except (TypeError, ValueError) as exc:
        raise _not_a_tensor(name, "values that are not text (lists, arrays)", exc) from exc


def _converts(tf, values: np.ndarray) -> bool:
    try:
        tf.constant(values)
    except (TypeError, ValueError):
        return False
    return True


def make_tf_dataset(source, *, batch_size, shuffle=False, drop_last_batch=True, seed=None):
    """Build the ``tf.data.Dataset`` over ``source`` (see the module docstring)."""
    tf = import_optional("tensorflow")
    batch_size = check_batch_size(batch_size, allow_none=False)
    shuffle = check_flag(shuffle, "shuffle")
    drop_last_batch = check_flag(drop_last_batch, "drop_last_batch")
    schema = source.schema
    shape = (batch_size,) if drop_last_batch else (None,)
    signature = {
        name: tf.TensorSpec(shape=shape, dtype=tf.string if is_string else tf.as_dtype(dtype))
        for name, (dtype, is_string) in schema.items()
    }
    seed = check_seed(seed)
    base_seed = new_seed() if seed is None else seed
    n_batches = count_batches(source.n_rows, batch_size, drop_last_batch)
    if hasattr(source, "columns"):  # in memory: the whole pipeline runs inside TensorFlow
        return _in_memory_dataset(tf, source.columns, batch_size, shuffle, n_batches, base_seed)
    epochs = {"count": 0}

    def generate():
        rng = epoch_rng(base_seed, epochs["count"])
        epochs["count"] += 1
        for batch in source.epoch(rng, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last_batch):
            yield {name: _tensor_values(name, values, schema[name][1]) for name, values in batch.items()}

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # a known length lets Keras size its epochs (no "ran out of data" warning)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _in_memory_dataset(tf, columns, batch_size: int, shuffle: bool, n_batches: int, seed: int):
    """Whole columns as tensors once; per epoch one permutation and a gather per batch.

    ``Dataset.random(rerandomize_each_iteration=True)`` draws a new, seeded
    epoch key every time the dataset is iterated, so each epoch has its own
    order and the sequence of orders is reproducible from ``seed``.
    """
    # Columns of one dtype are stacked into one matrix: one gather per dtype
    # per batch instead of one per column (measured ~1.5x faster for 16 columns).
    by_dtype: dict[str, list[str]] = {}
    for name, values in columns.arrays.items():
        key = "string" if name in columns.strings else values.dtype.str
        by_dtype.setdefault(key, []).append(name)
    matrices = {}
    for key, names in by_dtype.items():
        stacked = np.stack([_tensor_values(n, columns.arrays[n], key == "string") for n in names], axis=1)
        try:
            matrices[key] = tf.constant(stacked)
        except (TypeError, ValueError) as exc:
            # pyarrow decimals, lists, structs (object arrays that are not
            # text): TensorFlow's "Failed to convert a NumPy array to a
            # Tensor" named no column. Found again one by one, on failure only
            bad = next((n for n in names if not _converts(tf, columns.arrays[n])), names[0])
            raise _not_a_tensor(bad, "Python objects (decimals, lists, structs)", exc) from exc
    order_of_columns = list(columns.arrays)
    n_rows = columns.n_rows

    # Not through autograph (both functions are plain TensorFlow calls, with
    # Python branches on Python values only): its conversion writes a
    # __autograph_generated_file*.py into the temp folder of each process,
    # removed only at a clean exit, so each worker killed (out of memory)
    # after a group that used this left one in /tmp for good.
    @tf.autograph.experimental.do_not_convert
    def one_epoch(epoch_key):
        if shuffle:
            order = tf.random.experimental.stateless_shuffle(
                tf.range(n_rows, dtype=tf.int64), seed=tf.stack([epoch_key, tf.constant(seed % 2**62, tf.int64)])
            )
        else:
            order = tf.range(n_rows, dtype=tf.int64)

        @tf.autograph.experimental.do_not_convert
        def batch(number):
            index = order[number * batch_size : tf.minimum((number + 1) * batch_size, n_rows)]
            out = {}
            for key, names in by_dtype.items():
                gathered = tf.gather(matrices[key], index)
                out.update(zip(names, tf.unstack(gathered, num=len(names), axis=1)))
            return {name: out[name] for name in order_of_columns}

        return tf.data.Dataset.range(n_batches).map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    epochs = tf.data.Dataset.random(seed=seed % 2**31, rerandomize_each_iteration=True).take(1)
    dataset = epochs.flat_map(one_epoch)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(tf.data.AUTOTUNE)
