"""Free-port blocks: consecutive, really free, and out of the way of outgoing connections."""
from __future__ import annotations

import socket

from harness import ports


def _bind_all(base: int, n: int) -> list[socket.socket]:
    socks = []
    for p in range(base, base + n):
        s = socket.socket()
        s.bind(("127.0.0.1", p))
        socks.append(s)
    return socks


def test_a_block_of_eight_consecutive_ports_can_all_be_bound():
    base = ports.free_port_block(8)
    socks = _bind_all(base, 8)
    for s in socks:
        s.close()


def test_blocks_lie_below_the_kernels_ephemeral_range():
    span = ports.ephemeral_range()
    assert span is not None and span[0] < span[1]   # Linux: /proc/sys/net/ipv4/ip_local_port_range
    for _ in range(20):
        base = ports.free_port_block(4)
        assert ports.LOWEST <= base and base + 3 < span[0], (base, span)


def test_a_port_in_use_is_not_handed_out(monkeypatch):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    taken = held.getsockname()[1]
    # the only candidate below the range is the held port's block: it must be passed over
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (taken + 1, 60999))
    monkeypatch.setattr(ports, "LOWEST", taken - 1)
    try:
        base = ports.free_port_block(1)
        assert base != taken
        _bind_all(base, 1)[0].close()
    finally:
        held.close()


def test_without_a_known_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(ports, "ephemeral_range", lambda: None)
    base = ports.free_port_block(2)
    for s in _bind_all(base, 2):
        s.close()


def test_ephemeral_range_reads_the_kernel_file_format(tmp_path):
    f = tmp_path / "range"
    f.write_text("32768\t60999\n")
    assert ports.ephemeral_range(str(f)) == (32768, 60999)
    assert ports.ephemeral_range(str(tmp_path / "missing")) is None
