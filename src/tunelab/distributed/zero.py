"""The DeepSpeed config of a run, generated from its settings (never edited by hand)."""

from __future__ import annotations

from tunelab.config import TrainConfig


def deepspeed_config(train: TrainConfig) -> dict:
    """ZeRO settings for `train`: its micro-batch, its share of accumulation per rank, its clipping and stage.

    Precision stays tunelab's: weights keep the dtype `modeling.load_model` gave them and the forward runs under
    the run's autocast, so a 2-GPU run has the 1-GPU run's precision policy (DeepSpeed's own bf16/fp16 modes off).
    The engine turns off an autocast entered outside it unless its `torch_autocast` section names it; no module is
    listed as lower-precision-safe, so gradients are reduced in the weights' dtype, as one GPU accumulates them.
    The optimizer is tunelab's torch AdamW (`zero_allow_untested_optimizer`): nothing is JIT-compiled.
    """
    distributed = train.distributed
    stage = distributed.zero_stage
    zero = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if stage == 3:
        # rank 0 can save whole weights (merge and generate read a plain model or adapter). Gathered weights are the
        # fp32 master weights of full fine-tuning: at most 3e8 of them stay gathered at once or are kept for reuse
        # (DeepSpeed's 1e9 is 3.7 GiB in fp32; a decoder layer of Qwen2.5-7B holds 2.3e8), 5e7 are prefetched
        # (DeepSpeed's default), and gradients are reduced in buckets of 2e8 (0.75 GiB in fp32)
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5,
                    stage3_prefetch_bucket_size=5e7, stage3_max_live_parameters=3e8, stage3_max_reuse_distance=3e8,
                    reduce_bucket_size=2e8)
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps // distributed.world_size,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {"enabled": train.precision != "fp32", "dtype": train.precision,
                           "lower_precision_safe_modules": []},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
