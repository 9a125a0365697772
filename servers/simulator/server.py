"""An OpenAI-compatible HTTP server in front of the engine model, shaped like vLLM.

Plain asyncio protocols rather than a web framework: one streamed token is one
`transport.write` of pre-encoded bytes, which is what lets a single process
stream tens of thousands of events per second without becoming the bottleneck
of the load test it serves.
"""
from __future__ import annotations

import asyncio
import gc
import json
import random
import time
import uuid
import zlib
from array import array
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from servers.simulator import textgen
from servers.simulator.clock import StepTimer
from servers.simulator.engine import Engine, Sequence
from servers.simulator.metrics import ServerMetrics
from servers.simulator.profiles import Profile

SIM_VERSION = "0.1.0"
_MAX_HEADER_BYTES = 64 * 1024
_MAX_BODY_BYTES = 32 * 1024 * 1024


@dataclass
class Faults:
    """Probabilities (0..1) per request; all off by default."""

    http_500: float = 0.0
    http_429: float = 0.0
    drop: float = 0.0            # close the connection mid-stream
    stall: float = 0.0           # stop sending for stall_seconds mid-stream
    stall_seconds: float = 2.0
    slow_headers: float = 0.0    # hold the response headers back
    slow_headers_seconds: float = 2.0
    malformed: float = 0.0       # one event with broken JSON mid-stream

    def any(self) -> bool:
        return any((self.http_500, self.http_429, self.drop, self.stall,
                    self.slow_headers, self.malformed))


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "BadRequestError"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_


def _error_body(status: int, message: str, type_: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": status}}).encode()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 429: "Too Many Requests", 500: "Internal Server Error"}


def _response(status: int, body: bytes, content_type: str = "application/json",
              keep_alive: bool = True) -> bytes:
    return (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
            f"connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n").encode() + body


_SSE_HEADERS = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
                b"connection: keep-alive\r\n\r\n")


def _request_id(header: str | None) -> str | None:
    """A client's X-Request-Id, if it is a sane id (it goes into JSON and logs)."""
    if header and len(header) <= 128 and all(c.isalnum() or c in "-_." for c in header):
        return header
    return None


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


