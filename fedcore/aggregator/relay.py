"""A relay: an edge aggregator that folds its clients' updates and forwards one encrypted sum.

`await Relay(config).run()` connects to its upstream (the root aggregator or another
relay) like a client, with ``Hello(relay=True)``, and adopts the federation the
upstream's Welcome offers (checked against a pinned federation file when given). It
then serves its own clients with that same Welcome through a `ClientHub`: mutual TLS,
grants, chunked uploads, resume, token checks and the fold engine, exactly as the root
does. For each upstream RoundStart it asks its clients (the model, clip and unmasker
credentials passed on unchanged), folds their updates, and uploads the folded sum as
one contribution whose UpdateDone carries every folded client's signed token. The
upstream checks each token and counts the clients, not the relay, towards quorum.

A relay holds no private key and asks for no decryption: what it forwards is a product
of ciphertexts masked for the round's unmaskers. If it dies, only its round's partial
sum is lost; it reconnects with backoff and resumes an upload the upstream still holds
a part of. Relays under relays work the same way (each reports how many clients it
serves with `RelayStatus`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.aggregator.admission import Gatekeeper
from fedcore.aggregator.hub import ClientHub, Listener
from fedcore.aggregator.preflight import check_daemon, check_listening
from fedcore.aggregator.relay_config import RelayConfig
from fedcore.aggregator.rounds import RoundPhase, RoundState, select_clients
from fedcore.client.config import FEDERATION_COMPLETE
from fedcore.client.pipeline import model_digest
from fedcore.client.reconnect import serve_reconnecting
from fedcore.codec import EncryptedCodec, codec_for
from fedcore.contracts import FederationMismatch, FederationParams, SessionInfo
from fedcore.credentials import CommitteeCredential, CredentialError, pack_tokens
from fedcore.errors import ConfigError, FedcoreError
from fedcore.metrics import AggregatorMetrics, MetricsServer
from protocol.errors import ProtocolError
from protocol.framing import DEFAULT_MAX_FRAME_SIZE
from protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Hello,
    RelayStatus,
    RoundEnd,
    RoundStart,
    UpdateChunk,
    UpdateDone,
    UploadGrant,
    UploadRequest,
    Welcome,
)
from protocol.tls import client_context, server_context
from protocol.transport import Backoff, Connection, Server, TransportConfig, connect

__all__ = ["Relay"]

log = logging.getLogger(__name__)

# Time kept back from an upstream round's deadline for forwarding the sum, at least.
MIN_FORWARD_MARGIN_S = 2.0
# Client-count reports are coalesced over this long (a burst of joins sends one).
STATUS_COALESCE_S = 0.2
# What an UpdateDone may carry besides the tokens (the upstream reads 8 MiB frames).
_DONE_OVERHEAD = 64 * 1024


@dataclass(eq=False)
class _RelayRound:
    """One upstream round as this relay serves it: collect, fold, then forward."""

    start: RoundStart
    state: RoundState
    outcome: asyncio.Future[bool] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    """True once the sum is ready to forward; False when there is nothing to forward."""
    payloads: list[bytes] = field(default_factory=list)
    item_count: int = 0
    digest: bytes = b""
    contributors: bytes = b""
    timings: dict[str, float] = field(default_factory=dict)
    collect_task: asyncio.Task[None] | None = None
    aborted: bool = False
    resume_token: bytes = b""
    """The upstream's token for our upload of this round (shown to resume it)."""

    @property
    def round_id(self) -> int:
        """The upstream's round id (the relay's clients see the same one)."""
        return self.start.round_id

    def settle(self, ready: bool) -> None:
        """Say whether there is a sum to forward (the first word stands)."""
        if not self.outcome.done():
            self.outcome.set_result(ready)


