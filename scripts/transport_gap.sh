#!/usr/bin/env bash
# shoal against the transport ceiling (issue 18): Triton's perf_analyzer
# against shoal, then against shoal-noop (the same gRPC and REST protocol
# answered without inference, decode or queue), back to back on this
# machine, and the ratio shoal ÷ no-op for throughput and the p50 gap.
# Environment as for scripts/perf_analyzer.sh (PERF_CONCURRENCY,
# PERF_PROTOCOLS, PERF_MEASUREMENT_MS); results under
# $SHOAL_HOME/perf_analyzer/results/{shoal,noop}[/ROUND].
#
# PERF_ROUNDS=N (default 1) runs the pair N times, interleaved (shoal,
# no-op, shoal, no-op, ...), and prints each round and the median of the
# rounds' ratios: on a shared machine the no-op's own rate moves by 25%
# between minutes, and only a ratio taken within one round means anything.
# SHOAL_BIN_B=PATH adds a second shoal build to each round (between the
# first and the no-op), for a before/after comparison in the same rounds.
# SHOAL_REPOSITORY_B=PATH does the same with another model repository for
# the second server (its binary SHOAL_BIN_B, else the first's): with
# model_repository, the sample FFNN whose config turns dynamic batching on.
# SHOAL_ENV_B="VAR=VALUE ..." sets environment variables (shoal's flags)
# for the second server only, e.g. SHOAL_DEFAULT_MAX_BATCH_SIZE=4 with a
# SHOAL_REPOSITORY_B whose ffnn has no config (Triton's auto-complete).
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
rounds="${PERF_ROUNDS:-1}"
servers="shoal"
[ -n "${SHOAL_BIN_B:-}${SHOAL_REPOSITORY_B:-}${SHOAL_ENV_B:-}" ] && servers="shoal shoal_b"
servers="$servers noop"
for r in $(seq "$rounds"); do
  sub=""; [ "$rounds" -gt 1 ] && sub="/$r"
  for srv in $servers; do
    case "$srv" in
      shoal) SHOAL_MODEL_REPOSITORY="$repo" PERF_SERVER=shoal PERF_OUT="$RES/shoal$sub" scripts/perf_analyzer.sh || status=1 ;;
      # shellcheck disable=SC2086 # SHOAL_ENV_B is a list of VAR=VALUE words
      shoal_b) env ${SHOAL_ENV_B:-} SHOAL_BIN="${SHOAL_BIN_B:-${SHOAL_BIN:-}}" SHOAL_MODEL_REPOSITORY="${SHOAL_REPOSITORY_B:-$repo}" PERF_SERVER=shoal PERF_OUT="$RES/shoal_b$sub" scripts/perf_analyzer.sh || status=1 ;;
      noop) PERF_SERVER=noop PERF_OUT="$RES/noop$sub" scripts/perf_analyzer.sh || status=1 ;;
    esac
  done
done
PY=python3
[ -x "$SHOAL_HOME/venv/bin/python" ] && PY="$SHOAL_HOME/venv/bin/python"
SHOAL_SCRIPTS="$PWD/scripts" "$PY" - "$RES" ffnn "$rounds" "$servers" <<'PYEOF'
import csv, glob, os, re, statistics, sys
res, model, rounds, servers = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
sys.path.insert(0, os.environ["SHOAL_SCRIPTS"])
from perf_cpu import cpu_us
def load(d):
    rows = {}
    for path in glob.glob(os.path.join(d, f"{model}_*_c*.csv")):
        m = re.search(r"_(grpc|http)_c(\d+)\.csv$", path)
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                tput = float(r["Inferences/Second"])
                rows[(m[1], int(m[2]))] = (tput, int(r["p50 latency"]), cpu_us(path[:-4] + ".cpu", tput))
    return rows
shoals = [s for s in servers if s != "noop"]
ratios = {}  # (server, protocol, concurrency) -> [(ratio, p50 gap µs)]
for r in range(1, rounds + 1):
    sub = "" if rounds == 1 else str(r)
    got = {s: load(os.path.join(res, s, sub)) for s in servers}
    noop = got["noop"]
    print(f"\nround {r} of {rounds}: shoal against shoal-noop, model {model}, measured back to back")
    print(f"{'server':<9}{'protocol':<9}{'conc.':>6}{'shoal infer/s':>15}{'noop infer/s':>14}{'ratio':>8}"
          f"{'shoal p50 µs':>14}{'noop p50 µs':>13}{'gap µs':>8}{'shoal CPU µs':>14}{'noop CPU µs':>13}")
    for s in shoals:
        for k in sorted(got[s]):
            if k not in noop:
                continue
            (st, sp, sc), (nt, np_, nc) = got[s][k], noop[k]
            ratios.setdefault((s,) + k, []).append((st / nt, sp - np_))
            print(f"{s:<9}{k[0]:<9}{k[1]:>6}{st:>15.0f}{nt:>14.0f}{st / nt:>8.2f}{sp:>14}{np_:>13}{sp - np_:>8}"
                  f"{sc:>14.1f}{nc:>13.1f}")
if rounds > 1:
    print(f"\nmedian over {rounds} rounds (each ratio taken within its round)")
    print(f"{'server':<9}{'protocol':<9}{'conc.':>6}{'ratio':>8}{'p50 gap µs':>12}{'rounds':>8}")
    for key in sorted(ratios):
        v = ratios[key]
        print(f"{key[0]:<9}{key[1]:<9}{key[2]:>6}{statistics.median(x for x, _ in v):>8.2f}"
              f"{statistics.median(g for _, g in v):>12.0f}{len(v):>8}")
PYEOF
exit $status
