"""`fedcore demo`: a whole federation on this machine, over real mutual TLS on 127.0.0.1.

Makes a Paillier keypair and the federation PKI in a work directory, runs the aggregator
in this process and every client in its own process (as on real edge machines), with
``relays`` relays in between (each in its own process; key holders still connect to the
root, the other clients round-robin to the relays), trains
the seed MLP shape on a built-in dataset, and prints one progress line per round with
the global model's test accuracy and the phase times. ``encrypted=False`` runs the same
federation with float32 updates, for comparison.

Local training follows `DEMO_TRAINING`, one row per dataset (each explicit option
overrides its field). Epochs and learning rate travel from the aggregator to every
client in each RoundStart, as in a real federation; batch size and momentum are the
clients' own. Lines on stdout are the run's results; lines on stderr say what it is
doing meanwhile (key generation, clients starting and joining, each round's phase).

Every child process leaves the terminal's process group, so a Ctrl-C reaches this
process only: `Demo.request_stop` then ends the run at the next step (the aggregator
abandons the round in flight) and stops the children, each with its own workers;
`Demo.kill` kills them at once. Heavy imports (torch, the aggregator) wait until they
are needed, so the first line comes at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import math
import multiprocessing
import os
import queue as queue_module
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.data import client_shard, default_dataset_name, load_dataset

if TYPE_CHECKING:
    from fedcore.aggregator import Aggregator, AggregatorConfig, RoundReport
    from fedcore.training import TrainConfig

__all__ = ["DEMO_TRAINING", "Demo", "DemoOptions", "DemoTraining", "run_demo"]

log = logging.getLogger(__name__)

# How long clients get to leave by themselves once the federation is complete. They
# have nothing left to do: one still finishing a batch of random factors (seconds at
# 2048 bits) before it exits is killed instead.
_CLIENT_EXIT_SECONDS = 2.0
_PROGRESS_POLL_SECONDS = 0.2


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoTraining:
    """Local SGD of the demo's clients: epochs and learning rate (sent by the aggregator
    in every RoundStart), mini-batch size and momentum (the clients' own)."""

    local_epochs: int
    learning_rate: float
    batch_size: int
    momentum: float

    def __post_init__(self) -> None:
        _check_training(
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            momentum=self.momentum,
        )


def _check_training(
    *,
    local_epochs: int | None,
    learning_rate: float | None,
    batch_size: int | None,
    momentum: float | None,
) -> None:
    """ValueError naming the first training setting out of range (None: not given)."""
    for name, value in (("local_epochs", local_epochs), ("batch_size", batch_size)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
    if learning_rate is not None and not (
        isinstance(learning_rate, int | float)
        and math.isfinite(learning_rate)
        and learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be a finite number > 0; got {learning_rate!r}")
    if momentum is not None and not (isinstance(momentum, int | float) and 0.0 <= momentum < 1.0):
        raise ValueError(f"momentum must be in [0, 1); got {momentum!r}")


# Chosen so that the default runs converge, encrypted, within their rounds (IID shards).
# digits, 4 clients x 8 rounds: ~360 samples a client, so a round must be more than the
# 6 steps of 1 epoch of batch 64 (87.5%, the old one-size default); these reach > 95%.
# Fashion-MNIST, 10 clients x 10 rounds: 1 epoch of batch 64 at lr 0.05 ended at ~86%;
# several epochs of large batches reach > 88% for about 5 s more a round (large batches
# cost less per epoch). Measured figures: the issue #14 report.
DEMO_TRAINING: Mapping[str, DemoTraining] = MappingProxyType(
    {
        "digits": DemoTraining(local_epochs=5, learning_rate=0.1, batch_size=32, momentum=0.9),
        "fashion-mnist": DemoTraining(
            local_epochs=8, learning_rate=0.1, batch_size=256, momentum=0.9
        ),
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoOptions:
    """Knobs of the demo federation; the defaults are the README's main job.

    ``local_epochs``, ``learning_rate``, ``batch_size`` and ``momentum`` left at None
    take the dataset's row of `DEMO_TRAINING`.
    """

    clients: int = 10
    rounds: int = 10
    dataset: str | None = None
    key_bits: int = 2048
    encrypted: bool = True
    json_path: Path | None = None
    partition: str = "iid"
    seed: int = 0
    workdir: Path | None = None
    value_bits: int = 8
    committee_size: int = 3
    key_mode: str = "shared"
    threshold: int = 3
    parties: int = 5
    round_timeout: float = 900.0
    relays: int = 0
    quiet: bool = False
    local_epochs: int | None = None
    learning_rate: float | None = None
    batch_size: int | None = None
    momentum: float | None = None

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
        _check_training(
            local_epochs=self.local_epochs,
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            momentum=self.momentum,
        )

    @property
    def committee_members(self) -> int:
        """How many demo clients hold key material (the whole key, or one share each)."""
        if self.key_mode == "threshold":
            return self.parties
        return min(self.committee_size, self.clients)

    def training(self, dataset_name: str) -> DemoTraining:
        """The local training of a run on ``dataset_name``: its table row, then the overrides."""
        try:
            row = DEMO_TRAINING[dataset_name]
        except KeyError:
            raise ValueError(
                f"no demo training settings for dataset {dataset_name!r}; "
                f"known: {', '.join(DEMO_TRAINING)}"
            ) from None
        given: dict[str, Any] = {
            "local_epochs": self.local_epochs,
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "momentum": self.momentum,
        }
        return replace(row, **{name: value for name, value in given.items() if value is not None})


def _aggregator_config(
    options: DemoOptions, training: DemoTraining, dataset: Any, workdir: Path
) -> AggregatorConfig:
    """The demo aggregator's settings: every client, each round, ``training``'s epochs and lr."""
    from fedcore.aggregator import AggregatorConfig

    keys, pki = workdir / "keys", workdir / "pki"
    return AggregatorConfig(
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
        local_epochs=training.local_epochs,
        learning_rate=training.learning_rate,
    )


def _client_train_config(options: DemoOptions, training: DemoTraining, index: int) -> TrainConfig:
    """Client ``index``'s local SGD (epochs and lr are overridden by each RoundStart's)."""
    from fedcore.training import TrainConfig

    return TrainConfig(
        epochs=training.local_epochs,
        lr=training.learning_rate,
        batch_size=training.batch_size,
        momentum=training.momentum,
        seed=options.seed + index,
    )


def _own_process_group() -> None:
    """Leave the terminal's process group (a child's first step).

    A Ctrl-C goes to the terminal's whole foreground group; the demo's parent handles
    it and stops this process together with the workers it starts (they join this
    group). SIGINT stays blocked, as the parent started us (see `_start_child`).
    """
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def _client_process(
    index: int,
    options: DemoOptions,
    training: DemoTraining,
    dataset_name: str,
    port: int,
    pki: str,
    federation: str,
    key_file: str | None,
) -> None:
    """One demo client, in its own process: shard, model, train, upload, until done."""
    _own_process_group()
    import torch

    from fedcore.client import Client, ClientConfig
    from fedcore.model import mlp
    from fedcore.training import make_train_fn, train_local

    logging.basicConfig(level=logging.WARNING, format=f"client-{index} %(levelname)s %(message)s")
    # The parent reports what happens to the aggregator; "said goodbye, retrying" from
    # every client when it stops would only repeat it.
    logging.getLogger("fedcore.client.reconnect").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    dataset = load_dataset(dataset_name)
    x, y = client_shard(
        dataset, index, options.clients, scheme=options.partition, seed=options.seed
    )
    model = mlp(dataset.num_features, classes=dataset.num_classes)
    train_config = _client_train_config(options, training, index)
    # Warm up before joining: one step on a copy, so the first round does not pay for
    # torch's lazy set-up while the others wait.
    warm = slice(0, training.batch_size)
    train_local(copy.deepcopy(model), x[warm], y[warm], replace(train_config, epochs=1))
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
    Client(model, make_train_fn(x, y, train_config), None, config).run_forever(f"127.0.0.1:{port}")


def _relay_process(index: int, root_port: int, pki: str, federation: str, ports: Any) -> None:
    """One demo relay, in its own process: forwards its clients' sum to the root."""
    _own_process_group()
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


def _start_child(process: Any) -> None:
    """Start a child process with SIGINT blocked: it inherits the mask and keeps it.

    A Ctrl-C goes to the terminal's whole foreground group: before the child leaves it,
    one would print a traceback from the middle of its imports. A Ctrl-C that comes
    here meanwhile stays pending, and is handled once the mask is restored. (Starting
    multiprocessing's resource tracker unblocks SIGINT: `_start_resource_tracker` first.)
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker now, told not to warn about leaks.

    A client killed on a stop leaves its queues' semaphores behind; the tracker removes
    them once this process exits, and would print a warning that they leaked: expected
    here, and cleaned up all the same. Started before any child,
    it does not undo `_start_child`'s mask (it unblocks SIGINT after it starts).
    """
    from multiprocessing import resource_tracker

    option = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(option)  # the tracker is started with this process's -W options
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(option)


def _kill_child(process: Any) -> None:
    """SIGKILL a child's process group: the child and any worker it started.

    A child that has not made its own group yet has no worker either: it is killed alone.
    """
    pid = process.pid
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        if process.exitcode is None:  # alive and not reaped: the pid is still its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    except PermissionError:
        pass


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / total)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _quiet(*args: Any, **kwargs: Any) -> None:
    """Print nothing (``quiet`` runs)."""


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Demo:
    """One run of the demo federation: `run` it; `request_stop` and `kill` are for a
    signal handler (safe to call from one, in this process's main thread)."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self._out: Callable[..., None] = _quiet if options.quiet else print
        self._progress: Callable[[str], None] = _quiet if options.quiet else _to_stderr
        self._processes: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aggregator: Aggregator | None = None
        self._running = False  # the aggregator's event loop is up
        self._stopping = False
        # when the last round ended (or the first began): each round's time runs from it
        self._round_clock = time.perf_counter()

    # ------------------------------------------------------------------ control
    def request_stop(self) -> bool:
        """Stop at the next step: abandon the round in flight, then stop every child.

        False before the federation runs (while keys are made, say): there is nothing
        to stop gracefully yet, so the caller should interrupt instead.
        """
        if self._stopping:
            return True
        loop, aggregator = self._loop, self._aggregator
        if loop is None or aggregator is None:
            return False
        self._stopping = True
        if self._running:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(aggregator.request_stop)
        return True

    def kill(self) -> None:
        """Kill every child process (and its workers) now, without waiting."""
        for process in self._processes:
            _kill_child(process)

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """Run the demo federation end to end; returns (and optionally writes) the summary."""
        options = self.options
        dataset_name = options.dataset or default_dataset_name()
        training = options.training(dataset_name)
        mode = "PLAINTEXT (no encryption)"
        if options.encrypted and options.key_mode == "threshold":
            mode = (
                f"ENCRYPTED (packed Paillier, {options.threshold}-of-{options.parties} "
                "threshold key)"
            )
        elif options.encrypted:
            mode = "ENCRYPTED (packed Paillier)"
        if options.dataset is not None:
            why = "chosen"
        elif dataset_name == "fashion-mnist":
            why = "default: Fashion-MNIST is installed"
        else:
            why = "default: Fashion-MNIST is not installed, so digits"
        self._out(
            f"fedcore demo: {options.clients} clients x {options.rounds} rounds on "
            f"{dataset_name} ({why}), {mode}, {options.key_bits}-bit key, mutual TLS on "
            "127.0.0.1",
            flush=True,
        )
        given = [
            name
            for name in ("local_epochs", "learning_rate", "batch_size", "momentum")
            if getattr(options, name) is not None
        ]
        source = f"{', '.join(given)} as given, the rest " if given else ""
        epochs = training.local_epochs
        self._out(
            f"  local training: {epochs} epoch{'s' * (epochs != 1)} a round, lr "
            f"{training.learning_rate:g}, batch {training.batch_size}, momentum "
            f"{training.momentum:g} ({source}{dataset_name} defaults)",
            flush=True,
        )
        tmp = None
        if options.workdir is None:
            tmp = tempfile.mkdtemp(prefix="fedcore-demo-")
            workdir = Path(tmp)
        else:
            workdir = options.workdir
            workdir.mkdir(parents=True, exist_ok=True)
        try:
            return self._run(dataset_name, training, workdir)
        finally:
            self._stop_children()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _make_keys(self, keys: Path) -> list[Path]:
        """Write the federation's key files; the key file of each committee client, in order."""
        from fedcore.crypto import deal, generate_keypair
        from fedcore.crypto.threshold import save_key_files

        options = self.options
        if options.key_mode == "threshold":
            self._progress(
                f"  dealing a {options.key_bits}-bit {options.threshold}-of-{options.parties} "
                "threshold key (two safe primes: can take a minute)..."
            )
            public, shares = deal(options.key_bits, options.threshold, options.parties)
            return save_key_files(public, shares, keys)[1]
        self._progress(f"  making a {options.key_bits}-bit Paillier key...")
        public_key, private_key = generate_keypair(options.key_bits)
        public_key.save(keys / "public_key.json")
        private_key.save(keys / "private_key.json")
        return [keys / "private_key.json"] * options.committee_members

    def _run(self, dataset_name: str, training: DemoTraining, workdir: Path) -> dict[str, Any]:
        options, out, progress = self.options, self._out, self._progress
        progress(f"  loading {dataset_name} and torch...")
        from fedcore.aggregator import Aggregator
        from fedcore.model import load_flat_into, mlp
        from fedcore.training import evaluate
        from protocol.tls import write_federation_pki
        from protocol.transport import install_uvloop, tune_allocator

        dataset = load_dataset(dataset_name)
        keys, pki = workdir / "keys", workdir / "pki"
        t0 = time.perf_counter()
        keys.mkdir(parents=True, exist_ok=True)
        key_files = self._make_keys(keys)
        progress("  writing the federation's CA and certificates...")
        write_federation_pki(
            pki, clients=options.clients, relays=options.relays, sans=["localhost", "127.0.0.1"]
        )
        out(
            f"  keys and certificates ready in {time.perf_counter() - t0:.1f} s ({workdir})",
            flush=True,
        )

        config = _aggregator_config(options, training, dataset, workdir)
        federation_file = workdir / "federation.json"
        config.federation(config.load_public_key() if options.encrypted else None).save(
            federation_file
        )
        test_model = mlp(dataset.num_features, classes=dataset.num_classes)
        accuracies: list[float] = []
        round_seconds: list[float] = []
        bytes_uploaded = 0

        def on_round(report: RoundReport, weights: np.ndarray) -> None:
            nonlocal bytes_uploaded
            load_flat_into(test_model, weights)
            accuracy = evaluate(test_model, dataset.x_test, dataset.y_test)["accuracy"]
            accuracies.append(accuracy)
            now = time.perf_counter()
            round_seconds.append(now - self._round_clock)
            self._round_clock = now
            bytes_uploaded += report.bytes_received
            phases = " ".join(f"{k} {v:.1f}s" for k, v in report.phase_seconds.items() if v >= 0.05)
            client_side = " ".join(
                f"{k.removesuffix('_s')} {v:.1f}s" if k.endswith("_s") else f"{k} {v:.0%}"
                for k, v in report.client_timings.items()
            )
            per_client = report.bytes_received / max(1, len(report.contributors)) / 1e6
            out(
                f"  round {report.rounds_completed:>2}/{options.rounds} "
                f"{_bar(report.rounds_completed, options.rounds)} "
                f"acc {100 * accuracy:5.2f}%  {round_seconds[-1]:5.1f}s  "
                f"[aggregator: {phases}] [client avg: {client_side}] "
                f"{per_client:.2f} MB/client",
                flush=True,
            )

        progress("  starting the aggregator...")
        aggregator = Aggregator(config, encrypted=options.encrypted, on_round_complete=on_round)
        self._aggregator = aggregator
        ctx = multiprocessing.get_context("spawn")
        _start_resource_tracker()

        async def start_relays(root_port: int) -> list[int]:
            """Start the relays (each joins the root first); their client ports, in order."""
            if not options.relays:
                return []
            progress(f"  starting {options.relays} relay processes...")
            queue = ctx.Queue()
            relays = []
            for index in range(options.relays):
                process = ctx.Process(
                    target=_relay_process,
                    args=(index, root_port, str(pki), str(federation_file), queue),
                    daemon=False,
                )
                _start_child(process)
                self._processes.append(process)
                relays.append(process)
            ports: dict[int, int] = {}
            deadline = time.monotonic() + 120
            while len(ports) < options.relays and not self._stopping:
                if time.monotonic() > deadline or not all(p.is_alive() for p in relays):
                    raise RuntimeError("a demo relay did not start; see its log above")
                with contextlib.suppress(queue_module.Empty):
                    index, port = await asyncio.to_thread(queue.get, True, 0.5)
                    ports[index] = port
            if self._stopping:
                return []
            out(
                f"  {options.relays} relays joined the aggregator; clients split over them",
                flush=True,
            )
            return [ports[i] for i in range(options.relays)]

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._running = True
            task = asyncio.create_task(aggregator.run())
            started = asyncio.create_task(aggregator.wait_started())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            if not started.done():  # the aggregator failed before it listened
                started.cancel()
                await task
                return
            out(
                f"  aggregator on 127.0.0.1:{aggregator.port}, metrics on "
                f"http://127.0.0.1:{aggregator.metrics_port}/metrics",
                flush=True,
            )
            relay_ports = await start_relays(aggregator.port)
            if not self._stopping:
                progress(
                    f"  starting {options.clients} client processes (each loads torch and "
                    "its shard, then joins)..."
                )
            for index in range(options.clients):
                if self._stopping:
                    break
                holder = str(key_files[index]) if index < len(key_files) else None
                port = aggregator.port  # key holders talk to the root, never through a relay
                if holder is None and relay_ports:
                    port = relay_ports[(index - len(key_files)) % len(relay_ports)]
                process = ctx.Process(
                    target=_client_process,
                    args=(
                        index,
                        options,
                        training,
                        dataset_name,
                        port,
                        str(pki),
                        str(federation_file),
                        holder,
                    ),
                    daemon=False,  # a client starts its own random-factor worker
                )
                _start_child(process)
                self._processes.append(process)
            reporter = asyncio.create_task(self._report_progress(aggregator))
            try:
                await task
            finally:
                reporter.cancel()

        started = time.perf_counter()
        try:
            tune_allocator()
            install_uvloop()
            asyncio.run(main())
        finally:
            self._running = False
        total = time.perf_counter() - started
        rounds_completed = aggregator.checkpoint.rounds_completed
        summary = {
            "dataset": dataset_name,
            "clients": options.clients,
            "relays": options.relays,
            "rounds": options.rounds,
            "rounds_completed": rounds_completed,
            "interrupted": self._stopping,
            "encrypted": options.encrypted,
            "key_mode": options.key_mode if options.encrypted else None,
            "threshold": f"{options.threshold}-of-{options.parties}"
            if options.encrypted and options.key_mode == "threshold"
            else None,
            "key_bits": options.key_bits if options.encrypted else None,
            "value_bits": options.value_bits if options.encrypted else None,
            "partition": options.partition,
            "training": asdict(training),
            "final_accuracy": accuracies[-1] if accuracies else None,
            "accuracy_per_round": accuracies,
            "round_seconds": round_seconds,
            "bytes_uploaded": bytes_uploaded,
            "total_seconds": total,
        }
        final = accuracies[-1] if accuracies else None
        out(
            f"{'stopped' if self._stopping else 'done'}: {rounds_completed}/{options.rounds} "
            f"rounds in {total:.1f} s, final test accuracy "
            f"{'n/a' if final is None else f'{100 * final:.2f}%'}, "
            f"mean round {np.mean(round_seconds) if round_seconds else float('nan'):.1f} s, "
            f"{bytes_uploaded / 1e6:.1f} MB uploaded in all",
            flush=True,
        )
        if options.json_path is not None:
            options.json_path.parent.mkdir(parents=True, exist_ok=True)
            options.json_path.write_text(json.dumps(summary, indent=2) + "\n")
            out(f"  summary written to {options.json_path}", flush=True)
        sys.stdout.flush()
        return summary

    async def _report_progress(self, aggregator: Aggregator) -> None:
        """A stderr line whenever clients join (before round 1) or a round changes phase."""
        from fedcore.aggregator.rounds import RoundPhase

        options = self.options
        joined_shown, joined_at = -1, 0.0
        phase_shown: tuple[int, RoundPhase] | None = None
        while True:
            state = aggregator.round
            number = aggregator.checkpoint.rounds_completed + 1
            if state is None and phase_shown is None:
                joined = aggregator.hub.leaf_count
                now = time.monotonic()
                if joined != joined_shown and (now - joined_at >= 1.0 or joined >= options.clients):
                    self._progress(f"  waiting for clients: {joined}/{options.clients} joined")
                    joined_shown, joined_at = joined, now
            elif state is not None and (state.round_id, state.phase) != phase_shown:
                if phase_shown is None:  # round 1's time starts now, not at the first spawn
                    self._round_clock = time.perf_counter()
                    if aggregator.hub.leaf_count != joined_shown:
                        joined = aggregator.hub.leaf_count
                        self._progress(f"  waiting for clients: {joined}/{options.clients} joined")
                phase_shown = (state.round_id, state.phase)
                if state.phase is RoundPhase.COLLECTING:
                    self._progress(
                        f"  round {number}/{options.rounds}: clients training, "
                        f"{'encrypting, ' if options.encrypted else ''}uploading..."
                    )
                elif state.phase is RoundPhase.DECRYPTING and options.encrypted:
                    self._progress(
                        f"  round {number}/{options.rounds}: {len(state.folded)} updates "
                        "summed, committee decrypting..."
                    )
            await asyncio.sleep(_PROGRESS_POLL_SECONDS)

    def _stop_children(self) -> None:
        """After a complete run, let the clients leave by themselves; else kill them now.

        A stopped client has nothing to save (the aggregator holds the checkpoint), and
        killing its process group takes its random-factor worker too, at once; the
        resource tracker removes the semaphores they leave (`_start_resource_tracker`).
        """
        aggregator = self._aggregator
        complete = (
            aggregator is not None and aggregator.checkpoint.rounds_completed >= self.options.rounds
        )
        deadline = time.monotonic() + (_CLIENT_EXIT_SECONDS if complete else 0.0)
        for process in self._processes:
            while process.is_alive() and not self._stopping and time.monotonic() < deadline:
                process.join(timeout=0.2)
        for process in self._processes:
            _kill_child(process)  # its group too: no worker outlives its client
        for process in self._processes:
            process.join(timeout=1.0)


def run_demo(options: DemoOptions) -> dict[str, Any]:
    """Run the demo federation end to end; returns (and optionally writes) the summary."""
    return Demo(options).run()
