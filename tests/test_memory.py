"""The per-window peak memory meter behind train_metrics.json's `step_peak_memory_gib` (tunelab.memory)."""

import torch

from tunelab.memory import PeakMemory


def test_the_cpu_peak_resets_between_windows():
    meter = PeakMemory(torch.device("cpu"))
    assert meter.resettable and meter.kind == "cpu_rss"  # Linux: /proc/self/clear_refs
    meter.reset()
    block = torch.ones(128 * 1024 ** 2, dtype=torch.uint8)  # 128 MiB, touched
    del block
    with_block = meter.read()["peak_memory_gib"]
    meter.reset()
    without = meter.read()["peak_memory_gib"]
    assert with_block - without > 0.1, (with_block, without)  # the freed 0.125 GiB is not in the next window's peak
