"""`fedcore` command line: keygen, certs, aggregator, client, demo.

A thin layer: every command parses flags into the same dataclasses the library uses
(`AggregatorConfig`, `ClientConfig`) and calls the library. Prints go here, nowhere else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError, FedcoreError

__all__ = ["main"]

log = logging.getLogger("fedcore")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


# ---------------------------------------------------------------------------- keygen
def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.threshold is not None or args.parties is not None:
        return _keygen_threshold(args)
    from fedcore.crypto import generate_keypair

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    public_path, private_path = out / "public_key.json", out / "private_key.json"
    if not args.force and (public_path.exists() or private_path.exists()):
        raise ConfigError(f"{out} already holds a keypair (use --force to replace it)")
    t0 = time.perf_counter()
    public_key, private_key = generate_keypair(args.bits)
    public_key.save(public_path)
    private_key.save(private_path)
    print(f"{args.bits}-bit Paillier keypair in {time.perf_counter() - t0:.1f} s")
    print(f"  public key  {public_path}  (aggregator and clients)")
    print(f"  private key {private_path}  (0600; key-holding clients only, never the aggregator)")
    print(f"  SHA-256     {public_key.sha256()}  (clients pin this key)")
    return 0


class _DealBar:
    """A one-line progress bar on stderr for the dealer's steps (safe primes, keys)."""

    _STEPS = ("safe prime p", "safe prime q", "verification keys")

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self._tty = sys.stderr.isatty()

    def __call__(self, step: str, done: int, total: int) -> None:
        index = self._STEPS.index(step) if step in self._STEPS else 0
        fraction = (index + (done / total if total else 0.5)) / len(self._STEPS)
        filled = int(30 * fraction)
        detail = f"{done}/{total}" if total else f"{done:,} candidates"
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {step}: {detail} "
            f"({time.perf_counter() - self._t0:.1f} s)"
        )
        if self._tty:
            print(f"\r{line:<79}", end="", file=sys.stderr, flush=True)
        elif total and done == total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._tty:
            print(file=sys.stderr)


def _keygen_threshold(args: argparse.Namespace) -> int:
    from fedcore.crypto.threshold import deal, key_file_paths, save_key_files

    if args.threshold is None or args.parties is None:
        raise ConfigError("--threshold T and --parties N go together")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    public_path, share_paths = key_file_paths(out, args.parties)
    existing = [p for p in (public_path, *share_paths) if p.exists()]
    if existing and not args.force:
        raise ConfigError(f"{existing[0]} exists (use --force to replace it)")
    bar = _DealBar()
    t0 = time.perf_counter()
    try:
        public_key, shares = deal(args.bits, args.threshold, args.parties, progress=bar)
    except (TypeError, ValueError) as exc:
        bar.close()
        raise ConfigError(f"{exc} (--threshold, --parties)") from None
    bar.close()
    seconds = time.perf_counter() - t0
    save_key_files(public_key, shares, out)
    print(
        f"{args.bits}-bit {args.threshold}-of-{args.parties} threshold Paillier key "
        f"in {seconds:.1f} s"
    )
    print(f"  public key  {public_path}  (aggregator and clients; T, N, verification keys)")
    print(
        f"  key shares  {share_paths[0].name} .. {share_paths[-1].name} in {out}  "
        "(0600; one to each committee member, never to the aggregator)"
    )
    print(f"  SHA-256     {public_key.sha256()}  (clients pin this key)")
    print(
        "  p, q and the secret exponent existed only in this process and are gone; "
        "deliver each share, then delete it here"
    )
    return 0


# ---------------------------------------------------------------------------- certs
def _cmd_certs(args: argparse.Namespace) -> int:
    from protocol.tls import write_federation_pki

    sans = args.san or ["localhost", "127.0.0.1"]
    if not all(name.strip() for name in sans):
        raise ConfigError("--san must be a DNS name or an IP address, got an empty one")
    write_federation_pki(
        Path(args.out), clients=args.clients, relays=args.relays, sans=sans, days=args.days
    )
    relays = f", relay-0..{args.relays - 1}.pem/.key" if args.relays else ""
    print(
        f"federation PKI in {args.out}: ca.pem, ca.key (keep offline), aggregator.pem/.key "
        f"(SAN {', '.join(sans)}){relays}, client-0..{args.clients - 1}.pem/.key"
    )
    return 0


