"""`tunelab serve`: any trained, merged or exported model of the study behind an OpenAI-compatible HTTP API,
on the same generation engine as the study's `generate` stage (`tunelab.generation`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tunelab.config import GenerationConfig
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)


def run_serve(model_dir: Path, settings: GenerationConfig, prompt_format: str, host: str, port: int,
              max_batch_size: int = 32, max_queue: int = 256) -> None:
    """Load the model and serve it until interrupted; TUNELAB_API_KEY, when set, is required as a Bearer token."""
    import uvicorn

    from tunelab.generation import Engine
    from tunelab.serve.api import Server, build_app

    if not model_dir.is_dir():
        raise TunelabError(f"serve --model {model_dir}: no such model directory")
    engine = Engine.load(model_dir, settings, prompt_format)
    server = Server(engine, str(model_dir), api_key=os.environ.get("TUNELAB_API_KEY") or None,
                    max_batch_size=max_batch_size, max_queue=max_queue)
    server.batcher.start()
    log.info("serving %s on http://%s:%d/v1 (API key %s, batches up to %d rows)", model_dir, host, port,
             "required" if server.api_key else "not required", max_batch_size)
    try:
        uvicorn.run(build_app(server), host=host, port=port, log_level="info")
    finally:
        server.batcher.stop()
