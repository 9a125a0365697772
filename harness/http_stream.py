"""A minimal HTTP/1.1 client whose only job is to timestamp streamed response bytes honestly.

Why not Locust's FastHttpUser or requests: their streaming readers buffer in fixed blocks
(FastHttpUser's ``iter_lines()`` reported a 100 ms TTFT as 302 ms), and every extra layer adds CPU
per event, which on a busy load generator turns into timing error. This client reads whole socket
buffers (``recv(65536)``), stamps each read with ``time.perf_counter_ns()`` the moment ``recv``
returns, and decodes the body framing (chunked, Content-Length, read-until-close) itself, so a
read's stamp travels with exactly the body bytes that read delivered.

It uses the ``socket`` module at call time, so it cooperates with gevent when the process is
monkey-patched (Locust) and works with plain blocking sockets in threads (scripts, tests).
Under gevent each read is one wait on the connection's own io watcher followed by one ``recv``
that finds the bytes there (no failed ``recv``, no exception, no timer per read), and the read
timeout is one timer per request that fires only if a single wait outlasts it: a load generator
does this for every streamed token, so the per-read cost is the client's cost per token.

Retry rule: a keep-alive connection that the server has closed while idle is replaced before the
request is written (or when writing fails because the peer had already closed it). Once a request
has been written, nothing is ever retried: a server that closes the connection without answering
may have seen the request, and a load test must count that as a failure (``disconnect``) rather
than hide it.

Failures are exceptions carrying ``error_kind`` (``connect``, ``timeout``, ``deadline``,
``disconnect``, ``protocol``, ``too_large``, ``not_event_stream``); HTTP status codes are
returned, not raised, because deciding that a status is a failure (``http_<status>``) is the
caller's business.

Bounds: ``timeout`` is the longest silence; ``deadline`` (optional) bounds the whole request
from its send, however the bytes trickle (an endless ``: keepalive`` stream, a head sent a line
a second); ``max_body_bytes`` (optional) caps the bytes read for one response body. Under gevent
the deadline rides on the read-timeout timer (nothing per read); the byte cap is one
subtraction per read.

Plain ``http://`` only; one request at a time per connection (no pipelining); not thread-safe:
one connection per simulated user.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator, Mapping
from urllib.parse import urlsplit

from harness import stamp_delay

__all__ = [
    "HTTPClientError",
    "ConnectError",
    "ConnectTimeout",
    "ReadTimeout",
    "Disconnected",
    "ProtocolError",
    "DeadlineExceeded",
    "ResponseTooLarge",
    "NotEventStream",
    "StreamResponse",
    "StreamingConnection",
    "last_read_ns",
]

_RECV_SIZE = 65536
_NS = 1_000_000_000
_MAX_HEAD = 65536
_NO_CAP = 1 << 62   # max_body_bytes=None: no cap (a budget nothing reaches)
_perf_ns = time.perf_counter_ns
_wall_ns = time.time_ns


_last_read = [0]   # perf_counter_ns of this process's latest body read (see last_read_ns)


def last_read_ns() -> int:
    """When this process last read streamed body bytes in an event-loop callback
    (``StreamResponse.pump``): a load generator defers its bookkeeping until reads pause."""
    return _last_read[0]


class HTTPClientError(Exception):
    """Base of the client's failures; ``error_kind`` names the failure class for results."""

    error_kind = "error"


class ConnectError(HTTPClientError):
    """No connection could be made (refused, unresolvable, unreachable): the server never saw the request."""

    error_kind = "connect"


class ConnectTimeout(ConnectError):
    """Connecting took longer than the connect timeout; still a connect failure (request never sent)."""

    error_kind = "connect"


class ReadTimeout(HTTPClientError):
    """The server went silent for longer than the read (idle) timeout, after the request was sent."""

    error_kind = "timeout"


class Disconnected(HTTPClientError):
    """The peer closed or reset the connection before the response was complete."""

    error_kind = "disconnect"


class ProtocolError(HTTPClientError):
    """The response is not valid HTTP/1.x framing (bad status line, chunk size, oversized head)."""

    error_kind = "protocol"


class DeadlineExceeded(HTTPClientError):
    """The whole request, from its send, took longer than the connection's ``deadline``,
    though the server never went silent for the read timeout (bytes trickled or never ended)."""

    error_kind = "deadline"


class ResponseTooLarge(HTTPClientError):
    """The response body outgrew the connection's ``max_body_bytes``."""

    error_kind = "too_large"


