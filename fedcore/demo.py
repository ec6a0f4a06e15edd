"""`fedcore demo`: a whole federation on this machine, over real mutual TLS on 127.0.0.1.

Makes a Paillier keypair and the federation PKI in a work directory, runs the aggregator
in this process and every client in its own process (as on real edge machines), with
``relays`` relays in between (each in its own process; key holders still connect to the
root, the other clients round-robin to the relays), trains
the seed MLP shape on a built-in dataset, and prints one progress line per round with
the global model's test accuracy and the phase times. ``encrypted=False`` runs the same
federation with float32 updates, for comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import queue as queue_module
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.aggregator import Aggregator, AggregatorConfig, RoundReport
from fedcore.crypto import deal, generate_keypair
from fedcore.crypto.threshold import save_key_files
from fedcore.data import client_shard, default_dataset_name, load_dataset
from fedcore.model import load_flat_into, mlp
from fedcore.training import evaluate
from protocol.tls import write_federation_pki

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """Knobs of the demo federation; the defaults are the README's main job."""

    clients: int = 10
    rounds: int = 10
    dataset: str | None = None
    key_bits: int = 2048
    encrypted: bool = True
    json_path: Path | None = None
    partition: str = "iid"
    seed: int = 0
    workdir: Path | None = None
    value_bits: int = 16
    committee_size: int = 3
    key_mode: str = "shared"
    threshold: int = 3
    parties: int = 5
    round_timeout: float = 900.0
    relays: int = 0
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.clients < 3:
            raise ValueError(
                f"clients must be >= 3 (the smallest quorum that hides each update); "
                f"got {self.clients}"
            )
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1; got {self.rounds}")
        if self.relays < 0:
            raise ValueError(f"relays must be >= 0; got {self.relays}")
        if self.relays and not self.encrypted:
            raise ValueError("relays forward encrypted sums: --relays needs an encrypted run")
        if self.relays and self.relays > self.clients - self.committee_members:
            raise ValueError(
                f"--relays {self.relays} needs at least {self.relays} clients besides the "
                f"{self.committee_members} key holders (they connect to the root); got "
                f"--clients {self.clients}"
            )
        if self.key_mode not in ("shared", "threshold"):
            raise ValueError(f"key_mode must be 'shared' or 'threshold'; got {self.key_mode!r}")
        if self.key_mode == "threshold":
            if not 1 <= self.threshold <= self.parties:
                raise ValueError(
                    f"threshold must be in 1..parties ({self.parties}); got {self.threshold}"
                )
            if self.parties > self.clients:
                raise ValueError(
                    f"a {self.threshold}-of-{self.parties} key needs at least {self.parties} "
                    f"clients (one per key share); got --clients {self.clients}"
                )

    @property
    def committee_members(self) -> int:
        """How many demo clients hold key material (the whole key, or one share each)."""
        if self.key_mode == "threshold":
            return self.parties
        return min(self.committee_size, self.clients)


def _client_process(
    index: int,
    options: DemoOptions,
    dataset_name: str,
    port: int,
    pki: str,
    federation: str,
    key_file: str | None,
) -> None:
    """One demo client, in its own process: shard, model, train, upload, until done."""
    import torch

    from fedcore.client import Client, ClientConfig
    from fedcore.training import TrainConfig, make_train_fn

    logging.basicConfig(level=logging.WARNING, format=f"client-{index} %(levelname)s %(message)s")
    torch.set_num_threads(1)
    dataset = load_dataset(dataset_name)
    x, y = client_shard(
        dataset, index, options.clients, scheme=options.partition, seed=options.seed
    )
    model = mlp(dataset.num_features, classes=dataset.num_classes)
    pki_dir = Path(pki)
    config = ClientConfig(
        cert=pki_dir / f"client-{index}.pem",
        key=pki_dir / f"client-{index}.key",
        ca=pki_dir / "ca.pem",
        federation=Path(federation),
        private_key=Path(key_file) if key_file and options.key_mode == "shared" else None,
        key_share=Path(key_file) if key_file and options.key_mode == "threshold" else None,
        server_hostname="localhost",
        min_key_bits=min(2048, options.key_bits),
    )
    train_fn = make_train_fn(x, y, TrainConfig(seed=options.seed + index))
    Client(model, train_fn, None, config).run_forever(f"127.0.0.1:{port}")


