"""Every user mistake, on every command and every setting: one line, exit code 2.

Table-driven over the real `fedcore` entry point (`fedcore.cli.main`, as the console
script calls it). Each case gives an argv and a phrase the one line must contain; the
test checks the exit code, that stderr is exactly that one ``fedcore <command>:
error: ...`` line, and that no traceback was printed. The aggregator and relay cases run
with ``--check-config`` (the same preflight as a real start, then exit), so a mistake
this table misses fails the test instead of serving. Every setting of
`AggregatorConfig` and `RelayConfig` gets a wrong-type case from its TOML file (the
settings tables are the source, so a new setting is covered when it is added), and
those with a range get an out-of-range flag too. A few cases run as real processes.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
import subprocess
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gmpy2
import pytest

from fedcore.aggregator.settings import AGGREGATOR_SETTINGS, RELAY_SETTINGS
from fedcore.cli import main
from fedcore.crypto import PublicKey, generate_keypair
from protocol.tls import (
    generate_ca,
    issue_certificate,
    load_certificate,
    write_certificate,
    write_private_key,
)

from .conftest import Keys

pytestmark = pytest.mark.timeout(120)


@dataclass(frozen=True)
class Files:
    """A federation's files plus the broken ones the cases use."""

    pki: Path
    keys: Keys
    tmp: Path

    def path(self, name: str) -> str:
        return str(self.tmp / name)

    def agg(self, *extra: str, public_key: str | None = None) -> list[str]:
        return [
            "aggregator",
            "--public-key",
            public_key or str(self.keys.public),
            "--cert",
            str(self.pki / "aggregator.pem"),
            "--key",
            str(self.pki / "aggregator.key"),
            "--ca",
            str(self.pki / "ca.pem"),
            "--state-dir",
            self.path("state"),
            "--min-key-bits",
            "1024",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model-kwargs",
            '{"in_features": 64}',
            "--check-config",
            *extra,
        ]

    def relay(self, *extra: str) -> list[str]:
        return [
            "relay",
            "--upstream",
            "127.0.0.1:1",
            "--cert",
            str(self.pki / "relay-0.pem"),
            "--key",
            str(self.pki / "relay-0.key"),
            "--ca",
            str(self.pki / "ca.pem"),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--check-config",
            *extra,
        ]

    def client(self, *extra: str) -> list[str]:
        return [
            "client",
            "--server",
            "127.0.0.1:1",
            "--cert",
            str(self.pki / "client-0.pem"),
            "--key",
            str(self.pki / "client-0.key"),
            "--ca",
            str(self.pki / "ca.pem"),
            "--federation",
            self.path("federation.json"),
            "--min-key-bits",
            "1024",
            *extra,
        ]


@pytest.fixture(scope="module")
def files(pki: Path, keys: Keys, tmp_path_factory: pytest.TempPathFactory) -> Files:
    tmp = tmp_path_factory.mktemp("cli-errors")
    out = Files(pki=pki, keys=keys, tmp=tmp)
    # broken public keys: prime n, n with the factor 3, a 512-bit modulus
    prime = int(gmpy2.next_prime(gmpy2.mpz(1) << 1100))
    PublicKey(prime).save(tmp / "prime.json")
    PublicKey(3 * prime).save(tmp / "three.json")
    generate_keypair(512)[0].save(tmp / "small.json")
    (tmp / "garbage.json").write_text("{not json")
    (tmp / "a-file").write_text("not a directory\n")
    # certificates: expired, from another CA, a client certificate used as a server's
    ca_key = _load_key(pki / "ca.key")
    ca_cert = load_certificate(pki / "ca.pem")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    key, cert = issue_certificate(
        ca_key,
        ca_cert,
        "aggregator",
        sans=["localhost"],
        server=True,
        not_valid_before=past,
        not_valid_after=past + dt.timedelta(days=1),
    )
    write_private_key(tmp / "expired.key", key)
    write_certificate(tmp / "expired.pem", cert)
    other_key, other_ca = generate_ca("another CA")
    key, cert = issue_certificate(other_key, other_ca, "aggregator", server=True)
    write_private_key(tmp / "foreign.key", key)
    write_certificate(tmp / "foreign.pem", cert)
    (tmp / "bad.toml").write_text("rounds = [\n")
    assert main(["federation", *out.agg()[1:-1], "--out", out.path("federation.json")]) == 0
    return out


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(path.read_bytes(), password=None)


Case = tuple[str, Callable[[Files], list[str]], str]

