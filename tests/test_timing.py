"""Specification of harness.timing: the metric definitions (README, "Metric definitions")
applied to real vLLM events."""

from __future__ import annotations

import time

import orjson
import pytest

from harness.http_stream import ConnectError, Disconnected, ReadTimeout
from harness.sse import SSEParser
from harness.timing import (
    RequestRecord,
    StreamTimer,
    exception_error_kind,
    failed_record,
    http_error_kind,
    perf_ns_to_epoch,
)

MS = 1_000_000
SENT = 1_000 * MS  # an arbitrary perf_counter_ns origin
URL = "http://127.0.0.1:8000/v1/chat/completions"


def chat(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    obj = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if usage is not None:
        obj["usage"] = usage
    return orjson.dumps(obj)


def usage_event(prompt: int, completion: int) -> bytes:
    return orjson.dumps({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                         "model": "m", "choices": [],
                         "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                                   "completion_tokens": completion}})


def completion(text: str, finish: str | None = None) -> bytes:
    return orjson.dumps({"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                         "choices": [{"index": 0, "text": text, "logprobs": None,
                                      "finish_reason": finish, "stop_reason": None}]})


ROLE = chat({"role": "assistant", "content": ""})
DONE = b"[DONE]"


def vllm_chat_stream(token_ms: list[float], words: list[str] | None = None) -> list[tuple[bytes, int]]:
    """Role event at 5 ms, one event per token at the given ms, finish on the last, usage, DONE."""
    words = words or [f" w{i}" for i in range(len(token_ms))]
    events = [(ROLE, SENT + 5 * MS)]
    for i, (t, w) in enumerate(zip(token_ms, words)):
        finish = "length" if i == len(token_ms) - 1 else None
        events.append((chat({"content": w}, finish), SENT + int(t * MS)))
    end = SENT + int(token_ms[-1] * MS) + MS
    events.append((usage_event(10, len(token_ms)), end))
    events.append((DONE, end))
    return events


def run(events, **kw) -> RequestRecord:
    timer = StreamTimer(kw.pop("sent_ns", SENT), kw.pop("scheduled_ns", None),
                        kw.pop("count_tokens", None))
    timer.feed_events(events)
    return timer.finish(url=URL, model="m", user_class="ChatUser", **kw)


# -- token-carrying events ---------------------------------------------------------------------


def test_ttft_is_first_token_event_minus_send_not_the_role_event():
    rec = run(vllm_chat_stream([100, 120, 140, 160]))
    assert rec.ok and rec.error_kind is None
    assert rec.ttft_ms == 100.0


def test_e2e_is_last_token_event_not_usage_or_done():
    rec = run(vllm_chat_stream([100, 120, 140, 160]))
    assert rec.e2e_ms == 160.0


def test_empty_content_delta_after_the_role_event_counts_as_a_token():
    events = [(ROLE, SENT + 5 * MS),
              (chat({"content": ""}), SENT + 50 * MS),  # e.g. half of a multi-byte character
              (chat({"content": "é"}, "stop"), SENT + 70 * MS),
              (usage_event(10, 2), SENT + 71 * MS), (DONE, SENT + 71 * MS)]
    rec = run(events)
    assert rec.ttft_ms == 50.0
    assert rec.icl_ms == [20.0]


def test_role_event_with_text_counts_as_a_token():
    events = [(chat({"role": "assistant", "content": "Hi"}), SENT + 30 * MS),
              (chat({"role": "assistant", "content": "!"}, "stop"), SENT + 40 * MS),
              (DONE, SENT + 41 * MS)]
    assert run(events).ttft_ms == 30.0


@pytest.mark.parametrize("delta", [
    {"reasoning_content": "Let me think"},
    {"reasoning": "Let me think"},
    {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]},
])
def test_reasoning_and_tool_call_deltas_count_as_tokens(delta):
    events = [(ROLE, SENT + 5 * MS), (chat(delta), SENT + 40 * MS),
              (chat({"content": "x"}, "stop"), SENT + 60 * MS), (DONE, SENT + 61 * MS)]
    assert run(events).ttft_ms == 40.0


