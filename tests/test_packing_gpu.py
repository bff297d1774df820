"""Packing on flash-attn's variable-length kernel: a packed row gives the loss of the padded batch on the GPU.

Runs where CUDA and flash-attn are installed (the device machine; BENCHMARKS.md), skipped elsewhere; the CPU
tests in test_train.py cover packing on eager and sdpa attention. The model is a random 2-layer Qwen2 with
head dimension 128 (what Qwen2.5-1.5B/7B use), in bf16, which flash-attn needs. Run there with
`python3 -m pytest --noconftest tests/test_packing_gpu.py`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tunelab.batches import collate, label_tokens, pack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
                                reason="needs a CUDA GPU with flash-attn installed")


def random_model(attention: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=512, max_position_embeddings=1024,
                         initializer_range=0.2)  # large enough weights that the loss depends on what is attended
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attention).cuda().eval()


def test_packed_row_on_flash_attention_gives_the_padded_loss():
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (37, 200, 5, 128, 91):
        ids = torch.randint(1, 512, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    padded, packed = collate(examples, pad_id=0), pack(examples)
    assert label_tokens(packed) == label_tokens(padded)
    with torch.no_grad():
        reference = float(random_model("sdpa")(**{k: v.cuda() for k, v in padded.items()}, use_cache=False).loss)
        flash = random_model("flash_attention_2")
        packed_loss = float(flash(**{k: v.cuda() for k, v in packed.items()}, use_cache=False).loss)
        running_on = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
        leaked = float(flash(**{k: v.cuda() for k, v in running_on.items()}, use_cache=False).loss)
    assert packed_loss == pytest.approx(reference, rel=2e-3)
    assert abs(packed_loss - reference) < abs(leaked - reference) / 10, "attending across examples shows"
