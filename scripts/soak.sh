#!/usr/bin/env bash
# The soak (issue 16; not in CI): mixed traffic against the release build
# for MINUTES (default 30): REST JSON and binary, gRPC unary and streams,
# shared memory, keyed sequences checked exactly, a model reload every
# minute and an overload burst every five. RSS, file descriptors and threads
# are sampled every second; it fails if any request is lost, any answer is
# wrong, or any of them grows without bound (scripts/soak.py says how).
#
#   scripts/soak.sh [MINUTES]
#
# Output (samples.csv, summary.json, rss.svg, server.log) goes to
# $SOAK_OUT (default $SHOAL_HOME/soak/<date>). Needs scripts/setup.sh --tests
# (models and the tritonclient venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MINUTES="${1:-30}"
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
OUT="${SOAK_OUT:-$SHOAL_HOME/soak/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"

scripts/setup.sh --tests >/dev/null
cargo build --release -p shoal --bin shoal
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal"

# A repository of its own: ffnn (reloaded every minute), the sequence
# model, and `burst`, the FFNN behind a queue of 8 for the overload bursts.
REPO=$(mktemp -d)
trap 'rm -rf "$REPO"; [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null || true' EXIT
cp -r model_repository/ffnn model_repository/sequence "$REPO/"
mkdir -p "$REPO/burst"
ln -s "$ROOT/model_repository/ffnn/1" "$REPO/burst/1"
cat > "$REPO/burst/config.toml" <<'TOML'
platform = "onnxruntime_onnx"
max_batch_size = 8
instance_count = 1
intra_op_threads = 1

[dynamic_batching]
max_queue_delay_us = 2000
max_queue_size = 8
TOML

"$BIN" --model-repository "$REPO" --http-port 0 --grpc-port 0 --metrics-port 0 \
  --model-control-mode explicit --load-model ffnn --load-model sequence --load-model burst \
  >"$OUT/server.out" 2>"$OUT/server.log" </dev/null &
PID=$!
line=""
for _ in $(seq 1200); do  # 120 s
  if [ "$(wc -l <"$OUT/server.out")" -ge 1 ]; then
    line=$(head -n1 "$OUT/server.out")
    break
  fi
  kill -0 "$PID" 2>/dev/null || { tail -n 30 "$OUT/server.log"; echo "shoal exited before listening"; exit 1; }
  sleep 0.1
done
[[ "$line" =~ http=([^ ]+)\ grpc=([^ ]+) ]] || { echo "no listening line from shoal: '$line'"; exit 1; }
HTTP=${BASH_REMATCH[1]}
GRPC=${BASH_REMATCH[2]}
echo "soak: $MINUTES min against pid $PID (http $HTTP, grpc $GRPC); output in $OUT"

status=0
"$SHOAL_HOME/venv/bin/python" scripts/soak.py --http "$HTTP" --grpc "$GRPC" --pid "$PID" \
  --minutes "$MINUTES" --out "$OUT" || status=$?
kill -TERM "$PID"
if ! wait "$PID"; then
  echo "soak: shoal did not exit 0 after SIGTERM"
  status=1
fi
PID=
exit "$status"
