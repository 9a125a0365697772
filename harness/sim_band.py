"""The calibration's error band next to every simulated figure, so nobody reads a simulated
number as a measurement (issue #16, "Uncertainty").

The band itself is declared once, in docs/simulator-calibration.md's error-band section
(written by benchmarks/calibration_published.py from the published calibration set) and read
by `harness.capacity.error_band`; which regime a figure belongs to is
`servers.simulator.calibration_set.regime_of_metric`. This module only joins the two for the
places that show simulated figures: `harness sim replay`, the run report's tables for stages
whose target is the simulator, and virtual-time capacity.
"""
from __future__ import annotations

from harness.capacity import error_band
from servers.simulator.calibration_set import regime_of_metric


def band_for(metric: str) -> str | None:
    """The error band of a simulated figure of `metric` (its regime's clause, with where it is
    stated), or None for a metric the calibration says nothing about (error rate, counts)."""
    regime = regime_of_metric(metric)
    return None if regime is None else error_band(regime=regime)


def short_band(metric: str) -> str | None:
    """`band_for` without the source, for a table cell: 'saturated throughput: real typically
    -5%..+12% of simulated (...)'."""
    band = band_for(metric)
    return None if band is None else band.split(" (docs/")[0]