_DONE_CHUNKS = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class GenerationRequest:
    """One generation in flight: turns engine tokens into bytes on the wire."""

    def __init__(self, replica: Replica, conn: HttpConnection, body: dict[str, Any], chat: bool,
                 request_id: str | None = None):
        self.replica = replica
        self.conn = conn
        self.chat = chat
        self.stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        self.include_usage = bool(opts.get("include_usage", False))
        # As vLLM: continuous usage stats only count when include_usage is on too.
        self.continuous_usage = self.include_usage and bool(opts.get("continuous_usage_stats", False))
        # As vLLM: the client's X-Request-Id (when it sends one) names the request, so a
        # client's record and the server's truth line can be matched exactly.
        self.id = ("chatcmpl-" if chat else "cmpl-") + (request_id or uuid.uuid4().hex[:24])
        self.created = int(time.time())
        self.model = replica.profile.served_model_name
        self.prompt_tokens = 0
        # Per-token records as arrays, not lists: arrays hold no object references, so the
        # cyclic GC never walks them (hundreds of streams x hundreds of tokens).
        self.output_ids = array("q")
        self.finish_reason = "length"
        self.received_ns = time.perf_counter_ns()
        self.event_ns = array("q")
        self.model_ns = array("q")
        self.headers_ns: int | None = None
        self.hold: list[bytes] | None = None   # bytes held back by a stall fault
        self.fault: str | None = None
        self.fault_at = -1
        self.done = False
        self.aborted = False      # the client went away (or a drop fault) before the end
        self.seq: Sequence | None = None
        self.text: textgen.TextStream | None = None
        self._prefix = b""
        self._suffix = b""
        self._last_suffix = b""

    # -- request parsing -------------------------------------------------------
    def parse(self, body: dict[str, Any]) -> tuple[int, int]:
        replica = self.replica
        model = body.get("model")
        if model is not None and model != self.model and model not in replica.aliases:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError")
        prompt: Any
        if self.chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "'messages' must be a non-empty list of chat messages")
            for m in messages:
                if not isinstance(m, dict) or "role" not in m:
                    raise ApiError(400, "each message needs a 'role' and 'content'")
            self.prompt_tokens = textgen.count_chat_tokens(messages)
            prompt = messages
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
                self.prompt_tokens = len(prompt)
            elif isinstance(prompt, str):
                self.prompt_tokens = 1 + textgen.count_tokens(prompt)  # + BOS
            else:
                raise ApiError(400, "'prompt' must be a string or a list of token ids")
        limit = replica.profile.max_model_len
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = limit - self.prompt_tokens
        min_tokens = body.get("min_tokens") or 0
        for name, value in (("max_tokens", max_tokens), ("min_tokens", min_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ApiError(400, f"'{name}' must be a non-negative integer")
        if max_tokens < 1:
            raise ApiError(400, "'max_tokens' must be at least 1")
        if min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({min_tokens}) must be <= max_tokens ({max_tokens})")
        if self.prompt_tokens + max_tokens > limit:
            raise ApiError(400, (
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{self.prompt_tokens + max_tokens} tokens ({self.prompt_tokens} in the messages, "
                f"{max_tokens} in the completion). Please reduce the length of the messages or completion."))
        temperature = body.get("temperature", 1.0)
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature < 0):
            raise ApiError(400, "'temperature' must be a number >= 0")
        seed = body.get("seed")
        if seed is not None and not isinstance(seed, int):
            raise ApiError(400, "'seed' must be an integer")
        if temperature == 0:
            # greedy: same prompt, same text (crc32, not hash(): str hashes differ per process)
            seed = zlib.crc32(json.dumps(prompt, sort_keys=True).encode())
        elif seed is None:
            seed = replica.rng.getrandbits(31)
        self.text = textgen.TextStream(seed)
        if body.get("ignore_eos"):
            n = max_tokens
        else:
            n = max(min_tokens, self.text.natural_length(max_tokens))
            if n < max_tokens:
                self.finish_reason = "stop"
        return self.prompt_tokens, n

    # -- output ----------------------------------------------------------------
    def start(self, n_out: int) -> None:
        replica = self.replica
        f = replica.faults
        r = replica.rng.random
        if f.any():
            if f.drop and r() < f.drop:
                self.fault = "drop"
            elif f.stall and r() < f.stall:
                self.fault = "stall"
            elif f.malformed and r() < f.malformed:
                self.fault = "malformed"
            if self.fault:
                self.fault_at = replica.rng.randint(1, max(1, n_out - 1)) if n_out > 1 else 0
            if self.stream and f.slow_headers and r() < f.slow_headers:
                self.fault = self.fault or "slow_headers"
                self._hold_for(f.slow_headers_seconds)
        if self.stream:
            head = (b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[{"index":0,'
                    % (self.id.encode(), b"chat.completion.chunk" if self.chat else b"text_completion",
                       self.created, json.dumps(self.model).encode()))
            self._prefix = head + (b'"delta":{"content":' if self.chat else b'"text":')
            close = b"}" if self.chat else b""
            self._suffix = close + b',"logprobs":null,"finish_reason":null}]'
            self._last_suffix = (close + b',"logprobs":null,"finish_reason":"%s","stop_reason":null}]'
                                 % self.finish_reason.encode())
            self._send(_SSE_HEADERS, raw=True)
            self.headers_ns = time.perf_counter_ns()
        self.seq = Sequence(self.id, self.prompt_tokens, n_out, time.perf_counter(), payload=self)
        replica.submit(self.seq)

    def _hold_for(self, seconds: float) -> None:
        if self.hold is None:
            self.hold = []
            asyncio.get_running_loop().call_later(seconds, self._release)

    def _release(self) -> None:
        held, self.hold = self.hold, None
        if held and not self.conn.closed:
            self.conn.transport.write(b"".join(held))
            t = time.perf_counter_ns()
            self.event_ns = array("q", [t if x == -1 else x for x in self.event_ns])
        if self.done and self.hold is None:
            self.conn.response_done(self)

    def _send(self, data: bytes, raw: bool = False) -> None:
        payload = data if raw else _chunk(data)
        if self.hold is not None:
            self.hold.append(payload)
        elif not self.conn.closed:
            self.conn.transport.write(payload)

    def _usage(self, n: int | None = None) -> bytes:
        if n is None:
            n = len(self.output_ids)
        return (b'{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
                % (self.prompt_tokens, self.prompt_tokens + n, n))

    def prepare(self, model_ns: int, last: bool) -> bytes | None:
        """Sample the next token (the engine sampled it at `model_ns`) and build the bytes that
        carry it, ahead of time; the engine loop writes them at `model_ns` (`deliver`)."""
        tok = self.text.next_id()
        self.output_ids.append(tok)
        self.model_ns.append(model_ns)
        if not self.stream:
            return None
        event = self._prefix + textgen.VOCAB_JSON[tok] + (self._last_suffix if last else self._suffix)
        if self.continuous_usage:
            event += b',"usage":' + self._usage()
        out = _chunk(event + b"}\n\n")
        if len(self.output_ids) == 1 and self.chat:
            out = self._role_chunk() + out
        if last:
            if self.include_usage:
                out += _chunk(b'data: {"id":"%s","object":"%s","created":%d,"model":%s,"choices":[],"usage":%s}\n\n'
                              % (self.id.encode(), b"chat.completion.chunk" if self.chat else b"text_completion",
                                 self.created, json.dumps(self.model).encode(), self._usage()))
            out += _DONE_CHUNKS
        return out

    def _role_chunk(self) -> bytes:
        role = (self._prefix[:-len(b'"delta":{"content":')]
                + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]')
        if self.continuous_usage:  # vLLM puts usage (0 completion tokens) on the role event too
            role += b',"usage":' + self._usage(0)
        return _chunk(role + b"}\n\n")

    @property
    def slow(self) -> bool:
        """Bytes are being held back, or a fault is still to fire: `deliver` must decide."""
        return self.hold is not None or self.fault_at >= len(self.output_ids) - 1

    def deliver(self, payload: bytes) -> bool:
        """Write a prepared token's bytes, applying faults; False once the stream is gone."""
        index = len(self.output_ids) - 1
        if self.fault and index == self.fault_at:
            if self.fault == "drop":
                self.conn.drop()
                return False
            if self.fault == "stall":
                self._hold_for(self.replica.faults.stall_seconds)
            elif self.fault == "malformed":
                self._send(b'data: {"id":"%s","choices":[{"index":0,"delta":{"content":"\n\n'
                           % self.id.encode())
        self._send(payload, raw=True)
        self.event_ns.append(-1 if self.hold is not None else time.perf_counter_ns())
        return True

    def finish_stream(self) -> None:
        self.done = True
        if self.hold is None:
            self.conn.response_done(self)

    def _finish_plain(self) -> None:
        text = textgen.detokenize(self.output_ids)
        n = len(self.output_ids)
        usage = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + n,
                 "completion_tokens": n}
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": self.finish_reason, "stop_reason": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None,
                      "finish_reason": self.finish_reason, "stop_reason": None}
            obj = "text_completion"
        body = json.dumps({"id": self.id, "object": obj, "created": self.created,
                           "model": self.model, "choices": [choice], "usage": usage}).encode()
        if not self.conn.closed:
            self.conn.transport.write(_response(200, body))
        self.event_ns.append(time.perf_counter_ns())
        self.done = True
        self.conn.response_done(self)

    def truth(self) -> dict[str, Any]:
        return {"id": self.id, "stream": self.stream, "chat": self.chat,
                "received_ns": self.received_ns, "headers_ns": self.headers_ns,
                "event_ns": self.event_ns.tolist(), "model_ns": self.model_ns.tolist(),
                "prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.output_ids),
                "finish_reason": self.finish_reason if self.done else "abort",
                "preemptions": self.seq.preemptions if self.seq else 0, "fault": self.fault}


class IdleWork:
    """Work that can wait (truth-log lines), done in the gaps between the step ends of every
    replica on this event loop, so that it never makes a step's writes late."""

    MARGIN_S = 0.0003  # no job starts closer than this to a replica's next step end

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.jobs: deque[Callable[[], None]] = deque()
        self.replicas: list[Replica] = []
        self._handle: asyncio.Handle | None = None

    def add(self, job: Callable[[], None]) -> None:
        self.jobs.append(job)
        if self._handle is None:
            self._handle = self.loop.call_soon(self.run)

    def run(self) -> None:
        """Do queued jobs until a step end is near; called after every step end."""
        self._handle = None
        if not self.jobs:
            return
        perf = time.perf_counter
        horizon = min((r.next_deadline for r in self.replicas), default=float("inf"))
        horizon -= self.MARGIN_S
        jobs = self.jobs
        while jobs and perf() < horizon:
            jobs.popleft()()
        for r in self.replicas:
            r.flush_truth()
        # What is left waits for the next step end (each calls `run`) or for all to go idle.

    def drain(self) -> None:
        while self.jobs:
            self.jobs.popleft()()
        for r in self.replicas:
            r.flush_truth()


class Replica:
    """One simulated vLLM server: an engine, its metrics and its port."""

    def __init__(self, profile: Profile, port: int, host: str = "127.0.0.1",
                 faults: Faults | None = None, truth_log: str | None = None,
                 seed: int = 0, slowdown_per_hour: float = 0.0,
                 kv_capacity_tokens: int | None = None):
        self.profile = profile
        self.host = host
        self.port = port
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.aliases = {profile.name, profile.deployment.model.hf_id}
        self.engine = Engine(profile.deployment, max_num_seqs=profile.max_num_seqs,
                             max_num_batched_tokens=profile.max_num_batched_tokens,
                             kv_capacity_tokens=kv_capacity_tokens)
        self.metrics = ServerMetrics(profile.served_model_name)
        self.slowdown_per_hour = slowdown_per_hour
        self.started = time.perf_counter()
        self.started_wall = time.time()
        self._truth = open(truth_log, "a") if truth_log else None
        self._truth_dirty = False
        self._idle: IdleWork | None = None
        self.server: asyncio.base_events.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: StepTimer | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._busy = False
        self._t_start = 0.0
        self._t_end = 0.0
        self.next_deadline = float("inf")  # when the armed step ends (inf when none is)
        # (request, the bytes prepared for its token, last token?) of the armed step
        self._out: list[tuple[GenerationRequest, bytes | None, bool]] = []

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: HttpConnection(self), self.host, self.port,
                                               reuse_address=True, backlog=4096)
        self._timer = StepTimer(loop, self._step_end)
        if self._idle is None:  # serve() shares one among the replicas it starts
            self._idle = IdleWork(loop)
        self._idle.replicas.append(self)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
        if self._timer:
            self._timer.close()
        if self._retry:
            self._retry.cancel()
        if self._idle is not None:
            self._idle.drain()
            self._idle.replicas.remove(self)
        if self._truth:
            self._truth.close()

    def submit(self, seq: Sequence) -> None:
        """A parsed request, into the engine once the API server's own per-request work
        (Efficiency.request_overhead_s: tokenizing, templating, the HTTP front end) is done.
        Replay waits the same time in virtual time (replay._run_replica)."""
        delay = self.profile.deployment.efficiency.request_overhead_s
        if delay > 0:
            self._loop.call_later(delay, self._admit, seq)
        else:
            self._admit(seq)

    def _admit(self, seq: Sequence) -> None:
        if seq.aborted:      # the client went away while its request was being tokenized
            return
        self.engine.add(seq)
        if not self._busy:
            # Start once this loop iteration's other arrivals are in, as the old task did.
            self._busy = True
            self._loop.call_soon(self._begin)

    def abort(self, seq: Sequence) -> None:
        self.engine.abort(seq)
        self.metrics.success_by_reason["abort"] += 1

    def request_ended(self, req: GenerationRequest) -> None:
        """Once per request, finished or not: its truth-log line, and the end of its life."""
        if self._truth is not None:
            self._idle.add(lambda: self._write_truth(req))
        # Break the request <-> sequence cycle so the request is freed now, by reference
        # counting: left to the cyclic GC, thousands of finished requests (with their
        # per-token lists) piled up and a collection stalled the loop for tens of ms.
        if req.seq is not None:
            req.seq.payload = None

    def _write_truth(self, req: GenerationRequest) -> None:
        self._truth.write(json.dumps(req.truth()) + "\n")
        self._truth_dirty = True

    def flush_truth(self) -> None:
        if self._truth_dirty:
            self._truth.flush()
            self._truth_dirty = False

    # -- the engine loop ------------------------------------------------------------------------
    # One step at a time, driven by callbacks: `_next_step` schedules a step, applies it to the
    # engine right away (pure bookkeeping at the known end time) and builds every byte its
    # tokens need, then arms the timer for the step's end; `_step_end` only writes those bytes
    # and then does the bookkeeping that can wait. So at the model instant the loop's work is
    # one `transport.write` per stream, and no replica's wait blocks another replica or a socket.

    def _begin(self) -> None:
        self._retry = None
        self._t_start = time.perf_counter()
        self._next_step()

    def _next_step(self) -> None:
        engine = self.engine
        metrics = self.metrics
        if not engine.has_work():
            self._busy = False
            metrics.running = metrics.waiting = 0
            metrics.kv_usage = engine.kv_usage
            self._idle.run()
            return
        if self.slowdown_per_hour:
            engine.slowdown = 1.0 + self.slowdown_per_hour * (time.perf_counter() - self.started) / 3600.0
        step = engine.schedule(self._t_start)
        if step is None:  # everything waits for KV space that no finish will free
            self._retry = self._loop.call_later(0.01, self._begin)
            return
        t_end = self._t_start + step.duration
        result = engine.complete(step, t_end)
        model_ns = int(t_end * 1e9)
        out = []
        decodes = 0
        for seq in result.emitted:
            if seq.generated == 1:
                first = seq.first_scheduled if seq.first_scheduled is not None else seq.arrival
                metrics.ttft.observe(t_end - seq.arrival)
                metrics.queue.observe(first - seq.arrival)
                metrics.prefill.observe(t_end - first)
            else:
                decodes += 1
            req = seq.payload
            out.append((req, req.prepare(model_ns, seq.finished), seq.finished))
        if decodes:
            metrics.itl.observe(step.duration, decodes)
        stats = engine.stats
        metrics.generation_tokens = stats.generation_tokens
        metrics.prompt_tokens = stats.prompt_tokens
        metrics.preemptions = stats.preemptions
        metrics.running = len(engine.running)
        metrics.waiting = len(engine.waiting)
        metrics.kv_usage = engine.kv_usage
        self._out = out
        self._t_end = self.next_deadline = t_end
        self._timer.arm(t_end)

    def _step_end(self) -> None:
        self.next_deadline = float("inf")
        out, self._out = self._out, []
        perf_ns = time.perf_counter_ns
        ended = []
        plain = []
        # The hot path: one write per stream, each stamped for the truth log.
        for req, payload, last in out:
            if req.aborted:
                continue
            if payload is None:
                if last:
                    plain.append(req)
                continue
            if req.slow:
                if not req.deliver(payload):
                    continue
            else:
                req.conn.transport.write(payload)
                req.event_ns.append(perf_ns())
            if last:
                ended.append(req)
        t_end = self._t_end
        for req in plain:
            if not req.aborted:
                req._finish_plain()
                ended.append(req)
        for req in ended:
            if req.stream:
                req.finish_stream()
            self._finished(req.seq, req, t_end)
        # A real GPU does not catch up on time lost to the host: start the next
        # step when this one's writes are done.
        self._t_start = max(t_end, time.perf_counter())
        self._next_step()
        self._idle.run()

    def _finished(self, seq: Sequence, req: GenerationRequest, t_end: float) -> None:
        m = self.metrics
        m.success_by_reason[req.finish_reason] += 1
        m.e2e.observe(t_end - seq.arrival)
        m.decode.observe(t_end - seq.first_token_time)
        if seq.generated > 1:
            m.tpot.observe((t_end - seq.first_token_time) / (seq.generated - 1))


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; one request at a time per connection, as clients send."""

    def __init__(self, replica: Replica):
        self.replica = replica
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.active: GenerationRequest | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        req = self.active
        if req is not None and not req.done and req.seq is not None:
            req.aborted = True
            self.replica.abort(req.seq)
            self.replica.request_ended(req)
        self.active = None

    def drop(self) -> None:
        """Fault: the server goes away mid-stream."""
        req = self.active
        if req is not None and req.seq is not None:
            req.aborted = True
            self.replica.abort(req.seq)
            req.fault = "drop"
            self.replica.request_ended(req)
        self.active = None
        self.closed = True
        self.transport.abort()

    def response_done(self, req: GenerationRequest) -> None:
        self.replica.request_ended(req)
        if self.active is req:
            self.active = None
            if self.buf:
                self._process()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.active is None:
            self._process()

    def _write_error(self, status: int, message: str, type_: str = "BadRequestError",
                     close: bool = False) -> None:
        self.transport.write(_response(status, _error_body(status, message, type_), keep_alive=not close))
        if close:
            self.transport.close()
            self.closed = True

    def _process(self) -> None:
        while self.active is None and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > _MAX_HEADER_BYTES:
                    self._write_error(400, "request headers too large", close=True)
                return
            head = bytes(self.buf[:end]).decode("latin-1")
            lines = head.split("\r\n")
            try:
                method, target, _version = lines[0].split(" ", 2)
            except ValueError:
                self._write_error(400, "malformed HTTP request line", close=True)
                return
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._write_error(400, "chunked request bodies are not supported; send Content-Length",
                                  close=True)
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                self._write_error(400, "invalid Content-Length", close=True)
                return
            if length > _MAX_BODY_BYTES:
                self._write_error(413, "request body too large", close=True)
                return
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4:end + 4 + length])
            del self.buf[:end + 4 + length]
            path = target.split("?", 1)[0]
            try:
                self._dispatch(method, path, body, headers.get("x-request-id"))
            except ApiError as e:
                self._write_error(e.status, e.message, e.type)

    def _json(self, body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body or b"{}")
        except ValueError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "request body must be a JSON object")
        return obj

    def _dispatch(self, method: str, path: str, body: bytes, request_id: str | None = None) -> None:
        r = self.replica
        write = self.transport.write
        if path in ("/v1/chat/completions", "/v1/completions"):
            if method != "POST":
                raise ApiError(405, f"{method} not allowed on {path}", "MethodNotAllowed")
            self._generate(self._json(body), chat=path.endswith("chat/completions"),
                           request_id=_request_id(request_id))
        elif path == "/health" and method == "GET":
            write(_response(200, b""))
        elif path == "/metrics" and method == "GET":
            write(_response(200, r.metrics.render(), "text/plain; version=0.0.4; charset=utf-8"))
        elif path == "/v1/models" and method == "GET":
            write(_response(200, json.dumps({"object": "list", "data": [{
                "id": r.profile.served_model_name, "object": "model", "created": int(r.started_wall),
                "owned_by": "vllm", "root": r.profile.served_model_name, "parent": None,
                "max_model_len": r.profile.max_model_len}]}).encode()))
        elif path == "/version" and method == "GET":
            write(_response(200, json.dumps({"version": f"harness-sim {SIM_VERSION}"}).encode()))
        elif path == "/sim/profile" and method == "GET":
            write(_response(200, json.dumps(describe_profile(r.profile)).encode()))
        elif path == "/tokenize" and method == "POST":
            req = self._json(body)
            if "messages" in req:
                messages = req["messages"]
                if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                    raise ApiError(400, "'messages' must be a list of chat messages")
                ids = textgen.chat_token_ids(messages)
                count = len(ids)
            elif isinstance(req.get("prompt"), str):
                ids = textgen.tokenize(req["prompt"])
                if req.get("add_special_tokens", True):
                    ids = [128000] + ids
                count = len(ids)
            else:
                raise ApiError(400, "'/tokenize' needs 'prompt' (a string) or 'messages'")
            write(_response(200, json.dumps({"count": count, "max_model_len": r.profile.max_model_len,
                                             "tokens": ids}).encode()))
        elif path == "/detokenize" and method == "POST":
            req = self._json(body)
            tokens = req.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(i, int) for i in tokens):
                raise ApiError(400, "'/detokenize' needs 'tokens', a list of integers")
            write(_response(200, json.dumps({"prompt": textgen.detokenize(tokens)}).encode()))
        else:
            raise ApiError(404, f"no route for {method} {path}", "NotFoundError")

    def _generate(self, body: dict[str, Any], chat: bool, request_id: str | None = None) -> None:
        r = self.replica
        f = r.faults
        if f.http_500 and r.rng.random() < f.http_500:
            raise ApiError(500, "injected fault: internal server error", "InternalServerError")
        if f.http_429 and r.rng.random() < f.http_429:
            raise ApiError(429, "injected fault: too many requests", "RateLimitError")
        req = GenerationRequest(r, self, body, chat, request_id)
        prompt_tokens, n_out = req.parse(body)
        if prompt_tokens + n_out > r.engine.max_prompt_tokens():
            raise ApiError(400, f"request needs {prompt_tokens + n_out} tokens of KV cache; "
                                f"this replica holds {r.engine.max_prompt_tokens()}")
        self.active = req
        req.start(n_out)


def describe_profile(p: Profile) -> dict[str, Any]:
    d = p.deployment
    return {"name": p.name, "gpu": d.gpu.name, "model": d.model.name, "precision": d.precision.name,
            "tensor_parallel": d.tp, "engine": p.engine, "kv_cache_dtype": d.kv_cache_dtype,
            "served_model_name": p.served_model_name,
            "max_model_len": p.max_model_len, "max_num_seqs": p.max_num_seqs,
            "max_num_batched_tokens": p.max_num_batched_tokens,
            "kv_capacity_tokens": d.kv_capacity_tokens,
            "weights_gb_per_gpu": round(d.weight_bytes_per_gpu / 1e9, 2),
            "sources": [d.gpu.source]}


async def serve(replicas: list[Replica], ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    idle = IdleWork(asyncio.get_running_loop())
    for r in replicas:
        r._idle = idle
        await r.start()
    # Everything allocated so far (modules, profiles, the metrics registry) lives as long as
    # the process: keep it out of the cyclic GC, whose full passes over it stalled the engine
    # loop for several milliseconds at a time under load.
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready.set()
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        for r in replicas:
            await r.stop()