# (id, argv, a phrase the one error line must contain)
CASES: list[Case] = [
    # ------------------------------------------------------------------ keygen
    ("keygen-bits-small", lambda f: ["keygen", "--bits", "100", "--out", f.path("k")], "bits"),
    ("keygen-bits-type", lambda f: ["keygen", "--bits", "many", "--out", f.path("k")], "--bits"),
    ("keygen-no-out", lambda f: ["keygen"], "--out"),
    (
        "keygen-out-is-file",
        lambda f: ["keygen", "--bits", "512", "--out", f.path("a-file")],
        "a-file",
    ),
    (
        "keygen-threshold-alone",
        lambda f: ["keygen", "--threshold", "3", "--out", f.path("t")],
        "--threshold T and --parties N go together",
    ),
    (
        "keygen-threshold-above-parties",
        lambda f: ["keygen", "--threshold", "5", "--parties", "3", "--out", f.path("t")],
        "threshold",
    ),
    (
        "keygen-too-many-parties",
        lambda f: ["keygen", "--threshold", "2", "--parties", "100", "--out", f.path("t")],
        "parties",
    ),
    # ------------------------------------------------------------------ certs
    (
        "certs-clients-negative",
        lambda f: ["certs", "--out", f.path("p"), "--clients", "-1"],
        "--clients",
    ),
    (
        "certs-relays-negative",
        lambda f: ["certs", "--out", f.path("p"), "--relays", "-1"],
        "--relays",
    ),
    ("certs-days-zero", lambda f: ["certs", "--out", f.path("p"), "--days", "0"], "days"),
    ("certs-out-is-file", lambda f: ["certs", "--out", f.path("a-file")], "a-file"),
    ("certs-san-empty", lambda f: ["certs", "--out", f.path("p"), "--san", ""], "san"),
    # ------------------------------------------------------------------ aggregator files
    (
        "agg-public-key-missing",
        lambda f: f.agg(public_key=f.path("nope.json")),
        "nope.json",
    ),
    ("agg-public-key-garbage", lambda f: f.agg(public_key=f.path("garbage.json")), "garbage.json"),
    ("agg-public-key-prime", lambda f: f.agg(public_key=f.path("prime.json")), "n is prime"),
    (
        "agg-public-key-factor-3",
        lambda f: f.agg(public_key=f.path("three.json")),
        "small prime factor",
    ),
    ("agg-public-key-512", lambda f: f.agg(public_key=f.path("small.json")), "512 bits"),
    ("agg-cert-missing", lambda f: f.agg("--cert", f.path("no.pem")), "no.pem does not exist"),
    ("agg-key-missing", lambda f: f.agg("--key", f.path("no.key")), "no.key does not exist"),
    ("agg-ca-missing", lambda f: f.agg("--ca", f.path("noca.pem")), "noca.pem does not exist"),
    ("agg-ca-not-pem", lambda f: f.agg("--ca", f.path("garbage.json")), "not a PEM certificate"),
    (
        "agg-ca-not-a-ca",
        lambda f: f.agg("--ca", str(f.pki / "client-0.pem")),
        "is not a CA",
    ),
    (
        "agg-key-of-another-cert",
        lambda f: f.agg("--key", str(f.pki / "client-0.key")),
        "does not match certificate",
    ),
    (
        "agg-client-cert-as-server",
        lambda f: f.agg(
            "--cert", str(f.pki / "client-0.pem"), "--key", str(f.pki / "client-0.key")
        ),
        "not issued for serverAuth",
    ),
    (
        "agg-expired-cert",
        lambda f: f.agg("--cert", f.path("expired.pem"), "--key", f.path("expired.key")),
        "expired on",
    ),
    (
        "agg-cert-of-another-ca",
        lambda f: f.agg("--cert", f.path("foreign.pem"), "--key", f.path("foreign.key")),
        "was not issued by the CA",
    ),
    ("agg-state-dir-is-file", lambda f: f.agg("--state-dir", f.path("a-file")), "a-file"),
    ("agg-config-missing", lambda f: f.agg("--config", f.path("none.toml")), "none.toml"),
    ("agg-config-bad-toml", lambda f: f.agg("--config", f.path("bad.toml")), "bad.toml"),
    ("agg-model-module", lambda f: f.agg("--model", "no_such_module:mlp"), "no_such_module"),
    ("agg-model-factory", lambda f: f.agg("--model", "fedcore.model:nothing"), "nothing"),
    ("agg-model-no-colon", lambda f: f.agg("--model", "fedcore.model"), "module:factory"),
    ("agg-model-kwargs-key", lambda f: f.agg("--model-kwargs", '{"wings": 2}'), "wings"),
    ("agg-model-kwargs-json", lambda f: f.agg("--model-kwargs", "{x"), "JSON"),
    ("agg-model-arg-form", lambda f: f.agg("--model-arg", "novalue"), "KEY=VALUE"),
    ("agg-unknown-flag", lambda f: f.agg("--roundz", "3"), "--roundz"),
    # ------------------------------------------------------------------ contradictions
    (
        "agg-per-round-above-allowed",
        lambda f: f.agg("--allowed-clients", "a,b,c", "--clients-per-round", "5"),
        "clients_per_round (5) exceeds allowed_clients (3 names)",
    ),
    (
        "agg-quorum-above-allowed",
        lambda f: f.agg("--allowed-clients", "a,b", "--min-clients", "3"),
        "min_clients (3) exceeds allowed_clients",
    ),
    (
        "agg-quorum-above-per-round",
        lambda f: f.agg("--min-clients", "4", "--clients-per-round", "3"),
        "clients_per_round must be >= min_clients",
    ),
    (
        "agg-headroom-too-small",
        lambda f: f.agg("--headroom-bits", "6", "--clients-per-round", "4"),
        "exceeds what headroom_bits 6 holds",
    ),
    (
        "agg-idle-below-heartbeat",
        lambda f: f.agg("--idle-timeout", "10"),
        "heartbeat_interval (15.0) must be below idle_timeout (10.0)",
    ),
    (
        "agg-per-round-and-fraction",
        lambda f: f.agg("--clients-per-round", "3", "--clients-fraction", "0.5"),
        "clients_per_round or clients_fraction, not both",
    ),
    # ------------------------------------------------------------------ relay
    ("relay-upstream-form", lambda f: f.relay("--upstream", "nowhere"), "HOST:PORT"),
    ("relay-cert-missing", lambda f: f.relay("--cert", f.path("no.pem")), "no.pem"),
    (
        "relay-server-cert",
        lambda f: f.relay(
            "--cert", str(f.pki / "aggregator.pem"), "--key", str(f.pki / "aggregator.key")
        ),
        "not issued for clientAuth",
    ),
    (
        "relay-key-of-another-cert",
        lambda f: f.relay("--key", str(f.pki / "client-0.key")),
        "does not match certificate",
    ),
    (
        "relay-federation-garbage",
        lambda f: f.relay("--federation", f.path("garbage.json")),
        "garbage.json",
    ),
    ("relay-name", lambda f: f.relay("--name", "bad name!"), "name"),
    ("relay-config-missing", lambda f: f.relay("--config", f.path("none.toml")), "none.toml"),
    # ------------------------------------------------------------------ client
    ("client-server-form", lambda f: f.client("--server", "nowhere"), "HOST:PORT"),
    ("client-partition-range", lambda f: f.client("--partition", "5/3"), "partition"),
    ("client-partition-form", lambda f: f.client("--partition", "half"), "partition"),
    ("client-cert-missing", lambda f: f.client("--cert", f.path("no.pem")), "no.pem"),
    ("client-key-missing", lambda f: f.client("--key", f.path("no.key")), "no.key"),
    ("client-ca-missing", lambda f: f.client("--ca", f.path("noca.pem")), "noca.pem"),
    (
        "client-federation-missing",
        lambda f: f.client("--federation", f.path("nofed.json")),
        "nofed.json",
    ),
    (
        "client-federation-garbage",
        lambda f: f.client("--federation", f.path("garbage.json")),
        "garbage.json",
    ),
    (
        "client-private-key-missing",
        lambda f: f.client("--private-key", f.path("nopriv.json")),
        "nopriv.json",
    ),
    ("client-decrypt-workers", lambda f: f.client("--decrypt-workers", "0"), "--decrypt-workers"),
    ("client-min-key-bits", lambda f: f.client("--min-key-bits", "1"), "min_key_bits"),
    ("client-threads", lambda f: f.client("--threads", "0"), "threads"),
    ("client-batch-size", lambda f: f.client("--batch-size", "0"), "batch"),
    ("client-alpha", lambda f: f.client("--scheme", "dirichlet", "--alpha", "0"), "alpha"),
    ("client-dataset", lambda f: f.client("--dataset", "cifar"), "--dataset"),
    # ------------------------------------------------------------------ federation, demo
    ("federation-no-out", lambda f: ["federation", *f.agg()[1:-1]], "--out"),
    (
        "federation-out-in-missing-dir",
        lambda f: ["federation", *f.agg()[1:-1], "--out", f.path("no/dir/fed.json")],
        "fed.json",
    ),
    ("demo-clients", lambda f: ["demo", "--clients", "0"], "clients"),
    ("demo-rounds", lambda f: ["demo", "--rounds", "0"], "rounds"),
    ("demo-key-bits", lambda f: ["demo", "--key-bits", "100"], "key"),
    ("demo-value-bits", lambda f: ["demo", "--value-bits", "1"], "--value-bits"),
    ("demo-relays", lambda f: ["demo", "--relays", "-1"], "relays"),
    (
        "demo-threshold",
        lambda f: ["demo", "--key-mode", "threshold", "--threshold", "6", "--parties", "5"],
        "threshold",
    ),
    ("demo-dataset", lambda f: ["demo", "--dataset", "mnist"], "--dataset"),
    ("no-command", lambda f: [], "COMMAND"),
    ("unknown-command", lambda f: ["serve"], "serve"),
]

