"""Let glibc keep freed memory while a run task works; give it back after.

Dask's nanny starts worker processes with ``MALLOC_TRIM_THRESHOLD_=65536``
(``distributed.nanny.pre-spawn-environ``), so that freed memory goes back to
the operating system at once and the worker's memory reading stays honest.
That setting also freezes glibc's mmap threshold at 128 KiB. Code that
allocates and frees many arrays, which is what a loop of small model fits
does, then pays for fresh pages again and again: measured on the benchmark
machine, a pandas and numpy fit ran 25-35% slower in such a process than in a
plain one (``benchmarks/README.md``).

While a run task works, :func:`keep_freed_memory` raises both thresholds so
freed memory is reused, and when the last such task in the process ends it
restores the values the process was started with and calls
``malloc_trim(0)``, so the memory is returned as Dask intends. It changes
nothing unless the process was started with ``MALLOC_TRIM_THRESHOLD_`` set
and runs on glibc.
"""

from __future__ import annotations

import contextlib
import functools
import ctypes
import ctypes.util
import logging
import os
from typing import ContextManager

from ._process_setting import WhileTasksRun

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT_MMAP_THRESHOLD = 128 * 1024
# glibc caps the mmap threshold at 32 MiB on 64-bit systems
_TASK_MMAP_THRESHOLD = 32 * 2**20
_TASK_TRIM_THRESHOLD = 256 * 2**20


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, or None elsewhere. Looked up once: find_library runs a subprocess."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def _started_values() -> tuple[int, int] | None:
    """The thresholds this process was started with, if Dask's nanny (or
    anyone) set the trim threshold through the environment; else None."""
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    if trim is None:
        return None
    try:
        mmap = int(os.environ.get("MALLOC_MMAP_THRESHOLD_", _GLIBC_DEFAULT_MMAP_THRESHOLD))
        return int(trim), mmap
    except ValueError:
        return None


def _keep() -> None:
    libc = _libc()
    libc.mallopt(_M_TRIM_THRESHOLD, _TASK_TRIM_THRESHOLD)
    libc.mallopt(_M_MMAP_THRESHOLD, _TASK_MMAP_THRESHOLD)


def _give_back() -> None:
    libc = _libc()
    trim, mmap = _started_values()
    libc.mallopt(_M_TRIM_THRESHOLD, trim)
    libc.mallopt(_M_MMAP_THRESHOLD, mmap)
    libc.malloc_trim(0)


_keeping = WhileTasksRun(apply=_keep, undo=_give_back)


def keep_freed_memory(enabled: bool = True) -> ContextManager[None]:
    """Keep freed memory for reuse inside the block (see the module docs)."""
    if enabled and _started_values() is not None and _libc() is not None:
        return _keeping.held()
    return contextlib.nullcontext()