def _relay_process(index: int, root_port: int, pki: str, federation: str, ports: Any) -> None:
    """One demo relay, in its own process: forwards its clients' sum to the root."""
    from fedcore.aggregator import Relay, RelayConfig
    from protocol.transport import install_uvloop

    logging.basicConfig(level=logging.WARNING, format=f"relay-{index} %(levelname)s %(message)s")
    pki_dir = Path(pki)
    relay = Relay(
        RelayConfig(
            upstream=f"127.0.0.1:{root_port}",
            server_hostname="localhost",
            cert=pki_dir / f"relay-{index}.pem",
            key=pki_dir / f"relay-{index}.key",
            ca=pki_dir / "ca.pem",
            federation=Path(federation),
            name="demo",
            port=0,
            metrics_port=None,
        )
    )

    async def main() -> None:
        task = asyncio.create_task(relay.run())
        await relay.wait_started()
        ports.put((index, relay.port))
        await task

    install_uvloop()
    asyncio.run(main())


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo federation end to end; returns (and optionally writes) the summary."""
    dataset_name = options.dataset or default_dataset_name()
    out = print if not options.quiet else (lambda *a, **k: None)
    dataset = load_dataset(dataset_name)
    mode = "PLAINTEXT (no encryption)"
    if options.encrypted and options.key_mode == "threshold":
        mode = (
            f"ENCRYPTED (packed Paillier, {options.threshold}-of-{options.parties} threshold key)"
        )
    elif options.encrypted:
        mode = "ENCRYPTED (packed Paillier)"
    if options.dataset is not None:
        why = "chosen"
    elif dataset_name == "fashion-mnist":
        why = "default: Fashion-MNIST is installed"
    else:
        why = "default: Fashion-MNIST is not installed, so digits"
    out(
        f"fedcore demo: {options.clients} clients x {options.rounds} rounds on {dataset_name} "
        f"({why}), {mode}, {options.key_bits}-bit key, mutual TLS on 127.0.0.1"
    )
    tmp = None
    if options.workdir is None:
        tmp = tempfile.mkdtemp(prefix="fedcore-demo-")
        workdir = Path(tmp)
    else:
        workdir = options.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(options, dataset_name, dataset, workdir, out)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _make_keys(options: DemoOptions, keys: Path) -> list[Path]:
    """Write the federation's key files; the key file of each committee client, in order."""
    if options.key_mode == "threshold":
        public, shares = deal(options.key_bits, options.threshold, options.parties)
        return save_key_files(public, shares, keys)[1]
    public_key, private_key = generate_keypair(options.key_bits)
    public_key.save(keys / "public_key.json")
    private_key.save(keys / "private_key.json")
    return [keys / "private_key.json"] * options.committee_members


