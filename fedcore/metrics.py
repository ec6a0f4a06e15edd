"""Prometheus metrics of the aggregator, and the small HTTP server that exposes them.

Each `AggregatorMetrics` owns its own `CollectorRegistry`: no global state, so two
aggregators (or many tests) in one process never collide. `MetricsServer` serves
``/metrics`` and ``/healthz`` from a background thread, and the dashboard page of
`fedcore.dashboard` at ``/`` with its ``/status.json`` when given a status provider. This
module knows nothing of Paillier, torch or the wire protocol (only the names of
`fedcore.contracts.RejectReason` and of the transport's refusal reasons,
`protocol.refusals.REFUSAL_LABELS`); it receives numbers.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fedcore.contracts import RejectReason
from fedcore.dashboard import DASHBOARD_CSP, DASHBOARD_PAGE
from protocol.refusals import REFUSAL_LABELS

__all__ = [
    "REFUSAL_REASONS",
    "REJECT_REASONS",
    "ROUND_PHASES",
    "AggregatorMetrics",
    "LiveTotals",
    "MetricsServer",
    "StatusProvider",
]

logger = logging.getLogger(__name__)

# Reasons an update is refused (one enum, fedcore.contracts.RejectReason); pre-created so
# dashboards see zeros, not gaps.
REJECT_REASONS = tuple(reason.label for reason in RejectReason)
# Why the transport refused a connection before it was a client (TLS, caps, first frame).
REFUSAL_REASONS = REFUSAL_LABELS
ROUND_PHASES = ("select", "collect", "fold", "decrypt", "update", "checkpoint")

# Client-side work (train, encrypt) and committee decryption span 10 ms (digits, tiny
# model) to 10 minutes (seed MLP on a slow edge device).
_SLOW_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    25.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Aggregator-side phases: from a millisecond (select) to minutes (collect).
_PHASE_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)
# Folding one client's update: ~7k multiplications at ~5 µs is ~35 ms for the seed MLP.
_FOLD_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_SNAPSHOT_KEY = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?$")
_LABEL_PAIR = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _snapshot_key(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    pairs = ",".join(f'{key}="{_escape(value)}"' for key, value in sorted(labels.items()))
    return f"{name}{{{pairs}}}"


def _parse_snapshot_key(key: str) -> tuple[str, dict[str, str]] | None:
    match = _SNAPSHOT_KEY.match(key)
    if match is None:
        return None
    labels: dict[str, str] = {}
    text = match.group("labels") or ""
    position = 0
    while position < len(text):
        pair = _LABEL_PAIR.match(text, position)
        if pair is None:
            return None
        labels[pair.group(1)] = _unescape(pair.group(2))
        position = pair.end()
    return match.group("name"), labels


def _usable(value: Any) -> float | None:
    """The value as a float if it is a finite, non-negative real number, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0:
        return None
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveTotals:
    """The aggregator's counters and gauges at one instant (what the dashboard shows)."""

    connected_clients: int
    inflight_uploads: int
    current_round: int
    updates_accepted: int
    updates_rejected: dict[str, int]
    connections_refused: dict[str, int]
    rounds_failed: dict[str, int]
    bytes_received: int
    bytes_sent: int


def _by_reason(counter: Counter) -> dict[str, int]:
    return {
        sample.labels["reason"]: int(sample.value)
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }


