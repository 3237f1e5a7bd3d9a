#!/usr/bin/env bash
# Full-size Keras Tuner searches on the shared data, one after another, each timed.
# Usage: CNN_DATA_DIR=../shared/data bash benchmarks/tuning_runs.sh [name ...]   (names: see RUNS below)
# Results go to the project's MLflow store (experiment benchmarks-tuning) and benchmarks/tuning_runs.log.
set -uo pipefail
cd "$(dirname "$0")/.."
declare -A RUNS=(
  # Trials on a 10k stratified slice of the training split (9k train / 1k validation), the best
  # retrained on all 50k images and scored on the 10k test images.
  [cifar10_hyperband]="-e tune_cifar10 -P tuner=hyperband -P max_epochs=10 -P limit=10000 -P time_budget_minutes=30 -P search_name=bench-cifar10-hyperband"
  # Imagenette at the tutorial's 128 px (cnn_basic: 72.54% in 10 epochs): a 6k slice (5.4k / 600),
  # an hour of search, the best retrained on all 9,469 images and scored on the 3,925 val images.
  # The same comparison with full 10-epoch trials (Hyperband's 2-epoch first round favoured fast
  # starters that overfit by epoch 10), block 1 kept to one conv for cost.
  [imagenette_bayesian]="-e tune_imagenette -P tuner=bayesian -P max_trials=12 -P max_epochs=10 -P limit=6000 -P image_size=128 -P time_budget_minutes=75 -P search_name=bench-imagenette-bayes"
  # The tutorial's point and its one-change steps (tuning/spaces.py), 10 epochs each. Run first with
  # max_trials=4 (the three modern changes), then resumed with 8 for the four faster-learning ones.
  [imagenette_steps]="-e tune_imagenette -P tuner=bayesian -P max_trials=8 -P max_epochs=10 -P limit=6000 -P image_size=128 -P time_budget_minutes=60 -P search_name=bench-imagenette-steps"
  [imagenette_hyperband]="-e tune_imagenette -P tuner=hyperband -P max_epochs=10 -P limit=6000 -P image_size=128 -P time_budget_minutes=60 -P search_name=bench-imagenette-128"
)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(cifar10_hyperband imagenette_hyperband)
for name in "${names[@]}"; do
  start=$(date +%s)
  out=$(mlflow run . --env-manager local --experiment-name benchmarks-tuning ${RUNS[$name]} 2>&1 | tee "benchmarks/$name.out" | grep -E "^(best trial|test_accuracy=)" | tr '\n' ' ')
  echo "$(date -u +%FT%TZ) $name wall_s=$(( $(date +%s) - start )) $out" | tee -a benchmarks/tuning_runs.log
done
