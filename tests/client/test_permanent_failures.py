"""A client stops with one line saying what to fix when no retry can help, and retries
what a retry can fix.

Real TLS on 127.0.0.1 against a real aggregator (1024-bit Paillier keys), certificates
issued from the federation's test CA (or another one) with `protocol.tls`: refused and
untrusted certificates, and app callbacks that raise or return the wrong type, stop the
client within seconds after one connection, with one ERROR line and no traceback; a
server that is not up yet is waited for; `permanent_failure_retry` keeps trying at its
own pace. Connection attempts are counted at the client's ``connect`` and at the
aggregator's refusal counter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import fedcore.client.session as client_session
from fedcore.aggregator import Aggregator
from fedcore.client import Client, ClientConfig
from fedcore.client.failures import (
    EARLY_CLOSES_BEFORE_PERMANENT,
    ERROR_CODE_POLICY,
    FailureClassifier,
    PermanentFailure,
)
from fedcore.client.reconnect import TRANSIENT_LOG_INTERVAL, serve_reconnecting
from fedcore.contracts import FederationParams
from fedcore.errors import FedcoreError
from fedcore.model import mlp
from protocol.errors import ConnectionClosed, ErrorCode, ErrorReceived
from protocol.messages import Bye, Error
from protocol.refusals import REFUSAL_LABELS
from protocol.tls import (
    FederationPKI,
    generate_ca,
    issue_certificate,
    load_certificate,
    server_context,
    write_certificate,
    write_private_key,
)
from protocol.transport import Backoff
from tests.runtime import conftest as runtime
from tests.runtime.conftest import Keys, aggregator_config

keys = runtime.keys  # the runtime tests' 1024-bit Paillier keypair (a session fixture)

# A stop must come within this many seconds: under one here, the rest is slack for busy CI.
STOPS_WITHIN = 10.0


# ----------------------------------------------------------------------------- helpers
@contextlib.asynccontextmanager
async def _aggregator(
    tmp_path: Path, pki: FederationPKI, keys: Keys, **changes: Any
) -> AsyncIterator[Aggregator]:
    aggregator = Aggregator(aggregator_config(tmp_path, pki.out_dir, keys, **changes))
    task = asyncio.create_task(aggregator.run())
    await asyncio.wait_for(aggregator.wait_started(), 30)
    try:
        yield aggregator
    finally:
        aggregator.request_stop()
        await asyncio.wait_for(task, 30)


def _federation(tmp_path: Path, pki: FederationPKI, keys: Keys) -> FederationParams:
    """The federation the test aggregator offers, without running one."""
    config = aggregator_config(tmp_path, pki.out_dir, keys)
    return config.federation(config.load_public_key())


def _client(
    pki: FederationPKI,
    keys: Keys,
    federation: FederationParams,
    *,
    index: int = 0,
    train_fn: Callable[..., Any] = lambda model, config: 1,
    evaluate_fn: Callable[..., Any] | None = None,
    holds_key: bool = False,
    **config: Any,
) -> Client:
    """client-``index`` of the test PKI with the aggregator's model (overrides: ``config``)."""
    settings: dict[str, Any] = {
        "cert": pki.clients[index].cert,
        "key": pki.clients[index].key,
        "ca": pki.ca_cert,
        "federation": federation,
        "private_key": keys.private if holds_key else None,
        "server_hostname": "localhost",
        "min_key_bits": 1024,
        "encryption_pool": False,
        "backoff_base": 0.1,
        "backoff_max": 0.5,
    }
    settings.update(config)
    return Client(mlp(64), train_fn, evaluate_fn, ClientConfig(**settings))


def _issue_client_certificate(
    pki: FederationPKI,
    out: Path,
    *,
    foreign_ca: bool = False,
    expired: bool = False,
    server_only: bool = False,
) -> tuple[Path, Path]:
    """A certificate for client-0: expired, for server auth only, or from another CA."""
    if foreign_ca:
        ca_key, ca_cert = generate_ca("rogue CA")
    else:
        ca_key = load_pem_private_key(pki.ca.key.read_bytes(), None)  # type: ignore[assignment]
        ca_cert = load_certificate(pki.ca_cert)
    now = dt.datetime.now(dt.UTC)
    key, cert = issue_certificate(
        ca_key,  # type: ignore[arg-type]
        ca_cert,
        "client-0",
        server=server_only,
        not_valid_before=now - dt.timedelta(days=10) if expired else None,
        not_valid_after=now - dt.timedelta(days=1) if expired else None,
    )
    paths = out / "client.pem", out / "client.key"
    write_certificate(paths[0], cert)
    write_private_key(paths[1], key)
    return paths


