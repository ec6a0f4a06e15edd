"""Per-connection protocol state machines (sans-IO), one for each role.

``Session`` turns bytes into validated messages and messages into bytes, and checks
every message against ONE transition table ``(role, state, message type, direction)
-> next state`` (like h11's ``_state.py``), plus the content rules the table cannot
express: chunk sequence numbers, chunk counts, matching round and shard ids. Any
other message raises (``LocalProtocolError`` when we send it, a
``RemoteProtocolError`` when the peer does) and leaves the session in the permanent
``ERROR`` state.

An aggregator's session holds the peer to ``HELLO_MAX_FRAME_SIZE`` (and a small input
buffer, ``HELLO_MAX_BUFFERED_BYTES``) until it has received the Hello, so a connection
that never says Hello cannot make it buffer a large frame; after the Hello the
configured ``max_frame_size`` applies.

The session enforces order, not policy: round staleness, replay, selection and
ciphertext checks belong to the runtime. It does no I/O and knows nothing of TLS,
Paillier or torch.
"""

from __future__ import annotations

import logging
from collections import deque
from enum import Enum
from typing import NoReturn

from .errors import (
    ErrorCode,
    IllegalTransition,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    UnsupportedVersion,
)
from .framing import (
    CLIENT_MAX_FRAME_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    HEADER_SIZE,
    HELLO_MAX_BUFFERED_BYTES,
    HELLO_MAX_FRAME_SIZE,
    FrameDecoder,
    Sentinel,
    encode_frame,
)
from .messages import (
    PROTOCOL_VERSION,
    Ack,
    Bye,
    DecryptRequest,
    DecryptResult,
    Error,
    Heartbeat,
    Hello,
    KeyProof,
    Message,
    PartialDecryptRequest,
    PartialDecryptResult,
    RelayStatus,
    RoundEnd,
    RoundStart,
    UnmaskRequest,
    UnmaskResult,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)

__all__ = [
    "MAX_COMMITTEE_REQUESTS",
    "MAX_REMEMBERED_ENDED_ROUNDS",
    "TRANSITIONS",
    "Direction",
    "Role",
    "Session",
    "State",
]

logger = logging.getLogger(__name__)

# Late frames are recognised for the last few rounds ended by RoundEnd on this connection.
MAX_REMEMBERED_ENDED_ROUNDS = 8


class Role(Enum):
    """Which end of the connection this session is."""

    CLIENT = "client"
    AGGREGATOR = "aggregator"


class Direction(Enum):
    """Whether a message is being sent by us or was received from the peer."""

    SENT = "sent"
    RECEIVED = "received"


_VERB = {Direction.SENT: "send", Direction.RECEIVED: "receive"}


class State(Enum):
    """Connection state; both roles walk the same states (the client's view mirrors)."""

    HANDSHAKE = "handshake"  # waiting for Hello
    AWAIT_WELCOME = "await_welcome"  # Hello seen, waiting for Welcome
    READY = "ready"  # between rounds
    ROUND = "round"  # RoundStart seen: the client trains
    AWAIT_GRANT = "await_grant"  # UploadRequest seen, waiting for UploadGrant
    UPLOADING = "uploading"  # UploadGrant seen: UpdateChunks may flow
    AWAIT_ACK = "await_ack"  # UpdateDone seen, waiting for Ack
    DECRYPTING = "decrypting"  # Decrypt/UnmaskRequest seen, waiting for its result
    CLOSED = "closed"  # Bye seen (terminal)
    ERROR = "error"  # Error seen or a violation (terminal)


_TERMINAL = frozenset({State.CLOSED, State.ERROR})
# What a client sends for its update, and the states in which it is sending it.
_UPLOAD_MESSAGES = (UploadRequest, UpdateChunk, UpdateDone)
_UPLOAD_STATES = (State.ROUND, State.AWAIT_GRANT, State.UPLOADING)
_LIVE = [s for s in State if s not in _TERMINAL]
_JOINED = [s for s in _LIVE if s not in (State.HANDSHAKE, State.AWAIT_WELCOME)]
_C, _A = Role.CLIENT, Role.AGGREGATOR

