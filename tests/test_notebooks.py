"""Every notebook runs, on the CPU, in under a minute, and is stored without outputs."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

FOLDER = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(FOLDER.glob("*.ipynb"))
NEEDS = {"02_pytorch_per_group.ipynb": "torch", "03_tensorflow_and_fileset.ipynb": "tensorflow"}


def test_there_are_three_notebooks():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb", "02_pytorch_per_group.ipynb", "03_tensorflow_and_fileset.ipynb"
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_notebooks_are_what_the_script_writes(tmp_path):
    """notebooks/make_notebooks.py is the source; the .ipynb files must not drift from it."""
    spec = importlib.util.spec_from_file_location("make_notebooks", FOLDER / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(tmp_path)
    for path in NOTEBOOKS:
        assert (tmp_path / path.name).read_text() == path.read_text(), (
            f"{path.name} differs from make_notebooks.py; run python notebooks/make_notebooks.py"
        )


def execute(path: Path, tmp_path: Path, temp: Path) -> tuple[str, list[dict]]:
    """Run a notebook in a fresh kernel whose temp folder (TMPDIR) is
    ``temp``; return its text output and all outputs."""
    if path.name in NEEDS:
        pytest.importorskip(NEEDS[path.name])
    notebook = nbformat.read(path, as_version=4)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(
        notebook, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    assert os.listdir(temp)  # the notebook's url (tempfile.mkdtemp()), here, not in /tmp
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    text = "\n".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")) for output in outputs)
    assert "Traceback" not in text and "Error" not in text.replace("ValueError: store 13", "")
    return text, outputs


def test_quickstart(tmp_path, children_temp):
    text, outputs = execute(FOLDER / "01_quickstart.ipynb", tmp_path, children_temp)
    assert "PARTIAL_FAILURE" in text and "13 ValueError: store 13 is closed" in text
    assert "INFO dask_manymodel.user: store 7: 100 rows" in text  # the group's captured log
    html = "\n".join(str(o.get("data", {}).get("text/html", "")) for o in outputs)
    assert "<strong>PARTIAL_FAILURE</strong>, 50 groups" in html  # the run's notebook display
    if importlib.util.find_spec("ipywidgets"):
        # run.wait() and run.progress() draw widgets, not text bars
        widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert len(widgets) >= 3
        assert "IProgress not found" not in text


def test_pytorch_per_group(tmp_path, children_temp):
    text, _ = execute(FOLDER / "02_pytorch_per_group.ipynb", tmp_path, children_temp)
    assert "SUCCESS" in text
    weight, bias = map(float, re.search(r"^([-0-9.e]+) ([-0-9.e]+)$", text, flags=re.M).groups())
    assert weight == pytest.approx(2.0, abs=0.05) and bias == pytest.approx(0.5, abs=0.05)
    assert "final loss" in text


def test_tensorflow_and_fileset(tmp_path, children_temp):
    text, _ = execute(FOLDER / "03_tensorflow_and_fileset.ipynb", tmp_path, children_temp)
    assert "SUCCESS" in text and "2 files, 400 rows" in text
    prediction = float(re.search(r"array\(\[\[([-0-9.e]+)\]\]", text).group(1))
    assert prediction == pytest.approx(3.0, abs=0.1)
