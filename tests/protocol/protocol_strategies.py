"""Hypothesis strategies for every protocol message (shared by the protocol tests)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from protocol import (
    MAX_CHUNKS_PER_UPDATE,
    MAX_INT,
    MAX_RELAYED_CLIENTS,
    Ack,
    Bye,
    DecryptRequest,
    DecryptResult,
    Error,
    ErrorCode,
    Heartbeat,
    Hello,
    KeyProof,
    Message,
    RelayStatus,
    RoundEnd,
    RoundStart,
    UnmaskRequest,
    UnmaskResult,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)

uints = st.integers(0, MAX_INT)
ids = st.integers(0, 2**40)
finite = st.floats(allow_nan=False, allow_infinity=False)
nonneg = st.floats(0.0, 1e15, allow_nan=False)
payloads = st.binary(max_size=2048)
keys = st.text(min_size=1, max_size=24)
config_values = st.one_of(
    st.integers(-MAX_INT, MAX_INT), finite, st.text(max_size=64), st.booleans()
)
configs = st.dictionaries(keys, config_values, max_size=6)
float_maps = st.dictionaries(keys, finite, max_size=6)
reasons = st.text(max_size=200)


def _update_done(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[UpdateDone]:
    """UpdateDone with its counts and digest drawn, plus ``fields``."""
    return st.builds(
        UpdateDone,
        round_id=ids,
        chunk_count=st.integers(0, MAX_CHUNKS_PER_UPDATE),
        item_count=uints,
        digest=st.binary(min_size=32, max_size=32),
        **fields,
    )


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, version=st.integers(0, 255), committee=payloads),
    st.builds(
        Hello,
        version=st.integers(0, 255),
        relay=st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}", fullmatch=True),
    ),
    st.builds(
        Welcome,
        version=st.integers(0, 255),
        client_id=st.text(min_size=1, max_size=64),
        federation=payloads,
        session_config=configs,
        key_challenge=st.binary(max_size=64),
    ),
    st.builds(KeyProof, root=payloads),
    st.builds(
        RoundStart,
        round_id=ids,
        weights=payloads,
        clip=st.floats(1e-9, 1e9),
        value_bits=st.integers(1, 64),
        deadline_s=nonneg,
        chunks_received=st.integers(0, MAX_CHUNKS_PER_UPDATE),
        config=configs,
        committee=st.lists(payloads, max_size=3).map(tuple),
    ),
    st.builds(UploadRequest, round_id=ids, resume_token=st.binary(max_size=64)),
    st.builds(
        UploadGrant,
        round_id=ids,
        start_seq=st.integers(0, MAX_CHUNKS_PER_UPDATE),
        resume_token=st.binary(max_size=64),
    ),
    st.builds(
        UpdateChunk, round_id=ids, seq=st.integers(0, MAX_CHUNKS_PER_UPDATE - 1), payload=payloads
    ),
    _update_done(token=payloads, timings=float_maps, metrics=float_maps),
    _update_done(contributors=payloads),  # a relay's: its clients' tokens, none of its own
    st.builds(RelayStatus, clients=st.integers(0, MAX_RELAYED_CLIENTS)),
    st.builds(Ack, round_id=ids, accepted=st.booleans(), reason=reasons),
    st.builds(
        RoundEnd,
        round_id=ids,
        status=st.sampled_from(["completed", "failed", "closed"]),
        reason=reasons,
    ),
    st.builds(
        DecryptRequest,
        round_id=ids,
        shard_id=ids,
        start=uints,
        item_count=uints,
        payload=payloads,
        contributors=payloads,
    ),
    st.builds(
        UnmaskRequest,
        round_id=ids,
        shard_id=ids,
        start=uints,
        item_count=uints,
        contributors=payloads,
        payload=payloads,
    ),
    st.builds(
        UnmaskResult,
        round_id=ids,
        shard_id=ids,
        item_count=uints,
        payload=payloads,
        seconds=nonneg,
    ),
    st.builds(
        DecryptResult,
        round_id=ids,
        shard_id=ids,
        item_count=uints,
        payload=payloads,
        seconds=nonneg,
        randomness=payloads,
    ),
    st.builds(Heartbeat, sent_at=nonneg),
    st.builds(Error, code=st.sampled_from(list(ErrorCode)), reason=reasons),
    st.builds(Bye, reason=reasons),
)
