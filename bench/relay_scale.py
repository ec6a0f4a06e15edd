"""Scale benchmark with relays: one root daemon, R `fedcore relay` daemons, N clients, one round.

``python -m bench scale --clients N --relays R`` runs the root (`fedcore aggregator
--config`) and R relays (`fedcore relay --config`, each with its own relay-<i>
certificate, metrics port and fold workers) as sampled subprocesses, then the load
generator of `bench.scale_bench`: the key holders (committee members) connect to the
root, every other client round-robin to the relays. The root asks each relay (and its
direct clients, here the key holders, who upload too); each relay asks all its
clients, folds their uploads and forwards one encrypted sum with their signed tokens.
One round is measured as the flat run measures it (the root's checkpoint
phase_seconds), plus per relay: peak RSS and CPU (rusage), fold seconds and updates
folded (its /metrics), its own collect seconds and the time from the root's round
start to its forwarding and to the root's Ack (its log and the root's). The root's
round record gives the leaf contributors and the clients each relay brought.

Then, unless ``--no-flat``, the flat run of `bench.scale_bench` at ``--flat-clients``
(default 1,000) in the same invocation, with the same key and packing, and finally an
estimate of what ``--estimate-relays`` relay nodes would do per round, computed from
the measured per-relay and root figures: an extrapolation, labelled as one, never a
measurement. Everything runs on this one machine (root, relays and load generator
share its cores and its kernel's TCP memory), so the per-relay figures are contended
ones. Without ``--json`` the result goes to bench/results/scale-relays.json, where
`bench.report` renders it as "Scale with relays".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.aggregator_daemon import (
    AggregatorDaemon,
    RelayDaemon,
    log_stamp,
    tcp_counters,
    write_config,
)
from bench.load_processes import LoadProcesses, merge_stats
from bench.scale_bench import (
    committee_size,
    git_state,
    kernel_tcp,
    root_daemon,
    round_result,
    run_round,
    start_clients,
    timeline,
    workload_of,
)
from bench.scale_setup import MAX_WEIGHT, ScaleSetup, make_setup
from protocol.framing import DEFAULT_MAX_FRAME_SIZE

__all__ = ["RELAYS_RESULT", "add_relay_arguments", "run_relays"]

RELAYS_RESULT = Path("bench/results/scale-relays.json")
_SAMPLE_INTERVAL_S = 0.25
_SCRAPE_INTERVAL_S = 1.0
_RELAY_EXIT_S = 30.0  # relays leave by themselves once the root says the federation is complete
# What a relay's UpdateDone may carry in tokens: the upstream's frame less the relay's
# allowance for the rest of the message (fedcore.aggregator.relay keeps 64 KiB).
_TOKEN_FRAME_BYTES = DEFAULT_MAX_FRAME_SIZE - 64 * 1024
_FORWARD_RE = re.compile(r"round \d+: folded (\d+) clients in ([\d.]+) s; forwarding the sum")
# Root phases after collect (the committee's unmasking grows with the contributors).
_AFTER_COLLECT = ("decrypt", "update")
_HEAVY = ("rss_timeline", "loadgen", "profile")


def add_relay_arguments(parser: argparse.ArgumentParser) -> None:
    """The relay-mode flags of `python -m bench scale`."""
    parser.add_argument(
        "--relays",
        type=int,
        default=0,
        help="relay processes between the root and the clients (default 0: flat runs only)",
    )
    parser.add_argument(
        "--flat-clients",
        type=int,
        default=1000,
        help="with --relays: clients of the flat comparison run (default 1000)",
    )
    parser.add_argument(
        "--no-flat", action="store_true", help="with --relays: skip the flat comparison run"
    )
    parser.add_argument(
        "--relay-fold-workers",
        type=int,
        help="each relay's fold_workers (default: this machine's cores / relays, at least 1)",
    )
    parser.add_argument(
        "--relay-max-inflight",
        type=int,
        default=8,
        help="each relay's max_inflight_uploads (default 8, the relay's own default)",
    )
    parser.add_argument(
        "--estimate-relays",
        type=int,
        default=10,
        help="relay nodes of the extrapolated deployment (default 10)",
    )
    parser.add_argument(
        "--estimate-clients-per-relay",
        type=int,
        help="clients per relay node of the extrapolation (default: as measured)",
    )


def _progress(message: str) -> None:
    print(f"[scale relays] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the daemons
def _relay_fold_workers(args: argparse.Namespace) -> int:
    if args.relay_fold_workers is not None:
        return int(args.relay_fold_workers)
    return max(1, (os.cpu_count() or 1) // max(1, args.relays))


def _start_relay(
    setup: ScaleSetup, index: int, root_port: int, leaves: int, args: argparse.Namespace, run: str
) -> RelayDaemon:
    """Relay ``index`` as a `fedcore relay --config` process joined to the root."""
    values: dict[str, Any] = {
        "upstream": f"127.0.0.1:{root_port}",
        "cert": setup.pki / f"relay-{index}.pem",
        "key": setup.pki / f"relay-{index}.key",
        "ca": setup.pki / "ca.pem",
        "name": f"edge-{index}",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "max_inflight_uploads": args.relay_max_inflight,
        "fold_workers": _relay_fold_workers(args),
        "max_connections": max(2048, -(-leaves // args.relays) + 64),
        "handshake_timeout": 120.0,
        "reconnect_attempts": 3,  # a relay whose root is gone gives up instead of waiting
        "seed": 0,
    }
    config = write_config(values, setup.workdir / f"relay-{index}-{run}.toml", table="relay")
    return RelayDaemon(config, setup.workdir / f"relay-{index}-{run}.log")


def _watch(
    root: AggregatorDaemon, relays: list[RelayDaemon], args: argparse.Namespace
) -> tuple[float, list[float], list[str]]:
    """Sample every daemon until the root exits (then the relays); peaks and notes.

    Returns the root's tree peak RSS (MB), each relay's most connected clients (from
    its /metrics) and what was killed and why.
    """
    notes: list[str] = []
    connected = [0.0] * len(relays)
    root_peak = 0.0
    deadline = time.monotonic() + args.timeout
    next_scrape = 0.0
    limit_mb = args.max_aggregator_gb * 1024
    root_gone_at: float | None = None
    while True:
        root_done = root.poll_exit()
        if root_done and root_gone_at is None:
            root_gone_at = time.monotonic()
        running = [r for r in relays if not r.poll_exit()]
        if root_done and not running:
            break
        if root_gone_at is not None and time.monotonic() - root_gone_at > _RELAY_EXIT_S:
            notes.append(f"{len(running)} relays still ran {_RELAY_EXIT_S:.0f} s after the root")
            break
        scrape = time.monotonic() >= next_scrape
        if not root_done:
            rss, _ = root.sample()
            root_peak = max(root_peak, rss)
            if scrape:
                root.scrape_metrics()
            if rss > limit_mb:
                notes.append(f"killed: root RSS {rss:.0f} MB > --max-aggregator-gb")
                root.stop(5)
        for i, relay in enumerate(relays):
            if relay in running:
                rss, _ = relay.sample()
                if scrape:
                    relay.scrape_metrics()
                    connected[i] = max(
                        connected[i], relay.metrics.get("fedcore_connected_clients", 0.0)
                    )
                if rss > limit_mb:
                    notes.append(f"killed: relay {i} RSS {rss:.0f} MB > --max-aggregator-gb")
                    relay.stop(5)
        if scrape:
            next_scrape = time.monotonic() + _SCRAPE_INTERVAL_S
        if time.monotonic() > deadline:
            notes.append(f"killed: run exceeded --timeout {args.timeout} s")
            break
        time.sleep(_SAMPLE_INTERVAL_S)
    return root_peak, connected, notes


def _run_relay_round(setup: ScaleSetup, args: argparse.Namespace) -> dict[str, Any]:
    """One root, ``args.relays`` relays, ``args.clients`` clients, one round; its figures."""
    clients, relay_count = args.clients, args.relays
    committee = committee_size(args, clients)
    plan = root_daemon(
        setup,
        args,
        clients,
        f"relays{relay_count}-{clients}-{time.monotonic_ns()}",
        direct=committee + relay_count,
    )
    federation, upload, state, name = plan.federation, plan.upload, plan.state, plan.name
    load_average = list(os.getloadavg())
    tcp_before = tcp_counters()
    root = AggregatorDaemon(plan.config, setup.workdir / f"aggregator-{name}.log")
    relays: list[RelayDaemon] = []
    load: LoadProcesses | None = None
    root_peak, connected = 0.0, [0.0] * relay_count
    notes: list[str] = []
    try:
        root.wait_listening()
        leaves = clients - committee
        for index in range(relay_count):
            relays.append(_start_relay(setup, index, root.port, leaves, args, name))
        for relay in relays:
            relay.wait_listening()
        _progress(f"root on port {root.port}, relays on {[r.port for r in relays]}")
        load = start_clients(
            setup,
            root,
            clients,
            args,
            upload_file=str(upload),
            federation=federation.to_bytes(),
            connect_concurrency=0,
            relay_ports=tuple(r.port for r in relays),
        )
        load.barrier.wait(timeout=600)
        _progress(f"{clients} clients: connecting ({committee} to the root)")
        root_peak, connected, notes = _watch(root, relays, args)
    finally:
        root.stop()
        for relay in relays:
            relay.stop(10)
        loadgen = load.finish(120) if load is not None else merge_stats([])
    point = round_result(setup, clients, federation, root, state, loadgen, root_peak, notes, None)
    point["kernel_tcp"] = kernel_tcp(root, tcp_before)
    point["load_average_before"] = [round(x, 2) for x in load_average]
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((state / "checkpoint.json").read_text())
    point.update(_relay_figures(point, record, root, relays, connected, committee))
    return point


# ---------------------------------------------------------------------------- figures
def _relay_figures(
    point: dict[str, Any],
    record: dict[str, Any],
    root: AggregatorDaemon,
    relays: list[RelayDaemon],
    connected: list[float],
    committee: int,
) -> dict[str, Any]:
    """The relay run's own keys: what the root and each relay folded, and when."""
    completed = [h for h in record.get("history", []) if h.get("phase") == "completed"]
    last = completed[-1] if completed else {}
    in_record: dict[str, int] = last.get("relays", {})
    leaves = len(last.get("contributors", []))
    direct = leaves - sum(in_record.values())
    root_metrics = record.get("metrics", {})
    root_folded = root_metrics.get("fedcore_updates_accepted_total")
    if root_folded is None:
        root_folded = root.metrics.get("fedcore_updates_accepted_total")
    round_start = log_stamp(root.log, "round 1: selected")
    per_relay = []
    for index, relay in enumerate(relays):
        relay_id = next((r for r in in_record if r.startswith(f"relay-{index}/")), None)
        per_relay.append(_one_relay(index, relay, relay_id, in_record, connected, round_start))
    rss = [r["peak_rss_mb"] for r in per_relay if r["peak_rss_mb"] is not None]
    folds = root.metrics.get("fedcore_fold_seconds_count", 0.0)
    return {
        # the root folds uploads (relay sums and direct clients), not leaves
        "fold_seconds_complete": bool(root_folded) and folds >= (root_folded or 0),
        "relays": len(relays),
        "root_updates_folded": int(root_folded) if root_folded is not None else None,
        "root_updates_folded_from_record": len(in_record) + direct if completed else None,
        "leaf_updates_folded": leaves,
        "direct_contributors": direct if completed else None,
        "committee_members_direct": committee,
        "root_peak_rss_mb": point.get("aggregator_peak_rss_mb"),
        "root_cpu_s": point.get("aggregator_cpu_s"),
        "root_fold_seconds": point.get("fold_seconds"),
        "relay_peak_rss_mb": max(rss) if rss else None,
        "relay_cpu_s_max": _max(r["cpu_s"] for r in per_relay),
        "relay_collect_seconds_max": _max(r["collect_seconds"] for r in per_relay),
        "per_relay": per_relay,
    }


