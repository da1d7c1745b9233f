#!/usr/bin/env bash
# Everything a lent GPU session measures, as one prepared command (device time is scarce: ~15 minutes
# per session with the machine's start included, and one command may run 10 minutes: the default stages
# take about 7, most important first, so a cut-off run still brings back the first ones). Works under
# $WORK (default /tmp/mimkit-device) and copies the files worth keeping to $OUT (default
# runs/device-<stamp>; the device tool brings back at most 8 files, so the tables stay as JSON:
# `python -c "import json,sys; from mimkit.bench import markdown; print(markdown(json.load(open(sys.argv[1]))))" F`
# renders a bench file). STAGES picks what runs; they run in this order:
#   graphs  the Fashion-MNIST step with CUDA graphs (train.compile_mode=reduce-overhead): the trainer and
#           a bare loop at batch 512 (benchmarks/step_overhead.py) -> step_overhead_true_reduce-overhead.json
#   syncs   every Fashion-MNIST preset through the trainer (eager, 8 steps) under torch's sync watch: which
#           steps wait for the GPU, and where (benchmarks/sync_check.py) -> sync_check.json
#   profile MAE ViT-B/16's compiled step profiled: kernel time by category, matmul/attention TFLOP/s
#           (benchmarks/profile_step.py) -> profile_mae.json
#   eager   every method eager at ViT-B/16 with the peer, for the FLOP-ratio check (mimkit bench
#           --no-compile --no-e2e, row budget EAGER_S, default 100 s) -> bench_eager.json
#   jpeg    the JPEG input path's stages timed apart on 4,096 files (benchmarks/jpeg_path.py) -> jpeg_path.json
#   vitb    MAE ViT-B/16 model only and the peer, compiled with CUDA graphs (mimkit bench --compile-mode
#           reduce-overhead --no-e2e, row budget VITB_S, default 150 s) -> bench_graphs.json
#   suite   the whole GPU speed suite in torch.compile's default mode (benchmarks/gpu_suite.sh, row budget
#           BUDGET_S, default 240 s, 8,000 JPEG files) -> bench.md/.json
#   zoo     the zoo's GPU variant: the Fashion-MNIST zoo's 12 configs, seed 0, kNN + linear (ZOO_PROTOCOLS),
#           stopped after ZOO_S seconds (default 150; rerun with the same WORK continues) -> zoo.md, zoo_runs.csv
# Default STAGES="graphs syncs profile eager jpeg vitb" (suite and zoo ran on 2026-12-04: BENCHMARKS.md, "GPU
# speed"; run them as a second command: more files than the tool brings back in one).
# env.txt (nvidia-smi, python, torch, the device) is always written. No package is installed: the GPU image
# has torch, timm, transformers, safetensors; mimkit runs from src/.
#   bash benchmarks/device_session.sh            # on the GPU machine, from the repository root
#   STAGES="suite zoo" bash benchmarks/device_session.sh
#   STAGES="graphs syncs profile eager jpeg vitb suite zoo" bash benchmarks/device_session.sh --smoke   # tiny, any machine
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
OUT=${OUT:-runs/device-$(date -u +%Y%m%d-%H%M%S)}
WORK=${WORK:-/tmp/mimkit-device}
STAGES=${STAGES:-graphs syncs profile eager jpeg vitb}
mkdir -p "$OUT" "$WORK"
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
for s in $STAGES; do
  case $s in graphs|syncs|profile|eager|jpeg|vitb|suite|zoo) ;;
    *) echo "device_session: unknown stage '$s' in STAGES; choose from graphs syncs profile eager jpeg vitb suite zoo" >&2
       exit 2;;
  esac
done
want() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
note() { echo "device_session: $1 exit $2" >&2; [ "$2" = 0 ] || status=1; }

tiny=(model.encoder.embed_dim=32 model.encoder.depth=1 model.encoder.num_heads=2 model.decoder.embed_dim=16
  model.decoder.depth=1 model.decoder.num_heads=2 data.limit=512)
if want graphs; then
  echo "== graphs: the Fashion-MNIST step as CUDA graphs (trainer and bare loop)" >&2
  if [ $smoke = 1 ]; then
    "$PY" benchmarks/step_overhead.py --compile true --mode reduce-overhead --out "$OUT" --batch 16 --steps 12 \
      --window 2 --profile 2 "${tiny[@]}"
  else
    "$PY" benchmarks/step_overhead.py --compile true --mode reduce-overhead --out "$OUT"
  fi
  note graphs $?
