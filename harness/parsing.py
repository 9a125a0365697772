"""Values typed on a command line or written in a plan, parsed one way for both.

Commands (``harness hw --gpus``, ``harness load --duration``) and plan stages (``gpus:``,
``duration:``) read the same notations; the parsers live here so a stage never imports a CLI
module for them. Bad input raises :class:`~harness.errors.UsageError` with the accepted forms.
"""
from __future__ import annotations

from harness.errors import UsageError


def parse_gpus(text: str | None) -> list[int] | None:
    """``'0,1'`` -> ``[0, 1]``; ``'0-3'`` -> ``[0, 1, 2, 3]``; ``None``/``'all'`` -> ``None``."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UsageError(
                f"--gpus {text!r}: give CUDA device indices like 0,1 or 0-3") from None
    if any(g < 0 for g in out):
        raise UsageError(f"--gpus {text!r}: device indices are >= 0")
    if len(set(out)) != len(out):
        raise UsageError(f"--gpus {text!r}: a GPU is listed twice")
    return out


def parse_duration(text: str) -> int:
    """'90', '90s', '15m', '2h' -> seconds."""
    t = text.strip().lower()
    mult = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        return int(float(t[:-1]) * mult) if mult else int(float(t))
    except ValueError:
        raise UsageError(f"bad duration {text!r}: use seconds or 30s / 15m / 2h") from None
