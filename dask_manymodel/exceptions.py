"""Every error that dask_manymodel raises on purpose.

Each class inherits from :class:`ManyModelError` *and* from the builtin that
fits it, so ``except ValueError`` keeps working for code that does not know
this library::

    ManyModelError
    ├── InvalidArgumentError     (ValueError)   bad input, found before any compute
    ├── InvalidURLError          (ValueError)   a URL fsspec cannot open
    ├── RunExistsError           (FileExistsError)
    ├── FileSetExistsError       (FileExistsError)
    ├── FileSetNotFoundError     (FileNotFoundError)
    ├── FileSetDeletedError      (RuntimeError) a FileSet used after delete()
    ├── RunNotFoundError         (FileNotFoundError)
    ├── PartitionNotFoundError   (KeyError)     no such group in a run
    ├── ModelNotAvailableError   (LookupError)  the group exists but has no DONE model
    ├── ReadOnlyRunError         (RuntimeError) wait()/cancel() on a restored run
    ├── RunTimeoutError          (TimeoutError)
    ├── StorageError             (OSError)      the store failed underneath us
    └── MissingDependencyError   (ImportError)  a dependency is not installed (here, or on the workers)

Foreign errors (fsspec, distributed, torch) are translated in one place each,
with ``raise ... from exc`` so the original stays in the traceback.
"""

from __future__ import annotations

__all__ = [
    "FileSetDeletedError",
    "FileSetExistsError",
    "FileSetNotFoundError",
    "InvalidArgumentError",
    "InvalidURLError",
    "ManyModelError",
    "MissingDependencyError",
    "ModelNotAvailableError",
    "PartitionNotFoundError",
    "ReadOnlyRunError",
    "RunExistsError",
    "RunNotFoundError",
    "RunTimeoutError",
    "StorageError",
]


class ManyModelError(Exception):
    """Base class of every error raised on purpose by dask_manymodel."""


class InvalidArgumentError(ManyModelError, ValueError):
    """An argument is wrong; raised before any compute, nothing is written."""


class InvalidURLError(ManyModelError, ValueError):
    """A URL names a protocol fsspec does not know, or cannot be reached."""


class RunExistsError(ManyModelError, FileExistsError):
    """A run with this run_id already exists at the URL."""


class FileSetExistsError(ManyModelError, FileExistsError):
    """A FileSet with this name already exists (FileSets are immutable)."""


class FileSetNotFoundError(ManyModelError, FileNotFoundError):
    """No FileSet with this name exists at the URL."""


class FileSetDeletedError(ManyModelError, RuntimeError):
    """The FileSet was deleted; this handle can no longer be used."""


class RunNotFoundError(ManyModelError, FileNotFoundError):
    """No run with this run_id exists at the URL."""


class PartitionNotFoundError(ManyModelError, KeyError):
    """The run has no group with this partition_id."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelNotAvailableError(ManyModelError, LookupError):
    """The group exists in the run but did not finish DONE, so it has no model."""


class ReadOnlyRunError(ManyModelError, RuntimeError):
    """A restored run handle cannot wait for or cancel work it did not start."""


class RunTimeoutError(ManyModelError, TimeoutError):
    """``wait(timeout=...)`` ran out of time; the run goes on."""


class StorageError(ManyModelError, OSError):
    """Reading or writing the store failed."""


class MissingDependencyError(ManyModelError, ImportError):
    """A dependency is missing, here or on the workers (dask_manymodel itself,
    or an optional extra); the message names what to install, and where."""


def missing_dependency(package: str, extra: str) -> MissingDependencyError:
    """Build the error for an optional package that is not installed. Raised
    in a Dask worker (a group's function, a serde), it says so: the client,
    where the user looks, may well have the package."""
    try:
        import distributed

        worker = distributed.get_worker().address
    except (ImportError, ValueError):
        return MissingDependencyError(
            f"{package} is required for this; install it with `pip install 'dask-manymodel[{extra}]'`"
        )
    return MissingDependencyError(
        f"{package} is required for this, and this Dask worker ({worker}) does not have it; install it "
        f"in the workers' environment (their image), not only on the client: `pip install "
        f"'dask-manymodel[{extra}]'`"
    )
