#!/usr/bin/env bash
# The main job on a fresh machine, in minutes: set up ONNX Runtime and the
# reference models (scripts/setup.sh without options installs nothing else),
# build the release binary, start shoal, show a model's metadata and one
# inference, then what to try next. Nothing here needs the Kafka broker,
# libtorch or the test tools; `scripts/test.sh` installs those.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
scripts/setup.sh
echo "demo: building the release binary (cargo build --release; the longest step on a fresh machine) ..."
cargo build --release -p shoal --bin shoal
BIN="${CARGO_TARGET_DIR:-target}/release/shoal"

out=$(mktemp)
"$BIN" --model-repository model_repository --http-port 0 --grpc-port 0 --metrics-port 0 >"$out" &
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
echo; echo "demo: first answer $((SECONDS - start)) s after the start"
kill -TERM $pid; wait $pid || true
trap - EXIT; rm -f "$out"

cat <<NEXT

== what to try next
  # serve your own ONNX file: a directory holding model.onnx is a model named after the directory
  mkdir -p mymodel && cp path/to/your.onnx mymodel/model.onnx
  $BIN --model-repository mymodel

  # Triton's own perf_analyzer against shoal (it starts the server; gRPC and HTTP, concurrency 1 and 64)
  scripts/perf_analyzer.sh

  # the metrics (Prometheus text) and the health probe, on the metrics port of a running server
  $BIN --model-repository model_repository &
  curl -s http://127.0.0.1:8002/metrics | grep ^shoal_ | head
  $BIN healthcheck --url http://127.0.0.1:8002/v2/health/ready && echo ready

  # the Crayfish comparison: sustainable throughput, embedded against external serving (in-memory streams)
  cargo build --release -p shoal-loadgen && target/release/shoal-loadgen compare --modes embedded,grpc
NEXT
