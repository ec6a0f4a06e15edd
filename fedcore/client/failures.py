"""Which failures of a connection to an aggregator a retry can fix, and which it cannot.

The one place that decides it, for everything that dials an aggregator (a client, a
relay's upstream). `FailureClassifier.classify` reads, in this order:

1. this side does not trust the aggregator's certificate
   (``ssl.SSLCertVerificationError``: wrong ``--ca``, a name the certificate is not
   issued for, an expired server certificate): **permanent**;
2. the aggregator refused this side's certificate with a TLS alert (`TLS_ALERTS`:
   certificate_expired, bad_certificate, unknown_ca, ...), or does not speak TLS 1.3:
   **permanent**;
3. the aggregator ended the connection with an ``Error`` frame: per code, as
   `ERROR_CODE_POLICY` says (not a member, a protocol version it does not speak, a
   credential or key proof it refuses: **permanent**; busy, rate limited, a stale
   round, a timeout: **transient**);
4. the aggregator closed the connection without a word before its Welcome. In TLS 1.3
   the client's handshake completes before the server checks the client's certificate,
   and a server that refuses it drops the connection, often before its alert can be
   read: this is how a refused certificate usually looks. The classifier then checks
   its own certificate (`certificate_problem`): expired, not yet valid, not issued for
   client authentication or not signed by the CA in ``--ca`` makes it **permanent** at
   once; otherwise `EARLY_CLOSES_BEFORE_PERMANENT` such closes in a row are;
5. anything else (a refused or reset connection, a timeout, a failed handshake, the
   aggregator saying goodbye or going away): **transient**.

A `fedcore.errors.FedcoreError` raised by this side's own session (a federation it does
not accept, an app callback that fails) is not a connection failure: the client stops
with it (see `fedcore.client.reconnect`). `checked_train_fn` and `checked_evaluate_fn`
turn what the app's callbacks raise, and an evaluation that is not a dict of numbers,
into a `CallbackError`. This module does no I/O and knows nothing of sessions, rounds or
backoff.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedcore.client.config import EvaluateFn, TrainFn
from fedcore.errors import FedcoreError
from protocol.errors import ConnectionClosed, ErrorCode, ErrorReceived, ProtocolTimeout
from protocol.messages import Bye

if TYPE_CHECKING:  # the relay and numpy-level clients import this module, not torch
    import torch

__all__ = [
    "EARLY_CLOSES_BEFORE_PERMANENT",
    "ERROR_CODE_POLICY",
    "TLS_ALERTS",
    "CallbackError",
    "CodePolicy",
    "Failure",
    "FailureClassifier",
    "PermanentFailure",
    "TlsAlert",
    "certificate_problem",
    "checked_evaluate_fn",
    "checked_train_fn",
    "describe",
]


class PermanentFailure(FedcoreError):
    """A retry cannot help: the aggregator refuses this side, or this side refuses it."""


class CallbackError(FedcoreError):
    """The app's ``train_fn`` or ``evaluate_fn`` raised, or returned the wrong type."""


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed connection attempt or session: whether a retry can help, and why.

    ``reason`` is one line naming what failed and, when permanent, what to change.
    """

    permanent: bool
    reason: str


@dataclass(frozen=True, slots=True)
class CodePolicy:
    """How this side takes an ``Error`` code: a permanent one comes with advice."""

    permanent: bool
    advice: str = ""


_TRANSIENT: Final = CodePolicy(permanent=False)
_VERSIONS = "the two sides run incompatible fedcore versions: upgrade the older one"

#: Every code an aggregator may end a connection with. Permanent: the same side would be
#: refused the same way on every retry. Codes about one message, upload or round, about
#: load, or ambiguous between a race and a bug, are transient (retried with backoff).
ERROR_CODE_POLICY: Final[Mapping[ErrorCode, CodePolicy]] = MappingProxyType(
    {
        ErrorCode.PROTOCOL_VIOLATION: _TRANSIENT,  # as often a race after a reconnect as a bug
        ErrorCode.FRAME_TOO_LARGE: _TRANSIENT,
        ErrorCode.MALFORMED_FRAME: _TRANSIENT,
        ErrorCode.UNSUPPORTED_VERSION: CodePolicy(True, _VERSIONS),
        ErrorCode.UNKNOWN_MESSAGE: CodePolicy(True, _VERSIONS),
        ErrorCode.INVALID_MESSAGE: _TRANSIENT,  # one message's values
        ErrorCode.BAD_SEQUENCE: _TRANSIENT,  # e.g. a resume the aggregator no longer expects
        ErrorCode.TIMEOUT: _TRANSIENT,
        ErrorCode.TOO_MANY_CONNECTIONS: _TRANSIENT,  # busy, or our last connection lingers
        ErrorCode.SHUTTING_DOWN: _TRANSIENT,
        ErrorCode.STALE_ROUND: _TRANSIENT,
        ErrorCode.REPLAY: _TRANSIENT,
        ErrorCode.UNKNOWN_CLIENT: CodePolicy(
            True, "ask the federation's operator to admit this certificate"
        ),
        ErrorCode.NOT_SELECTED: _TRANSIENT,
        ErrorCode.WRONG_CHUNK_COUNT: _TRANSIENT,
        ErrorCode.INVALID_CIPHERTEXT: _TRANSIENT,
        ErrorCode.DIGEST_MISMATCH: _TRANSIENT,
        ErrorCode.BAD_DECRYPT_RESULT: _TRANSIENT,
        ErrorCode.BAD_TOKEN: CodePolicy(True, "check --cert and --ca"),
        ErrorCode.REQUEST_REFUSED: _TRANSIENT,
        ErrorCode.SUM_NOT_DECODABLE: _TRANSIENT,
        ErrorCode.OVER_CAPACITY: _TRANSIENT,
        ErrorCode.UPLOAD_STALLED: _TRANSIENT,
        ErrorCode.RATE_LIMITED: _TRANSIENT,
        ErrorCode.BAD_KEY_PROOF: CodePolicy(True, "check --private-key or --key-share"),
        ErrorCode.INTERNAL: _TRANSIENT,  # a bug there; a restart of it may fix it
    }
)


@dataclass(frozen=True, slots=True)
class TlsAlert:
    """A TLS alert after which a retry cannot help: what it says, and what to check."""

    says: str
    advice: str
    refuses_certificate: bool = True


#: OpenSSL's reasons (``ssl.SSLError.reason``) for the alerts a server refuses a client
#: certificate with, or a TLS version; any other TLS failure is transient.
TLS_ALERTS: Final[Mapping[str, TlsAlert]] = MappingProxyType(
    {
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": TlsAlert("certificate expired", "check --cert"),
        "SSLV3_ALERT_CERTIFICATE_REVOKED": TlsAlert("certificate revoked", "check --cert"),
        "SSLV3_ALERT_BAD_CERTIFICATE": TlsAlert("bad certificate", "check --cert"),
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": TlsAlert("unsupported certificate", "check --cert"),
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN": TlsAlert("certificate unknown", "check --cert"),
        "TLSV1_ALERT_UNKNOWN_CA": TlsAlert(
            "unknown CA", "check --cert (it must be issued by the federation CA)"
        ),
        "TLSV1_ALERT_ACCESS_DENIED": TlsAlert("access denied", "check --cert"),
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": TlsAlert("certificate required", "check --cert"),
        "TLSV1_ALERT_PROTOCOL_VERSION": TlsAlert(
            "protocol version",
            "it must speak TLS 1.3: is this the address of a fedcore aggregator?",
            refuses_certificate=False,
        ),
    }
)

#: Closes without a word before Welcome, in a row, after which an unexplained one is
#: taken as a refused certificate (a server restart explains one, not three).
EARLY_CLOSES_BEFORE_PERMANENT: Final = 3

# OpenSSL's X509_V_ERR_* codes of ssl.SSLCertVerificationError.verify_code
_NOT_YET_VALID, _EXPIRED = 9, 10
_NAME_MISMATCH = frozenset({62, 63, 64})  # hostname, e-mail, IP address


def certificate_problem(
    certificate: x509.Certificate,
    ca_certificates: Sequence[x509.Certificate],
    *,
    now: dt.datetime | None = None,
) -> str:
    """Why a federation peer would refuse ``certificate`` as a client's ("" when no reason).

    Checks what fedcore's PKI promises: the certificate is valid now, issued for TLS
    client authentication, and signed directly by one of ``ca_certificates`` (the CA in
    ``--ca``; `protocol.tls` issues leaf certificates straight from the federation CA).
    """
    now = dt.datetime.now(dt.UTC) if now is None else now
    if certificate.not_valid_after_utc < now:
        return f"certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if certificate.not_valid_before_utc > now:
        return f"certificate not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None  # no restriction
    if usage is not None and not {
        ExtendedKeyUsageOID.CLIENT_AUTH,
        ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    } & set(usage):
        return "certificate not issued for TLS client authentication, per its extended key usage"
    if ca_certificates and not any(_issued_by(certificate, ca) for ca in ca_certificates):
        return (
            f"certificate issued by {certificate.issuer.rfc4514_string()}, "
            "not by the federation CA in --ca"
        )
    return ""


def _issued_by(certificate: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca)
    except Exception:  # ValueError, TypeError, InvalidSignature: not this CA's
        return False
    return True


class FailureClassifier:
    """Tells permanent failures from transient ones for one side dialling one peer.

    ``peer`` names the other end in messages ("the aggregator at host:port"), ``who``
    this end ("client", "relay"). ``certificate`` and ``ca_certificates`` (this side's
    certificate and its ``--ca``) let it explain a refused certificate; without them an
    early close is permanent only after `EARLY_CLOSES_BEFORE_PERMANENT` in a row. It
    counts those closes, so use one classifier per dialler.
    """

    def __init__(
        self,
        *,
        peer: str,
        who: str,
        certificate: x509.Certificate | None = None,
        ca_certificates: Sequence[x509.Certificate] = (),
    ) -> None:
        self.peer = peer
        self.who = who
        self._certificate = certificate
        self._ca_certificates = tuple(ca_certificates)
        self._early_closes = 0

    def classify(self, error: BaseException, *, joined: bool) -> Failure:
        """What ``error`` means; ``joined``: the peer had sent its first message (Welcome)."""
        early_close = (
            not joined
            and isinstance(error, ConnectionClosed)
            and error.peer_message is None
            and _tls_alert(error) is None
        )
        self._early_closes = self._early_closes + 1 if early_close else 0
        peer, who = self.peer, self.who
        verify = _verification_error(error)
        if verify is not None:
            return Failure(True, self._untrusted_peer(verify))
        alert = _tls_alert(error)
        if alert is not None:
            if not alert.refuses_certificate:
                return Failure(True, f"{peer} refused TLS 1.3 (alert {alert.says}): {alert.advice}")
            # our own look at the certificate is more precise than the alert, if it finds
            says = self._own_problem() or f"TLS alert {alert.says}"
            return Failure(
                True, f"{peer} refused this {who}'s certificate ({says}): {alert.advice}"
            )
        if isinstance(error, ErrorReceived):
            policy = ERROR_CODE_POLICY.get(error.code, _TRANSIENT)
            message = error.peer_message
            said = _one_line(message.reason if message is not None else str(error))
            what = f"{error.code.name}: {said}" if said else error.code.name
            if policy.permanent:
                advice = f": {policy.advice}" if policy.advice else ""
                return Failure(True, f"{peer} refused this {who} ({what}){advice}")
            return Failure(False, f"{peer} ended the connection ({what})")
        if early_close:
            return self._closed_before_welcome(error)
        if isinstance(error, ConnectionClosed):
            if isinstance(error.peer_message, Bye):
                return Failure(False, f"{peer} said goodbye ({error.peer_message.reason})")
            return Failure(False, f"lost the connection to {peer} ({_one_line(str(error))})")
        if isinstance(error, TimeoutError | ProtocolTimeout):
            return Failure(False, f"no answer from {peer} in time ({describe(error)})")
        if isinstance(error, ConnectionRefusedError):
            return Failure(False, f"{peer} refused the connection: is it running?")
        if isinstance(error, OSError):
            return Failure(False, f"cannot connect to {peer} ({describe(error)})")
        return Failure(False, f"connection to {peer} failed ({describe(error)})")

    def _untrusted_peer(self, error: ssl.SSLCertVerificationError) -> str:
        detail = (error.verify_message or error.reason or str(error)).rstrip(".")
        if error.verify_code in _NAME_MISMATCH:
            advice = (
                "check --server-hostname, or the host in --server (a name its certificate "
                "is issued for)"
            )
        elif error.verify_code in (_NOT_YET_VALID, _EXPIRED):
            advice = "its certificate must be renewed (or this machine's clock is wrong)"
        else:
            advice = "check --ca (the federation CA, which issued its certificate)"
        return f"this {self.who} does not trust the certificate of {self.peer} ({detail}): {advice}"

    def _closed_before_welcome(self, error: BaseException) -> Failure:
        peer, who = self.peer, self.who
        problem = self._own_problem()
        if problem:
            return Failure(
                True, f"{peer} refused this {who}'s certificate ({problem}): check --cert"
            )
        closes = self._early_closes
        if closes >= EARLY_CLOSES_BEFORE_PERMANENT:
            return Failure(
                True,
                f"{peer} closed the connection right after the TLS handshake {closes} times "
                f"in a row, before its Welcome: it most likely refuses this {who}'s "
                "certificate (revoked, or not issued by the CA it trusts): check --cert and --ca",
            )
        return Failure(
            False, f"{peer} closed the connection before its Welcome ({_one_line(str(error))})"
        )

    def _own_problem(self) -> str:
        if self._certificate is None:
            return ""
        return certificate_problem(self._certificate, self._ca_certificates)


# --------------------------------------------------------------------------- app callbacks
def checked_train_fn(train_fn: TrainFn) -> TrainFn:
    """``train_fn`` raising `CallbackError` for whatever it raises.

    What it returns is checked by the pipeline (a sample count, `ConfigError` else).
    """

    def train(model: torch.nn.Module, round_config: dict[str, Any]) -> int:
        try:
            return train_fn(model, round_config)
        except Exception as exc:
            raise CallbackError(f"train_fn raised {describe(exc)}") from exc

    return train


def checked_evaluate_fn(evaluate_fn: EvaluateFn) -> EvaluateFn:
    """``evaluate_fn`` raising `CallbackError` for what it raises or a result not a dict
    of metric names to numbers."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        try:
            metrics = evaluate_fn(model)
        except Exception as exc:
            raise CallbackError(f"evaluate_fn raised {describe(exc)}") from exc
        if not isinstance(metrics, Mapping):
            raise CallbackError(
                "evaluate_fn must return a dict of metric names to numbers, "
                f"got {_short_repr(metrics)}"
            )
        checked: dict[str, float] = {}
        for name, value in metrics.items():
            number = _as_number(value)
            if not isinstance(name, str) or number is None:
                raise CallbackError(
                    "evaluate_fn must return a dict of metric names to numbers, got "
                    f"{_short_repr(name)}: {_short_repr(value)} in {_short_repr(metrics)}"
                )
            checked[name] = number
        return checked

    return evaluate


def _as_number(value: object) -> float | None:
    if isinstance(value, str | bytes):
        return None
    try:
        return float(value)  # type: ignore[arg-type]  # numbers, numpy and torch scalars
    except Exception:
        return None


def _short_repr(value: object, limit: int = 80) -> str:
    text = _one_line(repr(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- helpers
def _verification_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """``error``, or what it was raised from or while handling, if a verification failure.

    The transport re-raises I/O errors as ``ConnectionClosed`` ``from None``: the
    original is still the ``__context__``.
    """
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _tls_alert(error: BaseException) -> TlsAlert | None:
    """The alert in `TLS_ALERTS` that ``error`` (or its context) reports, if any."""
    seen: BaseException | None = error
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return TLS_ALERTS.get(str(seen.reason))
        seen = seen.__cause__ or seen.__context__
    return None


def describe(error: BaseException) -> str:
    """``error`` as one line: its type and message."""
    text = _one_line(str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _one_line(text: str, limit: int = 500) -> str:
    """``text`` on one line (a log line, an error message), at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
