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
from pathlib import Path
from typing import Any

from fedcore.errors import FedcoreError

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
        print(f"error: {out} already holds a keypair (use --force to replace it)", file=sys.stderr)
        return 2
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
        print("error: --threshold T and --parties N go together", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    public_path, share_paths = key_file_paths(out, args.parties)
    existing = [p for p in (public_path, *share_paths) if p.exists()]
    if existing and not args.force:
        print(f"error: {existing[0]} exists (use --force to replace it)", file=sys.stderr)
        return 2
    bar = _DealBar()
    t0 = time.perf_counter()
    try:
        public_key, shares = deal(args.bits, args.threshold, args.parties, progress=bar)
    except (TypeError, ValueError) as exc:
        bar.close()
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    if args.clients < 0 or args.relays < 0:
        raise FedcoreError("--clients and --relays must be >= 0")
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
_AGG_FLAGS: dict[str, tuple[type, str]] = {
    "host": (str, "address to listen on"),
    "port": (int, "TCP port for clients"),
    "metrics_port": (int, "HTTP port for /metrics and /healthz"),
    "public_key": (str, "Paillier public key file (from `fedcore keygen`)"),
    "cert": (str, "aggregator certificate (PEM)"),
    "key": (str, "aggregator private TLS key (PEM)"),
    "ca": (str, "federation CA certificate (PEM)"),
    "min_clients": (int, "fewest complete updates that may be decrypted (quorum)"),
    "clients_per_round": (int, "clients selected per round"),
    "clients_fraction": (float, "fraction of connected clients selected per round"),
    "rounds": (int, "rounds to complete"),
    "round_timeout": (float, "seconds a round collects updates before it closes"),
    "max_inflight_uploads": (int, "updates buffered at once (bounds memory)"),
    "state_dir": (str, "directory for checkpoints (resume after restart)"),
    "model": (str, "module:factory that builds the torch model"),
    "committee_size": (
        int,
        "key-holding clients that decrypt each round's sum (shared mode; a threshold "
        "federation uses every connected share holder)",
    ),
    "value_bits": (int, "quantization bits per value"),
    "clip": (float, "clip bound for each update value"),
    "seed": (int, "seed for model init and client selection"),
    "max_weight": (int, "largest FedAvg weight a client may give itself"),
    "min_key_bits": (int, "smallest Paillier modulus accepted (default 2048; tests only lower)"),
}


def _add_aggregator_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML file with the same settings")
    for name, (kind, help_text) in _AGG_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    parser.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument for the model factory (repeatable)",
    )
    parser.add_argument(
        "--plaintext",
        action="store_true",
        help="float32 updates, NO encryption (comparison runs only)",
    )


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

    flags = {name: getattr(args, name) for name in _AGG_FLAGS if getattr(args, name) is not None}
    if args.model_arg:
        flags["model_kwargs"] = _model_kwargs(args.model_arg)
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
_RELAY_FLAGS: dict[str, tuple[type, str]] = {
    "upstream": (str, "HOST:PORT of the root aggregator (or of a relay nearer the root)"),
    "cert": (str, "this relay's certificate (PEM; `fedcore certs --relays N` makes them)"),
    "key": (str, "this relay's private TLS key (PEM)"),
    "ca": (str, "federation CA certificate (PEM)"),
    "federation": (str, "pin this federation file: the upstream must offer exactly it"),
    "name": (str, "instance name upstream (default: host name; replicas sharing a cert differ)"),
    "server_hostname": (str, "name to check in the upstream's certificate (default: its host)"),
    "host": (str, "address to listen on for clients (default 127.0.0.1)"),
    "port": (int, "TCP port for clients (default 8765)"),
    "metrics_host": (str, "address of /metrics and /healthz (default 127.0.0.1)"),
    "metrics_port": (int, "HTTP port for /metrics and /healthz (default 9100)"),
    "clients_per_round": (int, "clients of this relay asked per round (default: all)"),
    "max_inflight_uploads": (int, "client updates buffered at once (default 8)"),
    "fold_workers": (int, "fold worker threads (default 0: in the event loop's thread)"),
    "max_connections": (int, "most client connections (default 2048)"),
    "reconnect_attempts": (
        int,
        "failed upstream connects in a row before giving up (default: never)",
    ),
}


