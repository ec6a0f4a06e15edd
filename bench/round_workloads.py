"""The round benchmark's workloads, and what one workload's two federations measured.

A `RoundWorkload` is a model factory and a number of local epochs: ``default`` is the
seed MLP trained for one epoch (the round benchmark's original workload, where packing
and encryption dominate an encrypted round), ``training-heavy`` a small CNN
(`fedcore.model.cnn`) whose local training dominates a plaintext round. `summarize`
turns one `FederationResult` into mean phases, CPU and bytes; `compare` puts a
workload's encrypted and plaintext summaries side by side under the keys round.json
uses for every workload. This module runs nothing and knows nothing of report formats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.federation import FederationResult, RoundRecord
from fedcore.aggregator import build_model
from fedcore.data import Dataset

__all__ = [
    "DEFAULT",
    "PHASES",
    "TRAINING_HEAVY",
    "RoundWorkload",
    "compare",
    "summarize",
]

# Phases of a round as this benchmark reports them, in data-path order.
PHASES = (
    "local_training",
    "encode_encrypt",
    "upload_and_wait",
    "fold",
    "decrypt",
    "model_update",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundWorkload:
    """One model the round benchmark federates: its factory and the clients' local epochs.

    ``model`` is a factory as `AggregatorConfig.model` names one; it is built with the
    dataset's ``in_features`` and ``classes``. ``fashion_note`` describes it on
    Fashion-MNIST, ``digits_note`` says what differs on the digits fallback.
    """

    name: str
    model: str
    local_epochs: int
    fashion_note: str
    digits_note: str

    def __post_init__(self) -> None:
        if isinstance(self.local_epochs, bool) or not isinstance(self.local_epochs, int):
            raise ValueError(f"local_epochs must be an integer >= 1; got {self.local_epochs!r}")
        if self.local_epochs < 1:
            raise ValueError(f"local_epochs must be an integer >= 1; got {self.local_epochs}")

    def model_kwargs(self, data: Dataset) -> dict[str, Any]:
        """The factory's keyword arguments for ``data`` (aggregator and clients alike)."""
        return {"in_features": data.num_features, "classes": data.num_classes}

    def parameters(self, data: Dataset) -> int:
        """How many values one update of this model carries."""
        model = build_model(self.model, self.model_kwargs(data))
        return sum(p.numel() for p in model.parameters())

    def describe(self, dataset_name: str) -> str:
        """What model this is on ``dataset_name``, saying so when it is not Fashion-MNIST."""
        return self.fashion_note if dataset_name == "fashion-mnist" else self.digits_note


DEFAULT = RoundWorkload(
    name="default",
    model="fedcore.model:mlp",
    local_epochs=1,
    fashion_note="seed MLP (784-512-256-10)",
    digits_note="Fashion-MNIST not used: digits with the 64-feature MLP, NOT the seed MLP size",
)
# Five local epochs over each client's whole shard (the example of a training-
# heavy round) of a model that costs ~5x the seed MLP's training per epoch: local
# training is then most of a plaintext round, as in federations that train for minutes
# between rounds. --heavy-epochs changes it (2 epochs measured 1.46x, see REPORT.md).
TRAINING_HEAVY = RoundWorkload(
    name="training-heavy",
    model="fedcore.model:cnn",
    local_epochs=5,
    fashion_note="small CNN (conv3x3 16, pool, conv3x3 32, pool, 128, 10) on 28x28 images",
    digits_note="Fashion-MNIST not used: digits (8x8 images) with the small CNN, NOT the "
    "28x28 size",
)


def _phases(record: RoundRecord) -> dict[str, float]:
    """Split one round's wall time into the data-path phases.

    The aggregator's ``collect`` phase spans local training, encryption, upload and
    folding (clients train after RoundStart); clients report their own training and
    encryption times (means over clients), the aggregator times each fold. What is left
    of ``collect`` is upload, straggler wait and the RoundStart transfer.
    """
    p = record.phase_seconds
    train = record.client_timings.get("train_s", 0.0)
    encrypt = sum(  # quantize and pack, mask, encrypt, serialize
        record.client_timings.get(k, 0.0)
        for k in ("encode_s", "mask_s", "encrypt_s", "serialize_s")
    )
    return {
        "local_training": train,
        "encode_encrypt": encrypt,
        "upload_and_wait": max(0.0, p.get("collect", 0.0) - train - encrypt - record.fold_s),
        "fold": record.fold_s,
        "decrypt": p.get("decrypt", 0.0),
        "model_update": p.get("select", 0.0) + p.get("update", 0.0) + p.get("checkpoint", 0.0),
    }


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _privacy_checks(result: FederationResult) -> dict[str, Any]:
    """Mean per-round cost of the protocol-3 checks, from fedcore's own round reports.

    ``*_s_per_round`` are the report's ``check_seconds`` (members' seconds summed over
    shards) averaged over rounds; a token is one contributor's (each is checked once);
    ``client_mask_s_per_update`` is the contributors' ``mask_s``, weighted by
    contributors over rounds. Zeros and None in a plaintext run.
    """
    rounds = result.rounds
    out: dict[str, Any] = {
        name: _mean([r.check_seconds.get(key, 0.0) for r in rounds])
        for name, key in (
            ("unmask_s_per_round", "member_unmask"),
            ("member_decrypt_s_per_round", "member_decrypt"),
            ("aggregator_token_check_s_per_round", "token_check"),
        )
    }
    tokens = sum(r.contributors for r in rounds)
    token_s = sum(r.check_seconds.get("token_check", 0.0) for r in rounds)
    out["aggregator_token_check_s_per_token"] = token_s / tokens if tokens and token_s else None
    decrypt = out["member_decrypt_s_per_round"]
    out["unmask_vs_member_decrypt"] = out["unmask_s_per_round"] / decrypt if decrypt > 0 else None
    out["decrypt_phase_s_per_round"] = _mean([r.phase_seconds.get("decrypt", 0.0) for r in rounds])
    masked = [r for r in rounds if "mask_s" in r.client_timings]
    updates = sum(r.contributors for r in masked)
    mask_s = sum(r.client_timings["mask_s"] * r.contributors for r in masked)
    out["client_mask_s_per_update"] = mask_s / updates if updates else None
    out["updates_masked"] = updates
    for key in ("shards_unmasked", "shards_decrypted", "requests_refused"):
        out[key] = sum(c.get(key, 0) for c in result.client_results)
    return out