def _run(
    options: DemoOptions, dataset_name: str, dataset: Any, workdir: Path, out: Any
) -> dict[str, Any]:
    keys, pki = workdir / "keys", workdir / "pki"
    t0 = time.perf_counter()
    keys.mkdir(parents=True, exist_ok=True)
    key_files = _make_keys(options, keys)
    write_federation_pki(
        pki, clients=options.clients, relays=options.relays, sans=["localhost", "127.0.0.1"]
    )
    out(f"  keys and certificates ready in {time.perf_counter() - t0:.1f} s ({workdir})")

    config = AggregatorConfig(
        public_key=keys / "public_key.json",
        cert=pki / "aggregator.pem",
        key=pki / "aggregator.key",
        ca=pki / "ca.pem",
        state_dir=workdir / ("state-enc" if options.encrypted else "state-plain"),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        model="fedcore.model:mlp",
        model_kwargs={"in_features": dataset.num_features, "classes": dataset.num_classes},
        min_clients=max(3, math.ceil(options.clients / 2)),
        clients_per_round=options.clients,
        rounds=options.rounds,
        round_timeout=options.round_timeout,
        wait_for_clients_timeout=300.0,
        value_bits=options.value_bits,
        committee_size=options.committee_members,
        seed=options.seed,
        min_key_bits=min(2048, options.key_bits),
    )
    federation_file = workdir / "federation.json"
    config.federation(config.load_public_key() if options.encrypted else None).save(federation_file)
    test_model = mlp(dataset.num_features, classes=dataset.num_classes)
    accuracies: list[float] = []
    round_seconds: list[float] = []
    bytes_uploaded = 0
    last_round_end = [time.perf_counter()]

    def on_round(report: RoundReport, weights: np.ndarray) -> None:
        nonlocal bytes_uploaded
        load_flat_into(test_model, weights)
        accuracy = evaluate(test_model, dataset.x_test, dataset.y_test)["accuracy"]
        accuracies.append(accuracy)
        now = time.perf_counter()
        round_seconds.append(now - last_round_end[0])
        last_round_end[0] = now
        bytes_uploaded += report.bytes_received
        phases = " ".join(f"{k} {v:.1f}s" for k, v in report.phase_seconds.items() if v >= 0.05)
        client_side = " ".join(
            f"{k.removesuffix('_s')} {v:.1f}s" for k, v in report.client_timings.items()
        )
        per_client = report.bytes_received / max(1, len(report.contributors)) / 1e6
        out(
            f"  round {report.rounds_completed:>2}/{options.rounds} "
            f"{_bar(report.rounds_completed, options.rounds)} "
            f"acc {100 * accuracy:5.2f}%  {round_seconds[-1]:5.1f}s  "
            f"[aggregator: {phases}] [client avg: {client_side}] "
            f"{per_client:.2f} MB/client"
        )

    aggregator = Aggregator(config, encrypted=options.encrypted, on_round_complete=on_round)
    ctx = multiprocessing.get_context("spawn")
    processes: list[Any] = []

    async def _start_relays(
        options: DemoOptions, root_port: int, pki: Path, federation_file: Path
    ) -> list[int]:
        """Start the relays (each joins the root first); their client ports, in order."""
        if not options.relays:
            return []
        queue = ctx.Queue()
        for index in range(options.relays):
            process = ctx.Process(
                target=_relay_process,
                args=(index, root_port, str(pki), str(federation_file), queue),
                daemon=False,
            )
            process.start()
            processes.append(process)
        ports: dict[int, int] = {}
        deadline = time.monotonic() + 120
        while len(ports) < options.relays:
            if time.monotonic() > deadline or not all(p.is_alive() for p in processes):
                raise RuntimeError("a demo relay did not start; see its log above")
            with contextlib.suppress(queue_module.Empty):
                index, port = await asyncio.to_thread(queue.get, True, 1.0)
                ports[index] = port
        out(f"  {options.relays} relays joined the aggregator; clients split over them")
        return [ports[i] for i in range(options.relays)]

    async def main() -> None:
        task = asyncio.create_task(aggregator.run())
        await aggregator.wait_started()
        out(
            f"  aggregator on 127.0.0.1:{aggregator.port}, metrics on "
            f"http://127.0.0.1:{aggregator.metrics_port}/metrics; starting clients"
        )
        relay_ports = await _start_relays(options, aggregator.port, pki, federation_file)
        for index in range(options.clients):
            holder = str(key_files[index]) if index < len(key_files) else None
            port = aggregator.port  # key holders talk to the root, never through a relay
            if holder is None and relay_ports:
                port = relay_ports[(index - len(key_files)) % len(relay_ports)]
            process = ctx.Process(
                target=_client_process,
                args=(
                    index,
                    options,
                    dataset_name,
                    port,
                    str(pki),
                    str(federation_file),
                    holder,
                ),
                daemon=False,  # a client starts its own random-factor worker
            )
            process.start()
            processes.append(process)
        last_round_end[0] = time.perf_counter()
        await task

    started = time.perf_counter()
    try:
        from protocol.transport import install_uvloop, tune_allocator

        tune_allocator()
        install_uvloop()
        asyncio.run(main())
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    total = time.perf_counter() - started
    summary = {
        "dataset": dataset_name,
        "clients": options.clients,
        "relays": options.relays,
        "rounds": options.rounds,
        "rounds_completed": aggregator.checkpoint.rounds_completed,
        "encrypted": options.encrypted,
        "key_mode": options.key_mode if options.encrypted else None,
        "threshold": f"{options.threshold}-of-{options.parties}"
        if options.encrypted and options.key_mode == "threshold"
        else None,
        "key_bits": options.key_bits if options.encrypted else None,
        "value_bits": options.value_bits if options.encrypted else None,
        "partition": options.partition,
        "final_accuracy": accuracies[-1] if accuracies else None,
        "accuracy_per_round": accuracies,
        "round_seconds": round_seconds,
        "bytes_uploaded": bytes_uploaded,
        "total_seconds": total,
    }
    final = accuracies[-1] if accuracies else None
    out(
        f"done: {summary['rounds_completed']}/{options.rounds} rounds in {total:.1f} s, "
        f"final test accuracy "
        f"{'n/a' if final is None else f'{100 * final:.2f}%'}, "
        f"mean round {np.mean(round_seconds) if round_seconds else float('nan'):.1f} s, "
        f"{bytes_uploaded / 1e6:.1f} MB uploaded in all"
    )
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(summary, indent=2) + "\n")
        out(f"  summary written to {options.json_path}")
    sys.stdout.flush()
    return summary
