#!/usr/bin/env bash
# shoal against the transport ceiling (issue 18): Triton's perf_analyzer
# against shoal, then against shoal-noop (the same gRPC and REST protocol
# answered without inference, decode or queue), back to back on this
# machine, and the ratio shoal ÷ no-op for throughput and the p50 gap.
# Environment as for scripts/perf_analyzer.sh (PERF_CONCURRENCY,
# PERF_PROTOCOLS, PERF_MEASUREMENT_MS); results under
# $SHOAL_HOME/perf_analyzer/results/{shoal,noop}.
set -euo pipefail
cd "$(dirname "$0")/.."
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
RES="$SHOAL_HOME/perf_analyzer/results"
export PERF_MODEL=ffnn
# The FFNN with an empty config.toml: shoal's defaults, as a user who adds
# nothing gets them (the sample repository's ffnn waits 200 µs to batch).
repo="$(mktemp -d)"
trap 'rm -rf "$repo"' EXIT
mkdir -p "$repo/ffnn"
ln -s "$PWD/model_repository/ffnn/1" "$repo/ffnn/1"
: >"$repo/ffnn/config.toml"
# A cell that fails (perf_analyzer finds no stable window on a busy
# machine) is left out of the table; the other server still runs.
status=0
SHOAL_MODEL_REPOSITORY="$repo" PERF_SERVER=shoal scripts/perf_analyzer.sh || status=1
PERF_SERVER=noop scripts/perf_analyzer.sh || status=1
PY=python3
[ -x "$SHOAL_HOME/venv/bin/python" ] && PY="$SHOAL_HOME/venv/bin/python"
SHOAL_SCRIPTS="$PWD/scripts" "$PY" - "$RES" ffnn <<'PYEOF'
import csv, glob, os, re, sys
res, model = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.environ["SHOAL_SCRIPTS"])
from perf_cpu import cpu_us
def load(server):
    rows = {}
    for path in glob.glob(os.path.join(res, server, f"{model}_*_c*.csv")):
        m = re.search(r"_(grpc|http)_c(\d+)\.csv$", path)
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                tput = float(r["Inferences/Second"])
                rows[(m[1], int(m[2]))] = (tput, int(r["p50 latency"]), cpu_us(path[:-4] + ".cpu", tput))
    return rows
shoal, noop = load("shoal"), load("noop")
print(f"\nshoal against shoal-noop, model {model}, measured back to back")
print(f"{'protocol':<9}{'conc.':>6}{'shoal infer/s':>15}{'noop infer/s':>14}{'ratio':>8}"
      f"{'shoal p50 µs':>14}{'noop p50 µs':>13}{'gap µs':>8}{'shoal CPU µs':>14}{'noop CPU µs':>13}")
for k in sorted(shoal):
    if k not in noop:
        continue
    (st, sp, sc), (nt, np_, nc) = shoal[k], noop[k]
    print(f"{k[0]:<9}{k[1]:>6}{st:>15.0f}{nt:>14.0f}{st / nt:>8.2f}{sp:>14}{np_:>13}{sp - np_:>8}"
          f"{sc:>14.1f}{nc:>13.1f}")
PYEOF
exit $status