def _foreign_ca(out: Path) -> Path:
    """A CA certificate that is not the federation's."""
    _, cert = generate_ca("rogue CA")
    write_certificate(out / "rogue-ca.pem", cert)
    return out / "rogue-ca.pem"


def _count_dials(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic times at which clients of this process open a connection."""
    times: list[float] = []
    real = client_session.connect

    async def counting(*args: Any, **kwargs: Any) -> Any:
        times.append(time.monotonic())
        return await real(*args, **kwargs)

    monkeypatch.setattr(client_session, "connect", counting)
    return times


async def _refusals(aggregator: Aggregator, *, at_least: int = 1) -> dict[str, float]:
    """The aggregator's refused connections by reason, once it counted ``at_least``."""
    registry = aggregator.metrics.registry
    counts: dict[str, float] = {}
    for _ in range(50):
        counts = {}
        for label in REFUSAL_LABELS:
            value = registry.get_sample_value(
                "fedcore_connections_refused_total", {"reason": label}
            )
            if value:
                counts[label] = value
        if sum(counts.values()) >= at_least:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # and nothing more comes
    return counts


async def _stops(client: Client, port: int) -> tuple[FedcoreError, float]:
    """The error ``client.run`` stops with, and how long it took."""
    t0 = time.monotonic()
    with pytest.raises(FedcoreError) as stopped:
        await asyncio.wait_for(client.run(f"127.0.0.1:{port}"), 60)
    return stopped.value, time.monotonic() - t0


def _client_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("fedcore.client") and r.levelno == level
    ]


def _assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    logged = [r for r in caplog.records if r.exc_info is not None and r.levelno >= logging.INFO]
    assert logged == []
    assert "Traceback" not in caplog.text


