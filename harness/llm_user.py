"""Locust users that stream chat/completions and measure what LLM users feel.

Closed loop (the default): each Locust user sends a request, reads the whole
stream, sends the next. Open loop (`--llm-rate R`): each user becomes an arrival
dispatcher that starts requests at their scheduled times whatever the server does,
and latency is also measured from the schedule (no coordinated omission).

Subclass `LLMUser` in a locustfile to target another model, host or endpoint:

    class Big(ChatUser):
        model = "meta-llama/Meta-Llama-3-70B-Instruct"
        host = "http://127.0.0.1:8001"
        weight = 1
"""
from __future__ import annotations

import itertools
import time
from urllib.parse import urlsplit

import gevent
import gevent.pool
import orjson
from gevent import GreenletExit
from locust import User, constant, task
from locust.exception import StopUser
from locust.user.users import LOCUST_STATE_STOPPING

from harness.arrivals import ArrivalSchedule
from harness.errors import TargetError, UsageError
from harness.http_stream import HTTPClientError, StreamingConnection, last_read_ns
from harness.sse import SSEParser
from harness.timing import (CONNECT, INCOMPLETE, StreamTimer, exception_error_kind, failed_record,
                            http_error_kind, perf_ns_to_epoch, request_id)
from harness.workload import regex_token_count

_user_ids = itertools.count()

# Pause after a request that could not even connect (closed loop only): a closed loop
# against a dead port would otherwise spin, writing thousands of identical failures a second.
CONNECT_BACKOFF_S = 0.1

# Longest wait for a pause in the reads before a finished request is recorded (see `send`).
BOOKKEEPING_WAIT_S = 0.005
# A pause: this long without a body read. The server writes a step's token events a few
# microseconds apart, and steps are milliseconds apart.
QUIET_NS = 300_000


def wait_for_quiet(max_wait_s: float = BOOKKEEPING_WAIT_S, quiet_ns: int = QUIET_NS) -> None:
    """Return once the event loop is idle and no body bytes have been read for ``quiet_ns``
    (or after ``max_wait_s``, so that an overloaded generator still records).

    Why not only ``gevent.idle()``: a client that keeps up with a burst of token events is idle
    for a moment between two of them, and bookkeeping started there delays the rest of the
    burst's timestamps by its few hundred microseconds.

    Why the idle must be prompt: ``last_read_ns`` knows only the reads already done, not bytes
    waiting in the kernel. When several requests wait here, their idle callbacks run one after
    another in the same loop turn, with no poll of the sockets in between: each would find the
    reads "quiet" (nothing can be read while the one before it records) and their bookkeeping
    ran back to back, holding the loop for milliseconds -- across the bursts of the other
    servers when streams go to several. So an idle that took longer than a quarter of the pause
    (something else ran meanwhile) does not count: go round once more, so that the loop polls
    the sockets first. Past the deadline the first prompt idle ends the wait; past twice the
    deadline the first idle of any length does (an overloaded loop is never prompt).
    """
    start = time.perf_counter_ns()
    deadline = start + int(max_wait_s * 1e9)
    late = start + 2 * int(max_wait_s * 1e9)
    prompt_ns = quiet_ns // 4
    while True:
        asked = time.perf_counter_ns()
        gevent.idle()
        now = time.perf_counter_ns()
        if now - asked > prompt_ns and now < late:
            continue
        quiet = now - last_read_ns()
        if quiet >= quiet_ns or now >= deadline:
            return
        gevent.sleep(min(quiet_ns - quiet, deadline - now) / 1e9)


class LLMRequestError(Exception):
    """What Locust's failure table shows for a failed LLM request: the error kind."""


class _Stopped(Exception):
    """A request killed mid-flight (the run stopped): carries its incomplete record (or the
    function that builds it) and the GreenletExit to re-raise once it is recorded."""

    def __init__(self, exit_exc: BaseException, record) -> None:
        super().__init__(INCOMPLETE)
        self.exit_exc = exit_exc
        self.record = record


