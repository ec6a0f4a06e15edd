"""The upload gate: grants, chunk intake and complete updates, with a cap on memory.

At most ``max_inflight_uploads`` clients hold an upload slot; a client streams nothing
before its `UploadGrant`, so a waiting client costs an idle connection, not a buffered
update. A client that drops mid-upload keeps its partial upload (and slot) for
``resume_grace`` seconds and resumes where it stopped. The gate hands complete,
checked updates to the round runner; it never folds or decrypts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from fedcore.aggregator.registry import ClientHandle
from fedcore.aggregator.rounds import RejectedUpdate, RoundState, Upload
from fedcore.codec import UpdateCodec
from fedcore.contracts import RejectReason
from fedcore.metrics import AggregatorMetrics
from protocol.errors import ProtocolError
from protocol.messages import UpdateChunk, UpdateDone, UploadGrant, UploadRequest

__all__ = ["UploadGate"]

log = logging.getLogger(__name__)


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
    ) -> None:
        self.codec = codec
        self.resume_grace = resume_grace
        self.metrics = metrics
        self._round_for = round_for
        self._clients = clients
        self._tasks = tasks
        self.uploads: dict[str, Upload] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._holding: set[str] = set()

    def held_chunks(self, client_id: str, round_id: int) -> int:
        """Chunks of ``round_id`` already received from this client (to resume from)."""
        upload = self.uploads.get(client_id)
        return len(upload.chunks) if upload is not None and upload.round_id == round_id else 0

    async def grant(self, handle: ClientHandle, request: UploadRequest) -> None:
        """Grant an upload slot, waiting for one when ``max_inflight_uploads`` are taken.

        Waiting here stops reading this connection, and the client sends nothing until
        the grant: a waiting client costs an idle connection, not a buffered update.
        A partial upload kept from before a reconnect still holds its slot and resumes.
        """
        cid = handle.client_id
        self._round_for(request.round_id).check_can_upload(cid)
        upload = self.uploads.get(cid)
        if upload is not None and upload.round_id != request.round_id:
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
            )
            self.uploads[cid] = upload
        grant = UploadGrant(round_id=request.round_id, start_seq=len(upload.chunks))
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
        return upload, chunks

    def drop(self, client_id: str) -> None:
        """Forget a client's upload and give its slot back."""
        self.uploads.pop(client_id, None)
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
