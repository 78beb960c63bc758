#!/usr/bin/env bash
# Installs the deployment stack and its offline validation tools into the project's venv:
#   ray                     the multi-node launcher (`xshare launch`, xshare.deploy) and its local-cluster tests
#   helm-python-sdk         the Helm v4 Go library packaged for Python: renders and lints deploy/k8s without a helm binary
#   kubernetes-validate     core Kubernetes kinds checked against the published OpenAPI schemas (--strict)
#   grafana-foundation-sdk  builds dashboards/xshare-sglang.json and loads it back as a Grafana dashboard model
#   promql-parser           PromQL parser: lists the metric names every dashboard expression reads
#   jsonschema, PyYAML, prometheus_client: CRD schema checks, YAML, the metric-name check's exporter
# Every version is pinned here. Run by scripts/bootstrap.sh (XSHARE_VENV set); idempotent: returns at once
# when the stamp in the venv matches this script. Every pip call holds /tmp/xshare-pip.lock.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
stamp="$venv/.xshare-deploy-tools-stamp"

PINS=(
  "ray==2.60.0"
  "helm-python-sdk==0.2.2"
  "kubernetes-validate==1.37.0"
  "grafana-foundation-sdk==1769699998!10.1.0"
  "promql-parser==0.11.0"
  "jsonschema==4.26.0"
  "PyYAML==6.0.3"
  "prometheus_client==0.26.0"
  # transitive (ray, kubernetes-validate) not pinned by requirements/*.txt
  "filelock==4.2.11"
  "msgpack==1.2.4"
  "importlib_resources==7.1.0"
)

if [ ! -x "$py" ]; then
  echo "install_deploy_tools: no venv at $venv (run scripts/bootstrap.sh)" >&2
  exit 1
fi

want="$(cat "${BASH_SOURCE[0]}" "$root/scripts/_venv.sh" "$cons" | sha256sum | cut -d' ' -f1)"
check() {
  "$py" - <<'PY' 2>/dev/null
import importlib.metadata as m
import ray, helm_python, kubernetes_validate, grafana_foundation_sdk, promql_parser, jsonschema, yaml, prometheus_client  # noqa
assert m.version("ray") == "2.60.0" and m.version("helm-python-sdk") == "0.2.2"
PY
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check; then
  echo "install_deploy_tools: already installed" >&2
  exit 0
fi

start=$(date +%s)
cargs=(-c "$cons")
# Keep the versions the SGLang CPU test bed pins (shared dependencies such as protobuf, requests, jsonschema).
[ -f "$root/requirements/sglang-cpu.txt" ] && cargs+=(-c "$root/requirements/sglang-cpu.txt")
echo "install_deploy_tools: installing ${PINS[*]}" >&2
pip install -q "${cargs[@]}" "${PINS[@]}"
check || { echo "install_deploy_tools: import check failed after install" >&2; exit 1; }
echo "$want" > "$stamp"
echo "install_deploy_tools: done in $(( $(date +%s) - start )) s" >&2
