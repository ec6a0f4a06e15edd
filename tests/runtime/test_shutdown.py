"""Ctrl-C of `fedcore aggregator` and `fedcore demo`, run as real processes over TLS on
127.0.0.1: the first one says "stopping" at once and the process is gone within seconds
(the round in flight abandoned, even deep in decryption), the second exits at once with
130, never with a traceback; the demo takes its client processes with it; and a
stopped daemon restarted on its state directory resumes from its last checkpoint."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import pytest

from fedcore.aggregator import Checkpoint
from fedcore.cli import main as fedcore_main
from fedcore.client.committee import CommitteeMember
from fedcore.contracts import FederationParams

from .conftest import Keys, make_client

STOPPING = "stopping (Ctrl-C again to exit at once)"
STOP_NOTICE_SECONDS = 1.0  # from the signal to the "stopping" line
STOP_EXIT_SECONDS = 3.0  # from the signal to the process being gone
FORCED_EXIT_SECONDS = 1.0  # from the second signal to the process being gone


class _Lines:
    """Every line of a child's stream, with the time it arrived (read in a thread)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def first(self, text: str) -> float | None:
        """When the first line containing ``text`` arrived, if one did."""
        return next((at for at, line in list(self.lines) if text in line), None)

    def text(self) -> str:
        self._thread.join(timeout=5)
        return "\n".join(line for _, line in self.lines)


async def _until(condition: Any, timeout: float, what: str) -> None:
    """Poll ``condition()`` (without blocking the event loop) until true, or fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------- aggregator
def _daemon_config(tmp_path: Path, pki: Path, keys: Keys) -> tuple[Path, FederationParams]:
    """A 3-round, 3-client TOML config on a fixed port, and the federation clients pin."""
    config = tmp_path / "fed.toml"
    config.write_text(
        "[aggregator]\n"
        f'public_key = "{keys.public}"\ncert = "{pki / "aggregator.pem"}"\n'
        f'key = "{pki / "aggregator.key"}"\nca = "{pki / "ca.pem"}"\n'
        f'state_dir = "{tmp_path / "state"}"\nport = {_free_port()}\nmetrics_port = 0\n'
        'model = "fedcore.model:mlp"\nmodel_kwargs = { in_features = 64 }\n'
        "min_clients = 3\nclients_per_round = 3\nrounds = 3\nround_timeout = 60.0\n"
        "committee_size = 2\nlocal_epochs = 1\nresume_grace = 0.0\nmin_key_bits = 1024\n"
        "unmasker_grace = 5.0\n"
    )
    federation_file = tmp_path / "federation.json"
    argv = ["federation", "--config", str(config), "--out", str(federation_file)]
    assert fedcore_main(argv) == 0
    return config, FederationParams.load(federation_file)


def _start_daemon(config: Path) -> tuple[subprocess.Popen[str], _Lines]:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "fedcore", "aggregator", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert daemon.stderr is not None
    return daemon, _Lines(daemon.stderr)


def _stall_decryption_of(round_id: int, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Key holders take an hour to decrypt round ``round_id``; the event: one started."""
    started = asyncio.Event()
    decrypt = CommitteeMember.decrypt

    async def stalled(self: CommitteeMember, request: Any, codec: Any) -> Any:
        if request.round_id == round_id:
            started.set()
            await asyncio.sleep(3600)  # cancelled when the aggregator hangs up
        return await decrypt(self, request, codec)

    monkeypatch.setattr(CommitteeMember, "decrypt", stalled)
    return started


def _port_of(config: Path) -> int:
    line = next(x for x in config.read_text().splitlines() if x.startswith("port = "))
    return int(line.split("=")[1])


