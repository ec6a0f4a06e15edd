"""Tests for fedcore.dashboard and its routes on the metrics server, over real HTTP."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from fedcore.aggregator.rounds import RoundReport
from fedcore.dashboard import (
    DASHBOARD_CSP,
    DASHBOARD_PAGE,
    Dashboard,
    FederationState,
    RoundSummary,
)
from fedcore.metrics import AggregatorMetrics, MetricsServer

HOSTILE = '</script><script>alert("x")</script><img src=x onerror=alert(1)>&amp;'


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _report(round_id: int, *, accuracy: float | None = 0.5, loss: float = 1.25) -> RoundReport:
    evaluation = {} if accuracy is None else {"accuracy": accuracy, "loss": loss}
    return RoundReport(
        round_id=round_id,
        rounds_completed=round_id,
        contributors=("client-0", "client-1", "client-2"),
        total_weight=30,
        phase_seconds={"select": 0.01, "collect": 2.0, "decrypt": 0.5},
        client_metrics=evaluation,
        client_timings={"train_s": 1.0},
        check_seconds={},
        bytes_received=12345,
        fold_seconds=0.2,
    )


@pytest.fixture
def metrics() -> AggregatorMetrics:
    return AggregatorMetrics()


@pytest.fixture
def dashboard(metrics: AggregatorMetrics) -> Dashboard:
    return Dashboard(metrics, rounds_planned=5, min_clients=3, encrypted=True)


@pytest.fixture
def served(metrics: AggregatorMetrics) -> Iterator[tuple[MetricsServer, dict[str, Any]]]:
    given: dict[str, Any] = {"state": "running", "note": HOSTILE}
    with MetricsServer(metrics, status=lambda: given) as server:
        yield server, given


def test_root_serves_the_page_as_html_with_its_policy(
    served: tuple[MetricsServer, dict[str, Any]],
) -> None:
    server, _ = served
    status, headers, body = _get(f"http://127.0.0.1:{server.port}/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"] == DASHBOARD_CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == DASHBOARD_PAGE
    assert b'fetch("status.json"' in body
    assert _get(f"http://127.0.0.1:{server.port}/?refresh=1")[2] == DASHBOARD_PAGE


def test_status_json_is_what_the_provider_gives(
    served: tuple[MetricsServer, dict[str, Any]],
) -> None:
    server, given = served
    url = f"http://127.0.0.1:{server.port}/status.json"
    status, headers, body = _get(url)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    assert json.loads(body) == given
    given["state"] = "complete"  # asked again on every request, never cached
    assert json.loads(_get(url)[2])["state"] == "complete"


def test_untrusted_strings_never_reach_the_html(
    served: tuple[MetricsServer, dict[str, Any]],
) -> None:
    server, _ = served
    page = _get(f"http://127.0.0.1:{server.port}/")[2]
    assert HOSTILE.encode() not in page and b"alert" not in page
    # in the JSON they stay data: a string the page puts in textContent
    status, headers, body = _get(f"http://127.0.0.1:{server.port}/status.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body)["note"] == HOSTILE


def test_the_page_only_writes_text_and_loads_nothing_from_elsewhere() -> None:
    page = DASHBOARD_PAGE.decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink
    for external in ("src=", "href=", "url(", "@import", "<link", "<iframe"):
        assert external not in page, external
    # the one absolute URL is the SVG namespace name, which is never fetched
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"]
    assert re.findall(r"fetch\(([^,)]*)", page) == ['"status.json"']


def test_the_policy_allows_exactly_the_inline_script_and_style() -> None:
    page = DASHBOARD_PAGE.decode()
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    assert page.count("<script") == 1 and page.count("<style") == 1

    def digest(source: str) -> str:
        return base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()

    policy = dict(part.strip().split(" ", 1) for part in DASHBOARD_CSP.split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == f"'sha256-{digest(scripts[0])}'"
    assert policy["style-src"] == f"'sha256-{digest(styles[0])}'"
    assert policy["connect-src"] == "'self'"


def test_unknown_paths_are_still_404(served: tuple[MetricsServer, dict[str, Any]]) -> None:
    server, _ = served
    for path in ("/index.html", "/status", "/status.json/x", "/dashboard", "/metrics/x"):
        assert _get(f"http://127.0.0.1:{server.port}{path}")[0] == 404, path
    assert _get(f"http://127.0.0.1:{server.port}/metrics")[0] == 200


def test_no_dashboard_without_a_status_provider(metrics: AggregatorMetrics) -> None:
    with MetricsServer(metrics) as server:
        assert _get(f"http://127.0.0.1:{server.port}/")[0] == 404
        assert _get(f"http://127.0.0.1:{server.port}/status.json")[0] == 404


def test_a_failing_provider_is_a_500_with_one_line_and_the_server_goes_on(
    metrics: AggregatorMetrics,
) -> None:
    calls: list[int] = []

    def provider() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("round log locked")
        return {"state": "running", "value": float("nan")} if len(calls) == 2 else {"ok": 1}

    with MetricsServer(metrics, status=provider) as server:
        url = f"http://127.0.0.1:{server.port}/status.json"
        status, headers, body = _get(url)
        assert status == 500 and headers["Content-Type"] == "application/json"
        assert body.count(b"\n") == 1 and "round log locked" in json.loads(body)["error"]
        assert _get(url)[0] == 500  # NaN is not JSON: refused rather than sent broken
        status, _, body = _get(url)
        assert (status, body) == (200, b'{"ok": 1}\n')
        assert _get(f"http://127.0.0.1:{server.port}/")[0] == 200


def test_status_follows_the_federation(dashboard: Dashboard, metrics: AggregatorMetrics) -> None:
    def state(*, stopping: bool = False, **live: Any) -> FederationState:
        values = {"rounds_completed": 1, "round_id": 2, "round_phase": "collecting", **live}
        return dashboard.status(stopping=stopping, **values).state

    assert state() is FederationState.RUNNING
    assert state(round_id=None, round_phase=None) is FederationState.BETWEEN_ROUNDS
    assert state(rounds_completed=5, round_id=None) is FederationState.COMPLETE
    assert state(stopping=True) is FederationState.STOPPING

    metrics.connected_clients.set(4)
    metrics.inflight_uploads.set(2)
    metrics.current_round.set(2)
    metrics.updates_accepted_total.inc(7)
    metrics.updates_rejected_total.labels(reason="replay").inc(3)
    metrics.count_refusal("per_peer_cap")
    metrics.rounds_failed_total.labels(reason="below_quorum").inc()
    metrics.bytes_received_total.inc(1000)
    body = dashboard.status(
        rounds_completed=1, round_id=2, round_phase="decrypting", stopping=False
    ).to_json()
    assert json.loads(json.dumps(body, allow_nan=False)) == body
    assert body["state"] == "running" and body["encrypted"] is True
    assert body["round"] == {"id": 2, "phase": "decrypting"}
    assert (body["rounds_completed"], body["rounds_planned"], body["min_clients"]) == (1, 5, 3)
    assert (body["connected_clients"], body["uploads_in_flight"]) == (4, 2)
    assert body["updates_accepted"] == 7 and body["bytes_received"] == 1000
    assert body["updates_rejected"]["replay"] == 3
    assert body["updates_rejected"]["digest_mismatch"] == 0  # every reason, from the start
    assert body["connections_refused"]["per_peer_cap"] == 1
    assert body["rounds_failed"] == {"below_quorum": 1}
    assert body["global_model"] is None and body["rounds"] == []


def test_a_completed_round_is_shown_and_exported_without_client_ids(
    dashboard: Dashboard, metrics: AggregatorMetrics
) -> None:
    dashboard.round_completed(_report(1, accuracy=0.625, loss=1.5))
    dashboard.round_completed(_report(2, accuracy=None))  # nobody evaluated this one
    body = dashboard.status(rounds_completed=2, round_id=None, round_phase=None, stopping=False)
    wire = body.to_json()
    assert [r["round_id"] for r in wire["rounds"]] == [1, 2]
    first = wire["rounds"][0]
    assert first["contributors"] == 3 and first["total_weight"] == 30
    assert first["phase_seconds"] == {"select": 0.01, "collect": 2.0, "decrypt": 0.5}
    assert first["evaluation"] == {"accuracy": 0.625, "loss": 1.5}
    assert wire["global_model"] == {"round_id": 1, "accuracy": 0.625, "loss": 1.5}
    assert "client-0" not in json.dumps(wire)
    sample = metrics.registry.get_sample_value
    assert sample("fedcore_global_model_accuracy") == 0.625
    assert sample("fedcore_global_model_loss") == 1.5
    assert sample("fedcore_global_model_round") == 1  # round 2 reported no evaluation


def test_the_round_log_is_bounded(metrics: AggregatorMetrics) -> None:
    dashboard = Dashboard(metrics, rounds_planned=100, min_clients=1, encrypted=False, keep=3)
    for round_id in range(1, 8):
        dashboard.round_completed(_report(round_id, accuracy=round_id / 10))
    status = dashboard.status(rounds_completed=7, round_id=None, round_phase=None, stopping=False)
    assert [r.round_id for r in status.rounds] == [5, 6, 7]
    assert status.to_json()["global_model"]["accuracy"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="keep"):
        Dashboard(metrics, rounds_planned=1, min_clients=1, encrypted=False, keep=0)


@pytest.mark.parametrize(
    "evaluation",
    [
        {"accuracy": float("nan"), "loss": float("inf")},
        {"accuracy": -0.1, "loss": "1.0"},
        {"f1": 0.9},
        {"accuracy": True},
        {},
    ],
)
def test_unusable_evaluations_leave_the_gauges_alone(
    metrics: AggregatorMetrics, evaluation: dict[str, Any]
) -> None:
    metrics.observe_global_model(1, {"accuracy": 0.5, "loss": 2.0})
    metrics.observe_global_model(2, evaluation)
    sample = metrics.registry.get_sample_value
    assert sample("fedcore_global_model_accuracy") == 0.5
    assert sample("fedcore_global_model_loss") == 2.0
    assert sample("fedcore_global_model_round") == 1


def test_round_summary_validates_and_nulls_non_finite_numbers() -> None:
    summary = RoundSummary.of(_report(3, accuracy=float("nan")))
    assert summary.to_json()["evaluation"] == {"accuracy": None, "loss": 1.25}
    with pytest.raises(ValueError, match="contributors"):
        RoundSummary(
            round_id=1,
            contributors=-1,
            total_weight=1,
            phase_seconds={},
            evaluation={},
            bytes_received=0,
        )
