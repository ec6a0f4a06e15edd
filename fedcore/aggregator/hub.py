"""The collecting half of every aggregator: connections, uploads, folding, one round's contributors.

The root aggregator and each relay run one hub. It admits clients and relays (Hello ->
Welcome through the `Gatekeeper`), sends the round's RoundStart to the selected ones,
takes chunked uploads through the `UploadGate`, checks contributor tokens, folds each
complete update once (`FoldEngine`), and says when the round is full. A relay's upload
is folded like a client's: it carries the tokens of the clients folded into it, which
are checked one by one and counted as contributors (quorum counts leaves, never relays).

The hub never decides when a round starts or ends, never decrypts and holds no key:
`fedcore.aggregator.service` (the root) and `fedcore.aggregator.relay` drive it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from fedcore.aggregator.admission import Gatekeeper
from fedcore.aggregator.folding import FoldEngine
from fedcore.aggregator.registry import ClientHandle, close_client, count_bytes, send_quietly
from fedcore.aggregator.rounds import RejectedUpdate, RoundPhase, RoundState, UploadPace
from fedcore.aggregator.uploads import UploadGate
from fedcore.codec import EncryptedCodec, PlaintextCodec, UpdateCodec
from fedcore.contracts import ClientReport, RejectReason
from fedcore.errors import InvalidCiphertextError
from fedcore.metrics import AggregatorMetrics, MetricsServer
from protocol.errors import ConnectionClosed, ErrorCode, ProtocolError, TruncatedFrame
from protocol.messages import (
    Ack,
    DecryptResult,
    Error,
    KeyProof,
    PartialDecryptResult,
    RelayStatus,
    RoundEnd,
    RoundStart,
    UnmaskResult,
    UpdateChunk,
    UpdateDone,
    UploadRequest,
)
from protocol.transport import Connection, Server

__all__ = ["ROUND_START_CONCURRENCY", "ClientHub", "Listener", "RoundStartFor"]

# Counted with the rejected updates, but not a refusal (no Error frame, no wire code):
# the client's connection ended inside its upload (killed, cut off), and its partial
# upload waits resume_grace for it.
UPLOAD_INTERRUPTED = "upload_interrupted"

log = logging.getLogger(__name__)

# RoundStart frames carry the whole model (2 MB for the seed MLP); sending them to
# 1,000 clients at once would buffer gigabytes, so only this many are in flight.
ROUND_START_CONCURRENCY = 32

RoundStartFor = Callable[[RoundState, int], RoundStart]
"""Builds the RoundStart of a round for one client, given the chunks it already sent."""


class Listener:
    """What the root and a relay both expose once they listen: ports and readiness."""

    _server: Server | None
    _metrics_server: MetricsServer | None
    _started: asyncio.Event
    metrics: AggregatorMetrics

    def _health(self) -> tuple[bool, dict[str, Any]]:
        raise NotImplementedError

    def _serve_metrics(self, host: str, port: int | None) -> None:
        """Start /metrics and /healthz on ``host:port`` (``None``: metrics are off)."""
        if port is not None:
            self._metrics_server = MetricsServer(
                self.metrics, host=host, port=port, health=self._health
            )
            self._metrics_server.start()

    @property
    def port(self) -> int:
        """The bound TCP port for clients (once `wait_started` returned)."""
        if self._server is None:
            raise RuntimeError(f"the {type(self).__name__.lower()} is not listening yet")
        return self._server.port

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics HTTP port, or None when metrics are off."""
        return None if self._metrics_server is None else self._metrics_server.port

    async def wait_started(self) -> None:
        """Return once clients can connect."""
        await self._started.wait()