# (state, message type, sender) -> next state. Expanded below into the one table.
_BY_SENDER: dict[tuple[State, type[Message], Role], State] = {
    (State.HANDSHAKE, Hello, _C): State.AWAIT_WELCOME,
    (State.AWAIT_WELCOME, Welcome, _A): State.READY,
    (State.READY, RoundStart, _A): State.ROUND,
    (State.READY, RoundEnd, _A): State.READY,  # status broadcast
    # Up to MAX_COMMITTEE_REQUESTS committee requests may be outstanding: the session
    # goes back to READY with the last answer (see Session._transition).
    **{
        (state, request, _A): State.DECRYPTING
        for state in (State.READY, State.DECRYPTING)
        for request in (DecryptRequest, UnmaskRequest, PartialDecryptRequest)
    },
    (State.DECRYPTING, DecryptResult, _C): State.READY,
    (State.DECRYPTING, UnmaskResult, _C): State.READY,
    (State.DECRYPTING, PartialDecryptResult, _C): State.READY,
    # Nothing is streamed before the grant: the aggregator's upload cap is enforced here.
    (State.ROUND, UploadRequest, _C): State.AWAIT_GRANT,
    (State.ROUND, RoundEnd, _A): State.READY,
    (State.AWAIT_GRANT, UploadGrant, _A): State.UPLOADING,
    (State.AWAIT_GRANT, RoundEnd, _A): State.READY,
    (State.UPLOADING, UpdateChunk, _C): State.UPLOADING,
    # (straight after the grant when a resumed upload already has every chunk there)
    (State.UPLOADING, UpdateDone, _C): State.AWAIT_ACK,
    (State.UPLOADING, RoundEnd, _A): State.READY,
    (State.AWAIT_ACK, Ack, _A): State.READY,
    (State.AWAIT_ACK, RoundEnd, _A): State.READY,
    **{(s, Heartbeat, r): s for s in _LIVE for r in Role},
    # a relay reports its client count whenever it changes, whatever it is doing
    **{(s, RelayStatus, _C): s for s in _JOINED},
    # a key holder proves its key once after Welcome, whatever the aggregator sent since
    **{(s, KeyProof, _C): s for s in _JOINED},
    **{(s, Error, r): State.ERROR for s in _LIVE for r in Role},
    **{(s, Bye, r): State.CLOSED for s in _LIVE for r in Role},
    # after a violation we may still tell the peer why (once; see Session.send)
    **{(State.ERROR, Error, r): State.ERROR for r in Role},
}

MAX_COMMITTEE_REQUESTS = 3
"""Committee requests an aggregator may have outstanding on one connection.

Two decryption requests keep a member busy: it works on one while the other waits,
received and checked, so no core idles while an answer travels back and the next
request travels out. The third place is for an unmask request to the round's unmasker,
which is usually decrypting too. Answers may come in any order.
"""

_ANSWER_TYPES: dict[type[Message], type[Message]] = {
    DecryptRequest: DecryptResult,
    UnmaskRequest: UnmaskResult,
    PartialDecryptRequest: PartialDecryptResult,
}

TRANSITIONS: dict[tuple[Role, State, type[Message], Direction], State] = {
    (role, state, msg_type, Direction.SENT if sender is role else Direction.RECEIVED): nxt
    for (state, msg_type, sender), nxt in _BY_SENDER.items()
    for role in Role
}
"""The one transition table: (role, state, message type, direction) -> next state."""


