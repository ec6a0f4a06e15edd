"""The upload gate: grants, chunk intake and complete updates, with a cap on memory.

At most ``max_inflight_uploads`` clients hold an upload slot; a client streams nothing
before its `UploadGrant`, so a waiting client costs an idle connection, not a buffered
update. A slot is held only while its upload keeps the minimum pace (`UploadPace`): a
grant that falls behind expires, its partial upload is dropped at once and the slot goes
to the next client, so clients that take a grant and send nothing cannot starve a round.
A client that drops mid-upload keeps its partial upload (and slot) for ``resume_grace``
seconds, and resumes where it stopped if its new request shows the grant's resume
token; a request without it starts the upload over (another connection with the same
certificate cannot take over, or mix into, a partial upload). The gate hands complete,
checked updates to the round runner; it never folds or decrypts.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from fedcore.aggregator.registry import ClientHandle
from fedcore.aggregator.rounds import RejectedUpdate, RoundState, Upload, UploadPace
from fedcore.codec import EncryptedCodec, UpdateCodec
from fedcore.contracts import RejectReason
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ProtocolError
from protocol.messages import UpdateChunk, UpdateDone, UploadGrant, UploadRequest

__all__ = ["RESUME_TOKEN_BYTES", "StallHandler", "UploadGate"]

log = logging.getLogger(__name__)

RESUME_TOKEN_BYTES = 16
"""Random bytes in each upload's resume token (the wire allows up to 64)."""

StallHandler = Callable[[str, int, str], None]
"""Told (client id, round id, why) when a grant expires, after its slot was freed."""


