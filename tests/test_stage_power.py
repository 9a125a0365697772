"""Power sampling during stages: which GPUs are sampled, and the no-NVML path (the NVML path
itself was run on a lent 2 x H100 machine: 660 W on the loaded GPU, the idle one left out)."""
from __future__ import annotations

from harness.stages.power import power_sampling, tokens_per_joule, visible_gpus
from harness.stages.targets import TargetEndpoint, sampled_gpus


def test_visible_gpus_follows_cuda_visible_devices():
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}, 1) == [2]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert visible_gpus({}, 2) == [0, 1]
    assert visible_gpus({}) is None
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-1234"}, 1) is None


def test_sampled_gpus_leave_out_simulated_and_idle_cards():
    sim = TargetEndpoint("s", "sim", "http://x:1", profile="l40s-llama-3-8b-bf16")
    real = [TargetEndpoint("a", "small", "http://x:2", gpus=[3]), TargetEndpoint("b", "large", "http://x:3", gpus=[0, 1])]
    assert sampled_gpus([sim]) == []
    assert sampled_gpus(real) == [0, 1, 3]
    assert sampled_gpus([TargetEndpoint("u", "server", "http://x:4")]) is None


def test_without_nvml_there_are_no_power_figures():
    with power_sampling(0.01, gpus=[]) as p:
        pass
    assert p.summary() is None
    assert tokens_per_joule(None, 100.0) is None
    assert tokens_per_joule({"avg_w": 500.0}, 1000.0) == 2.0
