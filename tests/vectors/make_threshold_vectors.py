"""Regenerate tests/vectors/threshold_512.json (run once; the committed file is the vector).

A 512-bit 3-of-5 threshold Paillier key, all five shares, ciphertexts with their
plaintexts, every member's partial decryptions of them (deterministic given the share
and the ciphertext), the plaintexts that several 3-subsets combine to, one proof per
member with the context it was made for (proofs are randomized: they are stored as
"must verify" examples, not as expected outputs), and invalid answers that must fail
``verify``. The key and its shares are published test vectors, not secrets: never use
them for anything but tests. Usage: ``python3 tests/vectors/make_threshold_vectors.py``.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import gmpy2
from phe import paillier

from fedcore.crypto.threshold import KeyShare, PartialDecryption, combine, deal, verify
from fedcore.crypto.threshold_proof import EqualityProof, batch_bases, prove

OUT = Path(__file__).with_name("threshold_512.json")
CONTEXT = b"fedcore threshold known-answer vector, round 7"
OTHER_CONTEXT = b"fedcore threshold known-answer vector, round 8"
SUBSETS = [[1, 2, 3], [1, 3, 5], [2, 4, 5], [3, 4, 5], [5, 4, 1]]


def _entry(
    name: str,
    index: int,
    values: list[Any],
    proof: EqualityProof,
    context: bytes,
    ciphertexts: list[int] | None = None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "index": index,
        "context_hex": context.hex(),
        "values": [str(v) for v in values],
        "proof_hex": proof.to_bytes().hex(),
    }
    if ciphertexts is not None:
        entry["ciphertexts"] = [str(c) for c in ciphertexts]
    return entry


def _invalid(
    key: Any, shares: list[KeyShare], ciphertexts: list[int], partials: list[PartialDecryption]
) -> list[dict[str, Any]]:
    """Answers that ``verify`` must refuse, each one change away from an honest answer."""
    n, nsquare = int(key.public_key.n), int(key.public_key.nsquare)
    honest = partials[1]  # member 2's answer
    values = [int(v) for v in honest.values]
    proof = honest.proof
    tampered = list(values)
    tampered[2] = tampered[2] * 2 % nsquare
    swapped = list(values)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    flipped = bytes([proof.challenge[0] ^ 1]) + proof.challenge[1:]
    plus_one = EqualityProof(proof.challenge, proof.response + 1)
    # a consistent lie: every value uses s' = s_2 + 1, and the proof is made for s'
    lie_witness = key.delta * (shares[1].secret + 1)
    lie = [int(gmpy2.powmod(c, 2 * lie_witness, nsquare)) for c in ciphertexts]
    big_c, big_d = batch_bases(key, 2, CONTEXT, ciphertexts, lie)
    lie_proof = prove(key, 2, lie_witness, big_c, big_d)
    other = list(ciphertexts)
    other[0] = int(key.public_key.encrypt_vector([0])[0])
    entries = [
        _entry("value_times_two", 2, tampered, proof, CONTEXT),
        _entry("values_swapped", 2, swapped, proof, CONTEXT),
        _entry("relabelled_as_member_3", 3, values, proof, CONTEXT),
        _entry("other_context", 2, values, proof, OTHER_CONTEXT),
        _entry("other_ciphertexts", 2, values, proof, CONTEXT, other),
        _entry("response_plus_one", 2, values, plus_one, CONTEXT),
        _entry("challenge_flipped", 2, values, EqualityProof(flipped, proof.response), CONTEXT),
        _entry("value_is_n", 2, [n, *values[1:]], proof, CONTEXT),
        _entry("value_is_zero", 2, [*values[:-1], 0], proof, CONTEXT),
        _entry("value_is_n_squared", 2, [nsquare, *values[1:]], proof, CONTEXT),
        _entry("one_value_missing", 2, values[:-1], proof, CONTEXT),
        _entry("consistent_lie_wrong_share", 2, lie, lie_proof, CONTEXT),
    ]
    for entry in entries:
        cts = [int(c) for c in entry.get("ciphertexts", ciphertexts)]
        answer = PartialDecryption(
            entry["index"],
            tuple(int(v) for v in entry["values"]),
            EqualityProof.from_bytes(bytes.fromhex(entry["proof_hex"])),
        )
        assert not verify(key, cts, answer, context=bytes.fromhex(entry["context_hex"]))
    return entries


def main() -> None:
    """Deal a fresh 512-bit 3-of-5 key and write its valid and invalid vectors."""
    key, shares = deal(512, 3, 5)
    n = int(key.public_key.n)
    phe_pk = paillier.PaillierPublicKey(n)
    plaintexts = [0, 1, 42, 2**64 + 7, 2**500 + 12345, n - 1]
    rows: list[dict[str, str]] = []
    for m in plaintexts:
        r = secrets.randbelow(n - 2) + 1
        rows.append(
            {
                "source": "phe",
                "plaintext": str(m),
                "r": str(r),
                "ciphertext": str(phe_pk.raw_encrypt(m, r_value=r)),
            }
        )
    for m, c in zip([7, n - 2], key.public_key.encrypt_vector([7, n - 2]), strict=True):
        rows.append({"source": "fedcore", "plaintext": str(m), "ciphertext": str(c)})
    ciphertexts = [int(row["ciphertext"]) for row in rows]
    partials = [share.partial_decrypt(ciphertexts, context=CONTEXT) for share in shares]
    for partial in partials:
        assert verify(key, ciphertexts, partial, context=CONTEXT)
    expected = [int(row["plaintext"]) for row in rows]
    combinations = []
    for subset in SUBSETS:
        result = combine(key, [partials[i - 1] for i in subset])
        assert result == expected
        combinations.append({"indices": subset, "plaintexts": [str(x) for x in result]})
    proofs = [_entry("honest", p.index, list(p.values), p.proof, CONTEXT) for p in partials]
    empty_context = shares[3].partial_decrypt(ciphertexts)
    proofs.append(_entry("empty_context", 4, list(empty_context.values), empty_context.proof, b""))

    # An order-2 change (a sign flip) re-proved with the honest witness verifies by design;
    # combine squares it away. Stored so the documented property stays pinned.
    nsquare = int(key.public_key.nsquare)
    flipped = [int(v) for v in partials[0].values]
    flipped[1] = nsquare - flipped[1]
    big_c, big_d = batch_bases(key, 1, CONTEXT, ciphertexts, flipped)
    flip_proof = prove(key, 1, key.delta * shares[0].secret, big_c, big_d)
    sign_flip = _entry("sign_flip_reproved", 1, flipped, flip_proof, CONTEXT)
    flip_partial = PartialDecryption(1, tuple(flipped), flip_proof)
    assert verify(key, ciphertexts, flip_partial, context=CONTEXT)
    assert combine(key, [flip_partial, partials[1], partials[2]]) == expected

    document = {
        "description": (
            "Threshold Paillier (Damgård–Jurik, s = 1) 3-of-5 known-answer vectors; "
            "the key and its shares are public test vectors"
        ),
        "public_key": key.to_document(),
        "public_key_bytes": key.to_bytes().decode(),
        "sha256": key.sha256(),
        "shares": [{"index": s.index, "share": str(s.secret)} for s in shares],
        "context_hex": CONTEXT.hex(),
        "ciphertexts": rows,
        "partials": [{"index": p.index, "values": [str(v) for v in p.values]} for p in partials],
        "combinations": combinations,
        "proofs": proofs,
        "sign_flip": sign_flip,
        "invalid": _invalid(key, shares, ciphertexts, partials),
    }
    OUT.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
