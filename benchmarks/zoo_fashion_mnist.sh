#!/usr/bin/env bash
# The Fashion-MNIST zoo: every method's preset at its shipped budget (3 epochs on the full 60k training
# images), seeds 0,1,2, evaluated with kNN + linear + attentive on the full 60k/10k split, one table
# (BENCHMARKS.md, "Which method? The Fashion-MNIST zoo"). CAE v2's teacher is the zoo's own MAE run of the
# same seed (its preset's recipe: the MAE Fashion-MNIST encoder), so MAE comes first. The rows under
# configs/compose/ are compositions no single paper has (the shared contract's rows).
#   bash benchmarks/zoo_fashion_mnist.sh                 # -> zoo_fmnist/ (rerun to continue)
#   OUT=/somewhere bash benchmarks/zoo_fashion_mnist.sh --seeds 0 train.progress_bar=false
#   OUT=benchmarks/results/zoo_fmnist bash benchmarks/zoo_fashion_mnist.sh   # continue the published zoo
# benchmarks/results/zoo_fmnist/ holds the published zoo's records without weights (its .gitignore):
# finished runs there are reused; only the missing runs train.
# Precision: as the quickstart (scripts/quickstart.sh), bf16 autocast for training and evaluation on a
# CPU with bf16 instructions (AVX512-BF16 / AMX: ~1.9x faster than fp32) or a GPU, fp32 on a CPU without
# them (there bf16 is emulated, ~20x slower); PREC=bf16|fp32 chooses. bf16 against fp32 training moved
# the numbers by about one seed's spread (BENCHMARKS.md, the precision check); the table's precision
# column and runs.csv say what each run used, so a zoo continued on another machine stays readable.
# Hours on 2 CPU cores. Accuracies do not depend on machine load; train times do, and the zoo keeps a
# run's time only when other processes used under 0.2 cores meanwhile (runs.csv has the load).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-zoo_fmnist}
if [ -z "${PREC:-}" ]; then
  PREC=fp32
  # a GPU counts only where the installed torch can use it (a CPU-only torch would emulate bf16)
  if grep -qE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null || { nvidia-smi -L >/dev/null 2>&1 &&
     ${PYTHON:-python3} -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }; then
    PREC=bf16
  fi
fi
case "$PREC" in
  bf16) AMP=bf16 ;;
  fp32) AMP=off ;;
  *) echo "zoo_fashion_mnist.sh: PREC=$PREC: choose bf16 or fp32" >&2; exit 2 ;;
esac
echo "[zoo_fashion_mnist] precision $PREC (train.precision=$PREC, --amp $AMP); PREC=bf16|fp32 overrides" >&2
# MIMKIT: how to call mimkit (default the installed command; e.g. "python3 -m mimkit.cli" from src/)
# shellcheck disable=SC2086
exec ${MIMKIT:-mimkit} zoo \
  configs/mae_fashion_mnist.yaml configs/cae_v2_fashion_mnist.yaml configs/latent_mim_fashion_mnist.yaml \
  configs/pcae_fashion_mnist.yaml configs/mixedae_fashion_mnist.yaml configs/cae_fashion_mnist.yaml \
  configs/emae_fashion_mnist.yaml configs/sbam_fashion_mnist.yaml \
  configs/compose/mae_block_fashion_mnist.yaml configs/compose/latent_mim_sbam_fashion_mnist.yaml \
  configs/compose/emae_ema_fashion_mnist.yaml configs/compose/cae_v2_pcae_drop_fashion_mnist.yaml \
  --seeds 0,1,2 --protocols knn,linear,attentive --amp "$AMP" --out "$OUT" "train.precision=$PREC" \
  'cae_v2_fashion_mnist:method.teacher_path={out}/runs/mae_fashion_mnist/seed{seed}/checkpoint.pt' \
  'cae_v2_pcae_drop_fashion_mnist:method.teacher_path={out}/runs/mae_fashion_mnist/seed{seed}/checkpoint.pt' "$@"
