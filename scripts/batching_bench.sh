#!/usr/bin/env bash
# The adaptive batching benchmark (issue 8): FFNN and ResNet50 on CPU, a
# 10% -> 60% -> 120% -> 60% -> 10% of capacity schedule with bursts, adaptive
# against no batching and the static grid max_batch_size {1,4,16,64} x delay
# {0,0.5,1,2,5,10} ms. Results (report.md/json, plots) in $OUT (default
# results/batching). About 30 minutes; PHASE_SECS and RESNET_PHASE_SECS shorten it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/batching}"
FFNN_SECS="${PHASE_SECS:-3}"
RESNET_SECS="${RESNET_PHASE_SECS:-4}"
scripts/setup.sh --plots
cargo build --release -p shoal-loadgen
phases() { echo "0.1:$1,0.6:$1,1.2:$1,0.6:$1,0.1:$1"; }
target/release/shoal-loadgen batching --model ffnn --isz 784 \
    --phases "$(phases "$FFNN_SECS")" --out "$OUT/ffnn" "$@"
target/release/shoal-loadgen batching --model resnet50 --isz 3,224,224 \
    --phases "$(phases "$RESNET_SECS")" --burst 1.5,1,5 --cost-seconds 6 --out "$OUT/resnet50" "$@"
