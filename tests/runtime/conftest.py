"""Shared parts for runtime tests: a PKI made by `fedcore certs`, a real Paillier keypair,
the digits data, and helpers that run an aggregator and clients over TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedcore.aggregator import Aggregator, AggregatorConfig
from fedcore.cli import main as fedcore_main
from fedcore.client import Client, ClientConfig, ClientResult
from fedcore.contracts import FederationParams
from fedcore.data import Dataset, client_shard, load_digits
from fedcore.model import load_flat_into, mlp
from fedcore.training import TrainConfig, evaluate, make_train_fn

CLIENTS_IN_PKI = 12
RELAYS_IN_PKI = 3


@dataclass(frozen=True)
class Keys:
    public: Path
    private: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    argv = ["certs", "--out", str(out), "--clients", str(CLIENTS_IN_PKI)]
    assert fedcore_main([*argv, "--relays", str(RELAYS_IN_PKI)]) == 0
    return out


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    out = tmp_path_factory.mktemp("keys")
    assert fedcore_main(["keygen", "--bits", "1024", "--out", str(out)]) == 0
    return Keys(public=out / "public_key.json", private=out / "private_key.json")


@dataclass(frozen=True)
class ThresholdKeys:
    public: Path
    shares: tuple[Path, ...]


@pytest.fixture(scope="session")
def threshold_keys(tmp_path_factory: pytest.TempPathFactory) -> ThresholdKeys:
    """A 1024-bit 3-of-5 threshold key made by `fedcore keygen --threshold`."""
    out = tmp_path_factory.mktemp("threshold-keys")
    argv = ["keygen", "--bits", "1024", "--threshold", "3", "--parties", "5", "--out", str(out)]
    assert fedcore_main(argv) == 0
    return ThresholdKeys(
        public=out / "public_key.json",
        shares=tuple(out / f"share-{i}.json" for i in range(1, 6)),
    )


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_digits()


def aggregator_argv(pki: Path, keys: Keys, state_dir: Path) -> list[str]:
    """`fedcore aggregator` arguments for this PKI, public key and state directory."""
    return [
        "aggregator",
        "--public-key",
        str(keys.public),
        "--cert",
        str(pki / "aggregator.pem"),
        "--key",
        str(pki / "aggregator.key"),
        "--ca",
        str(pki / "ca.pem"),
        "--state-dir",
        str(state_dir),
    ]


def aggregator_config(tmp_path: Path, pki: Path, keys: Keys, **changes: Any) -> AggregatorConfig:
    """A small, fast aggregator on an ephemeral port, digits-sized seed MLP."""
    values: dict[str, Any] = {
        "public_key": keys.public,
        "cert": pki / "aggregator.pem",
        "key": pki / "aggregator.key",
        "ca": pki / "ca.pem",
        "state_dir": tmp_path / "state",
        "min_key_bits": 1024,  # the test key; real federations keep the 2048-bit floor
        "port": 0,
        "metrics_port": None,
        "model": "fedcore.model:mlp",
        "model_kwargs": {"in_features": 64},
        "min_clients": 3,
        "clients_per_round": 4,
        "rounds": 3,
        "round_timeout": 60.0,
        "wait_for_clients_timeout": 60.0,
        "committee_size": 2,
        "local_epochs": 2,
        "learning_rate": 0.05,
        "resume_grace": 0.0,
        "seed": 0,
    }
    values.update(changes)
    return AggregatorConfig.from_mapping(values)


def make_client(
    index: int,
    pki: Path,
    keys: Keys,
    data: Dataset,
    num_clients: int,
    *,
    federation: FederationParams,
    holds_key: bool = True,
    hidden: Sequence[int] = (512, 256),
    train_wrapper: Callable[[Callable[..., int]], Callable[..., int]] | None = None,
    **config: Any,
) -> Client:
    """A real client of the digits federation, shard ``index`` of ``num_clients``.

    ``federation`` is what the client pins (normally ``aggregator.federation``).
    """
    x, y = client_shard(data, index, num_clients, seed=0)
    torch.manual_seed(index)
    train_fn: Callable[..., int] = make_train_fn(x, y, TrainConfig(seed=index))
    if train_wrapper is not None:
        train_fn = train_wrapper(train_fn)
    settings: dict[str, Any] = {
        "cert": pki / f"client-{index}.pem",
        "key": pki / f"client-{index}.key",
        "ca": pki / "ca.pem",
        "federation": federation,
        "private_key": keys.private if holds_key else None,
        "server_hostname": "localhost",
        "min_key_bits": 1024,
        "encryption_pool": False,  # a 1024-bit test key encrypts fast enough in-process
        "backoff_base": 0.1,
        "backoff_max": 0.5,
    }
    settings.update(config)
    return Client(mlp(64, hidden=hidden), train_fn, None, ClientConfig(**settings))


def weight_of(index: int, data: Dataset, num_clients: int, federation: FederationParams) -> int:
    """The FedAvg weight client ``index`` gives itself (from its shard's sample count)."""
    x, _ = client_shard(data, index, num_clients, seed=0)
    return federation.weight_for(len(x))


async def run_federation(
    aggregator: Aggregator, clients: Sequence[Client], *, timeout: float = 240.0
) -> tuple[Any, list[ClientResult | BaseException]]:
    """Run the aggregator and the clients until the federation ends; return both results."""
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    client_tasks = [asyncio.create_task(c.run(f"127.0.0.1:{aggregator.port}")) for c in clients]
    try:
        checkpoint = await asyncio.wait_for(task, timeout)
        results = await asyncio.wait_for(asyncio.gather(*client_tasks, return_exceptions=True), 30)
    finally:
        for t in client_tasks:
            t.cancel()
    return checkpoint, list(results)


def accuracy_of(weights: np.ndarray, data: Dataset, *, hidden: Sequence[int] = (512, 256)) -> float:
    model = mlp(64, hidden=hidden)
    load_flat_into(model, weights)
    return evaluate(model, data.x_test, data.y_test)["accuracy"]
