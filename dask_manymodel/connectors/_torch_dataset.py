"""The torch ``IterableDataset`` of the connectors, at module level so that
it pickles by reference: DataLoader workers started with ``spawn`` or
``forkserver`` (Dask's nanny starts its workers with ``spawn``, and their
children inherit it; macOS; Linux from Python 3.14) get the dataset pickled.
Imported only when torch is used (it imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..exceptions import InvalidArgumentError
from ._batching import epoch_rng, new_seed


def _to_torch(batch: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, values in batch.items():
        if isinstance(values, np.ndarray):
            out[name] = values.tolist() if values.dtype == object else torch.from_numpy(np.ascontiguousarray(values))
        elif isinstance(values, np.generic):  # a single row
            # a 0-d tensor of the column's dtype: torch.tensor(value.item())
            # would make float64 float32, int8 int64, and overflow on big uint64
            out[name] = torch.from_numpy(np.asarray(values))
        else:  # a single row of a string column
            out[name] = values
    return out


class ManyModelIterableDataset(torch.utils.data.IterableDataset):
    """Batches as ``dict[column -> Tensor]`` (strings as lists).

    Each iteration is one epoch. With ``shuffle=True`` every epoch has a
    new order. Once :meth:`set_epoch` was called, the order is a function
    of ``(seed, epoch)`` alone: the same on a fresh dataset (resuming from
    a checkpoint), on a repeated ``set_epoch(n)``, and split across
    DataLoader workers; as with ``DistributedSampler``, call it before
    every epoch, or every epoch repeats that epoch's order. Without
    :meth:`set_epoch` the order comes from ``seed`` and the number of
    iterations without DataLoader workers (or with
    ``persistent_workers=True``); with non-persistent workers, also from
    the DataLoader's per-epoch seed (each epoch differs, reproducibly only
    with ``generator=torch.Generator().manual_seed(...)``), so
    :meth:`set_epoch` is the recommended way to a reproducible order.
    With ``persistent_workers=True`` the workers keep the copy of the
    dataset they started with and do not see a later :meth:`set_epoch`:
    use non-persistent workers with it.
    """

    def __init__(self, source, *, batch_size, shuffle, drop_last_batch, seed):
        super().__init__()
        self.source = source
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last_batch = drop_last_batch
        self.seed = new_seed() if seed is None else seed
        self._iterations = 0
        self._epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Fix the epoch number (as ``DistributedSampler.set_epoch``): from
        now on every iteration has the order of ``(seed, epoch)``.

        ``epoch`` is an int >= 0 (numpy's too), checked here: a negative one
        failed only at the next iteration, inside numpy, and ``1.7`` was
        taken as 1 without a word."""
        if not isinstance(epoch, (int, np.integer)) or isinstance(epoch, bool) or epoch < 0:
            raise InvalidArgumentError(f"set_epoch() takes the epoch's number, an int >= 0, got {epoch!r}")
        self._epoch = int(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        share, n_shares = (info.id, info.num_workers) if info is not None else (0, 1)
        if self._epoch is not None:
            # a function of (seed, epoch) alone: a fresh dataset, a repeated
            # set_epoch(n) and every DataLoader worker get the same order
            keys = [self._epoch]
        else:
            keys = [self._iterations]
            if info is not None:
                keys.append((info.seed - info.id) % 2**63)  # shared by this epoch's workers
            self._iterations += 1
        rng = epoch_rng(self.seed, *keys)
        for batch in self.source.epoch(
            rng, batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last_batch,
            share=share, n_shares=n_shares,
        ):
            yield _to_torch(batch)
