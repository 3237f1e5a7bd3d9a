#!/usr/bin/env bash
# Full-length runs of the tutorial's experiments and the stronger CNN, one after another, each timed.
# Usage: CNN_DATA_DIR=../shared/data bash benchmarks/seed_runs.sh [name ...]   (names: see RUNS below)
# Results go to the project's MLflow store and to benchmarks/seed_runs.log; BENCHMARKS.md quotes them.
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A RUNS=(
  [mnist_mlp]="-e mnist -P arch=mlp"
  [mnist_cnn_simple]="-e mnist -P arch=cnn_simple"
  [fashion_mnist_cnn_simple]="-e fashion_mnist -P arch=cnn_simple"
  [cifar10_cnn_deep]="-e cifar10 -P arch=cnn_deep"
  [cifar10_cnn_modern]="-e cifar10 -P arch=cnn_modern -P epochs=30 -P learning_rate=0.002"
  [imagenette_cnn_basic]="-e imagenette -P arch=cnn_basic -P image_size=128"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifar10_cnn_modern cifar10_cnn_deep mnist_mlp mnist_cnn_simple fashion_mnist_cnn_simple imagenette_cnn_basic)
for name in "${names[@]}"; do
  start=$(date +%s)
  out=$(mlflow run . --env-manager local --experiment-name benchmarks-seed ${RUNS[$name]} 2>&1 | tee "benchmarks/$name.out" | grep -E "^test_accuracy=" | tail -1)
  echo "$(date -u +%FT%TZ) $name wall_s=$(( $(date +%s) - start )) $out" | tee -a benchmarks/seed_runs.log
done
