"""Latency as a user sees it: requests sent one at a time (batch 1), each streamed, after one warm-up request."""

from __future__ import annotations

import logging
import time

import numpy as np

from tunelab.generation.engine import Engine, StepStreamer

log = logging.getLogger(__name__)


def measure_latency(engine: Engine, prompts: list[str], requests: int) -> dict:
    """p50/p95 of whole-request latency and time to first token, and the median per-token latency after the
    first token, over the first `requests` prompts (all if fewer), each generated alone."""
    chosen = prompts[:requests]
    engine.generate(chosen[:1])  # warm-up: first-call allocations and lazy initialisation are not latency
    totals, first_tokens, per_token = [], [], []
    for text in chosen:
        streamer = StepStreamer()
        began = time.perf_counter()
        engine.generate([text], streamer=streamer)
        totals.append(time.perf_counter() - began)
        steps = streamer.step_times
        first_tokens.append(steps[0] - began)
        if len(steps) > 1:
            per_token.append((steps[-1] - steps[0]) / (len(steps) - 1))
    summary = {"latency_requests": len(chosen),
               "latency_p50_seconds": float(np.percentile(totals, 50)),
               "latency_p95_seconds": float(np.percentile(totals, 95)),
               "ttft_p50_seconds": float(np.percentile(first_tokens, 50)),
               "ttft_p95_seconds": float(np.percentile(first_tokens, 95)),
               "per_token_latency_p50_seconds": float(np.percentile(per_token, 50)) if per_token else None}
    log.info("latency over %d requests: p50 %.3f s, p95 %.3f s, time to first token p50 %.3f s",
             len(chosen), summary["latency_p50_seconds"], summary["latency_p95_seconds"], summary["ttft_p50_seconds"])
    return summary
