"""File systems that fail on purpose, for the fault tests.

They are real fsspec file systems (local disk, or S3 through s3fs) with
injected ``OSError``s on writes (and, on local disk, refused reads). Instances pickle to the workers with their
options; each failure is appended to ``log_path`` so a test can check that
failures really happened in the worker processes.

On local disk (``flaky://``) also: the nth writes of a path failing, or
landing with their answer lost (``fail_nth``, ``lost_answer_nth``, counted
in ``count_dir`` across processes), the nth deletes failing half-way
(``fail_rm_nth``), and a file whose existence takes the store down
(``down_while``: reads, writes and deletes fail) or fills its disk
(``full_while``: writes fail with ENOSPC), so that a test starts and ends
an outage where it likes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random

import fsspec
from fsspec.implementations.local import LocalFileSystem


class _Injector:
    def __init__(self, fail_rate=0.0, fail_paths=(), fail_rm=False, readonly=False, log_path=None, seed=None,
                 fail_nth=None, count_dir=None, down_while=None, fail_rm_nth=(), lost_answer_nth=None,
                 full_while=None):
        self.fail_rate = fail_rate
        self.fail_paths = tuple(fail_paths)
        self.fail_rm = fail_rm
        self.readonly = readonly
        self.log_path = log_path
        self.rng = random.Random(seed if seed is not None else os.getpid())
        # {fragment: [n, ...]}: the nth writes (from 1) of paths holding the
        # fragment fail, counted in ``count_dir`` across every process
        self.fail_nth = {fragment: set(numbers) for fragment, numbers in (fail_nth or {}).items()}
        self.count_dir = count_dir
        # the nth calls (from 1) of rm that fail half-way, counted as fail_nth's
        self.fail_rm_nth = set(fail_rm_nth)
        # a file: while it exists, every write and delete fails (the store is down)
        self.down_while = down_while
        # a file: while it exists, every write fails as on a full disk (reads work)
        self.full_while = full_while
        # {fragment: [n, ...]}: the nth writes of paths holding the fragment
        # land, then fail (the store's answer lost on its way back, as an
        # object store's 500 or a dropped connection after the PUT committed)
        self.lost_answer_nth = {fragment: set(numbers) for fragment, numbers in (lost_answer_nth or {}).items()}

    def _count(self, fragment: str) -> int:
        """How many writes of paths holding ``fragment`` there have been, this one included."""
        name = os.path.join(self.count_dir, "count-" + "".join(c if c.isalnum() else "_" for c in fragment))
        with open(name + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            number = 1
            if os.path.exists(name):
                with open(name) as f:
                    number += int(f.read())
            with open(name, "w") as f:
                f.write(str(number))
        return number

    def after_write(self, path: str) -> None:
        for fragment, numbers in self.lost_answer_nth.items():
            if fragment in path and self._count("landed " + fragment) in numbers:
                self.log(f"lost answer {path}")
                raise OSError(f"injected failure after writing {path} (the write landed)")

    def rm_fails_now(self) -> bool:
        return bool(self.fail_rm_nth) and self._count("rm calls") in self.fail_rm_nth

    def check_up(self, path: str) -> None:
        if self.down_while and os.path.exists(self.down_while):
            self.log(f"down {path}")
            raise OSError(f"injected failure: the store is down ({path})")

    def log(self, what: str) -> None:
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(what + "\n")

    def before_write(self, path: str) -> None:
        if self.readonly:
            raise PermissionError(f"read-only store: {path}")
        self.check_up(path)
        if self.full_while and os.path.exists(self.full_while):
            self.log(f"full {path}")
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        for fragment, numbers in self.fail_nth.items():
            if fragment in path and self._count(fragment) in numbers:
                self.log(f"nth {path}")
                raise OSError(f"injected failure writing {path}")
        if any(fragment in path for fragment in self.fail_paths):
            self.log(f"permanent {path}")
            raise OSError(f"injected permanent failure writing {path}")
        if self.rng.random() < self.fail_rate:
            self.log(f"transient {path}")
            raise OSError(f"injected transient failure writing {path}")


class FlakyLocalFileSystem(LocalFileSystem):
    """Local disk under the ``flaky://`` protocol, with injected write failures."""

    protocol = "flaky"

    def __init__(self, fail_rate=0.0, fail_paths=(), fail_rm=False, readonly=False, log_path=None, seed=None,
                 deny_reads=(), fail_nth=None, count_dir=None, down_while=None, fail_rm_nth=(),
                 lost_answer_nth=None, full_while=None, **kwargs):
        super().__init__(**kwargs)
        self.injector = _Injector(fail_rate, fail_paths, fail_rm, readonly, log_path, seed, fail_nth, count_dir,
                                  down_while, fail_rm_nth, lost_answer_nth, full_while)
        # reads (and listings) of paths holding one of these refused, as S3's
        # AccessDenied on one object or another user's file on a shared disk
        self.deny_reads = tuple(deny_reads)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self.injector.check_up(str(path))
        if any(fragment in path for fragment in self.deny_reads):
            raise PermissionError(13, "Permission denied", path)
        return super().cat_file(path, start=start, end=end, **kwargs)

    def ls(self, path, detail=False, **kwargs):
        # a folder of such a path cannot be listed either (a disk's lost+found)
        if any(fragment in self._strip_protocol(path) for fragment in self.deny_reads):
            raise PermissionError(13, "Permission denied", path)
        return super().ls(path, detail=detail, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("flaky://"):
            path = path[len("flaky://"):]
        return LocalFileSystem._strip_protocol(path)

    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        self.injector.before_write(path)
        self.makedirs(os.path.dirname(path), exist_ok=True)
        if mode == "create":
            # exclusive like a conditional PUT: O_EXCL on the final name
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            with os.fdopen(fd, "wb") as f:
                f.write(value)
        else:
            super().pipe_file(path, value, **kwargs)
        self.injector.after_write(path)

    def put_file(self, lpath, rpath, **kwargs):
        self.injector.before_write(rpath)
        self.makedirs(os.path.dirname(rpath), exist_ok=True)
        return super().put_file(lpath, rpath, **kwargs)

    def rm(self, path, recursive=False, maxdepth=None):
        self.injector.check_up(str(path))
        if self.injector.fail_rm or self.injector.rm_fails_now():
            paths = path if isinstance(path, list) else [path]
            # delete half, then fail: an overwrite interrupted half-way
            super().rm(paths[: len(paths) // 2], recursive=recursive, maxdepth=maxdepth)
            raise OSError("injected failure half-way through a delete")
        return super().rm(path, recursive=recursive, maxdepth=maxdepth)


def register() -> None:
    fsspec.register_implementation("flaky", FlakyLocalFileSystem, clobber=True)


try:
    from s3fs import S3FileSystem
except ImportError:  # pragma: no cover - s3fs is a test dependency
    S3FileSystem = None

if S3FileSystem is not None:

    class FlakyS3FileSystem(S3FileSystem):
        """s3fs with injected write failures (``flakys3://``). With
        ``log_reads``, it also logs each download (``file <path>``) and each
        ``get`` of many files (``batch <count>``)."""

        protocol = ("flakys3",)

        def __init__(self, *args, fail_rate=0.0, fail_paths=(), log_path=None, seed=None, log_reads=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.injector = _Injector(fail_rate, fail_paths, False, False, log_path, seed)
            self.log_reads = log_reads

        async def _get(self, rpath, lpath, **kwargs):
            if self.log_reads:
                self.injector.log(f"batch {len(rpath) if isinstance(rpath, list) else 1}")
            return await super()._get(rpath, lpath, **kwargs)

        async def _get_file(self, rpath, lpath, **kwargs):
            if self.log_reads:
                self.injector.log(f"file {rpath}")
            return await super()._get_file(rpath, lpath, **kwargs)

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            if path.startswith("flakys3://"):
                path = path[len("flakys3://"):]
            return S3FileSystem._strip_protocol(path)

        async def _pipe_file(self, path, data, *args, **kwargs):
            self.injector.before_write(path)
            return await super()._pipe_file(path, data, *args, **kwargs)

        async def _put_file(self, lpath, rpath, *args, **kwargs):
            self.injector.before_write(rpath)
            return await super()._put_file(lpath, rpath, *args, **kwargs)

    def register_s3() -> None:
        fsspec.register_implementation("flakys3", FlakyS3FileSystem, clobber=True)
