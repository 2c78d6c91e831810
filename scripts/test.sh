#!/usr/bin/env bash
# Install personclf-tune with its test extras into ./.venv and run the whole test suite.
# Used as-is by README ("run the tests") and by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test,postgres]"
export TF_CPP_MIN_LOG_LEVEL=2
python -m pytest "$@"
