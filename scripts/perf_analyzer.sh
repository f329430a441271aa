#!/usr/bin/env bash
# Runs Triton's unmodified perf_analyzer against shoal, over gRPC and HTTP, for
# the `ffnn` model at concurrency 1 and 64, and prints a summary table.
#
# perf_analyzer comes from the last tritonclient wheel that ships it (2.41.0);
# see /work/shared/PERF_ANALYZER.md. It is fetched once into
# $SHOAL_HOME/perf_analyzer (default SHOAL_HOME=~/.cache/shoal), together with
# libcudart.so.12 (it links it even for CPU runs) from the
# nvidia-cuda-runtime-cu12 wheel; libb64-0d comes from apt.
#
# Environment:
#   SHOAL_HOME              cache directory (default ~/.cache/shoal)
#   SHOAL_BIN               server binary (default target/release/shoal, rebuilt when the sources changed)
#   SHOAL_MODEL_REPOSITORY  model repository (default model_repository)
#   PERF_MODEL              model (default ffnn)
#   PERF_CONCURRENCY        concurrencies (default "1 64")
#   PERF_PROTOCOLS          protocols (default "grpc http")
#   PERF_MEASUREMENT_MS     --measurement-interval (default 4000)
#   PERF_OUT                where the CSVs and logs go (default $SHOAL_HOME/perf_analyzer/results/$PERF_SERVER)
#   PERF_SERVER             shoal (default), or noop: shoal-noop, the same protocol answered
#                           without inference (the transport ceiling; scripts/transport_gap.sh
#                           runs both back to back)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
PA_HOME="$SHOAL_HOME/perf_analyzer"
PA_BIN="$PA_HOME/bin/perf_analyzer"
CUDART_DIR="$PA_HOME/cuda_runtime"
CUDART_LIB="$CUDART_DIR/nvidia/cuda_runtime/lib"
TRITONCLIENT_VERSION=2.41.0
CUDART_VERSION=12.9.79

SHOAL_BIN_GIVEN="${SHOAL_BIN:-}"
SHOAL_BIN="${SHOAL_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/shoal}"
MODEL_REPO="${SHOAL_MODEL_REPOSITORY:-$ROOT/model_repository}"
MODEL="${PERF_MODEL:-ffnn}"
CONCURRENCY="${PERF_CONCURRENCY:-1 64}"
PROTOCOLS="${PERF_PROTOCOLS:-grpc http}"
MEASUREMENT_MS="${PERF_MEASUREMENT_MS:-4000}"
SERVER_KIND="${PERF_SERVER:-shoal}"
case "$SERVER_KIND" in shoal|noop) ;; *) echo "PERF_SERVER must be shoal or noop" >&2; exit 2 ;; esac
OUT="${PERF_OUT:-$PA_HOME/results/$SERVER_KIND}"

