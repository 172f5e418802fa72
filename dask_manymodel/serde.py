"""How a model becomes a file and back: :class:`ModelSerde` and its kinds.

A serde works on local files only; the engine writes to a local temp file and
uploads it through fsspec, and reading downloads first. That keeps every
serde free of storage concerns, and lets libraries that want a real path
(Keras, torch) have one.

.. warning::
   :class:`PickleSerde` and ``TorchSerde(weights_only=False)`` run code from
   the file when they read it. Load models only from storage you trust.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import cloudpickle

__all__ = ["ModelSerde", "PickleSerde", "serde_from_manifest", "serde_to_manifest"]


class ModelSerde(abc.ABC):
    """Base class of model serializers.

    Subclasses set :attr:`filename` and implement :meth:`write` and
    :meth:`read`. Both take a path on the local disk.

    Examples
    --------
    >>> import json
    >>> class JsonSerde(ModelSerde):
    ...     filename = "model.json"
    ...     def write(self, model, file_path):
    ...         with open(file_path, "w") as f:
    ...             json.dump(model, f)
    ...     def read(self, file_path):
    ...         with open(file_path) as f:
    ...             return json.load(f)
    """

    #: Name of the model file inside each group's folder.
    filename: str = "model"

    @abc.abstractmethod
    def write(self, model: Any, file_path: str) -> None:
        """Write ``model`` to the local file ``file_path``."""

    @abc.abstractmethod
    def read(self, file_path: str) -> Any:
        """Read a model back from the local file ``file_path``."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(filename={self.filename!r})"


class PickleSerde(ModelSerde):
    """Serialize any Python object with cloudpickle (the default serde).

    Reading a pickle runs code from the file: load only files you trust.

    Parameters
    ----------
    filename : str
        Name of the model file in each group's folder.
    """

    def __init__(self, filename: str = "model.pkl"):
        self.filename = filename

    def write(self, model: Any, file_path: str) -> None:
        with open(file_path, "wb") as f:
            cloudpickle.dump(model, f)

    def read(self, file_path: str) -> Any:
        with open(file_path, "rb") as f:
            return cloudpickle.load(f)


def serde_to_manifest(serde: ModelSerde) -> dict:
    """What ``_run.json`` records of a serde: its class and file name."""
    cls = type(serde)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "filename": serde.filename}


def serde_from_manifest(entry: dict) -> ModelSerde | None:
    """Rebuild a serde recorded by :func:`serde_to_manifest`, if its class can
    be built without arguments besides ``filename``; otherwise None."""
    module_name, _, qualname = entry["class"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), qualname)
    except (ImportError, AttributeError):
        return None
    try:
        return cls(filename=entry["filename"])
    except TypeError:
        try:
            serde = cls()
        except TypeError:
            return None
        serde.filename = entry["filename"]
        return serde
