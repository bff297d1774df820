"""One generation path for the study's `generate` stage, `tunelab generate --model`, the latency measurement
and `tunelab serve`: loading a model as it trained, the model's own generation settings and stop tokens,
left-padded batches with per-step streaming, and per-request latency.
"""

from tunelab.generation.engine import Completion, Engine, StepStreamer
from tunelab.generation.latency import measure_latency
from tunelab.generation.loading import load_for_inference

__all__ = ["Completion", "Engine", "StepStreamer", "load_for_inference", "measure_latency"]