log() { echo "perf_analyzer.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pip for downloads: the project venv's if there is one, else the system's.
if [ -x "$SHOAL_HOME/venv/bin/pip" ]; then
  PIP=("$SHOAL_HOME/venv/bin/pip")
else
  PIP=(python3 -m pip)
fi
PY=python3
[ -x "$SHOAL_HOME/venv/bin/python" ] && PY="$SHOAL_HOME/venv/bin/python"

# ---------------------------------------------------------------- fetch
mkdir -p "$PA_HOME"
if [ ! -x "$PA_BIN" ]; then
  log "fetching perf_analyzer from tritonclient==$TRITONCLIENT_VERSION"
  tmp=$(mktemp -d)
  "${PIP[@]}" download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    "tritonclient==$TRITONCLIENT_VERSION" -d "$tmp"
  whl="$tmp/tritonclient-$TRITONCLIENT_VERSION-py3-none-manylinux1_x86_64.whl"
  [ -f "$whl" ] || die "pip did not download $whl"
  mkdir -p "$PA_HOME/bin"
  "$PY" - "$whl" "$PA_BIN.tmp" "$TRITONCLIENT_VERSION" <<'EOF'
import sys, zipfile
whl, dst, ver = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, open(dst, "wb") as f:
    f.write(z.read(f"tritonclient-{ver}.data/data/bin/perf_analyzer"))
EOF
  chmod +x "$PA_BIN.tmp"
  mv "$PA_BIN.tmp" "$PA_BIN"
  rm -rf "$tmp"
fi

if [ ! -e "$CUDART_LIB/libcudart.so.12" ]; then
  log "fetching libcudart.so.12 from nvidia-cuda-runtime-cu12==$CUDART_VERSION"
  tmp=$(mktemp -d)
  "${PIP[@]}" download -q --no-deps --only-binary=:all: \
    "nvidia-cuda-runtime-cu12==$CUDART_VERSION" -d "$tmp"
  whl=$(ls "$tmp"/nvidia_cuda_runtime_cu12-*.whl | head -n1)
  [ -f "$whl" ] || die "pip did not download nvidia-cuda-runtime-cu12"
  rm -rf "$CUDART_DIR.tmp"
  mkdir -p "$CUDART_DIR.tmp"
  "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
    "$whl" "$CUDART_DIR.tmp"
  rm -rf "$CUDART_DIR"
  mv "$CUDART_DIR.tmp" "$CUDART_DIR"
  rm -rf "$tmp"
  [ -e "$CUDART_LIB/libcudart.so.12" ] || die "no libcudart.so.12 in $CUDART_LIB"
fi

if ! dpkg -s libb64-0d >/dev/null 2>&1 && ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
  log "installing libb64-0d"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null
fi

export LD_LIBRARY_PATH="$CUDART_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
missing=$(ldd "$PA_BIN" | grep 'not found' || true)
[ -z "$missing" ] || die "perf_analyzer has unresolved libraries:
$missing"

# ---------------------------------------------------------------- server
# The default binary is rebuilt when the sources changed (a no-op when
# not): a stale one may refuse models the sources now serve.
if [ "$SERVER_KIND" = noop ]; then
  SHOAL_BIN="$(dirname "$SHOAL_BIN")/shoal-noop"
  if [ -z "${SHOAL_BIN_GIVEN:-}" ]; then
    log "building shoal-noop (release; a no-op when up to date)"
    cargo build --release -p shoal --bin shoal-noop
  fi
elif [ -z "${SHOAL_BIN_GIVEN:-}" ]; then
  log "building shoal (release; a no-op when up to date)"
  cargo build --release -p shoal
fi
[ -x "$SHOAL_BIN" ] || die "no server binary at $SHOAL_BIN"
# A model is a directory with a version folder or a bare model file
# (config.toml, Triton's config.pbtxt, or none at all).
found=0
for f in "$MODEL_REPO/$MODEL"/[0-9]* "$MODEL_REPO/$MODEL"/model.onnx "$MODEL_REPO/$MODEL"/model.pt; do
  [ -e "$f" ] && found=1
done
[ $found = 1 ] || [ "$SERVER_KIND" = noop ] || die "no model $MODEL in $MODEL_REPO (run scripts/setup.sh)"

mkdir -p "$OUT"
rm -f "$OUT/${MODEL}"_*_c*.csv "$OUT/${MODEL}"_*_c*.log "$OUT/${MODEL}"_*_c*.cpu
SERVER_OUT="$OUT/shoal.stdout"
SERVER_ERR="$OUT/shoal.stderr.log"
SERVER_PID=""

stop_server() {
  # Stops the server with SIGTERM; returns its exit code (124 if it hung).
  local pid=$SERVER_PID code=0
  [ -n "$pid" ] || return 0
  SERVER_PID=""
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "shoal did not exit within 30s of SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    return 124
  fi
  wait "$pid" || code=$?
  return $code
}
trap 'stop_server || true' EXIT
trap 'exit 130' INT TERM

if [ "$SERVER_KIND" = noop ]; then
  "$SHOAL_BIN" --model "$MODEL" --http-port 0 --grpc-port 0 >"$SERVER_OUT" 2>"$SERVER_ERR" </dev/null &
else
  "$SHOAL_BIN" --model-repository "$MODEL_REPO" --http-port 0 --grpc-port 0 --metrics-port 0 \
    >"$SERVER_OUT" 2>"$SERVER_ERR" </dev/null &
fi
SERVER_PID=$!

line=""
want=1
[ "$SERVER_KIND" = noop ] && want=2  # "grpc ADDR", "http ADDR"
for _ in $(seq 600); do  # 60 s
  if [ "$(wc -l <"$SERVER_OUT")" -ge $want ]; then  # complete lines
    line=$(head -n1 "$SERVER_OUT")
    [ $want = 2 ] && line="shoal listening http=$(sed -n 's/^http //p' "$SERVER_OUT") grpc=${line#grpc } metrics=none"
    break
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$SERVER_ERR" >&2; die "shoal exited before listening"; }
  sleep 0.1
done
[[ "$line" =~ ^shoal\ listening\ http=([^ ]+)\ grpc=([^ ]+)\ metrics=([^ ]+)$ ]] \
  || { tail -n 30 "$SERVER_ERR" >&2; die "no listening line from shoal within 60s (got: '$line')"; }
HTTP_ADDR=${BASH_REMATCH[1]}
GRPC_ADDR=${BASH_REMATCH[2]}
log "$SERVER_KIND up: http=$HTTP_ADDR grpc=$GRPC_ADDR"

# ---------------------------------------------------------------- runs
# The server's CPU time (user + system, in clock ticks) from /proc: CPU per
# request is that over a run divided by the requests it served, where the
# run's rate is perf_analyzer's stable throughput (its warm-up windows run
# at the same rate).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$SERVER_PID/stat"; }
TICKS_PER_S=$(getconf CLK_TCK)
failed=()
for proto in $PROTOCOLS; do
  case "$proto" in
    grpc) addr=$GRPC_ADDR ;;
    http) addr=$HTTP_ADDR ;;
    *) die "unknown protocol $proto" ;;
  esac
  for c in $CONCURRENCY; do
    csv="$OUT/${MODEL}_${proto}_c${c}.csv"
    plog="$OUT/${MODEL}_${proto}_c${c}.log"
    cmd=("$PA_BIN" -i "$proto" -u "$addr" -m "$MODEL" --shape input:1,784 --input-data zero
         --concurrency-range "$c:$c" --measurement-interval "$MEASUREMENT_MS" -f "$csv")
    log "running: ${cmd[*]}"
    t0=$(cpu_ticks); w0=$(date +%s.%N)
    if "${cmd[@]}" >"$plog" 2>&1 && [ -s "$csv" ]; then
      t1=$(cpu_ticks); w1=$(date +%s.%N)
      # CPU seconds the server used and the wall seconds of the run.
      echo "$(( t1 - t0 )) $TICKS_PER_S $w0 $w1" >"${csv%.csv}.cpu"
    else
      log "FAILED ($proto, concurrency $c); its output ($plog):"
      tail -n 40 "$plog" >&2
      failed+=("$proto/c$c")
    fi
  done
