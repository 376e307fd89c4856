"""Micro-batching: requests that arrive together share one forward pass.

    batcher = Batcher(captioner, max_batch=16, max_wait_ms=10)
    await batcher.start()
    hypotheses = await batcher.caption(image, beam_size=3, n_best=1)   # from any request handler
    await batcher.stop()

One worker task takes the first waiting image, then waits up to `max_wait_ms` for more (never past
`max_batch`), and runs them through the encoder and beam search as one batch on one dedicated thread:
the model is used by one thread only, so its torch intra-op threads are the only threads doing math,
and the event loop keeps accepting requests meanwhile. Images asking for different beam sizes or
lengths are batched separately (beam search runs one beam size at a time); n-best requests share a
batch and each gets as many hypotheses as it asked for. max_batch 1 turns batching off.

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
from dataclasses import dataclass, field

from captioner.errors import CaptionerError

log = logging.getLogger("captioner")


class Busy(Exception):
    """The queue is full: the request should be retried later."""


@dataclass
class _Job:
    image: object  # a decoded RGB PIL image
    beam_size: int
    max_len: int
    n_best: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    def __init__(self, captioner, max_batch: int = 16, max_wait_ms: float = 10.0, length_penalty: float = 0.0,
                 max_queue: int = 64, rerank=None):
        if max_batch < 1:
            raise CaptionerError(f"max batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise CaptionerError(f"max wait must be 0 or more milliseconds, got {max_wait_ms}")
        if max_queue < 1:
            raise CaptionerError(f"max queue must be at least 1, got {max_queue}")
        self.max_queue = max_queue
        self.captioner = captioner
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.length_penalty = length_penalty
        self.rerank = rerank  # captioner.model.rerank.Rerank; None: the captioner's default
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

    async def caption(self, image, beam_size: int = 3, max_len: int = 20, n_best: int = 1):
        """-> the n-best Hypothesis list for `image`, once its batch has run; Busy when the queue is full.
        Cancelling the caller while it waits drops the image from its batch."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not awaited")
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(image, beam_size, max_len, n_best, future))
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
            groups: dict[tuple[int, int], list[_Job]] = {}
            for job in jobs:
                if job.future.cancelled():  # its client went away while it waited
                    self.dropped += 1
                else:
                    groups.setdefault((job.beam_size, job.max_len), []).append(job)
            for (beam_size, max_len), group in groups.items():
                await self._answer(loop, group, beam_size, max_len)

    async def _answer(self, loop, group: list[_Job], beam_size: int, max_len: int) -> None:
        try:
            hyps = await loop.run_in_executor(self._model_thread, self._forward, group, beam_size, max_len)
        except Exception as exc:  # noqa: BLE001 - the requests get the error; the worker goes on
            if len(group) > 1:  # find the culprit: each image alone, so the others are still answered
                log.warning("captioning a batch of %d failed (%s); captioning them one at a time",
                            len(group), type(exc).__name__)
                for job in group:
                    if not job.future.done():
                        await self._answer(loop, [job], beam_size, max_len)
                return
            log.exception("captioning an image failed")
            if not group[0].future.done():
                group[0].future.set_exception(exc)
            return
        for job, h in zip(group, hyps):
            if not job.future.done():
                job.future.set_result(h[:job.n_best])

    def _forward(self, group: list[_Job], beam_size: int, max_len: int):
        n_best = max(job.n_best for job in group)
        out = self.captioner.caption_pil([job.image for job in group], beam_size=beam_size, max_len=max_len,
                                         n_best=n_best, length_penalty=self.length_penalty,
                                         batch_size=len(group),
                                         **({} if self.rerank is None else {"rerank": self.rerank}))
        self.batches += 1
        self.images += len(group)
        return out
