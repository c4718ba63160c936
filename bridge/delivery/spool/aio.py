"""The asyncio front of the spool: group-committed appends, and every disk access in a worker thread."""

from __future__ import annotations

import asyncio
from collections import deque

from bridge.delivery.spool.store import DEFAULT_READ_MAX_BYTES, Spool, SpoolError


class AsyncSpool:
    """Asyncio front of a ``Spool`` that coalesces concurrent ``append`` calls into one fsync'ed batch.

    One batch is written at a time in a worker thread; callers arriving meanwhile form the next batch. Reads,
    commits and closing also run in worker threads; the properties are safe to read on the event loop.
    """

    def __init__(self, spool: Spool, *, max_batch_records: int = 1024, max_batch_bytes: int = 8 * 1024 * 1024) -> None:
        self.spool = spool
        self._max_batch_records = max_batch_records
        self._max_batch_bytes = max_batch_bytes
        self._queue: deque[tuple[bytes, asyncio.Future[int]]] = deque()
        self._writer: asyncio.Task[None] | None = None
        self._data = asyncio.Event()
        self._closing = False

    @property
    def last_seq(self) -> int:
        return self.spool.last_seq

    @property
    def committed_seq(self) -> int:
        return self.spool.committed_seq

    @property
    def depth(self) -> int:
        return self.spool.depth

    async def append(self, payload: bytes) -> int:
        """Store ``payload`` durably and return its sequence number; raises ``SpoolFull``/``SpoolError``.

        If the caller is cancelled after its batch started, the record may still be stored (at-least-once).
        """
        if self._closing:
            raise SpoolError("spool is closing")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((payload, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._drain(), name="spool-writer")
        return await fut

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take_batch()
                if not batch:
                    continue
                try:
                    seqs = await asyncio.to_thread(self.spool.append, [p for p, _ in batch])
                except BaseException as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else SpoolError(repr(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), seq in zip(batch, seqs, strict=True):
                    if not fut.done():
                        fut.set_result(seq)
                # Wake every wait_for_data() caller; they re-check last_seq against their position.
                self._data.set()
                self._data = asyncio.Event()
        finally:
            self._writer = None

    def _take_batch(self) -> list[tuple[bytes, asyncio.Future[int]]]:
        batch: list[tuple[bytes, asyncio.Future[int]]] = []
        batch_bytes = 0
        while self._queue and len(batch) < self._max_batch_records:
            payload, fut = self._queue[0]
            if batch and batch_bytes + len(payload) > self._max_batch_bytes:
                break
            self._queue.popleft()
            if fut.done():  # the caller was cancelled before anything was written: drop it
                continue
            batch.append((payload, fut))
            batch_bytes += len(payload)
        return batch

    async def wait_for_data(self, after_seq: int, timeout_s: float) -> bool:
        """Wait until ``last_seq > after_seq``; False if ``timeout_s`` passed first.

        Only appends made through this wrapper wake waiters early.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.spool.last_seq <= after_seq:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            event = self._data
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                return self.spool.last_seq > after_seq
        return True

    async def read(
        self, after_seq: int, max_records: int, *, max_bytes: int = DEFAULT_READ_MAX_BYTES
    ) -> list[tuple[int, bytes]]:
        """``Spool.read`` in a worker thread: at most ``max_records`` records and (but for one) ``max_bytes``."""
        return await asyncio.to_thread(self.spool.read, after_seq, max_records, max_bytes=max_bytes)

    async def commit(self, seq: int) -> None:
        """``Spool.commit`` in a worker thread (it fsyncs the cursor)."""
        await asyncio.to_thread(self.spool.commit, seq)

    async def close(self) -> None:
        """Finish queued appends (an in-progress write included), then close the spool.

        ``Spool.close`` waits for a commit still fsyncing in a worker thread (one a cancelled caller left
        behind), so it runs in a worker thread too.
        """
        self._closing = True
        while self._writer is not None:
            await asyncio.shield(self._writer)
        await asyncio.to_thread(self.spool.close)
