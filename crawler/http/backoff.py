"""How long to wait after the n-th failure in a row: capped exponential, jitter only lengthens."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import backoff  # the library (absolute import), not this module


def backoff_delay(failures: int, cap: float, rng: Callable[[], float] = random.random) -> float:
    """The wait after the `failures`-th failure in a row (1, 2, ...): 1 s, 2 s, 4 s ... up to `cap`.

    The nominal delays are `backoff.expo`'s. Jitter stretches one by up to half,
    never shortens it (backoff's default full jitter would retry early), and the
    result never exceeds `cap`.
    """
    delays = backoff.expo(factor=1, max_value=cap)
    next(delays)  # backoff's generators yield once before their first value
    nominal = next(itertools.islice(delays, max(1, failures) - 1, None))
    return min(cap, nominal * (1 + rng() / 2))
