"""The aggregator's live dashboard: one self-contained HTML page and the status it polls.

`fedcore.metrics.MetricsServer` serves `DASHBOARD_PAGE` at ``/`` (with `DASHBOARD_CSP`)
and the aggregator's `Dashboard.status` as ``/status.json``; the page fetches that every
1.5 s and draws it with ``textContent`` and SVG nodes only, so nothing it shows is ever
parsed as HTML, and it loads nothing from anywhere else.

The status holds aggregates only: counts, phase timings, and the global model's
accuracy and loss as decrypted with the round's sum (the contributors' weighted mean),
never a client's identity or its own figures. This module knows nothing of sockets,
Paillier or torch, and does not import `fedcore.metrics` at run time (that module serves
this page); it reads numbers from an `AggregatorMetrics` it is given.
"""

from __future__ import annotations

import base64
import collections
import enum
import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcore.aggregator.rounds import RoundReport
    from fedcore.metrics import AggregatorMetrics, LiveTotals

__all__ = [
    "DASHBOARD_CSP",
    "DASHBOARD_PAGE",
    "POLL_SECONDS",
    "ROUNDS_SHOWN",
    "Dashboard",
    "FederationState",
    "FederationStatus",
    "RoundSummary",
]

POLL_SECONDS = 1.5
"""How often the page fetches ``/status.json``."""
ROUNDS_SHOWN = 200
"""Completed rounds the status keeps (table and chart); older ones drop off."""


class FederationState(enum.StrEnum):
    """What the federation is doing, as the status names it."""

    RUNNING = "running"
    BETWEEN_ROUNDS = "between_rounds"  # or waiting for enough clients to start one
    STOPPING = "stopping"
    COMPLETE = "complete"


