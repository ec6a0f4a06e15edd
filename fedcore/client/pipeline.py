"""The update pipeline: run the app's model on one global model, encode, mask, encrypt, chunk.

`UpdatePipeline.train` hands the global weights to the app's `ArrayModel` as numpy
arrays, checks what comes back (shapes, finiteness, sample count) and makes the update:
flat float32 arrays, whatever framework trained them. It runs in a worker thread, one
round at a time: a lock keeps a cancelled round's thread from training the model while
the next one starts. `seal` turns the trained update into what goes on the wire: the
client's own FedAvg weight and evaluation report are packed with it, the one-time masks
of the round's unmaskers are added inside the plaintexts, and the result is encrypted
with pooled random factors. Knows nothing of sockets, nor of torch: a torch model is
wrapped in `fedcore.client.torch_adapter.TorchModel`, imported only then.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.arrays import ArrayModel, checked_training, evaluation_metrics
from fedcore.client.config import EvaluateFn, TrainFn
from fedcore.codec import EncryptedCodec, UpdateCodec
from fedcore.contracts import FederationParams
from fedcore.crypto import EncryptionPool
from fedcore.crypto.masking import SecureUniform, add_masks, client_masks, public_key_bytes
from fedcore.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["PreparedUpdate", "TrainedUpdate", "UpdatePipeline", "model_digest", "seal"]

log = logging.getLogger(__name__)


def model_digest(weights: bytes) -> bytes:
    """SHA-256 of a RoundStart's global weights: the model version an update is for."""
    return hashlib.sha256(weights).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainedUpdate:
    """One local training run on one global model version, before any encoding."""

    model_digest: bytes
    update: np.ndarray
    samples: int
    report: tuple[float, ...] | None
    timings: dict[str, float]
    iterations: int


@dataclass(slots=True, kw_only=True)
class PreparedUpdate:
    """One encoded, masked, encrypted update, ready to stream (and to resume or resend).

    It belongs to one model version and one set of unmaskers: the client sends these
    same bytes for that model version whatever the round id, never a second update.
    """

    model_digest: bytes
    unmaskers: tuple[bytes, ...]
    client_public: bytes
    payloads: list[bytes]
    item_count: int
    digest: bytes
    weight: int
    iterations: int
    timings: dict[str, float] = field(default_factory=dict)


