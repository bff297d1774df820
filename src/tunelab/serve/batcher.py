"""Dynamic batching: requests that arrive together run as one left-padded batch of the generation engine.

One worker thread owns the model. It takes the first waiting job, keeps collecting jobs for a short window
(or until the batch is full), runs the jobs that share sampling settings as one `Engine.generate` call and
hands every decoding step to the jobs that stream. Jobs that wait while a batch runs join the next one.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tunelab.generation import Engine, StepStreamer
from tunelab.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More rows are waiting than the server accepts."""


@dataclass
class Job:
    """One request's rows (a prompt repeated n times, or several prompts) and where their results go.

    `emit(kind, payload)` is called from the worker thread: ("step", {row: token}) after every decoding step
    when `streaming`, then ("done", [Completion per row]) or ("error", message)."""

    prompts: list[str]
    max_new_tokens: int
    sampling: tuple  # ("greedy",) or ("sample", temperature, top_p, seed): jobs batch only with equal settings
    emit: Callable[[str, object], None]
    streaming: bool = False
    prompt_tokens: int = 0
    queued_at: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, engine: Engine, metrics: Metrics, *, max_batch_size: int, max_queue: int, wait_seconds: float):
        self.engine, self.metrics = engine, metrics
        self.max_batch_size, self.max_queue, self.wait_seconds = max_batch_size, max_queue, wait_seconds
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._rows_waiting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="tunelab-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._rows_waiting + len(job.prompts) > self.max_queue:
                raise QueueFull(f"{self._rows_waiting} rows are waiting (the queue holds {self.max_queue})")
            self._rows_waiting += len(job.prompts)
            self.metrics.queued = self._rows_waiting
        self._jobs.put(job)

    def _take(self) -> list[Job]:
        """The first waiting job and whatever else arrives within the window, up to a full batch."""
        try:
            jobs = [self._jobs.get(timeout=0.2)]
        except queue.Empty:
            return []
        rows = len(jobs[0].prompts)
        deadline = time.perf_counter() + self.wait_seconds
        while rows < self.max_batch_size:
            try:
                job = self._jobs.get(timeout=max(deadline - time.perf_counter(), 0))
            except queue.Empty:
                break
            jobs.append(job)
            rows += len(job.prompts)
        with self._lock:
            self._rows_waiting -= rows
            self.metrics.queued = self._rows_waiting
        return jobs

    def _work(self) -> None:
        while not self._stop.is_set():
            groups: dict[tuple, list[Job]] = {}
            for job in self._take():
                groups.setdefault(job.sampling, []).append(job)
            for sampling, jobs in groups.items():
                try:
                    self._run(sampling, jobs)
                except Exception as err:  # a failed batch answers its requests with 500; the server keeps serving
                    log.exception("batch of %d requests failed", len(jobs))
                    for job in jobs:
                        job.emit("error", f"generation failed: {type(err).__name__}")

    @staticmethod
    def _seed(sampling: tuple) -> int | None:
        """A request's own seed; a fresh one for sampling without a seed (not the study's fixed seed)."""
        if sampling[0] == "greedy":
            return None
        return sampling[3] if sampling[3] is not None else random.randrange(2**31)

    def _run(self, sampling: tuple, jobs: list[Job]) -> None:
        rows = [(job, i) for job in jobs for i in range(len(job.prompts))]
        limits = [job.max_new_tokens for job, _ in rows]
        overrides = ({"do_sample": False} if sampling[0] == "greedy" else
                     {"do_sample": True, "temperature": sampling[1], "top_p": sampling[2]})
        config = self.engine.config_with(max_new_tokens=max(limits), **overrides)

        def on_step(tokens: list[int]) -> None:
            per_job: dict[int, dict[int, int]] = {}
            for (job, index), token in zip(rows, tokens):
                if job.streaming:
                    per_job.setdefault(id(job), {})[index] = token
            for job in jobs:
                if id(job) in per_job:
                    job.emit("step", per_job[id(job)])

        streamer = StepStreamer(on_step if any(job.streaming for job in jobs) else None)
        completions = self.engine.generate([p for job in jobs for p in job.prompts], config,
                                           seed=self._seed(sampling),
                                           max_new_tokens=limits, streamer=streamer)
        self.metrics.batch_done(len(rows), len(streamer.step_times), sum(job.prompt_tokens for job in jobs),
                                sum(c.generated_tokens for c in completions))
        start = 0
        for job in jobs:
            job.emit("done", completions[start:start + len(job.prompts)])
            start += len(job.prompts)
