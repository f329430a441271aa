#!/usr/bin/env bash
# Installs what shoal needs on a fresh machine, idempotently:
#   - a Python venv with ONNX Runtime (the shared library the server loads),
#     the model generator's deps and the reference clients for the tests;
#   - the reference models, generated into model_repository/;
#   - promtool (Debian's prometheus package) for the metrics test.
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

ORT_LIB=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.1* | head -n1)
echo "setup done: ORT_DYLIB_PATH=$ORT_LIB"
