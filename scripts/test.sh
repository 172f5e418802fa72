#!/usr/bin/env bash
# Create the venv, install dask_manymodel with every extra, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,docs,all]"
exec .venv/bin/python -m pytest "$@"