class UploadGate:
    """Partial uploads by client, and the slots that bound how many exist at once."""

    def __init__(
        self,
        *,
        codec: UpdateCodec,
        max_inflight: int,
        resume_grace: float,
        metrics: AggregatorMetrics,
        round_for: Callable[[int], RoundState],
        clients: Mapping[str, ClientHandle],
        tasks: set[asyncio.Task[Any]],
        pace: UploadPace | None = None,
        on_stalled: StallHandler | None = None,
    ) -> None:
        self.codec = codec
        self.resume_grace = resume_grace
        self.metrics = metrics
        self.pace = UploadPace() if pace is None else pace
        self._round_for = round_for
        self._clients = clients
        self._tasks = tasks
        self._on_stalled = on_stalled
        self.uploads: dict[str, Upload] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._holding: set[str] = set()
        self._watchdogs: dict[str, asyncio.TimerHandle] = {}
        item_bytes = codec.public_key.ciphertext_bytes if isinstance(codec, EncryptedCodec) else 4
        self.chunk_bytes = codec.chunk_items * item_bytes
        """The largest chunk's payload bytes (what one chunk in flight may bring)."""
        self.update_bytes = codec.item_count * item_bytes
        """A complete update's payload bytes."""

    def held_chunks(self, client_id: str, round_id: int) -> int:
        """Chunks of ``round_id`` already received from this client (to resume from)."""
        upload = self.uploads.get(client_id)
        return len(upload.chunks) if upload is not None and upload.round_id == round_id else 0

    async def grant(self, handle: ClientHandle, request: UploadRequest) -> None:
        """Grant an upload slot, waiting for one when ``max_inflight_uploads`` are taken.

        Waiting here stops reading this connection, and the client sends nothing until
        the grant: a waiting client costs an idle connection, not a buffered update.
        A partial upload kept from before a reconnect still holds its slot and resumes,
        if the request shows its resume token; otherwise it is dropped and the client
        starts over from chunk 0 (and waits for a slot behind those already waiting).
        """
        cid = handle.client_id
        self._round_for(request.round_id).check_can_upload(cid)
        upload = self.uploads.get(cid)
        if upload is not None and upload.round_id != request.round_id:
            self.drop(cid)
            upload = None
        if upload is not None and not hmac.compare_digest(
            request.resume_token, upload.resume_token
        ):
            log.info(
                "%s asked to upload without its resume token: its %d chunks held are "
                "dropped and it starts over (a restarted client, or another connection "
                "with its certificate)",
                cid,
                len(upload.chunks),
            )
            self.drop(cid)
            upload = None
        if upload is None:
            await self._slots.acquire()
            if self._clients.get(cid) is not handle or cid in self._holding:
                # replaced by a newer connection while we waited: that one owns the upload
                self._slots.release()
                return
            self._holding.add(cid)
            self.metrics.inflight_uploads.set(len(self._holding))
            # the round may have closed while we waited (then the slot is released)
            self._round_for(request.round_id).check_can_upload(cid)
            upload = Upload(
                client_id=cid,
                round_id=request.round_id,
                expected_items=self.codec.item_count,
                chunk_items=self.codec.chunk_items,
                resume_token=secrets.token_bytes(RESUME_TOKEN_BYTES),
            )
            self.uploads[cid] = upload
            self._watch(upload)
        grant = UploadGrant(
            round_id=request.round_id,
            start_seq=len(upload.chunks),
            resume_token=upload.resume_token,
        )
        async with handle.send_lock:
            # A closing round sends its RoundEnd under this lock, after closing: checked
            # here, a grant never follows the RoundEnd (the client's session refuses that).
            self._round_for(request.round_id)
            try:
                await handle.conn.send(grant)
            except (ProtocolError, OSError, ConnectionError) as exc:
                log.info("could not grant %s its upload: %s", cid, exc)

    def add_chunk(self, handle: ClientHandle, chunk: UpdateChunk) -> None:
        """Range-check one chunk and append it to the client's granted upload."""
        cid = handle.client_id
        self._round_for(chunk.round_id).check_can_upload(cid)
        upload = self.uploads.get(cid)
        if upload is None or upload.round_id != chunk.round_id:
            # the session admits chunks only after our grant, which created the upload
            raise RejectedUpdate(
                RejectReason.WRONG_CHUNK_COUNT, f"chunk {chunk.seq} without a granted upload"
            )
        items, count = self.codec.parse_chunk(chunk.payload, index_offset=upload.items)
        upload.add_chunk(chunk.seq, chunk.payload, items, count)

    def finish(self, handle: ClientHandle, done: UpdateDone) -> tuple[Upload, list[Any]]:
        """The client's upload and its chunks in order, checked against its UpdateDone."""
        upload = self.uploads.get(handle.client_id)
        if upload is None or upload.round_id != done.round_id:
            raise RejectedUpdate(
                RejectReason.WRONG_CHUNK_COUNT,
                f"UpdateDone for round {done.round_id} without its chunks",
            )
        chunks = upload.finish(
            chunk_count=done.chunk_count, item_count=done.item_count, digest=done.digest
        )
        self._unwatch(handle.client_id)  # complete: checking and folding are our time
        return upload, chunks

    def deadline(self, upload: Upload) -> float:
        """When ``upload`` stalls (time.monotonic) unless more of it arrives."""
        return self.pace.deadline(
            granted_at=upload.granted_at,
            received=upload.bytes_received,
            chunk_bytes=self.chunk_bytes,
            update_bytes=self.update_bytes,
        )

    def _watch(self, upload: Upload) -> None:
        """Check ``upload``'s pace at its deadline (again later if it moved on by then)."""
        delay = max(0.0, self.deadline(upload) - time.monotonic())
        loop = asyncio.get_running_loop()
        self._watchdogs[upload.client_id] = loop.call_later(delay, self._check_pace, upload)

    def _unwatch(self, client_id: str) -> None:
        watchdog = self._watchdogs.pop(client_id, None)
        if watchdog is not None:
            watchdog.cancel()

    def _check_pace(self, upload: Upload) -> None:
        cid = upload.client_id
        if self.uploads.get(cid) is not upload:
            return
        self._watchdogs.pop(cid, None)
        if time.monotonic() < self.deadline(upload):
            self._watch(upload)  # chunks arrived since: the deadline moved
            return
        elapsed = time.monotonic() - upload.granted_at
        why = (
            f"granted upload of round {upload.round_id} stalled: {upload.bytes_received:,} "
            f"of {self.update_bytes:,} bytes in {elapsed:.1f} s, below the minimum pace "
            f"({self.pace.start_timeout:g} s to start, then {self.pace.min_rate:,.0f} B/s); "
            "its slot goes to another client and it may upload again next round"
        )
        self.drop(cid)  # the slot is free before anyone is told
        if self._on_stalled is not None:
            self._on_stalled(cid, upload.round_id, why)

    def drop(self, client_id: str) -> None:
        """Forget a client's upload and give its slot back."""
        self.uploads.pop(client_id, None)
        self._unwatch(client_id)
        if client_id in self._holding:
            self._holding.discard(client_id)
            self._slots.release()
        self.metrics.inflight_uploads.set(len(self._holding))

    def drop_all(self) -> None:
        """Forget every upload (the round closed)."""
        for cid in list(self.uploads):
            self.drop(cid)

    def keep_or_drop_partial(self, client_id: str) -> None:
        """A client gone mid-upload: keep its chunks briefly so it can resume, else drop."""
        upload = self.uploads.get(client_id)
        if upload is None:
            return
        if self.resume_grace <= 0 or not upload.chunks:
            self.drop(client_id)
            return

        async def expire() -> None:
            await asyncio.sleep(self.resume_grace)
            if client_id not in self._clients and self.uploads.get(client_id) is upload:
                log.info("%s did not come back: its partial upload is discarded", client_id)
                self.drop(client_id)

        task = asyncio.create_task(expire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
