"""Micro benchmark of packed Paillier: encrypt, pool, fold, validate, decrypt vs phe.

Workload: one seed-MLP update (535,818 float32 values, normal × 0.01) per client,
packed ``slots_per_ciphertext`` values per 2048-bit ciphertext. Every figure is seconds
per value unless its name says otherwise; ratios compare phases of the same run on the
same machine (absolute figures on a shared machine are noisy, so cheap phases take the
best of ``--repeats`` runs).

Then the cost of protocol 3's privacy checks (see `bench.privacy_costs`): encryption
with the ceil(k/2)-bit random-factor exponent against the 224-bit one used before,
pooled encryption, decryption with and without the Z*_{n²} check, a client's masking,
an unmasker's mask sum per contributor, token and committee-credential signing and
verification, ``check_modulus``; and the committee's unmask work and the aggregator's
token checks for 10 and 1,000 signed tokens on the seed MLP's ciphertext count
(``--contributors``), measured, not extrapolated.

Then threshold decryption (`fedcore.crypto.threshold`) on a key dealt for the same
modulus size (``--threshold`` of ``--parties``), against shared-mode CRT decryption of
the same number of real ciphertexts: one member's partial decryption with and without
its batched proof, the proof alone, combining T partials and verifying one member's.
Measures; never asserts timing (it does check that the plaintexts come back).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import gmpy2
import numpy as np

from bench.privacy_costs import (
    best_of,
    committee_at_scale,
    credential_costs,
    encryption_costs,
    masking_costs,
)
from fedcore.crypto import (
    EncryptionPool,
    deserialize_ciphertexts,
    fold_update,
    generate_keypair,
    serialize_ciphertexts,
    validate_ciphertexts,
)
from fedcore.crypto.folding import SliceSum, native_available
from fedcore.crypto.modexp import constant_time_backend
from fedcore.crypto.threshold import combine, deal, verify
from fedcore.crypto.threshold_proof import batch_bases, check_proof, prove
from fedcore.packing import PackingSpec, decode_sum, encode_update

SEED_MLP_VALUES = 535_818
QUICK_VALUES = 50_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark-specific flags (the runner adds --quick and --json)."""
    parser.add_argument("--key-bits", type=int, default=2048, help="Paillier modulus size")
    parser.add_argument(
        "--values", type=int, default=None, help=f"update size (default {SEED_MLP_VALUES:,})"
    )
    parser.add_argument("--value-bits", type=int, default=16, help="quantization bits")
    parser.add_argument("--headroom-bits", type=int, default=10, help="slot headroom bits")
    parser.add_argument(
        "--phe-sample", type=int, default=None, help="values encrypted with phe (default 100)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="best-of for cheap phases")
    parser.add_argument(
        "--decrypt-workers", type=int, default=2, help="also time decryption over N processes"
    )
    parser.add_argument(
        "--encrypt-sample",
        type=int,
        default=None,
        help="ciphertexts of the before/after encryption and decryption comparison "
        "(default 500; quick 200)",
    )
    parser.add_argument(
        "--contributors",
        default="10,1000",
        help="signed-token counts of the committee-at-scale figures (comma-separated; '' = skip)",
    )
    parser.add_argument(
        "--threshold", type=int, default=3, help="shares needed to decrypt (threshold key)"
    )
    parser.add_argument("--parties", type=int, default=5, help="shares dealt (threshold key)")
    parser.add_argument(
        "--threshold-ciphertexts",
        type=int,
        default=None,
        help="ciphertexts of the threshold comparison (default: the update's, at most 200 "
        "at 2048 bits, scaled by (2048/bits)^3 for other key sizes)",
    )


def _progress(message: str) -> None:
    print(f"[micro] {message}", file=sys.stderr, flush=True)


def _aggregator_engines(pk: Any, first: bytes, second: bytes, repeats: int) -> dict[str, float]:
    """Seconds per update for what the aggregator does with it from wire bytes.

    Staging parses and validates (0 < c < n², one gcd for the product mod n); committing
    folds. Both engines of fedcore.crypto.folding, one update at a time, and the native
    one with 4 updates staged together (one validation for the batch), timed alternately.
    """
    engines = {"gmpy2": (False, 1)}
    if native_available():
        engines.update({"native": (True, 1), "native_batch4": (True, 4)})
    best = dict.fromkeys(engines, float("inf"))
    count = len(first) // pk.ciphertext_bytes
    for _ in range(max(3, repeats)):
        for name, (native, batch) in engines.items():
            part = SliceSum(int(pk.n), 0, count, native=native)
            part.stage(0, first)
            part.commit(0)  # a running sum that is not 1, as after the first update
            updates = [(1 + k, second) for k in range(batch)]
            started = time.perf_counter()
            if any(answer is not None for answer in part.stage_batch(updates)):
                raise RuntimeError(f"{name}: a valid update did not stage")
            for update_id, _ in updates:
                part.commit(update_id)
            best[name] = min(best[name], (time.perf_counter() - started) / batch)
    return best


def _phe_figures(public_key: Any, private_key: Any, sample: np.ndarray) -> tuple[float, float]:
    """phe, one float per ciphertext: the unpacked baseline (encrypt, decrypt per value)."""
    phe_pk, phe_sk = public_key.to_phe(), private_key.to_phe()
    values = [float(v) for v in sample]
    started = time.perf_counter()
    encrypted = [phe_pk.encrypt(v) for v in values]
    encrypt_s = (time.perf_counter() - started) / len(values)
    started = time.perf_counter()
    decrypted = [phe_sk.decrypt(e) for e in encrypted]
    decrypt_s = (time.perf_counter() - started) / len(values)
    assert np.allclose(decrypted, values)
    return encrypt_s, decrypt_s


def _tenseal_figures(update: np.ndarray) -> dict[str, Any]:
    """TenSEAL CKKS encryption per value, when TenSEAL is installed (optional)."""
    try:
        import tenseal as ts  # type: ignore[import-not-found]
    except ImportError:
        return {"tenseal": "not installed"}
    context = ts.context(
        ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 40, 60]
    )
    context.global_scale = 2**40
    slots = 4096
    sample = update[: slots * 16]
    started = time.perf_counter()
    vectors = [
        ts.ckks_vector(context, sample[i : i + slots].tolist())
        for i in range(0, sample.size, slots)
    ]
    encrypt_s = (time.perf_counter() - started) / sample.size
    size = sum(len(v.serialize()) for v in vectors)
    return {"tenseal_encrypt_s_per_value": encrypt_s, "tenseal_bytes_per_value": size / sample.size}


