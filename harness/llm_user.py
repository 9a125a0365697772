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
import os
import time
import uuid
from urllib.parse import urlsplit

import gevent
import gevent.pool
import orjson
from locust import User, constant, task
from locust.user.users import LOCUST_STATE_STOPPING

from harness.arrivals import ArrivalSchedule
from harness.http_stream import HTTPClientError, StreamingConnection
from harness.sse import SSEParser
from harness.timing import StreamTimer, exception_error_kind, failed_record, http_error_kind

_user_ids = itertools.count()


class LLMRequestError(Exception):
    """What Locust's failure table shows for a failed LLM request: the error kind."""


class LLMUser(User):
    abstract = True
    endpoint = "/v1/chat/completions"
    chat = True
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
        self._stats_name = self.endpoint
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.state.api_key_env) if self.state.api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    # -- connections -----------------------------------------------------------
    def _conn(self) -> StreamingConnection:
        if self._idle:
            return self._idle.pop()
        return StreamingConnection(*self._addr, timeout=self.state.timeout, connect_timeout=10.0)

    def on_start(self) -> None:
        self._model = self.model or self.state.resolve_model(self._base, self._conn)
        self._stats_name = f"{self.endpoint} [{self._model}]"
        self._workload = self.state.workload_for(self._base, self._model, self.chat, self._conn)

    def on_stop(self) -> None:
        self._inflight.kill(block=True, timeout=5)
        for c in self._idle:
            c.close()
        self._idle.clear()

    # -- the loop ----------------------------------------------------------------
    @task
    def llm_request(self) -> None:
        st = self.state
        if st.rate > 0:
            self._dispatch()
            return
        if not st.take_quota():
            st.wait_finished()
            return
        self.send(None)

    def _dispatch(self) -> None:
        """Open loop: start requests at scheduled times, never waiting for answers."""
        st = self.state
        cap = st.max_concurrency_per_user()
        pool = gevent.pool.Pool(cap) if cap else self._inflight
        sched = ArrivalSchedule(st.rate_per_user(self), st.arrival, st.burstiness,
                                seed=st.seed * 1000003 + self._uid, start=time.perf_counter())
        while st.rate > 0 and self._state != LOCUST_STATE_STOPPING:
            sched.rate = st.rate_per_user(self)
            t = sched.advance()
            delay = t - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            if self._state == LOCUST_STATE_STOPPING or not st.take_quota():
                break
            if cap:
                pool.wait_available()
            g = pool.spawn(self.send, int(t * 1e9))
            if pool is not self._inflight:
                self._inflight.add(g)
        self._inflight.join()
        st.wait_finished()

    def send(self, scheduled_ns: int | None) -> None:
        st = self.state
        st.inflight += 1
        try:
            rec = self._one_request(scheduled_ns)
        finally:
            st.inflight -= 1
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

    def _one_request(self, scheduled_ns: int | None):
        prompt = self._workload.next()
        body = orjson.dumps(prompt.body(self._model, self.chat, self.state.extra_body))
        url = self._base + self.endpoint
        common = dict(url=url, model=self._model, user_class=self.__class__.__name__,
                      id=uuid.uuid4().hex)
        conn = self._conn()
        timer = None
        sent_ns = time.perf_counter_ns()
        try:
            resp = conn.post_stream(self.endpoint, body, self._headers)
            sent_ns = resp.sent_ns
            if resp.status != 200:
                resp.read()
                rec = failed_record(error_kind=http_error_kind(resp.status) or f"http_{resp.status}",
                                    status=resp.status, sent_ns=sent_ns, scheduled_ns=scheduled_ns,
                                    input_tokens=prompt.input_tokens, **common)
            else:
                timer = StreamTimer(sent_ns, scheduled_ns)
                parser = SSEParser()
                feed = timer.feed
                for chunk, t_ns in resp:
                    for payload, t in parser.feed(chunk, t_ns):
                        feed(payload, t)
                rec = timer.finish(status=200, input_tokens=prompt.input_tokens, **common)
                if not rec.ok:
                    conn.close()
            self._idle.append(conn)
        except HTTPClientError as exc:
            conn.close()
            self._idle.append(conn)
            kind = exception_error_kind(exc)
            if timer is not None:
                rec = timer.finish(status=200, error_kind=kind, input_tokens=prompt.input_tokens, **common)
            else:
                rec = failed_record(error_kind=kind, sent_ns=sent_ns, scheduled_ns=scheduled_ns,
                                    input_tokens=prompt.input_tokens, **common)
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
