"""Protocol 7 on the aggregator's side: committee requests in flight never exceed the cap.

`CommitteeDecryption._exchange` is driven against a real protocol `Session` (the
aggregator's state machine, which refuses a 4th outstanding request), standing in for
the connection: a member caught lying has its other decryptions withdrawn, but those
requests stay outstanding on the wire until it answers them, so their places are not
given to new requests before then.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry

from fedcore.aggregator.committee import CommitteeDecryption
from fedcore.aggregator.registry import ClientHandle
from fedcore.metrics import AggregatorMetrics
from protocol import (
    PROTOCOL_VERSION,
    DecryptRequest,
    DecryptResult,
    Hello,
    UnmaskRequest,
    UnmaskResult,
    Welcome,
    encode_frame,
)
from protocol.session import MAX_COMMITTEE_REQUESTS, Role, Session


class _SessionConn:
    """The aggregator's protocol session in place of a socket: what is sent is checked."""

    def __init__(self) -> None:
        self.session = Session(Role.AGGREGATOR)
        self.session.receive_data(encode_frame(Hello(version=PROTOCOL_VERSION)))
        self.session.next_event()
        self.session.send(
            Welcome(version=PROTOCOL_VERSION, client_id="m", federation=b"f", session_config={})
        )
        self.sent: list[Any] = []

    async def send(self, message: Any) -> None:
        self.session.send(message)  # LocalProtocolError past MAX_COMMITTEE_REQUESTS
        self.sent.append(message)

    def answer(self, message: Any) -> None:
        self.session.receive_data(encode_frame(message))
        assert self.session.next_event() == message


def _decrypt(shard: int) -> DecryptRequest:
    return DecryptRequest(
        round_id=1, shard_id=shard, start=shard, item_count=1, payload=b"c", contributors=b"t"
    )


def _unmask(shard: int) -> UnmaskRequest:
    return UnmaskRequest(
        round_id=1, shard_id=shard, start=shard, item_count=1, payload=b"p", contributors=b"t"
    )


def _committee(handle: ClientHandle) -> CommitteeDecryption:
    committee = CommitteeDecryption.__new__(CommitteeDecryption)
    committee.config = SimpleNamespace(decrypt_shard_timeout=30.0)  # type: ignore[assignment]
    committee.excluded = []
    committee.metrics = AggregatorMetrics(CollectorRegistry())
    committee._clients = {handle.client_id: handle}
    committee._owed = set()
    return committee


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_withdrawn_requests_keep_their_places_until_the_liar_answers() -> None:
    conn = _SessionConn()
    handle = ClientHandle(client_id="m", conn=conn)  # type: ignore[arg-type]
    committee = _committee(handle)
    decrypts = [asyncio.create_task(committee._exchange(handle, _decrypt(i))) for i in (0, 1)]
    await _settle()
    assert [type(m) for m in conn.sent] == [DecryptRequest, DecryptRequest]
    # caught lying on another shard: both decryptions in flight are withdrawn at once
    committee._exclude(handle, _decrypt(0), "a lie")
    assert await asyncio.gather(*decrypts) == [None, None]
    # it is still the unmasker: three unmask requests, but two places are owed
    unmasks = [asyncio.create_task(committee._exchange(handle, _unmask(i))) for i in (0, 1, 2)]
    await _settle()
    assert len(conn.session.committee_pending) == MAX_COMMITTEE_REQUESTS
    assert [type(m) for m in conn.sent].count(UnmaskRequest) == 1
    for shard in (0, 1):  # the liar answers what it owed; the answers are not used
        owed = DecryptResult(
            round_id=1, shard_id=shard, item_count=1, payload=b"x", seconds=0.1, randomness=b""
        )
        conn.answer(owed)
        handle.committee_answer(owed)
        await _settle()
        assert len(conn.session.committee_pending) == MAX_COMMITTEE_REQUESTS
    assert [type(m) for m in conn.sent].count(UnmaskRequest) == 3
    for shard in (0, 1, 2):
        answer = UnmaskResult(round_id=1, shard_id=shard, item_count=1, payload=b"u", seconds=0.1)
        conn.answer(answer)
        handle.committee_answer(answer)
    results = await asyncio.gather(*unmasks)
    assert [type(r) for r in results] == [UnmaskResult] * 3
    assert conn.session.committee_pending == [] and handle.committee_idle.is_set()
    assert not committee._owed  # every owed slot was freed
