"""What crosses the wire between aggregator and clients, as small validated dataclasses.

- `FederationParams`: what decides what a decrypted sum reveals (the public key, value
  bits, headroom, clip, quorum, weight bound). The operator exports it as a federation
  file; every client pins it, and refuses a Welcome that disagrees on any field.
- `SessionInfo`: the rest of the Welcome (model layout, chunk size, rounds).
- `RoundPlan`: the non-model part of a RoundStart (local training settings and the
  round's unmasking committee).
- `ClientReport`: the plain-text part of an UpdateDone (timings and iteration count;
  never sample counts or evaluation metrics, which travel inside the encrypted sum).
- `RejectReason`: every reason an update or a committee answer is refused, with its
  wire code and metric label.

Each has one ``to_wire``/``from_wire`` pair (or a canonical JSON document) and
validates when built: a bad value raises ``ValueError`` naming the field. Nothing here
does I/O beyond reading and writing the federation file.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedcore.crypto import PublicKey, ThresholdPublicKey
from fedcore.crypto.keys import MIN_SECURE_KEY_BITS
from fedcore.errors import ConfigError
from fedcore.packing import MAX_HEADROOM_BITS, PackingSpec
from protocol.errors import ErrorCode

__all__ = [
    "DEFAULT_REPORT_METRICS",
    "MAX_COMMITTEE",
    "ClientReport",
    "FederationMismatch",
    "FederationParams",
    "KeyMode",
    "RejectReason",
    "RoundPlan",
    "SessionInfo",
    "decryption_context",
    "key_proof_context",
]

KeyMode = Literal["shared", "threshold", "plaintext"]

_FEDERATION_TYPE = "fedcore-federation"
_FEDERATION_VERSION = 1
_MAX_DOCUMENT = 64 * 1024
MAX_REPORT_METRICS = 16
MAX_COMMITTEE = 16
"""Most unmaskers one round may name (their credentials ride in every RoundStart)."""
DEFAULT_REPORT_METRICS: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("loss", 10.0))
"""Evaluation metrics a client reports inside the encrypted sum, each clipped to [0, bound]."""


class FederationMismatch(ConfigError):
    """The aggregator's federation differs from the one this client pinned."""


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _check_float(name: str, value: object, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or (positive and number <= 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationParams:
    """The parameters a client pins: a deviating aggregator cannot change any of them.

    ``mode`` is ``shared`` (Paillier, the committee holds the private key),
    ``threshold`` (Paillier, each committee member holds one share of a T-of-N key:
    ``threshold_key``, whose n is ``public_key``) or ``plaintext`` (comparison runs, no
    privacy at all). A client weighs its update by
    ``min(max_weight, ceil(samples / samples_per_weight))``, a number the aggregator
    never chooses; ``headroom_bits`` must hold the weights of ``max_contributors``
    clients. ``report_metrics`` names the evaluation metrics summed under encryption,
    each clipped to ``[0, bound]``. ``unmaskers`` is how many committee members every
    update is masked for (each must take part in every decryption).
    """

    mode: KeyMode
    public_key: PublicKey | None
    value_bits: int = 16
    headroom_bits: int = 10
    clip: float = 0.5
    min_clients: int = 3
    max_weight: int = 64
    samples_per_weight: int = 100
    report_metrics: tuple[tuple[str, float], ...] = DEFAULT_REPORT_METRICS
    unmaskers: int = 1
    threshold_key: ThresholdPublicKey | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("shared", "threshold", "plaintext"):
            raise ValueError(
                f"mode must be 'shared', 'threshold' or 'plaintext', got {self.mode!r}"
            )
        if self.mode == "threshold":
            if not isinstance(self.threshold_key, ThresholdPublicKey):
                raise ValueError("a threshold federation needs its threshold public key")
            if self.public_key is None:
                object.__setattr__(self, "public_key", self.threshold_key.public_key)
            if self.public_key != self.threshold_key.public_key:
                raise ValueError("public_key is not the threshold key's n")
        elif self.threshold_key is not None:
            raise ValueError(f"a {self.mode} federation has no threshold key")
        if self.mode == "plaintext":
            if self.public_key is not None:
                raise ValueError("a plaintext federation has no public key")
        elif not isinstance(self.public_key, PublicKey):
            raise ValueError("an encrypted federation needs its public key")
        _check_int("value_bits", self.value_bits, 2, 32)
        _check_int("headroom_bits", self.headroom_bits, 1, MAX_HEADROOM_BITS)
        object.__setattr__(self, "clip", _check_float("clip", self.clip))
        _check_int("min_clients", self.min_clients, 2, 1 << 30)
        _check_int("max_weight", self.max_weight, 1, 1 << 20)
        _check_int("samples_per_weight", self.samples_per_weight, 1, 1 << 40)
        _check_int("unmaskers", self.unmaskers, 1, MAX_COMMITTEE)
        if self.max_contributors < self.min_clients:
            raise ValueError(
                f"headroom_bits {self.headroom_bits} holds {self.max_contributors} clients of "
                f"weight {self.max_weight}, fewer than min_clients {self.min_clients}"
            )
        metrics = tuple(
            (str(name), _check_float(f"report_metrics[{name!r}] bound", bound))
            for name, bound in self.report_metrics
        )
        if len(metrics) > MAX_REPORT_METRICS:
            raise ValueError(f"report_metrics may name at most {MAX_REPORT_METRICS} metrics")
        names = [name for name, _ in metrics]
        if len(set(names)) != len(names) or not all(0 < len(n) <= 64 for n in names):
            raise ValueError("report_metrics names must be distinct, 1..64 characters")
        object.__setattr__(self, "report_metrics", metrics)
        if self.public_key is not None:
            self.packing_spec()  # raises when the slots do not fit the key

    # ------------------------------------------------------------------ derived values
    @property
    def encrypted(self) -> bool:
        """Whether updates travel as Paillier ciphertexts."""
        return self.mode != "plaintext"

    @property
    def max_contributors(self) -> int:
        """Most clients one round may sum: ``2^headroom_bits // max_weight``."""
        return (1 << self.headroom_bits) // self.max_weight

    def packing_spec(self) -> PackingSpec:
        """The packing every client uses (raises ValueError if it does not fit the key)."""
        if self.public_key is None:
            raise ValueError("a plaintext federation has no packing")
        return PackingSpec(
            key_bits=self.public_key.bits,
            value_bits=self.value_bits,
            headroom_bits=self.headroom_bits,
            clip=self.clip,
        )

    def weight_for(self, samples: int) -> int:
        """This client's FedAvg weight: ``min(max_weight, ceil(samples / samples_per_weight))``."""
        samples = max(1, int(samples))
        return max(1, min(self.max_weight, -(-samples // self.samples_per_weight)))

    # ------------------------------------------------------------------ documents
    def to_document(self) -> dict[str, Any]:
        """Plain JSON values, public key included (its n and SHA-256)."""
        return {
            "type": _FEDERATION_TYPE,
            "version": _FEDERATION_VERSION,
            "mode": self.mode,
            "public_key": None
            if self.public_key is None
            else {"n": str(self.public_key.n), "sha256": self.public_key.sha256()},
            "value_bits": self.value_bits,
            "headroom_bits": self.headroom_bits,
            "clip": self.clip,
            "min_clients": self.min_clients,
            "max_weight": self.max_weight,
            "samples_per_weight": self.samples_per_weight,
            "report_metrics": [[name, bound] for name, bound in self.report_metrics],
            "unmaskers": self.unmaskers,
        } | (
            {}
            if self.threshold_key is None
            else {"threshold_key": self.threshold_key.to_document()}
        )

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces): the same params give the same bytes."""
        return json.dumps(self.to_document(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """SHA-256 of :meth:`to_bytes`: binds tokens and masks to this federation."""
        return hashlib.sha256(self.to_bytes()).digest()

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> FederationParams:
        """Inverse of :meth:`to_document`; ValueError names a missing or bad field."""
        if not isinstance(document, Mapping):
            raise ValueError("a federation document must be a JSON object")
        if document.get("type") != _FEDERATION_TYPE:
            raise ValueError(f"document type must be {_FEDERATION_TYPE!r}")
        if document.get("version") != _FEDERATION_VERSION:
            raise ValueError(f"federation document version must be {_FEDERATION_VERSION}")
        known = set(cls.__dataclass_fields__) | {"type", "version"}
        unknown = sorted(set(document) - known)
        if unknown:
            raise ValueError(f"unknown federation field(s): {', '.join(unknown)}")
        values = {k: v for k, v in document.items() if k not in ("type", "version")}
        if "mode" not in values:
            raise ValueError("federation field 'mode' is missing")
        key_doc = values.get("public_key")
        if key_doc is not None:
            if not isinstance(key_doc, Mapping) or not isinstance(key_doc.get("n"), str):
                raise ValueError("public_key must be an object with n as a decimal string")
            text = key_doc["n"]
            if not text.isdigit() or len(text) > 5000:
                raise ValueError("public_key.n must be a decimal string")
            values["public_key"] = PublicKey(int(text))
            if key_doc.get("sha256") != values["public_key"].sha256():
                raise ValueError("public_key.sha256 does not match public_key.n")
        if values.get("threshold_key") is not None:
            values["threshold_key"] = ThresholdPublicKey.from_document(values["threshold_key"])
        if "report_metrics" in values:
            raw = values["report_metrics"]
            if not isinstance(raw, list) or not all(
                isinstance(item, list) and len(item) == 2 for item in raw
            ):
                raise ValueError("report_metrics must be a list of [name, bound] pairs")
            values["report_metrics"] = tuple((str(n), b) for n, b in raw)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def from_bytes(cls, data: bytes) -> FederationParams:
        """Parse a federation document (size-limited JSON)."""
        if len(data) > _MAX_DOCUMENT:
            raise ValueError(f"federation document is {len(data)} bytes, limit {_MAX_DOCUMENT}")
        try:
            document = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"federation document is not JSON: {exc}") from None
        return cls.from_document(document)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the federation file (public: hand it to every client)."""
        Path(path).write_bytes(json.dumps(self.to_document(), indent=1, sort_keys=True).encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FederationParams:
        """Read a federation file; ConfigError names the file and what is wrong."""
        try:
            with open(path, "rb") as handle:
                data = handle.read(_MAX_DOCUMENT + 1)
        except OSError as exc:
            raise ConfigError(f"cannot read federation file {path}: {exc.strerror}") from None
        try:
            return cls.from_bytes(data)
        except ValueError as exc:
            raise ConfigError(f"federation file {path}: {exc}") from None

    # ------------------------------------------------------------------ pinning
    def check_key(self, *, min_key_bits: int = MIN_SECURE_KEY_BITS) -> None:
        """ConfigError unless the public key is a plausible modulus of at least that size."""
        if self.public_key is None:
            return
        try:
            self.public_key.check(min_bits=min_key_bits)
        except ValueError as exc:
            raise ConfigError(f"federation public key refused: {exc}") from None

    def mismatches(self, offered: FederationParams) -> list[str]:
        """One line per field where ``offered`` (the aggregator's) differs from these."""
        mine, theirs = self.to_document(), offered.to_document()
        out = []
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                if name in ("public_key", "threshold_key"):
                    out.append(
                        f"{name}: the aggregator's has SHA-256 "
                        f"{_key_id(theirs.get(name))}, the pinned one {_key_id(mine.get(name))}"
                    )
                else:
                    out.append(
                        f"{name}: the aggregator says {theirs.get(name)!r}, "
                        f"pinned {mine.get(name)!r}"
                    )
        return out

    def require_same(self, offered: FederationParams, *, source: str) -> None:
        """FederationMismatch naming every differing field (nothing is uploaded then)."""
        problems = self.mismatches(offered)
        if problems:
            raise FederationMismatch(
                f"the aggregator's federation differs from {source}: " + "; ".join(problems)
            )


def decryption_context(
    federation_digest: bytes, round_id: int, start: int, count: int, contributors: bytes
) -> bytes:
    """What a threshold member's partial-decryption proof is bound to (both sides build it).

    The federation, the round, the range and the contributor set: a proof made for one
    request does not verify for another, so an answer cannot be replayed elsewhere.
    """
    return (
        b"fedcore partial decryption v1"
        + federation_digest
        + round_id.to_bytes(8, "big")
        + start.to_bytes(8, "big")
        + count.to_bytes(8, "big")
        + hashlib.sha256(contributors).digest()
    )


def key_proof_context(federation_digest: bytes, client_id: str, nonce: bytes) -> bytes:
    """What a key holder's key proof is bound to (both sides build it).

    The federation, the name the aggregator gave this connection and its fresh nonce: a
    proof made for one connection proves nothing on another.
    """
    name = client_id.encode()
    return (
        b"fedcore key proof v1"
        + federation_digest
        + len(name).to_bytes(2, "big")
        + name
        + hashlib.sha256(nonce).digest()
    )


def _key_id(document: Any) -> str:
    if not isinstance(document, Mapping):
        return "none"
    return str(document.get("sha256", "?"))[:16] + "..."


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """The Welcome's session settings that are not federation parameters."""

    num_values: int
    chunk_items: int
    model_layout: str
    rounds: int

    def __post_init__(self) -> None:
        _check_int("num_values", self.num_values, 1, 1 << 40)
        _check_int("chunk_items", self.chunk_items, 1, 1 << 20)
        _check_int("rounds", self.rounds, 1, 1 << 40)
        if not isinstance(self.model_layout, str):
            raise ValueError("model_layout must be a JSON string")

    def to_wire(self) -> dict[str, int | float | str | bool]:
        """The Welcome's ``session_config`` map."""
        return {
            "num_values": self.num_values,
            "chunk_items": self.chunk_items,
            "model_layout": self.model_layout,
            "rounds": self.rounds,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SessionInfo:
        """Inverse of :meth:`to_wire`; ValueError names a missing or bad field."""
        missing = [
            k for k in ("num_values", "chunk_items", "model_layout", "rounds") if k not in wire
        ]
        if missing:
            raise ValueError(f"session_config lacks {', '.join(missing)}")
        return cls(
            num_values=wire["num_values"],
            chunk_items=wire["chunk_items"],
            model_layout=wire["model_layout"],
            rounds=wire["rounds"],
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPlan:
    """A RoundStart's settings: local training, and who unmasks this round's sum.

    ``committee`` holds the signed credentials of the unmaskers (see
    `fedcore.credentials.CommitteeCredential`), opaque bytes here.
    """

    epochs: int
    learning_rate: float
    seed: int
    committee: tuple[bytes, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1, 1 << 20)
        object.__setattr__(self, "learning_rate", _check_float("learning_rate", self.learning_rate))
        _check_int("seed", self.seed, -(1 << 62), 1 << 62)
        if len(self.committee) > MAX_COMMITTEE:
            raise ValueError(f"committee names at most {MAX_COMMITTEE} unmaskers")
        if not all(isinstance(entry, bytes) for entry in self.committee):
            raise ValueError("committee entries must be bytes (signed credentials)")

    def config(self) -> dict[str, int | float | str | bool]:
        """The RoundStart ``config`` map (what ``train_fn`` receives as ``round_config``)."""
        return {"epochs": self.epochs, "lr": self.learning_rate, "seed": self.seed}

    @classmethod
    def from_round_start(cls, config: Mapping[str, Any], committee: tuple[bytes, ...]) -> RoundPlan:
        """Rebuild from a RoundStart's ``config`` and ``committee`` fields."""
        try:
            return cls(
                epochs=config["epochs"],
                learning_rate=config["lr"],
                seed=config["seed"],
                committee=tuple(committee),
            )
        except KeyError as exc:
            raise ValueError(f"RoundStart config lacks {exc.args[0]!r}") from None


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientReport:
    """What a client tells the aggregator in the clear about one round's work.

    Timings (seconds per client-side phase) and the number of local epochs; nothing
    about its data: sample counts and evaluation metrics are inside the encrypted sum.
    """

    timings: dict[str, float] = field(default_factory=dict)
    iterations: int = 0

    _TIMING_NAMES = frozenset(
        {
            "evaluate_s",
            "train_s",
            "encode_s",
            "mask_s",
            "encrypt_s",
            "serialize_s",
            "grant_wait_s",
            "upload_s",
            # not seconds: the share (0..1) of random factors the EncryptionPool had ready
            "pooled_factors",
        }
    )

    def __post_init__(self) -> None:
        for name, value in self.timings.items():
            if name not in self._TIMING_NAMES:
                raise ValueError(f"unknown timing {name!r}")
            number = _check_float(f"timings[{name!r}]", value, positive=False)
            if number < 0:
                raise ValueError(f"timings[{name!r}] must be >= 0, got {value!r}")
        _check_int("iterations", self.iterations, 0, 1 << 20)

    def to_wire(self) -> tuple[dict[str, float], dict[str, float]]:
        """UpdateDone's ``timings`` and ``metrics`` maps."""
        return dict(self.timings), {"iterations": float(self.iterations)}

    @classmethod
    def from_wire(cls, timings: Mapping[str, float], metrics: Mapping[str, float]) -> ClientReport:
        """Keep what we know from an UpdateDone; unknown names are dropped (older clients)."""
        known = {k: float(v) for k, v in timings.items() if k in cls._TIMING_NAMES and v >= 0}
        iterations = metrics.get("iterations", 0.0)
        return cls(timings=known, iterations=max(0, min(int(iterations), 1 << 20)))


class RejectReason(enum.Enum):
    """Why an update (or a committee answer) was refused: metric label, wire code, advice."""

    STALE_ROUND = ("stale_round", ErrorCode.STALE_ROUND)
    REPLAY = ("replay", ErrorCode.REPLAY)
    NOT_SELECTED = ("not_selected", ErrorCode.NOT_SELECTED)
    UNKNOWN_CLIENT = ("unknown_client", ErrorCode.UNKNOWN_CLIENT)
    WRONG_CHUNK_COUNT = ("wrong_chunk_count", ErrorCode.WRONG_CHUNK_COUNT)
    INVALID_CIPHERTEXT = ("invalid_ciphertext", ErrorCode.INVALID_CIPHERTEXT)
    DIGEST_MISMATCH = ("digest_mismatch", ErrorCode.DIGEST_MISMATCH)
    BAD_TOKEN = ("bad_token", ErrorCode.BAD_TOKEN)
    BAD_DECRYPT_RESULT = ("bad_decrypt_result", ErrorCode.BAD_DECRYPT_RESULT)
    OVER_CAPACITY = ("over_capacity", ErrorCode.OVER_CAPACITY)
    UPLOAD_STALLED = ("upload_stalled", ErrorCode.UPLOAD_STALLED)
    BAD_KEY_PROOF = ("bad_key_proof", ErrorCode.BAD_KEY_PROOF)
    PROTOCOL_ERROR = ("protocol_error", ErrorCode.PROTOCOL_VIOLATION)

    def __init__(self, label: str, code: ErrorCode) -> None:
        self.label = label
        self.code = code

    @classmethod
    def for_code(cls, code: ErrorCode) -> RejectReason:
        """The reason a protocol-level error code stands for (protocol_error otherwise)."""
        for reason in cls:
            if reason.code is code:
                return reason
        return cls.PROTOCOL_ERROR
