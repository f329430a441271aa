#!/usr/bin/env bash
# Kafka-native serving against loadgen's embedded and gRPC processors
# (issue 15), through one tansu broker: FFNN, 3 KB events (784 float32),
# MP input partitions (default 4), KEYS keys. First each mode's sustainable
# throughput (loadgen compare), then p50/p99 of every mode at the same
# constant RATE (default: half the lowest sustainable rate found). Results
# in $OUT (default results/kafka). About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/kafka}"
MP="${MP:-4}"
KEYS="${KEYS:-1000}"
SECS="${SECS:-10}"
MODES="${MODES:-embedded,grpc,kafka-native}"
scripts/setup.sh --kafka
cargo build --release -p shoal -p shoal-loadgen
mkdir -p "$OUT"

SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$SHOAL_HOME/tansu/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/ \
    >"$OUT/tansu.log" 2>&1 &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.1
done
export LOADGEN_BROKERS="127.0.0.1:$port" LOADGEN_MODEL=ffnn LOADGEN_ISZ=784 LOADGEN_BSZ=1 LOADGEN_KEYS="$KEYS"

target/release/shoal-loadgen compare --modes "$MODES" --mp "$MP" --out "$OUT/compare" \
    | tee "$OUT/compare.txt"
if [ -z "${RATE:-}" ]; then
    # The lowest sustainable rate of the table's rows (ev/s, column 3).
    RATE=$(awk -F'|' '/^\|/ && $4 ~ /^ *[0-9.]+ *$/ {r=$4+0; if (!m || r<m) m=r} END {printf "%d", m/2}' "$OUT/compare.txt")
fi
echo "latency at $RATE ev/s, $SECS s per mode" | tee "$OUT/latency.txt"
for mode in ${MODES//,/ }; do
    target/release/shoal-loadgen run --mode "$mode" --mp "$MP" --rate "$RATE" --duration "$SECS" \
        2>/dev/null | grep -E "^\||reconciliation" | sed "s/^/$mode: /" | tee -a "$OUT/latency.txt"
done