def test_empty_final_delta_without_content_key_is_not_a_token():
    events = [(ROLE, SENT + 5 * MS), (chat({"content": "a"}), SENT + 40 * MS),
              (chat({"content": "b"}), SENT + 60 * MS),
              (chat({}, "stop"), SENT + 90 * MS), (DONE, SENT + 91 * MS)]
    rec = run(events)
    assert rec.ok and rec.e2e_ms == 60.0


def test_completions_stream_counts_every_choice_with_text():
    events = [(completion(" The"), SENT + 80 * MS), (completion(""), SENT + 90 * MS),
              (completion(" end", "length"), SENT + 110 * MS),
              (usage_event(5, 3), SENT + 111 * MS), (DONE, SENT + 111 * MS)]
    rec = run(events)
    assert (rec.ttft_ms, rec.e2e_ms, rec.output_tokens) == (80.0, 110.0, 3)
    assert rec.icl_ms == [10.0, 20.0]


# -- tokens, TPOT, ITL ---------------------------------------------------------------------------


def test_output_tokens_come_from_final_usage_not_from_counting_events():
    # 3 events but the server generated 5 tokens (text of several tokens merged into one event)
    events = vllm_chat_stream([100, 130, 160])[:-2] + [(usage_event(10, 5), SENT + 161 * MS),
                                                      (DONE, SENT + 161 * MS)]
    rec = run(events)
    assert (rec.output_tokens, rec.tokens_estimated, rec.input_tokens) == (5, False, 10)


def test_tpot_is_decode_time_over_tokens_after_the_first():
    rec = run(vllm_chat_stream([100, 120, 140, 160]))
    assert rec.tpot_ms == pytest.approx(60.0 / 3)


def test_tpot_is_undefined_for_a_one_token_output():
    rec = run(vllm_chat_stream([100]))
    assert rec.ok and rec.output_tokens == 1 and rec.tpot_ms is None
    assert rec.itl_ms == [] and rec.icl_ms == []


def test_without_continuous_usage_itl_equals_the_raw_event_gaps():
    rec = run(vllm_chat_stream([100, 110, 135, 175]))
    assert rec.icl_ms == [10.0, 25.0, 40.0]
    assert rec.itl_ms == rec.icl_ms


def test_continuous_usage_splits_each_gap_over_the_tokens_the_later_event_carries():
    cu = lambda n: {"prompt_tokens": 10, "total_tokens": 10 + n, "completion_tokens": n}  # noqa: E731
    events = [(chat({"role": "assistant", "content": ""}, usage=cu(0)), SENT + 5 * MS),
              (chat({"content": " a"}, usage=cu(1)), SENT + 100 * MS),
              (chat({"content": " b c"}, usage=cu(3)), SENT + 130 * MS),  # 2 tokens in 30 ms
              (chat({"content": " d e f"}, "length", usage=cu(6)), SENT + 160 * MS),  # 3 in 30 ms
              (usage_event(10, 6), SENT + 161 * MS), (DONE, SENT + 161 * MS)]
    rec = run(events)
    assert rec.icl_ms == [30.0, 30.0]
    assert rec.itl_ms == [15.0, 15.0, 10.0, 10.0, 10.0]
    assert len(rec.itl_ms) == rec.output_tokens - 1
    assert sum(rec.itl_ms) / len(rec.itl_ms) == pytest.approx(rec.tpot_ms)


def test_tokens_arriving_with_the_first_token_get_zero_itl_entries():
    cu = lambda n: {"prompt_tokens": 10, "total_tokens": 10 + n, "completion_tokens": n}  # noqa: E731
    events = [(chat({"content": " a b"}, usage=cu(2)), SENT + 100 * MS),
              (chat({"content": " c"}, "length", usage=cu(3)), SENT + 120 * MS),
              (DONE, SENT + 121 * MS)]
    rec = run(events)
    assert rec.itl_ms == [0.0, 20.0]
    assert rec.output_tokens == 3


def test_usage_only_on_the_last_token_event_is_not_read_as_one_event_carrying_everything():
    events = [(ROLE, SENT + 5 * MS), (chat({"content": "a"}), SENT + 100 * MS),
              (chat({"content": "b"}), SENT + 120 * MS),
              (chat({"content": "c"}, "stop", usage={"prompt_tokens": 4, "completion_tokens": 3,
                                                     "total_tokens": 7}), SENT + 140 * MS),
              (DONE, SENT + 141 * MS)]
    rec = run(events)
    assert rec.itl_ms == [20.0, 20.0]


