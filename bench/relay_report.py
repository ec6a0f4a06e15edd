"""REPORT.md's "Scale with relays" section, rendered from ``scale-relays.json`` alone.

`bench.report` calls it for that file, or for its absence (the section then says it was
not measured). Every figure comes from the JSON `bench.relay_scale` wrote; the
extrapolation is shown as one, apart from the measurements.
"""

from __future__ import annotations

from typing import Any

from bench.report import _fmt


def _show(value: Any) -> str:
    """As the report formats figures, but whole numbers from 1,000 up (MB, clients)."""
    if isinstance(value, float) and abs(value) >= 1000:
        return f"{value:.0f}"
    return _fmt(value)


__all__ = ["RELAYS_COMMAND", "scale_relays_missing", "scale_relays_section"]

RELAYS_COMMAND = (
    "python -m bench scale --clients 4000 --relays 4 --json bench/results/scale-relays.json"
)


def scale_relays_missing() -> list[str]:
    """The relay section when no scale-relays.json was measured: says so, invents nothing."""
    return [
        "## Scale with relays (`scale-relays.json`)",
        "",
        f"Not measured: there is no scale-relays.json in this directory. `{RELAYS_COMMAND}` "
        "measures it.",
        "",
    ]


def scale_relays_section(data: dict[str, Any]) -> list[str]:
    """`bench scale --relays R`: the relay run, each relay, the flat run, the extrapolation."""
    lines = [
        "## Scale with relays (`scale-relays.json`)",
        "",
        f"Command: `{data.get('command', '')}`",
        "",
    ]
    if data.get("error"):
        lines += [f"The relay run failed: `{data['error']}`.", ""]
    workload = data.get("workload") or {}
    lines += [
        f"{_show(data.get('clients'))} clients: {_show(data.get('committee_members_direct'))} key "
        f"holders connected to the root, the others round-robin to {_show(data.get('relays'))} "
        f"`fedcore relay` processes (fold_workers {_show(workload.get('relay_fold_workers'))}, "
        f"max_inflight_uploads {_show(workload.get('relay_max_inflight_uploads'))}); root "
        f"fold_workers {_show(workload.get('fold_workers'))}, engine "
        f"{_show(workload.get('fold_engine'))}. Root, relays and load generator share this "
        f"machine's {_show((data.get('machine') or {}).get('cpu_count'))} cores. Load average "
        f"before the run: {_show(data.get('load_average_before'))}.",
        "",
        "| figure | value |",
        "|---|---:|",
    ]
    for key in (
        "leaf_updates_folded",
        "root_updates_folded",
        "direct_contributors",
        "round_seconds",
        "root_peak_rss_mb",
        "root_cpu_s",
        "relay_peak_rss_mb",
        "relay_cpu_s_max",
        "relay_collect_seconds_max",
        "connect_seconds",
        "handshake_failures",
        "model_update_ok",
    ):
        lines.append(f"| {key} | {_show(data.get(key))} |")
    phases = data.get("phase_seconds") or {}
    if phases:
        lines.append(
            "| root phases (s) | " + ", ".join(f"{k} {_show(v)}" for k, v in phases.items()) + " |"
        )
    relays = [r for r in data.get("per_relay") or [] if isinstance(r, dict)]
    if relays:
        lines += [
            "",
            "| relay | clients | folded | collect (s) | fold (s) | round start → forward (s) "
            "| forward → root Ack (s) | CPU (s) | CPU in round (s) | peak RSS (MB) | exit |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in relays:
            cells = [
                r.get("relay_id") or r.get("index"),
                r.get("clients_in_root_record"),
                r.get("updates_folded"),
                r.get("collect_seconds"),
                r.get("fold_seconds"),
                r.get("round_start_to_forward_s"),
                r.get("forward_to_accepted_s"),
                r.get("cpu_s"),
                r.get("round_cpu_s"),
                r.get("peak_rss_mb"),
                r.get("exit_code"),
            ]
            lines.append("| " + " | ".join(_show(c) for c in cells) + " |")
        lines += [
            "",
            "collect: the relay's own seconds from the root's RoundStart to its sum being "
            "ready; fold: its fedcore_fold_seconds_sum (overlapping waits with fold "
            "workers); peak RSS: the process's VmHWM.",
        ]
    tcp = data.get("kernel_tcp")
    if isinstance(tcp, dict):
        lines += [
            "",
            f"Kernel TCP memory during the relay run (this host carries every connection at "
            f"both ends): peak {_show(tcp.get('mem_peak_mb'))} MB, memory-pressure events "
            f"{_show(tcp.get('TCPMemoryPressures'))}, receive-queue drops "
            f"{_show(tcp.get('TCPRcvQDrop'))}, retransmission timeouts "
            f"{_show(tcp.get('TCPTimeouts'))}; under pressure the kernel drops and "
            "retransmits, which slows the collect phase beyond what the daemons cost.",
        ]
    lines += ["", *_relays_vs_flat(data)]
    lines += _relays_extrapolation(data.get("extrapolation"))
    return lines


def _relays_vs_flat(data: dict[str, Any]) -> list[str]:
    flat = data.get("flat")
    if not isinstance(flat, dict):
        return ["No flat comparison run in this invocation (`--no-flat`).", ""]
    rows = [("relays (root)", data), ("flat", flat)]
    lines = [
        "Flat comparison, same invocation, key and packing:",
        "",
        "| run | clients | folded | round (s) | collect (s) | decrypt (s) | root peak RSS (MB) "
        "| root CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows:
        phases = row.get("phase_seconds") or {}
        cells = [
            label,
            row.get("clients"),
            row.get("updates_folded"),
            row.get("round_seconds"),
            phases.get("collect"),
            phases.get("decrypt"),
            row.get("aggregator_peak_rss_mb"),
            row.get("aggregator_cpu_s"),
        ]
        lines.append("| " + " | ".join(_show(c) for c in cells) + " |")
    if flat.get("error"):
        lines += ["", f"The flat run failed: `{flat['error']}`."]
    lines += ["", f"Load average before the flat run: {_show(flat.get('load_average_before'))}."]
    lines.append("")
    return lines


def _relays_extrapolation(estimate: Any) -> list[str]:
    if not isinstance(estimate, dict):
        return []
    lines = ["**Extrapolation**: " + str(estimate.get("is", "")) + ".", ""]
    if estimate.get("error"):
        return [*lines, str(estimate["error"]) + ".", ""]
    low_high = (
        ("relay phase (s)", "relay_phase_seconds"),
        ("root absorbing the sums (s)", "root_absorb_seconds"),
        ("root decrypt + update (s)", "root_decrypt_update_seconds"),
        ("round (s)", "round_seconds"),
    )
    lines += [
        f"{estimate.get('deployment')}:",
        "",
        "| per round, estimated | low | high |",
        "|---|---:|---:|",
    ]
    for label, key in low_high:
        pair = estimate.get(key) or [None, None]
        lines.append(f"| {label} | {_show(pair[0])} | {_show(pair[1])} |")
    lines += [
        "",
        f"Relay node peak RSS {_show(estimate.get('relay_node_peak_rss_mb'))} MB "
        f"({estimate.get('relay_node_peak_rss_is')}); root peak RSS "
        f"{_show(estimate.get('root_peak_rss_mb'))} MB as measured; one relay sum holds the "
        f"tokens of at most {_show(estimate.get('max_clients_per_relay_sum'))} clients. "
        "Inputs: "
        + ", ".join(f"{k} {_show(v)}" for k, v in (estimate.get("inputs") or {}).items())
        + ". Assumptions: "
        + "; ".join(estimate.get("assumptions") or [])
        + ".",
        "",
    ]
    return lines
