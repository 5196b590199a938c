#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine, then runs it (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")"
# torch first and pinned: 2.13.0 is a local CPU wheel here; an unpinned torch pulls GBs of CUDA wheels.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,triton,formats]"
python -m pytest -q "$@"
