"""The parent's side of the scale benchmark's load generator: spawn, join, merge.

Splits the client indices over spawned `bench.loadgen` processes (the first
connection of the first few holds the key), tells each client where to connect (in
relay runs: key holders to the root, the others round-robin to the relays), shares a
start barrier, an idle-release event and a connected counter with them, joins them
(terminating stragglers), and sums the stats they write. This module knows nothing
of the protocol the processes speak.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import REFUSALS_KEPT, LoadSpec, load_process

__all__ = ["LoadProcesses", "client_ports", "merge_stats", "start_load"]


@dataclass(slots=True)
class LoadProcesses:
    """Spawned load-generator processes and what the parent shares with them."""

    processes: list[Any]
    results: list[Path]
    barrier: Any  # the processes and the parent meet here once TLS contexts are built
    release: Any  # multiprocessing Event: idle clients close when it is set
    connected: Any  # multiprocessing Value: connections that got their Welcome

    def finish(self, timeout: float) -> dict[str, Any]:
        """Join the processes (terminated after ``timeout``) and merge their stats."""
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.join(max(0.1, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(10)
        stats = []
        for path in self.results:
            with contextlib.suppress(OSError, ValueError):
                stats.append(json.loads(path.read_text()))
        return merge_stats(stats)


def start_load(
    template: LoadSpec,
    *,
    clients: int,
    processes: int,
    key_processes: int,
    workdir: Path,
    relay_ports: tuple[int, ...] = (),
) -> LoadProcesses:
    """Spawn the load processes; they build their TLS contexts, then wait at the barrier.

    Clients 0..``clients``-1 are split evenly over ``processes`` (at most one per
    client); the first connection of each of the first ``key_processes`` holds the
    key when there is an upload. Each process runs ``template`` with its own indices,
    key holders and result file. With ``relay_ports``, key holders still connect to
    ``template.port`` (the root) and the other clients round-robin to the relays.
    """
    ctx = multiprocessing.get_context("spawn")
    procs = max(1, min(processes, clients))
    barrier, release, connected = ctx.Barrier(procs + 1), ctx.Event(), ctx.Value("i", 0)
    bounds = np.linspace(0, clients, procs + 1).astype(int)
    groups = [tuple(range(bounds[j], bounds[j + 1])) for j in range(procs)]
    holders = [
        g[:1] if j < key_processes and template.upload_file is not None else ()
        for j, g in enumerate(groups)
    ]
    ports = client_ports(groups, holders, template.port, relay_ports)
    spawned, results = [], []
    for j, indices in enumerate(groups):
        result = workdir / f"loadgen-{j}-{time.monotonic_ns()}.json"
        load = replace(
            template,
            indices=indices,
            key_holders=holders[j],
            result_file=str(result),
            ports=tuple(ports[i] for i in indices) if relay_ports else (),
        )
        process = ctx.Process(
            target=load_process, args=(load, barrier, release, connected), daemon=False
        )
        process.start()
        spawned.append(process)
        results.append(result)
    return LoadProcesses(spawned, results, barrier, release, connected)


def client_ports(
    groups: list[tuple[int, ...]],
    holders: list[tuple[int, ...]],
    root_port: int,
    relay_ports: tuple[int, ...],
) -> dict[int, int]:
    """Each client's port: key holders the root's, the others the relays' in turn."""
    key_holders = {i for h in holders for i in h}
    leaves = sorted(i for g in groups for i in g if i not in key_holders)
    ports = dict.fromkeys(key_holders, root_port)
    for rank, index in enumerate(leaves):
        ports[index] = relay_ports[rank % len(relay_ports)] if relay_ports else root_port
    return ports


def merge_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters over the load processes; connect time from the first start to last Welcome."""
    merged: dict[str, Any] = {"processes": len(stats)}
    for key in (
        "clients",
        "connected",
        "handshake_failures",
        "connect_failures",
        "federation_mismatches",
        "credential_failures",
        "uploads_sent",
        "acked",
        "masked_uploads",
        "mask_s",
        "tokens_signed",
        "sign_s",
        "shards_decrypted",
        "decrypt_s",
        "shards_unmasked",
        "unmask_s",
        "requests_refused",
        "bytes_sent",
        "bytes_received",
        "cpu_s",
    ):
        merged[key] = sum(s.get(key, 0) for s in stats)
    for key in ("failure_kinds", "errors", "byes"):
        total: Counter[str] = Counter()
        for s in stats:
            total.update(s.get(key, {}))
        merged[key] = dict(total)
    merged["refusals"] = [r for s in stats for r in s.get("refusals", [])][:REFUSALS_KEPT]
    merged["token_bytes_max"] = max((s.get("token_bytes", 0) for s in stats), default=0)
    merged["peak_rss_mb_max"] = max((s.get("peak_rss_mb", 0.0) for s in stats), default=0.0)
    merged["context_s_max"] = max((s.get("context_s", 0.0) for s in stats), default=0.0)
    merged["timed_out"] = any(s.get("timed_out") for s in stats)
    starts = [s["connect_started"] for s in stats if s.get("connect_started")]
    welcomes = [s["last_welcome"] for s in stats if s.get("last_welcome")]
    merged["connect_seconds"] = max(welcomes) - min(starts) if starts and welcomes else None
    firsts = [s["first_round_start"] for s in stats if s.get("first_round_start")]
    lasts = [s["last_round_start"] for s in stats if s.get("last_round_start")]
    merged["round_start_spread_s"] = max(lasts) - min(firsts) if firsts else None
    acks = [s["last_ack"] for s in stats if s.get("last_ack")]
    merged["first_round_start_to_last_ack_s"] = max(acks) - min(firsts) if acks and firsts else None
    return merged
