#!/usr/bin/env bash
# The whole test suite: setup (idempotent), format and lint gates, the Rust
# tests (unit, engine with a mock backend, the real binary on port 0), and
# conformance with the unmodified tritonclient against the real binary;
# the Helm chart rendered, linted and validated (scripts/helm_check.sh).
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