def test_without_usage_the_tokenizer_callback_estimates_output_tokens():
    events = [(ROLE, SENT + 5 * MS), (chat({"content": "one two"}), SENT + 100 * MS),
              (chat({"content": " three"}, "stop"), SENT + 120 * MS), (DONE, SENT + 121 * MS)]
    rec = run(events, count_tokens=lambda text: len(text.split()))
    assert (rec.output_tokens, rec.tokens_estimated) == (3, True)
    assert rec.tpot_ms == pytest.approx(10.0)


def test_without_usage_or_tokenizer_output_tokens_are_unknown_not_event_counts():
    events = [(ROLE, SENT + 5 * MS), (chat({"content": "a"}), SENT + 100 * MS),
              (chat({"content": "b"}, "stop"), SENT + 120 * MS), (DONE, SENT + 121 * MS)]
    rec = run(events)
    assert rec.ok and rec.output_tokens is None and rec.tpot_ms is None
    assert rec.itl_ms == [20.0]


def test_prompt_tokens_fall_back_to_the_callers_count():
    events = [(ROLE, SENT + 5 * MS), (chat({"content": "a"}, "stop"), SENT + 100 * MS),
              (DONE, SENT + 101 * MS)]
    assert run(events, input_tokens=42).input_tokens == 42


# -- schedule ------------------------------------------------------------------------------------


def test_schedule_lag_and_ttft_from_schedule_use_the_scheduled_time():
    rec = run(vllm_chat_stream([100, 120]), scheduled_ns=SENT - 30 * MS)
    assert rec.schedule_lag_ms == 30.0
    assert rec.ttft_from_schedule_ms == 130.0
    assert rec.ttft_ms == 100.0


def test_without_a_schedule_the_schedule_fields_are_null():
    rec = run(vllm_chat_stream([100, 120]))
    assert rec.scheduled_at is None and rec.schedule_lag_ms is None
    assert rec.ttft_from_schedule_ms is None


def test_wall_clock_fields_are_epoch_seconds_matching_perf_counter_offsets():
    # bracket the stamp with wall-clock reads, so a pause of this thread between them (a shared
    # CI machine) does not count against the conversion's 50 ms
    before = time.time()
    now_ns = time.perf_counter_ns()
    after = time.time()
    assert before - 0.05 <= perf_ns_to_epoch(now_ns) <= after + 0.05
    rec = run(vllm_chat_stream([100]), sent_ns=now_ns, scheduled_ns=now_ns - 2 * MS,
              end_ns=now_ns + 200 * MS)
    assert rec.sent_at - rec.scheduled_at == pytest.approx(0.002, abs=1e-6)
    assert rec.finished_at - rec.sent_at == pytest.approx(0.2, abs=1e-6)


# -- errors --------------------------------------------------------------------------------------


def test_invalid_json_event_fails_the_request_as_malformed_event():
    events = vllm_chat_stream([100, 120])
    events.insert(2, (b'{"choices":[{"delta":{"content":"x"', SENT + 110 * MS))
    rec = run(events)
    assert (rec.ok, rec.error_kind) == (False, "malformed_event")


def test_stream_ending_without_done_or_finish_is_a_disconnect():
    events = vllm_chat_stream([100, 120, 140])[:3]  # role + 2 tokens, then nothing
    rec = run(events)
    assert (rec.ok, rec.error_kind) == (False, "disconnect")


def test_finish_reason_without_done_is_a_complete_stream():
    events = vllm_chat_stream([100, 120])[:-1]  # everything but [DONE]
    assert run(events).ok


def test_complete_stream_without_tokens_is_empty_output():
    events = [(ROLE, SENT + 5 * MS), (chat({}, "stop"), SENT + 6 * MS),
              (usage_event(10, 0), SENT + 6 * MS), (DONE, SENT + 6 * MS)]
    rec = run(events)
    assert (rec.ok, rec.error_kind, rec.output_tokens) == (False, "empty_output", 0)


def test_error_object_inside_the_stream_is_a_stream_error():
    events = [(ROLE, SENT + 5 * MS),
              (b'{"error":{"object":"error","message":"engine dead","type":"InternalServerError",'
               b'"code":500}}', SENT + 50 * MS), (DONE, SENT + 51 * MS)]
    assert run(events).error_kind == "stream_error"


