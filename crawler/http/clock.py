"""Where the rate gate and the retry loop get their time (tests substitute a fake one), and how
they say a duration to a person."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds and a way to wait for them."""

    def now(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    """time.monotonic(), the clock asyncio's loop and the fake API's request log use."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def seconds_text(value: float) -> str:
    """4 -> "4", 1.4995 -> "1.5", 0.05 -> "0.05", 16.3 -> "16", 1e9 -> "1000000000": enough
    digits for a person, never an exponent."""
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"
