"""Regenerate tests/vectors/paillier_512.json (run once; the committed file is the vector).

The 512-bit keypair in the output is a published test vector, not a secret: never use
it for anything but tests. Usage: ``python3 tests/vectors/make_paillier_vectors.py``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path

from phe import paillier

from fedcore.crypto import PrivateKey, serialize_ciphertexts

OUT = Path(__file__).with_name("paillier_512.json")


def main() -> None:
    """Make a fresh 512-bit key and the valid and invalid vectors for it."""
    phe_pk, phe_sk = paillier.generate_paillier_keypair(n_length=512)
    sk = PrivateKey.from_phe(phe_sk)
    pk = sk.public_key
    n, nsquare, p = int(pk.n), int(pk.nsquare), int(sk.p)
    plaintexts = [0, 1, 2, 42, 2**64 + 7, 2**500 + 12345, n - 1]
    valid = []
    for m in plaintexts:
        r = secrets.randbelow(n - 2) + 1
        valid.append(
            {
                "source": "phe",
                "plaintext": str(m),
                "r": str(r),
                "ciphertext": str(phe_pk.raw_encrypt(m, r_value=r)),
            }
        )
    for m, c in zip(plaintexts, pk.encrypt_vector(plaintexts), strict=True):
        valid.append({"source": "fedcore", "plaintext": str(m), "ciphertext": str(c)})
    good = [int(v["ciphertext"]) for v in valid[:3]]
    invalid = [
        {"name": "zero", "ciphertexts": [str(good[0]), "0"], "index": 1},
        {"name": "n_squared", "ciphertexts": [str(nsquare)], "index": 0},
        {
            "name": "n_squared_plus_one",
            "ciphertexts": [*map(str, good), str(nsquare + 1)],
            "index": 3,
        },
        {
            "name": "multiple_of_p",
            "ciphertexts": [str(good[0]), str(good[1]), str(p * 12345)],
            "index": 2,
        },
        {"name": "multiple_of_n", "ciphertexts": [str(n * 3), str(good[0])], "index": 0},
    ]
    serialized = serialize_ciphertexts([int(v["ciphertext"]) for v in valid[:2]], pk)
    document = {
        "description": "Paillier (g = n + 1) known-answer vectors; the key is a public test vector",
        "key": {"n": str(n), "p": str(sk.p), "q": str(sk.q)},
        "fingerprint": pk.fingerprint(),
        "sha256": hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest(),
        "public_key_bytes": pk.to_bytes().decode(),
        "valid": valid,
        "invalid": invalid,
        "serialized": {
            "hex": serialized.hex(),
            "ciphertexts": [v["ciphertext"] for v in valid[:2]],
            "truncated_hex": serialized[:-1].hex(),
            "truncated_index": 1,
        },
    }
    OUT.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
