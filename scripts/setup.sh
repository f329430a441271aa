#!/usr/bin/env bash
# Installs what shoal needs, idempotently, in parts, so each command pays
# only for what it uses:
#
#   scripts/setup.sh            the demo's part: a Python venv with ONNX
#                               Runtime (the shared library the server loads)
#                               and the model generator's deps, then the
#                               reference models generated into
#                               model_repository/ (about a minute on a fresh
#                               machine);
#   scripts/setup.sh --tests    also the reference clients for the tests
#                               (tritonclient, pytest), promtool (Debian's
#                               prometheus) and unzip, then --plots,
#                               --kafka and --torch;
#   scripts/setup.sh --plots    also the DejaVu font the load generator's
#                               plots use (Debian's fonts-dejavu-core);
#   scripts/setup.sh --kafka    also the tansu broker for the Kafka tests and
#                               `shoal-loadgen --brokers` runs (built from
#                               crates.io, about 17 minutes once per machine);
#   scripts/setup.sh --torch    also libtorch 2.11 for the `torch` feature
#                               (unpacked from the PyPI torch wheel, ~530 MB,
#                               with the two CUDA runtime wheels libtorch_cpu
#                               needs), the env file $SHOAL_HOME/torch/env.sh
#                               that points the build at it, and the
#                               TorchScript twins of FFNN and ResNet50 (about
#                               6 minutes once per machine; SHOAL_SKIP_TORCH=1
#                               skips it even with --tests).
#
# Everything lands in $SHOAL_HOME (default ~/.cache/shoal), outside the clone,
# so repeated runs and fresh clones reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
VENV="$SHOAL_HOME/venv"
mkdir -p "$SHOAL_HOME"

tests=0 plots=0 kafka=0 torch=0
for a in "$@"; do
  case "$a" in
    --tests) tests=1 plots=1 kafka=1 torch=1 ;;
    --plots) plots=1 ;;
    --kafka) kafka=1 ;;
    --torch) torch=1 ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a (try --help)" >&2; exit 2 ;;
  esac
done
[ "${SHOAL_SKIP_TORCH:-0}" = 1 ] && torch=0

# One stamp per requirements file, so the demo's venv grows into the tests'
# without reinstalling what it has.
pip_install() { # name, requirements file
  local stamp="$VENV/.requirements-$1.sha" want
  want=$(cat "$2" models/requirements.txt | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the Python packages of $2 ..."
    (cd "$(dirname "$2")" && "$VENV/bin/pip" install -q --disable-pip-version-check -r "$(basename "$2")")
    echo "$want" > "$stamp"
  fi
}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
pip_install models models/requirements.txt
[ $tests = 1 ] && pip_install tests tests/requirements.txt

# promtool (metrics test), unzip (libtorch), a C++ compiler (libFuzzer in
# scripts/fuzz.sh, torch-sys) and DejaVu Sans (loadgen's plots).
need=()
if [ $tests = 1 ]; then
  command -v promtool >/dev/null 2>&1 || need+=(prometheus)
  command -v unzip >/dev/null 2>&1 || need+=(unzip)
  command -v c++ >/dev/null 2>&1 || need+=(g++)
fi
if [ $plots = 1 ]; then
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
fi
if [ ${#need[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "setup: apt-get install ${need[*]} ..."
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

# tansu: a Kafka-protocol broker written in Rust (crates.io), for the load
# generator's Kafka tests. Built once per machine and cached outside the clone.
TANSU="$SHOAL_HOME/tansu/bin/tansu"
if [ $kafka = 1 ] && [ ! -x "$TANSU" ]; then
  echo "setup: building the tansu Kafka broker (once per machine, about 17 minutes on 2 cores) ..."
  start=$SECONDS
  cargo install tansu --locked --no-default-features --features dynostore \
    --root "$SHOAL_HOME/tansu" >"$SHOAL_HOME/tansu-build.log" 2>&1 \
    || { tail -20 "$SHOAL_HOME/tansu-build.log"; exit 1; }
  echo "setup: tansu built in $((SECONDS - start)) s"
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
if [ $torch = 1 ]; then
  if [ ! -f "$TORCH_DIR/.complete" ]; then
    echo "setup: fetching libtorch $TORCH_VERSION (torch wheel, ~530 MB; once per machine, 1-3 minutes) ..."
    wheels="$TORCH_ROOT/wheels"
    mkdir -p "$wheels"
    "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$wheels" "torch==$TORCH_VERSION" \
      nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    rm -rf "$TORCH_DIR.part"
    mkdir -p "$TORCH_DIR.part"
    command -v unzip >/dev/null 2>&1 || { echo "setup: unzip is missing (apt-get install unzip)" >&2; exit 1; }
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
      [ -d "${SHOAL_TORCH_TARGET:-$TORCH_ROOT/target}/debug" ] \
        || echo "setup: building the torch feature (torch-sys compiles C++, about 4 minutes once per machine) ..."
      (. "$TORCH_ROOT/env.sh"
       export CARGO_TARGET_DIR="${SHOAL_TORCH_TARGET:-$TORCH_ROOT/target}"
       cargo run -q -p shoal --features torch --bin shoal-torchscript -- --arch "$m" --onnx "$onnx" --out "$pt")
    fi
  done
fi

ORT_LIB=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n1)
echo "setup done: ORT_DYLIB_PATH=$ORT_LIB"
