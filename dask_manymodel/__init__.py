"""dask_manymodel: one model per group of a Dask DataFrame.

``import dask_manymodel`` registers the ``manymodel`` accessor on Dask
DataFrames (see :mod:`dask_manymodel.accessor`).
"""

from __future__ import annotations

__version__ = "0.1.0"

# Imported for its side effect: registering ``ddf.manymodel``.
from . import accessor as _accessor  # noqa: F401
from ._client import IgnoreInterrupts
from .api import DPF, ManyModelInference, ManyModelTraining
from .context import DataConnector, PartitionContext
from .exceptions import (
    FileSetDeletedError,
    FileSetExistsError,
    FileSetNotFoundError,
    InvalidArgumentError,
    InvalidURLError,
    ManyModelError,
    MissingDependencyError,
    ModelNotAvailableError,
    PartitionNotFoundError,
    ReadOnlyRunError,
    RunExistsError,
    RunNotFoundError,
    RunTimeoutError,
    StorageError,
)
from .options import ExecutionOptions
from .run import ManyModelRun, PartitionDetails, PartitionStatus, RunStatus
from .fileset import FileSet
from .serde import ModelSerde, PickleSerde, TensorFlowSerde, TorchSerde

__all__ = [
    "DPF",
    "DataConnector",
    "ExecutionOptions",
    "FileSet",
    "FileSetDeletedError",
    "FileSetExistsError",
    "FileSetNotFoundError",
    "IgnoreInterrupts",
    "InvalidArgumentError",
    "InvalidURLError",
    "ManyModelError",
    "ManyModelInference",
    "ManyModelRun",
    "ManyModelTraining",
    "MissingDependencyError",
    "ModelNotAvailableError",
    "ModelSerde",
    "PartitionContext",
    "PartitionDetails",
    "PartitionNotFoundError",
    "PartitionStatus",
    "PickleSerde",
    "ReadOnlyRunError",
    "RunExistsError",
    "RunNotFoundError",
    "RunStatus",
    "RunTimeoutError",
    "StorageError",
    "TensorFlowSerde",
    "TorchSerde",
    "__version__",
]