class UpdatePipeline:
    """Runs the embedding app's model (train, evaluate) on a global model version.

    ``model`` is an `ArrayModel`, or a ``torch.nn.Module`` with the app's ``train_fn``
    and optional ``evaluate_fn`` (wrapped in a `TorchModel`).
    """

    def __init__(
        self,
        model: ArrayModel | torch.nn.Module,
        train_fn: TrainFn | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> None:
        if isinstance(model, ArrayModel):
            if train_fn is not None or evaluate_fn is not None:
                raise ConfigError(
                    f"{type(model).__name__} is an ArrayModel: it trains and evaluates itself; "
                    "pass train_fn=None and evaluate_fn=None"
                )
            self.model: ArrayModel = model
        else:
            from fedcore.client.torch_adapter import TorchModel

            self.model = TorchModel(model, train_fn, evaluate_fn)
        self.layout = self.model.layout
        # A cancelled round's thread runs on until it finishes; the next round must not
        # train the same model at the same time.
        self._model_lock = threading.Lock()

    def train(
        self, weights: bytes, round_config: dict[str, Any], report_names: tuple[str, ...]
    ) -> TrainedUpdate:
        """Evaluate the global model, train it locally, return the update (call in a thread)."""
        with self._model_lock:
            return self._train_locked(weights, round_config, report_names)

    def _train_locked(
        self, weights: bytes, round_config: dict[str, Any], report_names: tuple[str, ...]
    ) -> TrainedUpdate:
        global_weights = np.frombuffer(weights, dtype=np.float32)
        if global_weights.shape[0] != self.layout.numel:
            raise ConfigError(
                f"RoundStart carries {global_weights.shape[0]} weights; model has "
                f"{self.layout.numel}"
            )
        model = type(self.model).__name__
        timings: dict[str, float] = {}
        report: tuple[float, ...] | None = None
        t0 = time.perf_counter()
        metrics = evaluation_metrics(
            self.model.evaluate(self._fresh_arrays(global_weights)), source=f"{model}.evaluate"
        )
        if metrics is not None:
            timings["evaluate_s"] = time.perf_counter() - t0
            missing = [name for name in report_names if name not in metrics]
            if missing:
                log.debug("evaluate gave no %s: this round reports no metrics", missing)
            else:
                report = tuple(metrics[name] for name in report_names)
        t0 = time.perf_counter()
        result = self.model.train(self._fresh_arrays(global_weights), dict(round_config))
        timings["train_s"] = time.perf_counter() - t0
        trained, samples = checked_training(self.layout, result, source=f"{model}.train")
        return TrainedUpdate(
            model_digest=model_digest(weights),
            update=trained - global_weights,
            samples=samples,
            report=report,
            timings=timings,
            iterations=int(round_config.get("epochs", 1)),
        )

    def _fresh_arrays(self, global_weights: np.ndarray) -> list[np.ndarray]:
        """The global weights as writable arrays of their own (the app may change them)."""
        return self.layout.split(global_weights.copy())


def seal(
    trained: TrainedUpdate,
    codec: UpdateCodec,
    federation: FederationParams,
    unmaskers: tuple[bytes, ...],
    pool: EncryptionPool | None,
) -> PreparedUpdate:
    """Weight, encode, mask and encrypt a trained update into chunk payloads.

    The weight is the client's own (``federation.weight_for(samples)``). For an
    encrypted federation a fresh X25519 key ``x`` is drawn and, for every unmasker
    public key ``Y``, the masks of ``derive_mask_key(x, Y, ...)`` are added inside the
    plaintexts mod n (see `fedcore.crypto.masking`); the masked plaintexts are
    encrypted with ``pool``'s precomputed random factors when there is a pool.
    """
    timings = dict(trained.timings)
    weight = federation.weight_for(trained.samples)
    t0 = time.perf_counter()
    encoded: Any = codec.encode(
        trained.update, weight=weight, report=trained.report, rng=SecureUniform()
    )
    client_public = b""
    t1 = time.perf_counter()
    if isinstance(codec, EncryptedCodec):
        ephemeral = X25519PrivateKey.generate()
        client_public = public_key_bytes(ephemeral)
        n = codec.public_key.n
        t_mask = time.perf_counter()
        masks = client_masks(
            ephemeral,
            unmaskers,
            federation=federation.digest(),
            model_digest=trained.model_digest,
            modulus=n,
            count=len(encoded),
        )
        masked = add_masks(encoded, masks, n)
        timings["mask_s"] = time.perf_counter() - t_mask
        timings["encode_s"] = t_mask - t0
        t1 = time.perf_counter()
        items: Any = (
            pool.encrypt_vector(masked)
            if pool is not None
            else codec.public_key.encrypt_vector(masked)
        )
        # the share of random factors made ahead of time (1.0: encryption was one
        # multiplication per ciphertext; below, the rest were computed on the spot)
        pooled, computed = pool.last_take if pool is not None else (0, len(masked))
        timings["pooled_factors"] = pooled / max(1, pooled + computed)
    else:
        timings["encode_s"] = t1 - t0
        items = encoded
    t2 = time.perf_counter()
    payloads = list(codec.chunk_payloads(items))
    timings["encrypt_s"] = t2 - t1
    timings["serialize_s"] = time.perf_counter() - t2
    digest = hashlib.sha256()
    for payload in payloads:
        digest.update(payload)
    return PreparedUpdate(
        model_digest=trained.model_digest,
        unmaskers=unmaskers,
        client_public=client_public,
        payloads=payloads,
        item_count=len(items),
        digest=digest.digest(),
        weight=weight,
        iterations=trained.iterations,
        timings=timings,
    )