class ClientHub:
    """Connected clients and relays, their uploads, and the round being collected."""

    def __init__(
        self,
        *,
        gate: Gatekeeper,
        codec: UpdateCodec,
        metrics: AggregatorMetrics,
        max_inflight: int,
        resume_grace: float,
        fold_workers: int,
        committee_timeout: float,
        round_start: RoundStartFor,
        late_joiners: bool = False,
        upload_pace: UploadPace | None = None,
    ) -> None:
        self.gate = gate
        self.codec = codec
        self.metrics = metrics
        self.clients: dict[str, ClientHandle] = {}
        self.round: RoundState | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.uploads = UploadGate(
            codec=codec,
            max_inflight=max_inflight,
            resume_grace=resume_grace,
            metrics=metrics,
            round_for=self.round_for,
            clients=self.clients,
            tasks=self.tasks,
            pace=upload_pace,
            on_stalled=self._on_upload_stalled,
        )
        self.folder: FoldEngine | None = None
        self._fold_workers = fold_workers
        self._committee_timeout = committee_timeout
        self._round_start = round_start
        self._late_joiners = late_joiners
        self._resume_grace = resume_grace
        self.clients_changed = asyncio.Event()
        self.round_full = asyncio.Event()
        self.reports: dict[str, ClientReport] = {}
        """Each folded source's operational report (timings, iterations) this round."""
        self.round_bytes = 0
        self.round_fold_s = 0.0
        self._ended_rounds: collections.deque[int] = collections.deque(maxlen=8)

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Start the fold engine (encrypted federations)."""
        if isinstance(self.codec, EncryptedCodec) and self.folder is None:
            self.folder = FoldEngine(
                self.codec.public_key, self.codec.item_count, workers=self._fold_workers
            )

    async def close_all(self, reason: str) -> None:
        """Say goodbye to every connection (``reason`` travels in the Bye)."""
        for handle in list(self.clients.values()):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(handle.conn.close(reason=reason), 5)

    def close(self) -> None:
        """Cancel background tasks and upload deadlines, and stop the fold workers."""
        self.uploads.drop_all()
        for task in list(self.tasks):
            task.cancel()
        if self.folder is not None:
            self.folder.close()

    # ------------------------------------------------------------------ who is here
    @property
    def leaf_count(self) -> int:
        """Clients connected here or through a relay (each relay reports its own count)."""
        return sum(h.relayed_clients if h.relay else 1 for h in self.clients.values())

    def direct_clients(self) -> list[str]:
        """Connected clients that train themselves (not relays)."""
        return [cid for cid, h in self.clients.items() if not h.relay]

    def busy_relays(self) -> list[str]:
        """Connected relays that report at least one client: each is asked every round."""
        return [cid for cid, h in self.clients.items() if h.relay and h.relayed_clients > 0]

    def _count_changed(self) -> None:
        self.metrics.connected_clients.set(self.leaf_count)
        self.clients_changed.set()

    # ------------------------------------------------------------------ one round
    def begin(self, state: RoundState) -> None:
        """Make ``state`` the round being collected: an empty sum, no reports yet."""
        self.round = state
        if self.folder is not None:
            self.folder.reset()
        self.round_full.clear()
        self.reports = {}
        self.gate.token_check_seconds = 0.0
        self.round_bytes = 0
        self.round_fold_s = 0.0

    async def collect(self, state: RoundState, timeout: float, next_phase: RoundPhase) -> None:
        """Send RoundStart to the selected, wait until all contributed or ``timeout``, close.

        The round moves to ``next_phase`` (no upload is taken after it); uploads in
        progress are dropped, and whoever was selected but did not contribute gets a
        RoundEnd.
        """
        sending = asyncio.Semaphore(ROUND_START_CONCURRENCY)

        async def send(cid: str) -> None:
            async with sending:
                await self.send_round_start(cid)

        await asyncio.gather(*(send(cid) for cid in sorted(state.selected)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.round_full.wait(), max(0.0, timeout))
        state.phase = next_phase
        self._ended_rounds.append(state.round_id)
        self.uploads.drop_all()
        for cid in state.pending:
            handle = self.clients.get(cid)
            if handle is not None:
                await send_quietly(
                    handle,
                    RoundEnd(round_id=state.round_id, status="closed", reason="round closed"),
                )

    async def send_round_start(self, client_id: str) -> None:
        """The open round's RoundStart to one client (resuming its partial upload if any)."""
        state = self.round
        handle = self.clients.get(client_id)
        if state is None or handle is None:
            return
        message = self._round_start(state, self.uploads.held_chunks(client_id, state.round_id))
        try:  # a committee answer still on its way keeps the session in DECRYPTING
            await asyncio.wait_for(handle.committee_idle.wait(), self._committee_timeout)
        except TimeoutError:
            await close_client(handle, ErrorCode.TIMEOUT, "committee request unanswered")
            return
        await send_quietly(handle, message)

    def round_for(self, round_id: int) -> RoundState:
        """The open round if it is ``round_id`` and still collecting (RejectedUpdate else)."""
        state = self.round
        if state is None or round_id != state.round_id:
            current = "none" if state is None else str(state.round_id)
            raise RejectedUpdate(
                RejectReason.STALE_ROUND,
                f"round {round_id} is not open (current round: {current})",
            )
        if state.phase is not RoundPhase.COLLECTING:
            raise RejectedUpdate(RejectReason.STALE_ROUND, f"round {round_id} is closed")
        return state

    # ------------------------------------------------------------------ connections
    async def handle_connection(self, conn: Connection) -> None:
        """Serve one connection from Hello to goodbye (the transport's handler)."""
        handle = await self.gate.admit(conn)
        if handle is None:
            return
        client_id = handle.client_id
        previous = self.clients.get(client_id)
        if previous is not None:
            log.info("%s reconnected; closing its previous connection", client_id)
            await close_client(previous, None, "replaced by a newer connection")
        try:
            await handle.send(self.gate.welcome(handle))
        except (ProtocolError, OSError, ConnectionError):
            return
        self.clients[client_id] = handle
        self._count_changed()
        role = (
            " (relay)"
            if handle.relay
            else " (committee member)"
            if handle.can_decrypt
            else " (key holder, to prove its key)"
            if handle.key_challenge
            else ""
        )
        log.info("%s joined%s", client_id, role)
        state = self.round
        if state is not None and state.phase is RoundPhase.COLLECTING:
            if self._late_joiners and not handle.relay and client_id not in state.selected:
                # a relay asks every client it has, also one that (re)joins mid-round
                state.selected = state.selected | {client_id}
            state.given_up.discard(client_id)  # a relay back after its grace: ask it again
            if client_id in state.pending:
                await self.send_round_start(client_id)
        try:
            while True:
                message = await conn.receive()
                count_bytes(handle, self.metrics)
                await self._dispatch(handle, message)
        except ConnectionClosed as exc:
            if isinstance(exc.peer_message, Error):
                handle.last_error = exc.peer_message.reason
                handle.last_error_code = ErrorCode(exc.peer_message.code)
                log.warning("%s closed with an error: %s", client_id, exc.peer_message.reason)
            elif client_id in self.uploads.uploads:
                self._count_interrupted(client_id, str(exc))
        except TruncatedFrame as exc:
            # a connection cut inside a frame: a killed client, not a broken one
            if client_id in self.uploads.uploads:
                self._count_interrupted(client_id, str(exc))
            else:
                log.info("%s: connection ended inside a frame: %s", client_id, exc)
        except ProtocolError as exc:
            log.info("%s: protocol error: %s", client_id, exc)
            reason = RejectReason.for_code(exc.code)
            self.metrics.updates_rejected_total.labels(reason=reason.label).inc()
        finally:
            count_bytes(handle, self.metrics)
            if self.clients.get(client_id) is handle:
                del self.clients[client_id]
                self.uploads.keep_or_drop_partial(client_id)
                if handle.relay:
                    self._forget_relay_unless_back(client_id)
            why = f": {handle.last_error}" if handle.last_error else ""
            handle.committee_gone(f"{client_id} disconnected{why}")
            self._count_changed()
            log.info("%s left", client_id)

    def _count_interrupted(self, client_id: str, why: str) -> None:
        """A client's connection ended during its upload: its own reason, not a refusal."""
        log.info("%s: upload interrupted (%s); kept for resume_grace", client_id, why)
        self.metrics.updates_rejected_total.labels(reason=UPLOAD_INTERRUPTED).inc()

    def _forget_relay_unless_back(self, relay_id: str) -> None:
        """A relay gone mid-round: unless it is back within ``resume_grace``, stop waiting.

        Its partial sum died with it (its clients' updates are not counted), so the
        round need not wait for its deadline: once every other source is in, it closes.
        A relay that comes back in time is asked again, as a reconnecting client is.
        """
        state = self.round
        if state is None or relay_id not in state.pending:
            return

        async def forget() -> None:
            await asyncio.sleep(self._resume_grace)
            if relay_id in self.clients or self.round is not state:
                return
            if state.phase is RoundPhase.COLLECTING and relay_id in state.pending:
                log.info(
                    "%s did not come back: round %d goes on without it", relay_id, state.round_id
                )
                state.given_up.add(relay_id)
                if not state.pending and not state.until_deadline:
                    self.round_full.set()

        task = asyncio.create_task(forget())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _dispatch(self, handle: ClientHandle, message: Any) -> None:
        if (
            isinstance(message, UpdateChunk | UploadRequest | UpdateDone)
            and self.clients.get(handle.client_id) is not handle
        ):
            # still in flight on a connection a newer one replaced: the upload is the
            # newer connection's now, and nothing of the old one may add to it
            log.debug("%s: %s on a replaced connection", handle.client_id, type(message).__name__)
            return
        try:
            if isinstance(message, UpdateChunk):
                self.uploads.add_chunk(handle, message)
            elif isinstance(message, UploadRequest):
                await self.uploads.grant(handle, message)
            elif isinstance(message, UpdateDone):
                await self._on_done(handle, message)
            elif isinstance(message, DecryptResult | UnmaskResult | PartialDecryptResult):
                handle.committee_answer(message)
            elif isinstance(message, KeyProof):
                await self._on_key_proof(handle, message)
            elif isinstance(message, RelayStatus) and handle.relay:
                handle.relayed_clients = message.clients
                self._count_changed()
            else:
                log.debug("%s: ignoring %s", handle.client_id, type(message).__name__)
        except RejectedUpdate as exc:
            round_id = getattr(message, "round_id", None)
            if exc.reason is RejectReason.UPLOAD_STALLED:
                # refused and counted when its grant expired; this frame was on its way
                log.debug(
                    "%s: %s after its upload stalled", handle.client_id, type(message).__name__
                )
                await close_client(handle, exc.reason.code, str(exc))
                return
            if exc.reason is RejectReason.STALE_ROUND and round_id in self._ended_rounds:
                # Sent before our RoundEnd reached the client: a race, not misbehaviour.
                log.debug(
                    "%s: late %s for round %s", handle.client_id, type(message).__name__, round_id
                )
                self.uploads.drop(handle.client_id)
                return
            await self._reject(handle, exc.reason, str(exc))
        except InvalidCiphertextError as exc:
            await self._reject(handle, RejectReason.INVALID_CIPHERTEXT, str(exc))

    async def _on_done(self, handle: ClientHandle, done: UpdateDone) -> None:
        cid = handle.client_id
        state = self.round_for(done.round_id)
        upload, chunks = self.uploads.finish(handle, done)
        if handle.relay:
            contributors = self.gate.check_relay_tokens(state, done)
        else:
            contributors = {cid: self.gate.check_token(cid, state, done)}
        update = self.codec.join(chunks)
        t0 = time.monotonic()
        if self.folder is not None:
            assert isinstance(update, bytes)
            update_id = await self.folder.stage(update)
            try:
                # the round may have closed while we validated
                state.mark_folded(cid, contributors, relay=handle.relay)
            except RejectedUpdate as exc:
                self.folder.abort(update_id)
                if exc.reason is RejectReason.STALE_ROUND:  # RoundEnd already told the client
                    self.uploads.drop(cid)
                    return
                raise
            self.folder.commit(update_id)
        else:
            assert isinstance(self.codec, PlaintextCodec)
            state.fold(cid, update, self.codec.fold, contributors[cid])
        fold_s = time.monotonic() - t0
        self.round_fold_s += fold_s
        self.metrics.fold_seconds.observe(fold_s)
        self.round_bytes += upload.bytes_received
        self.uploads.drop(cid)
        self.metrics.updates_accepted_total.inc()
        report = ClientReport.from_wire(done.timings, done.metrics)
        self.metrics.observe_client_report(*report.to_wire())
        self.reports[cid] = report
        await send_quietly(handle, Ack(round_id=done.round_id, accepted=True))
        if not state.pending and not state.until_deadline:
            self.round_full.set()

    async def _on_key_proof(self, handle: ClientHandle, proof: KeyProof) -> None:
        """A key holder proves its key: drafted from now on, or refused and disconnected."""
        why = await asyncio.to_thread(self.gate.check_key_proof, handle, proof)
        if why:
            log.warning("%s refused as a committee member: %s", handle.client_id, why)
            self.metrics.updates_rejected_total.labels(
                reason=RejectReason.BAD_KEY_PROOF.label
            ).inc()
            await close_client(handle, ErrorCode.BAD_KEY_PROOF, f"committee member refused: {why}")
            return
        handle.key_proven = True
        log.info("%s proved it holds the key: committee member", handle.client_id)
        self._count_changed()

    def _on_upload_stalled(self, client_id: str, round_id: int, why: str) -> None:
        """A grant expired (its slot is already free): refuse the client for the round."""
        state = self.round
        if state is not None and state.round_id == round_id:
            state.mark_stalled(client_id)
            if not state.pending and not state.until_deadline:
                self.round_full.set()  # nobody else to wait for
        reason = RejectReason.UPLOAD_STALLED
        log.warning(
            "%s: update refused (%s): %s (if honest clients are this slow, lower "
            "upload_min_rate or raise upload_start_timeout)",
            client_id,
            reason.label,
            why,
        )
        self.metrics.updates_rejected_total.labels(reason=reason.label).inc()
        handle = self.clients.get(client_id)
        if handle is not None:
            task = asyncio.create_task(close_client(handle, reason.code, why))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _reject(self, handle: ClientHandle, reason: RejectReason, message: str) -> None:
        log.warning("%s: update refused (%s): %s", handle.client_id, reason.label, message)
        self.metrics.updates_rejected_total.labels(reason=reason.label).inc()
        self.uploads.drop(handle.client_id)
        await close_client(handle, reason.code, message)
