"""Finding free loopback ports for the processes the harness starts itself."""
from __future__ import annotations

import socket


def free_port_block(n: int = 1, host: str = "127.0.0.1") -> int:
    """A first port P such that P..P+n-1 are all free right now on `host` (replicas
    of a simulator or a layout take consecutive ports)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind((host, 0))
            base = s.getsockname()[1]
        if base + n - 1 > 65535:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as t:
                try:
                    t.bind((host, p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {n} free ports found on {host}")
