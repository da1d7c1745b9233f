#!/usr/bin/env bash
# The tests: install, then run the whole suite (CPU, under 10 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# setup_env.sh installed Fashion-MNIST: a test that needs it fails when it is missing instead of skipping
MIMKIT_REQUIRE_FMNIST=1 .venv/bin/python -m pytest -q "$@"
