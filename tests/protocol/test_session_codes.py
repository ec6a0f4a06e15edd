"""The aggregator session names replays and stale rounds with their own wire codes."""

from __future__ import annotations

import pytest

from protocol import Ack, ErrorCode, IllegalTransition, Role, Session, State, encode_frame

from .test_session import HELLO, WELCOME, chunk, done, grant, request, start


def _aggregator_in_round(round_id: int = 7, *, granted: bool = True) -> Session:
    """An aggregator session in round ``round_id``, the client's upload granted or not."""
    session = Session(Role.AGGREGATOR)
    session.receive_data(encode_frame(HELLO))
    session.next_event()
    session.send(WELCOME)
    session.send(start(round_id))
    if granted:
        _feed(session, request(round_id))
        session.send(grant(round_id=round_id))
    return session


def _feed(session: Session, message: object) -> None:
    session.receive_data(encode_frame(message))  # type: ignore[arg-type]
    session.next_event()


@pytest.mark.parametrize("again", [chunk(0), request()])
def test_update_after_ack_is_a_replay(again: object) -> None:
    session = _aggregator_in_round()
    _feed(session, chunk(0))
    _feed(session, done(1))
    session.send(Ack(round_id=7, accepted=True))
    with pytest.raises(IllegalTransition) as info:
        _feed(session, again)
    assert info.value.code is ErrorCode.REPLAY
    assert session.state is State.ERROR


@pytest.mark.parametrize("bad_round", [3, 6])
@pytest.mark.parametrize("granted", [True, False])
def test_update_for_an_earlier_round_is_stale(bad_round: int, granted: bool) -> None:
    session = _aggregator_in_round(7, granted=granted)
    message = chunk(0, round_id=bad_round) if granted else request(round_id=bad_round)
    with pytest.raises(IllegalTransition) as info:
        _feed(session, message)
    assert info.value.code is ErrorCode.STALE_ROUND


def test_update_for_a_future_round_is_a_sequence_error() -> None:
    session = _aggregator_in_round(7)
    with pytest.raises(IllegalTransition) as info:
        _feed(session, chunk(0, round_id=8))
    assert info.value.code is ErrorCode.BAD_SEQUENCE
