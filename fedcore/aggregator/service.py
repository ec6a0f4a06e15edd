"""The root aggregator daemon: its lifecycle, the round loop, committee decryption, checkpoints.

It holds the Paillier public key only and never decrypts: sums go to a committee of
key-holding clients in shards, and only when at least ``min_clients`` contributors'
updates were folded (directly or through relays). Connections, uploads and folding are
the `ClientHub`'s; memory is bounded by ``max_inflight_uploads`` buffered updates plus
one running sum, whatever the number of connected clients. All socket work goes
through ``protocol.transport``; all arithmetic through `fedcore.codec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch

from fedcore.aggregator.admission import Gatekeeper
from fedcore.aggregator.checkpoint import Checkpoint, CheckpointError
from fedcore.aggregator.committee import CommitteeDecryption, SumNotDecodable
from fedcore.aggregator.config import AggregatorConfig
from fedcore.aggregator.hub import ROUND_START_CONCURRENCY, ClientHub, Listener
from fedcore.aggregator.preflight import check_daemon, check_listening
from fedcore.aggregator.registry import ClientHandle
from fedcore.aggregator.rounds import (
    RoundPhase,
    RoundReport,
    RoundState,
    pick_unmaskers,
    select_clients,
)
from fedcore.aggregator.uploads import UploadGate
from fedcore.client.config import FEDERATION_COMPLETE
from fedcore.client.pipeline import model_digest
from fedcore.codec import PLAINTEXT_CHUNK_FLOATS, EncryptedCodec, PlaintextCodec, codec_for
from fedcore.contracts import RoundPlan, SessionInfo
from fedcore.crypto import PublicKey
from fedcore.dashboard import Dashboard
from fedcore.errors import ConfigError, PackingError, RoundError
from fedcore.metrics import AggregatorMetrics, MetricsServer
from fedcore.model import ModelLayout, flatten_state_dict
from fedcore.packing import ContributionSum
from protocol.messages import RoundStart
from protocol.tls import server_context
from protocol.transport import Server, TransportConfig

__all__ = ["ROUND_START_CONCURRENCY", "Aggregator", "RoundReport", "build_model"]

log = logging.getLogger(__name__)

# After `request_stop`: how long a round deep in a step (the committee decrypting) may
# still finish before it is abandoned, and how long goodbyes may take before the
# remaining connections are dropped. Together they bound a stop to about two seconds.
STOP_GRACE_SECONDS = 1.0
STOP_CLOSE_SECONDS = 0.5
# After a checkpoint save fails (full or read-only disk): wait this long before the next
# round attempt, at most round_timeout.
CHECKPOINT_RETRY_SECONDS = 10.0


def build_model(
    spec: str, kwargs: dict[str, Any] | None = None, *, seed: int = 0
) -> torch.nn.Module:
    """Import ``module:factory`` and call it (seeded, so every party builds the same init)."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `--model mymodels:tiny` finds ./mymodels.py
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"model {spec!r}: cannot import {attr!r} from {module_name!r} ({exc}); the "
            "module must be importable from the current directory or installed"
        ) from None
    torch.manual_seed(seed)
    try:
        model = factory(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(
            f"model {spec!r} refused model_kwargs {kwargs or {}}: {exc}; fix --model-kwargs"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model factory {spec!r} returned {type(model).__name__}, not a Module")
    return model


class Aggregator(Listener):
    """Runs a federation: `await Aggregator(config).run()`; `request_stop()` ends it cleanly."""

    def __init__(
        self,
        config: AggregatorConfig,
        *,
        encrypted: bool = True,
        metrics: AggregatorMetrics | None = None,
        on_round_complete: Callable[[RoundReport, np.ndarray], Awaitable[None] | None]
        | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or AggregatorMetrics()
        self._on_round_complete = on_round_complete
        model = build_model(config.model, config.model_kwargs, seed=config.seed)
        state = model.state_dict()
        self.layout = ModelLayout.of(state)
        # Only ever the public key: the aggregator must not be able to decrypt.
        self.federation = config.federation(config.load_public_key() if encrypted else None)
        self.public_key: PublicKey | None = self.federation.public_key
        self.session_info = SessionInfo(
            num_values=self.layout.numel,
            chunk_items=config.chunk_ciphertexts if encrypted else PLAINTEXT_CHUNK_FLOATS,
            model_layout=self.layout.to_json(),
            rounds=config.rounds,
        )
        self.codec = codec_for(self.federation, self.session_info)
        self.fingerprint = f"{self.layout.to_json()}|encrypted={encrypted}"
        Checkpoint.probe(config.state_dir)  # preflight: unwritable now, not at the first save
        checkpoint = Checkpoint.load(config.state_dir)
        check_daemon(config.cert, config.key, config.ca, purpose="server")
        if checkpoint is not None and checkpoint.model_fingerprint != self.fingerprint:
            raise ConfigError(
                f"state dir {config.state_dir} holds a checkpoint of another model or mode; "
                "use a fresh --state-dir"
            )
        if checkpoint is None:
            checkpoint = Checkpoint(
                global_weights=flatten_state_dict(state), model_fingerprint=self.fingerprint
            )
            log.info("no checkpoint in %s: starting from the seeded model", config.state_dir)
        else:
            log.info(
                "resuming from checkpoint: %d rounds completed, next round id %d",
                checkpoint.rounds_completed,
                checkpoint.next_round_id,
            )
            self.metrics.restore(checkpoint.metrics)
        self.checkpoint = checkpoint
        self.hub = ClientHub(
            gate=Gatekeeper(
                ca=config.ca,
                allowed_clients=config.allowed_clients,
                federation=self.federation,
                session=self.session_info,
                item_count=self.codec.item_count,
                metrics=self.metrics,
                excluded_decryptors=checkpoint.excluded_decryptors,
            ),
            codec=self.codec,
            metrics=self.metrics,
            max_inflight=config.max_inflight_uploads,
            resume_grace=config.resume_grace,
            fold_workers=config.fold_workers,
            committee_timeout=config.decrypt_shard_timeout,
            round_start=self._round_start_message,
            upload_pace=config.upload_pace,
        )
        self._committee: CommitteeDecryption | None = None
        if isinstance(self.codec, EncryptedCodec):
            self._committee = CommitteeDecryption(
                config=config,
                federation=self.federation,
                codec=self.codec,
                metrics=self.metrics,
                clients=self.hub.clients,
                excluded=checkpoint.excluded_decryptors,
            )
        self._stop = asyncio.Event()
        self._server: Server | None = None
        self._metrics_server: MetricsServer | None = None
        self.dashboard = Dashboard(
            self.metrics,
            rounds_planned=config.rounds,
            min_clients=config.min_clients,
            encrypted=encrypted,
        )
        self._started = asyncio.Event()
        self._weights_blob = b""  # this round's global model, encoded once for everyone
        self._round_committee: tuple[bytes, ...] = ()  # the unmaskers' credentials

    @property
    def clients(self) -> dict[str, ClientHandle]:
        """Connected clients and relays, by certificate identity."""
        return self.hub.clients

    @property
    def round(self) -> RoundState | None:
        """The round in progress, if any."""
        return self.hub.round

    @property
    def uploads(self) -> UploadGate:
        """The upload gate (partial uploads and their slots)."""
        return self.hub.uploads

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Stop within about two seconds: a round that cannot finish within
        `STOP_GRACE_SECONDS` is abandoned, never half-counted (call it in the loop's thread)."""
        self._stop.set()
        self.hub.round_full.set()
        self.hub.clients_changed.set()

    def _transport_config(self) -> TransportConfig:
        c = self.config
        return TransportConfig(
            handshake_timeout=c.handshake_timeout,
            idle_timeout=c.idle_timeout,
            heartbeat_interval=c.heartbeat_interval,
            max_connections=c.max_connections,
            max_connections_per_peer=c.max_connections_per_client,
            write_timeout=max(60.0, c.round_timeout),
            receive_buffer=c.receive_buffer or None,
        )

    async def run(self) -> Checkpoint:
        """Serve until every round is done (or `request_stop`); return the final checkpoint."""
        c = self.config
        check_listening(c)
        ssl_ctx = server_context(c.cert, c.key, c.ca)
        self.hub.open()
        self._server = Server(
            self.hub.handle_connection,
            ssl_ctx,
            self._transport_config(),
            on_refusal=self.metrics.count_refusal,
        )
        await self._server.start(c.host, c.port)
        self._serve_metrics(c.metrics_host, c.metrics_port)
        log.info(
            "aggregator listening on %s:%d (%s, %d values, metrics port %s)",
            c.host,
            self.port,
            "encrypted" if self.codec.encrypted else "PLAINTEXT",
            self.codec.n_values,
            self.metrics_port,
        )
        log.info(
            "federation %s: quorum %d, %d value bits, %d headroom bits, up to %d clients a round",
            self.federation.digest().hex()[:16],
            self.federation.min_clients,
            self.federation.value_bits,
            self.federation.headroom_bits,
            self.federation.max_contributors,
        )
        self._started.set()
        try:
            await self._rounds_until_stopped()
        finally:
            await self._shutdown()
        return self.checkpoint

    async def _rounds_until_stopped(self) -> None:
        """The round loop; once `request_stop` is called, left within `STOP_GRACE_SECONDS`.

        The loop leaves by itself at its next step, but a round may be deep in one (the
        committee decrypting takes seconds): past the grace it is cancelled where it
        is. That is safe at any await: the global model, the round counter and the
        history change only together with a checkpoint save, in code without an await,
        so the last checkpoint stays the state to resume from.
        """
        rounds = asyncio.create_task(self._round_loop())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({rounds, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not rounds.done():
                await asyncio.wait({rounds}, timeout=STOP_GRACE_SECONDS)
            if not rounds.done():
                live = self.round
                rounds.cancel()
                await asyncio.wait({rounds})
                if live is not None:
                    self._abandon(live)
        finally:
            stopping.cancel()
            if not rounds.done():  # this task itself was cancelled: so is the loop
                rounds.cancel()
                await asyncio.wait({rounds})
        if not rounds.cancelled():
            rounds.result()  # the loop's own error (RoundError ...), if any

    def _abandon(self, state: RoundState) -> None:
        """Drop a round cut short by a stop; `_shutdown` saves its record.

        The record names the round's unmaskers: its contributors masked their update
        of this model version for them only, so the rerun after a restart waits for
        them (`_previous_unmaskers`) instead of picking others and being refused.
        """
        self.hub.round = None
        log.info("round %d abandoned: stopping (nothing of it is counted)", state.round_id)
        self.checkpoint.history.append(
            {**state.summary(), "failure": "abandoned: the aggregator stopped"}
        )

    def _health(self) -> tuple[bool, dict[str, Any]]:
        return (
            not self._stop.is_set(),
            {
                "rounds_completed": self.checkpoint.rounds_completed,
                "connected_clients": self.hub.leaf_count,
                "relays": len(self.clients) - len(self.hub.direct_clients()),
                "round": None if self.round is None else self.round.round_id,
            },
        )

    def _serve_metrics(self, host: str, port: int | None) -> None:
        """Start /metrics, /healthz and the dashboard (/ and /status.json) on ``host:port``."""
        if port is not None:
            self._metrics_server = MetricsServer(
                self.metrics, host=host, port=port, health=self._health, status=self._status
            )
            self._metrics_server.start()

    def _status(self) -> dict[str, Any]:
        live = self.round  # read once: this runs in the server's thread, beside the loop
        return self.dashboard.status(
            rounds_completed=self.checkpoint.rounds_completed,
            round_id=None if live is None else live.round_id,
            round_phase=None if live is None else live.phase.value,
            stopping=self._stop.is_set(),
        ).to_json()

    async def _shutdown(self) -> None:
        # Safe at any instant: the global model only changes together with a save (a
        # failed save is logged; the checkpoint before it stays whole).
        self._save_checkpoint("at shutdown")
        done = self.checkpoint.rounds_completed >= self.config.rounds
        reason = FEDERATION_COMPLETE if done else "aggregator stopping; reconnect later"
        # Stopping on request, goodbyes get a moment and the rest are dropped: a client
        # that misses its Bye reconnects later all the same.
        hurry = self._stop.is_set() and not done
        try:
            await asyncio.wait_for(
                self.hub.close_all(reason), STOP_CLOSE_SECONDS if hurry else None
            )
        except TimeoutError:
            log.info("stopping: dropping the connections that did not close in time")
        if self._server is not None:
            await self._server.shutdown(STOP_CLOSE_SECONDS if hurry else 5.0)
        self.hub.close()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        log.info("aggregator stopped after %d rounds", self.checkpoint.rounds_completed)

    # ------------------------------------------------------------------ round loop
    async def _round_loop(self) -> None:
        c = self.config
        failures = 0
        while self.checkpoint.rounds_completed < c.rounds and not self._stop.is_set():
            if not await self._wait_for_clients():
                if self._stop.is_set():
                    return
                connected = self.hub.leaf_count
                raise RoundError(
                    f"no round could start within wait_for_clients_timeout "
                    f"({c.wait_for_clients_timeout:.0f} s): {connected} clients connected, "
                    f"{c.target_clients(connected)} wanted (clients_per_round/"
                    f"clients_fraction, at least min_clients {c.min_clients}), "
                    f"{sum(h.can_decrypt for h in self.clients.values())} proven key holders"
                )
            started = time.monotonic()
            completed = await self._run_one_round()
            if self._stop.is_set():
                return
            if c.round_interval and self.checkpoint.rounds_completed < c.rounds:
                # paced: the clients' idle time, e.g. to refill their encryption pools
                await self._pause(started + c.round_interval - time.monotonic())
            if completed:
                failures = 0
            else:
                failures += 1
                if failures >= c.max_failed_rounds:
                    raise RoundError(f"{failures} rounds in a row failed; giving up")

    def _global_weights(self) -> tuple[bytes, bytes]:
        """The global model as sent in RoundStart (float32 bytes) and its model digest."""
        blob = self.checkpoint.global_weights.astype(np.float32).tobytes()
        return blob, model_digest(blob)

    def _previous_unmaskers(self, digest: bytes) -> tuple[str, ...]:
        """The unmaskers of the last round of model version ``digest``, if it ran before.

        Its contributors masked their (only) update for those members and refuse to mask
        it for others, so a rerun should wait a little for them rather than move on.
        """
        for record in reversed(self.checkpoint.history):
            if record.get("model") == digest.hex():
                return tuple(record.get("unmaskers", ()))
            if record.get("phase") == RoundPhase.COMPLETED.value:
                break
        return ()

    def _enough_key_holders(self) -> bool:
        """Enough committee members for the unmaskers and, in threshold mode, T shares."""
        holders = [h for h in self.clients.values() if h.can_decrypt]
        key = self.federation.threshold_key
        shares = {h.share_index for h in holders if not h.decrypt_excluded}
        if key is not None and len(shares) < key.threshold:
            return False
        return len(holders) >= self.federation.unmaskers

    async def _wait_for_clients(self) -> bool:
        c = self.config
        started = time.monotonic()
        deadline = started + c.wait_for_clients_timeout
        wanted = self._previous_unmaskers(self._global_weights()[1]) if self.codec.encrypted else ()
        while not self._stop.is_set():
            connected = self.hub.leaf_count
            enough_holders = not self.codec.encrypted or self._enough_key_holders()
            # back, and proven again: an unproven member is not picked to unmask
            back = all(
                (handle := self.clients.get(cid)) is not None and handle.can_decrypt
                for cid in wanted
            )
            if (
                connected >= c.target_clients(connected)
                and connected >= c.min_clients
                and enough_holders
                and (back or time.monotonic() >= started + c.unmasker_grace)
            ):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.hub.clients_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hub.clients_changed.wait(), min(remaining, 1.0))
        return False

    async def _run_one_round(self) -> bool:
        c = self.config
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        round_id = self.checkpoint.next_round_id
        # Persist the id first: after a crash this round reruns under a new id, so no
        # chunk of the interrupted attempt can ever be folded into its rerun.
        self.checkpoint.next_round_id += 1
        if not self._save_checkpoint(f"before round {round_id}"):
            # without the new id on disk this round must not run; wait, then try again
            await self._pause(min(c.round_timeout, CHECKPOINT_RETRY_SECONDS))
            return False
        # Relays with clients are always asked (each selects among its own clients);
        # the selection rule applies to the clients connected here.
        candidates = self.hub.direct_clients()
        relays = self.hub.busy_relays()
        selected = relays + select_clients(
            candidates, c.target_clients(len(candidates)), seed=c.seed, round_id=round_id
        )
        self._weights_blob, digest = self._global_weights()
        unmaskers: list[str] = []
        if self.codec.encrypted:
            holders = {cid: h.mask_public for cid, h in self.clients.items() if h.can_decrypt}
            previous = self._previous_unmaskers(digest)
            if previous and all(cid in holders for cid in previous):
                unmaskers = list(previous)  # a rerun: the members its updates are masked for
            else:
                unmaskers = pick_unmaskers(holders, self.federation.unmaskers, digest)
        self._round_committee = tuple(self.clients[cid].credential for cid in unmaskers)
        unmasker_keys = tuple(self.clients[cid].mask_public for cid in unmaskers)
        state = RoundState(
            round_id=round_id,
            selected=frozenset(selected),
            deadline=t0 + c.round_timeout,
            model_digest=digest,
            unmaskers=tuple(unmaskers),
            unmasker_keys=unmasker_keys,
            capacity=self.federation.max_contributors,
        )
        self.hub.begin(state)
        self.metrics.current_round.set(round_id)
        phases["select"] = time.monotonic() - t0
        log.info(
            "round %d: selected %d of %d clients%s",
            round_id,
            len(selected) - len(relays),
            len(candidates),
            f" and {len(relays)} relays" if relays else "",
        )

        t_collect = time.monotonic()
        await self.hub.collect(state, c.round_timeout, RoundPhase.DECRYPTING)
        phases["collect"] = time.monotonic() - t_collect
        if self._stop.is_set():
            self._abandon(state)
            return False
        log.info(
            "round %d: collected %d updates from %d/%d sources in %.2f s",
            round_id,
            len(state.folded),
            len(state.sources),
            len(selected),
            phases["collect"],
        )
        if len(state.folded) < c.min_clients:
            return self._fail_round(
                state, "below_quorum", f"{len(state.folded)} updates < min_clients"
            )

        t_decrypt = time.monotonic()
        try:
            result = await self._finish_sum(state)
        except SumNotDecodable as exc:
            return self._fail_round(state, "decode_failed", str(exc))
        except RoundError as exc:
            return self._fail_round(state, "decrypt_failed", str(exc))
        except PackingError as exc:
            return self._fail_round(
                state, "decode_failed", f"the decrypted sum does not decode: {exc}"
            )
        state.total_weight = result.total_weight
        phases["decrypt"] = time.monotonic() - t_decrypt

        t_update = time.monotonic()
        before = (self.checkpoint.global_weights, len(self.checkpoint.history))
        self.checkpoint.global_weights = (
            self.checkpoint.global_weights + result.mean_update
        ).astype(np.float32)
        phases["update"] = time.monotonic() - t_update
        state.phase = RoundPhase.COMPLETED
        self.checkpoint.rounds_completed += 1
        t_ckpt = time.monotonic()
        self.checkpoint.history.append({**state.summary(), "phase_seconds": phases})
        if not self._save_checkpoint(f"after round {round_id}", completing=True):
            # The disk keeps the previous model; so does memory, and this model version
            # runs again (its contributors resend the same update, folded once).
            self.checkpoint.global_weights = before[0]
            self.checkpoint.rounds_completed -= 1
            del self.checkpoint.history[before[1] :]
            self.hub.round = None
            self.metrics.rounds_failed_total.labels(reason="checkpoint_failed").inc()
            await self._pause(min(c.round_timeout, CHECKPOINT_RETRY_SECONDS))
            return False
        self.metrics.rounds_completed_total.inc()
        phases["checkpoint"] = time.monotonic() - t_ckpt
        report = self._round_report(state, phases, result)
        self.dashboard.round_completed(report)
        for phase, seconds in phases.items():
            self.metrics.round_phase_seconds.labels(phase=phase).observe(seconds)
        log.info(
            "round %d complete (%d/%d): %d updates, weight %d, %s",
            round_id,
            self.checkpoint.rounds_completed,
            c.rounds,
            len(state.folded),
            state.total_weight,
            " ".join(f"{k}={v:.2f}s" for k, v in phases.items()),
        )
        self.hub.round = None
        if self._on_round_complete is not None:
            pending = self._on_round_complete(report, self.checkpoint.global_weights)
            if asyncio.iscoroutine(pending):
                await pending
        return True

    def _round_report(
        self, state: RoundState, phases: dict[str, float], result: ContributionSum
    ) -> RoundReport:
        timings: dict[str, list[float]] = {}
        for cid in state.sources:
            report = self.hub.reports.get(cid)
            for k, v in (report.timings if report is not None else {}).items():
                timings.setdefault(k, []).append(v)
        evaluation: dict[str, float] = {}
        if result.report_means is not None:
            names = (name for name, _ in self.federation.report_metrics)
            evaluation = dict(zip(names, result.report_means, strict=True))
        return RoundReport(
            round_id=state.round_id,
            rounds_completed=self.checkpoint.rounds_completed,
            contributors=tuple(sorted(state.folded)),
            total_weight=result.total_weight,
            phase_seconds=dict(phases),
            client_metrics=evaluation,
            client_timings={k: float(np.mean(v)) for k, v in timings.items()},
            bytes_received=self.hub.round_bytes,
            fold_seconds=self.hub.round_fold_s,
            check_seconds={
                "token_check": self.hub.gate.token_check_seconds,
                **{
                    f"member_{kind}": seconds
                    for kind, seconds in (
                        self._committee.member_seconds if self._committee is not None else {}
                    ).items()
                },
            },
            member_decrypt_seconds=dict(
                self._committee.per_member_decrypt if self._committee is not None else {}
            ),
        )

    def _fail_round(self, state: RoundState, label: str, reason: str) -> bool:
        state.phase = RoundPhase.FAILED
        self.hub.round = None
        log.warning("round %d failed: %s", state.round_id, reason)
        self.metrics.rounds_failed_total.labels(reason=label).inc()
        self.checkpoint.history.append({**state.summary(), "failure": reason})
        self._save_checkpoint(f"after round {state.round_id} failed")
        return False

    def _save_checkpoint(self, when: str, *, completing: bool = False) -> bool:
        """Save the checkpoint; on a storage error log one ERROR line and return False.

        Atomic writes leave the previous checkpoint whole, so a full or read-only disk
        loses nothing saved: the daemon keeps serving (metrics, dashboard, connected
        clients) and completes no round until a save succeeds again.
        """
        snapshot = self.metrics.snapshot()
        if completing:  # counted once the round is on disk
            key = "fedcore_rounds_completed_total"
            snapshot[key] = snapshot.get(key, 0.0) + 1
        self.checkpoint.metrics = snapshot
        try:
            self.checkpoint.save(self.config.state_dir)
        except CheckpointError as exc:
            self.metrics.checkpoint_failures_total.inc()
            log.error("checkpoint %s failed: %s", when, exc)
            return False
        return True

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds`` unless a stop is requested first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _round_start_message(self, state: RoundState, held: int) -> RoundStart:
        return RoundStart(
            round_id=state.round_id,
            weights=self._weights_blob,
            clip=self.federation.clip,  # what clients pinned, from the one place it lives
            value_bits=self.federation.value_bits,
            deadline_s=max(0.0, state.deadline - time.monotonic()),
            chunks_received=held,
            config=RoundPlan(
                epochs=self.config.local_epochs,
                learning_rate=self.config.learning_rate,
                seed=self.config.seed * 1_000_003 + state.round_id,
            ).config(),
            committee=self._round_committee,
        )

    # ------------------------------------------------------------------ decryption
    async def _finish_sum(self, state: RoundState) -> ContributionSum:
        if len(state.folded) < self.config.min_clients:  # the clients check this too
            raise RoundError("refusing to decrypt a sum of fewer than min_clients updates")
        if isinstance(self.codec, PlaintextCodec):
            return self.codec.decode(state.running_sum)
        assert self._committee is not None and self.hub.folder is not None
        summed = await self.hub.folder.result()
        plaintexts = await self._committee.decrypt(state, summed)
        return self.codec.decode(plaintexts)
