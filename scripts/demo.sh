#!/usr/bin/env bash
# Create the venv, install dask_manymodel, train 1,000 models on a LocalCluster.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir -c constraints.txt -e .
exec .venv/bin/dask-manymodel demo --url ./manymodel-demo "$@"
