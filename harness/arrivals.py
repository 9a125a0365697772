"""Open-loop arrival schedules: when each request should be sent, independent of
how fast the server answers (which is what makes coordinated omission visible)."""
from __future__ import annotations

import random

ARRIVALS = ("poisson", "gamma", "constant")


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
