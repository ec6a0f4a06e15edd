"""Attacks by a deviating aggregator against real clients and a real committee.

Every test runs `MaliciousAggregator` (tests/runtime/malicious.py) over real mutual TLS
on 127.0.0.1, with real `fedcore.client.Client`s training the digits MLP, real 1024-bit
Paillier keys and certificates from `fedcore certs`. The aggregator tries one attack from
the threat model (docs/threat-model.md) and the test measures what it recovers about a
victim's update: the Pearson correlation of its best estimate with the victim's true
update must stay below 0.1 (noise), while the same harness, playing honest, recovers
the legitimate quorum sum exactly (a positive control: the attacks fail because of the
clients' checks, not because the harness is broken).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.aggregator import build_model
from fedcore.client import Client
from fedcore.contracts import FederationMismatch, FederationParams, SessionInfo
from fedcore.credentials import CommitteeCredential, Signer
from fedcore.crypto import generate_keypair
from fedcore.crypto.masking import public_key_bytes
from fedcore.data import Dataset
from fedcore.model import ModelLayout, flatten_state_dict
from fedcore.packing import pack_slots
from protocol.messages import UpdateChunk, UploadRequest

from .conftest import Keys, aggregator_config, make_client, weight_of
from .malicious import MaliciousAggregator, Refused, Upload, correlation, raw_estimate

NAMES = [f"client-{i}" for i in range(4)]
VICTIM = "client-2"  # holds no key; client-0 and client-1 are committee members
HONEST_SET = ["client-1", "client-2", "client-3"]  # a legitimate quorum (min_clients 3)
LEAK_BOUND = 0.1


@dataclass
class Federation:
    harness: MaliciousAggregator
    clients: dict[str, Client]
    tasks: dict[str, asyncio.Task[Any]]
    updates: dict[str, list[np.ndarray]]  # each client's true update per training run
    weights: bytes
    digits: Dataset

    def truth(self, name: str, run: int = -1) -> np.ndarray:
        return self.updates[name][run]


def _recorder(updates: list[np.ndarray]) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a train_fn so the test knows the client's true update (it never leaves)."""

    def wrap(train_fn: Callable[..., int]) -> Callable[..., int]:
        def train(model: Any, config: Any) -> int:
            before = flatten_state_dict(model.state_dict())
            samples = train_fn(model, config)
            updates.append(flatten_state_dict(model.state_dict()) - before)
            return samples

        return train

    return wrap


@contextlib.asynccontextmanager
async def federation(
    tmp_path: Path,
    pki: Path,
    keys: Keys,
    digits: Dataset,
    *,
    offered: Callable[[FederationParams], bytes] | None = None,
    **settings: Any,
) -> AsyncIterator[Federation]:
    """A malicious aggregator and four real clients that pinned the honest federation."""
    # 16-bit values: the honest controls compare decoded sums with the truth to a
    # correlation of 0.999, above what 8-bit rounding of these small updates allows
    config = aggregator_config(
        tmp_path, pki, keys, **{"clients_per_round": 4, "value_bits": 16, **settings}
    )
    pinned = config.federation(config.load_public_key())
    model = build_model(config.model, config.model_kwargs, seed=0)
    layout = ModelLayout.of(model.state_dict())
    session = SessionInfo(
        num_values=layout.numel, chunk_items=256, model_layout=layout.to_json(), rounds=3
    )
    harness = MaliciousAggregator(pki, pinned, session)
    if offered is not None:
        harness.welcome_federation = offered(pinned)
    port = await harness.start()
    updates: dict[str, list[np.ndarray]] = {name: [] for name in NAMES}
    clients = {
        name: make_client(
            i,
            pki,
            keys,
            digits,
            4,
            federation=pinned,
            holds_key=i < 2,
            train_wrapper=_recorder(updates[name]),
            reconnect_attempts=3,
        )
        for i, name in enumerate(NAMES)
    }
    tasks = {
        name: asyncio.create_task(client.run(f"127.0.0.1:{port}"))
        for name, client in clients.items()
    }
    weights = flatten_state_dict(model.state_dict()).astype(np.float32).tobytes()
    try:
        yield Federation(harness, clients, tasks, updates, weights, digits)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await harness.stop()


async def _collect_all(fed: Federation, round_id: int, unmasker: str) -> dict[str, Upload]:
    h = fed.harness
    await h.wait_for(NAMES)
    uploads = await h.run_round(round_id, fed.weights, NAMES, h.committee_of([unmasker]))
    assert all(isinstance(u, Upload) for u in uploads.values()), uploads
    return {name: u for name, u in uploads.items() if isinstance(u, Upload)}


