"""The aggregator session names replays and stale rounds with their own wire codes."""

from __future__ import annotations

import pytest

from protocol import ErrorCode, IllegalTransition, Role, Session, State, encode_frame

from .test_session import HELLO, WELCOME, chunk, done, start


def _aggregator_in_round(round_id: int = 7) -> Session:
    session = Session(Role.AGGREGATOR)
    session.receive_data(encode_frame(HELLO))
    session.next_event()
    session.send(WELCOME)
    session.send(start(round_id))
    return session


def _feed(session: Session, message: object) -> None:
    session.receive_data(encode_frame(message))  # type: ignore[arg-type]
    session.next_event()


def test_update_after_ack_is_a_replay() -> None:
    from protocol import Ack

    session = _aggregator_in_round()
    _feed(session, chunk(0))
    _feed(session, done(1))
    session.send(Ack(round_id=7, accepted=True))
    with pytest.raises(IllegalTransition) as info:
        _feed(session, chunk(0))
    assert info.value.code is ErrorCode.REPLAY
    assert session.state is State.ERROR


@pytest.mark.parametrize("bad_round", [3, 6])
def test_update_for_an_earlier_round_is_stale(bad_round: int) -> None:
    session = _aggregator_in_round(7)
    with pytest.raises(IllegalTransition) as info:
        _feed(session, chunk(0, round_id=bad_round))
    assert info.value.code is ErrorCode.STALE_ROUND


def test_update_for_a_future_round_is_a_sequence_error() -> None:
    session = _aggregator_in_round(7)
    with pytest.raises(IllegalTransition) as info:
        _feed(session, chunk(0, round_id=8))
    assert info.value.code is ErrorCode.BAD_SEQUENCE
