"""Micro-batching: requests that arrive together share one forward pass.

    batcher = Batcher(captioner, max_batch=16, max_wait_ms=10)
    await batcher.start()
    hypotheses = await batcher.caption(image, Decoding(beam_size=5))   # from any request handler
    await batcher.stop()

One worker task takes the first waiting image, then waits up to `max_wait_ms` for more (never past
`max_batch`), and runs them through the encoder and beam search as one batch on one dedicated thread:
the model is used by one thread only, so its torch intra-op threads are the only threads doing math,
and the event loop keeps accepting requests meanwhile. Each image comes with its Decoding
(captioner.model.decoding); images asking for different ones are batched separately (beam search runs
one beam size at a time), except that requests differing only in n_best share a batch and each gets as
many hypotheses as it asked for. max_batch 1 turns batching off.

The queue holds at most `max_queue` images: past that `caption` raises Busy at once (the server answers
503 with Retry-After) instead of holding ever more decoded images in memory. A request whose caller has
gone (its awaiting task was cancelled: the client hung up) is dropped before its batch runs. A batch
that fails is run again one image at a time, so one bad image fails its own request only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field, replace

from captioner.errors import CaptionerError
from captioner.model.decoding import Decoding

log = logging.getLogger("captioner")


class Busy(Exception):
    """The queue is full: the request should be retried later."""


@dataclass
class _Job:
    image: object  # a decoded RGB PIL image
    decoding: Decoding
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, captioner, max_batch: int = 16, max_wait_ms: float = 10.0, max_queue: int = 64):
        if max_batch < 1:
            raise CaptionerError(f"max batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise CaptionerError(f"max wait must be 0 or more milliseconds, got {max_wait_ms}")
        if max_queue < 1:
            raise CaptionerError(f"max queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.captioner = captioner
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._model_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.batches = 0  # forward passes run, and images captioned: /health reports them
        self.images = 0
        self.dropped = 0  # requests whose client had gone before their batch ran

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._run(), name="captioner-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True)

    async def caption(self, image, decoding: Decoding | None = None, **settings):
        """-> the n-best Hypothesis list for `image` decoded as `decoding` (default: Decoding(); `settings`:
        its fields as keywords, replacing those), once its batch has run; Busy when the queue is full.
        Cancelling the caller while it waits drops the image from its batch."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        decoding = Decoding.of(decoding, **settings)
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(image, decoding, future))
        except asyncio.QueueFull:
            raise Busy(f"{self.max_queue} images are waiting already") from None
        return await future

    @property
    def waiting(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self._queue.get()]
            deadline = time.monotonic() + self.max_wait
            while len(jobs) < self.max_batch:
                try:  # take what is already waiting at once, then wait for more until the deadline
                    jobs.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    jobs.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[Decoding, list[_Job]] = {}  # by the decoding, but for n_best
            for job in jobs:
                if job.future.cancelled():  # its client went away while it waited
                    self.dropped += 1
                else:
                    groups.setdefault(replace(job.decoding, n_best=1), []).append(job)
            for group in groups.values():
                await self._answer(loop, group)

    async def _answer(self, loop, group: list[_Job]) -> None:
        try:
            hyps = await loop.run_in_executor(self._model_thread, self._forward, group)
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the worker goes on
            if len(group) > 1:  # find the culprit: each image alone, so the others are still answered
                log.warning("captioning a batch of %d failed (%s); captioning them one at a time",
                            len(group), type(exc).__name__)
                for job in group:
                    if not job.future.done():
                        await self._answer(loop, [job])
                return
            log.exception("captioning an image failed")
            if not group[0].future.done():
                group[0].future.set_exception(exc)
            return
        for job, h in zip(group, hyps):
            if not job.future.done():
                job.future.set_result(h[:job.decoding.n_best])

    def _forward(self, group: list[_Job]):
        """The group's images through the model as one batch, decoded as the most n-best any of them asks for."""
        decoding = max((job.decoding for job in group), key=lambda d: d.n_best)
        out = self.captioner.caption_pil([job.image for job in group], decoding, batch_size=len(group))
        self.batches += 1
        self.images += len(group)
        return out
