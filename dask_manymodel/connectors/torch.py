"""PyTorch adapter: an ``IterableDataset`` of ``dict[column -> Tensor]`` batches.

Use it as ``DataLoader(ds, batch_size=None, num_workers=k)``: batching is
done here, on whole numpy columns. Each DataLoader worker yields every k-th
batch of the same epoch permutation, so together they cover every row once.

Dask worker processes are daemonic and cannot start DataLoader workers: to
use ``num_workers > 0`` inside a many-model run, start the Dask workers with
``dask.config.set({"distributed.worker.daemon": False})``. The dataset
pickles (``_torch_dataset``), as DataLoader workers started with ``spawn``
need: Dask's workers start their children so.
"""

from __future__ import annotations

import warnings

from .._compat import import_optional
from ._batching import check_batch_size, check_flag, check_seed


def make_torch_dataset(source, *, batch_size=None, shuffle=False, drop_last_batch=True, seed=None):
    """Build the ``IterableDataset`` over ``source`` (see the module docstring)."""
    import_optional("torch")  # a clear error when torch is not installed
    from ._torch_dataset import ManyModelIterableDataset

    return ManyModelIterableDataset(
        source, batch_size=check_batch_size(batch_size), shuffle=check_flag(shuffle, "shuffle"),
        drop_last_batch=check_flag(drop_last_batch, "drop_last_batch"), seed=check_seed(seed),
    )


def make_torch_datapipe(source, **kwargs):
    """The same dataset as a datapipe where torch still has datapipes."""
    import_optional("torch")  # a clear error when torch is not installed
    dataset = make_torch_dataset(source, **kwargs)
    try:
        from torch.utils.data.datapipes.iter import IterableWrapper
    except ImportError:
        warnings.warn(
            "torch.utils.data datapipes are gone in this torch; to_torch_datapipe() returns "
            "the IterableDataset of to_torch_dataset() instead",
            DeprecationWarning,
            stacklevel=3,
        )
        return dataset
    return IterableWrapper(dataset, deepcopy=False)
