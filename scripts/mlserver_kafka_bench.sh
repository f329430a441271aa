#!/usr/bin/env bash
# shoal's Kafka-native serving against MLServer 1.7.1's Kafka mode (issue
# 15): same FFNN, same tansu broker, same JSON messages. Prepares a
# virtualenv for MLServer under $SHOAL_HOME (once), builds shoal, and runs
# scripts/mlserver_kafka_bench.py (N, RATE, SECS, SERVERS). About 3 minutes
# on 2 cores once installed.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
VENV="$SHOAL_HOME/mlserver-venv"
scripts/setup.sh --kafka
if [ ! -x "$VENV/bin/mlserver" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q mlserver==1.7.1 onnxruntime==1.31.1 confluent-kafka numpy
fi
cargo build --release -p shoal --bin shoal
exec "$VENV/bin/python" scripts/mlserver_kafka_bench.py
