#!/usr/bin/env bash
# Create .venv (if missing) and install mimkit with its dependencies; fetch Fashion-MNIST.
# Used by scripts/quickstart.sh and scripts/test.sh. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the release this project is tested with (pip takes it from a local
# wheel cache when one is configured, otherwise from PyPI)
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mimkit, torch, timm" || { echo "mimkit did not install; see the pip output above" >&2; exit 1; }

# Fashion-MNIST: Debian's package where apt is available, else the official files (checksummed)
if ! .venv/bin/python -c "from mimkit.data import find_fashion_mnist; find_fashion_mnist()" >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  fi
fi
if ! .venv/bin/python -c "from mimkit.data import find_fashion_mnist; find_fashion_mnist()" >/dev/null 2>&1; then
  echo "Fashion-MNIST not installed by apt; downloading the official files (checksums verified)" >&2
  .venv/bin/python -c "from mimkit.data import download_fashion_mnist; print(download_fashion_mnist())"
fi
