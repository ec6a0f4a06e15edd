"""Round bookkeeping: selection, unmaskers, upload checks, fold-once, checkpoints, config."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.relay_config import RelayConfig
from fedcore.aggregator.rounds import (
    RejectedUpdate,
    RoundPhase,
    RoundState,
    Upload,
    pick_unmaskers,
    select_clients,
)
from fedcore.contracts import RejectReason
from fedcore.errors import ConfigError
from protocol.transport import SERVER_RECEIVE_BUFFER


def test_unmaskers_are_stable_for_a_model_version_and_spread_across_versions() -> None:
    holders = {f"client-{i}": hashlib.sha256(bytes([i])).digest() for i in range(8)}
    model = hashlib.sha256(b"model v1").digest()
    first = pick_unmaskers(holders, 1, model)
    assert len(first) == 1
    # a rerun of the same model version picks the same member, whatever the order
    assert pick_unmaskers(dict(reversed(holders.items())), 1, model) == first
    # ... unless it left: then another one
    gone = {k: v for k, v in holders.items() if k != first[0]}
    assert pick_unmaskers(gone, 1, model) != first
    picks = {pick_unmaskers(holders, 1, hashlib.sha256(bytes([v])).digest())[0] for v in range(40)}
    assert len(picks) >= 4  # different model versions rotate the role
    assert pick_unmaskers({}, 1, model) == []


def test_selection_is_reproducible_and_bounded() -> None:
    pool = [f"client-{i}" for i in range(20)]
    first = select_clients(pool, 5, seed=1, round_id=3)
    assert first == select_clients(reversed(pool), 5, seed=1, round_id=3)
    assert len(first) == 5 and set(first) <= set(pool)
    assert select_clients(pool, 50, seed=1, round_id=3) == sorted(pool)


def _upload(items: int = 10, chunk: int = 4) -> Upload:
    return Upload(client_id="c", round_id=1, expected_items=items, chunk_items=chunk)


def test_upload_accepts_consecutive_chunks_and_checks_done() -> None:
    upload = _upload()
    payloads = [b"a" * 4, b"b" * 4, b"c" * 2]
    for seq, payload in enumerate(payloads):
        upload.add_chunk(seq, payload, list(payload), len(payload))
    digest = hashlib.sha256(b"".join(payloads)).digest()
    assert upload.finish(chunk_count=3, item_count=10, digest=digest) == [list(p) for p in payloads]


@pytest.mark.parametrize(
    ("seq", "count", "reason"),
    [(1, 4, "wrong_chunk_count"), (0, 5, "wrong_chunk_count")],
)
def test_upload_refuses_gaps_and_oversized_chunks(seq: int, count: int, reason: str) -> None:
    with pytest.raises(RejectedUpdate) as info:
        _upload().add_chunk(seq, b"x" * count, [0] * count, count)
    assert info.value.reason.label == reason


def test_upload_refuses_wrong_counts_and_digest() -> None:
    upload = _upload(items=4)
    upload.add_chunk(0, b"abcd", [1, 2, 3, 4], 4)
    with pytest.raises(RejectedUpdate) as info:
        upload.finish(chunk_count=2, item_count=4, digest=hashlib.sha256(b"abcd").digest())
    assert info.value.reason is RejectReason.WRONG_CHUNK_COUNT
    with pytest.raises(RejectedUpdate) as info:
        upload.finish(chunk_count=1, item_count=4, digest=hashlib.sha256(b"abce").digest())
    assert info.value.reason is RejectReason.DIGEST_MISMATCH
    short = _upload(items=8)
    short.add_chunk(0, b"abcd", [1, 2, 3, 4], 4)
    with pytest.raises(RejectedUpdate):
        short.finish(chunk_count=1, item_count=4, digest=hashlib.sha256(b"abcd").digest())


def test_round_folds_each_client_once() -> None:
    state = RoundState(round_id=7, selected=frozenset({"a", "b", "c"}), deadline=0.0)

    def add(running: list[int], update: list[int]) -> None:
        for i, value in enumerate(update):
            running[i] += value

    state.fold("a", [1, 1], add, b"token-a")
    state.fold("b", [2, 2], add, b"token-b")
    assert state.running_sum == [3, 3] and state.folded == {"a": b"token-a", "b": b"token-b"}
    with pytest.raises(RejectedUpdate) as info:
        state.fold("a", [1, 1], add)
    assert info.value.reason is RejectReason.REPLAY
    with pytest.raises(RejectedUpdate) as info:
        state.fold("zed", [1, 1], add)
    assert info.value.reason is RejectReason.NOT_SELECTED
    assert state.pending == {"c"}
    state.phase = RoundPhase.DECRYPTING
    with pytest.raises(RejectedUpdate) as info:
        state.fold("c", [1, 1], add)
    assert info.value.reason is RejectReason.STALE_ROUND
    assert state.running_sum == [3, 3] and sorted(state.folded) == ["a", "b"]
    assert state.summary()["contributors"] == ["a", "b"]


def _config(tmp_path: Path, **kw: object) -> AggregatorConfig:
    base = {
        "public_key": tmp_path / "pk.json",
        "cert": tmp_path / "a.pem",
        "key": tmp_path / "a.key",
        "ca": tmp_path / "ca.pem",
        "state_dir": tmp_path / "state",
    }
    return AggregatorConfig.from_mapping({**base, **kw})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"min_clients": 0}, "min_clients"),
        ({"min_clients": 1}, "min_clients"),
        ({"min_clients": 4, "clients_per_round": 3}, "clients_per_round"),
        ({"clients_per_round": 3, "clients_fraction": 0.5}, "not both"),
        ({"clients_fraction": 1.5}, "clients_fraction"),
        ({"round_timeout": 0}, "round_timeout"),
        ({"headroom_bits": 8, "clients_per_round": 10}, "clients_per_round 10 exceeds"),
        ({"headroom_bits": 3, "max_weight": 1, "min_clients": 9}, "headroom_bits"),
        ({"max_weight": 0}, "max_weight"),
        ({"model": "no_colon"}, "module:factory"),
        ({"receive_buffer": 100}, "receive_buffer"),
        ({"bogus": 1}, "unknown aggregator setting"),
    ],
)
def test_config_refuses_bad_values(tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **changes)


def test_config_from_toml_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "fed.toml"
    path.write_text(
        "[aggregator]\n"
        f'public_key = "{tmp_path}/pk.json"\ncert = "c.pem"\nkey = "k.pem"\nca = "ca.pem"\n'
        'state_dir = "state"\nmin_clients = 3\nrounds = 4\n'
    )
    config = AggregatorConfig.from_toml(path, rounds=7, port=None)
    assert config.min_clients == 3 and config.rounds == 7 and config.port == 8765
    assert config.receive_buffer == SERVER_RECEIVE_BUFFER
    assert config.target_clients(10) == 10
    assert _config(tmp_path, clients_fraction=0.25, min_clients=2).target_clients(20) == 5
    # headroom sized from what a round can sum: clients x the weight bound
    assert _config(tmp_path, clients_per_round=10, max_weight=64).headroom_bits == 10
    assert _config(tmp_path, clients_per_round=1000, max_weight=1).headroom_bits == 10
    small = _config(tmp_path, headroom_bits=8, max_weight=16)  # 16 clients at most
    assert small.target_clients(100) == 16
    with pytest.raises(ConfigError, match="required"):
        AggregatorConfig.from_mapping({"cert": "x"})


def test_a_relay_sum_counts_each_of_its_clients_once_and_within_capacity() -> None:
    state = RoundState(
        round_id=3, selected=frozenset({"r1/a", "r2/a", "c"}), deadline=0.0, capacity=5
    )
    state.mark_folded("r1/a", {"x": b"tx", "y": b"ty"}, relay=True)
    state.mark_folded("c", {"c": b"tc"})
    assert state.pending == {"r2/a"} and sorted(state.folded) == ["c", "x", "y"]
    # the same client again, through another relay (or directly): refused, nothing counted
    with pytest.raises(RejectedUpdate) as info:
        state.mark_folded("r2/a", {"y": b"ty", "z": b"tz"}, relay=True)
    assert info.value.reason is RejectReason.REPLAY and "y" in str(info.value)
    # more contributors than the slot headroom sums: refused before anything is counted
    with pytest.raises(RejectedUpdate) as info:
        state.mark_folded("r2/a", {"z": b"1", "v": b"2", "w": b"3"}, relay=True)
    assert info.value.reason is RejectReason.OVER_CAPACITY
    assert state.pending == {"r2/a"} and len(state.folded) == 3
    state.mark_folded("r2/a", {"z": b"tz", "v": b"tv"}, relay=True)
    assert not state.pending and len(state.folded) == 5
    with pytest.raises(RejectedUpdate) as info:
        state.mark_folded("r1/a", {"q": b"tq"}, relay=True)
    assert info.value.reason is RejectReason.REPLAY
    summary = state.summary()
    assert summary["contributors"] == ["c", "v", "x", "y", "z"]
    assert summary["relays"] == {"r1/a": 2, "r2/a": 2}


def _relay_config(**changes: object) -> RelayConfig:
    base: dict[str, object] = {"upstream": "root:8765", "cert": "r.pem", "key": "r.key"}
    return RelayConfig.from_mapping({"ca": "ca.pem", **base, **changes})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"upstream": "root"}, "upstream must be HOST:PORT"),
        ({"upstream": "root:0"}, "upstream must be HOST:PORT"),
        ({"upstream": None}, "'upstream' is required"),
        ({"name": "a/b"}, "relay setting name"),
        ({"forward_margin": 1.0}, "forward_margin"),
        ({"clients_per_round": 0}, "clients_per_round"),
        ({"heartbeat_interval": 200.0}, "heartbeat_interval"),
        ({"backoff_max": 0.1}, "backoff_max"),
        ({"bogus": 1}, "unknown relay setting"),
    ],
)
def test_relay_config_refuses_bad_values(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _relay_config(**changes)


def test_relay_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nupstream = "root.example:8765"\ncert = "r.pem"\nkey = "r.key"\n')
    config = RelayConfig.from_toml(path, ca="ca.pem", port=9000, name=None)
    assert config.upstream_address == ("root.example", 8765) and config.port == 9000
    assert config.ca == Path("ca.pem") and config.federation is None
    assert config.instance_name  # the host name when no name is given
    assert _relay_config(name="pod-7").instance_name == "pod-7"
