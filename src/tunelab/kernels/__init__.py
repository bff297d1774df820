"""The fast training path, chosen by `train.kernels` (auto | liger | none) and applied by `apply` once the
method is attached (`train.attach_method`).

`liger` (CUDA only) changes how the same function is computed, never what is trained:
- the loss through Liger-Kernel's fused linear + cross-entropy: the vocabulary-wide logits of a training
  batch (4,096 tokens x 151,936 for Qwen2.5, 2.3 GiB in fp32 plus their gradient) are never materialised;
- RMSNorm and SwiGLU through Liger-Kernel's fused Triton kernels;
- every plain LoRA adapter (no dropout, no DoRA, one active adapter) as `base(x) + (x A^T)(s B)^T` in one
  `addmm` in the output's dtype, instead of PEFT's fp32 copy of the input, a scaled copy and a sum;
- the frozen weights that `prepare_model_for_kbit_training` upcast to fp32 (norms, embedding, tied head)
  back in the compute dtype: half their memory. The residual stream stays fp32, as on the plain path (the
  embedding's output is cast up): a bf16 one parted from the plain path's loss by up to 3 % on real weights.
Liger is patched per instance (bound methods), never module-wide, so a second model in the same process
(the bench's plain loop) is untouched. `auto` is `liger` on CUDA and `none` elsewhere, so the CPU path and CI
never import Liger or Triton. What ran is recorded as `kernels` in train_metrics.json.
"""

from __future__ import annotations

import importlib.util
import logging
from types import MethodType

import torch
import torch.nn.functional as F

from tunelab import modeling
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
APPLIED = "_tunelab_kernels"  # attribute on the returned model: the kernels that ran


def resolve(requested: str, device: torch.device, quantization: str = "none") -> str:
    """The kernels a run uses: `auto` is liger on CUDA (when Liger-Kernel is installed) for unquantized runs, else
    none. A quantized run (QLoRA) gets liger only when asked for: on real weights (SmolLM2-135M, call
    gpu-20261201-2, BENCHMARKS.md) its loss parted from the plain path's by up to 2.8 % (the check allows 1 %).
    The cause (bf16 where plain QLoRA is fp32: the residual stream, the LoRA layers' outputs) is fixed in
    `_frozen_to` and `fused_lora_forward`; liger comes back for QLoRA once the GPU check passes with it."""
    if requested == "none" or (requested == "auto" and quantization != "none"):
        return "none"
    available = device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    if requested == "liger" and not available:
        raise TunelabError(f"train.kernels: liger needs a CUDA GPU and the liger-kernel package (device {device.type}, "
                           f"liger-kernel {'installed' if importlib.util.find_spec('liger_kernel') else 'missing'}); "
                           "set kernels: auto or none")
    if requested == "auto" and not available:
        if device.type == "cuda":
            log.warning("train.kernels auto: liger-kernel is not installed, training on the plain path")
        return "none"
    return "liger"


def apply(model, train):
    """Put `model` (the method attached) on the fast path `train.kernels` resolves to; return it."""
    device = modeling.model_device(model)  # a rank's model may still be on the meta device
    # ZeRO-3 gathers a weight only while its own module runs; the fused loss reads lm_head.weight (and the fused
    # LoRA the adapters' weights) outside it. `liger` is refused there at validation (config.UNSUPPORTED_DISTRIBUTED)
    zero3 = modeling.shards_weights(train) and train.distributed.strategy == "deepspeed"
    kernels = "none" if zero3 else resolve(train.kernels, device, train.quantization)
    if kernels == "liger":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        if dtype is not None:
            _frozen_to(model, dtype)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        _liger(base)
        fused = fuse_lora(model)
        log.info("kernels liger: fused loss, RMSNorm, SwiGLU; %d LoRA layers fused", fused)
    setattr(model, APPLIED, kernels)
    return model


def applied(model) -> str:
    """The kernels `apply` put on `model` ("none" for a model it never saw)."""
    return getattr(model, APPLIED, "none")


def _frozen_to(model, dtype: torch.dtype) -> None:
    """Frozen fp32 floating weights (prepare_model_for_kbit_training's upcast) back to `dtype`; trainable
    parameters (the adapters' fp32 master weights) stay as they are. The upcast was exact, so the weights keep
    their values. Where the input embedding was among them, its output goes back to fp32: the residual stream
    stays fp32 as on the plain path, and a norm's `dtype` weight times fp32 hidden states is the same fp32
    product. (With a bf16 residual stream, QLoRA on real weights parted from the plain path's loss by 2.8 %.)"""
    embedding = model.get_input_embeddings()
    if not embedding.weight.requires_grad and embedding.weight.dtype == torch.float32:
        embedding.register_forward_hook(_to_fp32)
    for param in model.parameters():
        if not param.requires_grad and param.dtype == torch.float32:
            param.data = param.data.to(dtype)


