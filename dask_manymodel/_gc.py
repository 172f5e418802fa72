"""Keep the garbage collector off the objects a worker held before a run task.

A Dask worker process holds on the order of 100,000 long-lived objects
(distributed's state, pandas, numpy, the user's imports). Every full
collection walks all of them, and a loop of small model fits allocates
enough to trigger a few full collections per task: ~45 ms each on the
benchmark machine, 0.3-0.6 s per worker over W1 (``benchmarks/README.md``).

While a run task works, :func:`freeze_older_objects` moves the objects that
existed when the first such task in the process started out of the
collector's sight (:func:`gc.freeze`). What the tasks create is collected as
usual. When the last run task in the process ends they are unfrozen, so any
garbage cycle among them is found by the next full collection.
"""

from __future__ import annotations

import gc
from typing import ContextManager

from ._process_setting import WhileTasksRun

_frozen = WhileTasksRun(apply=gc.freeze, undo=gc.unfreeze)


def freeze_older_objects() -> ContextManager[None]:
    """Freeze what exists now for the block (see the module docs)."""
    return _frozen.held()
