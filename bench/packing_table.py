"""What packing costs on the wire at 10 and 1,000 clients per round, from fedcore's own objects.

`packing_table` builds, for each value width and clients-per-round, the
`AggregatorConfig` an operator would write (headroom left to its default: the fewest
bits holding ``clients_per_round x max_weight``), the `FederationParams` it pins and
the `EncryptedCodec` both sides use, and reads the headroom, slot width, values per
ciphertext and ciphertexts per update off them: nothing here redoes the packing
arithmetic. It needs only a public key of the right size, never a federation run.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcore.aggregator import AggregatorConfig
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import SessionInfo
from fedcore.crypto import PublicKey, generate_keypair

__all__ = ["SEED_MLP_PARAMETERS", "packing_lines", "packing_table"]

SEED_MLP_PARAMETERS = 535_818
"""Parameters of the seed MLP (784-512-256-10), the model the table sizes by default."""

_UNUSED = Path("unused")  # AggregatorConfig needs file paths; the table never opens them


def packing_table(
    key_bits: int = 2048,
    parameters: int = SEED_MLP_PARAMETERS,
    *,
    value_bits: Sequence[int] = (16, 8),
    clients_per_round: Sequence[int] = (10, 1000),
    public_key: PublicKey | None = None,
) -> dict[str, Any]:
    """One row per (value bits, clients per round) for a ``parameters``-value update.

    ``public_key`` (default: a fresh ``key_bits`` key) only sets the packing's key size.
    ``bytes_per_value`` is ciphertext bytes x ciphertexts per update / ``parameters``.
    """
    key = public_key if public_key is not None else generate_keypair(key_bits)[0]
    if key.bits != key_bits:
        raise ValueError(f"public_key has {key.bits} bits; the table is for {key_bits}")
    if parameters < 1:
        raise ValueError(f"parameters must be >= 1; got {parameters}")
    rows: list[dict[str, Any]] = []
    for bits in value_bits:
        for clients in clients_per_round:
            config = AggregatorConfig(
                public_key=_UNUSED,
                cert=_UNUSED,
                key=_UNUSED,
                ca=_UNUSED,
                state_dir=_UNUSED,
                metrics_port=None,
                min_clients=min(3, clients),
                clients_per_round=clients,
                value_bits=bits,
            )
            federation = config.federation(key)
            session = SessionInfo(
                num_values=parameters,
                chunk_items=config.chunk_ciphertexts,
                model_layout="{}",
                rounds=1,
            )
            codec = codec_for(federation, session)
            assert isinstance(codec, EncryptedCodec)
            rows.append(
                {
                    "value_bits": bits,
                    "clients_per_round": clients,
                    "max_weight": federation.max_weight,
                    "headroom_bits": codec.spec.headroom_bits,
                    "slot_bits": codec.spec.slot_bits,
                    "values_per_ciphertext": codec.spec.slots_per_ciphertext,
                    "ciphertexts_per_update": codec.item_count,
                    "ciphertext_bytes": key.ciphertext_bytes,
                    "bytes_per_value": key.ciphertext_bytes * codec.item_count / parameters,
                }
            )
    return {
        "key_bits": key_bits,
        "parameters": parameters,
        "note": "headroom_bits as AggregatorConfig defaults it (the fewest bits holding "
        "clients_per_round x max_weight); each update also carries its weight, its "
        "evaluated weight and one slot per report metric; float32 is 4 bytes per value",
        "rows": rows,
    }


def packing_lines(table: dict[str, Any]) -> list[str]:
    """The table as aligned text lines, for the terminal."""
    header = (
        f"{'value bits':>10} {'clients':>8} {'headroom':>8} {'slot bits':>9} "
        f"{'values/ct':>9} {'ct/update':>10} {'bytes/value':>11}"
    )
    lines = [
        f"packing, {table['key_bits']}-bit key, {table['parameters']:,} parameters:",
        header,
    ]
    for row in table["rows"]:
        lines.append(
            f"{row['value_bits']:>10} {row['clients_per_round']:>8} {row['headroom_bits']:>8} "
            f"{row['slot_bits']:>9} {row['values_per_ciphertext']:>9} "
            f"{row['ciphertexts_per_update']:>10} {row['bytes_per_value']:>11.2f}"
        )
    return lines
