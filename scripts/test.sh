#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, nothing installed) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0 scikit-build-core ninja
python -m pip install -q --no-build-isolation ".[test]"
python -m pytest -q -ra "$@"
