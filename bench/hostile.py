"""Hostile peers (issue #17): each attack against a real aggregator daemon, measured.

``python -m bench hostile [--attacks a,b] [--key-bits 2048] [--quick]`` runs, for the
honest baseline and then for each attack of `bench.hostile_attacks`, a fresh
``fedcore aggregator --config`` process (digits MLP, its own state directory, metrics on
an ephemeral port), an honest federation of real `fedcore.client.Client` objects in a
process of their own (`bench.hostile_clients`; client-0 holds the private key), and the
attack, over real mutual TLS on 127.0.0.1 with certificates of the same PKI
(``fedcore certs``, ``fedcore keygen``). While it runs the daemon's VmRSS, VmHWM and CPU
are read from /proc every 50 ms and its /metrics scraped every 0.5 s.

Reported per run: the daemon's RSS when listening, its peak (sampled VmRSS, or VmHWM when
that rose during the run) and the difference; rounds completed and failed (and why);
the final model's accuracy on the digits test split and its largest difference from
the baseline's (the clients' stochastic rounding is secure randomness, so two honest
runs differ by up to a quantization step per value: "equal" means within two steps);
the refusal counters (``fedcore_updates_rejected_total`` and, where the daemon has it,
``fedcore_connections_refused_total``); the daemon's exit code and error; and what the
attacker saw. The upload takeover changes the federation (its victim uploads too), so it
is compared with its own dry run. The table goes to stdout, the JSON to
bench/results/hostile.json unless ``--json`` says otherwise. Measures; never asserts
(tests/runtime/test_hostile_peers.py does, at a smaller scale).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.aggregator_daemon import AggregatorDaemon, federation_of, log_stamp, write_config
from bench.hostile_attacks import ATTACKS, Attack, AttackContext, AttackScale
from bench.hostile_clients import HIDDEN, HonestSpec, start_honest

__all__ = [
    "ATTACKS",
    "BASELINE",
    "QUICK_SCALE",
    "RESULT",
    "DaemonSampler",
    "HostileSetup",
    "add_arguments",
    "attacker_identities",
    "compare",
    "daemon_settings",
    "format_table",
    "make_setup",
    "quantization_step",
    "run",
    "run_scenario",
]

RESULT = Path("bench/results/hostile.json")
BASELINE = "baseline"
QUICK_SCALE = AttackScale(
    bomb_waves=1, partial_hold_s=15.0, cap_hold_s=20.0, flood_s=5.0, squatters=4
)
ATTACKER_CERTS = 48
_SAMPLE_INTERVAL_S = 0.05
_SCRAPE_INTERVAL_S = 0.5
_COUNTERS = ("fedcore_updates_rejected_total", "fedcore_connections_refused_total")
_STEPS_EQUAL = 2  # models within this many quantization steps are the same model


def _progress(message: str) -> None:
    print(f"[hostile] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- set-up
@dataclass(frozen=True, slots=True, kw_only=True)
class HostileSetup:
    """The PKI, the key and the federation's size, shared by every run."""

    workdir: Path
    key_bits: int
    honest: int
    rounds: int
    daemon_source: Path | None = None
    """Run the daemon from this source tree (e.g. a ``git archive`` of an older commit)
    instead of the installed fedcore; the attackers and clients stay this tree's."""
    daemon_knows: frozenset[str] = frozenset()
    """The settings the daemon's ``AggregatorConfig`` accepts."""

    @property
    def pki(self) -> Path:
        """``fedcore certs`` output: the CA, the aggregator and client-<i> certificates."""
        return self.workdir / "pki"

    @property
    def keys(self) -> Path:
        """``fedcore keygen`` output: public_key.json and private_key.json."""
        return self.workdir / "keys"

    def daemon_env(self) -> dict[str, str]:
        """The environment of the daemon's process."""
        env = dict(os.environ)
        if self.daemon_source is not None:
            path = [str(self.daemon_source), env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return env


@contextlib.contextmanager
def _daemon_pythonpath(setup: HostileSetup) -> Iterator[None]:
    """PYTHONPATH as the daemon needs it, while its process is started."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = setup.daemon_env().get("PYTHONPATH", "")
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def _fedcore_command() -> list[str]:
    script = Path(sys.executable).parent / "fedcore"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedcore.cli"]


def _fedcore(*argv: str) -> None:
    subprocess.run([*_fedcore_command(), *argv], check=True, capture_output=True, timeout=600)


def _settings_known(env: dict[str, str], cwd: Path) -> frozenset[str]:
    """What the daemon's AggregatorConfig accepts, asked of the daemon's own code."""
    code = (
        "from dataclasses import fields; from fedcore.aggregator import AggregatorConfig; "
        "print(' '.join(f.name for f in fields(AggregatorConfig)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, check=True, capture_output=True, text=True
    )
    return frozenset(out.stdout.split())


def make_setup(
    workdir: Path,
    *,
    key_bits: int,
    honest: int,
    rounds: int = 1,
    daemon_source: Path | None = None,
) -> HostileSetup:
    """Issue the PKI (honest clients first, then the attackers') and the Paillier key."""
    setup = HostileSetup(
        workdir=workdir,
        key_bits=key_bits,
        honest=honest,
        rounds=rounds,
        daemon_source=daemon_source,
    )
    if not (setup.pki / "ca.pem").exists():
        _fedcore("certs", "--out", str(setup.pki), "--clients", str(honest + ATTACKER_CERTS))
    if not (setup.keys / "private_key.json").exists():
        _fedcore("keygen", "--bits", str(key_bits), "--out", str(setup.keys))
    return replace(setup, daemon_knows=_settings_known(setup.daemon_env(), workdir))


def attacker_identities(setup: HostileSetup) -> tuple[str, ...]:
    """The certificates no honest client uses."""
    return tuple(f"client-{setup.honest + i}" for i in range(ATTACKER_CERTS))


def daemon_settings(setup: HostileSetup, name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """One run's daemon settings: a small, fast digits federation, short timeouts.

    Settings the daemon does not know (an older one: see ``daemon_source``) are left out.
    """
    slow = setup.key_bits > 1024
    values: dict[str, Any] = {
        "public_key": setup.keys / "public_key.json",
        "cert": setup.pki / "aggregator.pem",
        "key": setup.pki / "aggregator.key",
        "ca": setup.pki / "ca.pem",
        "state_dir": setup.workdir / f"state-{name}",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "model": "fedcore.model:mlp",
        "model_kwargs": {"in_features": 64, "hidden": list(HIDDEN)},
        "min_clients": setup.honest,
        "clients_per_round": setup.honest,
        "rounds": setup.rounds,
        "round_timeout": 90.0 if slow else 40.0,
        "wait_for_clients_timeout": 60.0 if slow else 40.0,
        "max_failed_rounds": 2,
        "committee_size": 2,
        "decrypt_shard_timeout": 30.0,
        "handshake_timeout": 10.0,
        "resume_grace": 20.0,
        "min_key_bits": min(2048, setup.key_bits),
        # the same packing in every run, whatever clients_per_round it has; 16-bit values
        # (the default before #15) so one round's accuracy is comparable to 2 pp
        "value_bits": 16,
        "headroom_bits": 10,
        "chunk_ciphertexts": 32,
        "local_epochs": 1,
        "learning_rate": 0.05,
        "seed": 0,
        **overrides,
    }
    values.setdefault("upload_start_timeout", 3.0)  # the upload pace (#17), if it has one
    return {k: v for k, v in values.items() if k in setup.daemon_knows}


# ---------------------------------------------------------------------------- sampling
class DaemonSampler(threading.Thread):
    """VmRSS, VmHWM and CPU seconds of one process from /proc, every 50 ms, until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(name=f"sample-{pid}", daemon=True)
        self.pid = pid
        self.rss_mb = 0.0
        self.peak_rss_mb = 0.0
        self.hwm_mb = 0.0
        self.cpu_s = 0.0
        self._stop_event = threading.Event()
        self._tick = os.sysconf("SC_CLK_TCK")
        self.read()

    def read(self) -> bool:
        """Take one sample; False once the process is gone."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False
        fields = {
            line.split(":")[0]: line.split()[1]
            for line in status.splitlines()
            if line.startswith(("VmRSS:", "VmHWM:"))
        }
        if "VmRSS" not in fields:  # a zombie: exited, not reaped yet
            return False
        self.rss_mb = int(fields["VmRSS"]) / 1024
        self.hwm_mb = max(self.hwm_mb, int(fields.get("VmHWM", 0)) / 1024)
        self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb)
        utime, stime = stat.rsplit(")", 1)[1].split()[11:13]
        self.cpu_s = (int(utime) + int(stime)) / self._tick
        return True

    def run(self) -> None:
        while not self._stop_event.wait(_SAMPLE_INTERVAL_S):
            if not self.read():
                return

    def stop(self) -> None:
        """Stop sampling (the figures keep their last values)."""
        self._stop_event.set()
        self.join(5)


# ---------------------------------------------------------------------------- one run
def _counters(*sources: dict[str, float]) -> dict[str, dict[str, float]]:
    """The non-zero refusal counters, by name then label set (the largest value seen)."""
    out: dict[str, dict[str, float]] = {}
    for source in sources:
        for key, value in source.items():
            name, _, labels = key.partition("{")
            if name in _COUNTERS and value > 0:
                label = labels.rstrip("}").partition("=")[2].strip('"') or "total"
                table = out.setdefault(name.removeprefix("fedcore_"), {})
                table[label] = max(table.get(label, 0.0), value)
    return out


def _outcome(setup: HostileSetup, state_dir: Path) -> dict[str, Any]:
    """Rounds, failures, contributors and accuracy from the daemon's last checkpoint."""
    from fedcore.aggregator import Checkpoint
    from fedcore.data import load_digits
    from fedcore.model import load_flat_into, mlp
    from fedcore.training import evaluate

    try:
        checkpoint = Checkpoint.load(state_dir)
    except Exception as exc:  # a checkpoint that does not load is a result too
        return {"checkpoint_error": str(exc)}
    if checkpoint is None:
        return {"rounds_completed": 0, "rounds_failed": 0}
    completed = [h for h in checkpoint.history if "failure" not in h]
    failed = [h for h in checkpoint.history if "failure" in h]
    model = mlp(64, hidden=HIDDEN)
    load_flat_into(model, checkpoint.global_weights)
    data = load_digits()
    return {
        "rounds_completed": checkpoint.rounds_completed,
        "rounds_failed": len(failed),
        "failures": [h["failure"] for h in failed],
        "contributors": sorted(completed[-1]["contributors"]) if completed else [],
        "round_seconds": round(sum(sum(h.get("phase_seconds", {}).values()) for h in completed), 2),
        "excluded_decryptors": list(checkpoint.excluded_decryptors),
        "accuracy": round(float(evaluate(model, data.x_test, data.y_test)["accuracy"]), 4),
        "metrics_snapshot": dict(checkpoint.metrics),
        "weights": checkpoint.global_weights,
    }


def _daemon_error(log: Path) -> str:
    """The daemon's one-line error, if it logged one (``fedcore aggregator: error: ...``)."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for line in reversed(lines):
        if "error:" in line or "Traceback" in line or "MemoryError" in line:
            return line.strip()[:300]
    return ""


async def run_scenario(
    setup: HostileSetup,
    attack: Attack | None,
    scale: AttackScale,
    *,
    name: str,
    dry_run: bool = False,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """One daemon, the honest federation and ``attack`` (None: the baseline); its figures.

    Every process it starts is stopped before it returns; the result keeps the final
    weights under ``weights`` (a numpy array, dropped from the JSON).
    """
    overrides = attack.settings(scale, setup.honest) if attack is not None else {}
    values = daemon_settings(setup, name, overrides)
    federation = federation_of(values)
    federation_file = setup.workdir / f"federation-{name}.json"
    federation.save(federation_file)
    shutil.rmtree(values["state_dir"], ignore_errors=True)
    log = setup.workdir / f"aggregator-{name}.log"
    log.unlink(missing_ok=True)
    config = write_config(values, setup.workdir / f"aggregator-{name}.toml")
    honest_results = setup.workdir / f"honest-{name}.json"
    honest_results.unlink(missing_ok=True)
    notes: list[str] = []
    report: dict[str, Any] = {}
    started = time.monotonic()
    with _daemon_pythonpath(setup):
        daemon = AggregatorDaemon(config, log)
    sampler: DaemonSampler | None = None
    honest = None
    task: asyncio.Task[dict[str, Any]] | None = None
    honest_started_at: float | None = None
    try:
        await asyncio.to_thread(daemon.wait_listening, 120.0)
        sampler = DaemonSampler(daemon.popen.pid)
        sampler.start()
        listening_rss, listening_hwm = sampler.rss_mb, sampler.hwm_mb
        ctx = AttackContext(
            port=daemon.port,
            pki=setup.pki,
            private_key=setup.keys / "private_key.json",
            federation=federation,
            identities=attacker_identities(setup),
            honest=setup.honest,
            scale=scale,
            log=log,
            cpu_seconds=lambda: sampler.cpu_s if sampler is not None else 0.0,
            dry_run=dry_run,
        )
        if attack is not None:
            task = asyncio.create_task(attack.run(ctx))
            if attack.honest_when_ready:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ctx.ready.wait(), 120.0)
        honest_started_at = time.time()
        honest = start_honest(
            HonestSpec(
                port=daemon.port,
                pki=setup.pki,
                private_key=setup.keys / "private_key.json",
                federation=federation_file,
                clients=setup.honest,
                key_holders=1,
                result_file=honest_results,
                log_file=setup.workdir / f"honest-{name}.log",
                timeout_s=timeout_s,
            )
        )
        next_scrape = 0.0
        while not daemon.poll_exit():
            now = time.monotonic()
            if now >= next_scrape:
                await asyncio.to_thread(daemon.scrape_metrics)
                next_scrape = time.monotonic() + _SCRAPE_INTERVAL_S
            if now - started > timeout_s:
                notes.append(f"stopped: the run exceeded {timeout_s:.0f} s")
                await asyncio.to_thread(daemon.stop, 10.0)
                break
            await asyncio.sleep(0.1)
        ctx.stopped.set()
        if task is not None:
            try:
                report = await asyncio.wait_for(task, 60.0)
            except Exception as exc:  # the attacker's failure is part of the result
                report = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await asyncio.to_thread(daemon.stop, 10.0)
        if sampler is not None:
            sampler.stop()
        if honest is not None:
            await asyncio.to_thread(honest.join, 30.0)
            if honest.is_alive():
                honest.kill()
                honest.join(5.0)
    peak = sampler.peak_rss_mb if sampler is not None else 0.0
    if sampler is not None and sampler.hwm_mb > listening_hwm:
        peak = max(peak, sampler.hwm_mb)  # a spike between two samples
    outcome = _outcome(setup, values["state_dir"])
    snapshot = outcome.pop("metrics_snapshot", {})
    clients = json.loads(honest_results.read_text()) if honest_results.exists() else []
    selected_at = log_stamp(log, "round 1: selected")
    first_round_after = (
        round(selected_at - honest_started_at, 1)
        if selected_at is not None and honest_started_at is not None
        else None
    )
    return {
        "attack": attack.name if attack is not None else BASELINE,
        "issue": attack.issue if attack is not None else "",
        "summary": attack.summary if attack is not None else "honest federation, no attack",
        "dry_run": dry_run,
        "daemon_exit_code": daemon.popen.returncode,
        "daemon_error": _daemon_error(log) if daemon.popen.returncode else "",
        "rss_listening_mb": round(listening_rss, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_delta_mb": round(peak - listening_rss, 1),
        "vm_hwm_mb": round(sampler.hwm_mb if sampler is not None else 0.0, 1),
        "daemon_cpu_s": round(sampler.cpu_s if sampler is not None else 0.0, 1),
        "seconds_to_first_round": first_round_after,
        **outcome,
        "refusals": _counters(snapshot, daemon.metrics),
        "honest_clients": [
            {k: v for k, v in c.items() if k in ("rounds_contributed", "reconnects", "error")}
            for c in clients
        ],
        "attacker": report,
        "notes": notes,
        "seconds": round(time.monotonic() - started, 1),
        "log": str(log),
    }


def compare(result: dict[str, Any], reference: dict[str, Any], step: float) -> None:
    """Add how far ``result``'s final model is from ``reference``'s (in place)."""
    ours, theirs = result.get("weights"), reference.get("weights")
    if not isinstance(ours, np.ndarray) or not isinstance(theirs, np.ndarray):
        result.update(model_gap=None, model_equal=False, compared_with=reference["attack"])
        return
    gap = float(np.max(np.abs(ours - theirs)))
    result.update(
        model_gap=gap,
        model_gap_steps=round(gap / step, 2),
        model_equal=gap <= _STEPS_EQUAL * step,
        model_identical=bool(np.array_equal(ours, theirs)),
        same_contributors=result.get("contributors") == reference.get("contributors"),
        compared_with=reference["attack"] + (" (dry run)" if reference.get("dry_run") else ""),
    )


def quantization_step(setup: HostileSetup) -> float:
    """One quantization step of the federation's values: ``2·clip / (2^value_bits - 1)``."""
    federation = federation_of(daemon_settings(setup, "step", {}))
    return 2 * federation.clip / (2**federation.value_bits - 1)


# ---------------------------------------------------------------------------- the bench
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument(
        "--attacks",
        default="all",
        help=f"comma-separated attacks to run (default all): {', '.join(ATTACKS)}",
    )
    parser.add_argument(
        "--key-bits", type=int, default=2048, help="Paillier modulus (default 2048)"
    )
    parser.add_argument(
        "--honest", type=int, default=3, help="honest clients (the quorum; default 3)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds per run (default 1)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one run may take (default 600)"
    )
    parser.add_argument("--workdir", type=Path, help="keep keys, certificates, logs and state here")
    parser.add_argument(
        "--daemon-source",
        type=Path,
        help="run the daemon from this source tree (e.g. `git archive <commit>` unpacked) "
        "for before/after figures; attackers and clients stay this checkout's",
    )


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != "weights"}


def format_table(runs: list[dict[str, Any]]) -> str:
    """One line per run: memory, delay, rounds, accuracy, model, refusals, exit."""
    header = (
        f"{'attack':<20} {'RSS peak':>9} {'ΔRSS':>7} {'join→r1':>7} {'round':>6} "
        f"{'rounds':>6} {'acc':>6} {'model':>9}  refusals / exit"
    )
    lines = [header, "-" * len(header)]
    for r in runs:
        rounds = f"{r.get('rounds_completed', 0)}/{r.get('rounds_failed', 0)}f"
        if "model_equal" not in r:
            model = "-"
        elif r["model_equal"]:
            model = "="
        else:
            model = f"{r.get('model_gap_steps', '?')}st"
        refusals = ", ".join(
            f"{label}={value:g}"
            for table in (r.get("refusals") or {}).values()
            for label, value in table.items()
        )
        exit_text = f" exit {r['daemon_exit_code']}" if r.get("daemon_exit_code") else ""
        delay = r.get("seconds_to_first_round")
        name = r["attack"] + (" (dry)" if r.get("dry_run") else "")
        lines.append(
            f"{name:<20} {r['rss_peak_mb']:>7.0f}MB {r['rss_delta_mb']:>+6.0f}M "
            f"{'-' if delay is None else f'{delay:.1f}s':>7} {r.get('round_seconds', 0):>5.1f}s "
            f"{rounds:>6} {r.get('accuracy', float('nan')):>6.3f} {model:>9}  "
            f"{refusals or '-'}{exit_text}"
        )
    return "\n".join(lines)


async def _run_all(
    setup: HostileSetup, names: list[str], scale: AttackScale, timeout: float
) -> tuple[list[dict[str, Any]], float]:
    step = quantization_step(setup)
    _progress("baseline: the honest federation alone")
    baseline = await run_scenario(setup, None, scale, name=BASELINE, timeout_s=timeout)
    runs = [baseline]
    for name in names:
        attack = ATTACKS[name]
        reference = baseline
        if attack.own_baseline:
            _progress(f"{name}: its dry run (the scenario without the attack)")
            reference = await run_scenario(
                setup, attack, scale, name=f"{name}-dry", dry_run=True, timeout_s=timeout
            )
            runs.append(reference)  # its own reference: a victim uploads in it too
        _progress(f"{name}: {attack.summary}")
        result = await run_scenario(setup, attack, scale, name=name, timeout_s=timeout)
        compare(result, reference, step)
        runs.append(result)
        _progress(
            f"{name}: peak RSS {result['rss_peak_mb']} MB ({result['rss_delta_mb']:+} MB), "
            f"{result.get('rounds_completed')} rounds, accuracy {result.get('accuracy')}, "
            f"model equal {result.get('model_equal')}, exit {result['daemon_exit_code']}"
        )
    return runs, step


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected attack (and the baseline), each against a fresh daemon."""
    names = list(ATTACKS) if args.attacks == "all" else args.attacks.split(",")
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    if args.json is None:
        args.json = RESULT
    scale = QUICK_SCALE if args.quick else AttackScale()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedcore-hostile-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        _progress(f"set-up: {args.key_bits}-bit key, PKI for {args.honest} + attackers")
        setup = make_setup(
            workdir,
            key_bits=args.key_bits,
            honest=args.honest,
            rounds=args.rounds,
            daemon_source=args.daemon_source,
        )
        runs, step = asyncio.run(_run_all(setup, names, scale, args.timeout))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)  # keys and certificates never stay
    print(format_table(runs))
    attacked = [r for r in runs if r["attack"] != BASELINE and not r["dry_run"]]
    return {
        "daemon_source": str(args.daemon_source or "this checkout"),
        "key_bits": args.key_bits,
        "honest_clients": args.honest,
        "rounds": args.rounds,
        "quantization_step": step,
        "attacks_run": len(attacked),
        "attacks_with_model_equal": sum(bool(r.get("model_equal")) for r in attacked),
        "max_rss_delta_mb": max((r["rss_delta_mb"] for r in attacked), default=0.0),
        "baseline_rss_delta_mb": runs[0]["rss_delta_mb"],
        "scale": {k: getattr(scale, k) for k in scale.__dataclass_fields__},
        "runs": [_public(r) for r in runs],
    }
