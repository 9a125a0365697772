"""The seed plan's L40S tables held against the simulator and against physics.

Each seed row is run through its profile in virtual time: the offline benchmark
(1000 prompts, 512 in, 256 out) for throughput, closed-loop concurrency 32 for
TTFT/TPOT. Two ceilings judge the seed's figure:

* hardware ceiling: no scheduler could beat it (every FLOP and byte at peak,
  prefill perfectly hidden behind decode);
* ideal engine: the same continuous-batching schedule vLLM runs, on hardware at
  100% of its datasheet with no overhead. A seed figure above this cannot be
  reached by this benchmark on this card, whatever the software efficiency.

Rows the ideal engine can reach are checked against the simulator within 15%.
"""
from __future__ import annotations

from dataclasses import dataclass

from servers.simulator.offline import run_concurrency, run_offline
from servers.simulator.profiles import make_profile
from servers.simulator.roofline import offline_throughput_ceiling

NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, CONCURRENCY = 1000, 512, 256, 32


@dataclass(frozen=True)
class SeedRow:
    table: str
    model: str
    precision: str
    tp: int
    vram_gb: float            # per GPU, as the seed states it
    throughput: float         # output tokens/s
    ttft_p50_ms: float
    tpot_p50_ms: float


SEED_ROWS = [
    SeedRow("single GPU", "llama-3-8b", "bf16", 1, 16, 4500, 60, 12),
    SeedRow("single GPU", "llama-3-8b", "int8", 1, 10, 3800, 55, 13),
    SeedRow("single GPU", "llama-2-13b", "bf16", 1, 26, 2800, 90, 18),
    SeedRow("single GPU", "llama-3-70b", "awq", 1, 37, 900, 250, 35),
    SeedRow("single GPU", "mistral-7b", "bf16", 1, 14, 4800, 55, 11),
    SeedRow("TP=2", "llama-3-70b", "bf16", 2, 72, 2200, 150, 20),
    SeedRow("TP=2", "llama-3-70b", "int8", 2, 37, 1800, 140, 22),
    SeedRow("TP=2", "llama-3-70b", "awq", 2, 19, 3000, 120, 17),
]


@dataclass
class RowCheck:
    row: SeedRow
    fits: bool
    vram_possible: bool
    weights_gb_per_gpu: float
    hardware_ceiling: float
    ideal_engine: float
    simulated: float
    ttft_p50_ms: float | None
    tpot_p50_ms: float | None
    ttft_floor_ms: float
    tpot_floor_ms: float

    @property
    def throughput_possible(self) -> bool:
        return self.fits and self.row.throughput <= self.ideal_engine

    @property
    def verdict(self) -> str:
        if not self.fits:
            return "impossible: weights do not fit the card"
        if self.row.throughput > self.hardware_ceiling:
            return "impossible: above the hardware ceiling"
        if self.row.throughput > self.ideal_engine:
            return "unreachable: above the ideal engine"
        return "possible"

    @property
    def error(self) -> float | None:
        return None if not self.simulated else self.simulated / self.row.throughput - 1.0


def check_row(row: SeedRow, gpu: str = "l40s") -> RowCheck:
    profile = make_profile(gpu, row.model, row.precision, row.tp)
    dep = profile.deployment
    limits = dict(max_num_seqs=profile.offline_max_num_seqs,
                  max_num_batched_tokens=profile.offline_max_num_batched_tokens)
    tpot_floor = dep.decode_floor_s(CONCURRENCY, INPUT_LEN) * 1e3
    ttft_floor = dep.prefill_floor_s(INPUT_LEN) * 1e3
    ceiling = offline_throughput_ceiling(dep, INPUT_LEN, OUTPUT_LEN, limits["max_num_seqs"])
    vram_possible = row.vram_gb <= dep.gpu.memory_gb
    if not dep.fits:
        return RowCheck(row, False, vram_possible, dep.weight_bytes_per_gpu / 1e9, 0.0, 0.0, 0.0,
                        None, None, ttft_floor, tpot_floor)
    sim = run_offline(dep, NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, **limits)
    ideal = run_offline(dep.ideal(), NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, **limits)
    lat = run_concurrency(dep, CONCURRENCY, 4 * CONCURRENCY, INPUT_LEN, OUTPUT_LEN,
                          max_num_seqs=profile.max_num_seqs,
                          max_num_batched_tokens=profile.max_num_batched_tokens)
    return RowCheck(row, True, vram_possible, dep.weight_bytes_per_gpu / 1e9, ceiling,
                    ideal.output_tokens_per_s, sim.output_tokens_per_s,
                    lat.ttft_p50_ms, lat.tpot_p50_ms, ttft_floor, tpot_floor)


def markdown_table(checks: list[RowCheck]) -> str:
    head = ("| table | model | precision | seed tok/s | simulated | ideal engine | hardware ceiling "
            "| verdict | seed TTFT p50 | sim TTFT p50 | TTFT floor | seed TPOT p50 | sim TPOT p50 "
            "| TPOT floor | seed VRAM/GPU | weights/GPU |\n" + "|---" * 16 + "|\n")

    def f(v: float | None, d: int = 0) -> str:
        return "n/a" if v is None else f"{v:,.{d}f}"

    lines = []
    for c in checks:
        r = c.row
        tpot_note = " (below floor: impossible)" if r.tpot_p50_ms < c.tpot_floor_ms else ""
        ttft_note = " (below floor: impossible)" if r.ttft_p50_ms < c.ttft_floor_ms else ""
        vram_note = "" if c.vram_possible else " (over the card: impossible)"
        lines.append(
            f"| {r.table} | {r.model} | {r.precision}{'' if r.tp == 1 else f' TP={r.tp}'} "
            f"| {r.throughput:,.0f} | {f(c.simulated)} | {f(c.ideal_engine)} | {f(c.hardware_ceiling)} "
            f"| {c.verdict} | {r.ttft_p50_ms:.0f}{ttft_note} | {f(c.ttft_p50_ms)} | {c.ttft_floor_ms:.1f} "
            f"| {r.tpot_p50_ms:.0f}{tpot_note} | {f(c.tpot_p50_ms, 1)} | {c.tpot_floor_ms:.1f} "
            f"| {r.vram_gb:.0f} GB{vram_note} | {c.weights_gb_per_gpu:.1f} GB |")
    return head + "\n".join(lines) + "\n"
