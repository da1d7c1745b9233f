#!/usr/bin/env bash
# The GPU speed suite (issue 14) in one command: `mimkit bench` on the visible GPU, writing
# bench.json + bench.md under $OUT. Sized for one H100 in under 8 minutes including compilation
# (the bench stops starting rows after BUDGET_S seconds and lists what it left out).
#
#   bash benchmarks/gpu_suite.sh                 # the measurement (GPU)
#   bash benchmarks/gpu_suite.sh --smoke         # the same rows at tiny shapes, any device, < 1 min
#   OUT=runs/bench/h100 JPEGS=20000 BUDGET_S=330 bash benchmarks/gpu_suite.sh --methods mae,emae
#
# Rows: matmul ceiling; every method's training step on device-resident images at ViT-B/16 224 px
# (bf16, fused AdamW, torch.compile; FLOPs from torch's FlopCounterMode, MFU vs the ceiling, peak
# memory); Hugging Face ViTMAEForPreTraining at the same shapes/batch/precision; the trainer end to end
# on JPEG files written here (mixed sizes) through each input path (GPU decode, uint8 shards from
# `mimkit data prepare`, PIL workers); the Fashion-MNIST workload end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
stamp=$(date -u +%Y%m%d-%H%M%S)

if [ "${1:-}" = "--smoke" ]; then
  shift
  exec "$PY" -m mimkit.cli bench --smoke --out "${OUT:-runs/bench/smoke-$stamp}" "$@"
fi

# the peer and the optional decoder: installed when missing; offline, the bench notes what it skipped
"$PY" -c "import transformers" 2>/dev/null || "$PY" -m pip install -q "transformers>=4.40" \
  || echo "gpu_suite: transformers could not be installed; the peer row is skipped" >&2
"$PY" -c "import torchcodec.decoders" 2>/dev/null || "$PY" -m pip install -q torchcodec \
  || echo "gpu_suite: torchcodec could not be installed; GPU decoding uses torchvision's nvJPEG" >&2
command -v nvidia-smi >/dev/null && { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; }

exec "$PY" -m mimkit.cli bench --out "${OUT:-runs/bench/gpu-$stamp}" --budget-s "${BUDGET_S:-330}" \
  --jpegs "${JPEGS:-20000}" --jpeg-dir "${JPEG_DIR:-/tmp/mimkit-bench-jpegs}" "$@"
