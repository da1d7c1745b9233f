#!/usr/bin/env bash
# Everything a lent GPU session measures, as one prepared command (device time is scarce: ~15 minutes
# per session with the machine's start included, so this stays under ~7 minutes and leaves room for one
# rerun). Works under $WORK (default /tmp/mimkit-device) and copies the few files worth keeping to $OUT
# (default runs/device-<stamp>; the device tool brings back at most 8 files):
#   env.txt     nvidia-smi, python, torch and the device name
#   bench.md, bench.json   the GPU speed suite (benchmarks/gpu_suite.sh, row budget BUDGET_S, default 240 s)
#   zoo.md, zoo_runs.csv   the zoo's GPU variant: the Fashion-MNIST zoo's 12 configs, seed 0, kNN + linear
#               (ZOO_PROTOCOLS), stopped after ZOO_S seconds (default 150; rerun with the same WORK continues)
# No package is installed: the GPU image has torch, timm, transformers, safetensors; mimkit runs from src/.
#   bash benchmarks/device_session.sh            # on the GPU machine, from the repository root
#   bash benchmarks/device_session.sh --smoke    # the same steps at tiny shapes on any machine (< 3 min)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-runs/device-$(date -u +%Y%m%d-%H%M%S)}
WORK=${WORK:-/tmp/mimkit-device}
mkdir -p "$OUT" "$WORK"
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== 1/2 GPU speed suite" >&2
if [ $smoke = 1 ]; then
  PYTHON="$PY" OUT="$WORK/bench" bash benchmarks/gpu_suite.sh --smoke --methods mae,pcae
else
  PYTHON="$PY" OUT="$WORK/bench" BUDGET_S="${BUDGET_S:-240}" JPEGS="${JPEGS:-8000}" \
    JPEG_DIR="$WORK/jpegs" bash benchmarks/gpu_suite.sh
fi
suite=$?
cp "$WORK"/bench/bench.md "$WORK"/bench/bench.json "$OUT"/

echo "== 2/2 the zoo's GPU variant (seed 0, ${ZOO_PROTOCOLS:-knn,linear}, at most ${ZOO_S:-150} s)" >&2
extra=()
[ $smoke = 1 ] && extra=(model.encoder.embed_dim=32 model.encoder.depth=1 model.encoder.num_heads=2
  model.decoder.embed_dim=16 model.decoder.depth=1 model.decoder.num_heads=2 data.limit=512 train.epochs=1
  --limit-train 500 --limit-test 200)
MIMKIT="$PY -m mimkit.cli" OUT="$WORK/zoo" timeout -s INT "${ZOO_S:-150}" bash benchmarks/zoo_fashion_mnist.sh \
  --seeds 0 --protocols "${ZOO_PROTOCOLS:-knn,linear}" --no-progress train.progress_bar=false "${extra[@]}"
zoo=$?
cp "$WORK"/zoo/zoo.md "$OUT"/zoo.md
cp "$WORK"/zoo/runs.csv "$OUT"/zoo_runs.csv
echo "device_session: suite exit $suite, zoo exit $zoo (124/130: stopped at ZOO_S, rerun to continue)" >&2
ls -l "$OUT" >&2
exit $suite
