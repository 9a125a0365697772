"""Specification of the simulator's fault injection (`harness sim --fault-...`), each fault at
probability 1.0 so every request shows it, read off a raw socket that stamps every read.
"""
from __future__ import annotations

import json
import re
import socket
import time
from urllib.parse import urlsplit

import openai
import pytest

FAST = ("--profile", "h200-llama-3-8b-awq")
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
EVENT = re.compile(rb"data: ([^\n]*)\n\n")


def chat_body(max_tokens: int = 20, stream: bool = True) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say something."}],
            "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "stream_options": {"include_usage": True}}


class RawStream:
    """One request on a fresh socket: every read stamped with perf_counter as it returns."""

    def __init__(self, base_url: str, body: dict, timeout: float = 15.0):
        u = urlsplit(base_url)
        data = json.dumps(body).encode()
        self.reads: list[tuple[float, bytes]] = []
        self.closed_by_server = False
        sock = socket.create_connection((u.hostname, u.port), timeout=timeout)
        try:
            self.sent = time.perf_counter()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                         b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                         % (len(data), data))
            raw = b""
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                if b"content-length:" in raw.lower() and b"\r\n\r\n" in raw:
                    head, _, rest = raw.partition(b"\r\n\r\n")
                    n = int(re.search(rb"content-length: *(\d+)", head, re.I).group(1))
                    if len(rest) >= n:
                        break
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    self.closed_by_server = True
                    break
                self.reads.append((time.perf_counter(), chunk))
                raw += chunk
        finally:
            sock.close()
        self.raw = raw
        self.status = int(raw.split(b" ", 2)[1]) if raw else None

    def events(self) -> list[tuple[float, bytes]]:
        """(receive time, data payload) of every SSE event, in order."""
        ends, total = [], 0
        for t, chunk in self.reads:
            total += len(chunk)
            ends.append((total, t))
        out = []
        for m in EVENT.finditer(self.raw):
            t = next(t for end, t in ends if end >= m.end())
            out.append((t, m.group(1)))
        return out

    def json_body(self) -> dict:
        return json.loads(self.raw.partition(b"\r\n\r\n")[2])


def token_events(events: list[tuple[float, bytes]]) -> list[dict]:
    out = []
    for _, data in events:
        if data == b"[DONE]":
            continue
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if obj["choices"] and obj["choices"][0]["delta"].get("content"):
            out.append(obj)
    return out


def test_no_faults_by_default(start_sim):
    base, _ = start_sim(*FAST)
    s = RawStream(base, chat_body(10))
    events = s.events()
    assert s.status == 200 and not s.closed_by_server
    assert events[-1][1] == b"[DONE]" and len(token_events(events)) == 10


@pytest.mark.parametrize("flag,status,type_", [("--fault-http-500", 500, "InternalServerError"),
                                                ("--fault-http-429", 429, "RateLimitError")])
def test_http_error_fault_answers_that_status_with_an_openai_style_error_body(start_sim, flag,
                                                                              status, type_):
    base, _ = start_sim(*FAST, flag, "1.0")
    s = RawStream(base, chat_body())
    assert s.status == status
    err = s.json_body()["error"]
    assert err["message"] and err["type"] == type_ and err["code"] == status
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=10)
    with pytest.raises(openai.APIStatusError) as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                  max_tokens=3)
    assert e.value.status_code == status


def test_http_500_at_half_probability_fails_some_requests_not_all(start_sim):
    base, _ = start_sim(*FAST, "--fault-http-500", "0.5")
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=10)
    failed = 0
    for _ in range(30):
        try:
            c.completions.create(model=MODEL, prompt="x", max_tokens=1)
        except openai.InternalServerError:
            failed += 1
    assert 3 <= failed <= 27


def test_drop_fault_closes_the_connection_mid_stream_before_done(start_sim):
    base, _ = start_sim(*FAST, "--fault-drop", "1.0")
    for _ in range(3):
        s = RawStream(base, chat_body(30))
        events = s.events()
        assert s.status == 200 and s.closed_by_server
        assert b"[DONE]" not in [d for _, d in events]
        assert not s.raw.endswith(b"\r\n0\r\n\r\n")  # no final chunk either
        assert 1 <= len(token_events(events)) < 30  # some tokens came, then nothing
    c = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    assert c.get("/health", cast_to=str) == ""  # the server itself is fine


def truth_line(log, request_id: str, timeout: float = 10.0) -> dict:
    """The simulator's truth-log line of one request (written in the engine's idle gaps)."""
    deadline = time.monotonic() + timeout
    while True:
        text = log.read_text() if log.exists() else ""
        for line in text.splitlines(keepends=True):
            if line.endswith("\n") and json.loads(line)["id"] == request_id:
                return json.loads(line)
        assert time.monotonic() < deadline, f"no truth-log line for {request_id}:\n{text}"
        time.sleep(0.02)


def test_stall_fault_leaves_a_gap_of_at_least_stall_seconds_between_two_events(start_sim, tmp_path):
    log = tmp_path / "truth.jsonl"
    base, _ = start_sim(*FAST, "--fault-stall", "1.0", "--stall-seconds", "0.4", "--truth-log", str(log))
    s = RawStream(base, chat_body(20))
    events = s.events()
    assert events[-1][1] == b"[DONE]" and len(token_events(events)) == 20  # nothing lost
    # The gap as the server made it (its own write stamps, perf_counter like ours): one stall
    # of at least stall seconds, not a slow stream.
    rec = truth_line(log, token_events(events)[0]["id"])
    assert rec["fault"] == "stall" and len(rec["event_ns"]) == 20
    server_gaps = [(b - a) / 1e9 for a, b in zip(rec["event_ns"], rec["event_ns"][1:])]
    k = max(range(len(server_gaps)), key=server_gaps.__getitem__) + 1   # first token after it
    assert server_gaps[k - 1] >= 0.4
    assert sum(g >= 0.35 for g in server_gaps) == 1, server_gaps
    # As this client saw it: the token after the stall arrived at least stall seconds after the
    # server wrote the one before (a bound a late read of that token cannot shrink, unlike the
    # gap between our two reads), and the stall is where the client's largest gap is.
    token_times = []
    for t, data in events:
        try:
            obj = json.loads(data)
        except ValueError:
            continue
        if obj["choices"] and obj["choices"][0]["delta"].get("content"):
            token_times.append(t)
    assert token_times[k] - rec["event_ns"][k - 1] / 1e9 >= 0.4
    client_gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    assert max(range(len(client_gaps)), key=client_gaps.__getitem__) == k - 1, client_gaps


def test_slow_headers_fault_holds_the_response_headers_back(start_sim):
    base, _ = start_sim(*FAST, "--fault-slow-headers", "1.0", "--slow-headers-seconds", "0.4")
    s = RawStream(base, chat_body(5))
    assert s.reads[0][0] - s.sent >= 0.4
    assert s.reads[0][1].startswith(b"HTTP/1.1 200")
    events = s.events()
    assert events[-1][1] == b"[DONE]" and len(token_events(events)) == 5


def test_malformed_fault_sends_one_event_whose_json_does_not_parse(start_sim):
    base, _ = start_sim(*FAST, "--fault-malformed", "1.0")
    s = RawStream(base, chat_body(15))
    events = [d for _, d in s.events() if d != b"[DONE]"]
    bad = []
    for d in events:
        try:
            json.loads(d)
        except ValueError:
            bad.append(d)
    assert len(bad) == 1
    assert s.events()[-1][1] == b"[DONE]"
    assert len(token_events(s.events())) == 15  # the broken event is extra, no token is lost
