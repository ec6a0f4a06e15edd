"""Encryption off the critical path: pooled random factors, never reused; warm-up before joining.

A Paillier ciphertext with ``g = n + 1`` is ``c = (1 + m·n) · rf mod n²``, so
``c mod n = rf mod n``: two ciphertexts that share a random factor share ``c mod n``,
and then ``L(c1 / c2 mod n²) = m1 - m2 mod n`` gives the aggregator the difference of
the two plaintexts. The attack below is run against what a client really sends.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import gmpy2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcore.client.pipeline import TrainedUpdate, seal
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationParams, SessionInfo
from fedcore.crypto import EncryptionPool, PublicKey, deserialize_ciphertexts, generate_keypair
from fedcore.crypto.encrypt import encrypt_with_factors
from fedcore.crypto.masking import public_key_bytes
from fedcore.layout import ModelLayout, TensorSpec


@pytest.fixture(scope="module")
def public_key() -> PublicKey:
    return generate_keypair(1024)[0]


def _shared_factor_pairs(ciphertexts: list[int], n: int) -> list[tuple[int, int]]:
    """The aggregator's reuse check: indices of ciphertexts with the same ``c mod n``."""
    first: dict[int, int] = {}
    pairs = []
    for index, c in enumerate(ciphertexts):
        key = c % n
        if key in first:
            pairs.append((first[key], index))
        else:
            first[key] = index
    return pairs


def _difference(c1: int, c2: int, n: int) -> int:
    """What a shared factor leaks: ``m1 - m2 mod n`` from two ciphertexts alone."""
    nsquare = n * n
    ratio = c1 * int(gmpy2.invert(c2, nsquare)) % nsquare
    return (ratio - 1) // n


def test_the_reuse_check_catches_a_shared_factor_and_recovers_the_difference(
    public_key: PublicKey,
) -> None:
    """The attack works when a factor is reused, so its silence below means something."""
    n = int(public_key.n)
    factor = public_key._randomizer().factor()
    m1, m2 = 123_456_789, 1_000
    c1, c2 = encrypt_with_factors([m1, m2], [factor, factor], public_key.n, public_key.nsquare)
    assert _shared_factor_pairs([int(c1), int(c2)], n) == [(0, 1)]
    assert _difference(int(c1), int(c2), n) == m1 - m2


def _codec(public_key: PublicKey, values: int) -> tuple[FederationParams, EncryptedCodec]:
    federation = FederationParams(mode="shared", public_key=public_key)
    layout = ModelLayout(tensors=(TensorSpec(name="w", shape=(values,), dtype="float32"),))
    session = SessionInfo(
        num_values=values, chunk_items=64, model_layout=layout.to_json(), rounds=3
    )
    codec = codec_for(federation, session)
    assert isinstance(codec, EncryptedCodec)
    return federation, codec


def test_sealed_updates_never_share_a_random_factor(public_key: PublicKey) -> None:
    """Three updates through the real pipeline: no two ciphertexts share a factor.

    The first update takes every factor from a full pool, the second from the background
    worker's refill, the third from a pool half the update's size and the rest made on
    the spot. Identical updates make any reuse as visible as possible.
    """
    values = 3000
    federation, codec = _codec(public_key, values)
    rng = np.random.default_rng(0)
    trained = TrainedUpdate(
        model_digest=b"\x01" * 32,
        update=rng.uniform(-0.1, 0.1, values).astype(np.float32),
        samples=100,
        report=None,
        timings={},
        iterations=1,
    )
    unmaskers = (public_key_bytes(X25519PrivateKey.generate()),)
    sent: list[int] = []
    pooled: list[float] = []

    def send(pool: EncryptionPool) -> None:
        prepared = seal(trained, codec, federation, unmaskers, pool)
        pooled.append(prepared.timings["pooled_factors"])
        for payload in prepared.payloads:
            sent.extend(int(c) for c in deserialize_ciphertexts(payload, public_key))

    count = codec.item_count
    with EncryptionPool(public_key, count) as pool:  # background refills
        pool.fill()
        send(pool)  # all from the pool: one multiplication per ciphertext
        pool.fill()  # waits for the background worker's refill
        send(pool)
    half = count // 2
    with EncryptionPool(public_key, half, background=False) as short:
        short.fill()
        send(short)  # the pool runs dry: the rest are made on the spot
    assert len(sent) == 3 * count
    assert _shared_factor_pairs(sent, int(public_key.n)) == []
    assert pooled == [1.0, 1.0, half / count]


