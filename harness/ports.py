"""Finding free loopback ports for the processes the harness starts itself.

A port is only "free" until someone binds it, and the harness binds late: a simulator or a
Locust master listens a second or more after the port was chosen. The busiest claimant in
that window is every outgoing connection on the machine (the load generator's own among
them), which the kernel gives a port from its ephemeral range. Asking the kernel for "any
free port" (bind to 0) hands out exactly that range, so ports are chosen below it instead,
where only an explicit bind can take them.
"""
from __future__ import annotations

import random
import socket

# Lowest port chosen when the ephemeral range leaves room below it.
LOWEST = 15000
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"

_rng = random.SystemRandom()


def ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The kernel's (low, high) range for outgoing connections' ports; None where unknown."""
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return None
    return low, high


def _all_free(host: str, base: int, n: int) -> bool:
    for p in range(base, base + n):
        with socket.socket() as t:
            try:
                t.bind((host, p))
            except OSError:
                return False
    return True


def free_port_block(n: int = 1, host: str = "127.0.0.1") -> int:
    """A first port P such that P..P+n-1 are all free right now on `host` (replicas
    of a simulator or a layout take consecutive ports), below the ephemeral range where
    it leaves room (see the module's docstring), else anywhere the kernel offers."""
    span = ephemeral_range()
    if span is not None and span[0] - n > LOWEST:
        for _ in range(200):
            base = _rng.randrange(LOWEST, span[0] - n + 1)
            if _all_free(host, base, n):
                return base
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n - 1 <= 65535 and _all_free(host, base, n):
            return base
    raise RuntimeError(f"no block of {n} free ports found on {host}")
