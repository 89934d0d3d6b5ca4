"""The wall clock the training stages' time budgets read (one place, so tests can drive it)."""

import time


def now() -> float:
    return time.time()
