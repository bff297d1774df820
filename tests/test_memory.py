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


def test_freed_small_allocations_leave_the_resident_set_once_released():
    """Many small blocks (as the profiler's events are) stay resident in glibc's heap after they are freed, and
    inflate every later step's RSS peak, until they are handed back."""
    from tunelab.memory import release_freed_host_memory

    meter = PeakMemory(torch.device("cpu"))
    release_freed_host_memory()
    meter.reset()
    before = meter.read()["peak_memory_gib"]
    blocks = [bytearray(2048) for _ in range(150_000)]  # 0.3 GiB in blocks below glibc's mmap threshold
    kept = blocks[::64]  # a few live blocks across the heap: it cannot shrink from its top
    del blocks
    release_freed_host_memory()
    meter.reset()
    after = meter.read()["peak_memory_gib"]
    assert after - before < 0.1, (before, after)
    assert len(kept) == 2344
