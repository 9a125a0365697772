"""Open-loop arrival schedules: when each request should be sent, independent of
how fast the server answers (which is what makes coordinated omission visible)."""
from __future__ import annotations

import random

ARRIVALS = ("poisson", "gamma", "constant")

# The open-loop rate's ceiling (requests/s over all workers), for every way of setting it:
# harness load --rate, --llm-rate, set_rate (load shapes) and the web UI's POST /llm/rate.
MAX_RATE = 10_000.0
MAX_RATE_REASON = (f"at most {MAX_RATE:g} requests/s: a Locust worker sends a few hundred to a "
                   f"few thousand a second, so a higher rate would measure the load generator, "
                   f"not the server")


def check_rate(rate: object) -> float:
    """An open-loop rate as a float in [0, MAX_RATE] (0: closed loop); ValueError otherwise
    (booleans, non-numbers, NaN, negative, above the ceiling)."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, str)):
        raise ValueError(f"rate must be a number of requests/s, not {rate!r}")
    try:
        value = float(rate)
    except ValueError:
        raise ValueError(f"rate must be a number of requests/s, not {rate!r}") from None
    if not value >= 0:   # (NaN too)
        raise ValueError(f"rate must be >= 0 requests/s (0 = closed loop), not {rate!r}")
    if value > MAX_RATE:
        raise ValueError(f"{value:g} requests/s is too high: {MAX_RATE_REASON}")
    return value


class ArrivalSchedule:
    """Successive send times for a rate that may change while running.

    `burstiness` is the gamma shape k: 1 is Poisson, below 1 burstier, above 1
    smoother (vLLM's `--burstiness` has the same meaning).
    """

    def __init__(self, rate: float, kind: str = "poisson", burstiness: float = 1.0,
                 seed: int = 0, start: float = 0.0):
        if kind not in ARRIVALS:
            raise ValueError(f"arrival process must be one of {', '.join(ARRIVALS)}, not {kind!r}")
        if burstiness <= 0:
            raise ValueError("burstiness must be > 0")
        self.rate = rate
        self.kind = kind
        self.burstiness = burstiness
        self._rng = random.Random(seed)
        self.next_at = start

    def gap(self) -> float:
        rate = self.rate
        if rate <= 0:
            return float("inf")
        if self.kind == "constant":
            return 1.0 / rate
        if self.kind == "poisson":
            return self._rng.expovariate(rate)
        k = self.burstiness
        return self._rng.gammavariate(k, 1.0 / (rate * k))

    def advance(self) -> float:
        """The time of the arrival after the current one."""
        self.next_at += self.gap()
        return self.next_at