def _to_fp32(module, args, output: torch.Tensor) -> torch.Tensor:
    return output.float()


def _liger(model) -> None:
    """Liger-Kernel's fused RMSNorm, SwiGLU and linear + cross-entropy on this Qwen2/Llama-style instance."""
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    for module in model.modules():
        name = type(module).__name__
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.offset, module.casting_mode, module.in_place, module.row_mode = 0.0, "llama", False, None
            module.forward = MethodType(LigerRMSNorm.forward, module)
        elif name.endswith("MLP") and hasattr(module, "gate_proj") \
                and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish"):
            module.forward = MethodType(LigerSwiGLUMLP.forward, module)
    model.forward = MethodType(_fused_loss_forward(type(model).forward), model)


def _fused_loss_forward(plain_forward):
    """The causal LM's forward: in training with labels, the loss from the last hidden state through Liger's
    fused linear + cross-entropy (same shift, ignore index and `num_items_in_batch` normalisation as
    transformers' ForCausalLMLoss); otherwise `plain_forward`."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    from transformers.modeling_outputs import CausalLMOutputWithPast

    def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
        if not (self.training and labels is not None) or kwargs.get("inputs_embeds") is not None:
            return plain_forward(self, input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch,
                                 **kwargs)
        hidden = self.model(input_ids=input_ids, **kwargs)[0]
        # QLoRA's fp32 residual stream meets a bf16 head (_frozen_to): the plain path's autocast rounds the
        # hidden states to bf16 for that product; rounded here, Liger's chunks get one dtype whatever autocast does
        hidden = hidden.to(self.lm_head.weight.dtype)
        targets = F.pad(labels, (0, 1), value=-100)[..., 1:].reshape(-1).to(hidden.device)
        loss = liger_fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets, ignore_index=-100,
            reduction="mean" if num_items_in_batch is None else "sum")
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
        return CausalLMOutputWithPast(loss=loss)
    return forward


def fuse_lora(model) -> int:
    """Bind `fused_lora_forward` to every plain LoRA layer of `model`; return how many."""
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and _plain_lora(module):
            module.forward = MethodType(fused_lora_forward, module)
            count += 1
    return count


def _plain_lora(layer) -> bool:
    """One adapter without dropout, DoRA or bias on a linear base layer (PEFT's lora.Linear or bnb Linear4bit)."""
    adapters = list(layer.lora_A.keys())
    if len(adapters) != 1 or getattr(layer, "lora_variant", {}) or any(layer.use_dora.values()):
        return False
    name = adapters[0]
    return (isinstance(layer.lora_dropout[name], torch.nn.Identity) and layer.lora_B[name].bias is None
            and isinstance(layer.lora_A[name], torch.nn.Linear) and type(layer).__name__ in ("Linear", "Linear4bit"))


def lora_scaling(layer, adapter: str) -> float:
    """PEFT's alpha / r (or alpha / sqrt(r) with rsLoRA) of one adapter."""
    return layer.scaling[adapter]


def fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward, `base(x) + scale * B(A(x))`, as one addmm onto the base output in its dtype (two ops
    where autocast would compute that addmm in a lower precision than the base output's)."""
    if self.disable_adapters or self.merged or args or kwargs or self.active_adapters != list(self.lora_A.keys()):
        return type(self).forward(self, x, *args, **kwargs)
    adapter = self.active_adapters[0]
    result = self.base_layer(x)
    dtype = result.dtype
    lora_a = self.lora_A[adapter].weight.to(dtype)
    lora_b = self.lora_B[adapter].weight.to(dtype) * lora_scaling(self, adapter)
    hidden = x.to(dtype).reshape(-1, x.shape[-1]) @ lora_a.t()
    result_rows = result.reshape(-1, result.shape[-1])
    device = x.device.type
    if torch.is_autocast_enabled(device) and dtype != torch.get_autocast_dtype(device):
        # an fp32 base output (a 4-bit layer returns its input's dtype, and QLoRA's residual stream is fp32):
        # autocast would round addmm's sum to bf16; PEFT adds its bf16 LoRA term to it in fp32 (a 2.95 % loss
        # gap on real weights when rounded)
        out = result_rows + hidden @ lora_b.t()
    else:
        out = torch.addmm(result_rows, hidden, lora_b.t())
    return out.view(result.shape)