async def _honest_sum(
    fed: Federation, round_id: int, uploads: dict[str, Upload], names: list[str]
) -> tuple[np.ndarray, list[int]]:
    """Positive control: the quorum sum the committee must give, decoded and checked.

    Returns the mean update and the mask sums of ``names``, which the unmasker's answer
    gives away (masked sum minus released sum): the attacker keeps both.
    """
    h = fed.harness
    tokens = [uploads[n].token for n in names]
    masked = await h.decrypt("client-1", round_id, h.combine([uploads[n] for n in names]), tokens)
    released = await h.unmask("client-0", round_id, tokens, masked)
    result = h.codec.decode(released)
    fedp = h.federation
    weights = {n: weight_of(NAMES.index(n), fed.digits, 4, fedp) for n in names}
    assert result.total_weight == sum(weights.values())
    expected = sum(weights[n] * np.clip(fed.truth(n), -fedp.clip, fedp.clip) for n in names) / sum(
        weights.values()
    )
    step = h.codec.spec.step
    assert np.max(np.abs(result.mean_update - expected)) <= step * 1.0001
    assert correlation(result.mean_update, expected) > 0.999
    return result.mean_update, h.masks_of(masked, released)


def _leak(estimates: list[np.ndarray], truth: np.ndarray) -> float:
    return max(abs(correlation(e, truth)) for e in estimates)


def _uploaded_bytes(fed: Federation) -> int:
    return sum(len(m.payload) for _, m in fed.harness.messages_seen if isinstance(m, UpdateChunk))


# ------------------------------------------------------------------ the attacks