class AggregatorMetrics:
    """Every Prometheus metric of one aggregator, registered in its own registry.

    Counters are exposed with a ``_total`` suffix (prometheus_client appends it).
    Pass ``registry`` to share one with other collectors; two `AggregatorMetrics`
    cannot share a registry (their names would clash).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.training_iterations_total = Counter(
            "fedcore_training_iterations",
            "Completed local training iterations reported by clients.",
            registry=r,
        )
        self.encryption_time_seconds = Histogram(
            "fedcore_encryption_time_seconds",
            "Client-reported time to encrypt one update.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.decryption_time_seconds = Histogram(
            "fedcore_decryption_time_seconds",
            "Committee-reported time to decrypt one shard of the summed update.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.unmask_time_seconds = Histogram(
            "fedcore_unmask_time_seconds",
            "Unmasker-reported time to check the contributors and unmask one shard.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.local_training_seconds = Histogram(
            "fedcore_local_training_seconds",
            "Client-reported local training time per round.",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.rounds_completed_total = Counter(
            "fedcore_rounds_completed", "Rounds that updated the global model.", registry=r
        )
        self.rounds_failed_total = Counter(
            "fedcore_rounds_failed",
            "Rounds that closed without updating the global model, by reason.",
            ["reason"],
            registry=r,
        )
        self.updates_accepted_total = Counter(
            "fedcore_updates_accepted",
            "Complete client updates folded into a round's sum.",
            registry=r,
        )
        self.updates_rejected_total = Counter(
            "fedcore_updates_rejected", "Client updates refused, by reason.", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.updates_rejected_total.labels(reason=reason)
        self.checkpoint_failures_total = Counter(
            "fedcore_checkpoint_failures",
            "Checkpoint saves that failed (full or read-only disk); the previous checkpoint "
            "stays whole and no round completes until a save succeeds.",
            registry=r,
        )
        self.connections_refused_total = Counter(
            "fedcore_connections_refused",
            "Connections refused before they were a client (TLS handshake, connection caps, "
            "a bad or missing first message) or for a heartbeat flood, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.connections_refused_total.labels(reason=reason)
        self.bytes_received_total = Counter(
            "fedcore_bytes_received", "Bytes received from clients (TLS payload).", registry=r
        )
        self.bytes_sent_total = Counter(
            "fedcore_bytes_sent", "Bytes sent to clients (TLS payload).", registry=r
        )
        self.connected_clients = Gauge(
            "fedcore_connected_clients", "Clients connected right now.", registry=r
        )
        self.current_round = Gauge(
            "fedcore_current_round", "Id of the round in progress (or last finished).", registry=r
        )
        self.inflight_uploads = Gauge(
            "fedcore_inflight_uploads", "Client updates being received right now.", registry=r
        )
        self.round_phase_seconds = Histogram(
            "fedcore_round_phase_seconds",
            "Wall time of each phase of a round.",
            ["phase"],
            buckets=_PHASE_BUCKETS,
            registry=r,
        )
        for phase in ROUND_PHASES:
            self.round_phase_seconds.labels(phase=phase)
        self.fold_seconds = Histogram(
            "fedcore_fold_seconds",
            "Time to fold one complete client update into the round's sum.",
            buckets=_FOLD_BUCKETS,
            registry=r,
        )
        # Weighted means of the contributors' evaluations, decrypted as part of the sum:
        # never one client's figure.
        self.global_model_accuracy = Gauge(
            "fedcore_global_model_accuracy",
            "Accuracy of the global model a round started from: the contributors' weighted "
            "mean evaluation, decrypted with the sum (see fedcore_global_model_round).",
            registry=r,
        )
        self.global_model_loss = Gauge(
            "fedcore_global_model_loss",
            "Loss of the global model a round started from: the contributors' weighted "
            "mean evaluation, decrypted with the sum (see fedcore_global_model_round).",
            registry=r,
        )
        self.global_model_round = Gauge(
            "fedcore_global_model_round",
            "Id of the round whose evaluation the global model accuracy and loss show "
            "(0: no round reported one yet).",
            registry=r,
        )
        # Exposed series name -> (counter, label names), for snapshot/restore.
        self._counters: dict[str, tuple[Counter, tuple[str, ...]]] = {
            "fedcore_training_iterations_total": (self.training_iterations_total, ()),
            "fedcore_rounds_completed_total": (self.rounds_completed_total, ()),
            "fedcore_rounds_failed_total": (self.rounds_failed_total, ("reason",)),
            "fedcore_updates_accepted_total": (self.updates_accepted_total, ()),
            "fedcore_updates_rejected_total": (self.updates_rejected_total, ("reason",)),
            "fedcore_connections_refused_total": (self.connections_refused_total, ("reason",)),
            "fedcore_checkpoint_failures_total": (self.checkpoint_failures_total, ()),
            "fedcore_bytes_received_total": (self.bytes_received_total, ()),
            "fedcore_bytes_sent_total": (self.bytes_sent_total, ()),
        }

    def count_refusal(self, reason: str) -> None:
        """Count one connection refused by the transport (its ``on_refusal`` callback)."""
        self.connections_refused_total.labels(reason=reason).inc()

    def observe_client_report(self, timings: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
        """Record an UpdateDone report: ``timings["train_s"]``, ``timings["encrypt_s"]``,
        ``metrics["iterations"]``.

        Unknown keys, and values that are negative, non-finite or not numbers, are
        ignored: a client's report must never break the aggregator.
        """
        train_s = _usable(timings.get("train_s"))
        if train_s is not None:
            self.local_training_seconds.observe(train_s)
        encrypt_s = _usable(timings.get("encrypt_s"))
        if encrypt_s is not None:
            self.encryption_time_seconds.observe(encrypt_s)
        iterations = _usable(metrics.get("iterations"))
        if iterations is not None:
            self.training_iterations_total.inc(iterations)

    def observe_global_model(self, round_id: int, evaluation: Mapping[str, Any]) -> None:
        """Publish a completed round's decrypted evaluation (``accuracy``, ``loss``).

        Other names, and values that are negative, non-finite or not numbers, are
        ignored; a round without a usable accuracy or loss leaves the gauges as they were.
        """
        accuracy = _usable(evaluation.get("accuracy"))
        loss = _usable(evaluation.get("loss"))
        if accuracy is not None:
            self.global_model_accuracy.set(accuracy)
        if loss is not None:
            self.global_model_loss.set(loss)
        if accuracy is not None or loss is not None:
            self.global_model_round.set(round_id)

    def live_totals(self) -> LiveTotals:
        """The current value of the gauges and counters the dashboard shows."""

        def value(name: str) -> int:
            return int(self.registry.get_sample_value(name) or 0)

        return LiveTotals(
            connected_clients=value("fedcore_connected_clients"),
            inflight_uploads=value("fedcore_inflight_uploads"),
            current_round=value("fedcore_current_round"),
            updates_accepted=value("fedcore_updates_accepted_total"),
            updates_rejected=_by_reason(self.updates_rejected_total),
            connections_refused=_by_reason(self.connections_refused_total),
            rounds_failed=_by_reason(self.rounds_failed_total),
            bytes_received=value("fedcore_bytes_received_total"),
            bytes_sent=value("fedcore_bytes_sent_total"),
        )

    def snapshot(self) -> dict[str, float]:
        """Current value of every counter series, keyed ``name_total`` or
        ``name_total{label="value"}``, for checkpointing."""
        values: dict[str, float] = {}
        for counter, _labelnames in self._counters.values():
            for metric in counter.collect():
                for sample in metric.samples:
                    if sample.name.endswith("_total"):
                        values[_snapshot_key(sample.name, sample.labels)] = float(sample.value)
        return values

    def restore(self, snapshot: Mapping[str, float]) -> None:
        """Raise counters back to the values of a `snapshot` (after a restart).

        Counters only go up, so each is incremented by the difference when the
        snapshot is higher. Unknown or malformed keys and unusable values are skipped.
        """
        current = self.snapshot()
        for key, value in snapshot.items():
            target = _usable(value)
            parsed = _parse_snapshot_key(key)
            if target is None or parsed is None or parsed[0] not in self._counters:
                logger.warning("metrics restore: skipping %r = %r", key, value)
                continue
            name, labels = parsed
            counter, labelnames = self._counters[name]
            if sorted(labels) != sorted(labelnames):
                logger.warning("metrics restore: %r has the wrong labels; skipped", key)
                continue
            missing = target - current.get(_snapshot_key(name, labels), 0.0)
            if missing > 0:
                (counter.labels(**labels) if labels else counter).inc(missing)


StatusProvider = Callable[[], Mapping[str, Any]]
"""Returns the dashboard's status as a JSON object (`fedcore.dashboard.FederationStatus`)."""


