"""The committee's messages: decryption and unmasking requests and their answers.

The aggregator sends a key holder a range of summed ciphertexts to decrypt, or a range
of decrypted (still masked) sums to unmask, each with the packed signed tokens of the
contributors; the member answers with fixed-width integers. Both exchanges carry the
same fields, so each pair shares one base that validates and encodes them; the
message types stay distinct (their own type id, their own place in the state table).
Payloads and tokens are opaque bytes here: this module knows nothing of Paillier,
masks or certificates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from .fields import (
    MAX_BYTES_FIELD_LEN,
    MAX_CONTRIBUTORS_LEN,
    check_bytes,
    check_float,
    check_int,
    pick_fields,
)

__all__ = [
    "DecryptRequest",
    "DecryptResult",
    "PartialDecryptRequest",
    "PartialDecryptResult",
    "UnmaskRequest",
    "UnmaskResult",
]

MAX_PROOF_LEN = 4384
"""Largest partial-decryption proof accepted (2048-bit key: about 0.6 KB; 16384-bit: 4.2 KB)."""
MAX_SHARE_INDEX = 64


@dataclass(frozen=True, kw_only=True, slots=True)
class _RangeRequest:
    """A committee request for positions ``[start, start + item_count)`` of a round's sum."""

    type_id: ClassVar[int]
    round_id: int
    shard_id: int
    start: int
    item_count: int
    payload: bytes
    contributors: bytes

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_int("shard_id", self.shard_id)
        check_int("start", self.start)
        check_int("item_count", self.item_count)
        check_bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)
        check_bytes("contributors", self.contributors, MAX_CONTRIBUTORS_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "start": self.start,
            "item_count": self.item_count,
            "payload": self.payload,
            "contributors": self.contributors,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Self:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire,
            cls,
            ("round_id", "shard_id", "start", "item_count", "payload", "contributors"),
        )
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            start=f["start"],
            item_count=f["item_count"],
            payload=f["payload"],
            contributors=f["contributors"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class _RangeAnswer:
    """A committee member's fixed-width integers for one range, and its seconds of work."""

    type_id: ClassVar[int]
    round_id: int
    shard_id: int
    item_count: int
    payload: bytes
    seconds: float

    def __post_init__(self) -> None:
        check_int("round_id", self.round_id)
        check_int("shard_id", self.shard_id)
        check_int("item_count", self.item_count)
        check_bytes("payload", self.payload, MAX_BYTES_FIELD_LEN)
        check_float(self, "seconds", self.seconds, 0.0)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        return {
            "round_id": self.round_id,
            "shard_id": self.shard_id,
            "item_count": self.item_count,
            "payload": self.payload,
            "seconds": self.seconds,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Self:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(wire, cls, ("round_id", "shard_id", "item_count", "payload", "seconds"))
        return cls(
            round_id=f["round_id"],
            shard_id=f["shard_id"],
            item_count=f["item_count"],
            payload=f["payload"],
            seconds=f["seconds"],
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class DecryptRequest(_RangeRequest):
    """Aggregator -> key holder: decrypt summed ciphertexts ``[start, start + item_count)``.

    ``payload`` holds the summed ciphertexts; ``contributors`` the packed list of the
    round's contributor tokens: the member decrypts only for a named set of at least the
    federation's quorum.
    """

    type_id: ClassVar[int] = 8


@dataclass(frozen=True, kw_only=True, slots=True)
class DecryptResult(_RangeAnswer):
    """Key-holding client -> aggregator: the plaintexts of one shard, and their randomness.

    ``randomness`` holds, per ciphertext, the ``r`` with ``c = (1+n)^m · r^n mod n²``
    (plaintext width each): re-encrypting ``payload`` with it must give back the shard,
    which the aggregator checks (batched) before it uses a single value.
    """

    type_id: ClassVar[int] = 9
    randomness: bytes

    def __post_init__(self) -> None:
        _RangeAnswer.__post_init__(self)
        check_bytes("randomness", self.randomness, MAX_BYTES_FIELD_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        wire = _RangeAnswer.to_wire(self)
        wire["randomness"] = self.randomness
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Self:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire,
            cls,
            ("round_id", "shard_id", "item_count", "payload", "seconds", "randomness"),
        )
        return cls(**f)


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskRequest(_RangeRequest):
    """Aggregator -> unmasker: remove the named contributors' masks from a decrypted range.

    ``payload`` holds the decrypted (still masked) sums of ``[start, start + item_count)``
    as fixed-width integers; ``contributors`` the packed signed tokens. The unmasker
    answers for one contributor set per model version, only for a quorum, and only
    when the unmasked values decode.
    """

    type_id: ClassVar[int] = 15


@dataclass(frozen=True, kw_only=True, slots=True)
class UnmaskResult(_RangeAnswer):
    """Unmasker -> aggregator: the unmasked sums of one range, as fixed-width integers."""

    type_id: ClassVar[int] = 16


@dataclass(frozen=True, kw_only=True, slots=True)
class PartialDecryptRequest(_RangeRequest):
    """Aggregator -> key-share holder: partially decrypt ``[start, start + item_count)``.

    A threshold federation's DecryptRequest: same fields and the same contributor rule,
    but the member answers with its share's partial decryptions and a proof, and T of
    them are needed for a plaintext.
    """

    type_id: ClassVar[int] = 17


@dataclass(frozen=True, kw_only=True, slots=True)
class PartialDecryptResult(_RangeAnswer):
    """Key-share holder -> aggregator: partial decryptions of one shard, with their proof.

    ``payload`` holds ``c^(2Δ·s_i) mod n²`` per ciphertext (ciphertext width);
    ``share_index`` is i; ``proof`` the batched proof of equality of discrete logs
    that the aggregator verifies before combining.
    """

    type_id: ClassVar[int] = 18
    share_index: int
    proof: bytes

    def __post_init__(self) -> None:
        _RangeAnswer.__post_init__(self)
        check_int("share_index", self.share_index, 1, MAX_SHARE_INDEX)
        check_bytes("proof", self.proof, MAX_PROOF_LEN)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        wire = _RangeAnswer.to_wire(self)
        wire["share_index"] = self.share_index
        wire["proof"] = self.proof
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Self:
        """Build from a decoded msgpack map (raises ``InvalidMessage``)."""
        f = pick_fields(
            wire,
            cls,
            ("round_id", "shard_id", "item_count", "payload", "seconds", "share_index", "proof"),
        )
        return cls(**f)