done

code=0
stop_server || code=$?
[ "$code" = 0 ] || { log "shoal exited with code $code after SIGTERM"; tail -n 30 "$SERVER_ERR" >&2; failed+=("shutdown"); }

# ---------------------------------------------------------------- table
SHOAL_SCRIPTS="$ROOT/scripts" "$PY" - "$OUT" "$MODEL" "$SERVER_KIND" <<'EOF'
import csv, glob, os, re, sys
out, model, server = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, os.environ["SHOAL_SCRIPTS"])
from perf_cpu import cpu_us
rows = []
for path in glob.glob(os.path.join(out, f"{model}_*_c*.csv")):
    m = re.search(r"_(grpc|http)_c(\d+)\.csv$", path)
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            tput = float(r["Inferences/Second"])
            rows.append((m[1], int(r["Concurrency"]), tput,
                         int(r["p50 latency"]), int(r["p99 latency"]),
                         int(r.get("Server Queue", 0) or 0),
                         int(r.get("Server Compute Infer", 0) or 0),
                         cpu_us(path[:-4] + ".cpu", tput)))
rows.sort()
print(f"\nperf_analyzer against {server}, model {model}, input [1,784] zeros")
print(f"{'protocol':<9}{'concurrency':>12}{'infer/s':>12}{'p50 ms':>10}{'p99 ms':>10}"
      f"{'srv queue ms':>14}{'srv infer ms':>14}{'srv CPU µs/req':>16}")
for proto, c, tput, p50, p99, q, ci, cpu in rows:
    print(f"{proto:<9}{c:>12}{tput:>12.1f}{p50/1000:>10.3f}{p99/1000:>10.3f}"
          f"{q/1000:>14.3f}{ci/1000:>14.3f}{cpu:>16.1f}")
EOF
log "CSVs and logs in $OUT"

if [ ${#failed[@]} -gt 0 ]; then
  log "failed: ${failed[*]}"
  exit 1
fi
