"""Packed-Paillier cryptography: keys, fast encryption, CRT decryption, sums, codecs.

Interoperable with phe (python-paillier) for the same key: ``g = n + 1``, ciphertexts
in Z*_{n²}; a threshold key (``threshold``) shares the decryption exponent so that T of
N members must cooperate. Big-integer work is done with gmpy2, except two loops that
run in OpenSSL: the constant-time exponentiation of decryption and partial decryption
(``modexp``) and the aggregator's fold and validation (``folding``, a C extension when
built). Knows nothing of packing, models or the wire protocol.
"""

from __future__ import annotations

from fedcore.crypto.decrypt import DecryptPool
from fedcore.crypto.encrypt import EncryptionPool, short_exponent_bits
from fedcore.crypto.keys import PrivateKey, PublicKey, generate_keypair
from fedcore.crypto.serialize import (
    deserialize_ciphertexts,
    deserialize_plaintexts,
    serialize_ciphertexts,
    serialize_plaintexts,
)
from fedcore.crypto.threshold import (
    KeyShare,
    PartialDecryption,
    ThresholdPublicKey,
    combine,
    deal,
    verify,
)
from fedcore.crypto.vector import fold_update, validate_ciphertexts

__all__ = [
    "DecryptPool",
    "EncryptionPool",
    "KeyShare",
    "PartialDecryption",
    "PrivateKey",
    "PublicKey",
    "ThresholdPublicKey",
    "combine",
    "deal",
    "deserialize_ciphertexts",
    "deserialize_plaintexts",
    "fold_update",
    "generate_keypair",
    "serialize_ciphertexts",
    "serialize_plaintexts",
    "short_exponent_bits",
    "validate_ciphertexts",
    "verify",
]
