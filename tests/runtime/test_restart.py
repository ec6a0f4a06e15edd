"""The aggregator daemon killed mid-round (SIGKILL) and restarted on the same state dir:
training resumes, the interrupted round reruns under a new id, no update is lost or
counted twice. The daemon runs as `fedcore aggregator` in its own process under an
audit hook that records every file it opens: it must never open the private key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fedcore.cli import main as fedcore_main
from fedcore.contracts import FederationParams

from .conftest import Keys, aggregator_argv, make_client, weight_of

_WRAPPER = """
import sys
log = open(sys.argv[1], "a", buffering=1)
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        log.write(str(args[0]) + "\\n")
sys.addaudithook(hook)
from fedcore.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slow(train_fn: Callable[..., int]) -> Callable[..., int]:
    def train(model: Any, config: Any) -> int:
        time.sleep(1.5)  # keep every round open long enough to be interrupted
        return train_fn(model, config)

    return train


def _checkpoint(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / "checkpoint.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
async def test_aggregator_killed_mid_round_resumes_without_losing_or_double_counting(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    port, state, opened = _free_port(), tmp_path / "state", tmp_path / "opened.txt"
    (tmp_path / "fed.toml").write_text(
        "[aggregator]\n"
        f'public_key = "{keys.public}"\ncert = "{pki / "aggregator.pem"}"\n'
        f'key = "{pki / "aggregator.key"}"\nca = "{pki / "ca.pem"}"\n'
        f'state_dir = "{state}"\nport = {port}\nmetrics_port = 0\n'
        'model = "fedcore.model:mlp"\nmodel_kwargs = { in_features = 64 }\n'
        "min_clients = 3\nclients_per_round = 3\nrounds = 3\nround_timeout = 60.0\n"
        "committee_size = 2\nlocal_epochs = 1\nresume_grace = 0.0\nmin_key_bits = 1024\n"
    )
    # the federation file an operator hands to clients, made by the CLI from the same config
    federation_file = tmp_path / "federation.json"
    argv = ["federation", "--config", str(tmp_path / "fed.toml"), "--out", str(federation_file)]
    assert fedcore_main(argv) == 0
    federation = FederationParams.load(federation_file)
    wrapper = tmp_path / "audited.py"
    wrapper.write_text(_WRAPPER)

    def start_daemon() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                str(wrapper),
                str(opened),
                "aggregator",
                "--config",
                str(tmp_path / "fed.toml"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "daemon.log", "ab"),
        )

    daemon = start_daemon()
    clients = [
        make_client(
            i,
            pki,
            keys,
            digits,
            3,
            federation=federation,
            train_wrapper=_slow,
            reconnect_attempts=200,
        )
        for i in range(3)
    ]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in clients]
    try:
        # Wait until round 1 is checkpointed and round 2 has started, then kill -9.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = _checkpoint(state)
            if record.get("rounds_completed") == 1 and record.get("next_round_id") == 3:
                break
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-3000:]
            await asyncio.sleep(0.05)
        else:
            pytest.fail("round 2 never started")
        await asyncio.sleep(0.5)  # clients are training for round 2
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        interrupted = _checkpoint(state)
        assert interrupted["rounds_completed"] == 1

        daemon = start_daemon()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 180)
        assert daemon.wait(60) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        for task in tasks:
            task.cancel()
        if daemon.poll() is None:
            daemon.kill()

    final = _checkpoint(state)
    assert final["rounds_completed"] == 3
    completed = [r for r in final["history"] if r["phase"] == "completed"]
    assert [r["round_id"] for r in completed] == [1, 3, 4]  # round 2 died with the daemon
    for record in completed:
        assert sorted(record["contributors"]) == ["client-0", "client-1", "client-2"]
        expected = sum(weight_of(i, digits, 3, federation) for i in range(3))
        assert record["total_weight"] == expected
    assert sum(r.rounds_contributed for r in results) == 9
    assert all(r.reconnects >= 1 for r in results)

    paths = opened.read_text().splitlines()
    assert any(os.path.samefile(p, keys.public) for p in paths if os.path.exists(p))
    assert not any(os.path.exists(p) and os.path.samefile(p, keys.private) for p in paths), (
        "the aggregator opened the private key"
    )


@pytest.mark.slow
async def test_sigterm_stops_the_daemon_cleanly_mid_round(
    tmp_path: Path, pki: Path, keys: Keys, digits
) -> None:
    port, state = _free_port(), tmp_path / "state"
    settings = ["--min-clients", "2", "--clients-per-round", "2", "--min-key-bits", "1024"]
    model = ["--model", "fedcore.model:mlp", "--model-arg", "in_features=64"]
    federation_file = tmp_path / "federation.json"
    argv = ["federation", *aggregator_argv(pki, keys, state)[1:], *settings, *model]
    assert fedcore_main([*argv, "--out", str(federation_file)]) == 0
    federation = FederationParams.load(federation_file)
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcore.cli",
            *aggregator_argv(pki, keys, state),
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--model",
            "fedcore.model:mlp",
            "--model-arg",
            "in_features=64",
            *settings,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients = [
        make_client(i, pki, keys, digits, 2, federation=federation, train_wrapper=_slow)
        for i in range(2)
    ]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{port}")) for c in clients]
    try:
        deadline = time.monotonic() + 60
        while _checkpoint(state).get("next_round_id") != 2:
            assert time.monotonic() < deadline, "round 1 never started"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # clients are training
        daemon.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(daemon.communicate, timeout=30)
        assert daemon.returncode == 0, err[-3000:]
    finally:
        for task in tasks:
            task.cancel()
        if daemon.poll() is None:
            daemon.kill()
    record = _checkpoint(state)
    assert record["rounds_completed"] == 0 and record["next_round_id"] == 2
    assert "round 1 abandoned" in err and "aggregator stopped" in err
