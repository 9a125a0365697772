"""The client's fast paths give exactly what the general code gives.

* `StreamTimer.feed` skips the JSON parse of an event that matches the template of an earlier
  plain token event (see its docstring): every record field must equal a reference timer that
  parses every event;
* `SSEParser.payloads` equals the payloads of `SSEParser.feed` for every split of a stream;
* `_ChunkedDecoder.feed`'s whole-chunk path equals the general decoder for every split.
"""
from __future__ import annotations

import random

import orjson
import pytest

from harness.http_stream import ProtocolError, _ChunkedDecoder
from harness.sse import SSEParser
from harness.timing import StreamTimer, _template

MS = 1_000_000
SENT = 1_000 * MS


class ParseAll(StreamTimer):
    """Reference: the full parse for every event (no template is ever kept)."""

    __slots__ = ()

    def feed(self, payload, t_ns):
        self._tpl = None
        self._tpl_tries = 99
        super().feed(payload, t_ns)


def head(rid="chatcmpl-1", obj="chat.completion.chunk"):
    return b'{"id":"%s","object":"%s","created":1,"model":"m","choices":[{"index":0,' % (
        rid.encode(), obj.encode())


def chat_event(text, finish=None, rid="chatcmpl-1", extra=b""):
    fin = b"null" if finish is None else orjson.dumps(finish)
    return (head(rid) + b'"delta":{"content":' + orjson.dumps(text) + b'},"logprobs":null,'
            b'"finish_reason":' + fin + b"}]" + extra + b"}")


ROLE = head() + b'"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}'
USAGE = b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],' \
        b'"usage":{"prompt_tokens":5,"total_tokens":9,"completion_tokens":4}}'


def both(events, count_tokens=None):
    fast = StreamTimer(SENT, SENT - MS, count_tokens)
    ref = ParseAll(SENT, SENT - MS, count_tokens)
    for i, p in enumerate(events):
        fast.feed(p, SENT + (i + 1) * MS)
        ref.feed(p, SENT + (i + 1) * MS)
    a = fast.finish(url="u", model="m", id="x", end_ns=SENT + 100 * MS)
    b = ref.finish(url="u", model="m", id="x", end_ns=SENT + 100 * MS)
    assert a == b
    assert fast.finish_reason == ref.finish_reason and fast.response_id == ref.response_id
    return a, fast


def words(n):
    return [f" w{i}" for i in range(n)]


def test_plain_stream_uses_the_template_and_matches_the_full_parse():
    evs = [ROLE] + [chat_event(w) for w in words(50)] + [chat_event(" end", "length"), USAGE, b"[DONE]"]
    rec, fast = both(evs)
    assert fast._tpl is not None and fast._tpl_tries <= 2
    assert rec.ok and rec.output_tokens == 4 and len(rec.itl_ms) == 50


@pytest.mark.parametrize("odd", [
    "quote \" inside", "back\\slash", "new\nline", "tab\t", "caf\u00e9", "\u4e2d\u6587", "",
    "tpl-probe", "emoji \U0001F600", "\u0000"])
def test_texts_the_template_must_not_take_fall_back_and_still_count(odd):
    evs = [ROLE, chat_event(" a"), chat_event(odd), chat_event(" b"), chat_event(odd),
           chat_event(" c", "stop"), b"[DONE]"]
    rec, _ = both(evs, count_tokens=lambda text: len(text))
    assert rec.ok and rec.tokens_estimated
    assert rec.output_tokens == len(" a" + odd + " b" + odd + " c")


def test_estimated_tokens_see_the_same_text_through_the_fast_path():
    evs = [ROLE] + [chat_event(w) for w in words(30)] + [chat_event("!", "length"), b"[DONE]"]
    seen = []
    rec, fast = both(evs, count_tokens=lambda text: seen.append(text) or 7)
    assert fast._tpl is not None
    assert seen[0] == seen[1] == "".join(words(30)) + "!"
    assert rec.output_tokens == 7 and rec.tokens_estimated


@pytest.mark.parametrize("variant", [
    # events that share the template's bytes around the text but are not plain token events
    lambda: chat_event(" x", "length"),
    lambda: chat_event(" x", extra=b',"usage":{"prompt_tokens":1,"total_tokens":3,"completion_tokens":2}'),
    lambda: chat_event(" x", extra=b',"usage":null'),
    lambda: head() + b'"delta":{"content":" x","tool_calls":[{"index":0,"function":{"name":"f"}}]},'
                     b'"logprobs":null,"finish_reason":null}]}',
    lambda: head() + b'"delta":{"content":null},"logprobs":null,"finish_reason":null}]}',
    lambda: head() + b'"delta":{"content":1},"logprobs":null,"finish_reason":null}]}',
    lambda: head() + b'"delta":{"content":" x" },"logprobs":null,"finish_reason":null}]}',
    lambda: head() + b'"delta":{"content":" x"},"logprobs":null,"finish_reason":null}]',   # cut
    lambda: head() + b'"delta":{"content":" x"x"},"logprobs":null,"finish_reason":null}]}',
    lambda: head() + b'"delta":{"content":"a","b":"c"},"logprobs":null,"finish_reason":null}]}',
    lambda: chat_event(" x", rid="chatcmpl-2"),
    lambda: b'{"error":{"message":"boom"}}',
    lambda: head() + b'"delta":{"content":"\xff"},"logprobs":null,"finish_reason":null}]}',
])
def test_lookalike_events_take_the_full_parse(variant):
    evs = [ROLE, chat_event(" a"), chat_event(" b"), variant(), chat_event(" c"),
           chat_event(" d", "length"), USAGE, b"[DONE]"]
    both(evs, count_tokens=len)


