"""Scale benchmark: one aggregator daemon, N simultaneous mutual-TLS clients, one round.

Workload (default): ``fedcore aggregator --config <toml>`` runs as a subprocess (uvloop
when installed; `bench.aggregator_daemon`); a load generator of 2 spawned processes
(`bench.loadgen`: asyncio + uvloop) opens N = 1,000 connections at once, each with its
own client certificate, each speaking protocol 3 as `fedcore.client` does. The update
is the seed MLP's (784-512-256-10, 535,818 values; 2048-bit key, 16-bit values, each
client's own weight ``min(max_weight, ceil(100 samples / 100))`` = 1, headroom for N
clients of the largest run at ``max_weight`` 64, 256 ciphertexts per chunk).

The load generator's shortcut, to fit a 2-core machine (`bench.masked_upload`): the
packed update q is encrypted once, up front, and masked per round from those
ciphertexts, ``Enc(q)·(1 + M·n) = Enc(q + M) mod n²``, reusing Enc(q)'s randomness,
which only a load generator may do. By default each load process draws one ephemeral
mask key per round and all of its connections send the same masked bytes under their
own signed tokens: the committee still derives one mask key and adds one mask stream
per token (its work does not depend on the keys being equal), the aggregator checks
every token and folds every upload, and the unmasked sum decodes because it removes
one M per token. ``--per-client-masks`` gives every connection its own ephemeral key
and masks instead (the honest client's shape; it costs the load generator about
``setup_seconds.per_client_mask_s`` of CPU per connection, measured at set-up, on the
cores the aggregator uses). One connection per load process holds the private key and
answers both DecryptRequest and UnmaskRequest through
`fedcore.client.committee.CommitteeMember`, with every check a real member makes; the
aggregator picks the round's unmasker among those connections. The aggregator does
all its real work: TLS, framing, validation, token checks, buffering, folding, quorum,
committee decryption and unmasking, model update, checkpoint.

Measured per run (and for a curve of client counts, default 10, 100 and N):
updates folded and round time (from the checkpoint's phase_seconds: collect + decrypt
+ update, i.e. first RoundStart sent to global model updated), the aggregator's peak
RSS and CPU (os.wait4 rusage of the daemon; psutil samples for the process tree), bytes
received, fold seconds (``fedcore_fold_seconds_sum`` scraped from /metrics), time to
connect all clients, handshake failures, the committee's unmask and decrypt seconds
(the members' own figures, as `CommitteeMember` reports them), the load generator's
masking and signing CPU, and whether the new global model equals the seed model plus
the uploaded update (to the quantization step). ``--profile PATH`` samples the daemon
with py-spy during the headline run and reports its top frames. ``--idle-clients M``
also holds M idle connections open (no round starts) and reports what that costs and
what stops it. ``--quick`` runs 10 and 100 clients only. ``--relays R`` puts R
`fedcore relay` processes between the root and the clients instead, and compares
with a flat run (`bench.relay_scale`). Measures; never asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.aggregator_daemon import (
    AggregatorDaemon,
    committee_log_seconds,
    federation_of,
    fold_engine,
    fold_workers_supported,
    log_times,
    start_profiler,
    tcp_counters,
    top_frames,
    write_config,
)
from bench.load_processes import LoadProcesses, merge_stats, start_load
from bench.loadgen import LoadSpec
from bench.scale_setup import (
    CHUNK_CIPHERTEXTS,
    MAX_WEIGHT,
    SAMPLES_PER_CLIENT,
    VALUE_BITS,
    ScaleSetup,
    daemon_settings,
    make_setup,
    prepare_upload,
    update_codec,
)
from fedcore.contracts import FederationParams

__all__ = [
    "add_arguments",
    "git_state",
    "kernel_tcp",
    "round_result",
    "run",
    "run_round",
    "start_clients",
    "timeline",
    "top_frames",
    "workload_of",
]

TARGET_ROUND_S = 60.0
TARGET_PEAK_RSS_MB = 1536.0
_SAMPLE_INTERVAL_S = 0.25
_SCRAPE_INTERVAL_S = 1.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument("--clients", type=int, default=1000, help="clients of the headline run")
    parser.add_argument(
        "--curve",
        default="10,100",
        help="more client counts to run, comma-separated ('' = headline only); quick: <= 100",
    )
    parser.add_argument("--loadgen-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--max-inflight", type=int, default=16, help="aggregator max_inflight_uploads (default 16)"
    )
    parser.add_argument(
        "--committee-size", type=int, default=2, help="key holders (one per load process)"
    )
    parser.add_argument(
        "--decrypt-workers", type=int, default=1, help="processes per key holder's decryption"
    )
    parser.add_argument(
        "--per-client-masks",
        action="store_true",
        help="every connection masks with its own ephemeral key (default: one per load "
        "process and round; see the module docstring)",
    )
    parser.add_argument(
        "--fold-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="aggregator fold_workers (default: this machine's cores; passed through when the "
        "aggregator has the setting)",
    )
    parser.add_argument(
        "--model-kwargs", default="{}", help='JSON keyword arguments of fedcore.model:mlp ("{}")'
    )
    parser.add_argument(
        "--timeout", type=float, default=1200.0, help="seconds one run may take before it is killed"
    )
    parser.add_argument(
        "--max-aggregator-gb", type=float, default=12.0, help="kill the daemon above this RSS"
    )
    parser.add_argument("--profile", type=Path, help="py-spy raw stacks of the headline run here")
    parser.add_argument("--idle-clients", type=int, default=0, help="also hold M idle clients")
    parser.add_argument("--idle-hold", type=float, default=30.0, help="seconds to hold them")
    parser.add_argument(
        "--idle-connect-concurrency", type=int, default=250, help="handshakes in flight per process"
    )
    parser.add_argument(
        "--client-sndbuf",
        type=int,
        default=0,
        help="SO_SNDBUF of each load-generator socket, bytes (default 0 = kernel autotuning)",
    )
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates and logs here")
    # Smoke tests only: a tiny key makes the benchmark run in seconds but measures nothing.
    parser.add_argument("--key-bits", type=int, default=2048, help=argparse.SUPPRESS)
    from bench.relay_scale import add_relay_arguments  # relay_scale imports this module

    add_relay_arguments(parser)


def _progress(message: str) -> None:
    print(f"[scale] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- one round
def _committee_figures(log: Path, loadgen: dict[str, Any]) -> dict[str, Any]:
    """What the committee did: the members' own seconds, and the aggregator's log line."""
    out: dict[str, Any] = {
        key: loadgen.get(key)
        for key in (
            "shards_unmasked",
            "unmask_s",
            "shards_decrypted",
            "decrypt_s",
            "requests_refused",
        )
    }
    seconds = committee_log_seconds(log)
    if seconds is not None:
        out["committee_phase_seconds_log"] = seconds
    return out


def _model_check(
    setup: ScaleSetup, state: Path, record: dict[str, Any], step: float
) -> dict[str, Any]:
    """Does the new global model equal seed + the uploaded update (within one step)?"""
    try:
        weights = np.load(state / record["model_file"], allow_pickle=False)
    except (OSError, KeyError, ValueError):
        return {"model_update_ok": False}
    error = float(np.max(np.abs((weights - setup.seed_weights) - setup.update)))
    return {"model_update_max_abs_error": error, "model_update_ok": error <= 1.001 * step}


def start_clients(
    setup: ScaleSetup,
    daemon: AggregatorDaemon,
    clients: int,
    args: argparse.Namespace,
    *,
    upload_file: str | None,
    federation: bytes,
    connect_concurrency: int,
    relay_ports: tuple[int, ...] = (),
) -> LoadProcesses:
    """Spawn the load processes for ``clients`` connections to ``daemon`` (or its relays)."""
    template = LoadSpec(
        indices=(),
        key_holders=(),
        port=daemon.port,
        pki=str(setup.pki),
        private_key=str(setup.keys / "private_key.json"),
        federation=federation,
        upload_file=upload_file,
        per_client_masks=args.per_client_masks,
        decrypt_workers=args.decrypt_workers,
        connect_concurrency=connect_concurrency,
        connect_attempts=5,
        send_buffer=args.client_sndbuf,
        timeout_s=args.timeout,
        result_file="",
    )
    return start_load(
        template,
        clients=clients,
        processes=args.loadgen_procs,
        key_processes=args.committee_size,
        workdir=setup.workdir,
        relay_ports=relay_ports,
    )


@dataclass(frozen=True)
class RootDaemon:
    """The files of one run's root aggregator: config, federation, prepared upload, state."""

    name: str
    federation: FederationParams
    upload: Path
    config: Path
    state: Path


