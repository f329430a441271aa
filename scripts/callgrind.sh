# Sourced by the scripts that count instructions under valgrind's callgrind
# (hotpath_instructions.sh, ort_run_instructions.sh): valgrind installed
# when missing, and the count of one command's instructions.

# Installs valgrind from apt when it is not on PATH.
ensure_valgrind() {
  command -v valgrind >/dev/null && return
  echo "$(basename "$0"): installing valgrind" >&2
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind >/dev/null
}

# callgrind_ir CMD [ARG...]: the instructions CMD executed (callgrind's
# "Collected" total); its output is discarded.
callgrind_ir() {
  local dir
  dir=$(mktemp -d)
  valgrind --tool=callgrind --callgrind-out-file="$dir/out" "$@" >/dev/null 2>"$dir/log"
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$dir/log"
  rm -rf "$dir"
}
