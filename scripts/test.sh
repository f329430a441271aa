#!/usr/bin/env bash
# The whole test suite: setup (idempotent), format and lint gates, the Rust
# tests (unit, engine with a mock backend, the real binary on port 0), and
# conformance with the unmodified tritonclient against the real binary;
# the Helm chart rendered, linted and validated (scripts/helm_check.sh);
# then the `torch` feature (libtorch via tch), linted and tested in its own
# target dir under $SHOAL_HOME, so the C++ build is paid once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"

scripts/setup.sh
cargo fmt --all -- --check
scripts/helm_check.sh
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
cargo build -p shoal --bin shoal
SHOAL_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug/shoal" "$SHOAL_HOME/venv/bin/python" -m pytest tests/conformance -q -p no:cacheprovider
[ "${SHOAL_SKIP_TORCH:-0}" = 1 ] && exit 0
(
  . "$SHOAL_HOME/torch/env.sh"
  export CARGO_TARGET_DIR="${SHOAL_TORCH_TARGET:-$SHOAL_HOME/torch/target}"
  cargo clippy -p shoal -p shoal-loadgen --features shoal-loadgen/torch --all-targets -- -D warnings
  # Builds the torch-enabled `shoal` that loadgen's external mode starts.
  cargo test -p shoal --features torch --lib --test torch
  cargo test -p shoal-loadgen --features torch --test torch
)
