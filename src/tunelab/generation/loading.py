"""Loading any model of the study for inference: a run's adapter on its base as it trained, full weights,
a merged or exported directory, or the untrained base."""

from __future__ import annotations

from pathlib import Path

from tunelab import modeling
from tunelab.artifacts import read_json
from tunelab.config import TrainConfig


def load_for_inference(model_dir: Path | None, base_dir: Path | None = None, base_settings: TrainConfig | None = None):
    """A model ready to generate (in eval mode), its tokenizer and the settings it runs with.

    `model_dir` is a run's trained model (loaded as it trained: an adapter on its base in the same
    quantization), or any merged or exported model directory (bitsandbytes settings, if any, are in its
    config.json); None means the base of `base_dir` alone: unquantized, or as a QLoRA run's `base_settings`
    load it (its quantization and precision), which is the quantized base that run trains from.
    """
    from peft import PeftModel

    plain = TrainConfig(method="full", precision="bf16" if modeling.device().type == "cuda" else "fp32")
    if model_dir is None:
        path, settings = modeling.base_path(base_dir), base_settings or plain
        return modeling.load_model(path, settings, for_training=False).eval(), modeling.load_tokenizer(path), settings
    tokenizer = modeling.load_tokenizer(model_dir)
    if not (model_dir / "adapter_config.json").is_file():
        return modeling.load_model(model_dir, plain, for_training=False).eval(), tokenizer, plain
    metrics = read_json(model_dir.parent / "train_metrics.json")
    train = TrainConfig.model_validate(metrics["config"])
    base = modeling.load_model(metrics["base"], train, for_training=False)
    return PeftModel.from_pretrained(base, str(model_dir)).eval(), tokenizer, train