def test_completions_stream_and_malformed_tail():
    def comp(text, finish=None):
        return (head("cmpl-1", "text_completion") + b'"text":' + orjson.dumps(text) +
                b',"logprobs":null,"finish_reason":' + (b"null" if finish is None else orjson.dumps(finish)) +
                b',"stop_reason":null}]}')
    evs = [comp(w) for w in words(20)] + [comp(" z", "length"), b"[DONE]"]
    rec, fast = both(evs, count_tokens=len)
    assert fast._tpl is not None and rec.ok
    # the simulator's malformed-event fault: the same prefix, then the event is cut
    evs = [comp(w) for w in words(5)] + [head("cmpl-1", "text_completion") + b'"text":"'] + \
          [comp(" z", "length"), b"[DONE]"]
    rec, _ = both(evs)
    assert not rec.ok and rec.error_kind == "malformed_event"


def test_continuous_usage_and_random_streams_match_the_full_parse():
    rng = random.Random(3)
    pool = [" plain", " more", "\n", "\"q\"", "\u00e9", "", " x"]
    for _trial in range(200):
        evs = [ROLE]
        n = rng.randint(1, 40)
        cum = 0
        for i in range(n):
            text = rng.choice(pool)
            if rng.random() < 0.1:
                cum += rng.randint(1, 3)
                extra = b',"usage":{"prompt_tokens":5,"total_tokens":%d,"completion_tokens":%d}' % (5 + cum, cum)
            else:
                cum += 1
                extra = b""
            evs.append(chat_event(text, "length" if i == n - 1 else None, extra=extra))
        if rng.random() < 0.5:
            evs.append(b'{"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":5,"total_tokens":%d,'
                       b'"completion_tokens":%d}}' % (5 + cum, cum))
        if rng.random() < 0.8:
            evs.append(b"[DONE]")
        both(evs, count_tokens=len)


def test_template_requires_the_text_to_be_found_exactly_once():
    p = chat_event(" same") .replace(b'"model":"m"', b'"model":"m","note":{"content":" same"}')
    obj = orjson.loads(p)
    assert _template(p, obj) is None


# -- feed_reads: SSE split and template check fused over a response's reads ---------------------

def reads_of(events, rng, crlf=False):
    """The SSE bytes of ``events`` cut into reads: mostly one event per read, as servers write,
    sometimes several, sometimes split in the middle (each read stamped 1 ms apart)."""
    end = b"\r\n\r\n" if crlf else b"\n\n"
    stream = b"".join(b"data: " + e + end for e in events)
    cuts, pos = [], 0
    for e in events:
        pos += len(b"data: " + e + end)
        cuts.append(pos)
    out, last = [], 0
    for c in cuts:
        r = rng.random()
        if r < 0.15:
            continue                              # this event joins the next read
        if r < 0.3 and c - last > 2:
            mid = rng.randint(last + 1, c - 1)    # a read ends inside the event
            out.append(stream[last:mid])
            last = mid
        out.append(stream[last:c])
        last = c
    if last < len(stream):
        out.append(stream[last:])
    return [(d, SENT + (i + 1) * MS) for i, d in enumerate(out)]


def via_reads(reads, count_tokens=None, timer_cls=StreamTimer):
    timer = timer_cls(SENT, SENT - MS, count_tokens)
    parser = SSEParser()
    last = timer.feed_reads(reads, parser)
    for payload, t in parser.finish(last or SENT):
        timer.feed(payload, t)
    return timer


def via_payloads(reads, count_tokens=None):
    timer = ParseAll(SENT, SENT - MS, count_tokens)
    parser = SSEParser()
    t = SENT
    for data, t in reads:
        for payload in parser.payloads(data):
            timer.feed(payload, t)
    for payload, t2 in parser.finish(t):
        timer.feed(payload, t2)
    return timer


@pytest.mark.parametrize("crlf", [False, True])
def test_feed_reads_equals_splitting_and_parsing_every_event(crlf):
    rng = random.Random(11)
    pool = [" plain", " more", "\n", "\"q\"", "\u00e9", "", " x", "a\rb", "\\"]
    fast_hits = 0
    for trial in range(300):
        evs = [ROLE] + [chat_event(rng.choice(pool) if rng.random() < 0.2 else f" w{i}")
                        for i in range(rng.randint(0, 60))]
        evs.append(chat_event(" end", "length"))
        if rng.random() < 0.5:
            evs.append(USAGE)
        if rng.random() < 0.2:
            evs.insert(rng.randint(1, len(evs)), b'{"error":{"message":"x"}}')
        if rng.random() < 0.8:
            evs.append(b"[DONE]")
        if rng.random() < 0.1:
            evs.append(chat_event(" after done"))
        reads = reads_of(evs, rng, crlf)
        count = len if rng.random() < 0.5 else None
        a, b = via_reads(reads, count), via_payloads(reads, count)
        ra = a.finish(url="u", model="m", id="x", end_ns=SENT + 10_000 * MS)
        rb = b.finish(url="u", model="m", id="x", end_ns=SENT + 10_000 * MS)
        assert ra == rb, (trial, reads)
        assert a.finish_reason == b.finish_reason and a.response_id == b.response_id
        fast_hits += a._tpl is not None
    assert fast_hits > 100   # the template path was really taken


