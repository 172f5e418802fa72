"""Capture what a user function prints or logs, per thread.

A Dask worker runs several tasks at once in threads, so ``redirect_stdout``
(which swaps the process-wide ``sys.stdout``) would mix their output. Instead
one proxy is installed on ``sys.stdout``/``sys.stderr`` and one handler on
the root logger; both route text to the capture buffer of the thread that
produced it, and pass everything else through unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from typing import Iterator

#: Default cap on the logs kept per group.
DEFAULT_MAX_LOG_CHARS = 32_000

_local = threading.local()
_install_lock = threading.Lock()
_handler: logging.Handler | None = None


class LogBuffer:
    """Text captured during one group, cut at ``max_chars`` with a note."""

    def __init__(self, max_chars: int):
        self.max_chars = max_chars
        self._parts: list[str] = []
        self._size = 0
        self.truncated = False

    def write(self, text: str) -> None:
        if self.truncated or not text:
            return
        room = self.max_chars - self._size
        if len(text) > room:
            text = text[:room]
            self.truncated = True
        self._parts.append(text)
        self._size += len(text)

    @property
    def text(self) -> str:
        out = "".join(self._parts)
        if self.truncated:
            out += f"\n[logs truncated at {self.max_chars} characters]\n"
        return out


class _ThreadRoutedStream:
    """Stands in for ``sys.stdout``/``sys.stderr``: text written by a thread
    that is capturing goes to its buffer, all else to the original stream.

    Not an ``io.TextIOBase``: that base class would answer ``encoding``,
    ``fileno()`` and ``isatty()`` itself (None, an error, False) instead of
    the original stream, and libraries that look at them would break.
    """

    def __init__(self, original):
        self.original = original

    def write(self, text):
        buffer = getattr(_local, "buffer", None)
        if buffer is None:
            return self.original.write(text)
        if not isinstance(text, str):
            # as a real text stream does, at the write: kept, bytes would
            # break the group's whole log (and its task) when joined
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buffer.write(text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        self.original.flush()

    def close(self):
        # a group's sys.stdout.close() would close the worker's own stream
        # for every later group and run: while a group's thread is captured,
        # its stream is the group's log, which the engine ends itself
        if getattr(_local, "buffer", None) is None:
            self.original.close()

    def __getattr__(self, name):
        return getattr(self.original, name)


class _UTCFormatter(logging.Formatter):
    """Log records' times in UTC, saying so (``2026-11-30T17:17:04.263Z``).

    logging's default is the local time of the process, with no zone: the
    workers of one cluster may have other ``TZ`` settings than each other and
    than the client (a laptop in Paris, workers in UTC or New York), and the
    logs of two groups that ran at the same instant read hours apart, while a
    group's ``finished`` and ``dask-manymodel runs`` say UTC."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


class _ThreadRoutedHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        buffer = getattr(_local, "buffer", None)
        if buffer is not None:
            buffer.write(self.format(record) + "\n")


def _install() -> None:
    """Route ``sys.stdout``, ``sys.stderr`` and the root logger through the
    per-thread buffers. Checked on every capture, not once: a host that swaps
    ``sys.stdout`` later (pytest, some notebook kernels) would silently end
    the capture."""
    global _handler
    with _install_lock:
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if not isinstance(stream, _ThreadRoutedStream):
                setattr(sys, name, _ThreadRoutedStream(stream))
        root = logging.getLogger()
        if _handler is None:
            _handler = _ThreadRoutedHandler(level=logging.DEBUG)
            _handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        if _handler not in root.handlers:
            root.addHandler(_handler)
        if not getattr(warnings.showwarning, "_notes_shown_warnings", False):
            warnings.showwarning = _noting_shown_warnings(warnings.showwarning)


# warnings' own hook for "the filters changed": every module's registry of
# warnings shown is then cleared before its next warning (CPython 3.4+).
# Not at every group: a cleared registry makes each later warning, the
# ignored ones too, walk the process's filters again (Dask's workers have
# many): 24 us a group in a W2 task. Only after a warning was shown.
_forget_shown_warnings = getattr(warnings, "_filters_mutated", lambda: None)
_a_warning_was_shown = False


def _noting_shown_warnings(show):
    def showwarning(*args, **kwargs):
        global _a_warning_was_shown
        _a_warning_was_shown = True
        return show(*args, **kwargs)

    showwarning._notes_shown_warnings = True
    return showwarning


@contextlib.contextmanager
def capture_logs(max_chars: int = DEFAULT_MAX_LOG_CHARS) -> Iterator[LogBuffer]:
    """Collect this thread's prints and log records into a :class:`LogBuffer`."""
    global _a_warning_was_shown
    _install()
    # Python shows a warning once per code location (each module remembers
    # what it showed): forget that, so each group's logs hold the warnings
    # its own run raised, not only the first group's of a process
    if _a_warning_was_shown:
        _a_warning_was_shown = False
        _forget_shown_warnings()
    buffer = LogBuffer(max_chars)
    previous = getattr(_local, "buffer", None)
    _local.buffer = buffer
    try:
        yield buffer
    finally:
        _local.buffer = previous