def _cmd_relay(args: argparse.Namespace) -> int:
    from fedcore.aggregator import Relay, RelayConfig
    from protocol.transport import install_uvloop, tune_allocator

    flags = {name: getattr(args, name) for name in _RELAY_FLAGS if getattr(args, name) is not None}
    if args.config is not None:
        config = RelayConfig.from_toml(args.config, **flags)
    else:
        config = RelayConfig.from_mapping(flags)
    relay = Relay(config)
    tune_allocator()
    install_uvloop()

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.request_stop)
        await relay.run()

    asyncio.run(serve())
    return 0


def _cmd_aggregator(args: argparse.Namespace) -> int:
    from fedcore.aggregator import Aggregator
    from protocol.transport import install_uvloop, tune_allocator

    config = _aggregator_config(args)
    if args.fresh:
        from fedcore.aggregator import Checkpoint

        moved = Checkpoint.set_aside(config.state_dir)
        if moved is not None:
            log.warning("--fresh: the previous checkpoints were moved to %s", moved)
    aggregator = Aggregator(config, encrypted=not args.plaintext)
    tune_allocator()  # frame-sized buffers off mmap: about half the receive CPU
    uvloop = install_uvloop()
    log.info("event loop: %s", "uvloop" if uvloop else "asyncio")

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, aggregator.request_stop)
        await aggregator.run()

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
    from fedcore.demo import DemoOptions, run_demo

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
        )
    except ValueError as exc:
        print(f"fedcore demo: error: {exc}", file=sys.stderr)
        return 2
    summary = run_demo(options)
    return 0 if summary["rounds_completed"] == args.rounds else 1


