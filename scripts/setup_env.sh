#!/usr/bin/env bash
# Create .venv (if missing) and install mimkit with its dependencies; fetch Fashion-MNIST.
# Used by scripts/quickstart.sh and scripts/test.sh. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$SECONDS
say() { echo "[setup $((SECONDS - START))s] $*" >&2; }
if [ ! -x .venv/bin/python ]; then
  say "1/4 creating the virtual environment .venv with $PY"
  "$PY" -m venv .venv
else
  say "1/4 using the existing virtual environment .venv"
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned to the release this project is tested with (pip takes it from a local
# wheel cache when one is configured, otherwise from PyPI)
say "2/4 installing torch 2.14.1 + torchvision 0.29.1 (a download of up to a few GB on a fresh machine: minutes)"
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
say "3/4 installing mimkit (editable) with timm, safetensors, matplotlib, pytest ..."
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import mimkit, torch, timm" || { echo "mimkit did not install; see the pip output above" >&2; exit 1; }
say "installed: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "CUDA" if torch.cuda.is_available() else "CPU only")')"

# Fashion-MNIST: Debian's package where apt is available, else the official files (checksummed)
say "4/4 looking for Fashion-MNIST (30 MB)"
if ! .venv/bin/python -c "from mimkit.data import find_fashion_mnist; find_fashion_mnist()" >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    say "    installing Debian's dataset-fashion-mnist package with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    say "    installing Debian's dataset-fashion-mnist package with sudo apt-get"
    (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || true
  fi
fi
if ! .venv/bin/python -c "from mimkit.data import find_fashion_mnist; find_fashion_mnist()" >/dev/null 2>&1; then
  echo "Fashion-MNIST not installed by apt; downloading the official files (checksums verified)" >&2
  .venv/bin/python -c "from mimkit.data import download_fashion_mnist; print(download_fashion_mnist())"
fi
say "done: activate with 'source .venv/bin/activate', then e.g. 'mimkit pretrain configs/mae_fashion_mnist.yaml'"