def _privacy_figures(
    args: argparse.Namespace, pk: Any, sk: Any, spec: PackingSpec, update: np.ndarray
) -> dict[str, Any]:
    """Protocol 3's checks, each alone, on this key (see `bench.privacy_costs`)."""
    slots = spec.slots_per_ciphertext
    plaintexts = encode_update(update, spec, rng=np.random.default_rng(3))
    sample = args.encrypt_sample or (200 if args.quick else 500)
    _progress(f"privacy checks: encryption before/after on {sample} ciphertexts")
    out: dict[str, Any] = encryption_costs(pk, sk, plaintexts[:sample], slots, args.repeats)
    _progress(
        f"encrypt {out['encrypt_s_per_ciphertext_before'] * 1e3:.3f} ms/ciphertext with "
        f"{out['encrypt_exponent_bits_before']}-bit exponents, "
        f"{out['encrypt_s_per_ciphertext_after'] * 1e3:.3f} ms with "
        f"{out['encrypt_exponent_bits_after']}-bit; pooled "
        f"{out['pool_encrypt_s_per_ciphertext'] * 1e6:.1f} us"
    )
    _progress(f"privacy checks: masks on {len(plaintexts):,} ciphertexts")
    out.update(masking_costs(pk, plaintexts, slots, args.repeats))
    out.update(credential_costs(pk, args.repeats))
    counts = [int(c) for c in str(args.contributors).split(",") if c.strip()]
    if counts:
        _progress(f"committee at scale: {counts} signed tokens, {SEED_MLP_VALUES:,} values")
        scale = committee_at_scale(pk, sk, counts, SEED_MLP_VALUES, _progress)
        out["committee_at_scale"] = scale
        out["committee_at_scale_values"] = SEED_MLP_VALUES
        for count in counts:
            figures = scale[str(count)]
            for name in (
                "committee_unmask_s",
                "committee_verify_s",
                "committee_mask_sums_s",
                "aggregator_token_checks_cold_s",
                "aggregator_token_checks_warm_s",
            ):
                out[f"{name}_at_{count}"] = figures[name]
            out[f"committee_ciphertexts_at_{count}"] = figures["ciphertexts"]
    return out