class LLMUser(User):
    abstract = True
    endpoint = "/v1/chat/completions"
    chat = True
    replica: str | None = None     # endpoint name when a layout has several replicas
    model: str | None = None       # None: --llm-model, else the server's first model
    wait_time = constant(0)

    def __init__(self, environment):
        super().__init__(environment)
        self.state = environment.llm    # set by harness.plugin at init
        parts = urlsplit(self.host or environment.host or "")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"host must be an http:// URL of the server, got {self.host!r}")
        self._addr = (parts.hostname, parts.port or 80)
        self._base = f"http://{parts.hostname}:{parts.port or 80}"
        self._idle: list[StreamingConnection] = []
        self._uid = next(_user_ids)
        self._inflight = gevent.pool.Group()
        self._model: str | None = None
        self._workload = None
        self._tokenize_ok = False       # the server has /tokenize (output-token fallback)
        self._tok_conn: StreamingConnection | None = None
        self._stats_name = self.endpoint
        self._headers = {"Content-Type": "application/json", **self.state.api_key.headers_for(self._base)}

    # -- connections -----------------------------------------------------------
    def _conn(self) -> StreamingConnection:
        if self._idle:
            return self._idle.pop()
        return StreamingConnection(*self._addr, timeout=self.state.timeout, connect_timeout=10.0,
                                   deadline=self.state.request_deadline,
                                   max_body_bytes=self.state.max_response_bytes)

    def on_start(self) -> None:
        self._workload = None
        try:
            self._prepare()
        except HTTPClientError:
            # The server is not reachable (yet): every request this user would have sent is
            # recorded as failed with its error kind (`connect`, ...) until it is.
            pass
        except (TargetError, UsageError) as exc:
            # Nothing this user could send would work (the key is refused, no such model, a
            # broken dataset): the run ends now with the reason, instead of idling on.
            self.state.abort(str(exc))
            raise StopUser() from None

    def _prepare(self) -> None:
        """Resolve the model and build the prompts (calibrated against the server)."""
        if self._model is None:
            self._model = self.model or self.state.resolve_model(self._base, self._conn)
            self._stats_name = f"{self.endpoint} [{self._model}]" + (f" @{self.replica}" if self.replica else "")
        if self._workload is None:
            self._workload = self.state.workload_for(self._base, self._model, self.chat, self._conn)
            self._tokenize_ok = self._workload.count is not None

    def on_stop(self) -> None:
        self._inflight.kill(block=True, timeout=5)
        for c in self._idle:
            c.close()
        self._idle.clear()
        if self._tok_conn is not None:
            self._tok_conn.close()

    # -- the loop ----------------------------------------------------------------
    @task
    def llm_request(self) -> None:
        st = self.state
        if st.rate > 0:
            self._dispatch()
            return
        if st.draining or not st.take_quota():
            st.wait_finished()
            return
        rec = self.send(None)
        if rec.error_kind == CONNECT:
            gevent.sleep(CONNECT_BACKOFF_S)

    def _dispatch(self) -> None:
        """Open loop: start requests at scheduled times, never waiting for answers."""
        st = self.state
        cap = st.max_concurrency_per_user()
        pool = gevent.pool.Pool(cap) if cap else self._inflight
        # Seeded per worker and per user: workers must not replay one another's arrivals.
        sched = ArrivalSchedule(st.rate_per_user(self), st.arrival, st.burstiness,
                                seed=f"{st.seed}:{st.worker_index()}:{self._uid}",
                                start=time.perf_counter())
        while st.rate > 0 and self._state != LOCUST_STATE_STOPPING:
            prev = sched.next_at
            sched.rate = st.rate_per_user(self)
            version = st.rate_version
            t = sched.advance()
            # Sleep until the arrival, in short naps so that a rate change (set_rate) takes
            # effect now instead of after a gap drawn for the old rate.
            while True:
                delay = t - time.perf_counter()
                if delay <= 0 or st.rate_version != version or st.draining:
                    break
                gevent.sleep(min(delay, 0.1))
            if st.draining and not st.scheduled_before_drain(t):
                break   # the run is ending: arrivals due later are not sent
            if st.rate_version != version:
                sched.next_at = max(prev, time.perf_counter() - 1e-3) if st.rate > 0 else prev
                continue
            if self._state == LOCUST_STATE_STOPPING or not st.take_quota():
                break
            st.due += 1   # counted from its quota until it is sending: a drain or the last
            try:          # request's end waits for it too
                if cap:
                    pool.wait_available()
                g = pool.spawn(self._send_due, int(t * 1e9))
            except BaseException:
                st.due -= 1
                raise
            if pool is not self._inflight:
                self._inflight.add(g)
            # Yield at every arrival: behind schedule (a rate faster than this loop) it never
            # sleeps above, and nothing else -- the run's end, signals, the web UI, the
            # requests it spawned -- would ever run.
            gevent.sleep(0)
        self._inflight.join()
        st.wait_finished()

    def _send_due(self, scheduled_ns: int) -> None:
        self.state.due -= 1   # and at once (no switch between) in flight
        self.send(scheduled_ns)

    def send(self, scheduled_ns: int | None):
        """Send one request, record it (requests.jsonl, histograms, one Locust stats entry)."""
        st = self.state
        st.inflight += 1
        stopped: BaseException | None = None
        try:
            result = self._one_request(scheduled_ns)
        except _Stopped as s:
            # The run stopped with this request in flight (after the drain, or on a signal): it
            # is recorded as incomplete with what was measured, then the kill goes on.
            result, stopped = s.record, s.exit_exc
        finally:
            st.inflight -= 1
        try:
            # The bookkeeping below (parsing a streamed response, the record, histograms, Locust's
            # stats) takes a few hundred microseconds; run in the middle of a burst of token
            # events it would delay every other stream's timestamps by that much
            # (docs/performance.md, "Load generator"). Wait for a pause in the reads (bounded, so
            # an overloaded generator still records); killed meanwhile, still record.
            if stopped is None:
                wait_for_quiet()
        finally:
            rec = result() if callable(result) else result
            st.record(rec, self.__class__.__name__, self._stats_name)
            self.environment.events.request.fire(
                request_type="POST", name=self._stats_name,
                response_time=rec.e2e_ms if rec.e2e_ms is not None else
                ((rec.finished_at or 0) - (rec.sent_at or 0)) * 1000.0,
                response_length=rec.output_tokens or 0,
                exception=None if rec.ok else LLMRequestError(rec.error_kind),
                context={"ttft_ms": rec.ttft_ms, "tpot_ms": rec.tpot_ms, "user_class": self.__class__.__name__},
            )
            st.check_finished()
        if stopped is not None:
            raise stopped
        return rec

    def _count_output_tokens(self, text: str) -> int:
        """Tokenizer fallback for servers that send no usage (the record says `tokens_estimated`).

        The server's own /tokenize when it has one (the same tokenizer, though re-tokenizing
        decoded text can differ by a token or so), else `regex_token_count`.
        """
        if self._tokenize_ok and text:
            try:
                if self._tok_conn is None:
                    self._tok_conn = StreamingConnection(*self._addr, timeout=10.0)
                body = orjson.dumps({"model": self._model, "prompt": text, "add_special_tokens": False})
                status, _, payload = self._tok_conn.request("POST", "/tokenize", body, self._headers)
                if status == 200:
                    return int(orjson.loads(payload)["count"])
            except (HTTPClientError, ValueError, KeyError, TypeError):
                pass
            self._tokenize_ok = False   # do not ask again
        return regex_token_count(text)

    def _one_request(self, scheduled_ns: int | None):
        """A failed request's record, or, for a streamed response, a function that times it."""
        url = self._base + self.endpoint
        if self._workload is None:
            try:
                self._prepare()
            except HTTPClientError as exc:
                now = time.perf_counter_ns()
                return failed_record(error_kind=exception_error_kind(exc), url=url,
                                     model=self._model or self.model or "",
                                     user_class=self.__class__.__name__, sent_ns=now,
                                     scheduled_ns=scheduled_ns, finished_ns=now)
        prompt = self._workload.next()
        body = orjson.dumps(prompt.body(self._model, self.chat, self.state.extra_body))
        rid = request_id()
        common = dict(url=url, model=self._model, user_class=self.__class__.__name__, id=rid)
        # The id goes to the server too (vLLM names the request after X-Request-Id): a record can
        # be matched with the server's own log of that request.
        headers = {**self._headers, "X-Request-Id": rid}
        conn = self._conn()
        sent_ns = time.perf_counter_ns()
        self.state.started({"id": rid, "user_class": common["user_class"], "url": url, "model": self._model,
                            "scheduled_at": perf_ns_to_epoch(scheduled_ns) if scheduled_ns is not None else None,
                            "sent_at": perf_ns_to_epoch(sent_ns), "input_tokens": prompt.input_tokens})
        try:
            try:
                resp = conn.post_stream(self.endpoint, body, headers)
            except GreenletExit as exc:   # stopped before the response began
                conn.close()
                raise _Stopped(exc, failed_record(error_kind=INCOMPLETE, sent_ns=sent_ns,
                                                  scheduled_ns=scheduled_ns,
                                                  input_tokens=prompt.input_tokens, **common)) from None
            sent_ns = resp.sent_ns
            if resp.status != 200:
                resp.read()
                rec = failed_record(error_kind=http_error_kind(resp.status) or f"http_{resp.status}",
                                    status=resp.status, sent_ns=sent_ns, scheduled_ns=scheduled_ns,
                                    input_tokens=prompt.input_tokens, **common)
            else:
                # Stamp now, parse later: the event loop only reads, de-chunks and stamps each
                # read (StreamResponse.pump); SSE parsing and the timing of this request's events
                # wait, with the rest of its bookkeeping, until the loop is idle (see `send`), so
                # that a burst of token events on other streams is read as it arrives.
                reads: list[tuple[bytes, int]] = []
                add = reads.append
                error_kind = None
                try:
                    resp.pump(lambda chunk, t_ns: add((chunk, t_ns)))
                except HTTPClientError as exc:
                    error_kind = exception_error_kind(exc)
                except GreenletExit as exc:   # stopped mid-stream: time what arrived
                    end_ns = time.perf_counter_ns()
                    raise _Stopped(exc, lambda: self._timed(conn, reads, INCOMPLETE, sent_ns, scheduled_ns,
                                                            end_ns, prompt.input_tokens, common)) from None
                end_ns = time.perf_counter_ns()
                return lambda: self._timed(conn, reads, error_kind, sent_ns, scheduled_ns, end_ns,
                                           prompt.input_tokens, common)
            self._idle.append(conn)
        except HTTPClientError as exc:
            conn.close()
            self._idle.append(conn)
            rec = failed_record(error_kind=exception_error_kind(exc), sent_ns=sent_ns,
                                scheduled_ns=scheduled_ns, input_tokens=prompt.input_tokens,
                                **common)
        return rec

    def _timed(self, conn: StreamingConnection, reads: list[tuple[bytes, int]],
               error_kind: str | None, sent_ns: int, scheduled_ns: int | None,
               end_ns: int, input_tokens: int, common: dict):
        """The record of a streamed response from its stamped reads (the metric definitions
        are StreamTimer's); the connection goes back to the pool once its state is known.
        ``error_kind``: what ended the stream early (a transport error, or INCOMPLETE)."""
        timer = StreamTimer(sent_ns, scheduled_ns, count_tokens=self._count_output_tokens)
        parser = SSEParser()
        last_ns = timer.feed_reads(reads, parser)   # every event carries its read's stamp
        if error_kind != INCOMPLETE:   # a stopped stream's torn last event is not an event
            for payload, t in parser.finish(last_ns or sent_ns):   # a last event with no blank line
                timer.feed(payload, t)
        if error_kind is not None:
            conn.close()
            rec = timer.finish(status=200, error_kind=error_kind, input_tokens=input_tokens,
                               end_ns=end_ns, **common)
        else:
            rec = timer.finish(status=200, input_tokens=input_tokens, end_ns=end_ns, **common)
            if not rec.ok:
                conn.close()
        self._idle.append(conn)
        return rec


class ChatUser(LLMUser):
    """Streams `/v1/chat/completions`."""

    abstract = True
    endpoint = "/v1/chat/completions"
    chat = True


class CompletionsUser(LLMUser):
    """Streams `/v1/completions`."""

    abstract = True
    endpoint = "/v1/completions"
    chat = False
