#!/usr/bin/env bash
# ResNet50 at batch 1, 8 and 32 on a GPU: through the server against the
# same model in-process, ONNX Runtime and TorchScript, in one run; reports
# throughput, p50/p99, GPU memory before and after, and the provider that
# ran each model (server/benches/backends.rs does the measuring).
#
#   scripts/gpu_bench.sh build   # here (Rust toolchain, libtorch from setup.sh):
#                                # release binaries into dist/gpu/ (stripped, <64 MiB)
#   scripts/gpu_bench.sh run     # on the GPU machine, from the repository root,
#                                # with dist/gpu/ carried along
#
# The GPU machine's python3 has torch 2.11 (libtorch_cuda, the CUDA 13
# wheels) — the release tch 0.24 links against — plus onnx and numpy to
# generate the ResNet50 weights there (the 100 MB model does not travel).
# ONNX Runtime needs a library with CUDAExecutionProvider, 1.31 or newer:
# set ORT_DYLIB_PATH to it (onnxruntime-gpu==1.31.1); without one the ONNX
# rows are reported as skipped and the TorchScript rows still run.
# Environment: DEVICE (cuda:0), BATCHES (1,8,32), SECONDS_PER_CELL (5), THREADS (4).
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
DIST=dist/gpu

case "${1:-}" in
build)
  # shellcheck disable=SC1091
  . "$SHOAL_HOME/torch/env.sh"
  cargo build --release -p shoal --features torch --bin shoal
  bench=$(cargo bench --no-run -p shoal --features torch --bench backends --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*backends-[^"]*\)".*/\1/p' | tail -n1)
  [ -x "$bench" ] || { echo "bench binary not found" >&2; exit 1; }
  mkdir -p "$DIST"
  cp "${CARGO_TARGET_DIR:-target}/release/shoal" "$DIST/shoal"
  cp "$bench" "$DIST/backends"
  strip "$DIST/shoal" "$DIST/backends"
  du -sh "$DIST"/*
  ;;
run)
  py=${PYTHON:-python3}
  # libtorch (and its CUDA libraries) from the machine's torch wheel.
  site=$("$py" -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)')
  libs="$site/torch/lib"
  for d in "$site"/nvidia/*/lib "$site"/nvidia/cu13/lib; do
    [ -d "$d" ] && libs="$libs:$d"
  done
  export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
  repo=$(mktemp -d)
  trap 'rm -rf "$repo"' EXIT
  "$py" models/generate.py --out "$repo" --only resnet50 >/dev/null
  "$py" -c 'import onnxruntime as o; print("image onnxruntime", o.__version__, o.get_available_providers())' || true
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  SHOAL_BIN="${SHOAL_BIN:-$DIST/shoal}" SHOAL_BENCH_REPO="$repo" SHOAL_BENCH_MODELS=resnet50 \
    SHOAL_BENCH_DEVICE="${DEVICE:-cuda:0}" SHOAL_BENCH_BATCHES="${BATCHES:-1,8,32}" \
    SHOAL_BENCH_THREADS="${THREADS:-4}" \
    "${BENCH_BIN:-$DIST/backends}" --seconds "${SECONDS_PER_CELL:-5}"
  ;;
*)
  echo "usage: $0 build|run" >&2
  exit 2
  ;;
esac
