"""Base models: the tiny random-weight Qwen2 and its tokenizer, and loading any base with its
quantization, attention and precision. Shared by the base, train, merge and generate stages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedTokenizerFast

from tunelab.artifacts import read_json
from tunelab.config import TinyModelConfig, TrainConfig
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
PAD, EOS = "<|pad|>", "<|endoftext|>"
# Qwen2's pre-tokenizer split. AutoTokenizer rebuilds any qwen2 tokenizer with it on reload (it is in
# transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), so the tiny tokenizer is trained with it too:
# otherwise ids change after save/reload (../shared/notes/cpu-feasibility.md, gotcha 1).
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device() -> torch.device:
    # the current GPU: a rank of a multi-GPU run has set its own (distributed.runtime)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def train_tiny_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen2's pre-tokenizer, trained on `corpus`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS)


def build_tiny_model(settings: TinyModelConfig, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A random-weight Qwen2ForCausalLM sized by `settings`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers, num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads, max_position_embeddings=2048, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config)


def weights_size(model_dir: Path) -> int:
    """Bytes of a saved model's weights (its safetensors shards) on disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def base_path(base_dir: Path) -> str:
    """Where the base stage put (or found) the weights: a local directory or a hub id."""
    return read_json(Path(base_dir) / "base.json")["path"]


def load_tokenizer(path: str | Path, padding_side: str = "right"):
    tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side=padding_side)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, train: TrainConfig, *, for_training: bool):
    """Load a causal LM with the run's precision, attention and quantization, on the run's device."""
    if not str(path).startswith(("hf:",)) and not Path(path).exists():
        raise TunelabError(f"model path {str(path)!r} does not exist")
    kwargs = {"dtype": weights_dtype(train, for_training=for_training), "attn_implementation": train.attention,
              "device_map": {"": str(device())}}  # also places pre-quantized (exported) models, which refuse .to()
    if train.quantization != "none":
        kwargs["quantization_config"] = quantization_config(train)
    if train.quantization == "int8":  # bitsandbytes warns "inputs will be cast ..." at every int8 matmul call
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(str(path).removeprefix("hf:"), **kwargs)
    if train.quantization == "nf4" and device().type == "cpu":
        _keep_cpu_4bit_layout(model)
    if for_training and train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def _keep_cpu_4bit_layout(model) -> None:
    """Compute a CPU 4-bit model as it trains, in its compute dtype, in eval mode too.

    On a CPU with AVX512-BF16, bitsandbytes repacks the 4-bit weights the first time a Linear4bit runs in eval
    mode without gradients, and from then on computes it in bf16 (inputs and block scales rounded to bf16),
    whatever the compute dtype. An fp32 QLoRA run evaluated that way is not the model that trained: on the tiny
    study its test loss moved by 1 % (0.025418 packed vs 0.025671 as trained and as merged, 46 of 120 records
    off by more than 1e-4). Training also fails on the packed weights ("a view of a leaf Variable ... in-place
    operation"), which the validation pass would otherwise cause.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def autocast(train: TrainConfig, device: torch.device):
    """A factory of the run's autocast context (a no-op for fp32)."""
    if train.precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=DTYPES[train.precision])


def weights_dtype(train: TrainConfig, *, for_training: bool = False) -> torch.dtype:
    """Storage dtype of the base weights. Full fine-tuning in bf16/fp16 keeps fp32 master weights (unless
    `master_weights: same`): a bf16 weight can't hold an update below 2^-9 of itself, so at lr 1e-5 most updates
    would round away. Autocast computes in the precision; memory is that of fp32 weights, gradients and states.
    Inference (merge, generate) loads in the precision itself."""
    if for_training and train.method == "full" and train.master_weights == "fp32":
        return torch.float32
    return DTYPES[train.precision]


def quantization_config(train: TrainConfig) -> BitsAndBytesConfig:
    _check_bitsandbytes(train.quantization)
    if train.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=DTYPES[train.precision],
                                  bnb_4bit_quant_storage=DTYPES[train.precision])
    return BitsAndBytesConfig(load_in_8bit=True)


def _check_bitsandbytes(quantization: str) -> None:
    """One clear error when bitsandbytes is missing or can't run on this device, before transformers fails deep
    inside loading (bitsandbytes >= 0.48 runs nf4/int8 on CUDA, CPU and a few others)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunelabError(f"quantization {quantization} needs bitsandbytes, which is not installed "
                           "(pip install bitsandbytes, or set quantization: none)")
    import bitsandbytes
    from bitsandbytes.cextension import ErrorHandlerMockBNBNativeLibrary, lib

    here = device().type
    supported = getattr(bitsandbytes, "supported_torch_devices", {here})
    if here not in supported or isinstance(lib, ErrorHandlerMockBNBNativeLibrary):
        raise TunelabError(f"quantization {quantization}: bitsandbytes {bitsandbytes.__version__} can't run on this "
                           f"machine's device {here} (it supports {', '.join(sorted(supported))}; run on a GPU node, "
                           "or set quantization: none)")
