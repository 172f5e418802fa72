"""Optional heavy dependencies, imported only where they are used."""

from __future__ import annotations

import importlib
from types import ModuleType

from .exceptions import missing_dependency

#: import name -> the dask-manymodel extra that installs it
EXTRAS = {"torch": "torch", "tensorflow": "tensorflow", "s3fs": "s3"}


def import_optional(name: str) -> ModuleType:
    """Import ``name``, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise missing_dependency(name, EXTRAS.get(name, name)) from exc