def _one_relay(
    index: int,
    relay: RelayDaemon,
    relay_id: str | None,
    in_record: dict[str, int],
    connected: list[float],
    round_start: float | None,
) -> dict[str, Any]:
    log_text = relay.log.read_text(errors="replace") if relay.log.exists() else ""
    forward = _FORWARD_RE.search(log_text)
    forwarded_at = log_stamp(relay.log, "forwarding the sum")
    asked_at = log_stamp(relay.log, ": asking ")
    accepted_at = log_stamp(relay.log, "the upstream accepted our sum")
    metrics, usage = relay.metrics, relay.rusage
    out: dict[str, Any] = {
        "index": index,
        "relay_id": relay_id,
        "clients_connected_peak": int(connected[index]),
        "clients_joined_log": relay.joins_logged(),
        "clients_in_root_record": in_record.get(relay_id) if relay_id else None,
        "updates_folded": int(forward[1]) if forward else None,
        "updates_accepted_metric": metrics.get("fedcore_updates_accepted_total"),
        "collect_seconds": float(forward[2]) if forward else None,
        "fold_seconds": metrics.get("fedcore_fold_seconds_sum"),
        "fold_count": metrics.get("fedcore_fold_seconds_count"),
        "bytes_received": metrics.get("fedcore_bytes_received_total"),
        "round_start_to_forward_s": _between(round_start, forwarded_at),
        "forward_to_accepted_s": _between(forwarded_at, accepted_at),
        "peak_rss_mb": relay.peak_rss_mb,
        "tree_peak_rss_mb": max((s[1] for s in relay.samples), default=None),
        "cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
        "round_cpu_s": _cpu_between(relay.samples, asked_at, forwarded_at),
        "round_started_at_s": _between(relay.samples[0][0] if relay.samples else None, asked_at),
        "rss_timeline": timeline(relay.samples, points=60),
        "exit_code": relay.popen.returncode,
        "rejected": {
            k.split('"')[1]: v
            for k, v in metrics.items()
            if k.startswith("fedcore_updates_rejected_total{") and v
        },
    }
    if forward is None or relay.popen.returncode != 0:
        out["log_tail"] = relay.tail(2000)
    return out


