#!/usr/bin/env bash
# The whole test suite: setup (idempotent), format and lint gates, the Rust
# tests (unit, engine with a mock backend, the real binary on port 0, the
# Kafka pipeline against a real tansu broker), conformance with the
# unmodified tritonclient against the real binary, and a short libFuzzer
# run of every fuzz target (scripts/fuzz.sh); the Helm chart rendered,
# linted and validated (scripts/helm_check.sh); then the `torch` feature
# (libtorch via tch), linted and tested in its own target dir under
# $SHOAL_HOME, so the C++ build is paid once per machine.
#
# The first run on a fresh 2-core machine takes about an hour, most of it
# once-per-machine work that each step announces with its time before it
# starts (the tansu broker, libtorch, the workspace's first build); later
# runs take about 10 minutes. SHOAL_SKIP_TORCH=1 leaves the torch parts out.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
start=$SECONDS
step() { echo; echo "== test.sh [$((SECONDS - start)) s]: $*"; }

step "setup (tests, Kafka broker, libtorch; each once per machine)"
scripts/setup.sh --tests
step "format"
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
[ -d "$TARGET/debug" ] \
  || step "first build of the workspace: about 15 minutes on 2 cores (later runs reuse it)"
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "cargo test"
cargo test --workspace
step "tritonclient conformance"
cargo build -p shoal --bin shoal
SHOAL_BIN="$TARGET/debug/shoal" "$SHOAL_HOME/venv/bin/python" -m pytest tests/conformance -q -p no:cacheprovider
step "Helm checks (the chart's Kafka flags run through the binary just built)"
SHOAL_BIN="$TARGET/debug/shoal" scripts/helm_check.sh
step "fuzz: every libFuzzer target 20 s (first time: a 4-minute instrumented build)"
scripts/fuzz.sh 20
if [ "${SHOAL_SKIP_TORCH:-0}" = 1 ]; then
  step "done (torch skipped)"
  exit 0
fi
(
  . "$SHOAL_HOME/torch/env.sh"
  export CARGO_TARGET_DIR="${SHOAL_TORCH_TARGET:-$SHOAL_HOME/torch/target}"
  # A cache that outlives checkouts: no incremental state, and what newer
  # builds superseded is removed (it once filled the disk mid-CI).
  export CARGO_INCREMENTAL=0
  python3 scripts/prune_target.py "$CARGO_TARGET_DIR"
  step "torch feature: clippy and tests (first time: about 10 minutes of C++ and Rust builds)"
  cargo clippy -p shoal -p shoal-loadgen --features shoal-loadgen/torch --all-targets -- -D warnings
  # Builds the torch-enabled `shoal` that loadgen's external mode starts.
  cargo test -p shoal --features torch --lib --test torch
  cargo test -p shoal-loadgen --features torch --test torch
)
step "done"
