"""What ``help()`` says: the docstrings' Parameters sections name exactly the
arguments the signatures take, and the examples in them run."""

from __future__ import annotations

import doctest
import importlib
import inspect
import re

import pytest

import dask_manymodel
from dask_manymodel.accessor import ManyModelAccessor
from dask_manymodel.run import Artifacts

_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\n", re.MULTILINE)
_ENTRY = re.compile(r"^(\*{0,2}\w+(?:, *\*{0,2}\w+)*)(?: :.*)?$")


def _public_callables() -> list[tuple[str, object]]:
    found = []
    classes = [getattr(dask_manymodel, name) for name in dask_manymodel.__all__ if not name.startswith("_")]
    for obj in classes + [ManyModelAccessor, Artifacts]:
        if not callable(obj):
            continue
        found.append((obj.__qualname__, obj))
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            for name, member in vars(obj).items():
                if name.startswith("_"):
                    continue
                member = getattr(obj, name)
                if inspect.isfunction(member) or inspect.ismethod(member):
                    found.append((f"{obj.__qualname__}.{name}", member))
    return found


def _documented(doc: str) -> set[str] | None:
    """The names of the Parameters section of a numpydoc docstring, or None."""
    sections = list(_SECTION.finditer(doc))
    for i, section in enumerate(sections):
        if section.group(1) != "Parameters":
            continue
        end = sections[i + 1].start() if i + 1 < len(sections) else len(doc)
        names = set()
        for line in doc[section.end():end].splitlines():
            if line and not line[0].isspace():
                entry = _ENTRY.match(line.strip())
                assert entry, f"not a parameter line: {line!r}"
                names.update(name.strip().lstrip("*") for name in entry.group(1).split(","))
        return names
    return None


def _accepted(obj: object) -> set[str]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    return {name for name in params if name not in ("self", "cls") and not name.startswith("_")}


@pytest.mark.parametrize("name, obj", _public_callables(), ids=lambda value: value if isinstance(value, str) else "")
def test_the_parameters_section_names_the_signature(name, obj):
    doc = inspect.getdoc(obj)
    documented = _documented(doc or "")
    if documented is None:
        return  # no Parameters section (a method of no arguments, or prose)
    accepted = _accepted(obj)
    assert documented - accepted == set(), f"{name} documents parameters it does not take"
    assert accepted - documented == set(), f"{name} takes parameters its Parameters section leaves out"


#: The modules whose docstrings hold examples (``>>>``); the others have none.
_MODULES = ["dask_manymodel.cli", "dask_manymodel.context", "dask_manymodel.serde"]


@pytest.mark.parametrize("module_name", _MODULES)
def test_the_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    globs = {**vars(dask_manymodel), **vars(module)}
    result = doctest.testmod(module, globs=globs, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no docstring example left: take it off the list"
    assert result.failed == 0