class NotEventStream(HTTPClientError):
    """``post_stream`` got a 200 whose Content-Type is not ``text/event-stream`` (an HTML page,
    a whole JSON answer): the server answered, but not with a stream. Raised when the body is
    read (``pump`` or iteration), so the caller has the response's status and headers."""

    error_kind = "not_event_stream"


class StreamResponse:
    """One response: status and headers are read; iterate for ``(body_bytes, t_ns)`` chunks.

    Attributes:
        status, reason: from the status line.
        headers: header names lower-cased; repeated headers joined with ``", "``.
        sent_ns: ``perf_counter_ns`` just before the request was written (the send time).
        headers_ns: stamp of the read that completed the header block.
        connect_ns: time spent opening a new connection for this request (0 when reused).
        reused: the request went over a kept-alive connection.

    Each body chunk is the decoded body bytes delivered by one socket read, stamped with that
    read's time. Body bytes that arrived in the same read as the headers carry ``headers_ns``.
    The body can be iterated once. Leaving it unfinished closes the connection (its state is then
    unknown), so a later request opens a fresh one.
    """

    __slots__ = ("status", "reason", "headers", "sent_ns", "headers_ns", "connect_ns", "reused",
                 "_body", "_chunks", "_done", "_conn", "refused")

    def __init__(self, status: int, reason: str, headers: dict[str, str], sent_ns: int,
                 headers_ns: int, connect_ns: int, reused: bool, body: _Body,
                 conn: StreamingConnection) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.sent_ns = sent_ns
        self.headers_ns = headers_ns
        self.connect_ns = connect_ns
        self.reused = reused
        self._body = body
        self._chunks: Iterator[tuple[bytes, int]] | None = None
        self._done = False
        self._conn = conn
        self.refused: HTTPClientError | None = None   # raised instead of reading the body

    def _refuse(self) -> None:
        exc = self.refused
        self.close()   # the body is not read: the connection goes
        raise exc

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        """Yield ``(bytes, t_ns)`` per socket read until the body ends."""
        if self._done:
            raise RuntimeError("response body already consumed")
        if self.refused is not None:
            self._refuse()
        self._done = True
        self._chunks = self._conn._body(self._body)
        return self._chunks

    def pump(self, sink: Callable[[bytes, int], None]) -> None:
        """Call ``sink(bytes, t_ns)`` for each body read, as iterating would; return at the end.

        Why a second way to read the body: under gevent, iterating costs each read a wait on the
        connection's watcher, two greenlet switches and a generator resumption -- per streamed
        token, the largest part of a load generator's cost per token. Here, for a chunked body
        (every streaming server's), the connection's io watcher calls one callback in the event
        loop for each read: ``recv``, stamp, de-chunk and ``sink`` run there, and the calling
        greenlet sleeps until the body has ended. The stamps are the same (taken as ``recv``
        returns), and so are the failures and the read timeout (the longest silence).

        ``sink`` then runs in the event loop's own greenlet: it must not block or switch (no
        I/O, no ``gevent.sleep``); an exception it raises ends the body and is raised here.
        Without gevent, or for other framings, this simply iterates.
        """
        if self._done:
            raise RuntimeError("response body already consumed")
        if self.refused is not None:
            self._refuse()
        self._done = True
        self._conn._pump(self._body, sink)

    def read(self) -> bytes:
        """Read the whole body (for small non-streaming responses)."""
        return b"".join(chunk for chunk, _ in self)

    def close(self) -> None:
        """Abandon the body; closes the connection unless the body was already complete."""
        self._done = True
        if self._chunks is not None:
            self._chunks.close()  # type: ignore[attr-defined]
        self._conn._abandon(self)

    def __enter__(self) -> StreamResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StreamingConnection:
    """One keep-alive HTTP/1.1 connection to ``host:port``, opened lazily and reopened when stale.

    ``timeout`` is the read (idle) timeout: the longest silence tolerated while waiting for
    response bytes; it raises ``ReadTimeout``. ``connect_timeout`` (default: ``timeout``) bounds
    opening the connection; it raises ``ConnectTimeout``. ``None`` means wait forever.
    ``deadline`` bounds each whole request, from its send to the end of its body, however the
    bytes come (``DeadlineExceeded``); ``max_body_bytes`` caps the bytes read for one response
    body (``ResponseTooLarge``). ``None``: no bound.
    """

    def __init__(self, host: str, port: int, timeout: float | None = 60.0,
                 connect_timeout: float | None = None, deadline: float | None = None,
                 max_body_bytes: int | None = None) -> None:
        self.host = host
        self.port = port
        self.read_timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self.deadline = deadline if deadline else None
        self._deadline_ns = 0   # this request's deadline (perf_counter_ns; 0 = none)
        self.max_body_bytes = max_body_bytes if max_body_bytes else None
        self._host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self._host_header = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        self._sock: socket.socket | None = None
        self._active: StreamResponse | None = None
        self._body_open = False  # a response body is unfinished: the socket is mid-message
        self.connects = 0  # connections opened so far (for tests and diagnostics)
        self._coop: _CooperativeReads | None = None  # set while a gevent socket is open

    @classmethod
    def from_url(cls, url: str, timeout: float | None = 60.0,
                 connect_timeout: float | None = None) -> StreamingConnection:
        """Build from ``http://host[:port][/...]``; the URL's path is ignored (pass full paths)."""
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise ValueError(f"only http:// URLs are supported, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"no host in URL {url!r}")
        return cls(parts.hostname, parts.port or 80, timeout, connect_timeout)

    # -- public requests -------------------------------------------------------------------

    def post_stream(self, path: str, body: bytes,
                    headers: Mapping[str, str] | None = None) -> StreamResponse:
        """POST ``body`` (JSON) and return once the response head is read; iterate it for the body.

        Defaults ``Content-Type: application/json`` and ``Accept: text/event-stream``. A 200
        whose Content-Type is given and is not ``text/event-stream`` raises ``NotEventStream``
        when its body is read.
        """
        resp = self.open("POST", path, body, headers, accept=b"text/event-stream")
        if resp.status == 200:
            ctype = resp.headers.get("content-type")
            if ctype is not None and ctype.split(";", 1)[0].strip().lower() != "text/event-stream":
                resp.refused = NotEventStream(f"{self._host_header} answered 200 with Content-Type "
                                              f"{ctype[:80]!r}, not text/event-stream")
        return resp

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """Send a request and read the whole response: ``(status, headers, body)``.

        For the small calls around a benchmark (``/v1/models``, ``/tokenize``, ``/health``).
        """
        resp = self.open(method, path, body, headers, accept=b"application/json")
        return resp.status, resp.headers, resp.read()

    def open(self, method: str, path: str, body: bytes | None = None,
             headers: Mapping[str, str] | None = None,
             accept: bytes = b"*/*") -> StreamResponse:
        """Send one request, read the response head, and return the response with its body unread."""
        if self._body_open:
            self._drop()  # previous body left unfinished: connection state unknown
        self._active = None
        self._body_open = False
        request = self._build(method, path, body, headers, accept)

        sock = self._sock
        reused = sock is not None
        if sock is not None and not self._idle_alive(sock):
            self._drop()
            sock, reused = None, False
        connect_ns = 0
        if sock is None:
            t0 = _perf_ns()
            sock = self._connect()
            connect_ns = _perf_ns() - t0
        coop = self._coop
        if coop is not None:
            coop.arm()
        sent_ns = _perf_ns()
        if self.deadline:
            self._deadline_ns = sent_ns + int(self.deadline * _NS)
        try:
            if coop is not None:
                coop.sendall(sock, request)
            else:
                sock.sendall(request)
        except (TimeoutError, _ReadWatchdog, _DeadlineWatchdog) as e:
            self._drop()
            raise self._timed_out(e, "writing the request") from e
        except OSError as e:
            self._drop()
            if not reused:
                raise Disconnected(f"connection lost while writing request: {e}") from e
            # The kept-alive connection had been closed by the server: it cannot have read this
            # request, so sending it on a new connection is safe.
            t0 = _perf_ns()
            sock = self._connect()
            connect_ns = _perf_ns() - t0
            reused = False
            coop = self._coop
            if coop is not None:
                coop.arm()
            sent_ns = _perf_ns()
            if self.deadline:
                self._deadline_ns = sent_ns + int(self.deadline * _NS)
            try:
                if coop is not None:
                    coop.sendall(sock, request)
                else:
                    sock.sendall(request)
            except (TimeoutError, _ReadWatchdog, _DeadlineWatchdog) as e2:
                self._drop()
                raise self._timed_out(e2, "writing the request") from e2
            except OSError as e2:
                self._drop()
                raise Disconnected(f"connection lost while writing request: {e2}") from e2

        status, reason, resp_headers, keep_alive, rest, headers_ns = self._read_head(sock)
        body = _Body(sock, method, status, resp_headers, keep_alive, rest, headers_ns)
        resp = StreamResponse(status, reason, resp_headers, sent_ns, headers_ns, connect_ns,
                              reused, body, self)
        self._active = resp
        self._body_open = True
        return resp

    def close(self) -> None:
        """Close the connection (a later request reconnects)."""
        self._drop()

    def __enter__(self) -> StreamingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _build(self, method: str, path: str, body: bytes | None,
               headers: Mapping[str, str] | None, accept: bytes) -> bytes:
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {self._host_header}\r\n".encode("latin-1")]
        given = {k.lower() for k in headers} if headers else set()
        if "user-agent" not in given:
            lines.append(b"User-Agent: llm-harness\r\n")
        if "accept" not in given:
            lines.append(b"Accept: " + accept + b"\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            if body is None:
                body = b""
            if "content-type" not in given:
                lines.append(b"Content-Type: application/json\r\n")
            lines.append(b"Content-Length: %d\r\n" % len(body))
        if headers:
            for name, value in headers.items():
                if name.lower() in ("content-length", "transfer-encoding", "host"):
                    continue
                lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except TimeoutError as e:
            raise ConnectTimeout(f"connect to {self._host_header} timed out "
                                 f"after {self.connect_timeout}s") from e
        except OSError as e:
            raise ConnectError(f"cannot connect to {self._host_header}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if type(sock).__module__.startswith("gevent"):
            # Cooperative reads (see _CooperativeReads): the socket itself never times out.
            sock.settimeout(None)
            self._coop = _CooperativeReads(sock, self.read_timeout,
                                           stamp_delay.enable_kernel_stamps(sock), self.deadline)
        else:
            sock.settimeout(self.read_timeout)
        self._sock = sock
        self.connects += 1
        return sock

    def _abandon(self, resp: StreamResponse) -> None:
        """Called when ``resp`` is closed: drop the socket if its body never finished."""
        if self._active is resp and self._body_open:
            self._drop()
            self._body_open = False

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        coop, self._coop = self._coop, None
        if coop is not None:
            coop.close()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _idle_alive(self, sock: socket.socket) -> bool:
        """True when an idle kept-alive socket shows no sign of closure (no EOF, reset or stray bytes)."""
        if self._coop is not None:
            alive = self._coop.idle_alive()
            if alive is not None:
                return alive
        try:
            sock.settimeout(0.0)
            try:
                data = sock.recv(1)
            finally:
                sock.settimeout(None if self._coop is not None else self.read_timeout)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: still open
        except OSError:
            return False
        # b"" is EOF; any bytes on an idle connection (e.g. a 408 before closing) make it unusable.
        del data
        return False

    def _timed_out(self, e: BaseException, doing: str = "") -> HTTPClientError:
        """The failure a watchdog or a socket timeout stands for: the deadline's, once it has
        passed, else the read timeout's."""
        if isinstance(e, _DeadlineWatchdog) or (self._deadline_ns and _perf_ns() >= self._deadline_ns):
            return DeadlineExceeded(f"request to {self._host_header} not finished within its "
                                    f"{self.deadline}s deadline" + (f" ({doing})" if doing else ""))
        if doing:
            return ReadTimeout(f"timed out {doing} to {self._host_header}")
        return ReadTimeout(f"no data from {self._host_header} for {self.read_timeout}s")

    def _recv(self, sock: socket.socket) -> tuple[bytes, int]:
        coop = self._coop
        try:
            if coop is not None:
                data = coop.recv(sock)
            else:
                if self._deadline_ns:   # blocking socket: wait no longer than the deadline
                    left = (self._deadline_ns - _perf_ns()) / _NS
                    if left <= 0:
                        raise TimeoutError()
                    rt = self.read_timeout
                    sock.settimeout(left if rt is None or left < rt else rt)
                data = sock.recv(_RECV_SIZE)
        except (TimeoutError, _ReadWatchdog, _DeadlineWatchdog) as e:
            self._drop()
            raise self._timed_out(e) from e
        except OSError as e:
            self._drop()
            raise Disconnected(f"connection to {self._host_header} broken: {e}") from e
        return data, _perf_ns()

    def _read_head(self, sock: socket.socket):
        buf = b""
        while True:
            data, t_ns = self._recv(sock)
            if not data:
                self._drop()
                if buf:
                    raise Disconnected("connection closed in the middle of the response head")
                raise Disconnected("connection closed before any response byte")
            buf = buf + data if buf else data
            if buf[:5] != b"HTTP/"[:len(buf)]:   # not an HTTP response at all: say so now
                self._drop()
                raise ProtocolError(f"bad status line {buf[:100]!r}")
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self._drop()
                        raise ProtocolError("response head larger than 64 KiB")
                    break
                status, reason, headers, version = self._parse_head(buf[:end])
                rest = buf[end + 4:]
                if 100 <= status < 200 and status != 101:
                    buf = rest  # interim response (100 Continue, 103 Early Hints): skip it
                    if buf[:5] != b"HTTP/"[:len(buf)]:
                        self._drop()
                        raise ProtocolError(f"bad status line {buf[:100]!r}")
                    continue
                conn_tokens = headers.get("connection", "").lower()
                if version == "HTTP/1.0":
                    keep_alive = "keep-alive" in conn_tokens
                else:
                    keep_alive = "close" not in conn_tokens
                return status, reason, headers, keep_alive, rest, t_ns

    def _parse_head(self, head: bytes) -> tuple[int, str, dict[str, str], str]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/"):
            self._drop()
            raise ProtocolError(f"bad status line {lines[0][:100]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            status = 0
        if not 100 <= status <= 999:
            self._drop()
            raise ProtocolError(f"bad status line {lines[0][:100]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip().lower()
            value = value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return status, (parts[2] if len(parts) > 2 else ""), headers, parts[0]

    def _pump(self, body: _Body, sink: Callable[[bytes, int], None]) -> None:
        """``StreamResponse.pump``: a chunked body read by event-loop callbacks under gevent."""
        coop = self._coop
        if (coop is None or coop._recv is None or not body.chunked or body.method == "HEAD"
                or body.status in (204, 304) or 100 <= body.status < 200):
            chunks = self._body(body)
            try:
                for data, t_ns in chunks:
                    sink(data, t_ns)
            finally:
                chunks.close()   # a failing sink leaves the body unfinished: drop the socket
            return
        sock = body.sock
        keep_alive = body.keep_alive
        complete = False
        try:
            decoder = _ChunkedDecoder()
            budget = self._budget(len(body.rest))
            if body.rest:
                out = decoder.feed(body.rest)
                if out:
                    sink(out, body.t_head)
            if not decoder.done:
                try:
                    ended = coop.pump(decoder, sink, budget, self._too_large)
                except (_ReadWatchdog, _DeadlineWatchdog) as e:
                    raise self._timed_out(e) from e
                except (ProtocolError, Disconnected):
                    raise
                except OSError as e:
                    raise Disconnected(f"connection to {self._host_header} broken: {e}") from e
                if not ended:
                    raise Disconnected("connection closed in the middle of a chunked body")
            if decoder.leftover:
                keep_alive = False
            complete = True
        finally:
            if self._sock is sock:
                self._body_open = False
                coop.disarm()
                if not (complete and keep_alive):
                    self._drop()

    def _budget(self, used: int) -> int:
        """What ``max_body_bytes`` leaves after ``used`` bytes (a budget nothing reaches without
        a cap); ``ResponseTooLarge`` when nothing is left."""
        cap = self.max_body_bytes
        if cap is None:
            return _NO_CAP
        if used > cap:
            raise self._too_large()
        return cap - used

    def _too_large(self) -> ResponseTooLarge:
        return ResponseTooLarge(f"response from {self._host_header} larger than "
                                f"{self.max_body_bytes} bytes")

    def _body(self, body: _Body) -> Iterator[tuple[bytes, int]]:
        """Generator of decoded body chunks; leaves the socket reusable only after a clean end."""
        sock, method, status, headers = body.sock, body.method, body.status, body.headers
        keep_alive, rest, t_head = body.keep_alive, body.rest, body.t_head
        complete = False
        try:
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                complete = True
                if rest:
                    keep_alive = False
                return
            te = headers.get("transfer-encoding", "").lower()
            budget = self._budget(len(rest))
            if "chunked" in te:
                decoder = _ChunkedDecoder()
                data, t_ns = rest, t_head
                while True:
                    if data:
                        out = decoder.feed(data)
                        if out:
                            yield out, t_ns
                        if decoder.done:
                            if decoder.leftover:
                                keep_alive = False
                            complete = True
                            return
                    data, t_ns = self._recv(sock)
                    if not data:
                        raise Disconnected("connection closed in the middle of a chunked body")
                    budget -= len(data)
                    if budget < 0:
                        raise self._too_large()
            cl = headers.get("content-length")
            if cl is not None and not te:
                try:
                    remaining = int(cl.split(",")[0])
                except ValueError:
                    raise ProtocolError(f"bad Content-Length {cl!r}") from None
                if remaining < 0:
                    raise ProtocolError(f"bad Content-Length {cl!r}")
                self._budget(remaining)   # a declared length over the cap fails now
                data, t_ns = rest, t_head
                while True:
                    if data:
                        if len(data) > remaining:
                            data = data[:remaining]
                            keep_alive = False
                        remaining -= len(data)
                        yield data, t_ns
                    if remaining <= 0:
                        complete = True
                        return
                    data, t_ns = self._recv(sock)
                    if not data:
                        raise Disconnected(f"connection closed with {remaining} body bytes missing")
            # No framing: the body runs until the server closes the connection.
            keep_alive = False
            if rest:
                yield rest, t_head
            while True:
                data, t_ns = self._recv(sock)
                if not data:
                    complete = True
                    return
                budget -= len(data)
                if budget < 0:
                    raise self._too_large()
                yield data, t_ns
        finally:
            if self._sock is sock:
                self._body_open = False
                if self._coop is not None:
                    self._coop.disarm()
                if not (complete and keep_alive):
                    self._drop()


class _Body:
    """What reading a response's body needs, kept until the caller chooses how to read it."""

    __slots__ = ("sock", "method", "status", "headers", "keep_alive", "rest", "t_head")

    def __init__(self, sock: socket.socket, method: str, status: int, headers: dict[str, str],
                 keep_alive: bool, rest: bytes, t_head: int) -> None:
        self.sock = sock
        self.method = method
        self.status = status
        self.headers = headers
        self.keep_alive = keep_alive
        self.rest = rest
        self.t_head = t_head

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()


class _ReadWatchdog(Exception):
    """Thrown into a greenlet whose wait for bytes outlasted the read timeout (gevent only)."""


class _DeadlineWatchdog(Exception):
    """Thrown into a greenlet still waiting on its request when its deadline passed (gevent only)."""


class _CooperativeReads:
    """Reads of one gevent socket: one io-watcher wait, then one ``recv`` that finds the bytes.

    gevent's own ``socket.recv`` first calls ``recv`` on the non-blocking socket, catches the
    ``EWOULDBLOCK`` exception, and waits with a new ``gevent.Timeout`` per wait when the socket
    has a timeout; for a client that reads one small event per wake-up that is most of its cost
    per token. Here the connection keeps one io watcher, and the read timeout is one timer per
    request: when it fires it checks whether the current wait (``recv`` or ``sendall``) has
    lasted ``timeout`` seconds, throws ``_ReadWatchdog`` into the waiting greenlet if so, and
    otherwise re-arms for the rest. Same semantics as a socket timeout: the longest single wait.
    The request's deadline (optional) rides on the same timer: it fires by the deadline at the
    latest and throws ``_DeadlineWatchdog`` into a greenlet still waiting then; a wait that
    begins after the deadline fails at once.
    """

    __slots__ = ("hub", "watcher", "timeout", "timer", "extra", "greenlet", "waiting", "since",
                 "deadline", "deadline_ns", "_wait", "_recv", "_raw", "_recvmsg")

    def __init__(self, sock: socket.socket, timeout: float | None,
                 kernel_stamps: bool = False, deadline: float | None = None) -> None:
        from gevent import get_hub

        self.hub = get_hub()
        self.watcher = self.hub.loop.io(sock.fileno(), 1)
        self._wait = self.hub.wait
        # The non-blocking stdlib socket under gevent's (gevent keeps it as ``_sock``): once the
        # watcher has fired, its recv returns at once, without gevent's retry wrapper.
        raw = getattr(sock, "_sock", None)
        self._raw = raw if raw is not None and raw.gettimeout() == 0.0 else None
        self._recv = self._raw.recv if self._raw is not None else None
        # With kernel receive stamps on (harness.stamp_delay), a sample of the body reads are
        # recvmsg calls that bring the stamp along: the generator's check on its own lateness.
        self._recvmsg = self._raw.recvmsg if kernel_stamps and self._raw is not None else None
        self.timeout = timeout
        self.deadline = deadline if deadline else None
        self.deadline_ns = 0   # this request's (0: none)
        first = timeout if self.deadline is None else (
            self.deadline if timeout is None else min(timeout, self.deadline))
        self.timer = self.hub.loop.timer(first, ref=False) if first is not None else None
        self.extra = None  # a re-armed timer for the rest of a wait that began late
        self.greenlet = None
        self.waiting = False
        self.since = 0

    def arm(self) -> None:
        """Start watching this request's waits (called before the request is written)."""
        timer = self.timer
        if timer is None:
            return
        from greenlet import getcurrent

        self.greenlet = getcurrent()
        if self.deadline is not None:
            self.deadline_ns = _perf_ns() + int(self.deadline * _NS)
        self._stop_extra()
        timer.stop()
        timer.start(self._fire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self._stop_extra()

    def close(self) -> None:
        self.disarm()
        self.watcher.close()
        if self.timer is not None:
            self.timer.close()
        self.greenlet = None

    def recv(self, sock: socket.socket) -> bytes:
        self.since = _perf_ns()
        if self.deadline_ns and self.since >= self.deadline_ns:
            raise _DeadlineWatchdog()   # (the timer throws only into a wait)
        self.waiting = True
        try:
            raw_recv = self._recv
            while True:
                self._wait(self.watcher)
                # The watcher fired: the bytes (or EOF, or an error) are there.
                if raw_recv is None:
                    return sock.recv(_RECV_SIZE)   # (gevent's recv waits again if need be)
                try:
                    return raw_recv(_RECV_SIZE)
                except BlockingIOError:
                    continue   # a spurious wake-up: wait again
        finally:
            self.waiting = False

    def pump(self, decoder: _ChunkedDecoder, sink: Callable[[bytes, int], None],
             budget: int = _NO_CAP, too_large: Callable[[], Exception] | None = None) -> bool:
        """Read the rest of a chunked body in watcher callbacks; True at its end, False on EOF.
        More than ``budget`` bytes read raises ``too_large()``.

        The calling greenlet waits once, for the whole body; the callback (in the event loop's
        greenlet) does one ``recv`` per readiness, stamps it, de-chunks it and hands the bytes to
        ``sink``. Failures -- the socket's, the decoder's, ``sink``'s -- end the wait with that
        exception; the read-timeout timer (``_fire``) sees ``since`` move at every read.

        The generator's check on its own stamps (``harness.stamp_delay``): every
        ``stamp_delay.SAMPLE_EVERY``-th read of the process (when the kernel stamps this
        socket's bytes) is a ``recvmsg`` instead, and the delay from the kernel's receive stamp
        to ours goes to the process's monitor, whose loop-lag probe records while bodies are
        being read here.
        """
        from gevent.hub import Waiter

        waiter = Waiter(self.hub)
        watcher = self.watcher
        raw_recv = self._recv
        feed = decoder.feed
        perf_ns = _perf_ns
        mon = stamp_delay.monitor()
        mon.start_probe()
        recvmsg = self._recvmsg
        if recvmsg is not None:
            tick, every, record, anc_size = (mon.tick, stamp_delay.SAMPLE_EVERY, mon.record_anc,
                                             stamp_delay.ANC_SIZE)
            wall_ns = _wall_ns

        def on_readable() -> None:
            anc = None
            try:
                if recvmsg is None:
                    data = raw_recv(_RECV_SIZE)
                else:
                    k = tick[0] - 1
                    if k > 0:
                        tick[0] = k
                        data = raw_recv(_RECV_SIZE)
                    else:
                        tick[0] = every
                        data, anc, _flags, _addr = recvmsg(_RECV_SIZE, anc_size)
            except BlockingIOError:
                return   # a spurious wake-up: wait for the next one
            except Exception as e:  # noqa: BLE001 - handed to the waiting greenlet
                # (Not BaseException: a KeyboardInterrupt that lands in this callback belongs to
                # the hub, which hands it to the main greenlet, i.e. Locust's shutdown.)
                watcher.stop()
                waiter.throw(e)
                return
            nonlocal budget
            t_ns = perf_ns()
            if anc is not None and data:
                record(anc, wall_ns())
            self.since = t_ns
            _last_read[0] = t_ns
            if not data:
                watcher.stop()
                waiter.switch(False)
                return
            budget -= len(data)
            try:
                if budget < 0:
                    raise too_large()
                out = feed(data)
                if out:
                    sink(out, t_ns)
            except Exception as e:  # noqa: BLE001
                watcher.stop()
                waiter.throw(e)
                return
            if decoder.done:
                watcher.stop()
                waiter.switch(True)

        self.since = perf_ns()
        self.waiting = True
        mon.active += 1
        watcher.start(on_readable)
        try:
            return waiter.get()
        finally:
            watcher.stop()
            mon.active -= 1
            self.waiting = False

    def sendall(self, sock: socket.socket, data: bytes) -> None:
        self.since = _perf_ns()
        self.waiting = True
        try:
            raw = self._raw
            if raw is not None:
                # A request almost always fits the socket's send buffer: one non-blocking send,
                # and gevent's wrapper (which waits) only for what did not fit.
                try:
                    sent = raw.send(data)
                except BlockingIOError:
                    sent = 0
                if sent < len(data):
                    sock.sendall(data[sent:])
            else:
                sock.sendall(data)
        finally:
            self.waiting = False

    def idle_alive(self) -> bool | None:
        """``_idle_alive`` without timeouts to set and restore: one non-blocking peek; None when
        this socket has no raw non-blocking socket to peek with."""
        raw = self._raw
        if raw is None:
            return None
        try:
            data = raw.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        del data   # EOF (b"") or stray bytes: either way not reusable
        return False

    def _fire(self) -> None:
        remaining = self.timeout
        now = _perf_ns()
        deadline_ns = self.deadline_ns
        if self.waiting:
            exc = None
            if deadline_ns and now >= deadline_ns:
                exc = _DeadlineWatchdog()
            elif remaining is not None:
                waited = (now - self.since) / _NS
                if waited >= remaining:
                    exc = _ReadWatchdog()
                remaining -= waited
            if exc is not None:
                g = self.greenlet
                if g is not None and not g.dead:
                    g.throw(exc)
                return
        if deadline_ns:
            left = (deadline_ns - now) / _NS
            if left <= 0:
                return   # not waiting now: the next wait fails at once (recv)
            remaining = left if remaining is None or left < remaining else remaining
        self._stop_extra()
        extra = self.extra = self.hub.loop.timer(max(remaining, 0.001), ref=False)
        extra.start(self._fire)

    def _stop_extra(self) -> None:
        extra, self.extra = self.extra, None
        if extra is not None:
            extra.stop()
            extra.close()


class _ChunkedDecoder:
    """Incremental ``Transfer-Encoding: chunked`` decoder over whole reads."""

    __slots__ = ("_buf", "_state", "_remaining", "done", "leftover")

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._buf = b""
        self._state = self._SIZE
        self._remaining = 0
        self.done = False
        self.leftover = b""

    def feed(self, data: bytes) -> bytes:
        """Consume one read; return the body bytes it completed (possibly empty)."""
        if self._state == self._SIZE and not self._buf:
            # Fast path: a streaming server writes whole chunks, so a read is usually one or
            # more complete "size CRLF data CRLF" chunks. Anything else (a partial chunk,
            # extensions, bare LF, the last chunk) goes to the general decoder from there.
            n = len(data)
            pos = 0
            out: list[bytes] = []
            while True:
                eol = data.find(b"\r\n", pos, pos + 1026)
                if eol < 0:
                    break
                try:
                    size = int(data[pos:eol], 16)
                except ValueError:
                    break
                start = eol + 2
                end = start + size
                if size <= 0 or end + 2 > n or data[end] != 13 or data[end + 1] != 10:
                    break
                out.append(data[start:end])
                pos = end + 2
                if pos == n:
                    return out[0] if len(out) == 1 else b"".join(out)
            if pos:
                tail = self._feed(data[pos:])
                return b"".join(out) + tail if tail else b"".join(out)
        return self._feed(data)

    def _feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        while pos < n:
            state = self._state
            if state == self._DATA:
                take = min(self._remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = self._DATA_END
            elif state == self._DATA_END:
                if buf[pos:pos + 2] == b"\r\n":
                    pos += 2
                elif buf[pos:pos + 1] == b"\n":
                    pos += 1
                elif n - pos < 2 and buf[pos:pos + 1] == b"\r":
                    break  # "\r" now, "\n" in the next read
                else:
                    raise ProtocolError("chunk data not followed by CRLF")
                self._state = self._SIZE
            elif state == self._SIZE:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if n - pos > 1024:
                        raise ProtocolError("chunk size line too long")
                    break
                line = buf[pos:eol].split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise ProtocolError(f"bad chunk size {line[:40]!r}")
                pos = eol + 1
                if size == 0:
                    self._state = self._TRAILER
                else:
                    self._remaining = size
                    self._state = self._DATA
            elif state == self._TRAILER:
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    break
                line = buf[pos:eol]
                pos = eol + 1
                if line in (b"", b"\r"):
                    self._state = self._DONE
                    self.done = True
            else:
                break
        if self.done:
            self.leftover = buf[pos:]
            self._buf = b""
        else:
            self._buf = buf[pos:]
        if not out:
            return b""
        return out[0] if len(out) == 1 else b"".join(out)
