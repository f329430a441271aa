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
[ -f "$MODEL" ] || scripts/setup.sh

if ! command -v valgrind >/dev/null; then
  echo "ort_run_instructions.sh: installing valgrind" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends valgrind >/dev/null
fi

cargo build -q --release -p shoal --example ort_run_cost
BIN="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/ort_run_cost"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
count() {  # variant runs -> total instructions
  valgrind --tool=callgrind --callgrind-out-file="$tmp/out" "$BIN" "$MODEL" "$1" "$2" >/dev/null 2>"$tmp/log"
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$tmp/log"
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