class Relay(Listener):
    """An edge aggregator: `await Relay(config).run()`; `request_stop()` ends it cleanly."""

    def __init__(self, config: RelayConfig, *, metrics: AggregatorMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or AggregatorMetrics()
        for name in ("cert", "key", "ca", "federation"):
            path = getattr(config, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"relay {name} file {path} does not exist (--{name})")
        check_daemon(config.cert, config.key, config.ca, purpose="relay")
        self._pinned = (
            FederationParams.load(config.federation) if config.federation is not None else None
        )
        try:
            self._client_ssl = client_context(config.cert, config.key, config.ca)
            self._server_ssl = server_context(config.cert, config.key, config.ca)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"relay: cannot use {config.cert} / {config.key}: {exc}") from None
        self.hub: ClientHub | None = None
        self.federation: FederationParams | None = None
        self._welcome: Welcome | None = None
        self._server: Server | None = None
        self._metrics_server: MetricsServer | None = None
        self._round: _RelayRound | None = None
        self._upstream: Connection | None = None
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self.rounds_forwarded = 0
        """Sums the upstream accepted."""

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Stop: close the upstream connection and the clients' (they reconnect later)."""
        self._stop.set()
        if self._upstream is not None:
            task = asyncio.ensure_future(self._upstream.close(reason="relay stopping"))
            task.add_done_callback(lambda t: t.exception())

    async def run(self) -> None:
        """Serve until the upstream says the federation is complete (or `request_stop`)."""
        c = self.config
        check_listening(c)
        host, port = c.upstream_address
        complete = False
        try:
            complete = await serve_reconnecting(
                peer=f"the upstream {c.upstream}",
                who="relay",
                dial=lambda: connect(
                    host,
                    port,
                    self._client_ssl,
                    server_hostname=c.server_hostname or host,
                    config=TransportConfig(
                        idle_timeout=c.idle_timeout,
                        heartbeat_interval=c.heartbeat_interval,
                        write_timeout=60.0,
                    ),
                ),
                session=self._session,
                backoff=Backoff(c.backoff_base, c.backoff_max),
                reconnect_attempts=c.reconnect_attempts,
                sleep=self._sleep,
                stopping=self._stop.is_set,
            )
        finally:
            await self._shutdown(
                FEDERATION_COMPLETE if complete else "relay stopping; reconnect later"
            )

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _shutdown(self, farewell: str) -> None:
        current = self._round
        if current is not None:
            # no RoundEnd to the clients: they keep their update and re-send it to
            # whichever relay they reach next, if the round is still open upstream
            current.aborted = True
            current.settle(False)
            if current.collect_task is not None:
                current.collect_task.cancel()
        if self.hub is not None:
            await self.hub.close_all(farewell)
        if self._server is not None:
            await self._server.shutdown(5.0)
        if self.hub is not None:
            self.hub.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log.info("relay stopped after forwarding %d sums", self.rounds_forwarded)

    def _health(self) -> tuple[bool, dict[str, Any]]:
        hub = self.hub
        return (
            not self._stop.is_set(),
            {
                "role": "relay",
                "upstream_connected": self._upstream is not None,
                "connected_clients": 0 if hub is None else hub.leaf_count,
                "round": None if self._round is None else self._round.round_id,
                "rounds_forwarded": self.rounds_forwarded,
            },
        )

    # ------------------------------------------------------------------ the upstream
    async def _session(self, conn: Connection) -> None:
        await conn.send(Hello(version=PROTOCOL_VERSION, relay=self.config.instance_name))
        welcome = await conn.receive()
        if not isinstance(welcome, Welcome):
            raise ProtocolError(f"expected Welcome, got {type(welcome).__name__}")
        await self._adopt(welcome)
        hub = self.hub
        assert hub is not None
        self._upstream = conn
        log.info("joined upstream %s as %s", self.config.upstream, welcome.client_id)
        send_lock = asyncio.Lock()
        grant: asyncio.Future[UploadGrant] | None = None
        tasks: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> asyncio.Task[None]:
            task = asyncio.create_task(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            return task

        spawn(self._report_clients(conn, send_lock, hub))
        try:
            while True:
                message = await conn.receive()
                if isinstance(message, RoundStart):
                    grant = asyncio.get_running_loop().create_future()
                    relay_round = self._on_round_start(message)
                    if relay_round is not None:
                        spawn(self._forward(conn, send_lock, relay_round, grant))
                elif isinstance(message, UploadGrant):
                    if grant is not None and not grant.done():
                        grant.set_result(message)
                elif isinstance(message, RoundEnd):
                    current = self._round
                    if current is not None and current.round_id == message.round_id:
                        if not current.outcome.done():
                            log.info(
                                "round %d ended upstream: %s", message.round_id, message.reason
                            )
                        self._abort_round(current)
                elif isinstance(message, Ack) and message.accepted:
                    self.rounds_forwarded += 1
                    log.info("round %d: the upstream accepted our sum", message.round_id)
        finally:
            self._upstream = None
            for task in list(tasks):
                task.cancel()

    async def _adopt(self, welcome: Welcome) -> None:
        """Take the upstream's federation (first Welcome) or check it did not change."""
        if self._welcome is not None:
            if (welcome.federation, welcome.session_config) != (
                self._welcome.federation,
                self._welcome.session_config,
            ):
                raise FedcoreError(
                    "the upstream now offers another federation or model; restart the relay"
                )
            return
        try:
            offered = FederationParams.from_bytes(welcome.federation)
            session = SessionInfo.from_wire(welcome.session_config)
        except ValueError as exc:
            raise FederationMismatch(f"the upstream's Welcome is malformed: {exc}") from None
        if self._pinned is not None:
            self._pinned.require_same(offered, source="the relay's pinned federation file")
        codec = codec_for(offered, session)
        if not isinstance(codec, EncryptedCodec):
            raise FedcoreError("relays serve encrypted federations only; this one is plaintext")
        c = self.config
        self.federation = offered
        self._welcome = welcome
        self.hub = ClientHub(
            gate=Gatekeeper(
                ca=c.ca,
                allowed_clients=c.allowed_clients,
                federation=offered,
                session=session,
                item_count=codec.item_count,
                metrics=self.metrics,
                accept_key_holders=False,
            ),
            codec=codec,
            metrics=self.metrics,
            max_inflight=c.max_inflight_uploads,
            resume_grace=c.resume_grace,
            fold_workers=c.fold_workers,
            committee_timeout=c.idle_timeout,
            round_start=self._client_round_start,
            late_joiners=c.clients_per_round is None,
            upload_pace=c.upload_pace,
        )
        self.hub.open()
        self._server = Server(
            self.hub.handle_connection,
            self._server_ssl,
            TransportConfig(
                handshake_timeout=c.handshake_timeout,
                idle_timeout=c.idle_timeout,
                heartbeat_interval=c.heartbeat_interval,
                max_connections=c.max_connections,
                max_connections_per_peer=c.max_connections_per_client,
                write_timeout=60.0,
                receive_buffer=c.receive_buffer or None,
            ),
            on_refusal=self.metrics.count_refusal,
        )
        await self._server.start(c.host, c.port)
        self._serve_metrics(c.metrics_host, c.metrics_port)
        log.info(
            "relay listening on %s:%d for federation %s (%d ciphertexts an update, "
            "up to %d clients a round), forwarding to %s",
            c.host,
            self._server.port,
            offered.digest().hex()[:16],
            codec.item_count,
            offered.max_contributors,
            c.upstream,
        )
        self._started.set()

    async def _report_clients(
        self, conn: Connection, send_lock: asyncio.Lock, hub: ClientHub
    ) -> None:
        """Tell the upstream how many clients this relay serves, whenever that changes."""
        reported = -1
        with contextlib.suppress(ProtocolError, OSError, ConnectionError):
            while True:
                count = hub.leaf_count
                if count != reported:
                    async with send_lock:
                        await conn.send(RelayStatus(clients=count))
                    reported = count
                hub.clients_changed.clear()
                await hub.clients_changed.wait()
                await asyncio.sleep(STATUS_COALESCE_S)

    # ------------------------------------------------------------------ one round
    def _on_round_start(self, start: RoundStart) -> _RelayRound | None:
        """Begin serving an upstream round (or keep serving it after a reconnect)."""
        current = self._round
        if current is not None and current.round_id == start.round_id and not current.aborted:
            return current  # a reconnect mid-round: go on collecting, or re-forward the sum
        if current is not None:
            self._abort_round(current)
        hub, federation = self.hub, self.federation
        assert hub is not None and federation is not None
        try:
            unmasker_keys = tuple(
                CommitteeCredential.from_wire(c).mask_public for c in start.committee
            )
        except CredentialError as exc:
            log.warning(
                "round %d: the upstream's unmasker credentials are malformed: %s",
                start.round_id,
                exc,
            )
            return None
        c = self.config
        now = time.monotonic()
        margin = max(MIN_FORWARD_MARGIN_S, c.forward_margin * start.deadline_s)
        direct = hub.direct_clients()
        wanted = min(c.clients_per_round or len(direct), federation.max_contributors)
        selected = hub.busy_relays() + select_clients(
            direct, wanted, seed=c.seed, round_id=start.round_id
        )
        state = RoundState(
            round_id=start.round_id,
            selected=frozenset(selected),
            deadline=now + max(0.5, start.deadline_s - margin),
            model_digest=model_digest(start.weights),
            unmasker_keys=unmasker_keys,
            capacity=federation.max_contributors,
            # a relay (re)started mid-round waits for its clients to come back
            until_deadline=not selected,
        )
        relay_round = _RelayRound(start=start, state=state)
        self._round = relay_round
        hub.begin(state)
        self.metrics.current_round.set(start.round_id)
        log.info(
            "round %d: asking %d of %d sources", start.round_id, len(selected), len(hub.clients)
        )
        relay_round.collect_task = asyncio.create_task(self._collect(relay_round))
        return relay_round

    def _client_round_start(self, state: RoundState, held: int) -> RoundStart:
        relay_round = self._round
        assert relay_round is not None and relay_round.state is state
        start = relay_round.start
        return RoundStart(
            round_id=start.round_id,
            weights=start.weights,
            clip=start.clip,
            value_bits=start.value_bits,
            deadline_s=max(0.0, state.deadline - time.monotonic()),
            chunks_received=held,
            config=start.config,
            committee=start.committee,
        )

    async def _collect(self, relay_round: _RelayRound) -> None:
        """Collect and fold this relay's clients, then make the sum ready to forward."""
        hub, state = self.hub, relay_round.state
        assert hub is not None and hub.folder is not None
        t0 = time.monotonic()
        await hub.collect(state, state.deadline - t0, RoundPhase.FORWARDING)
        if relay_round.aborted:
            return
        if not state.folded:
            log.warning("round %d: no client of this relay contributed", state.round_id)
            relay_round.settle(False)
            return
        tokens = [state.folded[cid] for cid in sorted(state.folded)]
        contributors = pack_tokens(tokens)
        if len(contributors) > DEFAULT_MAX_FRAME_SIZE - _DONE_OVERHEAD:
            log.error(
                "round %d: the tokens of %d clients (%d bytes) do not fit one frame upstream; "
                "lower this relay's clients_per_round",
                state.round_id,
                len(tokens),
                len(contributors),
            )
            relay_round.settle(False)
            return
        summed = await hub.folder.result()
        codec = hub.codec
        assert isinstance(codec, EncryptedCodec)
        width = codec.public_key.ciphertext_bytes * codec.chunk_items
        relay_round.payloads = [summed[i : i + width] for i in range(0, len(summed), width)]
        relay_round.item_count = codec.item_count
        relay_round.digest = hashlib.sha256(summed).digest()
        relay_round.contributors = contributors
        relay_round.timings = _mean_timings(hub, state)
        relay_round.settle(True)
        log.info(
            "round %d: folded %d clients in %.2f s; forwarding the sum",
            state.round_id,
            len(state.folded),
            time.monotonic() - t0,
        )

    def _abort_round(self, relay_round: _RelayRound) -> None:
        """Stop serving a round: its collection ends now and nothing of it is forwarded."""
        relay_round.aborted = True
        relay_round.settle(False)
        if self.hub is not None and relay_round.state.phase is RoundPhase.COLLECTING:
            self.hub.round_full.set()  # hub.collect closes it and tells pending clients

    async def _forward(
        self,
        conn: Connection,
        send_lock: asyncio.Lock,
        relay_round: _RelayRound,
        grant: asyncio.Future[UploadGrant],
    ) -> None:
        """Upload the round's sum upstream once it is ready, from where the upstream is."""
        with contextlib.suppress(ProtocolError, OSError, ConnectionError):
            ready = await asyncio.shield(relay_round.outcome)
            if not ready or relay_round.aborted or self._round is not relay_round:
                return
            round_id = relay_round.round_id
            async with send_lock:
                await conn.send(
                    UploadRequest(round_id=round_id, resume_token=relay_round.resume_token)
                )
            granted = await grant
            if granted.start_seq > len(relay_round.payloads):
                raise ProtocolError("the upstream claims more chunks than the sum has")
            relay_round.resume_token = granted.resume_token
            for seq in range(granted.start_seq, len(relay_round.payloads)):
                async with send_lock:
                    await conn.send(
                        UpdateChunk(round_id=round_id, seq=seq, payload=relay_round.payloads[seq])
                    )
            async with send_lock:
                await conn.send(
                    UpdateDone(
                        round_id=round_id,
                        chunk_count=len(relay_round.payloads),
                        item_count=relay_round.item_count,
                        digest=relay_round.digest,
                        timings=relay_round.timings,
                        contributors=relay_round.contributors,
                    )
                )


def _mean_timings(hub: ClientHub, state: RoundState) -> dict[str, float]:
    """Mean client-reported seconds per phase over this relay's sources (passed upstream)."""
    collected: dict[str, list[float]] = {}
    for source in state.sources:
        report = hub.reports.get(source)
        for name, seconds in (report.timings if report is not None else {}).items():
            collected.setdefault(name, []).append(seconds)
    return {name: float(np.mean(values)) for name, values in collected.items()}