@pytest.mark.slow
async def test_decrypting_one_upload_yields_noise(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        uploads = await _collect_all(fed, 1, "client-0")
        _, masks = await _honest_sum(fed, 1, uploads, HONEST_SET)
        tokens = [uploads[n].token for n in HONEST_SET]
        # The victim's upload alone, dressed up as the legitimate set's sum, decrypted
        # by the member that has not decrypted this round yet ...
        alone = await h.decrypt("client-0", 1, h.ciphertexts(uploads[VICTIM]), tokens)
        # ... is not unmasked: it does not decode.
        with pytest.raises(Refused, match="does not decode"):
            await h.unmask("client-0", 1, tokens, alone)
        spec, n = h.codec.spec, h.codec.n_values
        estimates = [raw_estimate(alone, spec, n), raw_estimate(h.unmasked(alone, masks), spec, n)]
        leak = _leak(estimates, fed.truth(VICTIM))
        print(f"individual decryption: |correlation| with the victim's update {leak:.4f}")
        assert leak < LEAK_BOUND


@pytest.mark.slow
async def test_an_early_running_sum_yields_noise_or_a_refusal(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        uploads = await _collect_all(fed, 1, "client-0")
        early = ["client-2", "client-3"]  # folded so far: fewer than min_clients
        partial = await h.decrypt(
            "client-0", 1, h.combine([uploads[n] for n in early]), [uploads[n].token for n in NAMES]
        )
        with pytest.raises(Refused, match="quorum is 3"):
            await h.unmask("client-0", 1, [uploads[n].token for n in early], partial)
        await h.wait_for(["client-0"])  # it hung up after refusing; it comes back
        # Name a quorum, but hand over the partial sum: it does not decode.
        tokens = [uploads[n].token for n in HONEST_SET]
        with pytest.raises(Refused, match="does not decode"):
            await h.unmask("client-0", 1, tokens, partial)
        await h.wait_for(["client-0"])
        # Even with the quorum's mask sums in hand (from the legitimate sum), the
        # partial sum stays masked by the missing contributor's masks.
        _, masks = await _honest_sum(fed, 1, uploads, HONEST_SET)
        spec, n = h.codec.spec, h.codec.n_values
        estimates = [
            raw_estimate(partial, spec, n),
            raw_estimate(h.unmasked(partial, masks), spec, n),
        ]
        truths = [fed.truth("client-2"), fed.truth("client-3")]
        leak = max(_leak(estimates, t) for t in [*truths, truths[0] + truths[1]])
        print(f"early running sum: |correlation| {leak:.4f}")
        assert leak < LEAK_BOUND


@pytest.mark.slow
async def test_two_overlapping_sums_in_one_round_are_refused(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        uploads = await _collect_all(fed, 1, "client-0")
        first, masks = await _honest_sum(fed, 1, uploads, HONEST_SET)
        other = ["client-0", "client-1", "client-3"]  # the same round without the victim
        tokens = [uploads[n].token for n in other]
        second = await h.decrypt("client-0", 1, h.combine([uploads[n] for n in other]), tokens)
        with pytest.raises(Refused, match="different contributor set"):
            await h.unmask("client-0", 1, tokens, second)
        await h.wait_for(["client-0"])
        with pytest.raises(Refused, match="did not mask for this member"):
            await h.unmask("client-1", 1, tokens, second)  # another key holder: not its masks
        await h.wait_for(["client-1"])
        # What is left to the attacker: the second sum, with the mask sums it has.
        spec, n = h.codec.spec, h.codec.n_values
        difference = first - raw_estimate(h.unmasked(second, masks), spec, n)
        leak = _leak([difference], fed.truth(VICTIM))
        print(f"two overlapping sums: |correlation| {leak:.4f}")
        assert leak < LEAK_BOUND


@pytest.mark.slow
@pytest.mark.parametrize(
    ("field", "change"),
    [
        ("public_key", "swap_key"),
        ("min_clients", {"min_clients": 2}),
        ("value_bits", {"value_bits": 24}),
        ("max_weight", {"max_weight": 4}),
        ("clip", {"clip": 8.0}),
    ],
)
async def test_a_swapped_key_or_federation_is_refused_before_any_upload(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset, field: str, change: Any
) -> None:
    attacker_key, _attacker_private = generate_keypair(1024)  # the aggregator could decrypt

    def offered(pinned: FederationParams) -> bytes:
        document = pinned.to_document()
        if change == "swap_key":
            document["public_key"] = {"n": str(attacker_key.n), "sha256": attacker_key.sha256()}
        else:
            document.update(change)
        return FederationParams.from_document(document).to_bytes()

    async with federation(tmp_path, pki, keys, digits, offered=offered) as fed:
        for name, task in fed.tasks.items():
            with pytest.raises(FederationMismatch, match=field):
                await asyncio.wait_for(task, 60)
            assert fed.clients[name].result.bytes_uploaded == 0
        assert _uploaded_bytes(fed) == 0  # nothing to decrypt, with any key
        assert not any(isinstance(m, UploadRequest) for _, m in fed.harness.messages_seen)


@pytest.mark.slow
async def test_a_round_with_another_clip_or_an_invented_committee_gets_no_upload(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        await h.wait_for(NAMES)
        # An unmasker the aggregator invented: its mask key signed with the aggregator's
        # own certificate (a server certificate, not a committee member's).
        own = Signer.load(pki / "aggregator.pem", pki / "aggregator.key")
        invented = CommitteeCredential.issue(
            own,
            federation=h.federation.digest(),
            mask_public=public_key_bytes(X25519PrivateKey.generate()),
        ).to_wire()
        outcome = await h.run_round(1, fed.weights, NAMES, (invented,), timeout=10)
        assert all(isinstance(o, Refused) for o in outcome.values()), outcome
        assert all(c.result.rounds_refused == 1 for c in fed.clients.values())
        # A clip of the aggregator's choosing: the clients stop.
        committee = h.committee_of(["client-0"])
        outcome = await h.run_round(2, fed.weights, NAMES, committee, clip=100.0, timeout=10)
        assert all(isinstance(o, Refused) for o in outcome.values())
        for task in fed.tasks.values():
            with pytest.raises(FederationMismatch, match="clip"):
                await asyncio.wait_for(task, 30)
        assert _uploaded_bytes(fed) == 0


@pytest.mark.slow
async def test_chosen_weights_are_ignored_and_scaled_uploads_yield_noise(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    # Wide slots, weights of 1: the old attack's room to separate three updates
    # (slot = q1 + 2^16·q2 + 2^32·q3 fits in 48 bits).
    async with federation(
        tmp_path, pki, keys, digits, headroom_bits=32, max_weight=1, clients_per_round=4
    ) as fed:
        h = fed.harness
        await h.wait_for(NAMES)
        committee = h.committee_of(["client-0"])
        outcome = await h.run_round(
            1,
            fed.weights,
            NAMES,
            committee,
            config={"weight": 1 << 16},  # ignored
        )
        uploads = {n: u for n, u in outcome.items() if isinstance(u, Upload)}
        assert sorted(uploads) == NAMES
        names = ["client-1", "client-2", "client-3"]
        tokens = [uploads[n].token for n in names]
        masked = await h.decrypt("client-1", 1, h.combine([uploads[n] for n in names]), tokens)
        released = await h.unmask("client-0", 1, tokens, masked)
        assert h.codec.decode(released).total_weight == 3  # their own weights, not 2^16
        masks = h.masks_of(masked, released)
        # The attack: scale the uploads homomorphically instead, decrypt, separate.
        scaled = h.combine([uploads[n] for n in names], [1, 1 << 16, 1 << 32])
        plain = await h.decrypt("client-0", 1, scaled, tokens)
        with pytest.raises(Refused, match="does not decode"):
            await h.unmask("client-0", 1, tokens, plain)
        unmasked = h.unmasked(plain, masks)
        spec, n = h.codec.spec, h.codec.n_values
        # Positive control: without masks, the same slots would hold
        # q1 + 2^16·q2 + 2^32·q3 and the separation below recovers each update.
        clip = h.federation.clip
        quantized = [
            np.round((np.clip(fed.truth(m), -clip, clip) + clip) / spec.step).astype(np.uint64)
            for m in names
        ]
        tail = np.zeros(h.codec.slot_count - n, dtype=np.uint64)
        packed = quantized[0] + (quantized[1] << np.uint64(16)) + (quantized[2] << np.uint64(32))
        counterfactual = pack_slots(np.concatenate([packed, tail]), spec)
        leak = 0.0
        for index, name in enumerate(names):
            control = _separate_slot(counterfactual, spec, n, 16 * index)
            assert correlation(control, fed.truth(name)) > 0.9
            estimate = _separate_slot(unmasked, spec, n, 16 * index)
            leak = max(leak, _leak([estimate], fed.truth(name)))
        print(f"scaled uploads: |correlation| {leak:.4f}")
        assert leak < LEAK_BOUND


def _slots_of(plaintexts: list[int], spec: Any) -> list[int]:
    s, k = spec.slot_bits, spec.slots_per_ciphertext
    mask = (1 << s) - 1
    return [(int(p) >> (j * s)) & mask for p in plaintexts for j in range(k)]


def _separate_slot(plaintexts: list[int], spec: Any, n_values: int, shift: int) -> np.ndarray:
    """The attacker's reading of one scaled update: 16 bits of every slot from ``shift``."""
    slots = _slots_of(plaintexts, spec)[:n_values]
    q = np.array([(v >> shift) & 0xFFFF for v in slots], dtype=np.float64)
    return q * spec.step - spec.clip


@pytest.mark.slow
async def test_a_rerun_of_the_same_model_cannot_give_a_second_sum(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        uploads = await _collect_all(fed, 1, "client-0")
        first, masks = await _honest_sum(fed, 1, uploads, HONEST_SET)
        # "Crash", then rerun the same model version under a new round id.
        rerun = await _collect_all(fed, 2, "client-0")
        for name in NAMES:  # one update per model version: the same bytes again
            assert rerun[name].ciphertexts == uploads[name].ciphertexts
            assert len(fed.updates[name]) == 1  # trained once
        other = ["client-0", "client-1", "client-3"]
        tokens = [rerun[n].token for n in other]
        second = await h.decrypt("client-1", 2, h.combine([rerun[n] for n in other]), tokens)
        with pytest.raises(Refused, match="different contributor set"):
            await h.unmask("client-0", 2, tokens, second)
        await h.wait_for(NAMES)
        # Rerun again with another unmasker: the clients refuse to mask the same model
        # version for it, so nothing new is uploaded at all.
        outcome = await h.run_round(3, fed.weights, NAMES, h.committee_of(["client-1"]), timeout=10)
        assert all(isinstance(o, Refused) for o in outcome.values())
        assert all(c.result.rounds_refused == 1 for c in fed.clients.values())
        # The same set again is served: it reveals nothing new.
        same = [rerun[n].token for n in HONEST_SET]
        again = await h.decrypt("client-0", 2, h.combine([rerun[n] for n in HONEST_SET]), same)
        assert h.codec.decode(await h.unmask("client-0", 2, same, again)).mean_update.tolist() == (
            first.tolist()
        )
        spec, n = h.codec.spec, h.codec.n_values
        difference = first - raw_estimate(h.unmasked(second, masks), spec, n)
        leak = _leak([difference], fed.truth(VICTIM))
        print(f"rerun: |correlation| {leak:.4f}")
        assert leak < LEAK_BOUND


@pytest.mark.slow
async def test_returning_to_an_old_model_version_gets_no_second_update(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset
) -> None:
    """Versions A, B, C, then A again: the clients no longer keep their update for A, and
    they refuse to make a second one (its sum could be subtracted from the first's)."""
    async with federation(tmp_path, pki, keys, digits) as fed:
        h = fed.harness
        await h.wait_for(NAMES)
        committee = h.committee_of(["client-0"])
        base = np.frombuffer(fed.weights, dtype=np.float32)
        versions = [fed.weights]
        for nudge in (1e-3, 2e-3):  # two other model versions, each a tiny nudge of A
            other = base.copy()
            other[0] += nudge
            versions.append(other.tobytes())
        for round_id, weights in enumerate(versions, start=1):
            outcome = await h.run_round(round_id, weights, NAMES, committee)
            assert all(isinstance(o, Upload) for o in outcome.values()), outcome
        outcome = await h.run_round(4, fed.weights, NAMES, committee, timeout=10)
        assert all(isinstance(o, Refused) for o in outcome.values()), outcome
        for name, client in fed.clients.items():
            assert client.result.rounds_refused == 1
            assert len(fed.updates[name]) == 3  # A, B and C were trained once each
