"""Finding free loopback ports for the processes the harness starts itself.

A port is only "free" until someone binds it, and the harness binds late: a simulator or a
Locust master listens a second or more after the port was chosen. The busiest claimant in
that window is every outgoing connection on the machine (the load generator's own among
them), which the kernel gives a port from its ephemeral range. Asking the kernel for "any
free port" (bind to 0) hands out exactly that range, so ports are chosen below it instead,
where only an explicit bind can take them.
"""
from __future__ import annotations

import errno
import random
import socket

from harness.errors import UsageError

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
    base: int
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


def bind_error(option: str, host: str, port: int, exc: OSError) -> UsageError:
    """The one line for a port we were told to listen on and could not: which port, why,
    and the option that moves it (a traceback and Locust's exit 1 or 4 said neither)."""
    where = f"{host or '*'}:{port}"
    if exc.errno == errno.EADDRINUSE:
        return UsageError(f"{option} {port}: {where} is already in use by another process; stop it "
                          f"or pick another port with {option} PORT")
    return UsageError(f"{option} {port}: cannot listen on {where} ({exc.strerror or exc}); fix the "
                      f"address or pick another port with {option} PORT")


def require_free(host: str, port: int, option: str) -> None:
    """Raise `bind_error` unless a listener could bind `host`:`port` now (as gevent's servers
    bind: SO_REUSEADDR, so a port left in TIME_WAIT by an earlier run still counts as free).
    Checked before anything starts; whoever binds it later still reports their own failure."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise bind_error(option, host, port, exc) from None
