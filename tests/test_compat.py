"""A missing optional dependency names the extra to install."""

import sys

import pytest

from dask_manymodel import MissingDependencyError, TorchSerde
from dask_manymodel._compat import import_optional


def test_missing_torch_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'dask-manymodel\[torch\]'"):
        TorchSerde().read(str(tmp_path / "model.pt"))
    with pytest.raises(ImportError):
        import_optional("torch")