def test_a_client_fills_its_pool_before_joining(tmp_path: Path) -> None:
    """`Client.run` warms up and waits for a full pool before it dials the aggregator.

    Nothing listens at the address: the moment the client first dials, its pool must
    already hold the pinned federation's whole update worth of factors.
    """
    script = textwrap.dedent(
        f"""
        import asyncio
        import fedcore.client.session as session
        from tests.client.test_pool_warmup import _client_without_aggregator

        client = _client_without_aggregator({str(tmp_path)!r})
        seen = []
        real_connect = session.connect

        async def connect(*args, **kwargs):
            pool = client._pool
            seen.append((pool.size, pool.available))
            return await real_connect(*args, **kwargs)

        session.connect = connect

        async def main():
            task = asyncio.create_task(client.run("127.0.0.1:9"))
            while not seen:
                await asyncio.sleep(0.05)
            task.cancel()

        asyncio.run(asyncio.wait_for(main(), 120))
        print("pool at first dial", *seen[0])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("pool at first dial"))
    size, available = (int(x) for x in line.split()[-2:])
    assert size > 0 and available == size


def _client_without_aggregator(workdir: str) -> object:
    """A torch client of a 1024-bit federation (`fedcore certs`, `keygen`), no aggregator."""
    from fedcore.cli import main as fedcore_main
    from fedcore.client import Client, ClientConfig
    from fedcore.crypto import PublicKey as Key
    from fedcore.model import mlp

    out = Path(workdir)
    assert fedcore_main(["certs", "--out", str(out / "pki"), "--clients", "1"]) == 0
    assert fedcore_main(["keygen", "--bits", "1024", "--out", str(out / "keys")]) == 0
    public = Key.load(out / "keys" / "public_key.json")
    config = ClientConfig(
        cert=out / "pki" / "client-0.pem",
        key=out / "pki" / "client-0.key",
        ca=out / "pki" / "ca.pem",
        federation=FederationParams(mode="shared", public_key=public),
        server_hostname="localhost",
        min_key_bits=1024,
        backoff_base=0.2,
        backoff_max=0.5,
    )
    return Client(mlp(8, hidden=(16,), classes=2), lambda model, config: 10, None, config)


def test_torch_warm_up_pays_the_first_step_import_cost() -> None:
    """After `TorchModel.warm_up` a real training step imports (almost) nothing more."""
    script = textwrap.dedent(
        """
        import sys, torch
        from fedcore.client.torch_adapter import TorchModel
        from fedcore.model import mlp
        from fedcore.training import TrainConfig, make_train_fn

        def step_imports(warm):
            model = mlp(8, hidden=(16,), classes=2)
            adapter = TorchModel(model, lambda m, c: 1, None)
            if warm:
                adapter.warm_up()
            before = set(sys.modules)
            x = torch.randn(32, 8).numpy(); y = (x[:, 0] > 0).astype("int64")
            make_train_fn(x, y, TrainConfig(epochs=1, batch_size=8))(model, {})
            return len(set(sys.modules) - before)

        print("imports", step_imports(sys.argv[1] == "warm"))
        """
    )
    counts = {}
    for mode in ("cold", "warm"):
        done = subprocess.run(
            [sys.executable, "-c", script, mode],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.returncode == 0, done.stderr[-2000:]
        counts[mode] = int(done.stdout.split()[-1])
    assert counts["cold"] > 100, counts  # the cost warm-up exists to move
    assert counts["warm"] < 10, counts
