#!/usr/bin/env bash
# The main job on a fresh machine: set up the runtime and models, build,
# start shoal, send one request and show the answer, then a short benchmark
# with Triton's own perf_analyzer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p shoal --bin shoal

out=$(mktemp)
"${CARGO_TARGET_DIR:-target}/release/shoal" --model-repository model_repository \
  --http-port 0 --grpc-port 0 --metrics-port 0 >"$out" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 600); do grep -q '^shoal listening' "$out" && break; sleep 0.1; done
line=$(grep '^shoal listening' "$out") || { echo "shoal did not start" >&2; exit 1; }
echo "$line"
http=$(echo "$line" | sed -E 's/.*http=([^ ]+).*/\1/')

echo; echo "== model metadata (GET /v2/models/ffnn)"
curl -s "http://$http/v2/models/ffnn"; echo
echo; echo "== one inference (POST /v2/models/ffnn/infer, a [1,784] input of 0.5)"
body=$(python3 -c 'import json; print(json.dumps({"inputs":[{"name":"input","shape":[1,784],"datatype":"FP32","data":[0.5]*784}]}))')
curl -s -H 'Content-Type: application/json' -d "$body" "http://$http/v2/models/ffnn/infer"; echo
kill -TERM $pid; wait $pid || true
trap - EXIT; rm -f "$out"

echo; echo "== short benchmark: perf_analyzer over gRPC, ffnn, concurrency 1 and 64"
PERF_PROTOCOLS=grpc PERF_MEASUREMENT_MS=2000 scripts/perf_analyzer.sh