def test_transport_error_given_by_the_caller_fails_the_request():
    rec = run(vllm_chat_stream([100, 120])[:2], error_kind="timeout")
    assert (rec.ok, rec.error_kind) == (False, "timeout")


def test_failed_request_has_null_latencies_but_keeps_schedule_lag():
    rec = run(vllm_chat_stream([100, 120])[:2], scheduled_ns=SENT - 4 * MS)
    assert not rec.ok
    assert (rec.ttft_ms, rec.tpot_ms, rec.e2e_ms, rec.itl_ms, rec.icl_ms,
            rec.ttft_from_schedule_ms) == (None, None, None, [], [], None)
    assert rec.schedule_lag_ms == 4.0


def test_http_status_maps_to_http_code_kind():
    assert http_error_kind(200) is None
    assert http_error_kind(429) == "http_429"
    assert http_error_kind(503) == "http_503"


def test_exceptions_map_to_error_kinds():
    assert exception_error_kind(ConnectError("x")) == "connect"
    assert exception_error_kind(ReadTimeout("x")) == "timeout"
    assert exception_error_kind(Disconnected("x")) == "disconnect"
    assert exception_error_kind(TimeoutError("x")) == "timeout"
    assert exception_error_kind(ConnectionRefusedError()) == "connect"
    assert exception_error_kind(ConnectionResetError()) == "disconnect"


def test_failed_record_for_a_request_that_never_streamed():
    rec = failed_record(error_kind="http_400", status=400, url=URL, model="m",
                        user_class="ChatUser", sent_ns=SENT, scheduled_ns=SENT - MS,
                        input_tokens=12)
    assert (rec.ok, rec.status, rec.error_kind, rec.ttft_ms, rec.input_tokens) == \
        (False, 400, "http_400", None, 12)
    assert rec.schedule_lag_ms == 1.0


# -- record --------------------------------------------------------------------------------------


def test_json_line_has_the_contract_fields_in_order_and_nulls():
    rec = run(vllm_chat_stream([100, 120]), id="r1")
    line = rec.to_json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = orjson.loads(line)
    assert list(obj)[:16] == ["id", "user_class", "url", "model", "scheduled_at", "sent_at", "ok",
                              "status", "error_kind", "input_tokens", "output_tokens",
                              "tokens_estimated", "ttft_ms", "tpot_ms", "e2e_ms", "itl_ms"]
    assert {"icl_ms", "ttft_from_schedule_ms", "schedule_lag_ms", "finished_at"} <= set(obj)
    assert obj["id"] == "r1" and obj["scheduled_at"] is None and obj["itl_ms"] == [20.0]


def test_times_are_kept_to_the_microsecond():
    events = [(ROLE, SENT), (chat({"content": "a"}), SENT + 12_345_678),
              (chat({"content": "b"}, "stop"), SENT + 20_000_000), (DONE, SENT + 20_000_001)]
    assert run(events).ttft_ms == 12.346


def test_timer_fed_from_the_sse_parser_uses_the_reads_times():
    body = b"".join(b"data: " + p + b"\n\n" for p, _ in vllm_chat_stream([1, 2, 3]))
    parser = SSEParser()
    timer = StreamTimer(SENT)
    first_token_end = body.index(b"\n\n", body.index(b'" w0"')) + 2
    cut1 = first_token_end - 1  # the first token event is completed by the second read
    cut2 = len(body) - 3  # and the stream by the third
    for data, t in ((body[:cut1], SENT + 100 * MS), (body[cut1:cut2], SENT + 150 * MS),
                    (body[cut2:], SENT + 190 * MS)):
        timer.feed_events(parser.feed(data, t))
    rec = timer.finish(url=URL, model="m")
    assert rec.ok and rec.output_tokens == 3
    assert rec.ttft_ms == 150.0
    assert rec.e2e_ms == 150.0  # all tokens were complete by the second read


def test_request_ids_are_unique_within_a_process_and_across_forked_workers():
    import os

    from harness.timing import request_id

    mine = {request_id() for _ in range(1000)}
    assert len(mine) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in mine)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # a Locust worker forked by --processes
        os.close(r)
        os.write(w, "\n".join(request_id() for _ in range(1000)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = set(f.read().split("\n"))
    os.waitpid(pid, 0)
    assert len(child) == 1000 and not child & mine
