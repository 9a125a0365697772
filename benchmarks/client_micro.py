"""Per-token CPU of each stage of our client's read path, with no network and no event loop.

Replays one recorded simulator response (chat, 128 tokens, one HTTP chunk per socket read, as
the simulator writes them) through the stages `LLMUser._one_request` runs, cumulatively:

1. chunked decoding (`http_stream._ChunkedDecoder`),
2. + SSE splitting (`sse.SSEParser.payloads`),
3. + timing (`timing.StreamTimer.feed` and `finish`),
4. + the plugin's per-request histogram work (`HistogramSet.add_record` into the three sets
   `LLMState.record` keeps: window, pending, per-name).

What this leaves out (measured end to end by `client_cost.py`): the socket read itself, the
gevent hub switch and per-wait timeout, Locust's request event and the requests.jsonl write.

    .venv/bin/python benchmarks/client_micro.py            # builds the stream from the simulator's code
"""
from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.histograms import HistogramSet  # noqa: E402
from harness.http_stream import _ChunkedDecoder  # noqa: E402
from harness.sse import SSEParser  # noqa: E402
from harness.timing import StreamTimer  # noqa: E402


def simulator_reads(n_tokens: int = 128) -> list[bytes]:
    """The socket reads of one streamed chat response, as the simulator writes them (one HTTP
    chunk per token; the role event shares the first token's write; usage and [DONE] the last)."""
    rid = b"chatcmpl-c6585f4bb8d949849bd40abf"
    head = (b'data: {"id":"%s","object":"chat.completion.chunk","created":1795701313,'
            b'"model":"meta-llama/Meta-Llama-3-8B-Instruct","choices":[{"index":0,' % rid)

    def chunk(data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data)

    words = [b" notice", b" condition", b" oxygen", b" the", b" river", b" mill"]
    reads = []
    for i in range(n_tokens):
        last = i == n_tokens - 1
        ev = head + b'"delta":{"content":"%s"},"logprobs":null,"finish_reason":%s}]}\n\n' % (
            words[i % len(words)], b'"length","stop_reason":null' if last else b"null")
        out = chunk(ev)
        if i == 0:
            out = chunk(head + b'"delta":{"role":"assistant","content":""},"logprobs":null,'
                               b'"finish_reason":null}]}\n\n') + out
        if last:
            out += chunk(b'data: {"id":"%s","object":"chat.completion.chunk","created":1795701313,'
                         b'"model":"meta-llama/Meta-Llama-3-8B-Instruct","choices":[],"usage":'
                         b'{"prompt_tokens":20,"total_tokens":%d,"completion_tokens":%d}}\n\n'
                         % (rid, 20 + n_tokens, n_tokens))
            out += chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
        reads.append(out)
    return reads


# ~10 ms between tokens with a spread of real ITLs (so histogram buckets vary as in a real run)
GAPS = [int(random.Random(1).lognormvariate(0, 0.3) * 10_000_000) for _ in range(100_000)]


def run(reads: list[bytes], stages: int, sets: list[HistogramSet]) -> None:
    dec = _ChunkedDecoder()
    parser = SSEParser() if stages >= 2 else None
    timer = StreamTimer(0, None) if stages >= 3 else None
    feed = timer.feed if timer else None
    payloads = parser.payloads if parser else None
    t = 0
    for data, gap in zip(reads, GAPS):
        t += gap
        body = dec.feed(data)
        if payloads is not None:
            for payload in payloads(body):
                if feed is not None:
                    feed(payload, t)
    if timer is not None:
        rec = timer.finish(url="u", model="m", id="x", end_ns=t)
        assert rec.ok and rec.output_tokens == len(reads), rec
        if stages >= 4:
            for s in sets:
                s.add_record(rec)


def measure(reads: list[bytes], stages: int, repeat: int) -> float:
    """Best-of-5 CPU microseconds per token for the stages up to `stages`."""
    best = float("inf")
    for _ in range(5):
        sets = [HistogramSet(), HistogramSet(), HistogramSet()]
        gc.collect()
        t0 = time.process_time_ns()
        for _ in range(repeat):
            run(reads, stages, sets)
        dt = time.process_time_ns() - t0
        best = min(best, dt / 1e3 / (repeat * len(reads)))
    return best


NAMES = {1: "chunked decode", 2: "+ SSE split", 3: "+ StreamTimer", 4: "+ 3 histogram sets"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=200)
    args = ap.parse_args(argv)
    reads = simulator_reads(args.tokens)
    prev = 0.0
    for s in (1, 2, 3, 4):
        us = measure(reads, s, args.repeat)
        print(f"{NAMES[s]:22s} {us:6.2f} us/token (stage {us - prev:+.2f})")
        prev = us
    return 0


if __name__ == "__main__":
    sys.exit(main())
