"""A setting of the whole worker process, held while any run task works."""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator


class WhileTasksRun:
    """Calls ``apply`` when the first of possibly overlapping run tasks in this
    process starts (a worker may run several threads), and ``undo`` when the
    last of them ends."""

    def __init__(self, apply: Callable[[], object], undo: Callable[[], object]):
        self._apply = apply
        self._undo = undo
        self._lock = threading.Lock()
        self._active = 0

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The setting is in effect inside the block."""
        with self._lock:
            self._active += 1
            if self._active == 1:
                self._apply()
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    self._undo()