class _BareTlsServer:
    """A TLS server that says nothing: it refuses or completes the handshake, reads the
    client's Hello, and hangs up (after letting the client read any alert it sent)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.outcomes: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            sock.settimeout(5.0)
            tls = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self.outcomes.append(f"refused: {exc}")
                # close with nothing unread, or the reset could overtake the alert: read
                # (below TLS) until the client, having read the alert, hangs up
                with contextlib.suppress(OSError):
                    while socket.socket.recv(tls, 4096):
                        pass
            else:
                self.outcomes.append("handshake")
                with contextlib.suppress(OSError):
                    tls.recv(4096)  # the Hello
            tls.close()

    def close(self) -> None:
        self.listener.close()


# ----------------------------------------------------------------------------- the table
def test_every_error_code_is_decided_and_only_refusals_of_this_side_are_permanent() -> None:
    assert set(ERROR_CODE_POLICY) == set(ErrorCode)
    permanent = {code for code, policy in ERROR_CODE_POLICY.items() if policy.permanent}
    assert permanent == {
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.UNKNOWN_MESSAGE,
        ErrorCode.UNKNOWN_CLIENT,
        ErrorCode.BAD_TOKEN,
        ErrorCode.BAD_KEY_PROOF,
    }
    classifier = FailureClassifier(peer="the aggregator", who="client")
    busy = ErrorReceived(
        "x",
        code=ErrorCode.RATE_LIMITED,
        peer_message=Error(code=int(ErrorCode.RATE_LIMITED), reason="slow down"),
    )
    assert not classifier.classify(busy, joined=True).permanent
    refused = ErrorReceived(
        "x",
        code=ErrorCode.UNKNOWN_CLIENT,
        peer_message=Error(code=int(ErrorCode.UNKNOWN_CLIENT), reason="not a member"),
    )
    failure = classifier.classify(refused, joined=False)
    assert failure.permanent
    assert failure.reason == (
        "the aggregator refused this client (UNKNOWN_CLIENT: not a member): "
        "ask the federation's operator to admit this certificate"
    )


def test_closes_before_welcome_are_permanent_only_when_they_keep_coming() -> None:
    classifier = FailureClassifier(peer="the aggregator", who="client")
    early = ConnectionClosed("peer closed the connection without Bye")
    assert not classifier.classify(early, joined=False).permanent
    assert not classifier.classify(ConnectionRefusedError(), joined=False).permanent
    for _ in range(EARLY_CLOSES_BEFORE_PERMANENT - 1):  # the refused connect broke the row
        assert not classifier.classify(early, joined=False).permanent
    assert not classifier.classify(early, joined=True).permanent  # a joined session's loss
    for _ in range(EARLY_CLOSES_BEFORE_PERMANENT - 1):
        assert not classifier.classify(early, joined=False).permanent
    failure = classifier.classify(early, joined=False)
    assert failure.permanent
    assert "closed the connection right after the TLS handshake 3 times in a row" in (
        failure.reason
    )
    goodbye = ConnectionClosed("peer said Bye", peer_message=Bye(reason="restarting"))
    assert not classifier.classify(goodbye, joined=False).permanent


async def test_transient_failures_are_logged_at_warning_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A long outage: every failure is retried, one WARNING line a minute says so."""
    caplog.set_level(logging.DEBUG, logger="fedcore.client")
    now = [0.0]
    attempts = 0

    async def refused() -> Any:
        nonlocal attempts
        attempts += 1
        raise ConnectionRefusedError(111, "Connection refused")

    async def sleep(seconds: float) -> None:
        now[0] += 1.5  # 1.5 s between attempts, whatever the jitter drew

    with pytest.raises(FedcoreError, match="cannot reach the aggregator at h:1"):
        await serve_reconnecting(
            peer="the aggregator at h:1",
            who="client",
            dial=refused,
            session=lambda conn: asyncio.sleep(0),
            backoff=Backoff(0.1, 0.5),
            reconnect_attempts=99,
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert attempts == 100
    warnings = _client_lines(caplog, logging.WARNING)
    # t = 0, 60, 120 s of a 148.5 s outage
    assert len(warnings) == 1 + int(99 * 1.5 // TRANSIENT_LOG_INTERVAL)
    assert warnings[0].startswith(
        "the aggregator at h:1 refused the connection: is it running?; retrying in"
    )
    assert warnings[1].endswith("(39 more failures since the last such line)")
    assert _client_lines(caplog, logging.ERROR) == [
        "cannot reach the aggregator at h:1: [Errno 111] Connection refused; not retrying"
    ]


# ----------------------------------------------------------------------------- TLS, end to end
@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("expired", "certificate expired on {not_after:%Y-%m-%d %H:%M} UTC"),
        (
            "server_only",
            "certificate not issued for TLS client authentication, per its extended key usage",
        ),
        (
            "foreign_ca",
            "certificate issued by CN=rogue CA,O=fedcore federation, not by the "
            "federation CA in --ca",
        ),
    ],
    ids=["expired", "server_only", "foreign_ca"],
)
async def test_a_client_certificate_the_aggregator_refuses_stops_the_client(
    case: str,
    expected: str,
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    cert, key = _issue_client_certificate(
        pki,
        tmp_path,
        expired=case == "expired",
        server_only=case == "server_only",
        foreign_ca=case == "foreign_ca",
    )
    async with _aggregator(tmp_path, pki, keys) as aggregator:
        port = aggregator.port
        client = _client(pki, keys, aggregator.federation, cert=cert, key=key)
        error, seconds = await _stops(client, port)
        refusals = await _refusals(aggregator)
    why = expected.format(not_after=load_certificate(cert).not_valid_after_utc)
    message = (
        f"the aggregator at 127.0.0.1:{port} refused this client's certificate "
        f"({why}): check --cert"
    )
    assert isinstance(error, PermanentFailure)
    assert str(error) == message
    assert seconds < STOPS_WITHIN
    assert len(dials) == 1
    assert refusals == {"tls_certificate_verify_failed": 1}
    assert _client_lines(caplog, logging.ERROR) == [f"{message}; not retrying"]
    _assert_no_traceback(caplog)


@pytest.mark.parametrize("case", ["foreign_ca", "wrong_hostname"])
async def test_an_aggregator_certificate_the_client_does_not_trust_stops_the_client(
    case: str,
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    if case == "foreign_ca":
        changes: dict[str, Any] = {"ca": _foreign_ca(tmp_path)}
        detail, advice = "", "check --ca (the federation CA, which issued its certificate)"
    else:
        changes = {"server_hostname": "wrong.example"}
        detail = "Hostname mismatch, certificate is not valid for 'wrong.example'"
        advice = (
            "check --server-hostname, or the host in --server (a name its certificate is "
            "issued for)"
        )
    async with _aggregator(tmp_path, pki, keys) as aggregator:
        port = aggregator.port
        client = _client(pki, keys, aggregator.federation, **changes)
        error, seconds = await _stops(client, port)
        refusals = await _refusals(aggregator)
    prefix = (
        f"this client does not trust the certificate of the aggregator at 127.0.0.1:{port} "
        f"({detail}"
    )
    assert isinstance(error, PermanentFailure)
    assert str(error).startswith(prefix) and str(error).endswith(f"): {advice}")
    assert seconds < STOPS_WITHIN
    assert len(dials) == 1
    assert refusals == {"tls_handshake_other": 1}  # the client hung up in the handshake
    assert _client_lines(caplog, logging.ERROR) == [f"{error}; not retrying"]
    _assert_no_traceback(caplog)


async def test_a_tls_alert_refusing_a_valid_looking_certificate_stops_the_client(
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A server that trusts another CA says unknown_ca: the client's own checks find
    nothing wrong with its certificate, and the alert alone stops it at once."""
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    server = _BareTlsServer(
        server_context(pki.aggregator.cert, pki.aggregator.key, _foreign_ca(tmp_path))
    )
    try:
        client = _client(pki, keys, _federation(tmp_path, pki, keys))
        error, seconds = await _stops(client, server.port)
    finally:
        server.close()
    assert str(error) == (
        f"the aggregator at 127.0.0.1:{server.port} refused this client's certificate "
        "(TLS alert unknown CA): check --cert (it must be issued by the federation CA)"
    )
    assert seconds < STOPS_WITHIN
    # the server's thread records its refusal just after sending the alert the client
    # already acted on: give it a moment on a loaded machine
    for _ in range(100):
        if server.outcomes:
            break
        await asyncio.sleep(0.05)
    assert len(dials) == 1 and len(server.outcomes) == 1
    assert server.outcomes[0].startswith("refused")
    _assert_no_traceback(caplog)


async def test_a_server_that_hangs_up_after_every_handshake_stops_the_client(
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No alert, nothing wrong with the certificate as far as the client can tell: the
    closes before Welcome are retried a little, then taken for a refusal."""
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    server = _BareTlsServer(server_context(pki.aggregator.cert, pki.aggregator.key, pki.ca_cert))
    try:
        client = _client(pki, keys, _federation(tmp_path, pki, keys))
        error, seconds = await _stops(client, server.port)
    finally:
        server.close()
    assert str(error).startswith(
        f"the aggregator at 127.0.0.1:{server.port} closed the connection right after the "
        f"TLS handshake {EARLY_CLOSES_BEFORE_PERMANENT} times in a row, before its Welcome"
    )
    assert seconds < STOPS_WITHIN
    assert len(dials) == EARLY_CLOSES_BEFORE_PERMANENT
    assert server.outcomes == ["handshake"] * EARLY_CLOSES_BEFORE_PERMANENT
    # the retries said why at WARNING, the stop at ERROR
    assert len(_client_lines(caplog, logging.WARNING)) == 1
    assert len(_client_lines(caplog, logging.ERROR)) == 1
    _assert_no_traceback(caplog)


# ----------------------------------------------------------------------------- app callbacks
def _none(model: Any, config: Any) -> Any:
    return None


def _raises(model: Any, config: Any) -> int:
    raise ValueError("no training data on this device")


@pytest.mark.parametrize(
    ("train_fn", "evaluate_fn", "message"),
    [
        (_none, None, "train_fn must return the number of samples it used, got None"),
        (_raises, None, "train_fn raised ValueError: no training data on this device"),
        (
            lambda model, config: 1,
            lambda model: [0.9],
            "evaluate_fn must return a dict of metric names to numbers, got [0.9]",
        ),
    ],
    ids=["train_fn_returns_none", "train_fn_raises", "evaluate_fn_returns_a_list"],
)
async def test_a_failing_app_callback_stops_the_client(
    train_fn: Callable[..., Any],
    evaluate_fn: Callable[..., Any] | None,
    message: str,
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    changes = {"min_clients": 2, "clients_per_round": 2, "committee_size": 1, "rounds": 1}
    async with _aggregator(tmp_path, pki, keys, **changes) as aggregator:
        clients = [
            _client(
                pki,
                keys,
                aggregator.federation,
                index=i,
                train_fn=train_fn,
                evaluate_fn=evaluate_fn,
                holds_key=True,
            )
            for i in range(2)
        ]
        t0 = time.monotonic()
        outcomes = await asyncio.wait_for(
            asyncio.gather(
                *(c.run(f"127.0.0.1:{aggregator.port}") for c in clients),
                return_exceptions=True,
            ),
            60,
        )
        seconds = time.monotonic() - t0
    assert [str(e) for e in outcomes] == [message, message]
    assert all(isinstance(e, FedcoreError) for e in outcomes)
    assert seconds < STOPS_WITHIN
    assert len(dials) == 2  # one connection each
    assert _client_lines(caplog, logging.ERROR) == [f"client stops: {message}"] * 2
    _assert_no_traceback(caplog)


# ----------------------------------------------------------------------------- retries
async def test_an_aggregator_not_up_yet_is_waited_for(
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    client = _client(pki, keys, _federation(tmp_path, pki, keys))
    task = asyncio.create_task(client.run(f"127.0.0.1:{port}"))
    try:
        await asyncio.sleep(1.0)
        assert not task.done() and len(dials) >= 2
        async with _aggregator(tmp_path, pki, keys, port=port) as aggregator:
            for _ in range(100):
                if "client-0" in aggregator.clients:
                    break
                await asyncio.sleep(0.1)
            assert "client-0" in aggregator.clients
            task.cancel()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    warnings = _client_lines(caplog, logging.WARNING)
    assert len(warnings) == 1  # however many attempts: the rest within the minute at DEBUG
    assert f"the aggregator at 127.0.0.1:{port} refused the connection" in warnings[0]
    assert _client_lines(caplog, logging.ERROR) == []


async def test_permanent_failure_retry_keeps_trying_at_its_own_pace(
    tmp_path: Path,
    pki: FederationPKI,
    keys: Keys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    dials = _count_dials(monkeypatch)
    async with _aggregator(tmp_path, pki, keys) as aggregator:
        client = _client(
            pki,
            keys,
            aggregator.federation,
            server_hostname="wrong.example",
            permanent_failure_retry=0.4,
        )
        task = asyncio.create_task(client.run(f"127.0.0.1:{aggregator.port}"))
        await asyncio.sleep(1.8)
        assert not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    gaps = [later - earlier for earlier, later in itertools.pairwise(dials)]
    assert 3 <= len(dials) <= 5
    assert all(0.39 <= gap < 1.0 for gap in gaps), gaps
    errors = _client_lines(caplog, logging.ERROR)
    assert len(errors) == len(dials)
    assert all(e.endswith("; retrying in 0.4 s (permanent_failure_retry)") for e in errors)


# ----------------------------------------------------------------------------- the CLI
async def test_the_client_command_prints_one_line_and_exits_2(
    tmp_path: Path, pki: FederationPKI, keys: Keys
) -> None:
    async with _aggregator(tmp_path, pki, keys) as aggregator:
        port = aggregator.port
        federation = tmp_path / "federation.json"
        aggregator.federation.save(federation)
        argv = [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--cert",
            str(pki.clients[0].cert),
            "--key",
            str(pki.clients[0].key),
            "--ca",
            str(_foreign_ca(tmp_path)),
            "--federation",
            str(federation),
            "--min-key-bits",
            "1024",
            "--server-hostname",
            "localhost",
        ]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fedcore.cli",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), 120)
        refusals = await _refusals(aggregator)
    err = stderr.decode()
    assert process.returncode == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "fedcore client: error: this client does not trust the certificate of the "
        f"aggregator at 127.0.0.1:{port} ("
    )
    assert last.endswith("check --ca (the federation CA, which issued its certificate)")
    assert refusals == {"tls_handshake_other": 1}