@pytest.mark.slow
async def test_ctrl_c_mid_decryption_stops_the_aggregator_and_a_restart_resumes(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, federation = _daemon_config(tmp_path, pki, keys)
    decrypting = _stall_decryption_of(2, monkeypatch)
    daemon, err = _start_daemon(config)
    clients = [
        make_client(i, pki, keys, digits, 3, federation=federation, reconnect_attempts=200)
        for i in range(3)
    ]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{_port_of(config)}")) for c in clients]
    restarted: subprocess.Popen[str] | None = None
    try:
        await _until(decrypting.is_set, 180, "round 2's decryption")
        assert Checkpoint.load(tmp_path / "state").rounds_completed == 1
        sent = time.monotonic()
        daemon.send_signal(signal.SIGINT)
        await _until(lambda: err.first(STOPPING) is not None, 10, "the stopping line")
        await _until(lambda: daemon.poll() is not None, 30, "the daemon to exit")
        gone = time.monotonic()
        log = err.text()
        noticed = err.first(STOPPING)
        assert noticed is not None and noticed - sent <= STOP_NOTICE_SECONDS, log[-3000:]
        assert gone - sent <= STOP_EXIT_SECONDS, log[-3000:]
        assert daemon.returncode == 0 and "Traceback" not in log, log[-3000:]
        assert "round 2 abandoned" in log
        stopped = Checkpoint.load(tmp_path / "state")
        assert (stopped.rounds_completed, stopped.next_round_id) == (1, 3)

        restarted, err = _start_daemon(config)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
        await _until(lambda: restarted.poll() is not None, 60, "the restarted daemon to finish")
        log = err.text()
        assert restarted.returncode == 0, log[-3000:]
    finally:
        await _cancel(tasks)
        for process in (daemon, restarted):
            if process is not None and process.poll() is None:
                process.kill()
    assert "resuming from checkpoint: 1 rounds completed, next round id 3" in log
    final = Checkpoint.load(tmp_path / "state")
    completed = [r["round_id"] for r in final.history if r["phase"] == "completed"]
    assert final.rounds_completed == 3 and completed == [1, 3, 4]
    abandoned = next(r for r in final.history if r["round_id"] == 2)
    assert abandoned["failure"] == "abandoned: the aggregator stopped"
    assert abandoned["unmaskers"]  # whom round 3, its rerun, had to wait for
    # every round's updates were accepted, round 2's too: it was abandoned after
    assert sum(r.rounds_contributed for r in results) == 4 * 3


@pytest.mark.slow
async def test_a_second_ctrl_c_ends_the_aggregator_at_once_and_its_checkpoint_stands(
    tmp_path: Path, pki: Path, keys: Keys, digits: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    config, federation = _daemon_config(tmp_path, pki, keys)
    decrypting = _stall_decryption_of(2, monkeypatch)
    daemon, err = _start_daemon(config)
    clients = [make_client(i, pki, keys, digits, 3, federation=federation) for i in range(3)]
    tasks = [asyncio.create_task(c.run(f"127.0.0.1:{_port_of(config)}")) for c in clients]
    try:
        await _until(decrypting.is_set, 180, "round 2's decryption")
        daemon.send_signal(signal.SIGINT)
        await _until(lambda: err.first(STOPPING) is not None, 10, "the stopping line")
        sent = time.monotonic()
        daemon.send_signal(signal.SIGINT)
        await _until(lambda: daemon.poll() is not None, 30, "the daemon to exit")
        gone = time.monotonic()
    finally:
        await _cancel(tasks)
        if daemon.poll() is None:
            daemon.kill()
    log = err.text()
    assert daemon.returncode == 130 and gone - sent <= FORCED_EXIT_SECONDS, log[-3000:]
    assert "exiting now" in log and "Traceback" not in log, log[-3000:]
    # the decryption never finished: the checkpoint is round 1's, whole, to resume from
    assert Checkpoint.load(tmp_path / "state").rounds_completed == 1


# ---------------------------------------------------------------------------- demo
def _descendants(pid: int) -> set[int]:
    """Every living descendant of ``pid`` (from /proc)."""
    found: set[int] = set()
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in threads:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found |= {child, *_descendants(child)}
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start_demo(tmp_path: Path) -> tuple[subprocess.Popen[str], _Lines, _Lines]:
    """`fedcore demo` on digits, 3 clients, many rounds, a fast 512-bit key, in its own
    session: a signal to its process group is what a terminal's Ctrl-C does."""
    demo = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedcore",
            "demo",
            "--dataset",
            "digits",
            "--clients",
            "3",
            "--rounds",
            "50",
            "--key-bits",
            "512",
            "--workdir",
            str(tmp_path / "work"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert demo.stdout is not None and demo.stderr is not None
    return demo, _Lines(demo.stdout), _Lines(demo.stderr)


async def _demo_in_round_2(demo: subprocess.Popen[str], err: _Lines) -> set[int]:
    """Wait until round 2 is collecting; the demo's descendants then (clients, workers)."""
    await _until(
        lambda: err.first("round 2/50: clients training") is not None or demo.poll() is not None,
        300,
        "round 2 of the demo",
    )
    assert demo.poll() is None, err.text()[-3000:]
    family = _descendants(demo.pid)
    assert len(family) >= 3  # the clients at least
    return family


@pytest.mark.slow
async def test_ctrl_c_stops_the_demo_and_every_client_process(tmp_path: Path) -> None:
    demo, out, err = _start_demo(tmp_path)
    try:
        family = await _demo_in_round_2(demo, err)
        sent = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)
        await _until(lambda: demo.poll() is not None, 30, "the demo to exit")
        gone = time.monotonic()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    log, printed = err.text(), out.text()
    noticed = err.first(STOPPING)
    assert noticed is not None and noticed - sent <= STOP_NOTICE_SECONDS, log[-3000:]
    assert gone - sent <= STOP_EXIT_SECONDS, log[-3000:]
    assert demo.returncode == 130, log[-3000:]
    assert "Traceback" not in log + printed and "leaked" not in log, log[-3000:]
    await _until(lambda: not any(_alive(pid) for pid in family), 2, "no orphan left")
    assert "local training: 5 epochs a round, lr 0.1, batch 32, momentum 0.9" in printed
    assert "stopped: 1/50 rounds" in printed, printed[-2000:]
    assert Checkpoint.load(tmp_path / "work" / "state-enc").rounds_completed == 1


@pytest.mark.slow
async def test_a_second_ctrl_c_ends_the_demo_and_its_clients_at_once(tmp_path: Path) -> None:
    demo, out, err = _start_demo(tmp_path)
    try:
        family = await _demo_in_round_2(demo, err)
        os.killpg(demo.pid, signal.SIGINT)
        await _until(lambda: err.first(STOPPING) is not None, 10, "the stopping line")
        sent = time.monotonic()
        os.killpg(demo.pid, signal.SIGINT)
        await _until(lambda: demo.poll() is not None, 30, "the demo to exit")
        gone = time.monotonic()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    log, printed = err.text(), out.text()
    assert demo.returncode == 130 and gone - sent <= FORCED_EXIT_SECONDS, log[-3000:]
    assert "Traceback" not in log + printed and "leaked" not in log, log[-3000:]
    await _until(lambda: not any(_alive(pid) for pid in family), 2, "no orphan left")