# An out-of-range flag value for every setting that has a range.
AGGREGATOR_RANGES: dict[str, str] = {
    "port": "70000",
    "metrics_port": "-1",
    "min_clients": "1",
    "clients_per_round": "1",
    "clients_fraction": "1.5",
    "rounds": "0",
    "round_timeout": "0",
    "wait_for_clients_timeout": "-1",
    "max_failed_rounds": "0",
    "round_interval": "-1",
    "max_inflight_uploads": "0",
    "upload_min_rate": "0",
    "upload_start_timeout": "0",
    "fold_workers": "65",
    "max_connections": "0",
    "max_connections_per_client": "-1",
    "receive_buffer": "100",
    "value_bits": "1",
    "headroom_bits": "0",
    "clip": "0",
    "max_weight": "0",
    "samples_per_weight": "0",
    "report_metrics": '[["accuracy"]]',
    "min_key_bits": "100",
    "chunk_ciphertexts": "0",
    "committee_size": "-1",
    "decrypt_shard_timeout": "0",
    "resume_grace": "-1",
    "unmasker_grace": "-1",
    "handshake_timeout": "0",
    "idle_timeout": "0",
    "heartbeat_interval": "-1",
    "local_epochs": "0",
    "learning_rate": "0",
    "allowed_clients": ",",
}
RELAY_RANGES: dict[str, str] = {
    "port": "70000",
    "metrics_port": "-1",
    "clients_per_round": "0",
    "max_inflight_uploads": "0",
    "upload_min_rate": "0",
    "upload_start_timeout": "0",
    "fold_workers": "-1",
    "max_connections": "0",
    "max_connections_per_client": "-1",
    "handshake_timeout": "0",
    "idle_timeout": "0",
    "heartbeat_interval": "0",
    "backoff_base": "0",
    "backoff_max": "0.1",
    "resume_grace": "-1",
    "forward_margin": "1",
    "reconnect_attempts": "-1",
}
# Settings any value of their type suits; their wrong-type case covers them.
UNRANGED = {"public_key", "cert", "key", "ca", "state_dir", "host", "metrics_host", "model"}
UNRANGED |= {"model_kwargs", "seed", "upstream", "federation", "name", "server_hostname"}
UNRANGED |= {"receive_buffer"}


