"""Checkpointing with offloaded layer inputs (tunelab.offload) trains exactly what plain checkpointing trains:
the LoRA gradients of a tiny Qwen2 that has learned a token chain, with LoRA dropout on (so the recomputation must
replay the forward's random masks), agree with plain recomputation and with no checkpointing at all. On the CPU
`auto` stays off; the config refuses `on` where it can't apply."""

from __future__ import annotations

import pytest
import torch

from tunelab import modeling, offload, train
from tunelab.config import LoraConfig, TrainConfig
from tunelab.kernels import check

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def learned(confident_qwen2):
    """A tiny Qwen2 trained on a token chain until its loss is far below ln(vocab)."""
    path, base = confident_qwen2(TINY)
    assert base["last_loss"] < 0.3 * base["first_loss"], base
    return path


def _lora_gradients(path, checkpointing: bool, offloaded: str, precision: str = "fp32", layers: int | None = None,
                    calls: list | None = None) -> tuple[str, torch.Tensor]:
    """One forward and backward of LoRA (dropout 0.1) on a second chain; every LoRA gradient, flattened. `layers`:
    train.checkpoint_layers; `calls` gets how often each decoder layer's forward ran (twice where recomputed)."""
    config = TrainConfig(method="lora", precision=precision, gradient_checkpointing=checkpointing,
                         checkpoint_offload=offloaded, checkpoint_layers=layers,
                         lora=LoraConfig(r=4, alpha=8, dropout=0.1))
    torch.manual_seed(0)
    model = train.attach_method(modeling.load_model(path, config, for_training=True), config)
    if calls is not None:
        decoder_layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        calls.extend([0] * len(decoder_layers))
        for index, layer in enumerate(decoder_layers):  # the MLP starts again when recomputed
            layer.mlp.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that both adapter matrices get gradients
            torch.nn.init.normal_(param, std=0.05)
    chain = torch.randperm(TINY["vocab_size"], generator=torch.Generator().manual_seed(7))
    ids = torch.tensor([e["input_ids"] for e in check.chain_examples(chain, 8, 32, seed=3)])
    model.train()
    torch.manual_seed(123)  # the dropout masks: the same draws on every path
    with modeling.autocast(config, torch.device("cpu"))():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad.flatten() for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 2 * 7 * TINY["num_hidden_layers"] and all(g.abs().sum() > 0 for g in grads)
    return offload.applied(model), torch.cat(grads)


def _agree(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
    return bool(cosine >= 0.999) and torch.allclose(a, b, rtol=rtol, atol=rtol * a.abs().max())


def test_offloaded_checkpointing_gives_the_gradients_of_plain_checkpointing(learned):
    mode, offloaded = _lora_gradients(learned, True, "on")
    assert mode == "offload"
    mode, recomputed = _lora_gradients(learned, True, "off")
    assert mode == "recompute"
    mode, whole = _lora_gradients(learned, False, "auto")
    assert mode == "none"
    assert _agree(offloaded, recomputed, 1e-5) and _agree(offloaded, whole, 1e-5)
    # the dropout masks matter: other draws give other gradients, which the comparison must tell apart
    assert not _agree(offloaded, _redrawn(learned), 1e-5)


def _redrawn(path) -> torch.Tensor:
    """Plain checkpointing's gradients with other dropout masks in the forward and recomputation alike."""
    state = torch.get_rng_state()
    try:
        original = torch.manual_seed
        torch.manual_seed = lambda seed: original(seed + 1 if seed == 123 else seed)
        return _lora_gradients(path, True, "off")[1]
    finally:
        torch.manual_seed = original
        torch.set_rng_state(state)


@pytest.mark.parametrize("offloaded", ["on", "off"])
def test_checkpoint_layers_leaves_the_last_layers_unrecomputed_with_the_same_gradients(learned, offloaded):
    calls = []
    mode, partial = _lora_gradients(learned, True, offloaded, layers=1, calls=calls)
    assert mode == ("offload" if offloaded == "on" else "recompute") + " 1/3 layers"
    assert calls == [2, 1, 1]  # the first layer recomputed in the backward, the other two not
    _, whole = _lora_gradients(learned, False, "auto")
    assert _agree(partial, whole, 1e-5)
    calls = []
    assert _lora_gradients(learned, True, offloaded, layers=3, calls=calls)[0] in ("offload", "recompute")
    assert calls == [2, 2, 2]
    with pytest.raises(ValueError, match="checkpoint_layers chooses how many layers gradient checkpointing covers"):
        TrainConfig(checkpoint_layers=2)


def test_offloaded_checkpointing_under_bf16_autocast(learned):
    """The recomputation runs under the forward's autocast: bf16 on both paths, so they agree closely."""
    _, offloaded = _lora_gradients(learned, True, "on", precision="bf16")
    _, recomputed = _lora_gradients(learned, True, "off", precision="bf16")
    assert _agree(offloaded, recomputed, 1e-3)


def test_offload_resolves_per_device_and_the_config_refuses_what_cannot_apply():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    checkpointed = TrainConfig(gradient_checkpointing=True)
    assert offload.resolve(checkpointed, cpu) == "recompute"  # auto: the CPU path never offloads
    assert offload.resolve(checkpointed, cuda) == "offload"
    assert offload.resolve(TrainConfig(gradient_checkpointing=True, checkpoint_offload="off"), cuda) == "recompute"
    assert offload.resolve(TrainConfig(), cuda) == "none"
    with pytest.raises(ValueError, match="checkpoint_offload on offloads the checkpointed layer inputs and needs "
                                         "gradient_checkpointing: true"):
        TrainConfig(checkpoint_offload="on")
    with pytest.raises(ValueError, match="checkpoint_offload"):
        TrainConfig(gradient_checkpointing=True, checkpoint_offload="yes")


def test_train_metrics_record_the_checkpointing_that_ran(tiny_base, tiny_tokens, tmp_path):
    from tunelab.artifacts import read_json
    from tunelab.config import Run, TrainConfig
    from tunelab.train import run_train

    recorded = {}
    for offloaded in ("on", "auto"):
        config = TrainConfig(method="lora", gradient_checkpointing=True, checkpoint_offload=offloaded, max_steps=3,
                             micro_batch_size=4, eval_every=3, log_every=3, tracking=[])
        run_train(Run(name=f"offload-{offloaded}", model="tiny", train=config), tiny_base, tiny_tokens / "tokens",
                  tmp_path / offloaded)
        recorded[offloaded] = read_json(tmp_path / offloaded / "train_metrics.json")
    assert recorded["on"]["checkpointing"] == "offload" and recorded["auto"]["checkpointing"] == "recompute"
    for (_, offloaded), (_, recomputed) in zip(recorded["on"]["loss_curve"], recorded["auto"]["loss_curve"]):
        assert offloaded == pytest.approx(recomputed, rel=1e-5)
