"""Specification of the simulator's OpenAI-compatible HTTP API, against a real `harness sim`
process on loopback, read with the official `openai` client and, where the wire format itself
is the point ([DONE], raw event order), with a plain socket reader.

Profile: h200-llama-3-8b-awq (a ~4 ms decode step), so every request here finishes in well
under a second.
"""
from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
from urllib.parse import urlsplit

import openai
import pytest

from conftest import REPO, free_port_block
from servers.simulator import textgen

FAST = ("--profile", "h200-llama-3-8b-awq")
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me about the river near the old mill, please."}]


@pytest.fixture
def base(start_sim) -> str:
    base_url, _ = start_sim(*FAST)
    return base_url


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=20)


def post(base_url: str, path: str, body: bytes | dict, method: str = "POST") -> tuple[int, bytes]:
    u = urlsplit(base_url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"content-type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def get(base_url: str, path: str) -> tuple[int, bytes]:
    return post(base_url, path, b"", method="GET")


def sse_data(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    out = []
    for block in raw.decode().split("\n\n"):
        if block.startswith("data: "):
            out.append(block[len("data: "):])
    return out


def stream_chat(c: openai.OpenAI, **kw) -> list:
    return list(c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **kw))


# -- streaming chat ------------------------------------------------------------------------------

def test_chat_stream_opens_with_a_role_only_event_then_one_event_per_token(base):
    chunks = stream_chat(client(base), max_tokens=12, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True})
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    assert first.finish_reason is None
    token_chunks = [c for c in chunks[1:] if c.choices]
    assert len(token_chunks) == 12 == chunks[-1].usage.completion_tokens
    for c in token_chunks:
        text = c.choices[0].delta.content
        assert textgen.tokenize(text) and len(textgen.tokenize(text)) == 1, text
        assert c.choices[0].delta.role is None


def test_chat_stream_puts_finish_reason_on_the_last_token_event_only(base):
    chunks = stream_chat(client(base), max_tokens=8, extra_body={"ignore_eos": True})
    token_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.choices[0].finish_reason for c in token_chunks] == [None] * 7 + ["length"]


def test_stream_ends_with_a_usage_only_event_with_empty_choices_then_done(base):
    status, raw = post(base, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}})
    assert status == 200
    events = sse_data(raw)
    assert events[-1] == "[DONE]"
    usage_event = json.loads(events[-2])
    assert usage_event["choices"] == []
    assert usage_event["usage"]["completion_tokens"] == 5
    u = usage_event["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert all(json.loads(e)["choices"] for e in events[:-2])  # no other choice-less events


def test_stream_without_include_usage_sends_no_usage_event(base):
    status, raw = post(base, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True})
    events = sse_data(raw)
    assert status == 200 and events[-1] == "[DONE]"
    assert all(json.loads(e)["choices"] and "usage" not in json.loads(e) for e in events[:-1])


def test_ignore_eos_generates_exactly_max_tokens(base):
    c = client(base)
    for max_tokens in (1, 37, 300):
        chunks = stream_chat(c, max_tokens=max_tokens, stream_options={"include_usage": True},
                             extra_body={"ignore_eos": True})
        assert chunks[-1].usage.completion_tokens == max_tokens
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].delta.content) == max_tokens


def test_without_ignore_eos_a_generation_may_stop_early_with_finish_reason_stop(base):
    c = client(base)
    seed = next(s for s in range(100) if textgen.TextStream(s).natural_length(400) < 100)
    chunks = stream_chat(c, max_tokens=400, seed=seed, stream_options={"include_usage": True})
    assert chunks[-1].usage.completion_tokens < 100
    assert [ch for ch in chunks if ch.choices][-1].choices[0].finish_reason == "stop"


def test_min_tokens_is_honoured_when_the_generation_would_stop_earlier(base):
    c = client(base)
    seed = next(s for s in range(100) if textgen.TextStream(s).natural_length(400) < 60)
    plain = stream_chat(c, max_tokens=400, seed=seed, stream_options={"include_usage": True})
    assert plain[-1].usage.completion_tokens < 60  # this seed stops early by itself
    forced = stream_chat(c, max_tokens=400, seed=seed, stream_options={"include_usage": True},
                         extra_body={"min_tokens": 150})
    assert forced[-1].usage.completion_tokens >= 150


def test_continuous_usage_stats_puts_cumulative_usage_in_every_chunk(base):
    chunks = stream_chat(client(base), max_tokens=6, extra_body={"ignore_eos": True},
                         stream_options={"include_usage": True, "continuous_usage_stats": True})
    prompt = chunks[-1].usage.prompt_tokens
    assert all(ch.usage is not None for ch in chunks)
    with_choices = [ch for ch in chunks if ch.choices]
    assert [ch.usage.completion_tokens for ch in with_choices] == [0, 1, 2, 3, 4, 5, 6]
    for ch in chunks:
        assert ch.usage.prompt_tokens == prompt
        assert ch.usage.total_tokens == prompt + ch.usage.completion_tokens


def test_continuous_usage_stats_needs_include_usage_as_in_vllm(base):
    chunks = stream_chat(client(base), max_tokens=3, extra_body={"ignore_eos": True},
                         stream_options={"continuous_usage_stats": True})
    assert chunks and all(ch.usage is None for ch in chunks)


