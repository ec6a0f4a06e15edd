"""Run a whole federation on this machine for the benchmarks, and record every round.

Makes the keys and the mutual-TLS PKI in a work directory, runs the aggregator in this
process's event loop, writes the federation file its settings define (what every client
pins), and runs the clients either as asyncio tasks in the same loop
(``processes=False``: cheap to start, but client CPU work shares this process's GIL) or
as spawned, non-daemonic processes (``processes=True``: one process per client, as on
real edge machines, so client CPU work runs on every core and each client can start its
`EncryptionPool` worker). Each finished round becomes a `RoundRecord` built from the
aggregator's `RoundReport`, which also says what the privacy checks cost that round
(``check_seconds``: the aggregator's token checks and the committee members' own decrypt
and unmask seconds; ``member_decrypt_seconds``: each member's own (partial-)decryption
seconds; ``client_timings["mask_s"]``: the contributors' mean masking seconds).
`deal_key_shares` turns the credentials into a T-of-N threshold federation's: a dealt
threshold public key (the aggregator then runs in threshold mode) and one key share per
committee client (`ClientSpec.key_share`), nobody holding the whole private key.
Every figure is one fedcore reports itself; nothing of fedcore is wrapped or patched.
This module measures; it never asserts timings and knows nothing of report formats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.aggregator import Aggregator, AggregatorConfig, RoundReport, build_model
from fedcore.client import Client, ClientConfig, ClientResult
from fedcore.crypto import deal, generate_keypair
from fedcore.crypto.keys import MIN_SECURE_KEY_BITS
from fedcore.crypto.threshold import save_key_files
from fedcore.data import Dataset, client_shard, load_dataset
from fedcore.training import TrainConfig, make_train_fn, train_local
from protocol.tls import write_federation_pki

__all__ = [
    "ClientSpec",
    "Credentials",
    "FederationResult",
    "RoundRecord",
    "aggregator_config",
    "cpu_seconds",
    "deal_key_shares",
    "make_credentials",
    "run_federation",
]

log = logging.getLogger(__name__)

# Generous: a 2048-bit committee of one decrypts a seed-MLP sum in about a minute on a
# loaded 2-core machine; the benchmark must measure that, not time out on it.
_ROUND_TIMEOUT_S = 3600.0
_DECRYPT_SHARD_TIMEOUT_S = 3600.0
_WAIT_FOR_CLIENTS_S = 600.0
_CHILD_JOIN_S = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Where a federation's Paillier keys and TLS certificates live.

    A threshold federation's ``public_key`` is the dealt threshold public key, it has no
    ``private_key`` and ``key_shares[i - 1]`` is the file of key share ``i``.
    """

    public_key: Path
    private_key: Path | None
    pki: Path
    key_bits: int
    clients: int
    key_shares: tuple[Path, ...] = ()

    @property
    def ca(self) -> Path:
        """The federation CA certificate."""
        return self.pki / "ca.pem"

    @property
    def min_key_bits(self) -> int:
        """The key floor to configure: 2048, or the smaller test key the smoke tests use."""
        return min(MIN_SECURE_KEY_BITS, self.key_bits)


def make_credentials(workdir: Path, *, clients: int, key_bits: int) -> Credentials:
    """A fresh keypair and PKI (CA, aggregator, ``clients`` client certs) under ``workdir``."""
    keys = workdir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    public_key, private_key = generate_keypair(key_bits)
    public_key.save(keys / "public_key.json")
    private_key.save(keys / "private_key.json")
    pki = workdir / "pki"
    write_federation_pki(pki, clients=clients, sans=["localhost", "127.0.0.1"])
    return Credentials(
        public_key=keys / "public_key.json",
        private_key=keys / "private_key.json",
        pki=pki,
        key_bits=key_bits,
        clients=clients,
    )


def deal_key_shares(
    credentials: Credentials, directory: Path, *, threshold: int, parties: int
) -> tuple[Credentials, float]:
    """Deal a ``threshold``-of-``parties`` key of the credentials' size into ``directory``.

    Returns the threshold federation's credentials (same PKI, the threshold public key,
    no private key, the share files in share order) and the seconds `deal` took.
    """
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    public, shares = deal(credentials.key_bits, threshold, parties)
    deal_s = time.perf_counter() - started
    public_path, paths = save_key_files(public, shares, directory)
    dealt = replace(credentials, public_key=public_path, private_key=None, key_shares=tuple(paths))
    return dealt, deal_s


