"""Greedy decoding with a static KV cache (transformers' `StaticCache`): the prompt runs once through the model
as it is, then every decoding step (forward, argmax, stop-token bookkeeping) is one call of a step function
that, on a GPU, torch.compile turns into a CUDA graph. The host never waits for the device between steps (stop
tokens are looked at every `CHECK_EVERY` steps), so the GPU, not Python, sets the pace.

Equivalent to transformers' `generate` with greedy decoding: the same positions for left-padded rows, the
same padding after a row's stop token; `check.py` measures how close.

A model on SDPA attention decodes through `GROUPED` (SDPA as well, but each key-value head's query heads are
handed over as one head's queries): transformers' SDPA path copies every key-value head once per query head
(repeat_kv) whenever there is a mask, and a static cache always has one, so each step would copy the whole cache
several times (7x for Qwen2.5-7B).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
CACHE_BUCKET = 128  # cache lengths round up to a multiple of this, so a few compiled shapes serve every batch
GROUPED = "tunelab_grouped_sdpa"
CHECK_EVERY = 8  # decoding steps between looks at whether every row has stopped (each look waits for the GPU)


@dataclass
class Decoded:
    tokens: torch.Tensor  # [batch, new tokens]; after a row's stop token, the pad id (as `generate` pads)
    logits: list[torch.Tensor] | None = None  # per step [batch, vocab] (float32), with keep_logits


# generation settings that change which token greedy decoding picks, with their values that change nothing
CHOICE_SETTINGS = {"do_sample": (None, False), "num_beams": (None, 1), "repetition_penalty": (None, 1.0),
                   "min_new_tokens": (None, 0), "min_length": (None, 0), "no_repeat_ngram_size": (None, 0),
                   "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
                   "sequence_bias": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
                   "encoder_repetition_penalty": (None, 1.0), "diversity_penalty": (None, 0.0)}


def unsupported_model(model) -> str | None:
    """Why the static path cannot run this model (None: it can)."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return "a bitsandbytes-quantized model"
    return None


def unsupported_config(config) -> str | None:
    """The first generation setting that the static path (plain greedy choice) does not apply (None: none)."""
    for key, neutral in CHOICE_SETTINGS.items():
        if getattr(config, key, None) not in neutral:
            return f"{key}={getattr(config, key)!r}"
    return None