def test_streaming_completion_sends_one_text_event_per_token_then_usage_and_done(base):
    status, raw = post(base, "/v1/completions", {
        "model": MODEL, "prompt": "The river near the mill", "max_tokens": 7, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}})
    events = sse_data(raw)
    assert status == 200 and events[-1] == "[DONE]"
    body = [json.loads(e) for e in events[:-1]]
    assert all(b["object"] == "text_completion" for b in body)
    token_events = [b for b in body if b["choices"]]
    assert len(token_events) == 7  # completions have no role event
    assert [b["choices"][0]["finish_reason"] for b in token_events][-2:] == [None, "length"]
    assert body[-1]["choices"] == [] and body[-1]["usage"]["completion_tokens"] == 7


# -- non-streaming ---------------------------------------------------------------------------------

def test_non_streaming_chat_returns_one_message_with_usage(base):
    r = client(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20,
                                             extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 20
    assert len(textgen.tokenize(r.choices[0].message.content)) == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20


def test_non_streaming_completion_returns_text_with_usage(base):
    r = client(base).completions.create(model=MODEL, prompt="The river near the mill",
                                        max_tokens=9, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.usage.completion_tokens == 9 and len(textgen.tokenize(r.choices[0].text)) == 9
    assert r.usage.prompt_tokens == 1 + len(textgen.tokenize("The river near the mill"))


# -- determinism ---------------------------------------------------------------------------------

def _chat_text(c: openai.OpenAI, **kw) -> str:
    return c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=25,
                                     extra_body={"ignore_eos": True}, **kw).choices[0].message.content


def test_same_seed_gives_the_same_text_and_another_seed_another(base):
    c = client(base)
    assert _chat_text(c, seed=7) == _chat_text(c, seed=7)
    assert _chat_text(c, seed=7) != _chat_text(c, seed=8)


def test_unseeded_sampling_varies_between_requests(base):
    c = client(base)
    assert _chat_text(c) != _chat_text(c)


def test_temperature_zero_gives_the_same_text_for_the_same_prompt_even_across_servers(start_sim):
    a, _ = start_sim(*FAST)
    b, _ = start_sim(*FAST)
    text = _chat_text(client(a), temperature=0)
    assert _chat_text(client(a), temperature=0) == text
    assert _chat_text(client(b), temperature=0) == text  # greedy does not depend on the process
    other = client(a).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Another question."}], max_tokens=25,
        temperature=0, extra_body={"ignore_eos": True}).choices[0].message.content
    assert other != text


# -- other endpoints -------------------------------------------------------------------------------

def test_models_lists_the_served_model(base):
    models = client(base).models.list().data
    assert [m.id for m in models] == [MODEL]
    status, raw = get(base, "/v1/models")
    assert json.loads(raw)["data"][0]["max_model_len"] == 8192


def test_health_answers_200(base):
    assert get(base, "/health")[0] == 200


def test_version_names_a_version(base):
    status, raw = get(base, "/version")
    assert status == 200 and json.loads(raw)["version"]


def test_tokenize_count_for_messages_matches_the_prompt_tokens_a_chat_reports(base):
    status, raw = post(base, "/tokenize", {"model": MODEL, "messages": MESSAGES})
    tok = json.loads(raw)
    assert status == 200
    assert tok["count"] == len(tok["tokens"])
    r = client(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert tok["count"] == r.usage.prompt_tokens


def test_tokenize_count_for_a_prompt_matches_the_prompt_tokens_a_completion_reports(base):
    prompt = "Count these words, and 3 digits: 1 2."
    tok = json.loads(post(base, "/tokenize", {"model": MODEL, "prompt": prompt})[1])
    assert tok["count"] == len(tok["tokens"])
    r = client(base).completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert tok["count"] == r.usage.prompt_tokens


def test_detokenize_inverts_tokenize(base):
    text = " the water is warm, and the river is long."
    tok = json.loads(post(base, "/tokenize", {"model": MODEL, "prompt": text,
                                              "add_special_tokens": False})[1])
    status, raw = post(base, "/detokenize", {"model": MODEL, "tokens": tok["tokens"]})
    assert status == 200 and json.loads(raw)["prompt"] == text


# -- clear errors ----------------------------------------------------------------------------------

def _run_sim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", "sim", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=20)


def test_unknown_profile_exits_2_with_one_stderr_line():
    p = _run_sim("--profile", "tpu-v9-llama-99b", "--port", str(free_port_block()))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown profile" in lines[0] and "tpu-v9-llama-99b" in lines[0]


def test_port_in_use_exits_2_with_one_line_naming_the_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = _run_sim("--port", str(port))
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0]


def test_malformed_json_body_is_400_with_an_openai_style_error(base):
    status, raw = post(base, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400
    err = json.loads(raw)["error"]
    assert "JSON" in err["message"]


def test_connection_stays_usable_after_a_400(base):
    u = urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=b"{nope")
    resp = conn.getresponse()
    assert resp.status == 400 and json.loads(resp.read())["error"]["message"]
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()


def test_unknown_model_is_404(base):
    with pytest.raises(openai.NotFoundError) as e:
        client(base).chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 404
    assert "no-such-model" in e.value.body["message"]


def test_prompt_plus_max_tokens_over_max_model_len_is_400(base):
    with pytest.raises(openai.BadRequestError) as e:
        client(base).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8190)
    assert "maximum context length is 8192" in e.value.body["message"]


def test_replicas_serve_on_consecutive_ports(start_sim):
    base_url, _ = start_sim(*FAST, "--replicas", "3")
    port = urlsplit(base_url).port
    for p in (port, port + 1, port + 2):
        other = f"http://127.0.0.1:{p}"
        assert get(other, "/health")[0] == 200
        r = client(other).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                                  extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
