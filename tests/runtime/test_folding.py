"""The fold engine against phe: inline, in threads (native) and in processes (gmpy2)."""

from __future__ import annotations

import asyncio
import random

import pytest

from fedcore.aggregator.folding import FoldEngine
from fedcore.crypto import PrivateKey, PublicKey, serialize_ciphertexts
from fedcore.crypto import folding as slices
from fedcore.crypto.folding import check_ciphertext_bytes, native_available
from fedcore.errors import InvalidCiphertextError

from .conftest import Keys

ITEMS = 37
# (workers, native): inline and split, with each engine the machine has
ENGINES = [
    pytest.param(workers, native, id=f"{workers}-{'native' if native else 'gmpy2'}")
    for workers in (0, 2)
    for native in ((True, False) if native_available() else (False,))
]


def _keys(keys: Keys) -> tuple[PublicKey, PrivateKey]:
    private = PrivateKey.load(keys.private)
    return private.public_key, private


def _update(public: PublicKey, values: list[int]) -> bytes:
    return serialize_ciphertexts(public.encrypt_vector(values), public)


@pytest.mark.parametrize(("workers", "native"), ENGINES)
async def test_fold_engine_sums_like_phe(keys: Keys, workers: int, native: bool) -> None:
    public, private = _keys(keys)
    rng = random.Random(workers)
    updates = [[rng.randrange(2**40) for _ in range(ITEMS)] for _ in range(3)]
    engine = FoldEngine(public, ITEMS, workers=workers, native=native)
    assert engine.native is native
    try:
        for round_no in range(2):  # reset between rounds really starts again
            engine.reset()
            for values in updates[round_no:]:
                engine.commit(await engine.stage(_update(public, values)))
            summed = await engine.result()
            width = public.ciphertext_bytes
            phe_key = private.to_phe()
            got = [
                phe_key.raw_decrypt(int.from_bytes(summed[i * width : (i + 1) * width], "big"))
                for i in range(ITEMS)
            ]
            assert got == [sum(column) for column in zip(*updates[round_no:], strict=True)]
    finally:
        engine.close()


@pytest.mark.parametrize(("workers", "native"), ENGINES)
async def test_a_bad_update_is_refused_whole(keys: Keys, workers: int, native: bool) -> None:
    public, private = _keys(keys)
    engine = FoldEngine(public, ITEMS, workers=workers, native=native)
    try:
        engine.reset()
        engine.commit(await engine.stage(_update(public, [1] * ITEMS)))
        width = public.ciphertext_bytes
        bad = bytearray(_update(public, [5] * ITEMS))
        bad[30 * width : 31 * width] = int(private.p).to_bytes(width, "big")  # gcd(c, n) = p
        with pytest.raises(InvalidCiphertextError) as info:
            await engine.stage(bytes(bad))
        assert info.value.index == 30
        with pytest.raises(InvalidCiphertextError, match="bytes"):
            await engine.stage(b"\x01" * width)
        summed = await engine.result()
        first = int.from_bytes(summed[:width], "big")
        assert private.to_phe().raw_decrypt(first) == 1  # only the good update is in
    finally:
        engine.close()


@pytest.mark.parametrize("native", [True, False] if native_available() else [False])
def test_byte_range_check_names_the_bad_index(
    keys: Keys, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not native:
        monkeypatch.setattr(slices, "_montfold", None)  # the numpy scan
    public, _ = _keys(keys)
    width = public.ciphertext_bytes
    good = _update(public, [3] * 4)
    assert check_ciphertext_bytes(good, public) == 4
    for bad_value, index in [(0, 2), (int(public.nsquare), 1), (2 ** (8 * width) - 1, 3)]:
        data = bytearray(good)
        data[index * width : (index + 1) * width] = bad_value.to_bytes(width, "big")
        with pytest.raises(InvalidCiphertextError) as info:
            check_ciphertext_bytes(bytes(data), public, index_offset=100)
        assert info.value.index == 100 + index
    nsq_minus_one = (int(public.nsquare) - 1).to_bytes(width, "big")
    assert check_ciphertext_bytes(nsq_minus_one, public) == 1
    with pytest.raises(InvalidCiphertextError, match="multiple"):
        check_ciphertext_bytes(good[:-1], public)


@pytest.mark.parametrize(("workers", "native"), [e for e in ENGINES if e.values[0] > 0])
async def test_updates_staged_together_are_judged_one_by_one(
    keys: Keys, workers: int, native: bool
) -> None:
    """Updates arriving while the workers are busy are staged as batches; a bad one among
    them is refused alone, and the sum holds exactly the good ones."""
    public, private = _keys(keys)
    rng = random.Random(9)
    rows = [[rng.randrange(2**40) for _ in range(ITEMS)] for _ in range(11)]
    datas = [_update(public, values) for values in rows]
    width = public.ciphertext_bytes
    bad = bytearray(datas[6])
    bad[20 * width : 21 * width] = (int(private.q) * 3).to_bytes(width, "big")
    datas[6] = bytes(bad)
    engine = FoldEngine(public, ITEMS, workers=workers, native=native)
    try:
        engine.reset()
        staged = await asyncio.gather(*(engine.stage(d) for d in datas), return_exceptions=True)
        assert isinstance(staged[6], InvalidCiphertextError) and staged[6].index == 20
        good = [k for k in range(len(datas)) if k != 6]
        for k in good:
            assert isinstance(staged[k], int)
            engine.commit(staged[k])
        summed = await engine.result()
        phe_key = private.to_phe()
        got = [
            phe_key.raw_decrypt(int.from_bytes(summed[i * width : (i + 1) * width], "big"))
            for i in range(ITEMS)
        ]
        assert got == [sum(rows[k][i] for k in good) for i in range(ITEMS)]
    finally:
        engine.close()


@pytest.mark.parametrize(("workers", "native"), [e for e in ENGINES if e.values[0] > 0])
async def test_a_cancelled_stage_is_never_folded(keys: Keys, workers: int, native: bool) -> None:
    public, private = _keys(keys)
    rows = [[k + 1] * ITEMS for k in range(4)]
    engine = FoldEngine(public, ITEMS, workers=workers, native=native)
    try:
        engine.reset()
        tasks = [asyncio.create_task(engine.stage(_update(public, values))) for values in rows]
        await asyncio.sleep(0)  # every stage is queued; the batch is on its way
        tasks[1].cancel()
        staged = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(staged[1], asyncio.CancelledError)
        for k in (0, 2, 3):
            engine.commit(staged[k])  # type: ignore[arg-type]
        summed = await engine.result()
        first = int.from_bytes(summed[: public.ciphertext_bytes], "big")
        assert private.to_phe().raw_decrypt(first) == 1 + 3 + 4
        # close() while stages wait: they are cancelled, not left hanging
        pending = [asyncio.create_task(engine.stage(_update(public, row))) for row in rows]
        await asyncio.sleep(0)
        engine.close()
        outcomes = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)
    finally:
        engine.close()