def _between(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None else None


def _cpu_between(
    samples: list[tuple[float, float, float]], start: float | None, end: float | None
) -> float | None:
    """CPU seconds a sampled daemon spent from ``start`` to ``end`` (sampling's resolution)."""
    if start is None or end is None:
        return None
    before = [cpu for t, _, cpu in samples if t <= start]
    after = [cpu for t, _, cpu in samples if t >= end]
    if not before or not after:
        return None
    return round(after[0] - before[-1], 3)


def _max(values: Any) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _extrapolate(point: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """A deployment of relay nodes per round, FROM the measured figures: not a measurement."""
    relays = [
        r
        for r in point.get("per_relay", [])
        if r.get("updates_folded") and r.get("collect_seconds") is not None
    ]
    phases = point.get("phase_seconds") or {}
    root_folded = point.get("root_updates_folded")
    leaves = point.get("leaf_updates_folded") or 0
    if not relays or not phases or not root_folded or not leaves:
        return {"is": "extrapolation", "error": "the relay run measured too little to extrapolate"}
    measured = sum(r["updates_folded"] for r in relays) / len(relays)
    nodes = args.estimate_relays
    per_node = args.estimate_clients_per_relay or round(measured)
    total = nodes * per_node
    cores = os.cpu_count() or 1
    # relays: the slowest one's seconds per client, contended (high) and its CPU (low)
    wall_per_client = max(r["collect_seconds"] / r["updates_folded"] for r in relays)
    cpu_per_client = _max(
        (r.get("round_cpu_s") or r.get("cpu_s") or 0.0) / r["updates_folded"] for r in relays
    )
    relay_high = per_node * wall_per_client
    relay_low = min(relay_high, per_node * (cpu_per_client or 0.0) / cores)
    # root, per relay sum: one fold plus a token check per client in it
    absorb = _max(r.get("forward_to_accepted_s") for r in relays) or 0.0
    root_fold_per_upload = (point.get("root_fold_seconds") or 0.0) / root_folded
    per_token = max(0.0, absorb - root_fold_per_upload) / measured
    absorb_node = root_fold_per_upload + per_token * per_node
    # decrypt + update: the committee derives and removes one mask stream per contributor
    after_collect = sum(phases.get(k, 0.0) for k in _AFTER_COLLECT)
    committee = point.get("committee") or {}
    unmask_per_token = (committee.get("unmask_s") or 0.0) / leaves
    extra = max(0, total - leaves) * unmask_per_token
    shards = max(1, committee.get("shards_unmasked") or 1)
    after_low, after_high = after_collect + extra / shards, after_collect + extra
    token_bytes = (point.get("loadgen") or {}).get("token_bytes_max") or 0
    return {
        "is": "extrapolation from this run's measured per-relay and root figures, NOT a "
        "measurement",
        "deployment": f"{nodes} relay nodes of {per_node} clients each, one root: "
        f"{total} clients a round",
        "assumptions": [
            "each relay node is a machine like this one, serving only its own clients",
            "relay phase, high: the slowest relay's measured seconds per client (here "
            f"{len(relays)} relays, the root and the load generator shared {cores} cores)",
            "relay phase, low: its CPU seconds per client during its round (sampled), "
            "spread over this machine's cores",
            "root, per relay sum: its measured fold seconds per upload plus, per token, "
            "what the slowest forward-to-Ack took beyond that; high: the sums arrive "
            "together and are absorbed one after another; low: they arrive spread out",
            "decrypt + update: as measured, plus the committee's measured unmask seconds "
            "per contributor for each contributor more (low: spread over its shards)",
            f"this run's packing: {total} clients of max_weight {MAX_WEIGHT} need "
            f"headroom_bits >= {(total * MAX_WEIGHT - 1).bit_length()} (a few % more "
            "ciphertexts per update when that is more than this run's)",
        ],
        "inputs": {
            "clients_per_relay_measured": measured,
            "relay_seconds_per_client_contended": wall_per_client,
            "relay_cpu_seconds_per_client": cpu_per_client,
            "root_forward_to_ack_seconds_max": absorb,
            "root_fold_seconds_per_upload": root_fold_per_upload,
            "root_seconds_per_token": per_token,
            "root_decrypt_update_seconds": after_collect,
            "committee_unmask_seconds_per_contributor": unmask_per_token,
            "cores": cores,
        },
        "relays": nodes,
        "clients_per_relay": per_node,
        "clients": total,
        "relay_phase_seconds": [relay_low, relay_high],
        "root_absorb_seconds": [absorb_node, nodes * absorb_node],
        "root_decrypt_update_seconds": [after_low, after_high],
        "round_seconds": [
            relay_low + absorb_node + after_low,
            relay_high + nodes * absorb_node + after_high,
        ],
        "relay_node_peak_rss_mb": point.get("relay_peak_rss_mb"),
        "relay_node_peak_rss_is": f"as measured at {measured:g} clients per relay (not scaled)",
        "root_peak_rss_mb": point.get("root_peak_rss_mb"),
        "root_bytes_received": nodes * (point.get("bytes_per_update") or 0),
        "max_clients_per_relay_sum": _TOKEN_FRAME_BYTES // token_bytes if token_bytes else None,
    }


# ---------------------------------------------------------------------------- entry point
def _failed(clients: int, exc: Exception) -> dict[str, Any]:
    return {"clients": clients, "updates_folded": 0, "error": repr(exc), "round_seconds": None}


def _summary(point: dict[str, Any] | None) -> dict[str, Any] | None:
    if point is None:
        return None
    return {k: v for k, v in point.items() if k not in _HEAVY}


def run_relays(args: argparse.Namespace) -> dict[str, Any]:
    """The relay run (headline), then the flat comparison run, then the extrapolation."""
    clients, relay_count = args.clients, args.relays
    committee = max(1, min(args.committee_size, args.loadgen_procs, clients))
    if clients - committee < relay_count:
        raise SystemExit(
            f"--relays {relay_count} needs at least {relay_count} clients besides the "
            f"{committee} key holders (--clients {clients})"
        )
    if args.profile is not None or args.idle_clients:
        _progress("--profile and --idle-clients are ignored with --relays")
    if args.json is None:
        args.json = RELAYS_RESULT  # the runner writes it, where the report looks for it
    flat = 0 if args.no_flat else args.flat_clients
    # one packing for both runs (one encryption serves both): the larger one's clients
    headroom = max(1, (max(clients, flat) * MAX_WEIGHT - 1).bit_length())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcore-scale-relays-"))
    workdir.mkdir(parents=True, exist_ok=True)
    flat_point: dict[str, Any] | None = None
    try:
        certs = max(clients, flat)
        _progress(f"set-up: {args.key_bits}-bit key, {certs} client + {relay_count} relay certs")
        setup = make_setup(
            workdir,
            key_bits=args.key_bits,
            model_kwargs=json.loads(args.model_kwargs),
            certs=certs,
            headroom=headroom,
            relays=relay_count,
        )
        _progress(f"run: {clients} clients through {relay_count} relays")
        try:
            point = _run_relay_round(setup, args)
        except Exception as exc:  # the flat run is still worth having
            _progress(f"relay run failed: {exc!r}")
            point = _failed(clients, exc)
        _report_relays(point)
        if flat:
            _progress(f"flat comparison run: {flat} clients")
            load_average = [round(x, 2) for x in os.getloadavg()]
            try:
                flat_point = run_round(setup, flat, args, None)
            except Exception as exc:
                _progress(f"flat run failed: {exc!r}")
                flat_point = _failed(flat, exc)
            flat_point["load_average_before"] = load_average
            _progress(
                f"flat: folded {flat_point['updates_folded']}, round "
                f"{flat_point['round_seconds']} s, peak RSS "
                f"{flat_point.get('aggregator_peak_rss_mb')} MB"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)  # keys and certificates never stay
    extrapolation = _extrapolate(point, args) if "error" not in point else None
    workload = workload_of(args, setup, headroom)
    workload.update(
        relays=relay_count,
        relay_fold_workers=_relay_fold_workers(args),
        relay_max_inflight_uploads=args.relay_max_inflight,
        clients_route="key holders to the root, the other clients round-robin to the relays",
        packing_note="the relay and flat runs share one packing, with headroom for "
        f"{max(clients, flat)} clients",
    )
    return {
        **(_summary(point) or {}),
        "flat_clients": flat or None,
        "flat_round_seconds": flat_point.get("round_seconds") if flat_point else None,
        "flat_peak_rss_mb": flat_point.get("aggregator_peak_rss_mb") if flat_point else None,
        "flat_updates_folded": flat_point.get("updates_folded") if flat_point else None,
        "extrapolated_clients": extrapolation.get("clients") if extrapolation else None,
        "extrapolated_round_seconds_low": _bound(extrapolation, 0),
        "extrapolated_round_seconds_high": _bound(extrapolation, 1),
        "flat": _summary(flat_point),
        "extrapolation": extrapolation,
        "workload": workload,
        "setup_seconds": setup.timings,
        "runs": [p for p in (point, flat_point) if p is not None],
        "git": git_state(),
    }


def _bound(extrapolation: dict[str, Any] | None, which: int) -> float | None:
    rounds = (extrapolation or {}).get("round_seconds")
    return rounds[which] if isinstance(rounds, list) else None


def _report_relays(point: dict[str, Any]) -> None:
    """What the relay run measured, on stderr."""
    if "error" in point:
        return
    _progress(
        f"leaf updates folded {point.get('leaf_updates_folded')}, root folded "
        f"{point.get('root_updates_folded')} uploads, round {_num(point.get('round_seconds'))} "
        f"s, root peak RSS {_num(point.get('root_peak_rss_mb'))} MB, relay peak RSS "
        f"{_num(point.get('relay_peak_rss_mb'))} MB (load average before "
        f"{point.get('load_average_before')})"
    )
    for r in point.get("per_relay", []):
        _progress(
            f"  {r['relay_id']}: {r['clients_joined_log']} clients joined, folded "
            f"{r['updates_folded']} in {_num(r['collect_seconds'])} s (fold waits "
            f"{_num(r['fold_seconds'])} s), round start -> forward "
            f"{_num(r['round_start_to_forward_s'])} s, -> root Ack "
            f"{_num(r['forward_to_accepted_s'])} s, CPU {_num(r['cpu_s'])} s "
            f"({_num(r['round_cpu_s'])} s in the round), peak RSS {_num(r['peak_rss_mb'])} MB, "
            f"exit {r['exit_code']}"
        )


def _num(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)
