"""The honest federation of the hostile-peers benchmark: real clients in their own process.

`start_honest` spawns one process that runs ``clients`` real `fedcore.client.Client`
objects (digits shards, the seed MLP's digits size, client-0 .. client-<k-1> holding
the private key) against the aggregator on 127.0.0.1, exactly as the runtime tests'
``make_client`` builds them. A process of their own keeps the attackers' load (a
heartbeat flood, hundreds of handshakes) off their event loop and their GIL. When the
federation ends each client's `ClientResult` (or error) is written as JSON. Knows
nothing of attacks or of the daemon's process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import multiprocessing.process
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["HIDDEN", "HonestSpec", "start_honest"]

HIDDEN = (512, 256)
"""Hidden layers of the digits MLP the daemon and the clients build (the seed MLP's)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HonestSpec:
    """Where the aggregator is and who the honest clients are."""

    port: int
    pki: Path
    private_key: Path
    federation: Path
    clients: int
    key_holders: int
    result_file: Path
    log_file: Path
    timeout_s: float


def start_honest(spec: HonestSpec) -> multiprocessing.process.BaseProcess:
    """Start the honest clients in a spawned process (the caller joins or kills it)."""
    process = multiprocessing.get_context("spawn").Process(
        target=_run, args=(spec,), name="hostile-honest-clients", daemon=True
    )
    process.start()
    return process


def _run(spec: HonestSpec) -> None:
    import torch

    logging.basicConfig(
        filename=spec.log_file,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    torch.set_num_threads(1)  # three trainers on a 2-core machine shared with the daemon
    results = asyncio.run(_federation(spec))
    spec.result_file.write_text(json.dumps(results, indent=2) + "\n")


async def _federation(spec: HonestSpec) -> list[dict[str, Any]]:
    clients = [_client(spec, i) for i in range(spec.clients)]
    server = f"127.0.0.1:{spec.port}"
    tasks = [asyncio.create_task(c.run(server)) for c in clients]
    _, pending = await asyncio.wait(tasks, timeout=spec.timeout_s)
    for task in pending:
        task.cancel()
    results: list[dict[str, Any]] = []
    for client, task in zip(clients, tasks, strict=True):
        entry: dict[str, Any] = asdict(client.result)
        if task in pending:
            entry["error"] = f"still running after {spec.timeout_s:.0f} s"
        elif task.exception() is not None:
            entry["error"] = f"{type(task.exception()).__name__}: {task.exception()}"
        results.append(entry)
    return results


def _client(spec: HonestSpec, index: int) -> Any:  # a fedcore.client.Client
    """Client ``index``: shard ``index`` of ``clients`` of digits, seeded as in the tests."""
    import torch

    from fedcore.client import Client, ClientConfig
    from fedcore.contracts import FederationParams
    from fedcore.data import client_shard, load_digits
    from fedcore.model import mlp
    from fedcore.training import TrainConfig, make_train_fn

    x, y = client_shard(load_digits(), index, spec.clients, seed=0)
    torch.manual_seed(index)
    config = ClientConfig(
        cert=spec.pki / f"client-{index}.pem",
        key=spec.pki / f"client-{index}.key",
        ca=spec.pki / "ca.pem",
        federation=FederationParams.load(spec.federation),
        private_key=spec.private_key if index < spec.key_holders else None,
        server_hostname="localhost",
        min_key_bits=1024,
        encryption_pool=False,
        backoff_base=0.1,
        backoff_max=0.5,
    )
    return Client(
        mlp(64, hidden=HIDDEN), make_train_fn(x, y, TrainConfig(seed=index)), None, config
    )
