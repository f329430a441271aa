#!/usr/bin/env bash
# Instructions per request on shoal's request path (issue 18), counted by
# valgrind's callgrind: a count that does not move with the machine's load,
# where CPU time on this shared 2-core VM moves by ±20% between minutes.
#
# Runs the hotpath bench (mock model, no network) at concurrency 1, where
# every request runs inline on one thread, without warm-up, with N and then
# 2N requests, and prints (Ir(2N) - Ir(N)) / N per path: setup, model
# loading and the first allocations cancel out.
#
#   scripts/hotpath_instructions.sh [N] [PATH...]   # default: 2000 engine grpc rest decode
#   HOTPATH_BIN=/path/to/hotpath scripts/hotpath_instructions.sh ...   # another build (before/after)
#
# The mock paths' counts repeat within 0.1% from one process to the next;
# `ort` (the FFNN on ONNX Runtime) moves by up to 10%, as ONNX Runtime's own
# count does (scripts/ort_run_instructions.sh): count it several times.
#
# Counts instructions, not time: a change that trades instructions for
# cache misses or contention (or the reverse) shows only in the CPU time
# of `cargo bench --bench hotpath` and of scripts/transport_gap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-2000}"
shift || true
PATHS=("$@")
[ ${#PATHS[@]} -gt 0 ] || PATHS=(engine grpc rest decode)

# shellcheck source=scripts/callgrind.sh
. scripts/callgrind.sh
ensure_valgrind

BIN="${HOTPATH_BIN:-}"
if [ -z "$BIN" ]; then
  BIN=$(cargo bench --bench hotpath --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "hotpath" and m.get("executable"):
        print(m["executable"])' | tail -n1)
fi
[ -x "$BIN" ] || { echo "no hotpath bench binary (${BIN:-none})" >&2; exit 1; }

count() {  # path requests -> total instructions
  callgrind_ir "$BIN" --path "$1" --requests "$2" --reps 1 --concurrency 1 --warmup 0
}
echo "| path | instructions per request (callgrind, concurrency 1, $N vs $((2 * N)) requests) |"
echo "|---|---:|"
for p in "${PATHS[@]}"; do
  a=$(count "$p" "$N")
  b=$(count "$p" $((2 * N)))
  echo "| $p | $(( (b - a) / N )) |"
done
