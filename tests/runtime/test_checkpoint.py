"""Checkpoints cannot be silently lost or altered: each fault is refused in one line.

Real files in a temporary state directory, damaged the way a disk, an editor or a crash
would: flipped bytes, NaNs, an edited round counter, a missing record, leftover
temporary files. Each refusal names the file and what is wrong and points at the
newest checkpoint that still verifies; nothing is pruned that could be needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedcore.aggregator import Aggregator
from fedcore.aggregator.checkpoint import (
    KEEP_CHECKPOINTS,
    Checkpoint,
    CheckpointError,
    _record_digest,
)
from fedcore.cli import main as fedcore_main
from fedcore.data import Dataset

from .conftest import Keys, aggregator_config, make_client, run_federation


def _history(rounds: int) -> list[dict[str, object]]:
    return [{"round_id": i + 1, "contributors": ["a", "b"]} for i in range(rounds)]


def _saved(state: Path, rounds: int, *, scale: float = 1.0) -> Checkpoint:
    ckpt = Checkpoint(
        global_weights=np.arange(10, dtype=np.float32) * scale,
        rounds_completed=rounds,
        next_round_id=rounds + 1,
        history=_history(rounds),
        metrics={"x": 1.0},
        model_fingerprint="m",
        excluded_decryptors=["liar"],
    )
    ckpt.save(state)
    return ckpt


def test_a_checkpoint_round_trips_and_keeps_the_newest_few(tmp_path: Path) -> None:
    for rounds in range(1, 5):
        _saved(tmp_path, rounds, scale=rounds)
    loaded = Checkpoint.load(tmp_path)
    assert loaded is not None
    assert loaded.rounds_completed == 4 and loaded.next_round_id == 5
    assert loaded.excluded_decryptors == ["liar"]
    np.testing.assert_array_equal(loaded.global_weights, np.arange(10, dtype=np.float32) * 4)
    assert len(list(tmp_path.glob("checkpoint-*.json"))) == KEEP_CHECKPOINTS
    assert len(list(tmp_path.glob("global-*.npy"))) == KEEP_CHECKPOINTS
    assert not list(tmp_path.glob("*.tmp"))
    assert Checkpoint.load(tmp_path / "empty") is None


def _model_file(state: Path) -> Path:
    return state / json.loads((state / "checkpoint.json").read_text())["model_file"]


def _flip_a_byte(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_the_model_is_refused_and_the_previous_good_one_named(
    tmp_path: Path,
) -> None:
    _saved(tmp_path, 1)
    _saved(tmp_path, 2, scale=2)
    _flip_a_byte(_model_file(tmp_path))  # the weights change by an ulp: it would load
    with pytest.raises(CheckpointError) as info:
        Checkpoint.load(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "does not match its SHA-256" in message
    assert "checkpoint-000001-000002.json (1 rounds)" in message
    # following the advice resumes from the older model, whole
    (tmp_path / "checkpoint-000001-000002.json").replace(tmp_path / "checkpoint.json")
    resumed = Checkpoint.load(tmp_path)
    assert resumed is not None and resumed.rounds_completed == 1


def test_nan_weights_are_refused_on_load_and_never_saved(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, 1)
    model = _model_file(tmp_path)
    weights = np.load(model)
    weights[3] = np.nan
    np.save(model, weights)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    # an attacker who also fixes the digests still gets the NaN refused
    record["model_sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()
    record["record_sha256"] = _record_digest(record)
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="1 NaN or infinite weights"):
        Checkpoint.load(tmp_path)
    ckpt.global_weights = weights
    with pytest.raises(CheckpointError, match="NaN"):
        ckpt.save(tmp_path)


def test_an_edited_round_counter_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path, 3)
    path = tmp_path / "checkpoint.json"
    record = json.loads(path.read_text())
    record["rounds_completed"] = 9
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not match its SHA-256"):
        Checkpoint.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"rounds_completed": 5}, "rounds_completed is 5 but the history holds 3"),
        ({"next_round_id": 2}, "next_round_id is 2, not above the last round id 3"),
        ({"history": [{"round_id": 2}, {"round_id": 1}, {"round_id": 3}]}, "not increasing"),
        (
            {"history": [*_history(2), {"round_id": 3, "contributors": ["a", "a"]}]},
            "round 3 names a contributor twice",
        ),
    ],
)
def test_a_history_that_contradicts_the_counters_is_refused(
    tmp_path: Path, change: dict[str, object], problem: str
) -> None:
    ckpt = _saved(tmp_path, 3)
    for key, value in change.items():
        setattr(ckpt, key, value)
    ckpt.save(tmp_path)  # a consistent digest over an inconsistent story
    with pytest.raises(CheckpointError, match=problem):
        Checkpoint.load(tmp_path)


def test_a_missing_record_next_to_model_files_is_not_a_fresh_start(tmp_path: Path) -> None:
    _saved(tmp_path, 2)
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(CheckpointError, match=r"is missing but .* start over with --fresh"):
        Checkpoint.load(tmp_path)
    assert list(tmp_path.glob("global-*.npy"))  # nothing was pruned
    moved = Checkpoint.set_aside(tmp_path)
    assert moved is not None and list(moved.glob("global-*.npy"))
    assert Checkpoint.load(tmp_path) is None  # now a fresh start, on purpose


def test_leftover_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    _saved(tmp_path, 1)
    (tmp_path / ".checkpoint.json.abc.tmp").write_bytes(b"half a record")
    (tmp_path / ".global-000001-000002.npy.def.tmp").write_bytes(b"\x93NUMPY")
    assert Checkpoint.load(tmp_path) is not None
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_format_1_checkpoint_still_loads(tmp_path: Path) -> None:
    np.save(tmp_path / "global-000001-000002.npy", np.ones(4, dtype=np.float32))
    record = {
        "format": 1,
        "model_file": "global-000001-000002.npy",
        "rounds_completed": 1,
        "next_round_id": 2,
        "history": _history(1),
        "metrics": {},
        "model_fingerprint": "m",
    }
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    loaded = Checkpoint.load(tmp_path)
    assert loaded is not None and loaded.rounds_completed == 1


def test_the_daemon_refuses_a_damaged_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real CLI: exit code, one line naming the file, no traceback."""
    state = tmp_path / "state"
    _saved(state, 2)
    _flip_a_byte(_model_file(state))
    argv = [
        "aggregator",
        "--public-key",
        str(tmp_path / "none.json"),
        "--cert",
        str(tmp_path / "a.pem"),
        "--key",
        str(tmp_path / "a.key"),
        "--ca",
        str(tmp_path / "ca.pem"),
        "--state-dir",
        str(state),
        "--plaintext",
    ]
    code = fedcore_main(argv)
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    assert "does not match its SHA-256" in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_an_unwritable_state_dir_is_found_before_it_is_needed(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(CheckpointError, match="is not writable") as info:
        Checkpoint.probe(not_a_dir / "state")
    assert "\n" not in str(info.value)
    Checkpoint.probe(tmp_path / "fine")
    assert list((tmp_path / "fine").iterdir()) == []


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    ckpt = _saved(tmp_path, 1)
    blocker = tmp_path / "global-000002-000003.npy"
    blocker.mkdir()  # the next model file cannot be written (as on a full disk)
    ckpt.rounds_completed, ckpt.next_round_id = 2, 3
    ckpt.history = _history(2)
    with pytest.raises(CheckpointError, match=r"cannot write a checkpoint .* intact"):
        ckpt.save(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert loaded is not None and loaded.rounds_completed == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_daemon_refuses_an_unwritable_state_dir_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    argv = ["aggregator", "--public-key", str(tmp_path / "none.json")]
    argv += ["--cert", str(tmp_path / "a.pem"), "--key", str(tmp_path / "a.key")]
    argv += ["--ca", str(tmp_path / "ca.pem"), "--state-dir", str(blocker / "state")]
    assert fedcore_main([*argv, "--plaintext"]) != 0
    err = capsys.readouterr().err
    assert "is not writable" in err and "Traceback" not in err, err


async def test_a_full_disk_fails_the_round_keeps_serving_and_loses_nothing(
    tmp_path: Path, pki: Path, keys: Keys, digits: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1's checkpoint cannot be written (as on a full disk): one ERROR line, the
    round's result is not kept in memory either, the daemon keeps serving, and once the
    disk has room the same model version reruns and every round completes once."""
    config = aggregator_config(tmp_path, pki, keys, rounds=2, clients_per_round=3)
    aggregator = Aggregator(config)
    state = config.state_dir
    blocker = state / "global-000001-000002.npy"  # a name the next saves write or prune
    blocker.mkdir(parents=True)
    clients = [
        make_client(i, pki, keys, digits, 3, federation=aggregator.federation) for i in range(3)
    ]
    failures = aggregator.metrics.checkpoint_failures_total

    async def free_the_disk() -> None:
        deadline = asyncio.get_running_loop().time() + 120
        while failures._value.get() < 1:
            assert asyncio.get_running_loop().time() < deadline, "no save ever failed"
            await asyncio.sleep(0.05)
        blocker.rmdir()

    freer = asyncio.create_task(free_the_disk())
    checkpoint, results = await run_federation(aggregator, clients, timeout=240)
    await freer
    assert checkpoint.rounds_completed == 2
    completed = [r for r in checkpoint.history if "failure" not in r]
    failed = [r for r in checkpoint.history if "failure" in r]
    assert len(completed) == 2 and failed == []  # the failed save left no record
    assert Checkpoint.load(state) is not None and Checkpoint.load(state).rounds_completed == 2
    assert aggregator.metrics.rounds_completed_total._value.get() == 2
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "checkpoint" in r.message]
    assert errors and all("intact" in e.message and "\n" not in e.message for e in errors)
    assert all(not isinstance(r, BaseException) for r in results), results