fi

if want syncs; then
  echo "== syncs: which steps of each method wait for the GPU" >&2
  if [ $smoke = 1 ]; then "$PY" benchmarks/sync_check.py --out "$OUT" --steps 4 --log-every 2 --batch 16 "${tiny[@]}"
  else "$PY" benchmarks/sync_check.py --out "$OUT"; fi
  note syncs $?
fi

if want profile; then
  echo "== profile: MAE ViT-B/16's compiled step by kernel category" >&2
  if [ $smoke = 1 ]; then "$PY" benchmarks/profile_step.py --smoke --out "$OUT"
  else "$PY" benchmarks/profile_step.py --out "$OUT"; fi
  note profile $?
fi

smoke_bench=()
[ $smoke = 1 ] && smoke_bench=(--smoke --methods mae,pcae)
if want eager; then
  echo "== eager: every method eager with the peer (FLOP ratios)" >&2
  rm -rf "$WORK/eager"  # a failed stage must not bring back an earlier run's file
  "$PY" -m mimkit.cli bench "${smoke_bench[@]}" --no-compile --no-e2e --budget-s "${EAGER_S:-100}" \
    --out "$WORK/eager"
  note eager $?
  cp "$WORK/eager/bench.json" "$OUT/bench_eager.json"
fi

if want jpeg; then
  echo "== jpeg: the JPEG input path's stages" >&2
  if [ $smoke = 1 ]; then
    "$PY" benchmarks/jpeg_path.py --files 96 --batch 8 --loader-batch 4 --batches 2 --workers 1 --dir "$WORK/jpeg-path" \
      --out "$OUT"
  else
    "$PY" benchmarks/jpeg_path.py --dir "$WORK/jpeg-path" --out "$OUT"
  fi
  note jpeg $?
fi

if want vitb; then
  echo "== vitb: MAE ViT-B/16 and the peer compiled with CUDA graphs" >&2
  rm -rf "$WORK/vitb"
  "$PY" -m mimkit.cli bench "${smoke_bench[@]}" --compile --compile-mode reduce-overhead --methods mae \
    --no-e2e --budget-s "${VITB_S:-150}" --out "$WORK/vitb"
  note vitb $?
  cp "$WORK/vitb/bench.json" "$OUT/bench_graphs.json"
fi

if want suite; then
  echo "== suite: the GPU speed suite" >&2
  rm -rf "$WORK/bench"
  if [ $smoke = 1 ]; then
    PYTHON="$PY" OUT="$WORK/bench" bash benchmarks/gpu_suite.sh --smoke --methods mae,pcae
  else
    PYTHON="$PY" OUT="$WORK/bench" BUDGET_S="${BUDGET_S:-240}" JPEGS="${JPEGS:-8000}" \
      JPEG_DIR="$WORK/jpegs" bash benchmarks/gpu_suite.sh
  fi
  note suite $?
  cp "$WORK"/bench/bench.md "$WORK"/bench/bench.json "$OUT"/
fi

if want zoo; then
  echo "== zoo: the zoo's GPU variant (seed 0, ${ZOO_PROTOCOLS:-knn,linear}, at most ${ZOO_S:-150} s)" >&2
  extra=()
  [ $smoke = 1 ] && extra=("${tiny[@]}" train.epochs=1 --limit-train 500 --limit-test 200)
  MIMKIT="$PY -m mimkit.cli" OUT="$WORK/zoo" timeout -s INT "${ZOO_S:-150}" bash benchmarks/zoo_fashion_mnist.sh \
    --seeds 0 --protocols "${ZOO_PROTOCOLS:-knn,linear}" --no-progress train.progress_bar=false "${extra[@]}"
  zoo=$?
  echo "device_session: zoo exit $zoo (124/130: stopped at ZOO_S, rerun to continue)" >&2
  cp "$WORK"/zoo/zoo.md "$OUT"/zoo.md
  cp "$WORK"/zoo/runs.csv "$OUT"/zoo_runs.csv
fi
ls -l "$OUT" >&2
exit $status
