"""TensorFlow adapter: a ``tf.data.Dataset`` of ``dict[column -> Tensor]`` batches.

Batches are cut from whole numpy columns and handed to TensorFlow one batch
at a time (``from_generator`` with a fixed signature); strings become
``tf.string`` (missing strings become ``""``). Each pass over the dataset is
one epoch, with a new order when ``shuffle=True`` (reproducible with ``seed``).
"""

from __future__ import annotations

import numpy as np

from .._compat import import_optional
from ._batching import check_batch_size, count_batches, epoch_rng, new_seed




def _strings(values: np.ndarray) -> np.ndarray:
    values = np.where(values == None, "", values)  # noqa: E711 (elementwise)
    return values.astype(str)


def make_tf_dataset(source, *, batch_size, shuffle=False, drop_last_batch=True, seed=None):
    """Build the ``tf.data.Dataset`` over ``source`` (see the module docstring)."""
    tf = import_optional("tensorflow")
    batch_size = check_batch_size(batch_size, allow_none=False)
    schema = source.schema
    shape = (batch_size,) if drop_last_batch else (None,)
    signature = {
        name: tf.TensorSpec(shape=shape, dtype=tf.string if is_string else tf.as_dtype(dtype))
        for name, (dtype, is_string) in schema.items()
    }
    base_seed = new_seed() if seed is None else int(seed)
    epochs = {"count": 0}

    def generate():
        rng = epoch_rng(base_seed, epochs["count"])
        epochs["count"] += 1
        for batch in source.epoch(rng, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last_batch):
            yield {
                name: _strings(values) if schema[name][1] else values for name, values in batch.items()
            }

    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    # a known length lets Keras size its epochs (no "ran out of data" warning)
    n_batches = count_batches(source.n_rows, batch_size, drop_last_batch)
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(n_batches))
    return dataset.prefetch(tf.data.AUTOTUNE)
