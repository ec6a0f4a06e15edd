"""Crash-safe aggregator state on disk that cannot be silently lost or altered.

Every write is atomic (temp file, fsync, rename), and the JSON record is written after
the model file it names, so a crash at any instant leaves either the old checkpoint or
the new one, never a mix. A round that was in progress at a crash is not in the
checkpoint at all: on restart it runs again from the last global model under a new
round id, and nothing from the interrupted attempt can be folded into it.

Integrity: the record carries its own SHA-256 and the model file's (with its shape and
dtype); loading checks both, that every weight is finite, and that the history agrees
with the counters (completed rounds = completed entries, round ids increasing and below
``next_round_id``, each completed round's contributors distinct). Anything wrong
refuses to start with one line naming the file and the problem and pointing at the
newest older checkpoint that verifies: each save also keeps a numbered copy of its
record, and the last ``KEEP_CHECKPOINTS`` (record, model) pairs are kept. A missing
``checkpoint.json`` next to model files is an error, not a fresh start
(`Checkpoint.set_aside` starts over on purpose: ``fedcore aggregator --fresh``).
Temporary files a crash left behind are removed when loading.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import FedcoreError

__all__ = ["KEEP_CHECKPOINTS", "Checkpoint", "CheckpointError", "atomic_write_bytes"]

log = logging.getLogger(__name__)

_RECORD = "checkpoint.json"
_FORMAT = 2
_LEGACY_FORMAT = 1  # before digests: loaded with the value and history checks only
KEEP_CHECKPOINTS = 2
"""Numbered checkpoints kept in the state directory (the newest is never pruned)."""
_ARCHIVE_GLOB = "checkpoint-*.json"
_MODEL_GLOB = "global-*.npy"


class CheckpointError(FedcoreError):
    """The state directory holds a checkpoint that cannot be read."""


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _Invalid(Exception):
    """What is wrong with one checkpoint record (a one-line reason)."""


@dataclass(slots=True, kw_only=True)
class Checkpoint:
    """What survives a restart. ``next_round_id`` only grows, so ids are never reused."""

    global_weights: np.ndarray
    rounds_completed: int = 0
    next_round_id: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    model_fingerprint: str = ""
    excluded_decryptors: list[str] = field(default_factory=list)
    """Key holders caught answering a decryption wrongly: never asked again."""

    def save(self, state_dir: Path, *, keep: int = KEEP_CHECKPOINTS) -> Path:
        """Write the model file, then the records that name it; prune beyond ``keep``."""
        weights = np.asarray(self.global_weights, dtype=np.float32)
        if not np.isfinite(weights).all():
            raise CheckpointError("refusing to save a global model with NaN or infinite weights")
        try:
            return self._save(state_dir, weights, keep)
        except OSError as exc:
            # atomic writes leave the previous checkpoint whole: nothing saved is lost
            raise CheckpointError(
                f"cannot write a checkpoint in {state_dir}: {exc.strerror or exc} "
                "(the previous checkpoint is intact; free space or fix permissions)"
            ) from None

    def _save(self, state_dir: Path, weights: np.ndarray, keep: int) -> Path:
        state_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.rounds_completed:06d}-{self.next_round_id:06d}"
        model_name = f"global-{stem}.npy"
        buffer = _npy_bytes(weights)
        atomic_write_bytes(state_dir / model_name, buffer)
        record: dict[str, Any] = {
            "format": _FORMAT,
            "model_file": model_name,
            "model_sha256": hashlib.sha256(buffer).hexdigest(),
            "model_shape": list(weights.shape),
            "model_dtype": str(weights.dtype),
            "rounds_completed": self.rounds_completed,
            "next_round_id": self.next_round_id,
            "history": self.history,
            "metrics": self.metrics,
            "model_fingerprint": self.model_fingerprint,
            "excluded_decryptors": self.excluded_decryptors,
        }
        record["record_sha256"] = _record_digest(record)
        data = json.dumps(record, indent=1).encode()
        atomic_write_bytes(state_dir / f"checkpoint-{stem}.json", data)
        atomic_write_bytes(state_dir / _RECORD, data)
        _prune(state_dir, keep, model_name)
        return state_dir / _RECORD

    @classmethod
    def load(cls, state_dir: Path) -> Checkpoint | None:
        """The last checkpoint in ``state_dir``, None when there is none, else CheckpointError.

        Removes temporary files a crash left. Refuses (one line: the file, what is wrong,
        the newest older checkpoint that verifies) a record or model file that does not
        match its digest, non-finite weights, or a history that contradicts the counters.
        """
        if not state_dir.is_dir():
            return None
        _remove_leftovers(state_dir)
        record_path = state_dir / _RECORD
        if not record_path.exists():
            others = sorted(state_dir.glob(_MODEL_GLOB)) + sorted(state_dir.glob(_ARCHIVE_GLOB))
            if others:
                raise CheckpointError(
                    f"{record_path} is missing but {len(others)} checkpoint file(s) are in "
                    f"{state_dir}{_previous_good(state_dir, record_path)}, or start over "
                    "with --fresh (which sets the old files aside)"
                )
            return None
        try:
            return _read(record_path)
        except _Invalid as exc:
            raise CheckpointError(
                f"cannot load checkpoint {record_path}: {exc}{_previous_good(state_dir, None)}"
                ", or start over with --fresh (which sets the old files aside)"
            ) from None

    @staticmethod
    def probe(state_dir: Path) -> None:
        """Preflight: create ``state_dir`` and write, fsync and remove a file (CheckpointError)."""
        probe = state_dir / ".write-probe.tmp"
        try:
            state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(probe, b"fedcore write probe\n")
            probe.unlink()
        except OSError as exc:
            raise CheckpointError(
                f"state_dir {state_dir} is not writable: {exc.strerror or exc} "
                "(make it writable or choose another state_dir)"
            ) from None

    @staticmethod
    def set_aside(state_dir: Path) -> Path | None:
        """Move every checkpoint file into ``state_dir/replaced-<UTC time>/`` (None: none)."""
        if not state_dir.is_dir():
            return None
        files = [
            path
            for pattern in (_RECORD, _ARCHIVE_GLOB, _MODEL_GLOB, ".*.tmp")
            for path in state_dir.glob(pattern)
        ]
        if not files:
            return None
        target = state_dir / time.strftime("replaced-%Y%m%dT%H%M%SZ", time.gmtime())
        target.mkdir(exist_ok=True)
        for path in files:
            path.replace(target / path.name)
        return target


def _record_digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read(record_path: Path) -> Checkpoint:
    """One record and its model file, every check applied (raises _Invalid)."""
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _Invalid(f"the record is not readable JSON ({exc})") from None
    if not isinstance(record, dict):
        raise _Invalid("the record is not a JSON object")
    fmt = record.get("format")
    if fmt not in (_FORMAT, _LEGACY_FORMAT):
        raise _Invalid(f"unknown format {fmt!r}")
    if fmt == _FORMAT and record.get("record_sha256") != _record_digest(record):
        raise _Invalid("the record does not match its SHA-256 (edited or corrupted)")
    try:
        model_path = record_path.parent / str(record["model_file"])
        if model_path.parent != record_path.parent:
            raise _Invalid(f"model file {record['model_file']!r} is outside the state directory")
        data = model_path.read_bytes()
        if fmt == _FORMAT and hashlib.sha256(data).hexdigest() != record["model_sha256"]:
            raise _Invalid(f"model file {model_path.name} does not match its SHA-256")
        weights = np.load(io.BytesIO(data), allow_pickle=False)
        if fmt == _FORMAT and (
            list(weights.shape) != record["model_shape"]
            or str(weights.dtype) != record["model_dtype"]
        ):
            raise _Invalid(
                f"model file {model_path.name} holds {weights.dtype}{list(weights.shape)}, "
                f"the record says {record['model_dtype']}{record['model_shape']}"
            )
        if weights.dtype != np.float32 or weights.ndim != 1:
            raise _Invalid(f"model file {model_path.name} is not a flat float32 vector")
        if not np.isfinite(weights).all():
            bad = int(np.count_nonzero(~np.isfinite(weights)))
            raise _Invalid(f"model file {model_path.name} holds {bad} NaN or infinite weights")
        checkpoint = Checkpoint(
            global_weights=weights,
            rounds_completed=int(record["rounds_completed"]),
            next_round_id=int(record["next_round_id"]),
            history=list(record.get("history", [])),
            metrics={str(k): float(v) for k, v in record.get("metrics", {}).items()},
            model_fingerprint=str(record.get("model_fingerprint", "")),
            excluded_decryptors=[str(x) for x in record.get("excluded_decryptors", [])],
        )
    except _Invalid:
        raise
    except FileNotFoundError as exc:
        raise _Invalid(f"model file {Path(str(exc.filename)).name} is missing") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Invalid(f"{type(exc).__name__}: {exc}") from None
    _check_history(checkpoint)
    return checkpoint


def _check_history(checkpoint: Checkpoint) -> None:
    """The counters must tell the same story as the history (raises _Invalid)."""
    completed = [entry for entry in checkpoint.history if "failure" not in entry]
    if checkpoint.rounds_completed != len(completed):
        raise _Invalid(
            f"rounds_completed is {checkpoint.rounds_completed} but the history holds "
            f"{len(completed)} completed rounds"
        )
    previous = 0
    for entry in checkpoint.history:
        round_id = entry.get("round_id") if isinstance(entry, dict) else None
        if not isinstance(round_id, int) or round_id <= previous:
            raise _Invalid(f"history round ids are not increasing at {round_id!r}")
        previous = round_id
        contributors = entry.get("contributors", [])
        if "failure" not in entry and len(set(contributors)) != len(contributors):
            raise _Invalid(f"round {round_id} names a contributor twice")
    if checkpoint.next_round_id <= previous:
        raise _Invalid(
            f"next_round_id is {checkpoint.next_round_id}, not above the last round id "
            f"{previous} (ids would be reused)"
        )


def _archives(state_dir: Path) -> list[Path]:
    """Numbered records, newest first."""
    return sorted(state_dir.glob(_ARCHIVE_GLOB), reverse=True)


def _previous_good(state_dir: Path, exclude: Path | None) -> str:
    """'; the newest checkpoint that verifies is X: copy it to checkpoint.json' or ''."""
    for path in _archives(state_dir):
        if path == exclude:
            continue
        try:
            good = _read(path)
        except _Invalid:
            continue
        return (
            f"; the newest checkpoint that verifies is {path} ({good.rounds_completed} "
            f"rounds): copy it to {state_dir / _RECORD} to resume from it"
        )
    return "; no other checkpoint in the directory verifies"


def _prune(state_dir: Path, keep: int, newest_model: str) -> None:
    """Keep the ``keep`` newest numbered records and the model files they name."""
    archives = _archives(state_dir)
    kept, wanted = archives[: max(1, keep)], {newest_model}
    for path in kept:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            wanted.add(str(json.loads(path.read_text())["model_file"]))
    for path in archives[max(1, keep) :]:
        path.unlink(missing_ok=True)
    for model in state_dir.glob(_MODEL_GLOB):
        if model.name not in wanted:
            model.unlink(missing_ok=True)


def _remove_leftovers(state_dir: Path) -> None:
    leftovers = list(state_dir.glob(".*.tmp"))
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d temporary file(s) a crash left in %s", len(leftovers), state_dir)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return out.getvalue()
