"""The generation engine: the model's own generation settings and stop tokens, and left-padded batches
through transformers' `generate`, each decoding step optionally streamed (with its time) to a callback, or,
for greedy decoding where `generation.engine` selects it, through the static-cache decoder (`fast.py`)."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig as HFGenerationConfig
from transformers.generation.streamers import BaseStreamer

from tunelab import modeling
from tunelab.config import GenerationConfig, TrainConfig
from tunelab.generation import fast
from tunelab.generation.loading import load_for_inference
from tunelab.tokenize import check_prompt_format, render_prompt

log = logging.getLogger(__name__)
SAMPLING = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class Completion:
    """One generated answer: new token ids up to (not including) the first stop token."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (a stop token) or "length" (max new tokens)
    generated_tokens: int  # tokens the model computed for it, the stop token included


class StepStreamer(BaseStreamer):
    """Receives `generate`'s tokens (the prompt first, then one token per row at each decoding step), records
    when each step arrived and hands its tokens to `on_step`."""

    def __init__(self, on_step: Callable[[list[int]], None] | None = None):
        self.on_step = on_step
        self.step_times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.step_times.append(time.perf_counter())
        if self.on_step is not None:
            self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class Engine:
    """A loaded model with its tokenizer, prompt format and effective generation settings."""

    def __init__(self, model, tokenizer, autocast, settings: GenerationConfig, prompt_format: str = "alpaca"):
        check_prompt_format(tokenizer, prompt_format, tokenizer.name_or_path)
        self.model, self.tokenizer, self.autocast = model, tokenizer, autocast
        self.settings, self.prompt_format = settings, prompt_format
        # a fast tokenizer's padding is state on the tokenizer: a server's request threads counting prompt tokens
        # (padding off) while its batch thread pads a batch can leave that batch unpadded (ValueError at to-tensor)
        self._tokenizing = threading.Lock()
        self.device = next(model.parameters()).device
        tokenizer.padding_side = "left"
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.config = self._study_config()
        self.decoder = self._static_decoder()

    @classmethod
    def load(cls, model_dir: Path | None, settings: GenerationConfig, prompt_format: str = "alpaca",
             base_dir: Path | None = None, base_settings: TrainConfig | None = None) -> Engine:
        model, tokenizer, train = load_for_inference(model_dir, base_dir, base_settings)
        return cls(model, tokenizer, modeling.autocast(train, next(model.parameters()).device), settings, prompt_format)

    def _study_config(self):
        """The model's generation_config, with the study's settings where they are set (and transformers'
        defaults where neither sets them, so that what runs can be recorded)."""
        config = copy.deepcopy(self.model.generation_config)
        defaults = HFGenerationConfig._get_default_generation_params()
        config.max_new_tokens = self.settings.max_new_tokens
        config.max_length = None
        config.eos_token_id = self.stop_token_ids
        config.pad_token_id = self.tokenizer.pad_token_id
        for key in SAMPLING:
            if getattr(self.settings, key) is not None:
                setattr(config, key, getattr(self.settings, key))
            elif getattr(config, key, None) is None:
                setattr(config, key, defaults[key])
        return config

    def _static_decoder(self) -> fast.StaticDecoder | None:
        """The static-cache decoder where `generation.engine` asks for it and the model allows it."""
        choice = self.settings.engine
        if choice == "generate" or (choice == "auto" and self.device.type != "cuda"):
            return None
        if reason := fast.unsupported_model(self.model):
            log.info("generation runs through generate: the static path does not take %s", reason)
            return None
        return fast.StaticDecoder(self.model, compiled=self.device.type == "cuda")

    def decoding_path(self, config=None) -> str:
        """Which path generates with `config` (the study's by default): `static (compiled)`, `static` or
        `generate` (per-step streaming, the latency measurement's, always runs through `generate`)."""
        if self.decoder is None or fast.unsupported_config(config or self.config):
            return "generate"
        return "static (compiled)" if self.decoder.compiled else "static"

    def effective_settings(self) -> dict:
        """What generation runs with, for eval.json."""
        return {"prompt_format": self.prompt_format, "stop_token_ids": self.stop_token_ids,
                "max_new_tokens": self.config.max_new_tokens, "seed": self.settings.seed,
                **{key: getattr(self.config, key, None) for key in SAMPLING}, "decoding": self.decoding_path()}

    def config_with(self, **overrides):
        """The study's generation config with per-request overrides (None leaves a setting as it is)."""
        config = copy.deepcopy(self.config)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        return config

    def record_prompt(self, record: dict) -> str:
        return render_prompt(record, self.tokenizer, self.prompt_format)

    def prompt_tokens(self, text: str) -> int:
        with self._tokenizing:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def generate(self, prompts: list[str], config=None, *, seed: int | None = None,
                 max_new_tokens: list[int] | None = None, streamer: StepStreamer | None = None) -> list[Completion]:
        """One left-padded batch: an answer per prompt. `max_new_tokens` caps rows below the batch's limit."""
        config = config or self.config
        static = streamer is None and self.decoding_path(config) != "generate"
        # a short last batch is filled up with copies of its last prompt, so that the static path's compiled step
        # sees the study's batch size again instead of compiling for a new one
        filled = prompts + prompts[-1:] * (self.settings.batch_size - len(prompts)) if static else prompts
        with self._tokenizing:
            batch = self.tokenizer(filled, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        if config.do_sample:
            torch.manual_seed(self.settings.seed if seed is None else seed)
        with self.autocast():
            if static:
                stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [
                    i for i in [config.eos_token_id] if i is not None]
                new = self.decoder.generate(batch["input_ids"], batch["attention_mask"], config.max_new_tokens,
                                            stop_ids=stops, pad_id=config.pad_token_id or 0).tokens[:len(prompts)]
            else:
                output = self.model.generate(**batch, generation_config=config, streamer=streamer)
                new = output[:, batch["input_ids"].shape[1]:]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        new = new.tolist()
        limits = max_new_tokens or [config.max_new_tokens] * len(prompts)
        return [self._completion(ids[:limit]) for ids, limit in zip(new, limits)]

    def _completion(self, ids: list[int]) -> Completion:
        stops = set(self.stop_token_ids)
        end = next((i for i, token in enumerate(ids) if token in stops), None)
        kept = ids if end is None else ids[:end]
        return Completion(kept, self.tokenizer.decode(kept, skip_special_tokens=True),
                          "length" if end is None else "stop", len(ids) if end is None else end + 1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The model's own stop tokens (its generation_config's eos_token_id, one id or a list), plus the tokenizer's
    EOS, which ends every answer the study trains on."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [] if configured is None else [configured]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids = [*ids, tokenizer.eos_token_id]
    return [int(i) for i in ids]
