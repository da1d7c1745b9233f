#!/usr/bin/env bash
# The tests: install, then run the whole suite (CPU, under 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -m pytest -q "$@"