def _wrong_type(cls: type, setting: str) -> str:
    """A TOML value of the wrong type for ``setting``: a string for a number, else 5."""
    hint = str(typing.get_type_hints(cls)[setting])
    return '"ten"' if hint.startswith(("int", "float", "<class 'int'>", "<class 'float'>")) else "5"


def _toml_case(daemon: str, setting: str) -> Case:
    """``setting`` given a wrong-type value in a TOML file that is otherwise good."""

    def argv(f: Files) -> list[str]:
        from fedcore.aggregator import AggregatorConfig, RelayConfig

        base = f.agg() if daemon == "aggregator" else f.relay()
        good = _settings_of(base[1:-1])
        cls = AggregatorConfig if daemon == "aggregator" else RelayConfig
        good[setting] = _wrong_type(cls, setting)
        path = f.tmp / f"{daemon}-{setting}.toml"
        path.write_text("".join(f"{name} = {value}\n" for name, value in good.items()))
        return [daemon, "--config", str(path), "--check-config"]

    return (f"{daemon}-toml-type-{setting}", argv, f"{daemon} setting {setting} must be")


def _settings_of(flags: list[str]) -> dict[str, str]:
    """``--flag value`` pairs as TOML ``key = value`` texts."""
    out: dict[str, str] = {}
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        if name == "model_kwargs":
            out[name] = "{ in_features = 64 }"
        else:
            out[name] = value if value.lstrip("-").isdigit() else json.dumps(value)
    return out


