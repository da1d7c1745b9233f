#!/usr/bin/env bash
# The published Fashion-MNIST zoo's table from the records kept in git (benchmarks/results/zoo_fmnist/,
# no weights): trains and evaluates nothing, lists the runs not there yet. The same configs and
# overrides as benchmarks/zoo_fashion_mnist.sh (a kept run is only tabled under its own settings).
#   bash benchmarks/zoo_report.sh        # -> benchmarks/results/zoo_fmnist/zoo.md, zoo.csv, runs.csv, zoo.png
set -euo pipefail
cd "$(dirname "$0")/.."
PREC=${PREC:-bf16} OUT=${OUT:-benchmarks/results/zoo_fmnist} exec bash benchmarks/zoo_fashion_mnist.sh --report-only "$@"
