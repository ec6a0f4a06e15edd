"""Typed protocol messages and their explicit msgpack-map encodings.

Each message is a frozen, keyword-only dataclass validated when built (the checks and
limits are in `protocol.fields`): a bad field raises ``TypeError``/``ValueError`` naming
the field and the allowed range. Each
message has one hand-written ``to_wire`` (dataclass -> plain dict) and one
``from_wire`` (dict -> dataclass); nothing is decoded by reflection. Payloads are
opaque bytes: this module knows nothing of Paillier, packing or torch, and nothing
of frames or sockets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

from .committee_messages import (
    DecryptRequest,
    DecryptResult,
    PartialDecryptRequest,
    PartialDecryptResult,
    UnmaskRequest,
    UnmaskResult,
)
from .errors import ErrorCode, InvalidMessage, UnknownMessageType
from .fields import (
    MAX_BYTES_FIELD_LEN,
    MAX_CHUNKS_PER_UPDATE,
    MAX_CLIENT_ID_LEN,
    MAX_COMMITTEE_ENTRIES,
    MAX_CONFIG_ENTRIES,
    MAX_CONFIG_KEY_LEN,
    MAX_CONFIG_STR_LEN,
    MAX_CONTRIBUTORS_LEN,
    MAX_FEDERATION_LEN,
    MAX_INT,
    MAX_METRIC_ENTRIES,
    MAX_PUBLIC_KEY_LEN,
    MAX_REASON_LEN,
    MAX_STATEMENT_LEN,
    MAX_STATUS_LEN,
    MAX_VALUE_BITS,
    SHA256_DIGEST_LEN,
    ConfigValue,
    check_bool,
    check_bytes,
    check_bytes_tuple,
    check_config,
    check_float,
    check_int,
    check_metrics,
    check_str,
    pick_fields,
)

__all__ = [
    "MAX_BYTES_FIELD_LEN",
    "MAX_CHALLENGE_LEN",
    "MAX_CHUNKS_PER_UPDATE",
    "MAX_CLIENT_ID_LEN",
    "MAX_COMMITTEE_ENTRIES",
    "MAX_CONFIG_ENTRIES",
    "MAX_CONFIG_KEY_LEN",
    "MAX_CONFIG_STR_LEN",
    "MAX_CONTRIBUTORS_LEN",
    "MAX_FEDERATION_LEN",
    "MAX_INT",
    "MAX_METRIC_ENTRIES",
    "MAX_PUBLIC_KEY_LEN",
    "MAX_REASON_LEN",
    "MAX_RELAYED_CLIENTS",
    "MAX_RELAY_NAME_LEN",
    "MAX_RESUME_TOKEN_LEN",
    "MAX_STATEMENT_LEN",
    "MAX_STATUS_LEN",
    "MAX_VALUE_BITS",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SHA256_DIGEST_LEN",
    "Ack",
    "Bye",
    "ConfigValue",
    "DecryptRequest",
    "DecryptResult",
    "Error",
    "Heartbeat",
    "Hello",
    "KeyProof",
    "Message",
    "PartialDecryptRequest",
    "PartialDecryptResult",
    "RelayStatus",
    "RoundEnd",
    "RoundStart",
    "UnmaskRequest",
    "UnmaskResult",
    "UpdateChunk",
    "UpdateDone",
    "UploadGrant",
    "UploadRequest",
    "Welcome",
    "message_from_wire",
]

# 2: uploads wait for an UploadGrant (UploadRequest -> UploadGrant -> UpdateChunk ...).
# 3: clients pin the federation and sign a token per upload; the committee unmasks.
# 4: threshold federations: PartialDecrypt messages; committee credentials name a share.
# 5: relays: Hello.relay, UpdateDone.contributors (a relay's leaf tokens), RelayStatus.
# 6: KeyProof, Welcome.key_challenge, DecryptResult.randomness, upload resume tokens.
# 7: up to 3 committee requests outstanding per connection, answered in any order.
PROTOCOL_VERSION = 7


# A relay tree reports at most this many clients behind one connection.
MAX_RELAYED_CLIENTS = 10_000_000
MAX_CHALLENGE_LEN = 64
MAX_RESUME_TOKEN_LEN = 64
MAX_RELAY_NAME_LEN = 64
_RELAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True, slots=True)
class Hello:
    """Client -> aggregator: first message on a connection.

    ``committee`` is a key holder's signed committee credential (empty for a client
    that does not hold the private key). ``relay`` is set by a relay (an edge aggregator
    that uploads its clients' folded sum rather than an update of its own) to its
    instance name: replicas sharing one relay certificate are told apart by it.
    Nothing about the client's data is sent.
    """

    type_id: ClassVar[int] = 1
    version: int
    committee: bytes = b""
    relay: str = ""

    def __post_init__(self) -> None:
        check_int("version", self.version, 0, 255)
        check_bytes("committee", self.committee, MAX_STATEMENT_LEN)
        check_str("relay", self.relay, MAX_RELAY_NAME_LEN)
        if self.relay and not _RELAY_NAME.fullmatch(self.relay):
            raise ValueError(f"relay name must match {_RELAY_NAME.pattern}, got {self.relay!r}")
        if self.relay and self.committee:
            raise ValueError("a relay holds no key: committee must be empty when relay is set")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"version": self.version, "committee": self.committee, "relay": self.relay}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Hello:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("version",), ("committee", "relay"))
        return cls(
            version=f["version"], committee=f.get("committee", b""), relay=f.get("relay", "")
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Welcome:
    """Aggregator -> client: handshake answer with the federation and session settings.

    ``federation`` is the federation document (public key and the parameters that
    decide what a sum reveals), which the client compares with the one it pinned.
    ``key_challenge`` is a fresh nonce for a client that claimed the private key in its
    Hello: it is drafted to decrypt only after answering with a valid :class:`KeyProof`.
    """

    type_id: ClassVar[int] = 2
    version: int
    client_id: str
    federation: bytes
    session_config: dict[str, ConfigValue]
    key_challenge: bytes = b""

    def __post_init__(self) -> None:
        check_int("version", self.version, 0, 255)
        check_str("client_id", self.client_id, MAX_CLIENT_ID_LEN, nonempty=True)
        check_bytes("federation", self.federation, MAX_FEDERATION_LEN)
        check_config(self, "session_config", self.session_config)
        check_bytes("key_challenge", self.key_challenge, MAX_CHALLENGE_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "version": self.version,
            "client_id": self.client_id,
            "federation": self.federation,
            "session_config": self.session_config,
            "key_challenge": self.key_challenge,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Welcome:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire, cls, ("version", "client_id", "federation", "session_config"), ("key_challenge",)
        )
        return cls(
            version=f["version"],
            client_id=f["client_id"],
            federation=f["federation"],
            session_config=f["session_config"],
            key_challenge=f.get("key_challenge", b""),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyProof:
    """Key holder -> aggregator: proof that it holds the federation's private key.

    ``root`` is the n-th root modulo n of a value both sides derive by hashing the
    Welcome's ``key_challenge`` (see ``fedcore.crypto.decrypt_proof``); computing it
    needs the factorization of n. Sent once, right after Welcome.
    """

    type_id: ClassVar[int] = 20
    root: bytes

    def __post_init__(self) -> None:
        check_bytes("root", self.root, MAX_PUBLIC_KEY_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"root": self.root}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> KeyProof:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("root",))
        return cls(root=f["root"])


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundStart:
    """Aggregator -> client: train on these weights and upload an update.

    ``chunks_received`` is how many chunks of this round's upload the aggregator
    already holds from this client (non-zero when resuming after a reconnect).
    ``committee`` carries the signed credentials of the round's unmaskers.
    """

    type_id: ClassVar[int] = 3
    round_id: int
    weights: bytes
    clip: float
    value_bits: int
    deadline_s: float
    chunks_received: int = 0
    config: dict[str, ConfigValue] = field(default_factory=dict)
    committee: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_bytes("weights", self.weights, MAX_BYTES_FIELD_LEN)
        check_float(self, "clip", self.clip, 0.0)
        if self.clip <= 0.0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        check_int("value_bits", self.value_bits, 1, MAX_VALUE_BITS)
        check_float(self, "deadline_s", self.deadline_s, 0.0)
        check_int("chunks_received", self.chunks_received, 0, MAX_CHUNKS_PER_UPDATE)
        check_config(self, "config", self.config)
        check_bytes_tuple(
            self, "committee", self.committee, MAX_COMMITTEE_ENTRIES, MAX_STATEMENT_LEN
        )

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "weights": self.weights,
            "clip": self.clip,
            "value_bits": self.value_bits,
            "deadline_s": self.deadline_s,
            "chunks_received": self.chunks_received,
            "config": self.config,
            "committee": list(self.committee),
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RoundStart:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire,
            cls,
            ("round_id", "weights", "clip", "value_bits", "deadline_s"),
            ("chunks_received", "config", "committee"),
        )
        return cls(
            round_id=f["round_id"],
            weights=f["weights"],
            clip=f["clip"],
            value_bits=f["value_bits"],
            deadline_s=f["deadline_s"],
            chunks_received=f.get("chunks_received", 0),
            config=f.get("config", {}),
            committee=f.get("committee", ()),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UploadRequest:
    """Client -> aggregator: my update for ``round_id`` is ready; tell me when to send it.

    Nothing is streamed before the :class:`UploadGrant`, so an aggregator with a cap on
    concurrent uploads never buffers the clients that are waiting for a slot.
    """

    type_id: ClassVar[int] = 13
    round_id: int
    resume_token: bytes = b""

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_bytes("resume_token", self.resume_token, MAX_RESUME_TOKEN_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "resume_token": self.resume_token}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UploadRequest:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id",), ("resume_token",))
        return cls(round_id=f["round_id"], resume_token=f.get("resume_token", b""))


@dataclass(frozen=True, kw_only=True, slots=True)
class UploadGrant:
    """Aggregator -> client: send the update now, from chunk ``start_seq`` on.

    ``start_seq`` is how many chunks of this round's upload the aggregator already holds
    (non-zero when resuming after a reconnect). ``resume_token`` is a secret the client
    must show in the UploadRequest of a later connection to resume this upload; a
    connection without it starts the upload over.
    """

    type_id: ClassVar[int] = 14
    round_id: int
    start_seq: int = 0
    resume_token: bytes = b""

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_int("start_seq", self.start_seq, 0, MAX_CHUNKS_PER_UPDATE)
        check_bytes("resume_token", self.resume_token, MAX_RESUME_TOKEN_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "start_seq": self.start_seq,
            "resume_token": self.resume_token,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UploadGrant:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id",), ("start_seq", "resume_token"))
        return cls(
            round_id=f["round_id"],
            start_seq=f.get("start_seq", 0),
            resume_token=f.get("resume_token", b""),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateChunk:
    """Client -> aggregator: one chunk of an encrypted update; ``seq`` counts from 0."""

    type_id: ClassVar[int] = 4
    round_id: int
    seq: int
    payload: bytes

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_int("seq", self.seq, 0, MAX_CHUNKS_PER_UPDATE - 1)
        check_bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "seq": self.seq, "payload": self.payload}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UpdateChunk:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id", "seq", "payload"))
        return cls(round_id=f["round_id"], seq=f["seq"], payload=f["payload"])


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateDone:
    """Client -> aggregator: the upload is complete (count, sha256 digest, signed token).

    ``token`` is the client's signed contributor token (empty in plaintext federations);
    a relay sends none of its own but ``contributors``: the packed tokens of the
    clients folded into its sum, which the aggregator checks one by one.
    ``timings`` and ``metrics`` carry operational figures only (seconds per phase,
    local iterations), nothing about the client's data.
    """

    type_id: ClassVar[int] = 5
    round_id: int
    chunk_count: int
    item_count: int
    digest: bytes
    token: bytes = b""
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    contributors: bytes = b""

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_int("chunk_count", self.chunk_count, 0, MAX_CHUNKS_PER_UPDATE)
        check_int("item_count", self.item_count)
        check_bytes("digest", self.digest, SHA256_DIGEST_LEN, SHA256_DIGEST_LEN)
        check_bytes("token", self.token, MAX_STATEMENT_LEN)
        check_metrics(self, "timings", self.timings)
        check_metrics(self, "metrics", self.metrics)
        check_bytes("contributors", self.contributors, MAX_CONTRIBUTORS_LEN)
        if self.token and self.contributors:
            raise ValueError("an UpdateDone carries a token or contributors, not both")

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "chunk_count": self.chunk_count,
            "item_count": self.item_count,
            "digest": self.digest,
            "token": self.token,
            "timings": self.timings,
            "metrics": self.metrics,
            "contributors": self.contributors,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UpdateDone:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire,
            cls,
            ("round_id", "chunk_count", "item_count", "digest"),
            ("token", "timings", "metrics", "contributors"),
        )
        return cls(
            round_id=f["round_id"],
            chunk_count=f["chunk_count"],
            item_count=f["item_count"],
            digest=f["digest"],
            token=f.get("token", b""),
            timings=f.get("timings", {}),
            metrics=f.get("metrics", {}),
            contributors=f.get("contributors", b""),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Ack:
    """Aggregator -> client: the update for ``round_id`` was accepted or refused."""

    type_id: ClassVar[int] = 6
    round_id: int
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_bool("accepted", self.accepted)
        check_str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "accepted": self.accepted, "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Ack:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id", "accepted"), ("reason",))
        return cls(round_id=f["round_id"], accepted=f["accepted"], reason=f.get("reason", ""))


@dataclass(frozen=True, kw_only=True, slots=True)
class RoundEnd:
    """Aggregator -> client: the round is over for this client.

    ``status`` is a short word such as ``completed``, ``failed`` or ``closed``.
    """

    type_id: ClassVar[int] = 7
    round_id: int
    status: str
    reason: str = ""

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_str("status", self.status, MAX_STATUS_LEN, nonempty=True)
        check_str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"round_id": self.round_id, "status": self.status, "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RoundEnd:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id", "status"), ("reason",))
        return cls(round_id=f["round_id"], status=f["status"], reason=f.get("reason", ""))


@dataclass(frozen=True, kw_only=True, slots=True)
class Heartbeat:
    """Either way: keep-alive; the transport answers and swallows these."""

    type_id: ClassVar[int] = 10
    sent_at: float

    def __post_init__(self) -> None:
        check_float(self, "sent_at", self.sent_at, 0.0)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"sent_at": self.sent_at}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Heartbeat:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("sent_at",))
        return cls(sent_at=f["sent_at"])


@dataclass(frozen=True, kw_only=True, slots=True)
class Error:
    """Either way: a protocol or runtime error; the connection closes after it."""

    type_id: ClassVar[int] = 11
    code: int
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode):
            check_int("code", self.code, 0, 0xFFFF)
        try:
            object.__setattr__(self, "code", ErrorCode(self.code))
        except ValueError:
            raise ValueError(f"code must be an ErrorCode value, got {self.code}") from None
        check_str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"code": int(self.code), "reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Error:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("code", "reason"))
        return cls(code=f["code"], reason=f["reason"])


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayStatus:
    """Relay -> aggregator: how many clients are connected through this relay now.

    The aggregator counts them towards the clients it waits for before a round and
    selects only relays with clients; the count is advisory (quorum counts the
    contributor tokens that arrive, never this number).
    """

    type_id: ClassVar[int] = 19
    clients: int

    def __post_init__(self) -> None:
        check_int("clients", self.clients, 0, MAX_RELAYED_CLIENTS)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"clients": self.clients}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RelayStatus:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("clients",))
        return cls(clients=f["clients"])


@dataclass(frozen=True, kw_only=True, slots=True)
class Bye:
    """Either way: orderly close; nothing may follow it."""

    type_id: ClassVar[int] = 12
    reason: str = ""

    def __post_init__(self) -> None:
        check_str("reason", self.reason, MAX_REASON_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {"reason": self.reason}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Bye:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, (), ("reason",))
        return cls(reason=f.get("reason", ""))


Message: TypeAlias = (
    Hello
    | Welcome
    | RoundStart
    | UpdateChunk
    | UpdateDone
    | UploadRequest
    | UploadGrant
    | Ack
    | RoundEnd
    | DecryptRequest
    | DecryptResult
    | UnmaskRequest
    | UnmaskResult
    | PartialDecryptRequest
    | PartialDecryptResult
    | RelayStatus
    | KeyProof
    | Heartbeat
    | Error
    | Bye
)

# type byte on the wire -> message class
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.type_id: cls
    for cls in (
        Hello,
        Welcome,
        RoundStart,
        UpdateChunk,
        UpdateDone,
        Ack,
        RoundEnd,
        DecryptRequest,
        DecryptResult,
        Heartbeat,
        Error,
        Bye,
        UploadRequest,
        UploadGrant,
        UnmaskRequest,
        UnmaskResult,
        PartialDecryptRequest,
        PartialDecryptResult,
        RelayStatus,
        KeyProof,
    )
}


def message_from_wire(type_id: int, wire: object) -> Message:
    """Decode one message body; any problem is an ``InvalidMessage`` from the peer."""
    cls = MESSAGE_TYPES.get(type_id)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {type_id}")
    if not isinstance(wire, dict):
        raise InvalidMessage(f"{cls.__name__}: body must be a map, got {type(wire).__name__}")
    try:
        return cls.from_wire(wire)
    except InvalidMessage:
        raise
    except (TypeError, ValueError) as exc:
        raise InvalidMessage(f"{cls.__name__}: {exc}") from None
