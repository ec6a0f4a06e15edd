"""What each daemon setting means, what type it takes, and its command-line flag.

One table per daemon (`AGGREGATOR_SETTINGS`, `RELAY_SETTINGS`) maps every field of
`AggregatorConfig` / `RelayConfig` to one line of help; the CLI makes a flag of every
entry (``--round-timeout`` for ``round_timeout``) and `--help` shows each with its
default, so a TOML key and a flag are the same setting. `check_types` refuses a value
of the wrong type with the setting's name before any range check runs (a TOML
``rounds = "ten"`` says "rounds must be an integer").
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError

__all__ = [
    "AGGREGATOR_SETTINGS",
    "RELAY_SETTINGS",
    "add_setting_flags",
    "check_types",
    "flag_values",
]

AGGREGATOR_SETTINGS: dict[str, str] = {
    "public_key": "Paillier public key file from `fedcore keygen` (the aggregator never "
    "loads a private key)",
    "cert": "the aggregator's TLS certificate, PEM, issued for serverAuth",
    "key": "the aggregator's private TLS key, PEM",
    "ca": "the federation CA certificate, PEM: clients must present a certificate it issued",
    "state_dir": "directory for checkpoints; restart with the same directory to resume",
    "host": "address to listen on for clients (0.0.0.0 for every interface)",
    "port": "TCP port for clients",
    "metrics_port": "HTTP port for the dashboard (/), /metrics and /healthz",
    "metrics_host": "address of the dashboard, /metrics and /healthz",
    "model": "module:factory building the torch model (modules in the current directory are found)",
    "model_kwargs": "keyword arguments for the model factory, a JSON object",
    "min_clients": "quorum: the fewest updates a released sum may hold (>= 2)",
    "clients_per_round": "clients selected per round (default: every connected one)",
    "clients_fraction": "fraction of connected clients selected per round, instead of "
    "clients_per_round",
    "rounds": "rounds to complete, then the federation ends",
    "round_timeout": "seconds a round collects updates before it closes",
    "wait_for_clients_timeout": "seconds to wait for enough clients to start a round "
    "before that attempt fails",
    "max_failed_rounds": "failed rounds in a row before the daemon gives up",
    "round_interval": "seconds from one round's start to the next one's (0 = back to back; "
    "a pause lets clients refill their encryption pools)",
    "max_inflight_uploads": "updates received at once (bounds memory: model size x this)",
    "upload_min_rate": "bytes/s a granted upload must average to keep its slot",
    "upload_start_timeout": "seconds a grant allows on top of its bytes at upload_min_rate",
    "fold_workers": "threads (native engine) or processes folding ciphertexts; 0 = inline",
    "max_connections": "most client connections at once",
    "max_connections_per_client": "connections at once per client certificate (0 = no cap)",
    "receive_buffer": "SO_RCVBUF per client connection in bytes (0 = kernel autotuning)",
    "value_bits": "quantization bits per model value",
    "headroom_bits": "slot bits above value_bits that hold the sum (default: the fewest "
    "holding clients_per_round x max_weight)",
    "clip": "each update value is clipped to [-clip, clip] before quantization",
    "max_weight": "largest FedAvg weight a client may give itself",
    "samples_per_weight": "training samples per unit of FedAvg weight",
    "report_metrics": "evaluation metrics summed with the update, a JSON list of "
    "[name, bound] pairs",
    "min_key_bits": "smallest Paillier modulus accepted (2048; tests only lower it)",
    "chunk_ciphertexts": "ciphertexts per upload chunk",
    "committee_size": (
        "key-holding clients that decrypt each round's sum (shared mode); "
        "0 = every connected key holder"
    ),
    "decrypt_shard_timeout": "seconds a committee member has for one shard before another gets it",
    "resume_grace": "seconds a dropped upload is kept for its client to resume",
    "unmasker_grace": "seconds a rerun waits for the unmasker its contributors masked for",
    "handshake_timeout": "seconds a new connection has to finish TLS and say Hello",
    "idle_timeout": "seconds of silence before a connection is closed (> heartbeat_interval)",
    "heartbeat_interval": "seconds of sending nothing before a heartbeat (0 = none)",
    "seed": "seed of the initial model and of client selection",
    "allowed_clients": "certificate common names allowed to join, comma-separated "
    "(default: any the CA issued)",
    "local_epochs": "local training epochs per round, sent to clients",
    "learning_rate": "local learning rate, sent to clients",
}

RELAY_SETTINGS: dict[str, str] = {
    "upstream": "HOST:PORT of the root aggregator (or of a relay nearer the root)",
    "cert": "this relay's certificate, PEM (serverAuth and clientAuth: `fedcore certs --relays N`)",
    "key": "this relay's private TLS key, PEM",
    "ca": "the federation CA certificate, PEM",
    "federation": "pin this federation file: the upstream must offer exactly it",
    "name": "instance name upstream (default: host name; replicas sharing a cert differ)",
    "server_hostname": "name to check in the upstream's certificate (default: its host)",
    "host": "address to listen on for clients",
    "port": "TCP port for clients",
    "metrics_port": "HTTP port for /metrics and /healthz",
    "metrics_host": "address of /metrics and /healthz",
    "clients_per_round": "clients of this relay asked per round (default: all)",
    "max_inflight_uploads": "client updates received at once (bounds memory)",
    "upload_min_rate": "bytes/s a granted upload must average to keep its slot",
    "upload_start_timeout": "seconds a grant allows on top of its bytes at upload_min_rate",
    "fold_workers": "fold worker threads (0: in the event loop's thread)",
    "max_connections": "most client connections at once",
    "max_connections_per_client": "connections at once per client certificate (0 = no cap)",
    "receive_buffer": "SO_RCVBUF per client connection in bytes (0 = kernel autotuning)",
    "resume_grace": "seconds a dropped upload is kept for its client to resume",
    "handshake_timeout": "seconds a new connection has to finish TLS and say Hello",
    "idle_timeout": "seconds of silence before a connection is closed (> heartbeat_interval)",
    "heartbeat_interval": "seconds of sending nothing before a heartbeat",
    "forward_margin": "share of a round's remaining time kept for forwarding the sum",
    "reconnect_attempts": "failed upstream connects in a row before giving up (default: never)",
    "backoff_base": "first reconnect delay, seconds (doubles up to backoff_max)",
    "backoff_max": "longest reconnect delay, seconds",
    "allowed_clients": "certificate common names allowed to join, comma-separated",
    "seed": "seed of client selection",
}

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parts(hint: Any) -> tuple[Any, ...]:
    """The alternatives of ``X | Y | None`` (or ``(hint,)``), None dropped."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _fits(kind: Any, value: Any) -> bool:
    origin = typing.get_origin(kind)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if kind is Path:
        return isinstance(value, str | Path)
    if origin is tuple:
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    return True  # a type this table does not check (e.g. FederationParams)


