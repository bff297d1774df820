"""tunelab: a reproducible study pipeline for memory-efficient LLM fine-tuning."""

__version__ = "0.1.0"