def _finite(value: float) -> float | None:
    """``value`` for JSON: None when it is NaN or infinite (JSON has neither)."""
    number = float(value)
    return number if math.isfinite(number) else None


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundSummary:
    """One completed round as the dashboard shows it: counts, timings, decrypted evaluation."""

    round_id: int
    contributors: int
    total_weight: int
    phase_seconds: dict[str, float]
    evaluation: dict[str, float]
    bytes_received: int
    finished_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("round_id", "contributors", "total_weight", "bytes_received"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @classmethod
    def of(cls, report: RoundReport) -> RoundSummary:
        """The summary of a completed round's report (contributor count, not their ids)."""
        return cls(
            round_id=report.round_id,
            contributors=len(report.contributors),
            total_weight=report.total_weight,
            phase_seconds=dict(report.phase_seconds),
            evaluation=dict(report.client_metrics),
            bytes_received=report.bytes_received,
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON object for the page (non-finite numbers become null)."""
        return {
            "round_id": self.round_id,
            "contributors": self.contributors,
            "total_weight": self.total_weight,
            "phase_seconds": {k: _finite(v) for k, v in self.phase_seconds.items()},
            "evaluation": {k: _finite(v) for k, v in self.evaluation.items()},
            "bytes_received": self.bytes_received,
            "finished_at": _finite(self.finished_at),
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationStatus:
    """Everything the dashboard page shows at one instant."""

    state: FederationState
    encrypted: bool
    rounds_planned: int
    rounds_completed: int
    min_clients: int
    round_id: int | None
    round_phase: str | None
    totals: LiveTotals
    rounds: tuple[RoundSummary, ...]
    generated_at: float = field(default_factory=time.time)

    def global_model(self) -> RoundSummary | None:
        """The latest completed round whose contributors reported an evaluation."""
        return next((r for r in reversed(self.rounds) if r.evaluation), None)

    def to_json(self) -> dict[str, Any]:
        """The JSON object served as ``/status.json``."""
        t = self.totals
        latest = self.global_model()
        return {
            "state": self.state.value,
            "encrypted": self.encrypted,
            "rounds_planned": self.rounds_planned,
            "rounds_completed": self.rounds_completed,
            "min_clients": self.min_clients,
            "round": None
            if self.round_id is None
            else {"id": self.round_id, "phase": self.round_phase},
            "last_round": t.current_round,
            "connected_clients": t.connected_clients,
            "uploads_in_flight": t.inflight_uploads,
            "updates_accepted": t.updates_accepted,
            "updates_rejected": dict(t.updates_rejected),
            "connections_refused": dict(t.connections_refused),
            "rounds_failed": dict(t.rounds_failed),
            "bytes_received": t.bytes_received,
            "bytes_sent": t.bytes_sent,
            "global_model": None
            if latest is None
            else {
                "round_id": latest.round_id,
                "accuracy": _finite(latest.evaluation.get("accuracy", math.nan)),
                "loss": _finite(latest.evaluation.get("loss", math.nan)),
            },
            "rounds": [r.to_json() for r in self.rounds],
            "generated_at": _finite(self.generated_at),
        }


class Dashboard:
    """The live view of one aggregator: its recent rounds, its metrics, its state.

    The round loop calls `round_completed`; the metrics server's thread calls `status`
    (through the aggregator's provider), so the round log is guarded by a lock and
    everything else is read from thread-safe Prometheus metrics.
    """

    def __init__(
        self,
        metrics: AggregatorMetrics,
        *,
        rounds_planned: int,
        min_clients: int,
        encrypted: bool,
        keep: int = ROUNDS_SHOWN,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._metrics = metrics
        self._rounds_planned = rounds_planned
        self._min_clients = min_clients
        self._encrypted = encrypted
        self._rounds: collections.deque[RoundSummary] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()

    def round_completed(self, report: RoundReport) -> None:
        """Keep a completed round for the page; publish its evaluation as the model's gauges."""
        summary = RoundSummary.of(report)
        with self._lock:
            self._rounds.append(summary)
        self._metrics.observe_global_model(report.round_id, report.client_metrics)

    def status(
        self,
        *,
        rounds_completed: int,
        round_id: int | None,
        round_phase: str | None,
        stopping: bool,
    ) -> FederationStatus:
        """The status now; ``round_id``/``round_phase`` describe the round in progress, if any."""
        if stopping:
            state = FederationState.STOPPING
        elif rounds_completed >= self._rounds_planned:
            state = FederationState.COMPLETE
        elif round_id is None:
            state = FederationState.BETWEEN_ROUNDS
        else:
            state = FederationState.RUNNING
        with self._lock:
            rounds = tuple(self._rounds)
        return FederationStatus(
            state=state,
            encrypted=self._encrypted,
            rounds_planned=self._rounds_planned,
            rounds_completed=rounds_completed,
            min_clients=self._min_clients,
            round_id=round_id,
            round_phase=round_phase,
            totals=self._metrics.live_totals(),
            rounds=rounds,
        )


_STYLE = """
:root { color-scheme: light dark; --fg: #1d2330; --muted: #6b7280; --bg: #f5f6f8;
  --card: #ffffff; --line: #d9dde3; --accent: #2563eb; --bad: #b91c1c; --good: #15803d; }
@media (prefers-color-scheme: dark) { :root { --fg: #e5e7eb; --muted: #9ca3af;
  --bg: #111318; --card: #1b1e25; --line: #2e333d; --accent: #60a5fa; --bad: #f87171;
  --good: #4ade80; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, sans-serif; color: var(--fg);
  background: var(--bg); }
header { display: flex; flex-wrap: wrap; gap: 12px; align-items: baseline;
  padding: 14px 20px; border-bottom: 1px solid var(--line); background: var(--card); }
h1 { font-size: 18px; margin: 0; }
h2 { font-size: 14px; margin: 0 0 8px; color: var(--muted); font-weight: 600; }
main { padding: 16px 20px; display: grid; gap: 16px; }
.badge { padding: 2px 10px; border-radius: 10px; background: var(--line); font-weight: 600; }
.badge.running { background: var(--accent); color: #fff; }
.badge.complete { background: var(--good); color: #fff; }
.badge.stopping, .badge.offline { background: var(--bad); color: #fff; }
.muted { color: var(--muted); }
.error { color: var(--bad); font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr));
  gap: 12px; }
.card, section { background: var(--card); border: 1px solid var(--line);
  border-radius: 8px; padding: 12px 14px; }
.card .label { color: var(--muted); font-size: 12px; }
.card .value { font-size: 24px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12px; }
.charts, .reasons { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr));
  gap: 16px; }
svg { width: 100%; height: 190px; display: block; }
svg .axis { stroke: var(--line); }
svg .series { fill: none; stroke: var(--accent); stroke-width: 2; }
svg .dot { fill: var(--accent); }
svg text { fill: var(--muted); font-size: 11px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 4px 8px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { color: var(--muted); font-weight: 600; }
.scroll { overflow-x: auto; max-height: 420px; }
"""

_SCRIPT = """
"use strict";
const POLL_MS = __POLL_MS__;
const SVG_NS = "http://www.w3.org/2000/svg";
const STATE_LABELS = {
  running: "running", between_rounds: "between rounds",
  stopping: "stopping", complete: "complete",
};
let lastSuccess = 0;

function byId(id) { return document.getElementById(id); }
function setText(id, text) { byId(id).textContent = text; }
function isNumber(x) { return typeof x === "number" && Number.isFinite(x); }
function fixed(x, digits) { return isNumber(x) ? x.toFixed(digits) : "\\u2013"; }
function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
function bytes(n) {
  if (!isNumber(n)) { return "\\u2013"; }
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
}
function addCell(row, text, header) {
  const cell = document.createElement(header ? "th" : "td");
  cell.textContent = text;
  row.appendChild(cell);
  return cell;
}

function renderReasons(bodyId, counts) {
  const body = byId(bodyId);
  clear(body);
  const entries = Object.entries(counts || {}).filter((e) => isNumber(e[1]) && e[1] > 0);
  entries.sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  if (entries.length === 0) {
    const row = body.insertRow();
    addCell(row, "none").className = "muted";
    addCell(row, "0");
    return;
  }
  for (const [reason, count] of entries) {
    const row = body.insertRow();
    row.dataset.reason = reason;
    addCell(row, reason);
    addCell(row, String(count));
  }
}

function renderRounds(rounds) {
  const phases = [];
  for (const r of rounds) {
    for (const name of Object.keys(r.phase_seconds || {})) {
      if (!phases.includes(name)) { phases.push(name); }
    }
  }
  const head = byId("rounds-head");
  clear(head);
  const headRow = head.insertRow();
  for (const title of ["round", "contributors", "weight"]) { addCell(headRow, title, true); }
  for (const name of phases) { addCell(headRow, name + " s", true); }
  for (const title of ["total s", "accuracy", "loss"]) { addCell(headRow, title, true); }
  const body = byId("rounds-body");
  clear(body);
  for (const r of rounds.slice().reverse()) {
    const row = body.insertRow();
    row.dataset.round = String(r.round_id);
    addCell(row, String(r.round_id));
    addCell(row, String(r.contributors));
    addCell(row, String(r.total_weight));
    let total = 0;
    for (const name of phases) {
      const seconds = (r.phase_seconds || {})[name];
      if (isNumber(seconds)) { total += seconds; }
      addCell(row, fixed(seconds, 2));
    }
    addCell(row, fixed(total, 2));
    const evaluation = r.evaluation || {};
    for (const metric of ["accuracy", "loss"]) {
      const cell = addCell(row, fixed(evaluation[metric], 4));
      cell.className = metric;
      if (isNumber(evaluation[metric])) { cell.dataset.value = String(evaluation[metric]); }
    }
  }
  if (rounds.length === 0) {
    const row = body.insertRow();
    addCell(row, "no completed round yet").className = "muted";
  }
}

function svgNode(name, attributes, text) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) { node.setAttribute(key, String(value)); }
  if (text !== undefined) { node.textContent = text; }
  return node;
}

function drawChart(svgId, rounds, metric, fromZero) {
  const svg = byId(svgId);
  clear(svg);
  const points = rounds
    .filter((r) => isNumber((r.evaluation || {})[metric]))
    .map((r) => [r.round_id, r.evaluation[metric]]);
  const width = 600, height = 190, left = 48, right = 12, top = 12, bottom = 26;
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.appendChild(svgNode("line", {
    class: "axis", x1: left, y1: height - bottom, x2: width - right, y2: height - bottom }));
  svg.appendChild(svgNode("line", {
    class: "axis", x1: left, y1: top, x2: left, y2: height - bottom }));
  if (points.length === 0) {
    svg.appendChild(svgNode("text", { x: left + 10, y: height / 2 }, "no evaluated round yet"));
    return;
  }
  const values = points.map((p) => p[1]);
  let low = fromZero ? 0 : Math.min(...values);
  let high = Math.max(...values);
  if (metric === "accuracy") { low = Math.min(low, 0); high = Math.max(high, 1); }
  if (high - low < 1e-9) { high = low + 1; }
  const firstRound = points[0][0], lastRound = points[points.length - 1][0];
  const span = Math.max(lastRound - firstRound, 1);
  const x = (round) => left + (points.length === 1 ? 0.5 : (round - firstRound) / span)
    * (width - left - right);
  const y = (value) => top + (1 - (value - low) / (high - low)) * (height - top - bottom);
  svg.appendChild(svgNode("text", { x: 4, y: top + 8 }, high.toFixed(2)));
  svg.appendChild(svgNode("text", { x: 4, y: height - bottom }, low.toFixed(2)));
  svg.appendChild(svgNode("text", { x: left, y: height - 8 }, "round " + firstRound));
  svg.appendChild(svgNode("text", {
    x: width - right, y: height - 8, "text-anchor": "end" }, "round " + lastRound));
  svg.appendChild(svgNode("polyline", {
    class: "series", points: points.map((p) => x(p[0]) + "," + y(p[1])).join(" ") }));
  for (const [round, value] of points) {
    const dot = svgNode("circle", { class: "dot", cx: x(round), cy: y(value), r: 3 });
    const label = "round " + round + ": " + metric + " " + value.toFixed(4);
    dot.appendChild(svgNode("title", {}, label));
    svg.appendChild(dot);
  }
}

function render(status) {
  const state = byId("state");
  state.textContent = STATE_LABELS[status.state] || String(status.state);
  state.className = "badge " + (status.state in STATE_LABELS ? status.state : "");
  setText("mode", status.encrypted ? "encrypted (Paillier)" : "PLAINTEXT");
  const live = status.round;
  setText("round-id", String(live ? live.id : status.last_round));
  setText("round-phase", live ? String(live.phase) : "between rounds");
  setText("rounds-completed", String(status.rounds_completed));
  setText("rounds-planned", "of " + status.rounds_planned + " planned");
  setText("connected-clients", String(status.connected_clients));
  setText("min-clients", "quorum " + status.min_clients);
  setText("uploads-in-flight", String(status.uploads_in_flight));
  setText("updates-accepted", String(status.updates_accepted));
  setText("bytes", bytes(status.bytes_received) + " in, " + bytes(status.bytes_sent) + " out");
  const model = status.global_model;
  const accuracy = byId("global-accuracy");
  accuracy.textContent = fixed(model ? model.accuracy : null, 4);
  accuracy.dataset.value = model && isNumber(model.accuracy) ? String(model.accuracy) : "";
  setText("global-loss", fixed(model ? model.loss : null, 4));
  setText("global-round", model ? "round " + model.round_id : "no evaluation yet");
  renderReasons("rejected-body", status.updates_rejected);
  renderReasons("refused-body", status.connections_refused);
  renderReasons("failed-body", status.rounds_failed);
  const rounds = Array.isArray(status.rounds) ? status.rounds : [];
  renderRounds(rounds);
  drawChart("accuracy-chart", rounds, "accuracy", true);
  drawChart("loss-chart", rounds, "loss", false);
  setText("updated", "updated " + new Date(status.generated_at * 1000).toLocaleTimeString());
}

async function poll() {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 5000);
  try {
    const response = await fetch("status.json", { cache: "no-store", signal: controller.signal });
    const body = await response.json();
    if (!response.ok) { throw new Error(body.error || "HTTP " + response.status); }
    render(body);
    lastSuccess = Date.now();
    setText("error", "");
  } catch (error) {
    const since = lastSuccess
      ? " (last update " + new Date(lastSuccess).toLocaleTimeString() + ")" : "";
    setText("error", "no status from the aggregator: " + error.message + since);
    const state = byId("state");
    state.textContent = "unreachable";
    state.className = "badge offline";
  } finally {
    clearTimeout(timer);
    setTimeout(poll, POLL_MS);
  }
}

poll();
""".replace("__POLL_MS__", str(round(POLL_SECONDS * 1000)))

_BODY = """
<header>
  <h1>fedcore federation</h1>
  <span id="state" class="badge">loading</span>
  <span id="mode" class="muted"></span>
  <span id="updated" class="muted"></span>
  <span id="error" class="error" role="status"></span>
</header>
<main>
  <div class="cards">
    <div class="card"><div class="label">Round</div><div class="value" id="round-id">–</div>
      <div class="sub" id="round-phase"></div></div>
    <div class="card"><div class="label">Rounds completed</div>
      <div class="value" id="rounds-completed">–</div>
      <div class="sub" id="rounds-planned"></div></div>
    <div class="card"><div class="label">Connected clients</div>
      <div class="value" id="connected-clients">–</div>
      <div class="sub" id="min-clients"></div></div>
    <div class="card"><div class="label">Uploads in flight</div>
      <div class="value" id="uploads-in-flight">–</div></div>
    <div class="card"><div class="label">Updates accepted</div>
      <div class="value" id="updates-accepted">–</div><div class="sub" id="bytes"></div></div>
    <div class="card"><div class="label">Global model accuracy</div>
      <div class="value" id="global-accuracy">–</div><div class="sub" id="global-round"></div></div>
    <div class="card"><div class="label">Global model loss</div>
      <div class="value" id="global-loss">–</div></div>
  </div>
  <div class="charts">
    <section><h2>Global model accuracy per round</h2><svg id="accuracy-chart"
      role="img" aria-label="accuracy per round"></svg></section>
    <section><h2>Global model loss per round</h2><svg id="loss-chart"
      role="img" aria-label="loss per round"></svg></section>
  </div>
  <p class="muted">Accuracy and loss are the weighted mean of the contributors' evaluations
    of the model each round started from, decrypted with the round's sum: no client's own
    figure is ever seen.</p>
  <section><h2>Recent rounds (newest first; phase wall times in seconds)</h2>
    <div class="scroll"><table id="rounds"><thead id="rounds-head"></thead>
      <tbody id="rounds-body"></tbody></table></div></section>
  <div class="reasons">
    <section><h2>Updates rejected, by reason</h2><table><tbody id="rejected-body"></tbody>
      </table></section>
    <section><h2>Connections refused, by reason</h2><table><tbody id="refused-body"></tbody>
      </table></section>
    <section><h2>Rounds failed, by reason</h2><table><tbody id="failed-body"></tbody>
      </table></section>
  </div>
</main>
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


DASHBOARD_PAGE: bytes = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>fedcore dashboard</title>\n"
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n"
    "</body>\n</html>\n"
).encode()
"""The dashboard page: static, self-contained (inline style and script, no external URL)."""

DASHBOARD_CSP = (
    f"default-src 'none'; script-src {_csp_hash(_SCRIPT)}; style-src {_csp_hash(_STYLE)}; "
    "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
"""Content-Security-Policy for the page: only its own script and style run, it may fetch
only from its own origin, and it may not be framed."""
