"""The update pipeline: load the global model, evaluate, train, encode, encrypt, chunk.

Runs in a worker thread, one round at a time (a lock keeps a cancelled round's thread
from training the model while the next one starts). Knows nothing of sockets: the
session driver hands it a RoundStart and sends what it returns.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcore.client.config import ClientConfig, EvaluateFn, TrainFn
from fedcore.codec import EncryptedCodec, UpdateCodec
from fedcore.errors import ConfigError
from fedcore.model import ModelLayout, flatten_state_dict, load_flat_into
from protocol.messages import RoundStart

__all__ = ["PreparedUpdate", "UpdatePipeline"]


@dataclass(slots=True)
class PreparedUpdate:
    """One encoded, encrypted update, ready to stream (and to resume)."""

    round_id: int
    payloads: list[bytes]
    item_count: int
    digest: bytes
    sample_count: int
    timings: dict[str, float]
    metrics: dict[str, float]


class UpdatePipeline:
    """Turns a RoundStart into a `PreparedUpdate` with the embedding app's callbacks."""

    def __init__(
        self,
        model: torch.nn.Module,
        train_fn: TrainFn,
        evaluate_fn: EvaluateFn | None,
        config: ClientConfig,
    ) -> None:
        self.model = model
        self.train_fn = train_fn
        self.evaluate_fn = evaluate_fn
        self.config = config
        self.layout = ModelLayout.of(model.state_dict())
        # A cancelled round's thread runs on until it finishes; the next round must not
        # train the same model at the same time.
        self._model_lock = threading.Lock()

    def prepare(self, codec: UpdateCodec, start: RoundStart) -> PreparedUpdate:
        """Evaluate the global model, train, and encode the update (call in a thread)."""
        with self._model_lock:
            return self._prepare_locked(codec, start)

    def _prepare_locked(self, codec: UpdateCodec, start: RoundStart) -> PreparedUpdate:
        global_weights = np.frombuffer(start.weights, dtype=np.float32)
        if global_weights.shape[0] != self.layout.numel:
            raise ConfigError(
                f"RoundStart carries {global_weights.shape[0]} weights; model has "
                f"{self.layout.numel}"
            )
        load_flat_into(self.model, global_weights)
        metrics: dict[str, float] = {}
        timings: dict[str, float] = {}
        if self.evaluate_fn is not None:
            t0 = time.perf_counter()
            metrics = {k: float(v) for k, v in self.evaluate_fn(self.model).items()}
            timings["evaluate_s"] = time.perf_counter() - t0
        round_config = dict(start.config)
        t0 = time.perf_counter()
        samples = int(self.train_fn(self.model, round_config))
        timings["train_s"] = time.perf_counter() - t0
        metrics["iterations"] = float(round_config.get("epochs", 1))
        update = flatten_state_dict(self.model.state_dict()) - global_weights
        weight = int(round_config.get("weight", 1))
        rng = np.random.default_rng([self.config.seed, start.round_id])
        t0 = time.perf_counter()
        encoded = codec.encode(update, weight=weight, rng=rng)
        t1 = time.perf_counter()
        if isinstance(codec, EncryptedCodec):
            items: Any = codec.public_key.encrypt_vector(list(encoded))
        else:
            items = encoded
        t2 = time.perf_counter()
        payloads = list(codec.chunk_payloads(items))
        timings["encode_s"] = t1 - t0
        timings["encrypt_s"] = t2 - t1
        timings["serialize_s"] = time.perf_counter() - t2
        digest = hashlib.sha256()
        for payload in payloads:
            digest.update(payload)
        return PreparedUpdate(
            round_id=start.round_id,
            payloads=payloads,
            item_count=len(items),
            digest=digest.digest(),
            sample_count=max(1, samples),
            timings=timings,
            metrics=metrics,
        )
