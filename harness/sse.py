"""Incremental Server-Sent-Events splitter that keeps the read time of every event.

Token timing is only as good as the moment an event is known to be complete, so the parser is fed
whole socket reads, each stamped with the ``perf_counter_ns`` taken right after ``recv`` returned,
and every event it completes carries the stamp of the read that completed it.

It works on whole buffers (``bytes.split``/``find``), never byte by byte: a streamed response may
deliver thousands of events per second per worker, and parsing must not become the bottleneck that
delays the timestamps it is supposed to take.

Only the ``data`` field matters to the harness; ``event``, ``id`` and ``retry`` fields and comment
lines (``:``, used as keep-alives) are dropped. Line endings may be ``\\n``, ``\\r\\n`` or ``\\r``
(the SSE grammar allows all three).
"""

from __future__ import annotations

__all__ = ["SSEParser"]

_LF = b"\n"
_CR = b"\r"
_EVENT_END = b"\n\n"


class SSEParser:
    """Split a byte stream into SSE ``data`` payloads, each stamped with its completing read.

    One parser per response; it holds only the incomplete tail of the stream between reads.
    """

    __slots__ = ("_buf", "_cr_pending")

    def __init__(self) -> None:
        self._buf = b""
        # A read that ends in "\r" may be the first half of "\r\n"; that byte waits for the next
        # read so a split CRLF is never counted as two line ends.
        self._cr_pending = False

    def feed(self, data: bytes, t_ns: int) -> list[tuple[bytes, int]]:
        """Add one socket read; return the ``data`` payloads of every event it completed.

        Each payload is returned with ``t_ns`` (the read's timestamp). Multi-line ``data`` fields
        are joined with ``\\n`` as the SSE spec says. Events without a ``data`` field (comments,
        keep-alives) produce nothing.
        """
        if not data:
            return []
        if self._cr_pending:
            data = _CR + data
            self._cr_pending = False
        if _CR in data:
            if data.endswith(_CR):
                data = data[:-1]
                self._cr_pending = True
            data = data.replace(b"\r\n", _LF).replace(_CR, _LF)
        buf = self._buf + data if self._buf else data
        if _EVENT_END not in buf:
            self._buf = buf
            return []
        blocks = buf.split(_EVENT_END)
        self._buf = blocks.pop()
        out: list[tuple[bytes, int]] = []
        for block in blocks:
            payload = _event_data(block)
            if payload is not None:
                out.append((payload, t_ns))
        return out

    def payloads(self, data: bytes) -> list[bytes]:
        """Like ``feed``, for a caller that stamps events itself: return only the payloads.

        Every event ``feed`` returns carries the one stamp of the read that completed it, so a
        reader that already holds that stamp needs no ``(payload, stamp)`` pair per event. The
        usual read of a streaming server -- whole ``data: ...`` events, ``\n`` line ends --
        is split without leaving C string methods; anything else goes through ``feed``.
        """
        if not data:
            return []
        if self._buf or self._cr_pending or _CR in data or not data.endswith(_EVENT_END):
            return [p for p, _ in self.feed(data, 0)]
        if data.startswith(b"data: ") and data.find(_LF) == len(data) - 2:
            return [data[6:-2]]   # one single-line event
        blocks = data.split(_EVENT_END)
        self._buf = blocks.pop()   # b"" unless the data ended in a third line end
        out = []
        for block in blocks:
            if block.startswith(b"data: ") and _LF not in block:
                out.append(block[6:])
            else:
                payload = _event_data(block)
                if payload is not None:
                    out.append(payload)
        return out

    def finish(self, t_ns: int) -> list[tuple[bytes, int]]:
        """Flush at end of stream: return an event whose lines all ended but whose blank line never came.

        The SSE spec discards such an event; some servers end the body right after
        ``data: [DONE]\\n`` without the blank line, and treating that as a lost ``[DONE]`` would
        misclassify a complete response as a disconnect. A line cut off mid-way (no line end) is
        still discarded: that is a truncated stream.
        """
        buf = self._buf
        if self._cr_pending:
            buf += _LF
            self._cr_pending = False
        self._buf = b""
        if not buf.endswith(_LF):
            cut = buf.rfind(_LF)
            buf = buf[: cut + 1] if cut >= 0 else b""
        payload = _event_data(buf) if buf else None
        return [(payload, t_ns)] if payload is not None else []

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the end of an event (non-zero at EOF means a cut stream)."""
        return len(self._buf) + (1 if self._cr_pending else 0)


def _event_data(block: bytes) -> bytes | None:
    """Return the joined ``data`` value of one event block, or None when it has no data field."""
    if block.startswith(b"data:") and _LF not in block:
        # The common case: one line, one data field.
        value = block[5:]
        return value[1:] if value.startswith(b" ") else value
    parts: list[bytes] | None = None
    for line in block.split(_LF):
        if line.startswith(b"data"):
            if len(line) == 4:
                value = b""  # a bare "data" line is a data field with an empty value
            elif line[4:5] == b":":
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
            else:
                continue  # a field such as "datax:" is not "data"
            if parts is None:
                parts = [value]
            else:
                parts.append(value)
    if parts is None:
        return None
    return parts[0] if len(parts) == 1 else _LF.join(parts)
