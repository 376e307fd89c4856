"""A memory budget shared by concurrent requests: bytes reserved before they are allocated.

    budget = Budget(512_000_000)
    async with budget.hold(decoded_bytes):      # waits until that many bytes are free
        image = await decode(...)
    if not budget.try_reserve(n): ...            # or refuse at once (503) instead of waiting
    budget.release(n)

A reservation larger than the whole budget is let through when nothing else holds any, so one large
(but allowed) image is served alone instead of never. Waiters are served in order of arrival, except
that one that fits goes ahead of an earlier one that does not: a photo of a few megabytes is not held up
behind a queue of 90-megapixel uploads decoded one at a time (small reservations come and go quickly, so
the large ones still get their turn).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class Budget:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"a budget needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # the most ever held at once: /health reports it
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def _fits(self, amount: int) -> bool:
        return self.used + amount <= self.capacity or self.used == 0

    def _take(self, amount: int) -> None:
        self.used += amount
        self.peak = max(self.peak, self.used)

    def try_reserve(self, amount: int) -> bool:
        """Reserve `amount` now if it fits; False otherwise."""
        if not self._fits(amount):
            return False
        self._take(amount)
        return True

    async def reserve(self, amount: int) -> None:
        if self.try_reserve(amount):
            return
        future = asyncio.get_running_loop().create_future()
        entry = (amount, future)
        self._waiters.append(entry)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted just as we were cancelled: give it back
                self.release(amount)
            else:
                with contextlib.suppress(ValueError):  # _wake may have removed it already
                    self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, amount: int) -> None:
        self.used -= amount
        self._wake()

    def _wake(self) -> None:
        for entry in list(self._waiters):
            amount, future = entry
            if future.done():
                self._waiters.remove(entry)
            elif self._fits(amount):
                self._waiters.remove(entry)
                self._take(amount)
                future.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, amount: int):
        await self.reserve(amount)
        try:
            yield
        finally:
            self.release(amount)
