"""Specification of the simulator's continuous-batching engine.

Most tests drive `servers.simulator.engine.Engine` in virtual time (no clock, no sockets): the
behaviour is the scheduler's and the cost model's, so they run in milliseconds. The last two
check the same engine behind the real-time server (`harness sim` as a subprocess).
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
from prometheus_client.parser import text_string_to_metric_families

from servers.simulator.engine import Engine, Sequence, Step
from servers.simulator.offline import run_concurrency
from servers.simulator.profiles import get_profile

L40S = get_profile("l40s-llama-3-8b-bf16").deployment
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"


def drive(engine: Engine, max_steps: int = 200_000) -> list[tuple[float, Step]]:
    """Run the engine to empty in virtual time; (end time, step) for every step."""
    now = 0.0
    steps = []
    for _ in range(max_steps):
        step = engine.schedule(now)
        if step is None:
            assert not engine.has_work(), "engine stalled with work left"
            return steps
        assert engine.free_blocks >= 0
        now += step.duration
        engine.complete(step, now)
        steps.append((now, step))
    raise AssertionError("engine did not finish")


def add_requests(engine: Engine, n: int, prompt: int, output: int) -> list[Sequence]:
    seqs = [Sequence(str(i), prompt, output, 0.0) for i in range(n)]
    for s in seqs:
        engine.add(s)
    return seqs


# -- queueing ----------------------------------------------------------------------------------------

def test_ttft_grows_with_concurrency():
    ttft = [run_concurrency(L40S, concurrency=c, num_requests=max(2 * c, 32), input_len=512,
                            output_len=64, max_num_seqs=256, max_num_batched_tokens=2048).ttft_p50_ms
            for c in (1, 16, 128, 512)]
    assert ttft == sorted(ttft) and len(set(ttft)) == 4, ttft
    assert ttft[-1] > 5 * ttft[0]  # beyond max_num_seqs, requests wait for a slot


def test_ttft_grows_with_position_in_the_waiting_queue():
    engine = Engine(L40S, max_num_seqs=256, max_num_batched_tokens=2048)
    seqs = add_requests(engine, 64, prompt=512, output=16)
    drive(engine)
    ttft = [s.first_token_time - s.arrival for s in seqs]
    assert ttft == sorted(ttft)
    # 2048 tokens per step hold at most four 512-token prompts (fewer once earlier requests'
    # decodes share the budget): 64 prompts need at least 16 prefill steps.
    assert len(set(ttft)) >= 16
    assert ttft[-1] > 10 * ttft[0]


# -- the decode step's cost ----------------------------------------------------------------------------

def decode_step_seconds(batch: int, context: int) -> float:
    """Duration of the first pure decode step of `batch` sequences with `context` prompt tokens."""
    engine = Engine(L40S, max_num_seqs=1024, max_num_batched_tokens=16384)
    seqs = add_requests(engine, batch, prompt=context, output=10)
    now = 0.0
    while not all(s.generated >= 1 for s in seqs):
        step = engine.schedule(now)
        now += step.duration
        engine.complete(step, now)
    step = engine.schedule(now)
    assert step.prefill_tokens == 0 and step.num_tokens == batch
    return step.duration


def test_decode_step_time_grows_with_batch_size():
    times = [decode_step_seconds(b, 512) for b in (1, 32, 128, 256)]
    assert times == sorted(times) and len(set(times)) == 4, times
    # Memory-bound: one pass over 16 GB of weights at 80% of 864 GB/s is the floor of any step.
    assert times[0] >= 16e9 / (864e9 * 0.8)


def test_decode_step_time_grows_with_context_length():
    times = [decode_step_seconds(32, ctx) for ctx in (128, 1024, 4096)]
    assert times == sorted(times) and len(set(times)) == 3, times


def test_prefill_cost_grows_with_prompt_tokens():
    def first_step(prompt: int) -> float:
        engine = Engine(L40S, max_num_seqs=256, max_num_batched_tokens=16384)
        add_requests(engine, 1, prompt=prompt, output=1)
        return engine.schedule(0.0).duration
    times = [first_step(p) for p in (256, 2048, 8192)]
    assert times == sorted(times) and len(set(times)) == 3, times
    # Compute-bound at 8192 tokens: 2 x 8e9 params x 8192 tokens at 362 TFLOPS is a floor.
    assert times[-1] >= 2 * 8.03e9 * 8192 / 362.05e12


# -- KV cache and preemption ---------------------------------------------------------------------------

def test_small_kv_cache_preempts_and_every_request_still_gets_all_its_tokens():
    engine = Engine(L40S, max_num_seqs=64, max_num_batched_tokens=2048, kv_capacity_tokens=4096)
    seqs = add_requests(engine, 32, prompt=100, output=200)  # 32 x 300 tokens > 4096
    drive(engine)
    assert engine.stats.preemptions > 0
    assert sum(s.preemptions for s in seqs) == engine.stats.preemptions
    assert all(s.finished and s.generated == 200 for s in seqs)
    assert engine.stats.generation_tokens == 32 * 200
    assert engine.stats.prompt_tokens == 32 * 100  # a recomputed prompt is not counted twice
    assert engine.free_blocks == engine.total_blocks  # every block given back


def test_a_large_kv_cache_never_preempts_the_same_load():
    engine = Engine(L40S, max_num_seqs=64, max_num_batched_tokens=2048)
    seqs = add_requests(engine, 32, prompt=100, output=200)
    drive(engine)
    assert engine.stats.preemptions == 0
    assert all(s.generated == 200 for s in seqs)


def test_kv_usage_never_exceeds_capacity():
    engine = Engine(L40S, max_num_seqs=64, max_num_batched_tokens=2048, kv_capacity_tokens=2048)
    add_requests(engine, 20, prompt=50, output=150)
    now = 0.0
    peak = 0.0
    while (step := engine.schedule(now)) is not None:
        peak = max(peak, engine.kv_usage)
        assert 0 <= engine.free_blocks <= engine.total_blocks
        now += step.duration
        engine.complete(step, now)
    assert peak > 0.9 and engine.kv_usage == 0.0


# -- batch limits --------------------------------------------------------------------------------------

def test_max_num_seqs_caps_the_running_batch():
    engine = Engine(L40S, max_num_seqs=8, max_num_batched_tokens=2048)
    seqs = add_requests(engine, 50, prompt=64, output=20)
    largest = 0
    now = 0.0
    while (step := engine.schedule(now)) is not None:
        assert len(step.work) <= 8 and len(engine.running) <= 8
        largest = max(largest, len(engine.running))
        now += step.duration
        engine.complete(step, now)
    assert largest == 8
    assert all(s.generated == 20 for s in seqs)


def test_chunked_prefill_splits_a_long_prompt_over_steps_of_at_most_the_token_budget():
    engine = Engine(L40S, max_num_seqs=256, max_num_batched_tokens=512)
    long = Sequence("long", 2000, 3, 0.0)
    engine.add(long)
    steps = drive(engine)
    assert all(step.num_tokens <= 512 for _, step in steps)
    chunks = [q for _, step in steps for seq, q in step.work if seq is long]
    assert chunks == [512, 512, 512, 464, 1, 1]
    # The first token comes with the last chunk, not before.
    assert long.first_token_time == steps[3][0]


def test_chunked_prefill_shares_steps_with_running_decodes():
    engine = Engine(L40S, max_num_seqs=256, max_num_batched_tokens=512)
    short = Sequence("short", 10, 20, 0.0)
    engine.add(short)
    first = engine.schedule(0.0)
    engine.complete(first, first.duration)
    assert short.generated == 1
    long = Sequence("long", 3000, 1, first.duration)
    engine.add(long)
    now = first.duration
    while long.generated == 0:
        before = short.generated
        step = engine.schedule(now)
        assert step.num_tokens <= 512
        now += step.duration
        engine.complete(step, now)
        assert short.generated == before + 1  # a decode every step while the prompt is chunked
    assert short.generated >= 1 + 3000 // 511


# -- the same engine behind the real-time server --------------------------------------------------------

def _stream_one(c: openai.OpenAI, i: int) -> int:
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"request number {i}"}],
        max_tokens=150, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    return chunks[-1].usage.completion_tokens


def _metric(base_url: str, sample_name: str) -> float:
    c = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    text = c.get("/metrics", cast_to=str)
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == sample_name)


def test_server_with_a_small_kv_cache_reports_preemptions_after_a_burst(start_sim):
    base, _ = start_sim("--profile", "h200-llama-3-8b-awq", "--kv-cache-tokens", "2048")
    assert _metric(base, "vllm:num_preemptions_total") == 0
    # A burst: the 16 requests must be in flight together (16 x ~165 > 2048), so every client
    # is built first and all are released at once; building a client per thread (~20 ms of
    # GIL-bound setup each) staggered the sends on a slow machine by most of a ~0.6 s request.
    clients = [openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
               for _ in range(16)]
    go = threading.Barrier(16)

    def burst(i: int) -> int:
        go.wait(30)
        return _stream_one(clients[i], i)

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(burst, range(16)))
    assert tokens == [150] * 16
    assert _metric(base, "vllm:num_preemptions_total") > 0


def test_truth_log_has_one_line_per_request_with_its_event_times(start_sim, tmp_path):
    log = tmp_path / "truth.jsonl"
    base, _ = start_sim("--profile", "h200-llama-3-8b-awq", "--truth-log", str(log))
    c = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=30)
    ids = {}
    for i, n in enumerate((5, 12, 1)):
        chunks = list(c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=n,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
        ids[chunks[0].id] = n
    plain = c.completions.create(model=MODEL, prompt="plain", max_tokens=4,
                                 extra_body={"ignore_eos": True})
    # Lines are written in the gaps between engine steps: wait for four whole lines (a read
    # may land between a line's bytes and its newline).
    deadline = time.monotonic() + 10
    while True:
        text = log.read_text()
        if (text.count("\n") >= 4 and text.endswith("\n")) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 4
    by_id = {rec["id"]: rec for rec in lines}
    assert set(by_id) == set(ids) | {plain.id}
    for rid, n in ids.items():
        rec = by_id[rid]
        assert rec["stream"] and rec["completion_tokens"] == n and rec["finish_reason"] == "length"
        assert len(rec["event_ns"]) == len(rec["model_ns"]) == n
        assert rec["received_ns"] <= rec["headers_ns"] <= rec["event_ns"][0]
        assert rec["event_ns"] == sorted(rec["event_ns"])
        # An event is written at or after the model time its token was sampled at.
        assert all(e >= m - 1_000 for e, m in zip(rec["event_ns"], rec["model_ns"]))
    rec = by_id[plain.id]
    assert not rec["stream"] and len(rec["model_ns"]) == 4 and len(rec["event_ns"]) == 1
    assert rec["event_ns"][0] >= rec["model_ns"][-1] - 1_000


# -- the step clock --------------------------------------------------------------------------------

def test_step_timer_fires_at_its_instant_not_before_and_does_not_block_the_loop():
    import asyncio

    from servers.simulator.clock import StepTimer

    async def run() -> tuple[list[float], int]:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        done = loop.create_future()
        ticks = 0

        def on_fire() -> None:
            fired.append(time.perf_counter())
            if len(fired) < 5:
                timer.arm(targets[len(fired)])
            else:
                done.set_result(None)

        async def ticker() -> None:  # the loop stays free while the timer is armed
            nonlocal ticks
            while not done.done():
                ticks += 1
                await asyncio.sleep(0)

        timer = StepTimer(loop, on_fire)
        start = time.perf_counter()
        targets = [start + 0.004 * (i + 1) + 0.0003 * i for i in range(5)]
        timer.arm(targets[0])
        await asyncio.gather(done, ticker())
        timer.close()
        return [f - t for f, t in zip(fired, targets)], ticks

    lateness, ticks = asyncio.run(run())
    assert all(x >= 0 for x in lateness), lateness
    assert max(lateness) < 0.05  # generous: a shared machine
    assert ticks > 5
