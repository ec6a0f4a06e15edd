"""Refusals: one enum of reasons with labels and wire codes, counted and logged rate-limited."""

from __future__ import annotations

import logging

import pytest

from protocol import REFUSAL_LABELS, ErrorCode, Refusal
from protocol.refusals import REFUSAL_LOG_INTERVAL, RefusalLog


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_protocol_errors_before_the_first_message_map_to_one_reason_each() -> None:
    assert Refusal.for_code(ErrorCode.TIMEOUT) is Refusal.FIRST_MESSAGE_TIMEOUT
    assert Refusal.for_code(ErrorCode.FRAME_TOO_LARGE) is Refusal.FRAME_TOO_LARGE
    assert Refusal.for_code(ErrorCode.MALFORMED_FRAME) is Refusal.MALFORMED_FRAME
    assert Refusal.for_code(ErrorCode.RATE_LIMITED) is Refusal.RATE_LIMITED
    assert Refusal.for_code(ErrorCode.BAD_SEQUENCE) is Refusal.PROTOCOL_VIOLATION
    assert len(set(REFUSAL_LABELS)) == len(Refusal)
    assert all(label.islower() and " " not in label for label in REFUSAL_LABELS)


def test_a_flood_of_refusals_is_counted_in_full_but_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    reported: list[str] = []
    log = RefusalLog(reported.append, clock=clock)
    with caplog.at_level(logging.WARNING, logger="protocol.refusals"):
        for i in range(1000):
            clock.now += 0.001
            log.refuse(Refusal.PER_PEER_CAP, f"'client-0' at 10.0.0.1:{i}", "cap")
        log.refuse(Refusal.TLS_HANDSHAKE_TIMEOUT, "10.0.0.2:1", "slow")  # its own budget
        clock.now += REFUSAL_LOG_INTERVAL
        log.refuse(Refusal.PER_PEER_CAP, "'client-0' at 10.0.0.1:9999", "cap")
    assert log.counts == {"per_peer_cap": 1001, "tls_handshake_timeout": 1}
    assert reported.count("per_peer_cap") == 1001
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert "per_peer_cap" in lines[0] and "more" not in lines[0]
    assert lines[2].endswith("(and 999 more since the last such line)")


def test_a_failing_callback_does_not_stop_the_count(caplog: pytest.LogCaptureFixture) -> None:
    def broken(reason: str) -> None:
        raise RuntimeError("metrics registry gone")

    log = RefusalLog(broken, clock=FakeClock())
    log.refuse(Refusal.RATE_LIMITED, "x", "y")
    log.refuse(Refusal.RATE_LIMITED, "x", "y")
    assert log.counts == {"rate_limited": 2}
    assert "on_refusal callback failed" in caplog.text