# ---------------------------------------------------------------------------- aggregator
def _model_kwargs(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FedcoreError(f"--model-arg must be KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _aggregator_config(args: argparse.Namespace) -> Any:
    from fedcore.aggregator import AggregatorConfig
    from fedcore.aggregator.settings import AGGREGATOR_SETTINGS, flag_values

    flags = flag_values(args, AGGREGATOR_SETTINGS)
    if args.model_arg:
        flags["model_kwargs"] = {**flags.get("model_kwargs", {}), **_model_kwargs(args.model_arg)}
    if args.config is not None:
        return AggregatorConfig.from_toml(args.config, **flags)
    return AggregatorConfig.from_mapping(flags)


def _cmd_federation(args: argparse.Namespace) -> int:
    config = _aggregator_config(args)
    public_key = None if args.plaintext else config.load_public_key()
    federation = config.federation(public_key)
    federation.save(args.out)
    print(f"federation file {args.out}: hand it to every client (fedcore client --federation)")
    print(f"  digest      {federation.digest().hex()}")
    if public_key is not None:
        print(f"  public key  SHA-256 {public_key.sha256()}")
    print(
        f"  quorum {federation.min_clients}, {federation.value_bits} value bits, "
        f"{federation.headroom_bits} headroom bits (up to {federation.max_contributors} clients "
        f"a round), clip {federation.clip}, weight <= {federation.max_weight}"
    )
    return 0


# ---------------------------------------------------------------------------- relay
def _cmd_relay(args: argparse.Namespace) -> int:
    from fedcore.aggregator import Relay, RelayConfig
    from fedcore.aggregator.settings import RELAY_SETTINGS, flag_values
    from protocol.transport import install_uvloop, tune_allocator

    flags = flag_values(args, RELAY_SETTINGS)
    if args.config is not None:
        config = RelayConfig.from_toml(args.config, **flags)
    else:
        config = RelayConfig.from_mapping(flags)
    relay = Relay(config)  # preflight: settings, federation file, TLS files
    if args.check_config:
        from fedcore.aggregator.preflight import check_listening

        check_listening(config)
        print(
            f"config OK: relay {config.instance_name} to {config.upstream}, TLS "
            f"{config.cert} (serverAuth and clientAuth, issued by {config.ca}), ports "
            f"{config.port} and {config.metrics_port} free on {config.host}"
        )
        return 0
    tune_allocator()
    install_uvloop()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.request_stop)
        await relay.run()

    asyncio.run(serve())
    return 0


def _check_aggregator_config(config: Any, *, encrypted: bool) -> int:
    """`aggregator --check-config`: every preflight check, no serving; one line each."""
    from fedcore.aggregator import Aggregator
    from fedcore.aggregator.preflight import check_listening

    aggregator = Aggregator(config, encrypted=encrypted)  # settings, key, model, TLS, state
    check_listening(config)
    federation = aggregator.federation
    checkpoint = aggregator.checkpoint
    print("config OK")
    print(f"  TLS         {config.cert} (serverAuth, issued by {config.ca}), key matches")
    if federation.public_key is not None:
        print(
            f"  public key  {config.public_key}: {federation.public_key.n.bit_length()} bits, "
            f"SHA-256 {federation.public_key.sha256()[:16]}..."
        )
    else:
        print("  PLAINTEXT   no encryption (comparison runs only)")
    print(f"  model       {config.model}: {aggregator.layout.numel:,} values")
    print(
        f"  rounds      {checkpoint.rounds_completed} of {config.rounds} done in "
        f"{config.state_dir} (writable)"
    )
    print(
        f"  quorum {federation.min_clients}, up to {federation.max_contributors} clients a "
        f"round, ports {config.port} and {config.metrics_port} free on {config.host}"
    )
    return 0


class _Interrupts:
    """SIGINT/SIGTERM of a long-running command: the first stops it, the second exits now.

    The first signal logs "stopping" at once and calls ``stop``, which arranges a
    graceful stop and returns True, or returns False while there is nothing to stop
    yet (then the signal interrupts like a plain Ctrl-C: exit 130). The second runs
    ``kill`` (the demo kills its client processes) and exits with 130 on the spot,
    without unwinding: the last checkpoint is complete on disk whatever runs then.
    Installed only in the main thread, where Python runs signal handlers.
    """

    def __init__(self, *, kill: Callable[[], None] | None = None) -> None:
        self.stop: Callable[[], bool] | None = None
        self._kill = kill
        self._stopping = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Interrupts:
        import threading

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: not set from Python, nothing to put back
                signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        if self._stopping:
            import os

            log.warning("interrupted again: exiting now")
            try:
                if self._kill is not None:
                    self._kill()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(130)
        self._stopping = True
        log.warning("stopping (%s again to exit at once)", again)
        if self.stop is None or not self.stop():
            raise KeyboardInterrupt


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    """Run ``callback`` in ``loop`` (from a signal handler); False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:
        return False
    return True


def _cmd_aggregator(args: argparse.Namespace) -> int:
    from fedcore.aggregator import Aggregator
    from protocol.transport import install_uvloop, tune_allocator

    config = _aggregator_config(args)
    if args.check_config:
        return _check_aggregator_config(config, encrypted=not args.plaintext)
    if args.fresh:
        from fedcore.aggregator import Checkpoint

        moved = Checkpoint.set_aside(config.state_dir)
        if moved is not None:
            log.warning("--fresh: the previous checkpoints were moved to %s", moved)
    aggregator = Aggregator(config, encrypted=not args.plaintext)
    tune_allocator()  # frame-sized buffers off mmap: about half the receive CPU
    uvloop = install_uvloop()
    log.info("event loop: %s", "uvloop" if uvloop else "asyncio")

    interrupts = _Interrupts()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        interrupts.stop = lambda: _call_soon(loop, aggregator.request_stop)
        await aggregator.run()

    with interrupts:
        asyncio.run(serve())
    return 0


# ---------------------------------------------------------------------------- client
def _cmd_client(args: argparse.Namespace) -> int:
    import torch

    from fedcore.client import Client, ClientConfig
    from fedcore.data import client_shard, load_dataset, parse_partition
    from fedcore.model import mlp
    from fedcore.training import TrainConfig, make_evaluate_fn, make_train_fn

    index, count = parse_partition(args.partition)
    dataset = load_dataset(args.dataset)
    x, y = client_shard(dataset, index, count, scheme=args.scheme, alpha=args.alpha, seed=args.seed)
    torch.set_num_threads(args.threads)
    model = mlp(dataset.num_features, classes=dataset.num_classes)
    config = ClientConfig(
        cert=Path(args.cert),
        key=Path(args.key),
        ca=Path(args.ca),
        federation=Path(args.federation),
        public_key=Path(args.public_key) if args.public_key else None,
        private_key=Path(args.private_key) if args.private_key else None,
        key_share=Path(args.key_share) if args.key_share else None,
        decrypt_workers=args.decrypt_workers,
        server_hostname=args.server_hostname,
        min_key_bits=args.min_key_bits,
    )
    client = Client(
        model,
        make_train_fn(x, y, TrainConfig(batch_size=args.batch_size, seed=args.seed + index)),
        make_evaluate_fn(dataset.x_test, dataset.y_test),
        config,
    )
    result = client.run_forever(args.server)
    print(
        f"client {index}/{count} done: {result.rounds_contributed} rounds contributed, "
        f"{result.shards_decrypted} shards decrypted, last metrics {result.last_metrics}"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedcore.demo import Demo, DemoOptions

    try:
        options = DemoOptions(
            clients=args.clients,
            rounds=args.rounds,
            dataset=args.dataset,
            key_bits=args.key_bits,
            encrypted=not args.plaintext,
            json_path=args.json,
            partition=args.partition_scheme,
            seed=args.seed,
            workdir=args.workdir,
            value_bits=args.value_bits,
            key_mode=args.key_mode,
            threshold=args.threshold,
            parties=args.parties,
            relays=args.relays,
            local_epochs=args.local_epochs,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            momentum=args.momentum,
        )
    except ValueError as exc:
        print(f"fedcore demo: error: {exc}", file=sys.stderr)
        return 2
    demo = Demo(options)
    with _Interrupts(kill=demo.kill) as interrupts:
        interrupts.stop = demo.request_stop
        summary = demo.run()
    if summary["interrupted"]:
        return 130
    return 0 if summary["rounds_completed"] == args.rounds else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": _cmd_keygen,
    "certs": _cmd_certs,
    "aggregator": _cmd_aggregator,
    "relay": _cmd_relay,
    "federation": _cmd_federation,
    "client": _cmd_client,
    "demo": _cmd_demo,
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `fedcore` argument parser (exposed for docs and tests); see `fedcore.cli_parser`."""
    from fedcore.cli_parser import build_parser as build

    return build(COMMANDS, command)


def _command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (its first word that is not an option)."""
    words = iter(argv)
    for word in words:
        if word in ("--log-level", "--log-format"):
            next(words, None)  # the option's value
        elif not word.startswith("-"):
            return word
    return None


def _user_error(exc: BaseException) -> str | None:
    """One line for an error a user can fix (a file, a port, a setting), else None.

    Every `FedcoreError` is one by definition; so are a credential refused by the
    preflight, a file or socket the OS refused (named with its path), and a TLS file
    that `ssl` cannot load. Anything else is a fedcore bug and keeps its traceback.
    """
    import ssl

    from protocol.tls_check import CredentialError

    if isinstance(exc, FedcoreError | CredentialError):
        return str(exc)
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc} (check --cert, --key and --ca)"
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}{':' if where else ''}{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedcore` console script.

    A user's mistake ends with one line ``fedcore <command>: error: ...`` and exit code
    2; ``--debug`` shows the traceback as well. An unexpected error (a bug) says so,
    with its traceback under ``--debug``, and exits 1.
    """
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(_command_in(words)).parse_args(words)
    except SystemExit as exc:  # --help (0) or a flag mistake (2), already printed
        return exc.code if isinstance(exc.code, int) else 2
    level = args.log_level or ("warning" if args.command == "demo" else "info")
    _setup_logging("debug" if args.debug and not args.log_level else level, args.log_format)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _user_error(exc)
        if args.debug:
            log.exception("fedcore %s failed", args.command)
        if message is not None:
            print(f"fedcore {args.command}: error: {message}", file=sys.stderr)
            return 2
        print(
            f"fedcore {args.command}: unexpected error: {type(exc).__name__}: {exc} "
            "(a bug: rerun with --debug for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