def _threshold_figures(
    args: argparse.Namespace,
    sk: Any,
    spec: PackingSpec,
    update: np.ndarray,
    n_ct: int,
) -> dict[str, Any]:
    """Threshold decryption against shared-mode CRT decryption, per ciphertext.

    A ``threshold``-of-``parties`` key is dealt for micro's modulus size; the same packed
    plaintexts are encrypted under it and under micro's key. The expensive passes (CRT
    decryption, member 1's exponentiation alone, then its whole ``partial_decrypt``) run
    once each on one core, like micro's decryption; the other T - 1 members' partials
    (needed to combine, not timed) use every core. Cheap steps take the best of
    ``--repeats``. Raises RuntimeError when a plaintext does not come back or a proof
    does not verify.
    """
    bits, threshold, parties = sk.public_key.bits, args.threshold, args.parties
    count = args.threshold_ciphertexts or min(n_ct, max(8, round(200 * (2048 / bits) ** 3)))
    repeats = args.repeats
    section_started = time.perf_counter()
    _progress(f"dealing a {bits}-bit {threshold}-of-{parties} threshold key (two safe primes)")
    started = time.perf_counter()
    tpk, shares = deal(bits, threshold, parties)
    deal_s = time.perf_counter() - started
    _progress(f"dealt in {deal_s:.2f} s")

    slots = spec.slots_per_ciphertext
    plaintexts = encode_update(update[: count * slots], spec, rng=np.random.default_rng(4))
    plaintexts = (plaintexts * -(-count // len(plaintexts)))[:count]
    shared = sk.public_key.encrypt_vector(plaintexts)
    ciphertexts = tpk.public_key.encrypt_vector(plaintexts)
    context = b"bench micro: round 1, shard 0"
    member, others = shares[0], shares[1:threshold]

    _progress(f"threshold vs CRT decryption on {count} ciphertexts, one core")
    sk.decrypt_vector(shared[:2])  # the CRT exponentiations are built once per key
    started = time.perf_counter()
    decrypted = sk.decrypt_vector(shared)
    crt_s = (time.perf_counter() - started) / count
    if decrypted != plaintexts:
        raise RuntimeError("CRT decryption did not return the encrypted plaintexts")

    exponentiation = member._exponentiation()  # built once per share, outside the timing
    started = time.perf_counter()
    exponentiation.powmod(ciphertexts)
    exponentiation_s = (time.perf_counter() - started) / count
    started = time.perf_counter()
    partial = member.partial_decrypt(ciphertexts, context=context, workers=1)
    partial_s = (time.perf_counter() - started) / count
    _progress(
        f"CRT decrypt {crt_s * 1e3:.3f} ms/ciphertext; partial decryption "
        f"{exponentiation_s * 1e3:.3f} ms/ciphertext exponentiation alone "
        f"({exponentiation_s / crt_s:.2f}x CRT), {partial_s * 1e3:.3f} ms with its proof "
        f"({partial_s / crt_s:.2f}x)"
    )

    witness = tpk.delta * member.secret
    values = list(partial.values)
    batch_s = best_of(repeats, lambda: batch_bases(tpk, member.index, context, ciphertexts, values))
    big_c, big_d = batch_bases(tpk, member.index, context, ciphertexts, values)
    prove_s = best_of(repeats, lambda: prove(tpk, member.index, witness, big_c, big_d))
    proof = prove(tpk, member.index, witness, big_c, big_d)
    if not check_proof(tpk, member.index, big_c, big_d, proof):
        raise RuntimeError("a freshly made threshold proof does not verify")
    _progress(
        f"one member's proof per shard of {count}: batching {batch_s * 1e3:.2f} ms + "
        f"proof {prove_s * 1e3:.2f} ms"
    )

    workers = max(1, os.cpu_count() or 1)
    partials = [partial]
    partials += [s.partial_decrypt(ciphertexts, context=context, workers=workers) for s in others]
    answers: list[list[int]] = []

    def combined() -> None:
        answers.append(combine(tpk, partials))

    combine_s = best_of(repeats, combined) / count
    if any(answer != plaintexts for answer in answers):
        raise RuntimeError(f"combining {threshold} partials did not return the plaintexts")
    verdicts: list[bool] = []

    def verified() -> None:
        verdicts.append(verify(tpk, ciphertexts, partial, context=context))

    verify_s = best_of(repeats, verified) / count
    if not all(verdicts):
        raise RuntimeError("an honest member's partial decryption did not verify")
    if verify(tpk, ciphertexts, partial, context=context + b" (replayed)"):
        raise RuntimeError("a partial decryption verified under another context")
    _progress(
        f"combine {threshold} partials {combine_s * 1e6:.1f} us/ciphertext; "
        f"verify one member's {verify_s * 1e6:.1f} us/ciphertext "
        f"(threshold section {time.perf_counter() - section_started:.1f} s)"
    )
    return {
        "threshold": threshold,
        "parties": parties,
        "deal_s": deal_s,
        "shard_ciphertexts": count,
        "crt_decrypt_s_per_ct": crt_s,
        "partial_exponentiation_s_per_ct": exponentiation_s,
        "partial_decrypt_s_per_ct": partial_s,
        "partial_vs_crt_ratio": exponentiation_s / crt_s,
        "partial_with_proof_vs_crt_ratio": partial_s / crt_s,
        "proof_batch_s_per_shard": batch_s,
        "proof_prove_s": prove_s,
        "proof_s_per_member_round": batch_s + prove_s,
        "combine_s_per_ct": combine_s,
        "verify_s_per_ct": verify_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase once on one key and return the figures."""
    n_values = args.values or (QUICK_VALUES if args.quick else SEED_MLP_VALUES)
    phe_sample = args.phe_sample or (50 if args.quick else 100)
    repeats = args.repeats
    rng = np.random.default_rng(2026)
    updates = [(rng.standard_normal(n_values) * 0.01).astype(np.float32) for _ in range(2)]

    _progress(f"generating a {args.key_bits}-bit key with phe")
    started = time.perf_counter()
    pk, sk = generate_keypair(args.key_bits)
    keygen_s = time.perf_counter() - started
    spec = PackingSpec(
        key_bits=pk.bits, value_bits=args.value_bits, headroom_bits=args.headroom_bits, clip=0.05
    )
    slots = spec.slots_per_ciphertext
    n_ct = spec.ciphertexts_for(n_values)
    _progress(f"{n_values:,} values -> {n_ct:,} ciphertexts of {slots} slots")

    _progress(f"phe baseline on {phe_sample} values")
    phe_encrypt_s, phe_decrypt_s = _phe_figures(pk, sk, updates[0][:phe_sample])

    started = time.perf_counter()
    pk.encrypt_vector([0])  # builds the per-key fixed-base table (once per key instance)
    table_build_s = time.perf_counter() - started
    _progress(f"fixed-base table built in {table_build_s:.2f} s")

    def packed_encrypt(update: np.ndarray, seed: int) -> list[Any]:
        plaintexts = encode_update(update, spec, weight=1, rng=np.random.default_rng(seed))
        return pk.encrypt_vector(plaintexts)

    started = time.perf_counter()
    encode_update(updates[0], spec, rng=np.random.default_rng(0))
    encode_s = (time.perf_counter() - started) / n_values
    started = time.perf_counter()
    first = packed_encrypt(updates[0], 1)
    packed_encrypt_s = (time.perf_counter() - started) / n_values
    _progress(f"packed encrypt (quantize+pack+encrypt): {packed_encrypt_s * 1e6:.3f} us/value")

    pool = EncryptionPool(pk, n_ct, background=False)
    started = time.perf_counter()
    pool.fill()
    pool_fill_s = time.perf_counter() - started
    started = time.perf_counter()
    second = pool.encrypt_vector(encode_update(updates[1], spec, rng=np.random.default_rng(2)))
    pool_encrypt_s = (time.perf_counter() - started) / n_values
    pool.close()
    _progress(f"warm pool encrypt: {pool_encrypt_s * 1e6:.3f} us/value (fill {pool_fill_s:.2f} s)")

    wire = serialize_ciphertexts(first, pk)
    serialize_s = best_of(repeats, lambda: serialize_ciphertexts(first, pk)) / n_values
    deserialize_s = (
        best_of(repeats, lambda: deserialize_ciphertexts(wire, pk, validate=False)) / n_values
    )
    validate_s = best_of(repeats, lambda: validate_ciphertexts(first, pk)) / n_values
    _progress(f"validate: {validate_s * 1e9:.1f} ns/value; {len(wire) / n_values:.3f} bytes/value")

    # The floor and the fold are timed alternately so both see the same machine load.
    n2 = pk.nsquare
    a, b = first[0], second[0]
    mulmods = 2000
    fold_best = mulmod_best = float("inf")
    for _ in range(max(5, repeats)):
        started = time.perf_counter()
        for _ in range(mulmods):
            a * b % n2
        mulmod_best = min(mulmod_best, (time.perf_counter() - started) / mulmods)
        running = list(first)
        started = time.perf_counter()
        fold_update(running, second, pk)
        fold_best = min(fold_best, time.perf_counter() - started)
    mulmod_s = mulmod_best
    fold_s = fold_best / n_values
    _progress(f"fold: {fold_s * 1e9:.1f} ns/value (floor {mulmod_s / slots * 1e9:.1f})")
    engines = _aggregator_engines(pk, wire, serialize_ciphertexts(second, pk), repeats)
    for name, seconds in engines.items():
        _progress(
            f"aggregator, one update from bytes ({name}): {seconds / n_values * 1e9:.1f} ns/value"
        )

    _progress(
        f"decrypting {n_ct:,} ciphertexts on one core ({constant_time_backend()}, constant-time)"
    )
    started = time.perf_counter()
    mean = decode_sum(sk.decrypt_vector(running), spec, n_values=n_values, total_weight=2)
    decrypt_s = (time.perf_counter() - started) / n_values
    _progress(f"decrypt+unpack: {decrypt_s * 1e6:.3f} us/value")
    _progress("decrypting again, variable-time powmod (constant_time=False)")
    started = time.perf_counter()
    decode_sum(
        sk.decrypt_vector(running, constant_time=False), spec, n_values=n_values, total_weight=2
    )
    decrypt_fast_s = (time.perf_counter() - started) / n_values
    reference = (np.clip(updates[0], -0.05, 0.05) + np.clip(updates[1], -0.05, 0.05)) / 2
    max_abs_error = float(np.max(np.abs(mean - reference)))

    result: dict[str, Any] = {
        "key_bits": pk.bits,
        "values": n_values,
        "value_bits": spec.value_bits,
        "headroom_bits": spec.headroom_bits,
        "slots_per_ciphertext": slots,
        "ciphertexts": n_ct,
        "keygen_s": keygen_s,
        "table_build_s": table_build_s,
        "phe_sample": phe_sample,
        "phe_encrypt_s_per_value": phe_encrypt_s,
        "phe_decrypt_s_per_value": phe_decrypt_s,
        "encode_s_per_value": encode_s,
        "packed_encrypt_s_per_value": packed_encrypt_s,
        "pool_fill_s": pool_fill_s,
        "pool_encrypt_s_per_value": pool_encrypt_s,
        "serialize_s_per_value": serialize_s,
        "deserialize_s_per_value": deserialize_s,
        "validate_s_per_value": validate_s,
        "mulmod_s": mulmod_s,
        "fold_s_per_value": fold_s,
        "decrypt_s_per_value": decrypt_s,
        "decrypt_variable_time_s_per_value": decrypt_fast_s,
        "decrypt_backend": constant_time_backend(),
        "bytes_per_value": len(wire) / n_values,
        "max_abs_error": max_abs_error,
        "quantization_step": spec.step,
    }
    if args.decrypt_workers > 1:
        _progress(f"decrypting again over {args.decrypt_workers} processes")
        started = time.perf_counter()
        decode_sum(
            sk.decrypt_vector(running, workers=args.decrypt_workers),
            spec,
            n_values=n_values,
            total_weight=2,
        )
        result["decrypt_workers"] = args.decrypt_workers
        result["decrypt_parallel_s_per_value"] = (time.perf_counter() - started) / n_values
    result.update(_threshold_figures(args, sk, spec, updates[0], n_ct))

    result["encrypt_speedup_vs_phe"] = phe_encrypt_s / packed_encrypt_s
    result["pool_encrypt_speedup_vs_phe"] = phe_encrypt_s / pool_encrypt_s
    result["decrypt_speedup_vs_phe"] = phe_decrypt_s / decrypt_s
    result["decrypt_variable_time_speedup_vs_phe"] = phe_decrypt_s / decrypt_fast_s
    result["fold_vs_floor"] = fold_s / (mulmod_s / slots)
    for name, seconds in engines.items():
        result[f"aggregator_update_{name}_s_per_value"] = seconds / n_values
    if "native" in engines:
        result["aggregator_native_speedup"] = engines["gmpy2"] / engines["native"]
        result["aggregator_native_batch4_speedup"] = engines["gmpy2"] / engines["native_batch4"]
    result["mulmod_floor_s_per_value"] = mulmod_s / slots
    result.update(_tenseal_figures(updates[0]))
    result.update(_privacy_figures(args, pk, sk, spec, updates[0]))
    result["gmpy2"] = gmpy2.version()
    result["load_average_1min"] = os.getloadavg()[0]
    return result
