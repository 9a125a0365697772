"""Per-request LLM latency measurement from timestamped SSE payloads.

This module is where the metric definitions become numbers; it follows them exactly (the
README's "Metric definitions" section gives them to users):

* A **token-carrying event** is a chat delta with ``content``, ``reasoning_content``,
  ``reasoning`` or ``tool_calls`` -- including an empty ``"content": ""`` delta, which real vLLM
  sends for tokens without text of their own (special tokens, partial UTF-8) -- or a completions
  choice with a ``text`` key. The opening role event (a delta with ``role`` and no text) does not
  count; usage-only events (``"choices": []``) and ``[DONE]`` do not count.
* **TTFT** = first token-carrying event - send; ``ttft_from_schedule`` = first token - scheduled.
* **E2E** = last token-carrying event - send.
* **output tokens** = the last ``usage.completion_tokens`` the server sent; without usage, the
  caller's tokenizer callback counts the generated text and the figure is marked estimated.
  SSE events are never counted as tokens.
* **TPOT** = (E2E - TTFT) / (output_tokens - 1); undefined (None) for output_tokens <= 1.
* **ICL** = raw gaps between consecutive token-carrying events.
* **ITL** = each such gap split evenly over the tokens the later event carries (per-event token
  counts from ``continuous_usage_stats`` deltas of ``usage.completion_tokens``, else 1 per event).
  ITL has one entry per token after the first: tokens that arrive in the same event as the first
  token get 0 ms entries, so with consistent usage ``mean(ITL) == TPOT``.

Failed requests keep no latencies (``null`` in ``requests.jsonl``: a failure has none); they keep
``schedule_lag_ms`` (a property of the load generator, not of the server) and whatever token
counts arrived. An **incomplete** request (still streaming when the run stopped: after the drain,
or on Ctrl-C/SIGTERM) is not a failure of the server: it keeps what was measured before the stop,
TTFT if its first token came and the tokens so far, and no E2E/TPOT (it had no end).

All times are ``time.perf_counter_ns()`` values. Wall-clock fields (``scheduled_at``,
``sent_at``, ``finished_at``: epoch seconds) are derived with one offset captured at import, so
they stay consistent with the monotonic durations within a process.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterable

import orjson

if TYPE_CHECKING:
    from harness.sse import SSEParser

__all__ = [
    "CONNECT",
    "DEADLINE",
    "DISCONNECT",
    "EMPTY_OUTPUT",
    "ERROR_KINDS",
    "INCOMPLETE",
    "MALFORMED_EVENT",
    "NOT_EVENT_STREAM",
    "PROTOCOL",
    "STREAM_ERROR",
    "TIMEOUT",
    "TOO_LARGE",
    "RequestRecord",
    "StreamTimer",
    "exception_error_kind",
    "failed_record",
    "http_error_kind",
    "perf_ns_to_epoch",
    "request_id",
]

MALFORMED_EVENT = "malformed_event"  # an SSE data payload that is not valid JSON
DISCONNECT = "disconnect"  # the stream ended without [DONE] and without a finish_reason
EMPTY_OUTPUT = "empty_output"  # a complete stream with no token-carrying event
STREAM_ERROR = "stream_error"  # the server sent an error object inside the stream
TIMEOUT = "timeout"  # silence: no byte for the read timeout (--timeout)
CONNECT = "connect"
# The transport's kinds (harness.http_stream's exceptions carry these names):
DEADLINE = "deadline"  # the whole request outlasted its deadline (--request-deadline)
TOO_LARGE = "too_large"  # the response outgrew the cap on buffered bytes (--max-response-bytes)
NOT_EVENT_STREAM = "not_event_stream"  # a 200 whose Content-Type is not text/event-stream
PROTOCOL = "protocol"  # not valid HTTP/1.x (bad status line, bad chunk framing, head too large)
INCOMPLETE = "incomplete"  # still in flight when the run stopped (not a server failure)
# Every error kind a request can end with, besides ``http_<status>`` (README, "Errors");
# ``error`` is the catch-all for an exception nothing here classifies.
ERROR_KINDS = (CONNECT, TIMEOUT, DEADLINE, DISCONNECT, PROTOCOL, NOT_EVENT_STREAM, TOO_LARGE,
               MALFORMED_EVENT, STREAM_ERROR, EMPTY_OUTPUT, "error")

# Bounds on one request (harness load's --request-deadline and --max-response-bytes; the
# plugin's --llm-request-deadline and --llm-max-response-bytes). The deadline is there to end
# streams that never end (an endless ``: keepalive`` stream, a head trickled a line at a time:
# the read timeout measures only silence), not to judge latency, so its default is generous:
# the read timeout (the wait before the first token) plus a second per output token.
DEADLINE_S_PER_TOKEN = 1.0
MAX_RESPONSE_BYTES = 32 << 20   # ~100,000 streamed chat tokens of vLLM's events; 0 = no cap


def default_request_deadline(timeout_s: float, max_output_tokens: float) -> float:
    """The whole-request deadline (seconds) when none is given."""
    return timeout_s + DEADLINE_S_PER_TOKEN * max(1.0, max_output_tokens)


_WALL_OFFSET_NS = time.time_ns() - time.perf_counter_ns()
_NS_PER_MS = 1_000_000.0
_DONE = b"[DONE]"
_TEXT_KEYS = ("content", "reasoning_content", "reasoning")
# Inside a JSON string literal, anything that would make its bytes differ from its text: a quote
# or backslash (escapes) or a control character (invalid JSON). Non-ASCII is checked apart.
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
_NOT_PLAIN_OR_NON_ASCII = re.compile(rb'["\\\x00-\x1f\x80-\xff]')
_LINE_BREAK = re.compile(rb"[\r\n]")
_SSE_DATA = b"data: "
_SSE_END = b"\n\n"
_TEMPLATE_TRIES = 3   # template builds per request (a server whose events all differ gives up)
_PROBE = "tpl-probe"


def _new_id_prefix() -> None:
    global _ID_PREFIX, _id_counter
    _ID_PREFIX = uuid.uuid4().hex[:16]
    _id_counter = itertools.count()


_new_id_prefix()
os.register_at_fork(after_in_child=_new_id_prefix)   # Locust's --processes forks its workers


def request_id() -> str:
    """A unique request id, 32 hex digits like ``uuid4().hex``: 64 random bits drawn once per
    process (again in a forked child), then a counter. ``uuid4()`` reads the kernel's random
    source for every request: a system call in the load generator's event loop, which is slow
    in sandboxed kernels."""
    return f"{_ID_PREFIX}{next(_id_counter):016x}"


def perf_ns_to_epoch(t_ns: int) -> float:
    """Convert a ``perf_counter_ns`` stamp to wall-clock epoch seconds (one offset per process)."""
    return (t_ns + _WALL_OFFSET_NS) / 1e9


def _ms(ns: int) -> float:
    """Nanoseconds to milliseconds, kept to the microsecond (the histograms' unit)."""
    return round(ns / _NS_PER_MS, 3)


def http_error_kind(status: int) -> str | None:
    """``http_<status>`` for a non-2xx response, None for success."""
    return None if 200 <= status < 300 else f"http_{status}"


def exception_error_kind(exc: BaseException) -> str:
    """Classify an exception that ended a request (``connect``, ``timeout``, ``disconnect``, ...)."""
    kind = getattr(exc, "error_kind", None)
    if isinstance(kind, str) and kind:
        return kind
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return CONNECT
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TIMEOUT
    gevent = sys.modules.get("gevent")
    if gevent is not None and isinstance(exc, gevent.Timeout):
        return TIMEOUT
    if isinstance(exc, (ConnectionError, EOFError)):
        return DISCONNECT
    return "error"


@dataclass(slots=True)
class RequestRecord:
    """One finished request: exactly one line of ``requests.jsonl`` (fields in contract order)."""

    id: str
    user_class: str
    url: str
    model: str
    scheduled_at: float | None
    sent_at: float | None
    ok: bool
    status: int | None
    error_kind: str | None
    input_tokens: int | None
    output_tokens: int | None
    tokens_estimated: bool
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None
    itl_ms: list[float] = field(default_factory=list)
    icl_ms: list[float] = field(default_factory=list)
    ttft_from_schedule_ms: float | None = None
    schedule_lag_ms: float | None = None
    finished_at: float | None = None

    def to_json_line(self) -> bytes:
        """Serialize as one JSON line (with the trailing newline) for ``requests.jsonl``."""
        return orjson.dumps(self) + b"\n"


def failed_record(*, error_kind: str, url: str, model: str, user_class: str = "",
                  id: str | None = None, status: int | None = None,
                  sent_ns: int | None = None, scheduled_ns: int | None = None,
                  finished_ns: int | None = None, input_tokens: int | None = None) -> RequestRecord:
    """Record a request that failed before any stream could be timed (connect error, HTTP 4xx/5xx)."""
    if finished_ns is None:
        finished_ns = time.perf_counter_ns()
    lag = _ms(sent_ns - scheduled_ns) if sent_ns is not None and scheduled_ns is not None else None
    return RequestRecord(
        id=id or request_id(), user_class=user_class, url=url, model=model,
        scheduled_at=perf_ns_to_epoch(scheduled_ns) if scheduled_ns is not None else None,
        sent_at=perf_ns_to_epoch(sent_ns) if sent_ns is not None else None,
        ok=False, status=status, error_kind=error_kind, input_tokens=input_tokens,
        output_tokens=None, tokens_estimated=False, ttft_ms=None, tpot_ms=None, e2e_ms=None,
        schedule_lag_ms=lag, finished_at=perf_ns_to_epoch(finished_ns))


class StreamTimer:
    """Consumes one response's ``(payload, t_ns)`` SSE events and produces its ``RequestRecord``.

    Works for ``/v1/chat/completions`` and ``/v1/completions`` streams alike. ``count_tokens``
    (text -> token count) is only used when the server sends no usage; pass one to get estimated
    output token counts from servers that omit usage.
    """

    __slots__ = ("sent_ns", "scheduled_ns", "_count_tokens", "_times", "_counts", "_accounted",
                 "_completion_tokens", "_prompt_tokens", "_done", "_finished", "_error",
                 "_texts", "finish_reason", "response_id", "_tpl", "_tpl_tries")

    def __init__(self, sent_ns: int, scheduled_ns: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> None:
        self.sent_ns = sent_ns
        self.scheduled_ns = scheduled_ns
        self._count_tokens = count_tokens
        self._times: list[int] = []  # arrival of each token-carrying event
        self._counts: list[int] = []  # tokens carried by each token-carrying event
        self._accounted = 0  # tokens attributed to token-carrying events so far
        self._completion_tokens: int | None = None
        self._prompt_tokens: int | None = None
        self._done = False
        self._finished = False
        self._error: str | None = None
        self._texts: list[str] | None = [] if count_tokens is not None else None
        self.finish_reason: str | None = None
        self.response_id: str | None = None  # the server's ``id`` (e.g. ``chatcmpl-...``)
        # Fast path (see ``feed``): the bytes around the text of the last plain token event.
        self._tpl: tuple[bytes, bytes, int, int] | None = None
        self._tpl_tries = 0

    @property
    def done(self) -> bool:
        """``data: [DONE]`` was received."""
        return self._done

    @property
    def first_token_ns(self) -> int | None:
        return self._times[0] if self._times else None

    @property
    def token_events(self) -> int:
        return len(self._times)

    def feed_events(self, events: Iterable[tuple[bytes, int]]) -> None:
        """Feed several events, e.g. the list returned by ``SSEParser.feed``."""
        for payload, t_ns in events:
            self.feed(payload, t_ns)

    def feed_reads(self, reads: Iterable[tuple[bytes, int]], parser: SSEParser) -> int | None:
        """Feed a response's stamped socket reads through ``parser``, exactly as
        ``for p in parser.payloads(data): self.feed(p, t_ns)`` per read would; return the last
        read's stamp (None without reads).

        Why: a load generator does this for every streamed token. The usual read is one whole
        single-line event, ``data: <payload>\n\n``; when its payload matches the template of
        ``feed``'s fast path, it is counted here in place -- the same checks, shifted by the
        six bytes of ``data: `` and with the event's end -- without splitting the read, slicing
        the payload out or two calls per event. Any other read, or a parser holding part of an
        event, takes the general path, in order.
        """
        feed = self.feed
        payloads = parser.payloads
        times, counts, texts = self._times, self._counts, self._texts
        search = _NOT_PLAIN_OR_NON_ASCII.search
        tpl = None
        pre = suf = b""
        a = b = -1
        last = None
        for data, t_ns in reads:
            last = t_ns
            if self._tpl is not tpl:   # a template was built (or replaced) by `feed`
                tpl = self._tpl
                a = -1
                if tpl is not None and not _LINE_BREAK.search(tpl[0] + tpl[1]):
                    pre, suf = _SSE_DATA + tpl[0], tpl[1] + _SSE_END
                    a, b = len(pre), len(suf)
            if a >= 0:
                end = len(data) - b
                if (end - a >= 2 and data[a] == 34 and data[end - 1] == 34   # 34: '"'
                        and data.startswith(pre) and data.endswith(suf)
                        and search(data, a + 1, end - 1) is None
                        and not self._done and not parser.pending):
                    if texts is not None:
                        texts.append(data[a:end])
                    times.append(t_ns)
                    counts.append(1)
                    self._accounted += 1
                    continue
            for payload in payloads(data):
                feed(payload, t_ns)
        return last

    def feed(self, payload: bytes, t_ns: int) -> None:
        """Account for one SSE data payload that arrived at ``t_ns``.

        Fast path: after one *plain token event* has been parsed -- a single choice whose only
        token text is a JSON string (chat ``delta == {"content": text}`` or a completions
        ``text``), no usage, no finish_reason, no error -- its bytes before and after that string
        are kept as a template (checked once by re-parsing it with another string in place). A
        later payload made of the same bytes around a plain string literal (ASCII, no escapes,
        no control characters) parses, by construction, to the same object with another text:
        it is accounted exactly as the full parse would (one token-carrying event, one token)
        without parsing it. Anything else -- the role event, finish_reason, usage, errors,
        escapes, non-ASCII text, tool calls, malformed JSON -- differs from the template and
        takes the full parse.
        """
        if not payload or self._done:
            return
        tpl = self._tpl
        if tpl is not None:
            prefix, suffix, a, b = tpl
            end = len(payload) - b
            if (end - a >= 2 and payload.startswith(prefix) and payload.endswith(suffix)
                    and payload[a] == 34 and payload[end - 1] == 34):   # 34: '"'
                lit = payload[a:end]
                if lit.isascii() and _NOT_PLAIN.search(lit, 1, len(lit) - 1) is None:
                    if self._texts is not None:
                        self._texts.append(lit)   # a JSON literal; decoded only if needed
                    self._times.append(t_ns)
                    self._counts.append(1)
                    self._accounted += 1
                    return
        if payload == _DONE or payload.strip() == _DONE:
            self._done = True
            return
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            if self._error is None:
                self._error = MALFORMED_EVENT
            return
        if not isinstance(obj, dict):
            if self._error is None:
                self._error = MALFORMED_EVENT
            return
        if "error" in obj or obj.get("object") == "error":
            if self._error is None:
                self._error = STREAM_ERROR
            return

        carries = False
        choices = obj.get("choices")
        if choices:
            texts = self._texts
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
                if "text" in choice:  # /v1/completions
                    carries = True
                    if texts is not None and choice["text"]:
                        texts.append(choice["text"])
                    continue
                delta = choice.get("delta")
                if not delta:
                    continue
                if _delta_carries_token(delta):
                    carries = True
                    if texts is not None:
                        _collect_text(delta, texts)

        usage = obj.get("usage")
        n_tokens = 1
        if usage:
            cum = usage.get("completion_tokens")
            if isinstance(cum, int):
                if carries:
                    # Tokens this event brought = cumulative count minus what earlier events
                    # brought (1 each where they had no usage of their own).
                    n_tokens = max(cum - self._accounted, 0)
                self._completion_tokens = cum
            prompt = usage.get("prompt_tokens")
            if isinstance(prompt, int):
                self._prompt_tokens = prompt
        if carries:
            if not self._times:
                rid = obj.get("id")
                self.response_id = rid if isinstance(rid, str) else None
            self._times.append(t_ns)
            self._counts.append(n_tokens)
            self._accounted += n_tokens
            if (usage is None and self._tpl_tries < _TEMPLATE_TRIES and type(choices) is list
                    and len(choices) == 1):
                self._tpl_tries += 1
                self._tpl = _template(payload, obj) or self._tpl

    def finish(self, *, url: str, model: str, user_class: str = "", id: str | None = None,
               status: int | None = 200, error_kind: str | None = None,
               input_tokens: int | None = None, end_ns: int | None = None) -> RequestRecord:
        """Close the measurement and build the request's record.

        ``error_kind`` is what ended the request from the transport's point of view (e.g.
        ``exception_error_kind(exc)`` or ``http_error_kind(status)``); a stream problem already
        seen (malformed or error event) takes precedence because it happened first. Otherwise a
        stream that ended without ``[DONE]`` or a finish_reason is a ``disconnect``, and a complete
        stream without token-carrying events is ``empty_output``. ``input_tokens`` is used when
        the server reports no ``usage.prompt_tokens``.
        """
        if end_ns is None:
            end_ns = time.perf_counter_ns()
        kind = self._error or error_kind
        if kind is None:
            if not (self._done or self.finish_reason):
                kind = DISCONNECT
            elif not self._times:
                kind = EMPTY_OUTPUT
        ok = kind is None

        output_tokens = self._completion_tokens
        estimated = False
        if output_tokens is None and self._texts is not None and self._times and kind != INCOMPLETE:
            text = "".join(t if isinstance(t, str) else orjson.loads(t) for t in self._texts)
            output_tokens = self._count_tokens(text)  # type: ignore[misc]
            estimated = True
        sent = self.sent_ns
        sched = self.scheduled_ns
        rec = RequestRecord(
            id=id or request_id(), user_class=user_class, url=url, model=model,
            scheduled_at=perf_ns_to_epoch(sched) if sched is not None else None,
            sent_at=perf_ns_to_epoch(sent), ok=ok, status=status, error_kind=kind,
            input_tokens=self._prompt_tokens if self._prompt_tokens is not None else input_tokens,
            output_tokens=output_tokens, tokens_estimated=estimated,
            ttft_ms=None, tpot_ms=None, e2e_ms=None,
            schedule_lag_ms=_ms(sent - sched) if sched is not None else None,
            finished_at=perf_ns_to_epoch(end_ns))
        if kind == INCOMPLETE:
            self._measured_so_far(rec)
        if not ok:
            return rec

        times = self._times
        first, last = times[0], times[-1]
        rec.ttft_ms = _ms(first - sent)
        rec.e2e_ms = _ms(last - sent)
        if sched is not None:
            rec.ttft_from_schedule_ms = _ms(first - sched)
        if output_tokens is not None and output_tokens > 1:
            rec.tpot_ms = round((last - first) / _NS_PER_MS / (output_tokens - 1), 3)
        rec.icl_ms, rec.itl_ms = _gaps(times, self._counts)
        return rec


    def _measured_so_far(self, rec: RequestRecord) -> None:
        """An incomplete request's partial figures: TTFT if the first token came, and the
        tokens so far (the last usage the server sent, else one per token-carrying event or the
        event's continuous-usage count, then marked estimated)."""
        if self._times:
            rec.ttft_ms = _ms(self._times[0] - self.sent_ns)
            if self.scheduled_ns is not None:
                rec.ttft_from_schedule_ms = _ms(self._times[0] - self.scheduled_ns)
        if rec.output_tokens is None:
            rec.output_tokens = sum(self._counts)
            rec.tokens_estimated = bool(self._counts)


def _template(payload: bytes, obj: dict) -> tuple[bytes, bytes, int, int] | None:
    """The bytes around the token text of a plain token event (see ``StreamTimer.feed``), or
    None when ``obj`` is not one or its text cannot be located exactly."""
    choice = obj["choices"][0]
    if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
        return None
    delta = choice.get("delta")
    if delta is not None:
        if not (isinstance(delta, dict) and len(delta) == 1 and "text" not in choice):
            return None
        key, holder = b'"content":', delta
        text = delta.get("content")
    else:
        key, holder = b'"text":', choice
        text = choice.get("text")
    if not isinstance(text, str) or text == _PROBE or not text.isascii():
        return None
    lit = b'"' + text.encode() + b'"'
    if _NOT_PLAIN.search(lit, 1, len(lit) - 1) is not None:
        return None
    needle = key + lit
    at = payload.find(needle)
    if at < 0 or payload.find(needle, at + 1) >= 0:
        return None
    a = at + len(key)
    prefix, suffix = payload[:a], payload[a + len(lit):]
    # Check: the same bytes around another string parse to the same object with that string.
    holder["content" if delta is not None else "text"] = _PROBE
    try:
        if orjson.loads(prefix + b'"' + _PROBE.encode() + b'"' + suffix) != obj:
            return None
    except orjson.JSONDecodeError:
        return None
    return prefix, suffix, len(prefix), len(suffix)


def _delta_carries_token(delta: dict) -> bool:
    """Whether a chat delta carries a generated token (see the module docstring)."""
    if "role" in delta:
        # The opening role event carries no token unless it also carries real text (some
        # servers repeat the role in every delta).
        return bool(delta.get("content") or delta.get("reasoning_content")
                    or delta.get("reasoning") or delta.get("tool_calls"))
    if delta.get("tool_calls"):
        return True
    for key in _TEXT_KEYS:
        if delta.get(key) is not None:
            return True
    return False


def _collect_text(delta: dict, texts: list[str]) -> None:
    for key in _TEXT_KEYS:
        value = delta.get(key)
        if value:
            texts.append(value)
    for call in delta.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            for key in ("name", "arguments"):
                if fn.get(key):
                    texts.append(fn[key])


def _gaps(times: list[int], counts: list[int]) -> tuple[list[float], list[float]]:
    """ICL (raw gaps) and ITL (gaps split over the tokens of the later event)."""
    if counts.count(1) == len(counts):
        # One token per event (no continuous usage stats): ITL is ICL.
        # == _ms(d) for every int d (checked on millions of values); only exact half-microsecond
        # gaps need round()'s decision, everything else rounds the same way twice as fast.
        icl = [((d + 500) // 1000) / 1000.0 if d % 1000 != 500 else _ms(d)
               for d in [b - a for a, b in zip(times, times[1:])]]
        return icl, icl.copy()
    icl: list[float] = []
    itl: list[float] = [0.0] * max(counts[0] - 1, 0)
    prev = prev_delivering = times[0]
    for t, n in zip(times[1:], counts[1:]):
        icl.append(_ms(t - prev))
        prev = t
        if n <= 0:
            continue  # text of tokens already counted: its wait belongs to the next token
        per_token = _ms((t - prev_delivering) // n)
        itl.extend([per_token] * n)
        prev_delivering = t
    return icl, itl
