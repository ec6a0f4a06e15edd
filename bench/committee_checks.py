"""Cost of checking shared-key committee members: key proofs and checked decryptions.

Workload: one shard of real 2048-bit ciphertexts (``--ciphertexts``, default 1,000: a
seed-MLP sum is ~9,000 ciphertexts over a committee of 2-3, so a few thousand per
member). Measured on one core, in one run:

- a member's plain CRT decryption (what it did before) against decryption that also
  recovers each ciphertext's randomness (what it sends now);
- the aggregator's batched re-encryption check of the answer (`check_decryptions`,
  64-bit secret coefficients) and, for reference, checking each value separately;
- the key proof a member sends once per connection, and its verification.

Ratios compare phases of the same run. It also checks every answer: an honest one must
pass and the same answer with one plaintext changed must fail.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import gmpy2

from bench.privacy_costs import best_of
from fedcore.crypto import generate_keypair
from fedcore.crypto.decrypt_proof import check_decryptions, verify_key_proof


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This benchmark's flags."""
    parser.add_argument("--key-bits", type=int, default=2048, help="Paillier modulus size")
    parser.add_argument("--ciphertexts", type=int, default=1000, help="ciphertexts per shard")
    parser.add_argument("--repeats", type=int, default=3, help="best-of for cheap phases")


def _progress(message: str) -> None:
    print(f"[committee-checks] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure each phase once (cheap ones best of ``--repeats``) and return the figures."""
    count = 100 if args.quick else args.ciphertexts
    _progress(f"generating a {args.key_bits}-bit key")
    public_key, private_key = generate_keypair(args.key_bits)
    plaintexts = [int(v) for v in range(1, count + 1)]
    ciphertexts = public_key.encrypt_vector(plaintexts)
    private_key.decrypt_vector(ciphertexts[:2])  # the CRT exponentiations are built once

    _progress(f"decrypting {count} ciphertexts, with and without their randomness")
    started = time.perf_counter()
    decrypted = private_key.decrypt_vector(ciphertexts)
    decrypt_s = time.perf_counter() - started
    started = time.perf_counter()
    opened, randomness = private_key.open_vector(ciphertexts)
    open_s = time.perf_counter() - started
    if decrypted != plaintexts or opened != plaintexts:
        raise RuntimeError("decryption did not return the encrypted plaintexts")

    verdicts: list[bool] = []
    check_s = best_of(
        args.repeats,
        lambda: verdicts.append(check_decryptions(public_key, ciphertexts, opened, randomness)),
    )
    lied = [opened[0] + 1, *opened[1:]]
    if not all(verdicts) or check_decryptions(public_key, ciphertexts, lied, randomness):
        raise RuntimeError("the batched check accepted a wrong answer or refused a right one")
    n, nsquare = public_key.n, public_key.nsquare

    def one_by_one() -> None:
        for c, m, r in zip(ciphertexts, opened, randomness, strict=True):
            if (1 + m * n) * gmpy2.powmod(r, n, nsquare) % nsquare != c:
                raise RuntimeError("an honest value did not re-encrypt")

    separate_s = best_of(1, one_by_one)
    context = b"bench committee-checks: federation | client-0 | nonce"
    prove_s = best_of(args.repeats, lambda: private_key.prove_key(context))
    proof = private_key.prove_key(context)
    verify_s = best_of(args.repeats, lambda: verify_key_proof(public_key, context, proof))
    if not verify_key_proof(public_key, context, proof):
        raise RuntimeError("an honest key proof did not verify")
    per = 1e3 / count
    _progress(
        f"decrypt {decrypt_s * per:.3f} ms/ct, with randomness {open_s * per:.3f} ms/ct "
        f"({open_s / decrypt_s:.2f}x); batched check {check_s * per:.4f} ms/ct "
        f"({check_s / decrypt_s:.1%} of decrypting), separate re-encryption "
        f"{separate_s * per:.3f} ms/ct; key proof {prove_s * 1e3:.2f} ms, "
        f"its check {verify_s * 1e3:.2f} ms"
    )
    return {
        "key_bits": args.key_bits,
        "shard_ciphertexts": count,
        "decrypt_ms_per_ct": decrypt_s * per,
        "decrypt_with_randomness_ms_per_ct": open_s * per,
        "member_cost_ratio": open_s / decrypt_s,
        "batched_check_ms_per_ct": check_s * per,
        "check_vs_decrypt": check_s / decrypt_s,
        "separate_check_ms_per_ct": separate_s * per,
        "batched_vs_separate": check_s / separate_s,
        "key_proof_ms": prove_s * 1e3,
        "key_proof_check_ms": verify_s * 1e3,
    }
