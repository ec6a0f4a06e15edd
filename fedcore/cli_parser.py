"""The `fedcore` argument parser: every command's flags, with help and defaults.

Kept apart from the commands themselves (`fedcore.cli`), which it names through the
``commands`` mapping. Flag mistakes are one line (`_Parser`), every help line shows its
default (`_HelpWithDefaults`), and the daemons' settings flags come from
`fedcore.aggregator.settings`, one per setting.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["build_parser"]


def _add_aggregator_flags(parser: argparse.ArgumentParser) -> None:
    from fedcore.aggregator import AggregatorConfig
    from fedcore.aggregator.settings import AGGREGATOR_SETTINGS, add_setting_flags

    parser.add_argument(
        "--config",
        type=Path,
        help="TOML file of settings (keys as below, or in an [aggregator] table)",
    )
    add_setting_flags(parser, AggregatorConfig, AGGREGATOR_SETTINGS)
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


def _at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (and <= ``high``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            allowed = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _key_bits(text: str) -> int:
    from fedcore.crypto.keys import MAX_KEY_BITS, MIN_KEY_BITS

    value = _at_least(MIN_KEY_BITS)(text)
    if value > MAX_KEY_BITS or value % 8:
        raise argparse.ArgumentTypeError(
            f"must be a multiple of 8 in {MIN_KEY_BITS}..{MAX_KEY_BITS} (2048 for real use), "
            f"got {value}"
        )
    return value


def _partition(text: str) -> str:
    from fedcore.data import parse_partition

    try:
        parse_partition(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def build_parser(
    commands: Mapping[str, Callable[[argparse.Namespace], int]], command: str | None = None
) -> argparse.ArgumentParser:
    """The `fedcore` argument parser; ``commands`` maps each command to its function.

    The settings flags of the daemons come from their config classes, which import
    torch; ``command`` (the command about to run) limits them to that command's
    parser so that `fedcore certs` does not pay for it. None builds every parser whole.
    """

    def wants(name: str) -> bool:
        return command is None or command == name

    parser = _Parser(
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
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (and log at debug level)",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

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
    p.add_argument("--bits", type=_key_bits, default=2048, help="modulus size in bits")
    p.add_argument(
        "--out",
        required=True,
        help="directory for public_key.json and private_key.json (or share-<i>.json)",
    )
    p.add_argument("--threshold", type=int, help="T: key shares needed to decrypt (with --parties)")
    p.add_argument("--parties", type=int, help="N: key shares to deal, 2..64 (with --threshold)")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.set_defaults(func=commands["keygen"])

    p = sub.add_parser("certs", help="make the federation's CA and TLS certificates")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--clients", type=_at_least(0), default=4, help="client certificates to issue")
    p.add_argument(
        "--relays",
        type=_at_least(0),
        default=0,
        help="relay certificates to issue (server and client auth, SAN from --san; default 0)",
    )
    p.add_argument("--san", action="append", help="aggregator DNS name or IP (repeatable)")
    p.add_argument("--days", type=_at_least(1), default=365, help="validity in days")
    p.set_defaults(func=commands["certs"])

    p = sub.add_parser("aggregator", help="run the aggregator daemon (public key only)")
    if wants("aggregator"):
        _add_aggregator_flags(p)
    p.add_argument(
        "--fresh",
        action="store_true",
        help="start over: move the state directory's checkpoints into replaced-<time>/ first",
    )
    p.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings, key, model, TLS files, state directory and ports, then exit",
    )
    p.set_defaults(func=commands["aggregator"])

    p = sub.add_parser(
        "relay",
        help="run a relay: an edge aggregator that forwards its clients' encrypted sum upstream",
    )
    p.add_argument(
        "--config", type=Path, help="TOML file of settings (keys as below, or a [relay] table)"
    )
    if wants("relay"):
        from fedcore.aggregator import RelayConfig
        from fedcore.aggregator.settings import RELAY_SETTINGS, add_setting_flags

        add_setting_flags(p, RelayConfig, RELAY_SETTINGS)
    p.add_argument(
        "--check-config",
        action="store_true",
        help="check the settings, federation file, TLS files and ports, then exit",
    )
    p.set_defaults(func=commands["relay"])

    p = sub.add_parser(
        "federation",
        help="write the federation file clients pin (from the aggregator's settings)",
    )
    if wants("federation"):
        _add_aggregator_flags(p)
    p.add_argument("--out", required=True, help="where to write the federation file (JSON)")
    p.set_defaults(func=commands["federation"])

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
        type=_at_least(1),
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
    p.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "fashion-mnist"],
        help="built-in data set to train on",
    )
    p.add_argument("--partition", type=_partition, default="0/1", help="this client's shard, I/N")
    p.add_argument(
        "--scheme",
        default="iid",
        choices=["iid", "dirichlet"],
        help="how the data set is split across clients (dirichlet: non-IID labels)",
    )
    p.add_argument(
        "--alpha", type=_positive_float, default=0.5, help="Dirichlet concentration (> 0)"
    )
    p.add_argument("--batch-size", type=_at_least(1), default=64, help="local training batch size")
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    p.set_defaults(func=commands["client"])

    p = sub.add_parser("demo", help="a whole federation over TLS on 127.0.0.1")
    p.add_argument("--clients", type=int, default=10, help="client processes to start")
    p.add_argument("--rounds", type=int, default=10, help="rounds to run")
    p.add_argument(
        "--dataset",
        choices=["digits", "fashion-mnist"],
        help="default: fashion-mnist when installed, else digits",
    )
    p.add_argument("--key-bits", type=_key_bits, default=2048, help="Paillier modulus size in bits")
    p.add_argument(
        "--value-bits", type=_at_least(2, 32), default=8, help="quantization bits per value"
    )
    p.add_argument("--plaintext", action="store_true", help="float32 updates, no encryption")
    p.add_argument(
        "--local-epochs",
        type=int,
        help="local epochs a round (default: the dataset's, fedcore.demo.DEMO_TRAINING)",
    )
    p.add_argument("--lr", type=float, help="local SGD learning rate (default: the dataset's)")
    p.add_argument("--batch-size", type=int, help="local mini-batch size (default: the dataset's)")
    p.add_argument("--momentum", type=float, help="local SGD momentum (default: the dataset's)")
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
    p.add_argument(
        "--partition-scheme",
        default="iid",
        choices=["iid", "dirichlet"],
        help="how the data set is split across clients (dirichlet: non-IID labels)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    p.add_argument("--workdir", type=Path, help="keep keys, certs and state here")
    p.add_argument("--json", type=Path, help="write the summary as JSON")
    p.set_defaults(func=commands["demo"])
    for command_parser in sub.choices.values():
        command_parser.formatter_class = _HelpWithDefaults
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the usage is one --help away)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help lines end with the flag's default, unless it is None, False or already said."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default in (None, False, argparse.SUPPRESS)
            or not action.option_strings
            or "default" in text
            or isinstance(default, list)
        ):
            return text
        return f"{text} (default: %(default)s)"