def _range_case(daemon: str, setting: str, value: str) -> Case:
    flag = "--" + setting.replace("_", "-")

    def argv(f: Files) -> list[str]:
        base = f.agg() if daemon == "aggregator" else f.relay()
        return [*base, flag, value]

    return (f"{daemon}-range-{setting}", argv, setting)


SETTING_CASES: list[Case] = [
    *(_toml_case("aggregator", s) for s in AGGREGATOR_SETTINGS),
    *(_toml_case("relay", s) for s in RELAY_SETTINGS),
    *(_range_case("aggregator", s, v) for s, v in AGGREGATOR_RANGES.items()),
    *(_range_case("relay", s, v) for s, v in RELAY_RANGES.items()),
]


def test_every_setting_has_a_case() -> None:
    """A setting added to a daemon without an out-of-range case here fails this test."""
    from dataclasses import fields

    from fedcore.aggregator import AggregatorConfig, RelayConfig

    assert set(AGGREGATOR_SETTINGS) == {f.name for f in fields(AggregatorConfig)}
    assert set(RELAY_SETTINGS) == {f.name for f in fields(RelayConfig)}
    assert set(AGGREGATOR_SETTINGS) <= set(AGGREGATOR_RANGES) | UNRANGED
    assert set(RELAY_SETTINGS) <= set(RELAY_RANGES) | UNRANGED | {"allowed_clients"}


@pytest.mark.parametrize(
    ("argv_of", "phrase"),
    [c[1:] for c in CASES + SETTING_CASES],
    ids=[c[0] for c in CASES + SETTING_CASES],
)
def test_a_user_mistake_is_one_line_and_exit_2(
    files: Files,
    argv_of: Callable[[Files], list[str]],
    phrase: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--log-level", "error", *argv_of(files)]
    code = main(argv)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert code == 2, (out.out, out.err)
    assert len(lines) == 1, out.err
    assert "Traceback" not in out.err
    assert lines[0].startswith("fedcore"), lines[0]
    assert "error:" in lines[0]
    assert phrase in lines[0], lines[0]


def _run(argv: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedcore", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_port_in_use_is_one_line_from_a_real_process(files: Files) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [*files.agg()[:-1], "--port", str(port)]  # a real start, not --check-config
        done = _run(argv)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert f"port {port} on 127.0.0.1 is in use" in last
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback_and_the_same_line(files: Files) -> None:
    done = _run(["--debug", *files.agg("--key", str(files.pki / "client-0.key"))])
    assert done.returncode == 2
    assert "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("give the .key written next to that .pem")


def test_check_config_passes_a_good_config(files: Files) -> None:
    done = _run(files.agg())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config OK")
    assert "535,818" not in done.stdout and "values" in done.stdout


def test_the_readme_toml_example_passes_check_config(files: Files) -> None:
    """The README's aggregator TOML, as written, with this test's files for its paths."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    paths = {
        '"keys/public_key.json"': json.dumps(str(files.keys.public)),
        '"pki/aggregator.pem"': json.dumps(str(files.pki / "aggregator.pem")),
        '"pki/aggregator.key"': json.dumps(str(files.pki / "aggregator.key")),
        '"pki/ca.pem"': json.dumps(str(files.pki / "ca.pem")),
        '"state"': json.dumps(files.path("readme-state")),
    }
    for old, new in paths.items():
        assert old in block, f"the README's TOML no longer sets {old}"
        block = block.replace(old, new)
    config = files.tmp / "readme.toml"
    config.write_text(block)
    # the test key is 1024 bits and the ports may be taken here: flags override those
    argv = ["aggregator", "--config", str(config), "--min-key-bits", "1024"]
    done = _run([*argv, "--port", "0", "--metrics-port", "0", "--check-config"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("config OK")


def test_every_flag_of_every_command_has_help() -> None:
    from fedcore.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    silent = [
        (name, action.option_strings[0])
        for name, sub in commands.items()
        for action in sub._actions
        if action.option_strings and not action.help
    ]
    assert silent == []
    assert "(default: 8765)" in " ".join(commands["aggregator"].format_help().split())
