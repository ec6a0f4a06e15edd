"""What every run of the scale benchmark shares: keys, certificates, model, the update.

Makes the Paillier keypair and the mutual-TLS PKI once, builds the seed model (its
weights and layout), draws the update every simulated client uploads, encrypts it once
per packing for the load generator (`bench.masked_upload`), and writes the daemon
settings of one run. Set-up seconds are kept in ``ScaleSetup.timings``. This module
knows nothing of how the daemon or the load generator run.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bench.masked_upload import EncryptedUpdate
from fedcore.aggregator import build_model
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.crypto import generate_keypair
from fedcore.crypto.masking import public_key_bytes
from fedcore.model import ModelLayout, flatten_state_dict
from protocol.tls import write_federation_pki

__all__ = [
    "CHUNK_CIPHERTEXTS",
    "MAX_WEIGHT",
    "SAMPLES_PER_CLIENT",
    "VALUE_BITS",
    "ScaleSetup",
    "daemon_settings",
    "make_setup",
    "prepare_upload",
    "update_codec",
]

SAMPLES_PER_CLIENT = 100  # every client weighs itself ceil(100 / samples_per_weight) = 1
MAX_WEIGHT = 64  # fedcore's default max_weight; the headroom must hold N clients of it
VALUE_BITS = 16
CLIP = 0.5
CHUNK_CIPHERTEXTS = 256
UPDATE_STD = 0.01  # the uploaded update: N(0, 0.01) values, well inside the clip


@dataclass(slots=True, kw_only=True)
class ScaleSetup:
    """Keys, certificates, the model and the pre-encrypted update shared by every run."""

    workdir: Path
    key_bits: int
    model_kwargs: dict[str, Any]
    params: int
    layout: str
    headroom_bits: int
    update: np.ndarray
    seed_weights: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    # (packing, report slots, weight) -> pickled Enc(q) payloads
    uploads: dict[tuple[Any, ...], Path] = field(default_factory=dict)

    @property
    def pki(self) -> Path:
        """The federation PKI directory (CA, aggregator, relay-<i>, client-<i> certificates)."""
        return self.workdir / "pki"

    @property
    def keys(self) -> Path:
        """Where the Paillier keypair is."""
        return self.workdir / "keys"


def make_setup(
    workdir: Path,
    *,
    key_bits: int,
    model_kwargs: dict[str, Any],
    certs: int,
    headroom: int,
    relays: int = 0,
) -> ScaleSetup:
    """A fresh keypair, ``certs`` client (and ``relays`` relay) certificates, the seed model."""
    kwargs = model_kwargs
    state = build_model("fedcore.model:mlp", kwargs, seed=0).state_dict()
    seed_weights = flatten_state_dict(state)
    setup = ScaleSetup(
        workdir=workdir,
        key_bits=key_bits,
        model_kwargs=kwargs,
        params=int(seed_weights.size),
        layout=ModelLayout.of(state).to_json(),
        headroom_bits=headroom,
        update=np.random.default_rng(7).normal(0, UPDATE_STD, seed_weights.size).astype(np.float32),
        seed_weights=seed_weights,
    )
    t0 = time.perf_counter()
    public_key, private_key = generate_keypair(key_bits)
    setup.keys.mkdir(parents=True, exist_ok=True)
    public_key.save(setup.keys / "public_key.json")
    private_key.save(setup.keys / "private_key.json")
    setup.timings["keygen_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_federation_pki(setup.pki, clients=certs, relays=relays, sans=["localhost", "127.0.0.1"])
    setup.timings["pki_s"] = time.perf_counter() - t0
    setup.timings["pki_certs"] = certs + relays
    return setup


def update_codec(setup: ScaleSetup, federation: FederationParams) -> EncryptedCodec:
    """The codec the aggregator announces for this model under ``federation``."""
    session = SessionInfo(
        num_values=setup.params,
        chunk_items=CHUNK_CIPHERTEXTS,
        model_layout=setup.layout,
        rounds=1,
    )
    codec = codec_for(federation, session)
    if not isinstance(codec, EncryptedCodec):
        raise TypeError("the scale benchmark needs an encrypted federation")
    return codec


def prepare_upload(setup: ScaleSetup, federation: FederationParams) -> Path:
    """Encrypt the update once for this packing; every run masks these ciphertexts.

    The weight is the clients' own (`FederationParams.weight_for`); the federation's
    quorum changes from run to run, its packing does not, so one encryption serves all.
    """
    codec = update_codec(setup, federation)
    weight = federation.weight_for(SAMPLES_PER_CLIENT)
    key = (codec.spec, codec.report_bounds, weight)
    if key in setup.uploads:
        return setup.uploads[key]
    t0 = time.perf_counter()
    rng = np.random.default_rng(1)
    plaintexts = codec.encode(setup.update, weight=weight, report=None, rng=rng)
    ciphertexts = codec.public_key.encrypt_vector(plaintexts)
    payloads = list(codec.chunk_payloads(ciphertexts))
    setup.timings["encrypt_once_s"] = time.perf_counter() - t0
    setup.timings["per_client_mask_s"] = _per_client_mask_seconds(codec, federation, ciphertexts)
    path = setup.workdir / f"upload-{len(setup.uploads)}.pickle"
    record = {"payloads": payloads, "item_count": len(ciphertexts), "weight": weight}
    path.write_bytes(pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
    setup.uploads[key] = path
    return path


def _per_client_mask_seconds(
    codec: EncryptedCodec, federation: FederationParams, ciphertexts: list[Any]
) -> float:
    """What one connection's own masks cost the load generator (``--per-client-masks``).

    Timed once, for one unmasker: key agreement, the mask stream, the masked
    ciphertexts, serialization and the upload digest (`EncryptedUpdate.masked`).
    """
    upload = EncryptedUpdate.from_ciphertexts(ciphertexts, codec)
    unmasker = public_key_bytes(X25519PrivateKey.generate())
    t0 = time.perf_counter()
    upload.masked(codec, federation.digest(), bytes(32), (unmasker,))
    return time.perf_counter() - t0


def daemon_settings(setup: ScaleSetup, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The daemon's settings for one run (written as TOML, read back for its federation)."""
    return {
        "public_key": setup.keys / "public_key.json",
        "cert": setup.pki / "aggregator.pem",
        "key": setup.pki / "aggregator.key",
        "ca": setup.pki / "ca.pem",
        "state_dir": setup.workdir / f"state-{name}",
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "model": "fedcore.model:mlp",
        "model_kwargs": setup.model_kwargs,
        "rounds": 1,
        "value_bits": VALUE_BITS,
        "clip": CLIP,
        "max_weight": MAX_WEIGHT,
        "min_key_bits": min(2048, setup.key_bits),
        "chunk_ciphertexts": CHUNK_CIPHERTEXTS,
        "handshake_timeout": 120.0,
        "wait_for_clients_timeout": 600.0,
        "round_timeout": 900.0,
        "decrypt_shard_timeout": 900.0,
        "seed": 0,
        **settings,
    }