def _make_handler(
    metrics: AggregatorMetrics,
    health: Callable[[], tuple[bool, dict[str, Any]]] | None,
    status: StatusProvider | None,
) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        server_version = "fedcore-metrics"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry))
            elif path == "/healthz":
                self._healthz()
            elif path == "/" and status is not None:
                self._reply(
                    200,
                    "text/html; charset=utf-8",
                    DASHBOARD_PAGE,
                    {"Content-Security-Policy": DASHBOARD_CSP, "Cache-Control": "no-store"},
                )
            elif path == "/status.json" and status is not None:
                self._status(status)
            else:
                self._reply(404, "text/plain; charset=utf-8", b"not found\n")

        def _status(self, provider: StatusProvider) -> None:
            try:
                body = json.dumps(provider(), allow_nan=False).encode() + b"\n"
            except Exception as exc:  # the page shows the error line; the server goes on
                logger.exception("dashboard status raised")
                error = json.dumps({"error": f"status unavailable: {exc!r}"}).encode() + b"\n"
                self._reply(500, "application/json", error, {"Cache-Control": "no-store"})
                return
            self._reply(200, "application/json", body, {"Cache-Control": "no-store"})

        def _healthz(self) -> None:
            try:
                healthy, details = (True, {}) if health is None else health()
            except Exception as exc:  # a failing probe means unhealthy, not a 500
                logger.exception("health check raised")
                healthy, details = False, {"error": repr(exc)}
            body = {**details, "status": "ok" if healthy else "unavailable"}
            payload = json.dumps(body, default=str).encode() + b"\n"
            self._reply(200 if healthy else 503, "application/json", payload)

        def _reply(
            self,
            status: int,
            content_type: str,
            payload: bytes,
            headers: Mapping[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Content-Type-Options", "nosniff")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s - " + format, self.address_string(), *args)

    return _Handler


class _IPv6HTTPServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """HTTP server for ``GET /metrics`` (Prometheus text) and ``GET /healthz`` (JSON).

    ``/healthz`` answers 200 when ``health()`` returns ``(True, details)``, 503
    otherwise; ``details`` are merged into the JSON body. With a ``status`` provider it
    also serves the dashboard page at ``/`` and ``status()`` as ``/status.json`` (both
    404 without one). ``port=0`` picks a free port; read the real one from `port` after
    `start`.
    """

    def __init__(
        self,
        metrics: AggregatorMetrics,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        health: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        status: StatusProvider | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {port}")
        self._metrics = metrics
        self._host = host
        self._requested_port = port
        self._health = health
        self._status = status
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port actually bound (meaningful after `start`)."""
        if self._httpd is None:
            raise RuntimeError("MetricsServer is not started; call start() first")
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        """Bind and serve in a daemon thread; returns once the socket is listening."""
        if self._httpd is not None:
            raise RuntimeError("MetricsServer is already started")
        server_class = _IPv6HTTPServer if ":" in self._host else ThreadingHTTPServer
        httpd = server_class(
            (self._host, self._requested_port),
            _make_handler(self._metrics, self._health, self._status),
        )
        httpd.daemon_threads = True
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, name="fedcore-metrics", daemon=True
        )
        self._thread.start()
        logger.info("metrics on http://%s:%d/metrics", self._host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        httpd, thread = self._httpd, self._thread
        self._httpd, self._thread = None, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
