"""Regenerate tests/vectors/packing_slots.json: slot layout known-answer vectors.

The expected plaintexts come from the definition ``Σ_j v[i·k + j] · 2^(j·s)`` with
plain Python ints, independently of fedcore.packing's numpy code.
Usage: ``python3 tests/vectors/make_packing_vectors.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("packing_slots.json")
CASES: list[dict[str, Any]] = [
    {"key_bits": 512, "value_bits": 16, "headroom_bits": 10, "clip": 1.0, "n_values": 45},
    {"key_bits": 2048, "value_bits": 16, "headroom_bits": 10, "clip": 1.0, "n_values": 80},
    {"key_bits": 1024, "value_bits": 32, "headroom_bits": 32, "clip": 0.5, "n_values": 17},
    {"key_bits": 512, "value_bits": 2, "headroom_bits": 0, "clip": 2.0, "n_values": 300},
]


def main() -> None:
    """Write one vector per case with random slot values and their packed plaintexts."""
    rand = random.Random(20260101)
    vectors = []
    for case in CASES:
        slot_bits = case["value_bits"] + case["headroom_bits"]
        k = (case["key_bits"] - 1) // slot_bits
        values = [rand.randrange(1 << slot_bits) for _ in range(case["n_values"])]
        values[0] = (1 << slot_bits) - 1  # an all-ones slot pins the slot boundaries
        plaintexts = []
        for start in range(0, len(values), k):
            chunk = values[start : start + k]
            plaintexts.append(str(sum(v << (j * slot_bits) for j, v in enumerate(chunk))))
        spec = {key: case[key] for key in ("key_bits", "value_bits", "headroom_bits", "clip")}
        vectors.append({"spec": spec, "values": values, "plaintexts": plaintexts})
    OUT.write_text(json.dumps({"description": "slot 0 in the low bits", "vectors": vectors}) + "\n")


if __name__ == "__main__":
    main()