def committee_size(args: argparse.Namespace, clients: int) -> int:
    """Key holders of a run: ``--committee-size``, at most one per load generator."""
    return max(1, min(args.committee_size, args.loadgen_procs, clients))


def root_daemon(
    setup: ScaleSetup, args: argparse.Namespace, clients: int, name: str, *, direct: int
) -> RootDaemon:
    """Write the root's config for ``clients`` a round, ``direct`` of them connected to it."""
    settings: dict[str, Any] = {
        "min_clients": clients,
        "clients_per_round": clients,
        "headroom_bits": setup.headroom_bits,
        "max_inflight_uploads": args.max_inflight,
        "max_connections": max(2048, direct + 64),
        "committee_size": committee_size(args, clients),
    }
    if args.fold_workers is not None and fold_workers_supported():
        settings["fold_workers"] = args.fold_workers
    values = daemon_settings(setup, name, settings)
    federation = federation_of(values)
    return RootDaemon(
        name=name,
        federation=federation,
        upload=prepare_upload(setup, federation),
        config=write_config(values, setup.workdir / f"aggregator-{name}.toml"),
        state=setup.workdir / f"state-{name}",
    )


def run_round(
    setup: ScaleSetup, clients: int, args: argparse.Namespace, profile: Path | None
) -> dict:
    """One aggregator, ``clients`` simultaneous clients, one round; its figures."""
    root = root_daemon(setup, args, clients, f"{clients}-{time.monotonic_ns()}", direct=clients)
    daemon = AggregatorDaemon(root.config, setup.workdir / f"aggregator-{root.name}.log")
    load: LoadProcesses | None = None
    profiler = None
    notes: list[str] = []
    peak_rss = 0.0
    tcp_before = tcp_counters()
    try:
        daemon.wait_listening()
        baseline_rss, _ = daemon.sample()
        load = start_clients(
            setup,
            daemon,
            clients,
            args,
            upload_file=str(root.upload),
            federation=root.federation.to_bytes(),
            connect_concurrency=0,
        )
        if profile is not None:
            profiler = start_profiler(daemon.popen.pid, profile)
            if profiler is None:
                _progress("py-spy is not installed (pip install py-spy): no profile")
        load.barrier.wait(timeout=600)
        _progress(f"{clients} clients: connecting")
        deadline = time.monotonic() + args.timeout
        next_scrape = 0.0
        peak_rss = baseline_rss
        while not daemon.poll_exit():
            rss, _ = daemon.sample()
            peak_rss = max(peak_rss, rss)
            if time.monotonic() >= next_scrape:
                daemon.scrape_metrics()
                next_scrape = time.monotonic() + _SCRAPE_INTERVAL_S
            if rss > args.max_aggregator_gb * 1024:
                notes.append(f"killed: aggregator RSS {rss:.0f} MB > --max-aggregator-gb")
                daemon.stop(5)
            elif time.monotonic() > deadline:
                notes.append(f"killed: run exceeded --timeout {args.timeout} s")
                daemon.stop(5)
            time.sleep(_SAMPLE_INTERVAL_S)
    finally:
        daemon.stop()
        loadgen = load.finish(120) if load is not None else merge_stats([])
        if profiler is not None:
            try:
                profiler.wait(60)
            except subprocess.TimeoutExpired:
                profiler.kill()
    result = round_result(
        setup, clients, root.federation, daemon, root.state, loadgen, peak_rss, notes, profile
    )
    result["kernel_tcp"] = kernel_tcp(daemon, tcp_before)
    return result