class Session:
    """Sans-IO protocol session for one connection: ``receive_data``/``next_event``/``send``."""

    def __init__(
        self,
        role: Role,
        *,
        max_frame_size: int | None = None,
        max_buffer_size: int | None = None,
    ) -> None:
        if not isinstance(role, Role):
            raise TypeError(f"role must be a Role, got {role!r}")
        if max_frame_size is None:
            max_frame_size = (
                CLIENT_MAX_FRAME_SIZE if role is Role.CLIENT else DEFAULT_MAX_FRAME_SIZE
            )
        self.role = role
        self.state = State.HANDSHAKE
        self._decoder = FrameDecoder(max_frame_size=max_frame_size, max_buffer_size=max_buffer_size)
        # (max_frame_size, max_buffer_size) to restore once the peer's Hello is in
        self._after_hello: tuple[int, int] | None = None
        if role is Role.AGGREGATOR:
            self._after_hello = (self._decoder.max_frame_size, self._decoder.max_buffer_size)
            hello_frame = min(HELLO_MAX_FRAME_SIZE, max_frame_size)
            self._decoder.set_limits(
                max_frame_size=hello_frame,
                max_buffer_size=max(
                    hello_frame + HEADER_SIZE,
                    min(HELLO_MAX_BUFFERED_BYTES, self._decoder.max_buffer_size),
                ),
                limit_note=" before Hello",
            )
        self.late_frames = 0
        """UpdateChunk/UpdateDone frames for a round already ended by RoundEnd (dropped)."""
        self.round_id: int | None = None
        """The round of the current RoundStart (None before the first)."""
        self.next_seq = 0
        """The seq the next UpdateChunk of the current round must carry."""
        self.committee_pending: list[tuple[type[Message], int, int]] = []
        """(result type, round_id, shard_id) of each committee request not answered yet."""
        self._ended_rounds: deque[int] = deque(maxlen=MAX_REMEMBERED_ENDED_ROUNDS)
        self._acked_rounds: deque[int] = deque(maxlen=MAX_REMEMBERED_ENDED_ROUNDS)
        self._error_sent = False
        self._bye_sent = False
        self.error: ProtocolError | None = None
        """The violation that put the session in ERROR, if it was one."""

    # ------------------------------------------------------------------ receiving

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return self._decoder.buffered

    @property
    def bytes_needed(self) -> int:
        """Bytes still missing for the frame in progress (0 when one is complete)."""
        return self._decoder.bytes_needed

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the connection; ``b""`` means EOF."""
        try:
            self._decoder.receive_data(data)
        except RemoteProtocolError as exc:
            self._to_error(exc)
            raise

    def next_event(self) -> Message | Sentinel:
        """The next message from the peer, ``NEED_DATA``, or ``CLOSED`` (EOF)."""
        while True:
            if self.state is State.ERROR:
                raise self.error or RemoteProtocolError("session is in the ERROR state")
            try:
                event = self._decoder.next_event()
            except ProtocolError as exc:
                self._to_error(exc)
                raise
            if isinstance(event, Sentinel):
                return event
            if self.state is State.CLOSED and self._bye_sent:
                continue  # in flight when we said Bye; the peer has not seen it yet
            if self._is_late(event):
                self.late_frames += 1
                logger.debug("dropping late %s for ended round", type(event).__name__)
                continue
            self._transition(event, Direction.RECEIVED)
            if self._after_hello is not None and isinstance(event, Hello):
                frame_size, buffer_size = self._after_hello
                self._after_hello = None
                self._decoder.set_limits(max_frame_size=frame_size, max_buffer_size=buffer_size)
            return event

    # ------------------------------------------------------------------ sending

    def send(self, msg: Message) -> bytes:
        """Check ``msg`` against the state machine and return its frame bytes.

        Returns ``b""`` (and counts ``late_frames``) for an UploadRequest, UpdateChunk or
        UpdateDone of a round the aggregator already ended: that race is not an error.
        """
        if self.role is Role.CLIENT and self._is_late(msg):
            self.late_frames += 1
            return b""
        if isinstance(msg, Error) and self._error_sent:
            raise LocalProtocolError("an Error was already sent on this connection")
        self._transition(msg, Direction.SENT)
        if isinstance(msg, Error):
            self._error_sent = True
        elif isinstance(msg, Bye):
            self._bye_sent = True
        return encode_frame(msg)

    # ------------------------------------------------------------------ the machine

    def _is_late(self, msg: Message) -> bool:
        if not isinstance(msg, _UPLOAD_MESSAGES) or msg.round_id not in self._ended_rounds:
            return False
        in_progress = self.state in _UPLOAD_STATES and msg.round_id == self.round_id
        return not in_progress

    def _transition(self, msg: Message, direction: Direction) -> None:
        key = (self.role, self.state, type(msg), direction)
        nxt = TRANSITIONS.get(key)
        if nxt is None:
            self._check_update_round(msg, direction)
            self._violate(
                direction,
                f"{self.role.value} cannot {_VERB[direction]} {type(msg).__name__} "
                f"in state {self.state.name}",
                ErrorCode.PROTOCOL_VIOLATION,
            )
        self._check_content(msg, direction)
        if nxt is State.READY and self.state is State.DECRYPTING and self.committee_pending:
            nxt = State.DECRYPTING  # more committee answers to come
        if isinstance(msg, Ack):
            self._acked_rounds.append(msg.round_id)
        if isinstance(msg, RoundEnd) and self.state in (*_UPLOAD_STATES, State.AWAIT_ACK):
            self._ended_rounds.append(msg.round_id)
        self.state = nxt

    def _check_content(self, msg: Message, direction: Direction) -> None:
        """The rules a (state, type) table cannot hold: ids, sequence numbers, counts."""
        if isinstance(msg, Hello | Welcome):
            if msg.version != PROTOCOL_VERSION:
                if direction is Direction.SENT:
                    self._violate(direction, f"we speak version {PROTOCOL_VERSION}")
                exc = UnsupportedVersion(
                    f"peer speaks version {msg.version}, we speak {PROTOCOL_VERSION}"
                )
                self._to_error(exc)
                raise exc
        elif isinstance(msg, RoundStart):
            self.round_id = msg.round_id
            self.next_seq = msg.chunks_received
        elif isinstance(msg, UploadRequest):
            self._check_round(msg.round_id, direction)
        elif isinstance(msg, UploadGrant):
            self._check_round(msg.round_id, direction)
            self.next_seq = msg.start_seq
        elif isinstance(msg, UpdateChunk):
            self._check_round(msg.round_id, direction)
            if msg.seq != self.next_seq:
                self._violate(direction, f"UpdateChunk seq {msg.seq}, expected {self.next_seq}")
            self.next_seq += 1
        elif isinstance(msg, UpdateDone):
            self._check_round(msg.round_id, direction)
            if msg.chunk_count != self.next_seq:
                self._violate(
                    direction,
                    f"UpdateDone chunk_count {msg.chunk_count}, {self.next_seq} chunks sent",
                    ErrorCode.WRONG_CHUNK_COUNT,
                )
        elif isinstance(msg, Ack):
            self._check_round(msg.round_id, direction)
        elif isinstance(msg, RoundEnd):
            if self.state is not State.READY:
                self._check_round(msg.round_id, direction)
        elif isinstance(msg, DecryptRequest | UnmaskRequest | PartialDecryptRequest):
            ids = (_ANSWER_TYPES[type(msg)], msg.round_id, msg.shard_id)
            pending = self.committee_pending
            if ids in pending:
                self._violate(
                    direction,
                    f"a second {type(msg).__name__} for (round, shard) {ids[1:]} before its answer",
                )
            if len(pending) >= MAX_COMMITTEE_REQUESTS:
                self._violate(
                    direction,
                    f"{type(msg).__name__} while {len(pending)} committee requests are "
                    f"unanswered (at most {MAX_COMMITTEE_REQUESTS})",
                )
            pending.append(ids)
        elif isinstance(msg, DecryptResult | UnmaskResult | PartialDecryptResult):
            ids = (type(msg), msg.round_id, msg.shard_id)
            if ids not in self.committee_pending:
                expected = (
                    ", ".join(
                        f"{kind.__name__} for (round, shard) {(r, s)}"
                        for kind, r, s in self.committee_pending
                    )
                    or "nothing"
                )
                self._violate(
                    direction,
                    f"{type(msg).__name__} for (round, shard) {(msg.round_id, msg.shard_id)}, "
                    f"expected {expected}",
                )
            self.committee_pending.remove(ids)

    def _check_round(self, round_id: int, direction: Direction) -> None:
        if round_id != self.round_id:
            code = ErrorCode.BAD_SEQUENCE
            if self.round_id is not None and round_id < self.round_id:
                code = ErrorCode.STALE_ROUND
            self._violate(direction, f"round_id {round_id}, current round is {self.round_id}", code)

    def _check_update_round(self, msg: Message, direction: Direction) -> None:
        """Name the two common out-of-place updates precisely: a replay and a stale round."""
        if not isinstance(msg, _UPLOAD_MESSAGES):
            return
        if msg.round_id in self._acked_rounds:
            self._violate(
                direction,
                f"{type(msg).__name__} for round {msg.round_id}, whose update was already "
                "acknowledged",
                ErrorCode.REPLAY,
            )
        if self.round_id is not None and msg.round_id < self.round_id:
            self._violate(
                direction,
                f"{type(msg).__name__} for round {msg.round_id}; round {self.round_id} is current",
                ErrorCode.STALE_ROUND,
            )

    def _violate(
        self, direction: Direction, reason: str, code: ErrorCode = ErrorCode.BAD_SEQUENCE
    ) -> NoReturn:
        exc: ProtocolError
        if direction is Direction.SENT:
            exc = LocalProtocolError(reason, code=code)
        else:
            exc = IllegalTransition(reason, code=code)
        self._to_error(exc)
        raise exc

    def _to_error(self, exc: ProtocolError) -> None:
        if self.state is not State.ERROR:
            logger.debug("session -> ERROR: %s", exc)
        self.state = State.ERROR
        self.error = exc
