"""A continuous-batching engine model in the shape of vLLM's V1 scheduler.

Clock-free on purpose: `schedule()` picks the next step and says how long it takes,
`complete(step, now)` applies it. The HTTP server drives it in real time; the
offline runners drive the same code in virtual time, so the capacity figures a
user plans with and the latencies a load test sees come from one model.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from servers.simulator.roofline import Deployment


@dataclass(eq=False)
class Sequence:
    rid: str
    prompt_tokens: int
    output_tokens: int          # tokens this request will generate in total
    arrival: float
    payload: Any = None         # the server's per-request state
    generated: int = 0
    computed: int = 0           # tokens whose KV is in the cache
    blocks: int = 0
    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    finished: bool = False
    aborted: bool = False

    @property
    def pending(self) -> int:
        """Tokens to run through the model before the next token can be sampled."""
        return self.prompt_tokens + self.generated - self.computed


@dataclass
class Step:
    work: list[tuple[Sequence, int]]
    duration: float
    num_tokens: int
    prefill_tokens: int


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    steps: int = 0
    busy_s: float = 0.0


@dataclass
class StepResult:
    emitted: list[Sequence] = field(default_factory=list)   # got one new token
    finished: list[Sequence] = field(default_factory=list)


class Engine:
    def __init__(self, deployment: Deployment, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, block_size: int = 16,
                 kv_capacity_tokens: int | None = None):
        self.deployment = deployment
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        capacity = deployment.kv_capacity_tokens if kv_capacity_tokens is None else kv_capacity_tokens
        self.total_blocks = capacity // block_size
        # roofline.Efficiency.kv_admission: reserve a request's whole prompt + output at
        # admission (TensorRT-LLM) or grow it step by step (vLLM).
        self.reserve_full = deployment.efficiency.kv_admission == "reserve"
        self.free_blocks = self.total_blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = EngineStats()
        # True while the engine has had nothing to run since its last step: the next step
        # pays the kernel launches a busy engine hides (Deployment.idle_launch_s).
        self.idle = True
        # Multiplies every step's duration; the soak tests' slow-down knob.
        self.slowdown = 1.0

    # -- requests -------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.finished or seq.aborted:
            return
        seq.aborted = True
        self.stats.aborted += 1
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self._free(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def kv_usage(self) -> float:
        if self.total_blocks == 0:
            return 1.0
        return 1.0 - self.free_blocks / self.total_blocks

    def max_prompt_tokens(self) -> int:
        return self.total_blocks * self.block_size

    # -- scheduling -----------------------------------------------------------
    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _free(self, seq: Sequence) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        """Recompute-style preemption, as vLLM V1: drop the KV, requeue at the front."""
        self._free(seq)
        seq.computed = 0
        seq.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self, now: float = 0.0) -> Step | None:
        budget = self.max_num_batched_tokens
        work: list[tuple[Sequence, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            q = min(seq.pending, budget)
            need = max(0, self._blocks_for(seq.computed + q) - seq.blocks)
            self_preempted = False
            while need > self.free_blocks:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    self_preempted = True
                    break
            if self_preempted:
                break
            self.free_blocks -= need
            seq.blocks += need
            work.append((seq, q))
            budget -= q
            i += 1
        if not preempted:
            while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = self.waiting[0]
                q = min(seq.pending, budget)
                target = (seq.prompt_tokens + seq.output_tokens if self.reserve_full
                          else seq.computed + q)
                need = max(0, self._blocks_for(target) - seq.blocks)
                if need > self.free_blocks:
                    break
                self.waiting.popleft()
                self.running.append(seq)
                self.free_blocks -= need
                seq.blocks += need
                if seq.first_scheduled is None:
                    seq.first_scheduled = now
                work.append((seq, q))
                budget -= q
        if not work:
            self.idle = True
            return None
        num_tokens = 0
        kv_read = 0
        attn = 0.0
        prefill = 0
        for seq, q in work:
            num_tokens += q
            kv_read += seq.computed
            attn += q * (seq.computed + q / 2)
            if q > 1:
                prefill += q
        duration = self.deployment.step_time(num_tokens, kv_read, attn, len(work))
        if self.idle:
            duration += self.deployment.idle_launch_s
            self.idle = False
        return Step(work, duration * self.slowdown, num_tokens, prefill)

    def complete(self, step: Step, now: float) -> StepResult:
        result = StepResult()
        stats = self.stats
        stats.steps += 1
        stats.busy_s += step.duration
        finished_any = False
        for seq, q in step.work:
            if seq.aborted:
                continue
            seq.computed += q
            if seq.computed < seq.prompt_tokens + seq.generated:
                continue  # a chunk of a longer prefill
            if seq.generated == 0:
                seq.first_token_time = now
                stats.prompt_tokens += seq.prompt_tokens
            seq.generated += 1
            seq.last_token_time = now
            stats.generation_tokens += 1
            result.emitted.append(seq)
            if seq.generated >= seq.output_tokens:
                seq.finished = True
                seq.finish_time = now
                stats.finished += 1
                self._free(seq)
                result.finished.append(seq)
                finished_any = True
        if finished_any:
            self.running = [s for s in self.running if not s.finished]
        if not self.has_work():
            self.idle = True
        return result
