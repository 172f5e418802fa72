"""The documentation builds in strict mode, and its python examples run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))


def test_docs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    mkdocs = shutil.which("mkdocs", path=os.path.dirname(sys.executable)) or "mkdocs"
    out = subprocess.run(
        [mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "restore_from" in api and "to_torch_dataset" in api  # generated from the docstrings


def python_blocks(page: Path) -> list[str]:
    # ```python blocks run; ```py blocks (cluster set-ups) are shown only
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_docs_examples_run(page, tmp_path, children_temp):
    code = "\n\n".join(python_blocks(page))
    # torch and TensorFlow are extras: without them (pip install -e '.[test]'
    # alone, as on Pythons that torch has no wheel for) their pages skip
    for module, used in (("torch", r"\bto_torch_|\bimport torch\b"), ("tensorflow", r"\bto_tf_|\bimport tensorflow\b")):
        if re.search(used, code):
            pytest.importorskip(module)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    if "tempfile.mkdtemp()" in code:
        assert os.listdir(children_temp)  # its runs' folders, here, not in /tmp


def test_every_page_is_in_the_navigation():
    nav = (ROOT / "mkdocs.yml").read_text()
    assert [p.name for p in PAGES if f": {p.name}" not in nav] == []


def test_the_bad_input_table_has_a_row_per_tested_case():
    """docs/bad-input.md is taken from tests/test_bad_input.py: each case's
    error class and message are on one row of the page."""
    from . import test_bad_input

    rows = [line for line in (ROOT / "docs" / "bad-input.md").read_text().splitlines() if line.startswith("| ")]
    for case_id, _, error, fragment in test_bad_input.CASES:
        assert any(f"`{error.__name__}`" in row and fragment in row for row in rows), case_id


def test_the_error_classes_the_docs_name_exist():
    import builtins

    from dask_manymodel import exceptions

    text = "\n".join(page.read_text() for page in PAGES)
    named = set(re.findall(r"`([A-Z][A-Za-z]+Error)`", text))
    assert named and [name for name in sorted(named) if not hasattr(exceptions, name) and not hasattr(builtins, name)] == []


def test_the_snowflake_page_maps_every_class_and_run_method():
    page = (ROOT / "docs" / "snowflake.md").read_text()
    names = [
        "ManyModelTraining", "ManyModelInference", "DPF", "ModelSerde", "PickleSerde", "TorchSerde",
        "TensorFlowSerde", "PartitionContext", "DataConnector", "FileSet", "ExecutionOptions",
        "run.wait()", "run.get_progress()", "run.partition_details", "run.get_model(partition_id)",
        "run.cancel()", "restore_from(run_id, stage_name)",
    ]
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert [name for name in names if not any(row.split(" | ")[0].find(name) >= 0 for row in rows)] == []
