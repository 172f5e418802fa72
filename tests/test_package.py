"""The package surface: exports, lazy heavy imports, the accessor, declared
dependencies, and what the sdist and the wheel hold."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from packaging.version import Version

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


ROOT = Path(__file__).resolve().parent.parent
# modules whose distribution has another name
DISTRIBUTION_OF = {"distributed": "dask", "tensorflow": "tensorflow-cpu"}
# modules imported only where the optional feature is used (import_optional)
LAZY_MODULES = {"connectors/_torch_dataset.py"}


def _requirements() -> tuple[set[str], set[str]]:
    """Distribution names of install_requires, and of all extras."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")

    def names(text: str) -> set[str]:
        lines = [line.split("#")[0].strip() for line in text.splitlines()]
        return {re.split(r"[\[<>=!~; ]", line)[0].lower() for line in lines if line}

    extras = set().union(*(names(v) for v in config["options.extras_require"].values()))
    return names(config["options"]["install_requires"]), extras


def test_every_import_of_the_package_is_declared():
    """A third-party module the package imports is in install_requires when
    ``import dask_manymodel`` loads it (module level), and in an extra at
    least when only one feature imports it: an undeclared one fails only
    for users who install the wheel into a fresh environment."""
    required, extras = _requirements()
    for path in sorted((ROOT / "dask_manymodel").rglob("*.py")):
        rel = path.relative_to(ROOT / "dask_manymodel").as_posix()
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "dask_manymodel":
                    continue
                dist = DISTRIBUTION_OF.get(top, top).lower()
                where = f"{rel}:{node.lineno} imports {top}"
                if id(node) in module_level and rel not in LAZY_MODULES:
                    assert dist in required, f"{where} at module level: add {dist} to install_requires"
                else:
                    assert dist in required | extras, f"{where}: add {dist} to install_requires or an extra"


def test_python_3_12_and_later_get_a_distributed_that_stops_bokeh_3_10():
    """bokeh 3.10 needs Python 3.12+ and raises when distributed before
    2026.8 stops the dashboard as a scheduler closes (a LocalCluster stayed
    "closing", an asynchronous one raised RuntimeError). pip still paired them:
    with the test extras it backtracked to distributed 2026.7.1, and a user's
    environment with dask 2026.7 kept it and got bokeh 3.10 from us."""
    from packaging.requirements import Requirement

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = [line.split("#")[0].strip() for line in config["options"]["install_requires"].splitlines()]
    # distributed pins dask to its own version, so a floor on either is one on both
    requirements = [r for r in map(Requirement, filter(None, lines)) if r.name in ("dask", "distributed")]
    for python in ("3.12", "3.13"):
        applying = [r for r in requirements if r.marker is None or r.marker.evaluate({"python_version": python})]
        assert any(not r.specifier.contains("2026.7.1") for r in applying), (python, [str(r) for r in applying])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and the wheel, built from a copy of the tracked files (so
    the build leaves nothing in the checkout and sees no untracked file)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout")
    # pyproject's build requirements, which pip would install in isolation
    # (the stock setuptools of a fresh venv is older, and before 70.1 needs wheel)
    try:
        setuptools_version = Version(importlib.metadata.version("setuptools"))
    except importlib.metadata.PackageNotFoundError:  # a venv of Python 3.12+ comes without it
        pytest.skip("needs setuptools>=64 and wheel (or setuptools>=70.1), has no setuptools")
    if setuptools_version < Version("64") or (
        setuptools_version < Version("70.1") and importlib.util.find_spec("wheel") is None
    ):
        pytest.skip(f"needs setuptools>=64 and wheel (or setuptools>=70.1), has {setuptools_version}")
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    source = tmp_path_factory.mktemp("source")
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    built = []
    for hook in ("build_sdist", "build_wheel"):  # one process each, as pip and build do
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.{hook}(sys.argv[1]))"
        result = subprocess.run(
            [sys.executable, "-c", code, str(out)], cwd=source, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr[-3000:]
        # setuptools logs on stdout too
        built.append([line for line in result.stdout.splitlines() if line.startswith("BUILT ")][-1].split()[1])
    sdist, wheel = built
    return tracked, out / sdist, out / wheel


def test_sdist_holds_the_source_tree_and_license(built):
    tracked, sdist, _ = built
    with tarfile.open(sdist) as tar:
        prefix = f"dask_manymodel-{dask_manymodel.__version__}/"
        members = {name.removeprefix(prefix) for name in tar.getnames()}
    # the tests of an unpacked sdist run: conftest.py, flaky_fs.py and the
    # docs, notebooks and scripts they read are there
    missing = sorted(set(tracked) - {".gitignore"} - members)
    assert missing == [], f"not in the sdist: {missing}"
    assert "LICENSE" in members  # setup.cfg's license names BSD-3-Clause, whose text must go along
    assert not [m for m in members if "__pycache__" in m or m.endswith(".pyc")]


def test_wheel_holds_every_module_and_nothing_else(built):
    _, _, wheel = built
    with zipfile.ZipFile(wheel) as whl:
        names = set(whl.namelist())
        info = f"dask_manymodel-{dask_manymodel.__version__}.dist-info/"
        metadata = whl.read(info + "METADATA").decode()
        entry_points = whl.read(info + "entry_points.txt").decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "dask_manymodel").rglob("*.py")}
    package = {n for n in names if not n.startswith(info)}
    # every module and the PEP 561 marker (without it mypy and pyright skip the
    # package: "module is installed, but missing library stubs or py.typed
    # marker"), and no tests, notebooks or caches
    assert package == modules | {"dask_manymodel/py.typed"}
    assert {n for n in names if n.startswith(info) and n.endswith("/LICENSE")}  # licenses/ since setuptools 72
    assert f"\nVersion: {dask_manymodel.__version__}\n" in metadata
    assert "dask-manymodel = dask_manymodel.cli:main" in entry_points