def build_parser() -> argparse.ArgumentParser:
    """The `fedcore` argument parser (exposed for docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="fedcore",
        description="Privacy-preserving federated learning: packed Paillier over mutual TLS.",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: info (warning for demo, which prints its own progress)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json = one structured record per line",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "keygen",
        help="make a Paillier keypair, or a T-of-N threshold key (run by the key authority)",
        description="Make the federation's Paillier key, on a machine that is not the "
        "aggregator. Shared mode (default) writes public_key.json and private_key.json: "
        "every committee member gets the whole private key. Threshold mode (--threshold T "
        "--parties N) is a trusted-dealer ceremony: it finds two safe primes (a few "
        "seconds at 2048 bits), splits the decryption exponent into N shares any T of "
        "which decrypt, and writes public_key.json (n, T, N, verification keys, SHA-256) "
        "and share-1.json .. share-N.json (mode 0600). KEEP: public_key.json (publish it "
        "to the aggregator and every client). DELIVER AND DESTROY: each share-<i>.json "
        "goes to exactly one committee member over a secure channel, then delete it from "
        "the dealer machine; no copy of a share may reach the aggregator. NOTHING ELSE "
        "is kept: p, q and the exponent exist only in memory during this command and are "
        "never written. Whoever runs this command could have kept them: see "
        "docs/threat-model.md.",
    )
    p.add_argument("--bits", type=int, default=2048, help="modulus size (default 2048)")
    p.add_argument(
        "--out",
        required=True,
        help="directory for public_key.json and private_key.json (or share-<i>.json)",
    )
    p.add_argument("--threshold", type=int, help="T: key shares needed to decrypt (with --parties)")
    p.add_argument("--parties", type=int, help="N: key shares to deal, 2..64 (with --threshold)")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("certs", help="make the federation's CA and TLS certificates")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--clients", type=int, default=4, help="client certificates to issue")
    p.add_argument(
        "--relays",
        type=int,
        default=0,
        help="relay certificates to issue (server and client auth, SAN from --san; default 0)",
    )
    p.add_argument("--san", action="append", help="aggregator DNS name or IP (repeatable)")
    p.add_argument("--days", type=int, default=365, help="validity in days")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("aggregator", help="run the aggregator daemon (public key only)")
    _add_aggregator_flags(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: move the state directory's checkpoints into replaced-<time>/ first",
    )
    p.set_defaults(func=_cmd_aggregator)

    p = sub.add_parser(
        "relay",
        help="run a relay: an edge aggregator that forwards its clients' encrypted sum upstream",
    )
    p.add_argument("--config", type=Path, help="TOML file with the same settings ([relay] table)")
    for name, (kind, help_text) in _RELAY_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=help_text)
    p.set_defaults(func=_cmd_relay)

    p = sub.add_parser(
        "federation",
        help="write the federation file clients pin (from the aggregator's settings)",
    )
    _add_aggregator_flags(p)
    p.add_argument("--out", required=True, help="where to write the federation file (JSON)")
    p.set_defaults(func=_cmd_federation)

    p = sub.add_parser("client", help="run a ready-made client on a built-in dataset")
    p.add_argument("--server", required=True, help="aggregator HOST:PORT")
    p.add_argument("--cert", required=True, help="client certificate (PEM)")
    p.add_argument("--key", required=True, help="client TLS key (PEM)")
    p.add_argument("--ca", required=True, help="federation CA certificate (PEM)")
    p.add_argument(
        "--federation",
        required=True,
        help="federation file from the operator (`fedcore federation`): the key and "
        "parameters this client accepts",
    )
    p.add_argument("--public-key", help="also pin this public key file (from the key authority)")
    p.add_argument("--private-key", help="Paillier private key: join the decryption committee")
    p.add_argument(
        "--key-share",
        help="threshold key share (share-<i>.json): join a threshold federation's committee",
    )
    p.add_argument(
        "--decrypt-workers",
        type=int,
        default=1,
        help="key holders: decrypt on this many processes, or partially decrypt on this "
        "many threads (default 1)",
    )
    p.add_argument(
        "--min-key-bits",
        type=int,
        default=2048,
        help="smallest Paillier modulus accepted (default 2048; lower only for tests)",
    )
    p.add_argument("--server-hostname", help="name to check in the aggregator's certificate")
    p.add_argument("--dataset", default="digits", choices=["digits", "fashion-mnist"])
    p.add_argument("--partition", default="0/1", help="this client's shard, I/N")
    p.add_argument("--scheme", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_client)

    p = sub.add_parser("demo", help="a whole federation over TLS on 127.0.0.1")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument(
        "--dataset",
        choices=["digits", "fashion-mnist"],
        help="default: fashion-mnist when installed, else digits",
    )
    p.add_argument("--key-bits", type=int, default=2048)
    p.add_argument("--value-bits", type=int, default=16)
    p.add_argument("--plaintext", action="store_true", help="float32 updates, no encryption")
    p.add_argument(
        "--key-mode",
        default="shared",
        choices=["shared", "threshold"],
        help="shared: committee members hold the whole private key; threshold: each holds "
        "one share of a T-of-N key (default shared)",
    )
    p.add_argument("--threshold", type=int, default=3, help="T for --key-mode threshold")
    p.add_argument("--parties", type=int, default=5, help="N for --key-mode threshold")
    p.add_argument(
        "--relays",
        type=int,
        default=0,
        help="relays between the clients and the aggregator, each in its own process "
        "(key holders still connect to the aggregator; default 0)",
    )
    p.add_argument("--partition-scheme", default="iid", choices=["iid", "dirichlet"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, help="keep keys, certs and state here")
    p.add_argument("--json", type=Path, help="write the summary as JSON")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fedcore` console script."""
    args = build_parser().parse_args(argv)
    level = args.log_level or ("warning" if args.command == "demo" else "info")
    _setup_logging(level, args.log_format)
    try:
        return int(args.func(args))
    except FedcoreError as exc:
        print(f"fedcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