def kernel_tcp(daemon: AggregatorDaemon, before: dict[str, int]) -> dict[str, Any]:
    """Kernel TCP memory during the run (machine-wide: other users' sockets count too)."""
    after = tcp_counters()
    out: dict[str, Any] = {"mem_peak_mb": round(daemon.tcp_mem_peak_mb, 1)}
    out.update({k: after[k] - before.get(k, 0) for k in after})
    with contextlib.suppress(OSError):
        out["tcp_mem_sysctl_pages"] = Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()
    return out


def round_result(
    setup: ScaleSetup,
    clients: int,
    federation: FederationParams,
    daemon: AggregatorDaemon,
    state: Path,
    loadgen: dict[str, Any],
    peak_tree_rss: float,
    notes: list[str],
    profile: Path | None,
) -> dict[str, Any]:
    codec = update_codec(setup, federation)
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        record = json.loads((state / "checkpoint.json").read_text())
    completed = [h for h in record.get("history", []) if h.get("phase") == "completed"]
    failed = [h.get("failure") for h in record.get("history", []) if h.get("failure")]
    phases = completed[-1]["phase_seconds"] if completed else {}
    folded = len(completed[-1]["contributors"]) if completed else 0
    usage = daemon.rusage
    metrics = daemon.metrics
    fold_count = metrics.get("fedcore_fold_seconds_count", 0.0)
    rejected = {
        k.split('"')[1]: v
        for k, v in metrics.items()
        if k.startswith("fedcore_updates_rejected_total{") and v
    }
    out: dict[str, Any] = {
        "clients": clients,
        "params": setup.params,
        "weight": federation.weight_for(SAMPLES_PER_CLIENT),
        "federation_digest": federation.digest().hex()[:16],
        "ciphertexts_per_update": codec.item_count,
        "bytes_per_update": codec.item_count * codec.public_key.ciphertext_bytes,
        "updates_folded": folded,
        "round_seconds": sum(phases.get(k, 0.0) for k in ("collect", "decrypt", "update"))
        if completed
        else None,
        "phase_seconds": phases,
        **log_times(daemon.log),
        "aggregator_peak_rss_mb": daemon.peak_rss_mb,
        "aggregator_rusage_maxrss_mb": usage.ru_maxrss / 1024 if usage is not None else None,
        "aggregator_tree_peak_rss_mb": peak_tree_rss,
        "aggregator_cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
        "aggregator_exit_code": daemon.popen.returncode,
        "bytes_received": record.get("metrics", {}).get("fedcore_bytes_received_total"),
        "bytes_sent": record.get("metrics", {}).get("fedcore_bytes_sent_total"),
        "fold_seconds": metrics.get("fedcore_fold_seconds_sum"),
        "fold_count_scraped": fold_count,
        "fold_seconds_complete": bool(folded) and fold_count >= folded,
        "rejected": rejected,
        "connect_seconds": loadgen.get("connect_seconds"),
        "handshake_failures": loadgen.get("handshake_failures"),
        "loadgen": loadgen,
        "failures": failed,
        "notes": notes,
        "rss_timeline": timeline(daemon.samples),
    }
    out["committee"] = _committee_figures(daemon.log, loadgen)
    if completed:
        out.update(_model_check(setup, state, record, codec.spec.step))
    if profile is not None and profile.exists():
        out["profile"] = {"raw": str(profile), **top_frames(profile)}
    if not completed:
        out["aggregator_log_tail"] = daemon.tail()
    return out


