"""The server's counters in Prometheus text format (served at /metrics)."""

from __future__ import annotations

import threading
from collections import defaultdict

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.total, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return [*rows, f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]


class Metrics:
    """Requests by endpoint and status, tokens, batches, forward passes, batch sizes and request latency."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.prompt_tokens = self.generated_tokens = self.batches = self.forward_passes = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.queued = 0

    def request_done(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1
            if seconds is not None:
                self.latency.observe(seconds)

    def batch_done(self, rows: int, steps: int, prompt_tokens: int, generated_tokens: int) -> None:
        with self._lock:
            self.batches += 1
            self.forward_passes += steps
            self.batch_size.observe(rows)
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens

    def text(self) -> str:
        with self._lock:
            lines = ["# HELP tunelab_requests_total HTTP requests to /v1 by endpoint and status code.",
                     "# TYPE tunelab_requests_total counter",
                     *(f'tunelab_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                       for (e, s), n in sorted(self.requests.items())),
                     "# HELP tunelab_prompt_tokens_total Prompt tokens of generated rows.",
                     "# TYPE tunelab_prompt_tokens_total counter", f"tunelab_prompt_tokens_total {self.prompt_tokens}",
                     "# HELP tunelab_generated_tokens_total Tokens generated (stop tokens included).",
                     "# TYPE tunelab_generated_tokens_total counter",
                     f"tunelab_generated_tokens_total {self.generated_tokens}",
                     "# HELP tunelab_batches_total Batches run on the model (one generate call each).",
                     "# TYPE tunelab_batches_total counter", f"tunelab_batches_total {self.batches}",
                     "# HELP tunelab_forward_passes_total Decoding steps, each one forward pass of a whole batch.",
                     "# TYPE tunelab_forward_passes_total counter", f"tunelab_forward_passes_total {self.forward_passes}",
                     "# HELP tunelab_queued_rows Rows waiting for the model.",
                     "# TYPE tunelab_queued_rows gauge", f"tunelab_queued_rows {self.queued}",
                     "# HELP tunelab_batch_size Rows per batch run on the model.",
                     "# TYPE tunelab_batch_size histogram", *self.batch_size.lines("tunelab_batch_size"),
                     "# HELP tunelab_request_latency_seconds Seconds from a request's arrival to its last token.",
                     "# TYPE tunelab_request_latency_seconds histogram",
                     *self.latency.lines("tunelab_request_latency_seconds")]
        return "\n".join(lines) + "\n"