def test_feed_reads_counts_plain_reads_without_the_per_event_path():
    calls = []

    class Spy(StreamTimer):
        __slots__ = ()

        def feed(self, payload, t_ns):
            calls.append(payload)
            super().feed(payload, t_ns)

    evs = [ROLE] + [chat_event(w) for w in words(100)] + [chat_event(" z", "length"), USAGE, b"[DONE]"]
    reads = [(b"data: " + e + b"\n\n", SENT + (i + 1) * MS) for i, e in enumerate(evs)]
    timer = via_reads(reads, timer_cls=Spy)
    rec = timer.finish(url="u", model="m", id="x", end_ns=SENT + 500 * MS)
    assert rec.ok and rec.output_tokens == 4 and len(rec.itl_ms) == 100
    assert len(calls) < 10, len(calls)   # role, first tokens (template), finish, usage, [DONE]


# -- SSE payloads ------------------------------------------------------------------------------

SSE_STREAMS = [
    b"data: a\n\ndata: b\n\n",
    b"data: one\n\n",
    b": keepalive\n\ndata: x\n\nevent: e\ndata: y\ndata: z\n\n",
    b"data: a\r\n\r\ndata: b\r\n\r\n",
    b"data:nospace\n\ndata\n\ndatax: no\n\n",
    b"data: a\n\n\ndata: b\n\n\n\n",
    b"data: [DONE]\n",
]


@pytest.mark.parametrize("stream", SSE_STREAMS)
def test_payloads_equal_feed_for_every_split(stream):
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1):
            parts = [stream[:cut], stream[cut:cut2], stream[cut2:]]
            a, b = SSEParser(), SSEParser()
            got_a = [p for part in parts for p, _ in a.feed(part, 0)] + [p for p, _ in a.finish(0)]
            got_b = [p for part in parts for p in b.payloads(part)] + [p for p, _ in b.finish(0)]
            assert got_a == got_b, (parts, got_a, got_b)


# -- chunked decoding ---------------------------------------------------------------------------

def chunked(pieces, ext=False):
    out = b"".join(b"%x%s\r\n%s\r\n" % (len(p), b";x=1" if ext else b"", p) for p in pieces)
    return out + b"0\r\n\r\n"


@pytest.mark.parametrize("body", [
    chunked([b"data: a\n\n", b"data: bb\n\n", b"x" * 300]),
    chunked([b"a", b"b"], ext=True),
    b"5\nhello\n0\n\n",                       # bare LF framing
    b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\nEXTRA",
])
def test_chunked_fast_path_equals_general_decoder(body):
    for cut in range(len(body) + 1):
        for cut2 in range(cut, len(body) + 1, 3):
            fast = _ChunkedDecoder()
            general = _ChunkedDecoder()
            got_fast = b"".join(fast.feed(p) for p in (body[:cut], body[cut:cut2], body[cut2:]) if p)
            got_gen = b"".join(general._feed(p) for p in (body[:cut], body[cut:cut2], body[cut2:]) if p)
            assert got_fast == got_gen
            assert (fast.done, fast.leftover) == (general.done, general.leftover)


def test_chunked_fast_path_rejects_what_the_general_decoder_rejects():
    for bad in (b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"-5\r\nhello\r\n"):
        with pytest.raises(ProtocolError):
            d = _ChunkedDecoder()
            d.feed(bad)
            d.feed(b"\r\n0\r\n\r\n")


def test_feed_reads_leaves_a_read_that_completes_a_pending_event_to_the_sse_parser():
    # A multi-line event cut at a line end: its first line waits in the parser, so the next read,
    # though it looks like one plain event, completes a two-line payload (not valid JSON here).
    evs = [ROLE] + [chat_event(w) for w in words(5)]
    reads = [(b"data: " + e + b"\n\n", SENT + (i + 1) * MS) for i, e in enumerate(evs)]
    reads += [(b"data: x\n", SENT + 10 * MS), (b"data: " + chat_event(" y") + b"\n\n", SENT + 11 * MS),
              (b"data: " + chat_event(" z", "stop") + b"\n\ndata: [DONE]\n\n", SENT + 12 * MS)]
    a, b = via_reads(reads), via_payloads(reads)
    ra = a.finish(url="u", model="m", id="x", end_ns=SENT + 100 * MS)
    assert ra == b.finish(url="u", model="m", id="x", end_ns=SENT + 100 * MS)
    assert not ra.ok and ra.error_kind == "malformed_event"
