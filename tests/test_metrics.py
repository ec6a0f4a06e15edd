"""Tests for fedcore.metrics: names/values over real HTTP, health, snapshot/restore."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fedcore.metrics import REFUSAL_REASONS, AggregatorMetrics, MetricsServer


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def metrics() -> AggregatorMetrics:
    return AggregatorMetrics()


@pytest.fixture
def server(metrics: AggregatorMetrics) -> Iterator[MetricsServer]:
    with MetricsServer(metrics) as running:
        yield running


def test_scrape_shows_client_report(metrics: AggregatorMetrics, server: MetricsServer) -> None:
    metrics.observe_client_report({"train_s": 3.0, "encrypt_s": 0.2}, {"iterations": 23})
    metrics.observe_client_report({"train_s": 5.0, "encrypt_s": 0.4}, {"iterations": 23})
    metrics.updates_rejected_total.labels(reason="replay").inc()
    metrics.round_phase_seconds.labels(phase="fold").observe(0.5)
    metrics.connected_clients.set(4)
    status, headers, body = _get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = _samples(body.decode())
    assert samples[("fedcore_training_iterations_total", ())] == 46
    assert samples[("fedcore_encryption_time_seconds_count", ())] == 2
    assert samples[("fedcore_encryption_time_seconds_sum", ())] == pytest.approx(0.6)
    assert samples[("fedcore_local_training_seconds_sum", ())] == pytest.approx(8.0)
    assert samples[("fedcore_decryption_time_seconds_count", ())] == 0
    assert samples[("fedcore_updates_rejected_total", (("reason", "replay"),))] == 1
    assert samples[("fedcore_updates_rejected_total", (("reason", "digest_mismatch"),))] == 0
    assert samples[("fedcore_round_phase_seconds_count", (("phase", "fold"),))] == 1
    assert samples[("fedcore_connected_clients", ())] == 4
    for name in (
        "fedcore_rounds_completed_total",
        "fedcore_updates_accepted_total",
        "fedcore_bytes_received_total",
        "fedcore_bytes_sent_total",
        "fedcore_current_round",
        "fedcore_inflight_uploads",
        "fedcore_fold_seconds_count",
    ):
        assert (name, ()) in samples, name


def test_refused_connections_are_counted_by_reason_and_survive_a_restart(
    metrics: AggregatorMetrics, server: MetricsServer
) -> None:
    metrics.count_refusal("per_peer_cap")
    metrics.count_refusal("per_peer_cap")
    metrics.count_refusal("tls_handshake_timeout")
    samples = _samples(_get(f"http://127.0.0.1:{server.port}/metrics")[2].decode())
    name = "fedcore_connections_refused_total"
    assert samples[(name, (("reason", "per_peer_cap"),))] == 2
    assert samples[(name, (("reason", "tls_handshake_timeout"),))] == 1
    # every reason the transport knows is there from the start, at zero
    assert {"tls_certificate_verify_failed", "first_message_timeout", "rate_limited"} <= set(
        REFUSAL_REASONS
    )
    assert all((name, (("reason", reason),)) in samples for reason in REFUSAL_REASONS)
    assert samples[(name, (("reason", "rate_limited"),))] == 0
    restarted = AggregatorMetrics()
    restarted.restore(metrics.snapshot())
    assert restarted.snapshot()[f'{name}{{reason="per_peer_cap"}}'] == 2


def test_encryption_buckets_span_ten_ms_to_ten_minutes(metrics: AggregatorMetrics) -> None:
    bounds = [
        float(sample.labels["le"])
        for family in metrics.registry.collect()
        if family.name == "fedcore_encryption_time_seconds"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    ]
    finite = [b for b in bounds if math.isfinite(b)]
    assert min(finite) <= 0.01 and max(finite) >= 600


@pytest.mark.parametrize(
    ("timings", "report"),
    [
        ({"train_s": -1.0, "encrypt_s": float("nan")}, {"iterations": float("inf")}),
        ({"train_s": "3", "encrypt_s": None}, {"iterations": -5}),
        ({"gpu_s": 1.0}, {"epochs": 3, "iterations": True}),
        ({}, {}),
    ],
)
def test_client_report_ignores_bad_and_unknown_values(
    metrics: AggregatorMetrics, timings: dict[str, Any], report: dict[str, Any]
) -> None:
    before = _samples(_scrape_registry(metrics))
    metrics.observe_client_report(timings, report)
    assert _samples(_scrape_registry(metrics)) == before


def _scrape_registry(metrics: AggregatorMetrics) -> str:
    from prometheus_client.exposition import generate_latest

    text = generate_latest(metrics.registry).decode()
    return "\n".join(line for line in text.splitlines() if "_created" not in line) + "\n"


def test_healthz_reflects_the_health_callback(metrics: AggregatorMetrics) -> None:
    state: dict[str, Any] = {"ok": True}

    def health() -> tuple[bool, dict[str, Any]]:
        return state["ok"], {"round": 7}

    with MetricsServer(metrics, health=health) as server:
        url = f"http://127.0.0.1:{server.port}/healthz"
        status, headers, body = _get(url)
        assert status == 200 and headers["Content-Type"] == "application/json"
        assert json.loads(body) == {"status": "ok", "round": 7}
        state["ok"] = False
        status, _, body = _get(url)
        assert status == 503
        assert json.loads(body)["status"] != "ok"


def test_healthz_without_callback_and_with_a_raising_one(metrics: AggregatorMetrics) -> None:
    def broken() -> tuple[bool, dict[str, Any]]:
        raise RuntimeError("registry lock poisoned")

    with MetricsServer(metrics) as healthy, MetricsServer(metrics, health=broken) as failing:
        assert _get(f"http://127.0.0.1:{healthy.port}/healthz")[0] == 200
        assert _get(f"http://127.0.0.1:{failing.port}/healthz")[0] == 503


def test_unknown_paths_are_404(server: MetricsServer) -> None:
    assert _get(f"http://127.0.0.1:{server.port}/")[0] == 404
    assert _get(f"http://127.0.0.1:{server.port}/metrics/extra")[0] == 404


def test_stop_closes_the_port(metrics: AggregatorMetrics) -> None:
    server = MetricsServer(metrics)
    with pytest.raises(RuntimeError, match="start"):
        _ = server.port
    server.start()
    port = server.port
    assert port > 0
    server.stop()
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_snapshot_restore_round_trip() -> None:
    first = AggregatorMetrics()
    first.observe_client_report({}, {"iterations": 40})
    first.rounds_completed_total.inc(3)
    first.rounds_failed_total.labels(reason="quorum_not_reached").inc()
    first.updates_rejected_total.labels(reason="replay").inc(2)
    first.updates_rejected_total.labels(reason='odd "reason", with\\ commas').inc()
    first.bytes_received_total.inc(1e9)
    snapshot = first.snapshot()
    assert snapshot["fedcore_training_iterations_total"] == 40
    assert snapshot['fedcore_updates_rejected_total{reason="replay"}'] == 2

    restarted = AggregatorMetrics()
    restarted.rounds_completed_total.inc(1)  # progress made before restore ran
    restarted.restore(json.loads(json.dumps(snapshot)))  # checkpoints go through JSON
    assert restarted.snapshot() == snapshot

    # Counters never go down: restoring an older snapshot changes nothing.
    restarted.rounds_completed_total.inc(5)
    restarted.restore(snapshot)
    assert restarted.snapshot()["fedcore_rounds_completed_total"] == 8


def test_restore_skips_unknown_and_malformed_entries(metrics: AggregatorMetrics) -> None:
    before = metrics.snapshot()
    metrics.restore(
        {
            "fedcore_not_a_metric_total": 5,
            "fedcore_connected_clients": 5,  # a gauge, not a counter
            'fedcore_updates_rejected_total{reason="replay"': 5,
            'fedcore_rounds_completed_total{phase="x"}': 5,  # wrong label
            "fedcore_bytes_sent_total": float("nan"),
            "fedcore_bytes_received_total": -3,
        }
    )
    assert metrics.snapshot() == before


def test_two_instances_do_not_collide_or_touch_the_global_registry() -> None:
    global_names = {family.name for family in REGISTRY.collect()}
    a, b = AggregatorMetrics(), AggregatorMetrics()
    a.observe_client_report({}, {"iterations": 3})
    assert a.snapshot()["fedcore_training_iterations_total"] == 3
    assert b.snapshot()["fedcore_training_iterations_total"] == 0
    assert {family.name for family in REGISTRY.collect()} == global_names
    assert not any(name.startswith("fedcore") for name in global_names)


def test_given_registry_is_used_and_cannot_be_shared_twice() -> None:
    registry = CollectorRegistry()
    metrics = AggregatorMetrics(registry)
    assert metrics.registry is registry
    with pytest.raises(ValueError):
        AggregatorMetrics(registry)