def summarize(result: FederationResult, clients: int) -> dict[str, Any]:
    """Mean round time, per-phase means, CPU and bytes of one federation run."""
    rounds = result.rounds
    phases = [_phases(r) for r in rounds]
    per_phase = {name: _mean([p[name] for p in phases]) for name in PHASES}
    bytes_per_client = _mean([r.bytes_received / max(1, r.contributors) for r in rounds])
    return {
        "round_s": _mean([r.round_s for r in rounds]),
        "round_s_each": [r.round_s for r in rounds],
        "phase_s": per_phase,
        "aggregator_phase_s": {
            k: _mean([r.phase_seconds.get(k, 0.0) for r in rounds])
            for k in ("select", "collect", "decrypt", "update", "checkpoint")
        },
        "dominant_phase": max(per_phase, key=lambda k: per_phase[k]),
        "bytes_per_client_per_round": bytes_per_client,
        "client_payload_bytes_per_round": _mean(
            [
                c.get("bytes_uploaded", 0) / max(1, c.get("rounds_contributed", 1))
                for c in result.client_results
            ]
        ),
        "privacy_checks": _privacy_checks(result),
        # the clients' own means per round: each step of encode_encrypt, and the share
        # of random factors their EncryptionPool had ready (1.0: all made ahead of time)
        "client_timings": {
            name: _mean([r.client_timings[name] for r in rounds if name in r.client_timings])
            for name in ("encode_s", "mask_s", "encrypt_s", "serialize_s", "pooled_factors")
        },
        "cpu_s_per_round": result.cpu_s / max(1, len(rounds)),
        "cpu_s_aggregator_per_round": result.cpu_s_aggregator_process / max(1, len(rounds)),
        "cpu_s_clients_per_round": (result.cpu_s_clients or 0.0) / max(1, len(rounds)),
        "federation_wall_s": result.wall_s,
        "rounds": [r.to_json() for r in rounds],
        "clients": clients,
        "federation": result.federation,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def compare(
    workload: dict[str, Any],
    encrypted: FederationResult,
    plaintext: FederationResult,
    clients: int,
) -> dict[str, Any]:
    """One workload's figures: encrypted vs plaintext round, CPU, phases, bytes, ciphertexts.

    ``workload`` (the description) gains the federation the encrypted run pinned, and
    its ``value_bits``; ``ciphertexts_per_update`` is that federation's
    ``items_per_update``; ``bytes_per_value`` is the bytes each client sent the
    aggregator per round over the update's values (framing included).
    """
    enc, plain = summarize(encrypted, clients), summarize(plaintext, clients)
    workload["value_bits"] = enc["federation"].get("value_bits")
    workload["federation"] = enc["federation"]
    parameters = workload.get("parameters") or 0
    sent = {
        "encrypted": enc["bytes_per_client_per_round"],
        "plaintext": plain["bytes_per_client_per_round"],
    }
    return {
        "workload": workload,
        "encrypted_round_s": enc["round_s"],
        "plaintext_round_s": plain["round_s"],
        "overhead_ratio": _ratio(enc["round_s"], plain["round_s"]),
        "dominant_phase_encrypted": enc["dominant_phase"],
        "dominant_phase_plaintext": plain["dominant_phase"],
        "encrypted_phase_s": enc["phase_s"],
        "plaintext_phase_s": plain["phase_s"],
        "encryption_extra_s_by_phase": {k: enc["phase_s"][k] - plain["phase_s"][k] for k in PHASES},
        "privacy_checks": enc["privacy_checks"],
        "encrypted_client_timings": enc["client_timings"],
        "encrypted_cpu_s_per_round": enc["cpu_s_per_round"],
        "plaintext_cpu_s_per_round": plain["cpu_s_per_round"],
        "cpu_overhead_ratio": _ratio(enc["cpu_s_per_round"], plain["cpu_s_per_round"]),
        "ciphertexts_per_update": enc["federation"].get("items_per_update"),
        "bytes_per_client_per_round": sent,
        "bytes_ratio": _ratio(sent["encrypted"], sent["plaintext"]),
        "bytes_per_value": {
            mode: value / parameters if parameters else float("nan") for mode, value in sent.items()
        },
        "encrypted": enc,
        "plaintext": plain,
    }
