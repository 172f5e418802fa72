#!/usr/bin/env bash
# Create the venv, install dask_manymodel with every extra, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
# --no-cache-dir: the venv takes about 3.5 GB (torch, tensorflow); pip's cache
# of the same wheels would add more on a machine whose disk may be near full.
.venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir -c constraints.txt -e ".[test,docs,all]"
exec .venv/bin/python -m pytest "$@"
