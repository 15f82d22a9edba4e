"""The one retry helper: capped exponential backoff with jitter, temporary failures only.

Callers classify: `is_temporary` says which exceptions may go away by waiting
(5xx answers, connection resets, timeouts); anything else, a 4xx above all, is
raised at once. The log level rises with the attempt count, so one hiccup stays
quiet and a flapping registry becomes visible.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry; small by default so that tests never wait long."""

    attempts: int = 3  # total tries, the first one included
    base_delay: float = 0.2  # seconds before the 2nd try; doubles per try
    max_delay: float = 5.0  # cap on one wait

    def delay(self, attempt: int) -> float:
        """Wait after the `attempt`-th failed try (1-based): half to all of the capped backoff."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1))
        return cap * random.uniform(0.5, 1.0)


def _level(attempt: int) -> int:
    if attempt <= 1:
        return logging.DEBUG
    if attempt == 2:
        return logging.INFO
    return logging.WARNING


def retry(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    is_temporary: Callable[[BaseException], bool],
    what: str,
) -> T:
    """Call `fn` until it returns, raises a permanent error, or the attempts run out.

    The last temporary exception is re-raised unchanged; the caller turns it into a
    domain error that names the object.
    """
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= policy.attempts or not is_temporary(exc):
                raise
            wait = policy.delay(attempt)
            kv = {"what": what, "attempt": attempt, "wait": f"{wait:.2f}s", "error": exc}
            log.log(_level(attempt), "temporary failure, retrying", extra={"kv": kv})
            time.sleep(wait)
            attempt += 1
