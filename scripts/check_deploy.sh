#!/usr/bin/env bash
# Offline validation of the deployment files (CI runs it from .ci/run; no cluster, no
# container engine, no network beyond installing the test extra):
#   - hadolint on the Dockerfile
#   - helm lint (strict) and helm template of deploy/helm/fedcore with the default values
#     and each deploy/helm/fedcore/ci/*-values.yaml, by Helm's own Go engine
#     (helm-python-sdk bundles it: no helm binary reaches us from apt, PyPI or npm)
#   - every rendered manifest against the Kubernetes 1.25 / 1.30 / 1.37 OpenAPI schemas
#     (kubernetes-validate, strict); the ServiceMonitor CRD by its own structure check
#   - compose.yaml through the compose_spec parser
#   - tests/deploy (pytest), which asserts the properties the deployment relies on
# Rendered manifests go to ${DEPLOY_RENDER_DIR:-build/deploy-render} for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for module in helm_python kubernetes_validate compose_spec dockerfile_parse yaml; do
    python3 -c "import $module" 2>/dev/null || missing+=("$module")
done
command -v hadolint >/dev/null || missing+=(hadolint)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "check_deploy: missing ${missing[*]}: pip install -e '.[test]'" >&2
    exit 1
fi

echo "== hadolint Dockerfile"
hadolint Dockerfile

echo "== bash -n deploy/compose/setup.sh"
bash -n deploy/compose/setup.sh

out="${DEPLOY_RENDER_DIR:-build/deploy-render}"
mkdir -p "$out"
python3 - "$out" <<'PY'
import json
import re
import sys
from pathlib import Path

import compose_spec
import helm_python as helm
import kubernetes_validate as kv
import yaml

out = Path(sys.argv[1])
chart = "deploy/helm/fedcore"
variants = {"default": {}} | {
    p.name.removesuffix("-values.yaml"): yaml.safe_load(p.read_text())
    for p in sorted(Path(chart, "ci").glob("*-values.yaml"))
}
failed = False
for name, values in variants.items():
    report = helm.lint(chart, values, strict=True, kube_version="v1.30.0")
    for message in report["messages"]:
        level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(message["severity"], "?")
        print(f"helm lint [{name}] {level} {message['path']}: {message['error']}")
    if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]):
        failed = True
        continue
    with helm.Chart.load(chart) as c:
        rendered = c.render(values, name="fedcore", namespace="fl")
    text = "\n---\n".join(
        f"# Source: {path}\n{body}" for path, body in sorted(rendered.items())
        if path.endswith(".yaml") and body.strip()
    )
    (out / f"{name}.yaml").write_text(text)
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] == "ServiceMonitor":
            ok = doc["apiVersion"] == "monitoring.coreos.com/v1" and all(
                e.get("port") == "metrics" and e.get("path") == "/metrics"
                for e in doc["spec"]["endpoints"]
            )
            print(f"[{name}] {label}: CRD, structure check {'ok' if ok else 'FAILED'}")
            failed |= not ok
            continue
        for version in ("1.25.0", "1.30.0", "1.37.0"):
            try:
                kv.validate(doc, version, strict=True)
            except (kv.ValidationError, kv.SchemaNotFoundError) as exc:
                print(f"[{name}] {label} INVALID on {version}: {exc}")
                failed = True
        print(f"[{name}] {label}: valid on Kubernetes 1.25, 1.30, 1.37")

compose = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), Path("compose.yaml").read_text())
try:
    parsed = compose_spec.PyCompose.from_json(json.dumps(yaml.safe_load(compose)))
    print(f"compose.yaml: valid ({', '.join(parsed.service_names())})")
except ValueError as exc:
    print(f"compose.yaml INVALID: {exc}")
    failed = True
sys.exit(1 if failed else 0)
PY

echo "== pytest tests/deploy"
python3 -m pytest -q -p no:cacheprovider tests/deploy
