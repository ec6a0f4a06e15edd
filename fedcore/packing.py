"""Clip, quantize, pack many values per Paillier plaintext, and back to a mean update.

A client's float update becomes ``slots_per_ciphertext`` unsigned integers per plaintext:

1. clip every value to ``[-clip, clip]``;
2. map it to ``[0, 2^b - 1]`` (``b = value_bits``) with unbiased stochastic rounding, so
   the offset ``+clip`` makes every value non-negative;
3. multiply by the client's integer FedAvg weight ``w`` (e.g. its sample count,
   ``1 <= w <= 2^h``);
4. pack: slot ``j`` of plaintext ``i`` holds value ``i·k + j`` in bits
   ``[j·s, (j+1)·s)`` with ``s = b + h`` (slot 0 in the lowest bits,
   ``k = slots_per_ciphertext``); the last plaintext is zero-padded.

Paillier addition adds plaintexts, hence slots, and a slot sum
``Σ w_i·q_i <= W·(2^b - 1) < 2^(b+h)`` never carries into the next slot while the total
weight ``W <= 2^h``. :func:`decode_sum` unpacks the decrypted sum ``S`` and returns the
weighted mean ``(S / W)·(2·clip / (2^b - 1)) - clip``. Plaintexts stay below
``2^(k·s) <= 2^(key_bits - 1) <= n``.

This module knows integers and numpy only: no keys, no encryption, no wire format.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedcore.errors import PackingError

__all__ = [
    "CONTRIBUTION_TAIL_SLOTS",
    "MAX_HEADROOM_BITS",
    "MAX_KEY_BITS",
    "MAX_VALUE_BITS",
    "MIN_VALUE_BITS",
    "ContributionSum",
    "PackingSpec",
    "check_sum_range",
    "decode_contribution_sum",
    "decode_sum",
    "dequantize_mean",
    "encode_contribution",
    "encode_update",
    "pack_slots",
    "quantize",
    "unpack_slots",
]

MIN_VALUE_BITS = 2
MAX_VALUE_BITS = 32
MAX_HEADROOM_BITS = 32
MAX_KEY_BITS = 16384
# Ciphertexts packed per numpy block: bounds the temporary bit arrays (≈ 64 bytes per value).
_BLOCK_CIPHERTEXTS = 512
CONTRIBUTION_TAIL_SLOTS = 2
"""Slots after the model values in a contribution: the weight, then the evaluated weight."""

U64Array = npt.NDArray[np.uint64]


def _require_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise PackingError(f"{name} must be an int in {low}..{high}, got {value!r}")
    if not low <= value <= high:
        raise PackingError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class PackingSpec:
    """How updates are quantized and packed; identical on every client of a federation.

    ``key_bits`` must be the bit length of the Paillier modulus n (so that
    ``2^(key_bits - 1) <= n``); ``value_bits`` is the quantization precision b,
    ``headroom_bits`` the h extra bits per slot that absorb the sum of weights
    (total weight at most ``2^h``), ``clip`` the symmetric clipping bound.
    """

    key_bits: int
    value_bits: int = 16
    headroom_bits: int = 10
    clip: float = 1.0

    def __post_init__(self) -> None:
        _require_int("value_bits", self.value_bits, MIN_VALUE_BITS, MAX_VALUE_BITS)
        _require_int("headroom_bits", self.headroom_bits, 0, MAX_HEADROOM_BITS)
        slot_bits = self.value_bits + self.headroom_bits
        _require_int("key_bits", self.key_bits, slot_bits + 1, MAX_KEY_BITS)
        if isinstance(self.clip, bool) or not isinstance(self.clip, int | float | np.floating):
            raise PackingError(f"clip must be a finite float > 0, got {self.clip!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise PackingError(f"clip must be a finite float > 0, got {self.clip!r}")
        # Normalise numpy scalars to plain values so that to_dict() is wire-ready.
        object.__setattr__(self, "key_bits", int(self.key_bits))
        object.__setattr__(self, "value_bits", int(self.value_bits))
        object.__setattr__(self, "headroom_bits", int(self.headroom_bits))
        object.__setattr__(self, "clip", float(self.clip))

    @classmethod
    def for_federation(
        cls, *, key_bits: int, value_bits: int, max_total_weight: int, clip: float
    ) -> PackingSpec:
        """The spec whose headroom ``h = ceil(log2(max_total_weight))`` fits that total weight."""
        weight = _require_int("max_total_weight", max_total_weight, 1, 1 << MAX_HEADROOM_BITS)
        headroom = (weight - 1).bit_length()
        return cls(key_bits=key_bits, value_bits=value_bits, headroom_bits=headroom, clip=clip)

    @property
    def slot_bits(self) -> int:
        """Bits per slot: ``value_bits + headroom_bits``."""
        return self.value_bits + self.headroom_bits

    @property
    def slots_per_ciphertext(self) -> int:
        """Values per plaintext: ``(key_bits - 1) // slot_bits`` (78 for 2048/16/10)."""
        return (self.key_bits - 1) // self.slot_bits

    @property
    def max_total_weight(self) -> int:
        """Largest sum of client weights a slot can hold: ``2^headroom_bits``."""
        return 1 << self.headroom_bits

    @property
    def levels(self) -> int:
        """Largest quantized value ``2^value_bits - 1``."""
        return (1 << self.value_bits) - 1

    @property
    def step(self) -> float:
        """Width of one quantization step: ``2·clip / (2^value_bits - 1)``."""
        return 2.0 * self.clip / self.levels

    def ciphertexts_for(self, n_values: int) -> int:
        """Number of plaintexts (hence ciphertexts) that hold ``n_values`` values."""
        if n_values < 0:
            raise PackingError(f"n_values must be >= 0, got {n_values}")
        return -(-n_values // self.slots_per_ciphertext)

    def to_dict(self) -> dict[str, int | float]:
        """Plain values for the wire: ``key_bits``, ``value_bits``, ``headroom_bits``, ``clip``."""
        return {
            "key_bits": self.key_bits,
            "value_bits": self.value_bits,
            "headroom_bits": self.headroom_bits,
            "clip": self.clip,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PackingSpec:
        """Inverse of :meth:`to_dict`; PackingError on missing, unknown or invalid fields."""
        expected = {"key_bits", "value_bits", "headroom_bits", "clip"}
        if not isinstance(data, Mapping):
            raise PackingError(f"packing spec must be a mapping, got {type(data).__name__}")
        keys = set(data)
        if keys != expected:
            raise PackingError(
                f"packing spec fields must be {sorted(expected)}; "
                f"missing {sorted(expected - keys)}, unknown {sorted(map(str, keys - expected))}"
            )
        return cls(
            key_bits=data["key_bits"],
            value_bits=data["value_bits"],
            headroom_bits=data["headroom_bits"],
            clip=data["clip"],
        )


def quantize(values: npt.ArrayLike, spec: PackingSpec, rng: np.random.Generator) -> U64Array:
    """Clip to ``[-clip, clip]`` and round stochastically to integers in ``[0, 2^b - 1]``.

    ``x = (v + clip) · (2^b - 1) / (2·clip)`` lies in ``[0, 2^b - 1]``; the result is
    ``floor(x) + 1`` with probability ``x - floor(x)``, else ``floor(x)``, so
    ``E[q] = x`` (unbiased) and ``|q - x| < 1`` (at most one step). ``rng`` makes it
    reproducible. Raises PackingError for NaN or infinite values.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.isfinite(v).all():
        bad = int(np.flatnonzero(~np.isfinite(v.ravel()))[0])
        raise PackingError(f"values must be finite; value at index {bad} is {v.ravel()[bad]}")
    clip = spec.clip
    x = (np.clip(v, -clip, clip) + clip) * (spec.levels / (2.0 * clip))
    np.clip(x, 0.0, float(spec.levels), out=x)  # guards against 1-ulp rounding past the ends
    floor = np.floor(x)
    q = floor + (rng.random(x.shape) < (x - floor))
    return q.astype(np.uint64)


def dequantize_mean(
    summed: npt.ArrayLike, spec: PackingSpec, total_weight: int
) -> npt.NDArray[np.float64]:
    """Weighted mean from slot sums: ``(S / W) · (2·clip / (2^b - 1)) - clip``.

    ``S = Σ w_i·q_i`` and ``W = Σ w_i``, so ``S / W`` is the weighted mean of the
    quantized values and the affine map undoes :func:`quantize`'s offset and scale.
    """
    weight = _require_int("total_weight", total_weight, 1, 1 << 62)
    s = np.asarray(summed)
    s = s.astype(np.float64) if s.dtype != object else np.array(s, dtype=np.float64)
    result: npt.NDArray[np.float64] = s * (spec.step / weight) - spec.clip
    return result


def pack_slots(values: npt.ArrayLike, spec: PackingSpec) -> list[int]:
    """Pack unsigned slot values, ``slots_per_ciphertext`` per int, slot 0 in the low bits.

    Plaintext ``i`` is ``Σ_j values[i·k + j] · 2^(j·s)``. Done with numpy bit arrays:
    each uint64 is spread into its bits (little-endian), the low ``s`` bits of the
    ``k`` values of a plaintext are laid end to end, packed back into little-endian
    bytes and read with one ``int.from_bytes`` per plaintext. Raises PackingError when
    a value does not fit in ``s`` bits.
    """
    v = np.ascontiguousarray(values, dtype=np.uint64).ravel()
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    if s < 64 and v.size and int(v.max()) >> s:
        bad = int(np.flatnonzero(v >> np.uint64(s))[0])
        raise PackingError(f"value at index {bad} does not fit in a {s}-bit slot: {v[bad]}")
    n_ct = spec.ciphertexts_for(v.size)
    padded = np.zeros(n_ct * k, dtype="<u8")
    padded[: v.size] = v
    out: list[int] = []
    from_bytes = int.from_bytes
    for start in range(0, n_ct, _BLOCK_CIPHERTEXTS):
        block = padded[start * k : (start + _BLOCK_CIPHERTEXTS) * k]
        rows = block.size // k
        bits = np.unpackbits(block.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        row_bits = np.ascontiguousarray(bits[:, :s]).reshape(rows, k * s)
        row_bytes = np.packbits(row_bits, axis=1, bitorder="little")
        out.extend(from_bytes(row.tobytes(), "little") for row in row_bytes)
    return out


def unpack_slots(plaintexts: Sequence[int], spec: PackingSpec, n_values: int) -> U64Array:
    """Inverse of :func:`pack_slots`: the first ``n_values`` slot values as uint64.

    Each plaintext is written as little-endian bytes (``int.to_bytes``), spread into
    bits, cut into ``s``-bit rows and packed back into uint64. Raises PackingError when
    the count does not match ``n_values``, a plaintext has bits above the last slot, or
    a padding slot is non-zero (all signs of a wrong spec, key or sum).
    """
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    n_ct = spec.ciphertexts_for(n_values)
    if len(plaintexts) != n_ct:
        raise PackingError(
            f"{n_values} values need {n_ct} plaintexts of {k} slots, got {len(plaintexts)}"
        )
    used_bits = k * s
    width = -(-used_bits // 8)
    chunks: list[bytes] = []
    for index, plaintext in enumerate(plaintexts):
        p = int(plaintext)
        if p < 0 or p >> used_bits:
            raise PackingError(
                f"plaintext at index {index} has bits outside its {k} slots of {s} bits "
                "(slot overflow, or a different key or packing spec)"
            )
        chunks.append(p.to_bytes(width, "little"))
    out = np.empty(n_ct * k, dtype="<u8")
    for start in range(0, n_ct, _BLOCK_CIPHERTEXTS):
        block = chunks[start : start + _BLOCK_CIPHERTEXTS]
        raw = np.frombuffer(b"".join(block), dtype=np.uint8).reshape(len(block), width)
        bits = np.unpackbits(raw, axis=1, bitorder="little")[:, :used_bits]
        slot_bits = np.zeros((len(block) * k, 64), dtype=np.uint8)
        slot_bits[:, :s] = bits.reshape(-1, s)
        packed = np.packbits(slot_bits, axis=1, bitorder="little")
        out[start * k : (start + len(block)) * k] = packed.view("<u8").ravel()
    if out[n_values:].any():
        raise PackingError("padding slots after the last value are not zero")
    return out[:n_values].astype(np.uint64)


def _flat_update(update: npt.ArrayLike) -> npt.NDArray[np.floating[Any]]:
    values = np.asarray(update)
    if values.ndim != 1:
        raise PackingError(f"update must be 1-D, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise PackingError(f"update must be a float array, got dtype {values.dtype}")
    return values


def encode_update(
    update: npt.ArrayLike,
    spec: PackingSpec,
    *,
    weight: int = 1,
    rng: np.random.Generator,
) -> list[int]:
    """Quantize a 1-D float update, multiply by ``weight``, pack into plaintexts.

    ``weight`` is this client's FedAvg weight (``1 <= weight <= max_total_weight``);
    each slot holds ``weight · q`` with ``q`` in ``[0, 2^b - 1]``. The result has
    ``spec.ciphertexts_for(len(update))`` integers, each below ``2^(key_bits - 1)``.
    """
    w = _require_int("weight", weight, 1, spec.max_total_weight)
    values = _flat_update(update)
    q = quantize(values, spec, rng)
    if w != 1:
        q *= np.uint64(w)
    return pack_slots(q, spec)


def decode_sum(
    plaintexts: Sequence[int], spec: PackingSpec, *, n_values: int, total_weight: int
) -> npt.NDArray[np.float32]:
    """The weighted mean update from the decrypted sum of weighted packed updates.

    ``total_weight`` is ``W = Σ w_i`` over the summed updates. ``W > max_total_weight``
    raises PackingError (the sum would overflow the slot headroom: never wrapped
    silently); so does a slot sum above ``W · (2^b - 1)``, which no honest set of
    updates with that total weight can produce.
    """
    weight = _require_int("total_weight", total_weight, 1, 1 << 62)
    if weight > spec.max_total_weight:
        raise PackingError(
            f"total_weight {weight} would overflow slot headroom: at most "
            f"{spec.max_total_weight} (2^{spec.headroom_bits}) fits"
        )
    if isinstance(n_values, bool) or not isinstance(n_values, int) or n_values < 0:
        raise PackingError(f"n_values must be an int >= 0, got {n_values!r}")
    summed = unpack_slots(plaintexts, spec, n_values)
    limit = weight * spec.levels
    if summed.size and int(summed.max()) > limit:
        bad = int(np.flatnonzero(summed > np.uint64(limit))[0])
        raise PackingError(
            f"slot sum at index {bad} exceeds total_weight·(2^b - 1) = {limit}: "
            "wrong total_weight, or an update weighted more than declared"
        )
    return dequantize_mean(summed, spec, weight).astype(np.float32)


@dataclass(frozen=True, slots=True)
class ContributionSum:
    """What a decrypted sum of contributions says: the FedAvg mean and its totals.

    ``total_weight`` is ``W = Σ w_i``; ``evaluated_weight`` ``E = Σ w_i`` over the
    clients that reported metrics; ``report_means`` the weighted mean of each reported
    metric (``None`` when no client reported).
    """

    mean_update: npt.NDArray[np.float32]
    total_weight: int
    evaluated_weight: int
    report_means: tuple[float, ...] | None


def encode_contribution(
    update: npt.ArrayLike,
    spec: PackingSpec,
    *,
    weight: int,
    report: Sequence[float] | None,
    report_bounds: Sequence[float],
    rng: Any,
) -> list[int]:
    """One client's plaintexts: its weighted update, its weight, and its weighted report.

    The slot vector is ``[w·q_1 .. w·q_V, w, e, e·r_1 .. e·r_K]`` where ``q`` is the
    quantized update (:func:`quantize`), ``e = w`` when the client evaluated the
    global model (``report`` is given) and 0 otherwise, and ``r_k`` is metric k clipped
    to ``[0, bound_k]`` and quantized to ``[0, 2^b - 1]`` with the same unbiased
    stochastic rounding. Summed over clients, the slots hold ``Σ w·q``, ``W``, ``E``
    and ``Σ e·r``: the decoder recovers the weighted mean and the totals from the sum
    alone, so the weights are the clients' own and need not be sent in the clear.
    ``rng`` provides ``random(shape)`` (a CSPRNG in clients: `SecureUniform`).
    """
    w = _require_int("weight", weight, 1, spec.max_total_weight)
    values = _flat_update(update)
    k = len(report_bounds)
    q = quantize(values, spec, rng)
    tail = np.zeros(CONTRIBUTION_TAIL_SLOTS + k, dtype=np.uint64)
    tail[0] = w
    if report is not None:
        if len(report) != k:
            raise PackingError(f"report has {len(report)} values, expected {k}")
        metrics = np.asarray(report, dtype=np.float64)
        if not np.isfinite(metrics).all():
            raise PackingError("report values must be finite")
        bounds = np.asarray(report_bounds, dtype=np.float64)
        x = np.clip(metrics, 0.0, bounds) / bounds * spec.levels
        floor = np.floor(x)
        r = (floor + (rng.random(x.shape) < (x - floor))).astype(np.uint64)
        tail[1] = w
        tail[CONTRIBUTION_TAIL_SLOTS:] = r
    slots = np.concatenate([q, tail])
    if w != 1:
        slots[: values.size] *= np.uint64(w)
        slots[values.size + CONTRIBUTION_TAIL_SLOTS :] *= np.uint64(w)
    return pack_slots(slots, spec)


def decode_contribution_sum(
    plaintexts: Sequence[int],
    spec: PackingSpec,
    *,
    n_values: int,
    report_bounds: Sequence[float],
    min_total_weight: int = 1,
) -> ContributionSum:
    """Decode a decrypted sum of :func:`encode_contribution` vectors.

    Raises PackingError when the sum cannot be one of honest contributions: bits
    outside the slots, non-zero padding, ``W`` below ``min_total_weight`` or above
    ``2^headroom_bits``, a model slot above ``W·(2^b - 1)``, ``E > W``, or a report
    slot above ``E·(2^b - 1)``. A decryption of anything but the exact sum of the named
    contributors (noise after unmasking) fails these checks with overwhelming
    probability.
    """
    k = len(report_bounds)
    total_slots = n_values + CONTRIBUTION_TAIL_SLOTS + k
    slots = unpack_slots(plaintexts, spec, total_slots)
    weight = int(slots[n_values])
    evaluated = int(slots[n_values + 1])
    if not min_total_weight <= weight <= spec.max_total_weight:
        raise PackingError(
            f"the sum's total weight {weight} is outside "
            f"{min_total_weight}..{spec.max_total_weight} (not a sum of honest contributions)"
        )
    model = slots[:n_values]
    limit = weight * spec.levels
    if model.size and int(model.max()) > limit:
        bad = int(np.flatnonzero(model > np.uint64(limit))[0])
        raise PackingError(f"slot sum at index {bad} exceeds W·(2^b - 1) = {limit}")
    if evaluated > weight:
        raise PackingError(f"evaluated weight {evaluated} exceeds the total weight {weight}")
    report = slots[n_values + CONTRIBUTION_TAIL_SLOTS :]
    if report.size and int(report.max()) > evaluated * spec.levels:
        raise PackingError("a report slot exceeds E·(2^b - 1)")
    means: tuple[float, ...] | None = None
    if evaluated:
        means = tuple(
            float(int(r) / evaluated / spec.levels * bound)
            for r, bound in zip(report, report_bounds, strict=True)
        )
    mean = dequantize_mean(model, spec, weight).astype(np.float32)
    return ContributionSum(
        mean_update=mean, total_weight=weight, evaluated_weight=evaluated, report_means=means
    )


def check_sum_range(
    plaintexts: Sequence[int], spec: PackingSpec, *, first: int, slot_count: int
) -> None:
    """Raise PackingError unless these plaintexts can be part of an honest sum.

    ``plaintexts`` are positions ``first, first + 1, ...`` of a decrypted, unmasked sum
    of contributions that hold ``slot_count`` slots in all. Every plaintext must fit in
    its slots (below ``2^(k·s)``), and if the range holds the last plaintext, its padding
    slots must be zero. A plaintext of noise (a wrong product, or masks that did not
    cancel) passes the first test with probability ``2^(k·s) / n`` at most: a range of
    a few hundred noise plaintexts is refused except with negligible probability.
    """
    limit_bits = spec.slot_bits * spec.slots_per_ciphertext
    for offset, value in enumerate(plaintexts):
        if value < 0 or int(value) >> limit_bits:
            raise PackingError(
                f"plaintext {first + offset} has bits outside its slots: not a sum of "
                "honest contributions"
            )
    total = spec.ciphertexts_for(slot_count)
    if plaintexts and first + len(plaintexts) == total:
        used = slot_count - (total - 1) * spec.slots_per_ciphertext
        if int(plaintexts[-1]) >> (used * spec.slot_bits):
            raise PackingError("padding slots after the last value are not zero")