def aggregator_config(
    credentials: Credentials, state_dir: Path, **settings: Any
) -> AggregatorConfig:
    """An aggregator on an ephemeral loopback port, no metrics server, benchmark timeouts.

    ``settings`` are `AggregatorConfig` fields (``model_kwargs``, ``rounds``, ...). The
    key floor follows the credentials (512-bit smoke-test keys are accepted only there).
    """
    values: dict[str, Any] = {
        "public_key": credentials.public_key,
        "cert": credentials.pki / "aggregator.pem",
        "key": credentials.pki / "aggregator.key",
        "ca": credentials.ca,
        "state_dir": state_dir,
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": None,
        "round_timeout": _ROUND_TIMEOUT_S,
        "decrypt_shard_timeout": _DECRYPT_SHARD_TIMEOUT_S,
        "wait_for_clients_timeout": _WAIT_FOR_CLIENTS_S,
        "resume_grace": 0.0,
        "min_key_bits": credentials.min_key_bits,
    }
    values.update(settings)
    return AggregatorConfig.from_mapping(values)


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientSpec:
    """Everything needed to build one benchmark client (picklable, for spawned processes).

    ``model`` and ``model_kwargs`` name the model factory as `AggregatorConfig` does
    (give both the same); empty ``model_kwargs`` means the dataset's features and classes.
    """

    index: int
    clients: int
    dataset: str
    train: TrainConfig
    holds_key: bool
    scheme: str = "iid"
    alpha: float = 0.5
    partition_seed: int = 0
    max_samples: int | None = None
    decrypt_workers: int = 1
    encryption_pool: bool = True
    key_share: int | None = None  # threshold federations: this client's share index (1..N)
    model: str = "fedcore.model:mlp"
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def shard(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """This client's training data: its partition, cut to ``max_samples`` (seeded)."""
        x, y = client_shard(
            dataset,
            self.index,
            self.clients,
            scheme=self.scheme,
            alpha=self.alpha,
            seed=self.partition_seed,
        )
        if self.max_samples is not None and len(x) > self.max_samples:
            rng = np.random.default_rng([self.partition_seed, self.index])
            rows = np.sort(rng.choice(len(x), self.max_samples, replace=False))
            x, y = x[rows], y[rows]
        return x, y


def build_client(
    spec: ClientSpec, credentials: Credentials, dataset: Dataset, federation: Path
) -> Client:
    """A real `fedcore.Client` of ``spec``'s model for ``dataset``, pinning ``federation``."""
    x, y = spec.shard(dataset)
    share = None if spec.key_share is None else credentials.key_shares[spec.key_share - 1]
    config = ClientConfig(
        cert=credentials.pki / f"client-{spec.index}.pem",
        key=credentials.pki / f"client-{spec.index}.key",
        ca=credentials.ca,
        federation=federation,
        public_key=credentials.public_key,
        private_key=credentials.private_key if spec.holds_key and share is None else None,
        key_share=share,
        server_hostname="localhost",
        min_key_bits=credentials.min_key_bits,
        decrypt_workers=spec.decrypt_workers,
        encryption_pool=spec.encryption_pool,
        backoff_base=0.2,
        backoff_max=2.0,
        idle_timeout=_ROUND_TIMEOUT_S,
    )
    kwargs = spec.model_kwargs or {
        "in_features": dataset.num_features,
        "classes": dataset.num_classes,
    }
    # the aggregator's own factory loader; the client's initial weights are replaced by
    # the global model before it trains
    model = build_model(spec.model, kwargs, seed=spec.index)
    return Client(model, make_train_fn(x, y, spec.train), None, config)


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (or its reaped children)."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------- results
@dataclass(slots=True, kw_only=True)
class RoundRecord:
    """One finished round, as the aggregator saw it (seconds, bytes, mean client timings).

    ``check_seconds`` is the report's own: ``token_check`` (the aggregator checking this
    round's contributor tokens) and, in an encrypted round, ``member_decrypt`` and
    ``member_unmask`` (the seconds the committee members reported, summed over shards;
    their token-set checks are inside them). ``client_timings["mask_s"]`` is the
    contributors' mean seconds deriving and adding their one-time masks.
    ``member_decrypt_seconds`` is the report's own too: the seconds each committee member
    (by client id) reported decrypting, or partially decrypting, this round's shards.
    """

    round: int
    round_id: int
    phase_seconds: dict[str, float]
    client_timings: dict[str, float]
    fold_s: float
    bytes_received: int
    contributors: int
    total_weight: int
    check_seconds: dict[str, float] = field(default_factory=dict)
    member_decrypt_seconds: dict[str, float] = field(default_factory=dict)
    accuracy: float | None = None

    @property
    def round_s(self) -> float:
        """Wall time of the round: the sum of the aggregator's phases."""
        return float(sum(self.phase_seconds.values()))

    def to_json(self) -> dict[str, Any]:
        """Plain values for the JSON result."""
        return {**asdict(self), "round_s": self.round_s}


@dataclass(slots=True, kw_only=True)
class FederationResult:
    """What a benchmark federation did: per-round records, CPU, bytes, the final model."""

    rounds: list[RoundRecord]
    final_weights: np.ndarray
    wall_s: float
    cpu_s_aggregator_process: float
    cpu_s_clients: float | None
    client_results: list[dict[str, Any]] = field(default_factory=list)
    federation: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_s(self) -> float:
        """Every CPU second the federation used (aggregator process + client processes)."""
        return self.cpu_s_aggregator_process + (self.cpu_s_clients or 0.0)


def _client_process(
    spec: ClientSpec, credentials: Credentials, federation: Path, port: int, out: str
) -> None:
    """One client in its own process; writes its result and CPU seconds as JSON.

    CPU counts this process and its reaped children: the `EncryptionPool` worker (joined
    when the client stops) and any decryption workers.
    """
    import torch

    logging.basicConfig(level=logging.WARNING, format=f"client-{spec.index} %(message)s")
    torch.set_num_threads(1)
    dataset = load_dataset(spec.dataset)
    client = build_client(spec, credentials, dataset, federation)
    _warm_up(client.model, dataset)
    # count the federation, not imports and data loading
    own, children = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    result = client.run_forever(f"127.0.0.1:{port}")
    own, children = cpu_seconds() - own, cpu_seconds(resource.RUSAGE_CHILDREN) - children
    record = {
        **_client_result_json(result),
        "cpu_s": own + children,
        "cpu_s_children": children,
    }
    Path(out).write_text(json.dumps(record))


def _warm_up(model: Any, dataset: Dataset) -> None:
    """One training step on a throwaway copy, so torch's one-time set-up (lazy imports on
    the first optimizer step cost seconds) is not billed to the first round."""
    import copy

    train_local(
        copy.deepcopy(model),
        dataset.x_train[:8],
        dataset.y_train[:8],
        TrainConfig(epochs=1, batch_size=8),
    )


def _client_result_json(result: ClientResult) -> dict[str, Any]:
    return {
        "rounds_contributed": result.rounds_contributed,
        "rounds_refused": result.rounds_refused,
        "shards_decrypted": result.shards_decrypted,
        "shards_unmasked": result.shards_unmasked,
        "requests_refused": result.requests_refused,
        "bytes_uploaded": result.bytes_uploaded,
        "reconnects": result.reconnects,
    }


def _federation_summary(aggregator: Aggregator) -> dict[str, Any]:
    """The pinned parameters a reader needs to interpret the figures."""
    fed = aggregator.federation
    key = fed.threshold_key
    return {
        "digest": fed.digest().hex()[:16],
        "mode": fed.mode,
        "threshold": None if key is None else f"{key.threshold}-of-{key.parties}",
        "min_clients": fed.min_clients,
        "value_bits": fed.value_bits,
        "headroom_bits": fed.headroom_bits,
        "max_weight": fed.max_weight,
        "samples_per_weight": fed.samples_per_weight,
        "unmaskers": fed.unmaskers,
        "report_metrics": [name for name, _ in fed.report_metrics],
        "items_per_update": aggregator.codec.item_count,
    }


def run_federation(
    config: AggregatorConfig,
    specs: list[ClientSpec],
    credentials: Credentials,
    *,
    encrypted: bool,
    processes: bool,
    dataset: Dataset | None = None,
    evaluate: Callable[[np.ndarray], float] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> FederationResult:
    """Run the aggregator and ``specs`` clients until ``config.rounds`` rounds are done.

    ``evaluate(global_weights) -> accuracy`` is called after each round (its time is
    outside every phase); ``on_round`` sees each `RoundRecord` (for progress bars).
    In-process clients need ``dataset`` (already loaded); spawned ones load their own.
    """
    from protocol.transport import install_uvloop

    records: list[RoundRecord] = []
    workdir = Path(config.state_dir)
    workdir.mkdir(parents=True, exist_ok=True)

    def round_done(report: RoundReport, weights: np.ndarray) -> None:
        # The history entry also holds the checkpoint phase, timed after the report.
        history = aggregator.checkpoint.history
        phases = history[-1].get("phase_seconds") if history else None
        record = RoundRecord(
            round=report.rounds_completed,
            round_id=report.round_id,
            phase_seconds=dict(phases or report.phase_seconds),
            client_timings=dict(report.client_timings),
            fold_s=report.fold_seconds,
            bytes_received=report.bytes_received,
            contributors=len(report.contributors),
            total_weight=report.total_weight,
            check_seconds=dict(report.check_seconds),
            member_decrypt_seconds=dict(report.member_decrypt_seconds),
            accuracy=None if evaluate is None else float(evaluate(weights)),
        )
        records.append(record)
        if on_round is not None:
            on_round(record)

    aggregator = Aggregator(config, encrypted=encrypted, on_round_complete=round_done)
    federation_file = workdir / "federation.json"
    aggregator.federation.save(federation_file)
    in_process: list[Client] = []
    if not processes:
        if dataset is None:
            raise ValueError("in-process clients need the loaded dataset")
        in_process = [build_client(spec, credentials, dataset, federation_file) for spec in specs]
        if in_process:
            _warm_up(in_process[0].model, dataset)
    ctx = multiprocessing.get_context("spawn")
    children: list[Any] = []
    result_files = [workdir / f"client-{spec.index}.json" for spec in specs]
    client_outcomes: list[Any] = []

    async def main() -> None:
        task = asyncio.create_task(aggregator.run())
        await aggregator.wait_started()
        url = f"127.0.0.1:{aggregator.port}"
        if processes:
            for spec, out in zip(specs, result_files, strict=True):
                child = ctx.Process(
                    target=_client_process,
                    args=(spec, credentials, federation_file, aggregator.port, str(out)),
                    daemon=False,  # a daemonic process may not start the EncryptionPool worker
                )
                child.start()
                children.append(child)
            await task
            return
        client_tasks = [asyncio.create_task(client.run(url)) for client in in_process]
        try:
            await task
            client_outcomes.extend(
                await asyncio.wait_for(asyncio.gather(*client_tasks, return_exceptions=True), 60)
            )
        finally:
            for client_task in client_tasks:
                client_task.cancel()

    install_uvloop()
    cpu_self, cpu_children = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    try:
        asyncio.run(main())
    finally:
        for child in children:  # not daemonic: always joined or terminated here
            child.join(timeout=_CHILD_JOIN_S)
            if child.is_alive():
                child.terminate()
                child.join(timeout=10)
    wall_s = time.perf_counter() - started
    cpu_self = cpu_seconds() - cpu_self
    cpu_children = cpu_seconds(resource.RUSAGE_CHILDREN) - cpu_children
    client_results: list[dict[str, Any]] = []
    cpu_clients: float | None = None
    if processes:
        cpu_clients = 0.0
        for out in result_files:
            if out.exists():
                data = json.loads(out.read_text())
                cpu_clients += float(data.pop("cpu_s"))
                client_results.append(data)
        cpu_self_total = cpu_self
    else:
        for outcome in client_outcomes:
            if isinstance(outcome, ClientResult):
                client_results.append(_client_result_json(outcome))
            else:
                client_results.append({"error": repr(outcome)})
        # Pool and decryption workers of in-process clients are this process's children.
        cpu_self_total = cpu_self + cpu_children
    if aggregator.checkpoint.rounds_completed < config.rounds:
        raise RuntimeError(
            f"federation stopped after {aggregator.checkpoint.rounds_completed} of "
            f"{config.rounds} rounds"
        )
    return FederationResult(
        rounds=records,
        final_weights=np.asarray(aggregator.checkpoint.global_weights, dtype=np.float32),
        wall_s=wall_s,
        cpu_s_aggregator_process=cpu_self_total,
        cpu_s_clients=cpu_clients,
        client_results=client_results,
        federation=_federation_summary(aggregator),
    )