def timeline(samples: list[tuple[float, float, float]], points: int = 120) -> list[list[float]]:
    """Down-sampled [seconds since start, tree RSS MB, CPU s] of the daemon."""
    if not samples:
        return []
    step = max(1, len(samples) // points)
    t0 = samples[0][0]
    return [[round(t - t0, 2), round(r, 1), round(c, 2)] for t, r, c in samples[::step]]


# ---------------------------------------------------------------------------- idle clients
def _limits() -> dict[str, Any]:
    """The host limits that bound how many connections can be held."""
    import psutil

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict[str, Any] = {"nofile_soft": soft, "nofile_hard": hard}
    for name, path in (
        ("ip_local_port_range", "/proc/sys/net/ipv4/ip_local_port_range"),
        ("somaxconn", "/proc/sys/net/core/somaxconn"),
        ("tcp_max_syn_backlog", "/proc/sys/net/ipv4/tcp_max_syn_backlog"),
    ):
        with contextlib.suppress(OSError):
            out[name] = Path(path).read_text().strip()
    out["memory_available_gb"] = round(psutil.virtual_memory().available / 2**30, 1)
    return out


def _run_idle(setup: ScaleSetup, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    """Hold ``clients`` idle connections (no round can start); what they cost the daemon."""
    settings = {
        "min_clients": clients + 1,  # never reached: no round, no 2 MB RoundStart each
        "clients_per_round": clients + 1,  # headroom derived by the aggregator
        "max_connections": clients + 64,
        "idle_timeout": 300.0,
    }
    name = f"idle{clients}-{time.monotonic_ns()}"
    config = write_config(
        daemon_settings(setup, name, settings), setup.workdir / f"aggregator-{name}.toml"
    )
    daemon = AggregatorDaemon(config, setup.workdir / f"aggregator-{name}.log")
    load: LoadProcesses | None = None
    out: dict[str, Any] = {"clients": clients, "limits": _limits()}
    try:
        daemon.wait_listening()
        baseline_rss, _ = daemon.sample()
        load = start_clients(
            setup,
            daemon,
            clients,
            args,
            upload_file=None,
            federation=b"",
            connect_concurrency=args.idle_connect_concurrency,
        )
        connected = load.connected
        load.barrier.wait(timeout=900)
        _progress(f"{clients} idle clients: connecting")
        t0 = time.monotonic()
        last, last_change = 0, t0
        while connected.value < clients and time.monotonic() - last_change < 60:
            if daemon.poll_exit() or time.monotonic() - t0 > args.timeout:
                break
            if connected.value != last:
                last, last_change = connected.value, time.monotonic()
            daemon.sample()
            time.sleep(0.5)
        out["connect_seconds"] = time.monotonic() - t0
        out["connected_loadgen_view"] = connected.value
        _, cpu_before = daemon.sample()
        hold_end = time.monotonic() + args.idle_hold
        while time.monotonic() < hold_end and not daemon.poll_exit():
            daemon.sample()
            time.sleep(0.5)
        rss, cpu_after = daemon.sample()
        health = daemon.scrape("/healthz")
        out["connected_aggregator_view"] = (
            json.loads(health).get("connected_clients") if health else None
        )
        # At the fd limit the metrics server cannot accept either: count the log's joins.
        out["joined_in_log"] = daemon.joins_logged()
        out["aggregator_rss_baseline_mb"] = baseline_rss
        out["aggregator_rss_held_mb"] = rss
        held = out["connected_aggregator_view"] or connected.value
        out["aggregator_kb_per_connection"] = (rss - baseline_rss) * 1024 / held if held else None
        out["aggregator_cpu_s_per_s_held"] = (cpu_after - cpu_before) / max(args.idle_hold, 1e-9)
        load.release.set()
    finally:
        loadgen = load.finish(120) if load is not None else merge_stats([])
        daemon.stop()
    usage = daemon.rusage
    out.update(
        {
            "aggregator_peak_rss_mb": daemon.peak_rss_mb,
            "aggregator_cpu_s": usage.ru_utime + usage.ru_stime if usage is not None else None,
            "handshake_failures": loadgen["handshake_failures"],
            "connect_failures": loadgen["connect_failures"],
            "loadgen": loadgen,
            "aggregator_log_errors": [
                line[:200]
                for line in daemon.tail(200_000).splitlines()
                if " ERROR " in line or " WARNING " in line
            ][:20],
        }
    )
    return out


# ---------------------------------------------------------------------------- entry point
def git_state() -> dict[str, Any]:
    """Which code was measured: HEAD and whether the runtime's files had local edits."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10
            )
            return done.stdout.strip()
        return ""

    dirty = git("status", "--porcelain", "--", "fedcore", "protocol").splitlines()
    return {"head": git("rev-parse", "--short", "HEAD"), "dirty_runtime_files": dirty}


def _client_counts(args: argparse.Namespace) -> tuple[int, list[int]]:
    """(headline client count, every count to run); ``--clients 0 --curve ''`` runs none."""
    curve = [int(c) for c in args.curve.split(",") if c.strip()]
    if min([*curve, args.clients, args.idle_clients]) < 0:
        raise SystemExit("client counts must be >= 0")
    if args.quick:
        curve = [c for c in curve if 0 < c <= 100] or [10, 100]
        return max(curve), sorted(set(curve))
    return args.clients, sorted(c for c in {*curve, args.clients} if c > 0)


def _targets(main: dict[str, Any], clients: int) -> dict[str, bool]:
    """The issue's targets for the headline run (reported, never asserted)."""
    round_s, peak = main.get("round_seconds"), main.get("aggregator_peak_rss_mb")
    return {
        "all_folded": main.get("updates_folded") == clients,
        "round_le_60s": round_s is not None and round_s <= TARGET_ROUND_S,
        "peak_rss_le_1_5gb": peak is not None and peak <= TARGET_PEAK_RSS_MB,
    }


def workload_of(args: argparse.Namespace, setup: ScaleSetup, headroom: int) -> dict[str, Any]:
    """What every run of one invocation shared: key, packing, limits, masks, engines."""
    fold_supported = fold_workers_supported()
    return {
        "key_bits": args.key_bits,
        "headroom_bits": headroom,
        "value_bits": VALUE_BITS,
        "chunk_ciphertexts": CHUNK_CIPHERTEXTS,
        "max_inflight_uploads": args.max_inflight,
        "committee_size": args.committee_size,
        "loadgen_procs": args.loadgen_procs,
        "decrypt_workers": args.decrypt_workers,
        "fold_workers": args.fold_workers if fold_supported else None,
        "fold_workers_supported": fold_supported,
        "fold_engine": fold_engine(),
        "model_kwargs": setup.model_kwargs,
        "re_randomized": False,
        "max_weight": MAX_WEIGHT,
        "samples_per_client": SAMPLES_PER_CLIENT,
        "masks": "one ephemeral key per connection (--per-client-masks)"
        if args.per_client_masks
        else "one ephemeral key per load process and round, one signed token per "
        "connection (see the module docstring)",
        "mask_shortcut": "Enc(q) once; each round's masks M applied as "
        "Enc(q)·(1 + M·n) mod n², reusing Enc(q)'s random factors",
        "round_seconds_is": "checkpoint phase_seconds collect + decrypt + update",
        "peak_rss_is": "the daemon's VmHWM, read every sample (rusage's ru_maxrss keeps the "
        "bench process's high-water mark across exec; it is aggregator_rusage_maxrss_mb)",
        "fold_seconds_is": "fedcore_fold_seconds_sum: per-update fold waits; with "
        "fold_workers > 0 they overlap, so the sum can exceed the wall time",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the curve (smallest first), the headline last; optionally the idle test.

    With ``--relays R`` it runs `bench.relay_scale` instead: a root, R relays and a
    flat comparison run.
    """
    if args.relays > 0:
        from bench.relay_scale import run_relays

        return run_relays(args)
    headline, counts = _client_counts(args)
    # one packing for every run (so one encryption serves all): N clients of MAX_WEIGHT
    headroom = max(1, (max([*counts, 1]) * MAX_WEIGHT - 1).bit_length())
    certs = max([*counts, args.idle_clients])
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcore-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.fold_workers is not None and not fold_workers_supported():
        _progress("this aggregator has no fold_workers setting: --fold-workers ignored")
    try:
        _progress(f"set-up: {args.key_bits}-bit key, {certs} client certificates in {workdir}")
        setup = make_setup(
            workdir,
            key_bits=args.key_bits,
            model_kwargs=json.loads(args.model_kwargs),
            certs=certs,
            headroom=headroom,
        )
        curve = []
        for clients in counts:
            _progress(f"run: {clients} clients")
            profile = args.profile if clients == headline else None
            try:
                point = run_round(setup, clients, args, profile)
            except Exception as exc:  # one broken run must not lose the others
                _progress(f"{clients} clients: run failed: {exc!r}")
                point = {"clients": clients, "updates_folded": 0, "error": repr(exc)}
                point.update(round_seconds=None, aggregator_peak_rss_mb=None)
            _progress(
                f"{clients} clients: folded {point['updates_folded']}, round "
                f"{point['round_seconds']} s, peak RSS {point['aggregator_peak_rss_mb']} MB"
            )
            curve.append(point)
        idle = _run_idle(setup, args.idle_clients, args) if args.idle_clients > 0 else None
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)  # keys and certificates never stay
    main = next((p for p in curve if p["clients"] == headline), {"clients": headline})
    summary = {k: v for k, v in main.items() if k not in ("rss_timeline", "loadgen", "profile")}
    return {
        **summary,
        "targets": _targets(main, headline) if curve else None,
        "workload": workload_of(args, setup, headroom),
        "setup_seconds": setup.timings,
        "curve": [
            {
                k: p.get(k)
                for k in (
                    "clients",
                    "updates_folded",
                    "round_seconds",
                    "round_seconds_log",
                    "aggregator_peak_rss_mb",
                    "aggregator_tree_peak_rss_mb",
                    "aggregator_cpu_s",
                    "fold_seconds",
                    "connect_seconds",
                    "handshake_failures",
                    "phase_seconds",
                    "committee",
                )
            }
            for p in curve
        ],
        "runs": curve,
        "idle": idle,
        "git": git_state(),
    }