class StaticDecoder:
    """Greedy generation for one model; `compiled` (a CUDA GPU) captures the decoding step in a CUDA graph.
    A cache of each (batch, length) shape is kept and reused, so the compiled step is traced once per shape."""

    def __init__(self, model, *, compiled: bool, broken: bool = False, grouped: bool = True,
                 emulate_casts: bool = False, fp32_logits: bool = False):
        self.model, self.compiled, self.grouped = model, compiled, grouped
        # fp32_logits: the head's product from the last hidden state kept in float32 instead of rounded to the
        # model's dtype (bf16 logits of 16-32 are spaced 0.125 apart); a float32 copy of the head's weights
        self._head = model.get_output_embeddings().weight.float() if fp32_logits else None
        self.broken = broken  # the check's deliberately wrong variant: each step is fed the token before the last
        self._caches: dict[tuple[int, int], object] = {}
        # emulate_casts: Inductor rounds fused intermediates to the model's dtype where eager rounds them
        # (bf16), so that compiling changes the kernels but not the rounding (generation/check.py measures it)
        # (mode reduce-overhead is the option triton.cudagraphs; torch.compile takes a mode or options, not both)
        settings = ({"options": {"triton.cudagraphs": True, "emulate_precision_casts": True}} if emulate_casts
                    else {"mode": "reduce-overhead"})
        self._step = (torch.compile(self._decode_step, fullgraph=True, dynamic=False, **settings)
                      if compiled else self._decode_step)

    @contextlib.contextmanager
    def _attention(self):
        """The grouped attention while this decoder runs, where the model uses SDPA (restored afterwards, so that
        `generate` on the same model runs as it always does)."""
        config = self.model.config
        before = config._attn_implementation
        if before == "sdpa" and self.grouped:
            _register_grouped()
            config._attn_implementation = GROUPED
        try:
            yield
        finally:
            config._attn_implementation = before

    def _decode_step(self, tokens, positions, mask, cache, finished, stops, pad):
        logits = self._logits(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache)
        return logits, *_choose(logits, finished, stops, pad)

    def _logits(self, **inputs) -> torch.Tensor:
        """The last position's logits, [batch, vocab]."""
        if self._head is None:
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        hidden = self.model.get_decoder()(**inputs, use_cache=True).last_hidden_state[:, -1]
        return hidden.float() @ self._head.T

    def _cache(self, batch: int, length: int):
        from transformers import StaticCache

        key = (batch, length)
        if key not in self._caches:
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
                 stop_ids: list[int] = (), pad_id: int = 0, forced: torch.Tensor | None = None,
                 keep_logits: bool = False) -> Decoded:
        """Exactly `max_new_tokens` decoding steps for a left-padded batch (fewer when every row has stopped).
        `forced` ([batch, max_new_tokens]) feeds those tokens instead of the chosen ones (teacher forcing)."""
        with self._attention():
            return self._generate(input_ids, attention_mask, max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                                  forced=forced, keep_logits=keep_logits)

    def _generate(self, input_ids, attention_mask, max_new_tokens, *, stop_ids, pad_id, forced, keep_logits):
        batch, prompt = input_ids.shape
        device = input_ids.device
        length = math.ceil((prompt + max_new_tokens) / CACHE_BUCKET) * CACHE_BUCKET
        cache = self._cache(batch, length)
        mask = torch.ones(batch, length, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt] = attention_mask
        # as `generate` numbers left-padded rows: from 0 at each row's first real token
        prompt_positions = attention_mask.long().cumsum(-1) - 1
        prompt_positions.masked_fill_(attention_mask == 0, 1)
        steps = torch.arange(1, max_new_tokens + 1, device=device)
        positions = (prompt_positions[:, -1:] + steps).T.unsqueeze(-1).contiguous()  # [steps, batch, 1]
        stops = torch.tensor(list(stop_ids) or [-1], device=device)
        pad = torch.tensor(pad_id, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        kept: list[torch.Tensor] = []

        logits = self._logits(input_ids=input_ids, attention_mask=mask, position_ids=prompt_positions, cache=cache)
        chosen, now_finished = _choose(logits, finished, stops, pad)
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float().clone())
            out[:, step].copy_(chosen)
            finished.copy_(now_finished)
            if step == max_new_tokens - 1 or (stop_ids and step % CHECK_EVERY == CHECK_EVERY - 1
                                               and bool(finished.all())):
                break
            source = out if forced is None else forced
            fed = max(step - 1, 0) if self.broken else step
            if self.compiled:
                torch.compiler.cudagraph_mark_step_begin()
            logits, chosen, now_finished = self._step(source[:, fed:fed + 1], positions[step], mask, cache,
                                                      finished, stops, pad)
        return Decoded(out, kept if keep_logits else None)


def _choose(logits: torch.Tensor, finished: torch.Tensor, stops: torch.Tensor, pad: torch.Tensor):
    """Greedy choice; a stopped row gets the pad id, as `generate` gives it."""
    chosen = torch.where(finished, pad, logits.argmax(-1))
    return chosen, finished | torch.isin(chosen, stops)


def grouped_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA for one decoding step without copying the key-value heads: the query heads that share a key-value
    head (transformers' head order: query head h reads key-value head h // group) become that head's queries,
    all under the same mask. Several query tokens (the prompt) go to transformers' own SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if length != 1 or dropout:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    grouped = query.reshape(batch, key.shape[1], heads // key.shape[1], dim)
    mask = None if attention_mask is None else attention_mask[:, :, :, :key.shape[-2]]
    output = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def _register_grouped() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GROUPED, grouped_attention)
    AttentionMaskInterface.register(GROUPED, sdpa_mask)
