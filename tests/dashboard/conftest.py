"""The runtime tests' session fixtures (PKI from `fedcore certs`, a 1024-bit Paillier key,
the digits data), reused here rather than copied."""

from tests.runtime.conftest import digits, keys, pki  # noqa: F401  (fixtures)
