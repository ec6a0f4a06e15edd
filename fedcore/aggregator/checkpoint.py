"""Crash-safe aggregator state on disk: global model, round counters, history, metrics.

Every write is atomic (temp file, fsync, rename), and the JSON record is written after
the model file it names, so a crash at any instant leaves either the old checkpoint or
the new one, never a mix. A round that was in progress at a crash is not in the
checkpoint at all: on restart it runs again from the last global model under a new
round id, and nothing from the interrupted attempt can be folded into it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcore.errors import FedcoreError

__all__ = ["Checkpoint", "CheckpointError", "atomic_write_bytes"]

log = logging.getLogger(__name__)

_RECORD = "checkpoint.json"
_FORMAT = 1


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

    def save(self, state_dir: Path) -> Path:
        """Write the model file, then the record that names it; prune older model files."""
        state_dir.mkdir(parents=True, exist_ok=True)
        model_name = f"global-{self.rounds_completed:06d}-{self.next_round_id:06d}.npy"
        buffer = _npy_bytes(self.global_weights)
        atomic_write_bytes(state_dir / model_name, buffer)
        record = {
            "format": _FORMAT,
            "model_file": model_name,
            "rounds_completed": self.rounds_completed,
            "next_round_id": self.next_round_id,
            "history": self.history,
            "metrics": self.metrics,
            "model_fingerprint": self.model_fingerprint,
            "excluded_decryptors": self.excluded_decryptors,
        }
        atomic_write_bytes(state_dir / _RECORD, json.dumps(record, indent=1).encode())
        for old in state_dir.glob("global-*.npy"):
            if old.name != model_name:
                old.unlink(missing_ok=True)
        return state_dir / _RECORD

    @classmethod
    def load(cls, state_dir: Path) -> Checkpoint | None:
        """The last checkpoint in ``state_dir``, or None when there is none yet."""
        record_path = state_dir / _RECORD
        if not record_path.exists():
            return None
        try:
            record = json.loads(record_path.read_text())
            if record.get("format") != _FORMAT:
                raise CheckpointError(f"{record_path}: unknown format {record.get('format')!r}")
            weights = np.load(state_dir / record["model_file"], allow_pickle=False)
            return cls(
                global_weights=np.asarray(weights, dtype=np.float32),
                rounds_completed=int(record["rounds_completed"]),
                next_round_id=int(record["next_round_id"]),
                history=list(record.get("history", [])),
                metrics={str(k): float(v) for k, v in record.get("metrics", {}).items()},
                model_fingerprint=str(record.get("model_fingerprint", "")),
                excluded_decryptors=[str(x) for x in record.get("excluded_decryptors", [])],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot load checkpoint from {state_dir}: {exc}") from exc


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return out.getvalue()
