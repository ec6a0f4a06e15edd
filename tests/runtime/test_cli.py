"""The `fedcore` command line as users run it: keygen, certs, bad settings, client, demo."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedcore.aggregator import Aggregator
from fedcore.cli import main
from fedcore.client import Client, ClientConfig
from fedcore.contracts import FederationParams
from fedcore.crypto import (
    KeyShare,
    PrivateKey,
    PublicKey,
    ThresholdPublicKey,
    combine,
    deal,
    generate_keypair,
)
from fedcore.errors import ConfigError
from fedcore.model import mlp

from .conftest import Keys, ThresholdKeys, aggregator_argv, aggregator_config


def _client_argv(pki: Path, index: int, port: int, federation: Path) -> list[str]:
    """`fedcore client` as a user runs it, for client ``index`` of this PKI, on digits."""
    return [
        sys.executable,
        "-m",
        "fedcore.cli",
        "client",
        "--server",
        f"127.0.0.1:{port}",
        "--server-hostname",
        "localhost",
        "--cert",
        str(pki / f"client-{index}.pem"),
        "--key",
        str(pki / f"client-{index}.key"),
        "--ca",
        str(pki / "ca.pem"),
        "--federation",
        str(federation),
        "--min-key-bits",
        "1024",
        "--dataset",
        "digits",
    ]


def test_keygen_writes_a_0600_private_key_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "--bits", "512", "--out", str(tmp_path)]) == 0
    public = PublicKey.load(tmp_path / "public_key.json")
    private = PrivateKey.load(tmp_path / "private_key.json")
    assert private.public_key == public and public.bits == 512
    assert stat.S_IMODE(os.stat(tmp_path / "private_key.json").st_mode) == 0o600
    assert public.fingerprint() in capsys.readouterr().out
    assert main(["keygen", "--bits", "512", "--out", str(tmp_path)]) == 2
    assert "already holds a keypair" in capsys.readouterr().err
    assert PublicKey.load(tmp_path / "public_key.json") == public


def test_keygen_refuses_a_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", "--bits", "100", "--out", str(tmp_path)]) == 2
    assert "argument --bits: must be >= 512" in capsys.readouterr().err


def test_certs_writes_the_federation_pki(tmp_path: Path) -> None:
    assert main(["certs", "--out", str(tmp_path), "--clients", "2", "--san", "agg.test"]) == 0
    for name in ["ca.pem", "aggregator.pem", "client-0.pem", "client-1.pem"]:
        assert (tmp_path / name).read_text().startswith("-----BEGIN CERTIFICATE-----")
    for name in ["ca.key", "aggregator.key", "client-0.key", "client-1.key"]:
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_aggregator_bad_settings_are_a_clear_error(
    tmp_path: Path, pki: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    base = aggregator_argv(pki, keys, tmp_path / "state")
    assert main([*base, "--min-clients", "0"]) == 2
    assert "min_clients must be >= 2" in capsys.readouterr().err
    # the 1024-bit test key is refused unless explicitly allowed
    assert main([*base, "--model-arg", "in_features=64"]) == 2
    assert "1024 bits; at least 2048 are required" in capsys.readouterr().err
    assert main([*base[:2], str(tmp_path / "nope.json"), *base[3:]]) == 2
    assert "nope.json" in capsys.readouterr().err
    assert main([*base, "--model", "fedcore.model:no_such_factory"]) == 2
    assert "no_such_factory" in capsys.readouterr().err


def test_private_key_file_readable_by_others_is_refused(tmp_path: Path, keys: Keys) -> None:
    loose = tmp_path / "private_key.json"
    loose.write_bytes(keys.private.read_bytes())
    loose.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        PrivateKey.load(loose)


@pytest.mark.slow
async def test_fedcore_client_processes_complete_a_round(
    tmp_path: Path, pki: Path, keys: Keys
) -> None:
    config = aggregator_config(
        tmp_path, pki, keys, min_clients=2, clients_per_round=2, rounds=1, local_epochs=1
    )
    aggregator = Aggregator(config)
    federation = tmp_path / "federation.json"
    aggregator.federation.save(federation)
    task = asyncio.create_task(aggregator.run())
    await aggregator.wait_started()
    procs = [
        await asyncio.create_subprocess_exec(
            *_client_argv(pki, i, aggregator.port, federation),
            "--private-key",
            str(keys.private),
            "--partition",
            f"{i}/2",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    checkpoint = await asyncio.wait_for(task, 180)
    outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    assert checkpoint.rounds_completed == 1
    assert sorted(checkpoint.history[-1]["contributors"]) == ["client-0", "client-1"]
    for proc, (out, _) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out.decode()[-2000:]
        assert "1 rounds contributed" in out.decode()


_DEMO_KEY = ("--key-bits", "1024")


def _demo(
    tmp_path: Path, *argv: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """`fedcore demo ARGV --key-bits 1024` in a subprocess: it must succeed; its summary."""
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fedcore.cli", "demo", *argv, *_DEMO_KEY, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_demo_runs_the_readme_main_job_small(tmp_path: Path) -> None:
    """`fedcore demo` end to end (client processes, TLS, 1024-bit key), small and quick."""
    argv = ["--dataset", "digits", "--clients", "3", "--rounds", "2"]
    proc, summary = _demo(tmp_path, *argv, timeout=600)
    assert summary["rounds_completed"] == 2 and summary["encrypted"] is True
    assert summary["dataset"] == "digits" and summary["clients"] == 3
    assert len(summary["round_seconds"]) == 2 and all(s > 0 for s in summary["round_seconds"])
    assert 0.5 < summary["final_accuracy"] <= 1.0
    assert summary["bytes_uploaded"] > 0
    assert "round  2/2" in proc.stdout and "final test accuracy" in proc.stdout


def test_federation_command_writes_what_clients_pin(
    tmp_path: Path, pki: Path, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "federation.json"
    argv = [*aggregator_argv(pki, keys, tmp_path / "state"), "--min-key-bits", "1024"]
    argv[0] = "federation"
    assert main([*argv, "--clients-per-round", "5", "--out", str(out)]) == 0
    pinned = FederationParams.load(out)
    config = aggregator_config(tmp_path, pki, keys, clients_per_round=5)
    assert pinned == config.federation(config.load_public_key())
    printed = capsys.readouterr().out
    assert pinned.digest().hex() in printed and PublicKey.load(keys.public).sha256() in printed
    assert pinned.headroom_bits == 9  # 5 clients x max_weight 64 = 320 <= 2^9


@pytest.mark.slow
async def test_a_client_pinned_to_another_federation_stops_with_one_line(
    tmp_path: Path, pki: Path, keys: Keys
) -> None:
    config = aggregator_config(tmp_path, pki, keys, clients_per_round=3, rounds=1)
    aggregator = Aggregator(config)
    other = tmp_path / "other.json"  # what a client was handed: another quorum
    aggregator_config(tmp_path, pki, keys, min_clients=4, clients_per_round=4).federation(
        aggregator.public_key
    ).save(other)
    task = asyncio.create_task(aggregator.run())
    await aggregator.wait_started()
    proc = await asyncio.create_subprocess_exec(
        *_client_argv(pki, 0, aggregator.port, other),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    aggregator.request_stop()
    await asyncio.wait_for(task, 30)
    assert proc.returncode == 2, err.decode()[-2000:]
    lines = [line for line in err.decode().splitlines() if "fedcore client: error" in line]
    assert len(lines) == 1 and "min_clients: the aggregator says 3, pinned 4" in lines[0]
    assert "Traceback" not in err.decode()
    assert aggregator.metrics.registry.get_sample_value("fedcore_updates_accepted_total") == 0


def test_keygen_threshold_deals_shares_any_t_of_which_decrypt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["keygen", "--bits", "512", "--threshold", "2", "--parties", "3", "--out"]
    assert main([*argv, str(tmp_path)]) == 0
    public = ThresholdPublicKey.load(tmp_path / "public_key.json")
    assert (public.threshold, public.parties, public.public_key.bits) == (2, 3, 512)
    shares = [KeyShare.load(tmp_path / f"share-{i}.json") for i in (1, 2, 3)]
    for i in (1, 2, 3):
        assert stat.S_IMODE(os.stat(tmp_path / f"share-{i}.json").st_mode) == 0o600
    out = capsys.readouterr().out
    assert public.sha256() in out and "delete it here" in out
    assert not list(tmp_path.glob("*private*")), "the dealer must not write p and q"
    ciphertexts = public.public_key.encrypt_vector([42, 7])
    partials = [share.partial_decrypt(ciphertexts) for share in shares]
    assert combine(public, partials[1:]) == [42, 7] == combine(public, partials[::2])
    assert main([*argv, str(tmp_path)]) == 2  # never overwrites shares by accident
    assert "use --force" in capsys.readouterr().err
    assert ThresholdPublicKey.load(tmp_path / "public_key.json") == public


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threshold", "2"], "--threshold T and --parties N go together"),
        (["--threshold", "4", "--parties", "3"], "threshold must be in 1..parties (3), got 4"),
        (["--threshold", "2", "--parties", "65"], "parties must be in 2..64"),
        (["--threshold", "2", "--parties", "3", "--bits", "520"], "multiple of 16"),
    ],
)
def test_keygen_threshold_bad_flags_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["keygen", "--bits", "512", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_key_share_in_a_shared_federation_is_refused(
    tmp_path: Path, pki: Path, keys: Keys, threshold_keys: ThresholdKeys
) -> None:
    config = aggregator_config(tmp_path, pki, keys)
    shared = config.federation(config.load_public_key())
    settings = {
        "cert": pki / "client-0.pem",
        "key": pki / "client-0.key",
        "ca": pki / "ca.pem",
        "min_key_bits": 1024,
    }
    with pytest.raises(ConfigError, match="threshold key share, but the federation's key mode"):
        Client(
            mlp(64),
            lambda *a: 1,
            None,
            ClientConfig(**settings, federation=shared, key_share=threshold_keys.shares[0]),
        )
    tconfig = aggregator_config(
        tmp_path, pki, Keys(public=threshold_keys.public, private=keys.private)
    )
    threshold = tconfig.federation(tconfig.load_public_key())
    assert threshold.mode == "threshold"
    with pytest.raises(ConfigError, match="no whole private key"):
        Client(
            mlp(64),
            lambda *a: 1,
            None,
            ClientConfig(**settings, federation=threshold, private_key=keys.private),
        )
    other = tmp_path / "other"
    assert (
        main(
            ["keygen", "--bits", "1024", "--threshold", "3", "--parties", "5", "--out", str(other)]
        )
        == 0
    )
    with pytest.raises(ConfigError, match="belongs to threshold key"):
        Client(
            mlp(64),
            lambda *a: 1,
            None,
            ClientConfig(**settings, federation=threshold, key_share=other / "share-1.json"),
        )


def test_demo_threshold_needs_a_client_per_share(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["demo", "--key-mode", "threshold", "--clients", "4", "--dataset", "digits"]
    assert main(argv) == 2
    assert "needs at least 5 clients (one per key share)" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_a_3_of_5_threshold_federation(tmp_path: Path) -> None:
    """`fedcore demo --key-mode threshold`: five share holders over TLS, in processes."""
    argv = ["--key-mode", "threshold", "--dataset", "digits", "--clients", "5", "--rounds", "1"]
    proc, summary = _demo(tmp_path, *argv, timeout=900)
    assert summary["rounds_completed"] == 1 and summary["key_mode"] == "threshold"
    assert summary["threshold"] == "3-of-5"
    # one round of the demo's training on digits: well above chance (10%), not converged
    assert 0.2 < summary["final_accuracy"] <= 1.0
    assert "3-of-5 threshold key" in proc.stdout


@pytest.mark.slow
def test_demo_runs_through_relays(tmp_path: Path) -> None:
    """`fedcore demo --relays 2`: relay processes between the root and 4 of 7 clients."""
    argv = ["--dataset", "digits", "--clients", "7", "--rounds", "1", "--relays", "2"]
    proc, summary = _demo(tmp_path, *argv, timeout=900)
    assert summary["rounds_completed"] == 1 and summary["relays"] == 2
    assert 0.2 < summary["final_accuracy"] <= 1.0
    assert "2 relays joined the aggregator" in proc.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--plaintext"], "--relays needs an encrypted run"),
        (["--clients", "4"], "--relays 2 needs at least 2 clients besides the 3 key holders"),
    ],
)
def test_demo_relays_need_encryption_and_clients(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--relays", "2", "--dataset", "digits", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_client_pins_the_key_file_of_either_mode(
    tmp_path: Path, pki: Path, keys: Keys, threshold_keys: ThresholdKeys
) -> None:
    """--public-key: the federation file's key must be the key authority's (or dealer's)."""
    config = aggregator_config(tmp_path, pki, keys)
    shared = config.federation(config.load_public_key())
    tconfig = aggregator_config(
        tmp_path, pki, Keys(public=threshold_keys.public, private=keys.private)
    )
    threshold = tconfig.federation(tconfig.load_public_key())
    settings = {"cert": pki / "client-0.pem", "key": pki / "client-0.key", "ca": pki / "ca.pem"}
    other_shared, _ = generate_keypair(1024)
    other_shared.save(tmp_path / "other-public.json")
    other_threshold, _ = deal(1024, 3, 5)
    other_threshold.save(tmp_path / "other-threshold.json")
    for federation, right, wrong, what in (
        (shared, keys.public, tmp_path / "other-public.json", "public key"),
        (threshold, threshold_keys.public, tmp_path / "other-threshold.json", "threshold key"),
    ):
        pinned = ClientConfig(
            **settings, federation=federation, public_key=right, min_key_bits=1024
        )
        assert pinned.load_federation() == federation
        mismatched = ClientConfig(
            **settings, federation=federation, public_key=wrong, min_key_bits=1024
        )
        with pytest.raises(ConfigError, match=f"federation file's {what} .* is not the one in"):
            mismatched.load_federation()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cert", "r.pem", "--key", "r.key", "--ca", "ca.pem"], "'upstream' is required"),
        (
            ["--upstream", "root", "--cert", "r.pem", "--key", "r.key", "--ca", "ca.pem"],
            "HOST:PORT",
        ),
        (
            [
                "--upstream",
                "root:8765",
                "--cert",
                "missing.pem",
                "--key",
                "r.key",
                "--ca",
                "ca.pem",
            ],
            "relay cert file missing.pem does not exist (--cert)",
        ),
    ],
)
def test_relay_flag_mistakes_get_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["relay", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_relay_with_a_key_of_another_certificate_no_upstream_or_a_bad_federation_file(
    tmp_path: Path, pki: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["relay", "--cert", str(pki / "relay-0.pem"), "--ca", str(pki / "ca.pem")]
    wrong_key = [*base, "--key", str(pki / "client-0.key"), "--upstream", "127.0.0.1:1"]
    assert main(wrong_key) == 2
    assert "does not match certificate" in capsys.readouterr().err
    argv = [*base, "--key", str(pki / "relay-0.key"), "--upstream", "127.0.0.1:1"]
    assert main([*argv, "--reconnect-attempts", "0", "--metrics-port", "0", "--port", "0"]) == 2
    assert "cannot reach the upstream 127.0.0.1:1" in capsys.readouterr().err
    bad = tmp_path / "not-a-federation.json"
    bad.write_text("{}")
    assert main([*argv, "--federation", str(bad)]) == 2
    assert f"federation file {bad}: document type" in capsys.readouterr().err
