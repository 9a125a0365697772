"""Specification of harness.sse.SSEParser: SSE events out of socket reads, stamped with read times."""

from harness.sse import SSEParser

ROLE = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]}\n\n'
)
TOKEN = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":" word"},"logprobs":null,"finish_reason":null}]}\n\n'
)
DONE = b"data: [DONE]\n\n"


def payload_of(event: bytes) -> bytes:
    return event[len(b"data: "):].rstrip(b"\n")


def test_one_event_in_one_read_is_returned_with_the_read_time():
    p = SSEParser()
    assert p.feed(TOKEN, 123) == [(payload_of(TOKEN), 123)]


def test_event_split_across_many_reads_is_stamped_with_the_read_that_completed_it():
    p = SSEParser()
    stream = ROLE
    pieces = [stream[i:i + 7] for i in range(0, len(stream), 7)]
    out = []
    for t, piece in enumerate(pieces):
        out += p.feed(piece, t)
    assert out == [(payload_of(ROLE), len(pieces) - 1)]


def test_event_completed_by_its_final_newline_alone_gets_that_reads_time():
    p = SSEParser()
    assert p.feed(TOKEN[:-1], 1) == []
    assert p.feed(b"\n", 2) == [(payload_of(TOKEN), 2)]


def test_many_events_in_one_read_all_get_that_reads_time():
    p = SSEParser()
    out = p.feed(ROLE + TOKEN + TOKEN + DONE, 50)
    assert out == [(payload_of(ROLE), 50), (payload_of(TOKEN), 50), (payload_of(TOKEN), 50),
                   (b"[DONE]", 50)]


def test_read_ending_mid_event_keeps_the_tail_for_the_next_read():
    p = SSEParser()
    assert p.feed(TOKEN + DONE[:5], 1) == [(payload_of(TOKEN), 1)]
    assert p.feed(DONE[5:], 2) == [(b"[DONE]", 2)]


def test_crlf_separators_are_understood():
    p = SSEParser()
    data = TOKEN.replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
    assert p.feed(data, 9) == [(payload_of(TOKEN), 9), (b"[DONE]", 9)]


def test_crlf_split_between_cr_and_lf_is_one_line_end():
    p = SSEParser()
    assert p.feed(b"data: a\r\n\r", 1) == []
    assert p.feed(b"\ndata: b\r", 2) == [(b"a", 2)]
    assert p.feed(b"\n\r\n", 3) == [(b"b", 3)]


def test_bare_cr_line_endings_are_understood():
    p = SSEParser()
    assert p.feed(b"data: a\r\rdata: b\r\r", 1) == [(b"a", 1)]
    assert p.feed(b"data: c\n\n", 2) == [(b"b", 2), (b"c", 2)]


def test_comment_lines_are_ignored_and_a_comment_only_event_yields_nothing():
    p = SSEParser()
    assert p.feed(b": ping - 2024-01-01 00:00:00\n\n", 1) == []
    assert p.feed(b": keep-alive\ndata: x\n\n", 2) == [(b"x", 2)]


def test_multi_line_data_fields_are_joined_with_newline():
    p = SSEParser()
    assert p.feed(b"data: {\"a\":\ndata: 1}\n\n", 1) == [(b'{"a":\n1}', 1)]


def test_data_without_space_after_colon_is_accepted():
    p = SSEParser()
    assert p.feed(b'data:{"x":1}\n\n', 1) == [(b'{"x":1}', 1)]


def test_only_one_leading_space_is_stripped():
    p = SSEParser()
    assert p.feed(b"data:  two\n\n", 1) == [(b" two", 1)]


def test_other_fields_are_ignored():
    p = SSEParser()
    assert p.feed(b"event: message\nid: 7\nretry: 10\ndata: x\n\n", 1) == [(b"x", 1)]
    assert p.feed(b"event: ping\n\n", 2) == []


def test_bare_data_line_is_an_empty_payload():
    p = SSEParser()
    assert p.feed(b"data\n\n", 1) == [(b"", 1)]


def test_extra_blank_lines_between_events_do_not_create_events():
    p = SSEParser()
    assert p.feed(b"data: a\n\n\n\ndata: b\n\n\n", 1) == [(b"a", 1), (b"b", 1)]


def test_finish_returns_a_last_event_missing_its_blank_line():
    p = SSEParser()
    assert p.feed(TOKEN + b"data: [DONE]\n", 1) == [(payload_of(TOKEN), 1)]
    assert p.finish(2) == [(b"[DONE]", 2)]


def test_finish_drops_a_line_cut_off_mid_way():
    p = SSEParser()
    p.feed(b'data: {"choices":[{"delta":{"cont', 1)
    assert p.pending > 0
    assert p.finish(2) == []


def test_empty_read_returns_nothing():
    p = SSEParser()
    assert p.feed(b"", 1) == []
