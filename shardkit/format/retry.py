"""How remote requests are retried and bounded (`RetryPolicy`), for every user of the storage
layer: the reader's cache, the conversion's uploads and its remote inputs."""

from __future__ import annotations

import random
from dataclasses import dataclass

from shardkit.config.common import check_count
from shardkit.errors import ConfigError

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How requests are retried: `attempts` in all, waits growing from `first_delay` doubling
    up to `max_delay` (each drawn between half and all of that, so that many readers do not
    retry in step), each request bounded by `timeout` seconds (per `CHUNK_BYTES` transferred).
    Invalid values raise ConfigError naming the option."""

    attempts: int = 6
    first_delay: float = 0.5
    max_delay: float = 8.0
    timeout: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "attempts", check_count("retry attempts", self.attempts, 1))
        for name in ("first_delay", "max_delay", "timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or (name == "timeout" and value == 0):
                raise ConfigError(f"retry {name} must be a positive number of seconds, got {value!r}")

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        ceiling = min(self.max_delay, self.first_delay * 2 ** (retry - 1))
        return float(ceiling * (0.5 + 0.5 * rng.random()))