def _describe(hint: Any) -> str:
    names = []
    for kind in _parts(hint):
        origin = typing.get_origin(kind)
        if kind in _NAMES:
            names.append(_NAMES[kind])
        elif kind is Path:
            names.append("a path")
        elif origin is tuple:
            names.append("a list")
        elif origin is dict:
            names.append("a table (JSON object on the command line)")
        else:
            names.append(getattr(kind, "__name__", str(kind)))
    return " or ".join(dict.fromkeys(names))


def check_types(cls: type, values: dict[str, Any], *, what: str) -> None:
    """Raise ConfigError naming the first setting whose value has the wrong type."""
    hints = _hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if hint is None or value is None:
            continue
        if not any(_fits(kind, value) for kind in _parts(hint)):
            raise ConfigError(f"{what} setting {name} must be {_describe(hint)}; got {value!r}")


def _parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None


def _parser_for(hint: Any) -> Any:
    kinds = _parts(hint)
    kind = kinds[0]
    origin = typing.get_origin(kind)
    if kind in (int, float):
        return kind
    if origin is tuple:
        args = typing.get_args(kind)
        return _parse_list if args and args[0] is str else _parse_json
    if origin is dict:
        return _parse_json
    return str


def _default_text(cls: type, name: str) -> str:
    for f in fields(cls):
        if f.name != name:
            continue
        if f.default is MISSING and f.default_factory is MISSING:
            return "required"
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[operator]
        if default is None:
            return ""
        if isinstance(default, tuple | list | dict):
            return "default: " + json.dumps(default)
        return f"default: {default}"
    return ""


def add_setting_flags(
    parser: argparse.ArgumentParser, cls: type, table: dict[str, str], *, skip: tuple[str, ...] = ()
) -> None:
    """One ``--flag`` per entry of ``table`` (a setting of ``cls``), help with its default.

    Flags default to None so that a TOML file's value stands unless the flag is given.
    """
    hints = _hints(cls)
    group = parser.add_argument_group(
        "settings", "each is also a key of the --config TOML file (flags override it)"
    )
    for name, help_text in table.items():
        if name in skip:
            continue
        default = _default_text(cls, name)
        group.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=_parser_for(hints[name]),
            metavar=name.upper(),
            help=f"{help_text} ({default})" if default else help_text,
        )


def flag_values(args: argparse.Namespace, table: dict[str, str]) -> dict[str, Any]:
    """The settings given as flags (those left None are not given)."""
    return {n: getattr(args, n) for n in table if getattr(args, n, None) is not None}
