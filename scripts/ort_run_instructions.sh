#!/usr/bin/env bash
# ONNX Runtime's own instructions per `Run` of one row, under session and run
# option variants (issue 18: how much of shoal's per-execution cost is ONNX
# Runtime's, and whether an option lowers it). Counts with valgrind's
# callgrind, as scripts/hotpath_instructions.sh does: N and then 2N runs of
# server/examples/ort_run_cost.rs, and (Ir(2N) - Ir(N)) / N per variant, so
# loading and the first runs cancel out. Unlike shoal's own path, ONNX
# Runtime's count moves by up to 10% from one process to the next (the same
# variant measured 42,770-47,796), so each variant is counted ORT_REPS times
# (default 3), interleaved, and every count is printed. One-off costs inside
# ONNX Runtime (an arena chunk, a cache filled after some runs) land in one
# of the two runs: with N=200 one variant read 18,185 and 73,094, so keep N
# in the thousands.
#
#   scripts/ort_run_instructions.sh [N] [VARIANT...]
#       default: 3000 base runopts noarena nomempattern extended basic prealloc
#   ORT_MODEL=path/to/model.onnx ...   another model (default: model_repository/ffnn/1)
#
# The variants are described at the top of server/examples/ort_run_cost.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-3000}"
shift || true
VARIANTS=("$@")
[ ${#VARIANTS[@]} -gt 0 ] || VARIANTS=(base runopts noarena nomempattern extended basic prealloc)
MODEL="${ORT_MODEL:-model_repository/ffnn/1/model.onnx}"
if [ ! -f "$MODEL" ]; then
  # setup.sh generates the reference models; a model of your own it cannot.
  [ -z "${ORT_MODEL:-}" ] || { echo "ORT_MODEL: no file $MODEL" >&2; exit 1; }
  scripts/setup.sh
fi
# shellcheck source=scripts/callgrind.sh
. scripts/callgrind.sh
ensure_valgrind

cargo build -q --release -p shoal --example ort_run_cost
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/ort_run_cost"

count() {  # variant runs -> total instructions
  callgrind_ir "$BIN" "$MODEL" "$1" "$2"
}
REPS="${ORT_REPS:-3}"
declare -A got
for r in $(seq "$REPS"); do
  for v in "${VARIANTS[@]}"; do
    a=$(count "$v" "$N")
    b=$(count "$v" $((2 * N)))
    got[$v]="${got[$v]:+${got[$v]}, }$(( (b - a) / N ))"
  done
done
echo "| variant | instructions per run (callgrind, $N vs $((2 * N)) runs of $MODEL; $REPS processes each) |"
echo "|---|---:|"
for v in "${VARIANTS[@]}"; do
  echo "| $v | ${got[$v]} |"
done
