#!/usr/bin/env bash
# Installs what shoal needs on a fresh machine, idempotently:
#   - a Python venv with ONNX Runtime (the shared library the server loads),
#     the model generator's deps and the reference clients for the tests;
#   - the reference models, generated into model_repository/;
#   - promtool (Debian's prometheus package) for the metrics test;
#   - libtorch 2.11 for the `torch` feature (unpacked from the PyPI torch
#     wheel with the two CUDA runtime wheels libtorch_cpu needs), the env
#     file $SHOAL_HOME/torch/env.sh that points the build at it, and the
#     TorchScript twins of FFNN and ResNet50 (SHOAL_SKIP_TORCH=1 skips all
#     of this).
# Everything lands in $SHOAL_HOME (default ~/.cache/shoal), outside the clone,
# so repeated runs and fresh clones reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
VENV="$SHOAL_HOME/venv"
mkdir -p "$SHOAL_HOME"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha"
want=$(cat tests/requirements.txt models/requirements.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  (cd tests && "$VENV/bin/pip" install -q -r requirements.txt)
  echo "$want" > "$stamp"
fi

# promtool (metrics test) and DejaVu Sans (loadgen's plots) from Debian.
need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# tansu: a Kafka-protocol broker written in Rust (crates.io), for the load
# generator's Kafka tests. Built once per machine (about 17 minutes on 2
# cores) and cached outside the clone.
TANSU="$SHOAL_HOME/tansu/bin/tansu"
if [ ! -x "$TANSU" ]; then
  echo "building tansu (once per machine) ..."
  cargo install tansu --locked --no-default-features --features dynostore \
    --root "$SHOAL_HOME/tansu" >"$SHOAL_HOME/tansu-build.log" 2>&1 \
    || { tail -20 "$SHOAL_HOME/tansu-build.log"; exit 1; }
fi

"$VENV/bin/python" models/generate.py --out model_repository

# libtorch. tch 0.24 is pinned to libtorch 2.11 (the release on the GPU
# machine's image). PyPI has no CPU-only torch; its wheel carries the CUDA
# build of libtorch, whose libtorch_cpu.so needs only libcudart and libcupti
# at link and load time (libtorch_cuda.so is loaded on demand for a CUDA
# placement). The wheels' RPATH ($ORIGIN/../../nvidia/cu13/lib) finds the
# CUDA runtime when both are unpacked side by side, as here.
TORCH_VERSION=2.11.0
TORCH_ROOT="$SHOAL_HOME/torch"
TORCH_DIR="$TORCH_ROOT/$TORCH_VERSION"
if [ "${SHOAL_SKIP_TORCH:-0}" != 1 ]; then
  if [ ! -f "$TORCH_DIR/.complete" ]; then
    echo "fetching libtorch $TORCH_VERSION (torch wheel, ~530 MB; once per machine) ..."
    wheels="$TORCH_ROOT/wheels"
    mkdir -p "$wheels"
    "$VENV/bin/pip" download -q --no-deps -d "$wheels" "torch==$TORCH_VERSION" \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    rm -rf "$TORCH_DIR.part"
    mkdir -p "$TORCH_DIR.part"
    unzip -q -o "$wheels"/torch-"$TORCH_VERSION"-*.whl 'torch/lib/*' 'torch/include/*' 'torch/share/*' \
      'torch/version.py' -d "$TORCH_DIR.part"
    for w in "$wheels"/nvidia_cuda_runtime-*.whl "$wheels"/nvidia_cuda_cupti-*.whl; do
      unzip -q -o "$w" 'nvidia/*' -d "$TORCH_DIR.part"
    done
    touch "$TORCH_DIR.part/.complete"
    rm -rf "$TORCH_DIR"
    mv "$TORCH_DIR.part" "$TORCH_DIR"
    rm -rf "$wheels"
  fi
  cat > "$TORCH_ROOT/env.sh" <<ENV
# Written by scripts/setup.sh: source it before building with --features torch.
export LIBTORCH="$TORCH_DIR/torch"
export LIBTORCH_CXX11_ABI=1
ENV
  # TorchScript twins, traced from the ONNX files' own weights so the two
  # backends compute the same function. The build lands outside the clone
  # (torch-sys compiles C++ for minutes; later runs and clones reuse it).
  for m in ffnn resnet50; do
    onnx="model_repository/$m/1/model.onnx"
    pt="model_repository/${m}_torch/1/model.pt"
    if [ ! -f "$pt" ] || [ "$onnx" -nt "$pt" ]; then
      (. "$TORCH_ROOT/env.sh"
       export CARGO_TARGET_DIR="${SHOAL_TORCH_TARGET:-$TORCH_ROOT/target}"
       cargo run -q -p shoal --features torch --bin shoal-torchscript -- --arch "$m" --onnx "$onnx" --out "$pt")
    fi
  done
fi

ORT_LIB=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n1)
echo "setup done: ORT_DYLIB_PATH=$ORT_LIB"
