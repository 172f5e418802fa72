"""The package surface: exports, lazy heavy imports, the accessor."""

from __future__ import annotations

import subprocess
import sys

import dask.dataframe as dd
import pandas as pd
import pytest

import dask_manymodel
from dask_manymodel import ManyModelError


def test_all_is_sorted_and_importable():
    assert dask_manymodel.__all__ == sorted(dask_manymodel.__all__)
    for name in dask_manymodel.__all__:
        assert getattr(dask_manymodel, name) is not None


def test_import_does_not_load_torch_or_tensorflow():
    code = (
        "import sys, dask_manymodel, dask.dataframe as dd, pandas as pd\n"
        "dd.from_pandas(pd.DataFrame({'a': [1]}), npartitions=1).manymodel\n"
        "print(sorted(m for m in ('torch', 'tensorflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_accessor_is_registered_and_keeps_attribute_errors_visible(monkeypatch):
    ddf = dd.from_pandas(pd.DataFrame({"g": [1, 2], "x": [1.0, 2.0]}), npartitions=1)
    assert isinstance(ddf.manymodel, dask_manymodel.accessor.ManyModelAccessor)

    def broken(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'fit'")

    monkeypatch.setattr(dask_manymodel.accessor, "start_run", broken)
    with pytest.raises(ManyModelError, match="no attribute 'fit'"):
        ddf.manymodel.train(lambda data, ctx: None, by="g", url="memory://x", run_id="r1")
