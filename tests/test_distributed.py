"""Data-parallel training on the CPU with the gloo backend: validation of `train.distributed`, two processes
training the one-process update, the launcher tunelab train starts (torchrun, srun), signals reaching every rank
and the rerun resuming to the uninterrupted loss, and the per-node command lines as two rendezvous launchers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tunelab import modeling
from tunelab.artifacts import read_json, read_jsonl
from tunelab.config import DistributedConfig, TrainConfig, load_study
from tunelab.distributed import launch, runtime
from tunelab.distributed.fsdp import FullyShard
from tunelab.distributed.zero import deepspeed_config
from tunelab.errors import TunelabError
from tunelab.merge import run_merge
from tunelab.train import _numel, attach_method, fit, save_trained
from conftest import REPO

TOLERANCE = 0.01  # relative, at every step
STEPS = 20


def study_text(**train) -> str:
    study = {"name": "dist", "data": {"source": "synthetic:300", "test_size": 8, "max_length": 96},
             "models": {"tiny": {"source": "tiny", "tiny": {"vocab_size": 512, "warmup_steps": 0}}},
             "train": {"max_steps": 40, "micro_batch_size": 2, "gradient_accumulation_steps": 2, **train},
             "runs": [{"name": "r", "model": "tiny"}]}
    return yaml.safe_dump(study)


# --- validation -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("distributed, other, message", [
    ({"strategy": "deepspeed", "gpus": 2}, {"method": "adalora"}, "RankAllocator"),
    ({"strategy": "deepspeed", "gpus": 2}, {"precision": "fp16"}, "loss scaler"),
    ({"strategy": "ddp", "gpus": 2, "nodes": 2}, {"gradient_accumulation_steps": 2}, "multiple of the 4 processes"),
    ({"strategy": "fsdp", "gpus": 2}, {"method": "adalora"}, "AdaLoraModel.forward"),
    ({"strategy": "fsdp", "gpus": 2}, {"quantization": "int8"}, "no attribute 'CB'"),
    ({"strategy": "fsdp", "gpus": 2}, {"optimizer": "adamw_8bit"}, "sharding strategy"),
    ({"zero_stage": 3, "gpus": 2}, {"kernels": "liger"}, "reads lm_head.weight"),
    ({"gpus": 0}, {}, "greater than or equal to 1"),
    ({"gpus": 2, "zero": 2}, {}, "unknown key (allowed: strategy, zero_stage, gpus, nodes)"),
])
def test_unsupported_combinations_get_one_clear_error(tmp_path, distributed, other, message):
    path = tmp_path / "study.yaml"
    path.write_text(study_text(gradient_accumulation_steps=other.pop("gradient_accumulation_steps", 4),
                               distributed=distributed, **other))
    with pytest.raises(TunelabError) as error:
        load_study(path)
    text = str(error.value)
    assert message in text and str(path) in text and "distributed" in text and len(text.splitlines()) == 1


def test_supported_combinations_validate(tmp_path):
    for distributed, other in [({"gpus": 2}, {}), ({"strategy": "ddp", "gpus": 2}, {"method": "adalora"}),
                               ({"zero_stage": 3, "gpus": 2, "nodes": 2}, {"method": "full"}),
                               ({"strategy": "ddp", "gpus": 2}, {"quantization": "nf4"}),
                               ({"strategy": "fsdp", "gpus": 2}, {"quantization": "nf4", "precision": "bf16"}),
                               ({"zero_stage": 3, "gpus": 2}, {"quantization": "nf4", "optimizer": "paged_adamw_8bit"}),
                               ({"strategy": "fsdp", "gpus": 2, "nodes": 2}, {"method": "full", "precision": "fp16"})]:
        path = tmp_path / "study.yaml"
        path.write_text(study_text(gradient_accumulation_steps=4, distributed=distributed, **other))
        train = load_study(path).run("r").train
        assert train.distributed.strategy == distributed.get("strategy", "deepspeed")
        assert train.world_size == distributed["gpus"] * distributed.get("nodes", 1)


def test_deepspeed_config_keeps_the_global_batch():
    train = TrainConfig(micro_batch_size=4, gradient_accumulation_steps=8, max_grad_norm=0.5,
                        distributed={"zero_stage": 3, "gpus": 2, "nodes": 2})
    config = deepspeed_config(train)
    assert config["train_batch_size"] == 4 * 8 == (config["train_micro_batch_size_per_gpu"]
                                                     * config["gradient_accumulation_steps"] * 4)
    assert config["zero_optimization"]["stage"] == 3 and config["gradient_clipping"] == 0.5
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert deepspeed_config(train.model_copy(update={"distributed": DistributedConfig(gpus=2)}))[
        "zero_optimization"]["stage"] == 2


def test_sharded_weights_keep_no_autocast_cache():
    """Autocast's cache of low-precision weight copies lives until the outermost autocast exits: under FSDP and
    ZeRO-3 it would hold a bf16 copy of every gathered weight through the forward. It is off there, also inside
    an autocast nested without `cache_enabled` (as DeepSpeed's engine opens one), and on elsewhere."""
    settings = {"method": "full", "precision": "bf16", "gradient_accumulation_steps": 2}
    for distributed, cached in [({"zero_stage": 3, "gpus": 2}, False), ({"strategy": "fsdp", "gpus": 2}, False),
                                ({"zero_stage": 2, "gpus": 2}, True), ({"strategy": "ddp", "gpus": 2}, True),
                                (None, True)]:
        train = TrainConfig(**settings, distributed=distributed)
        with modeling.autocast(train, torch.device("cpu"))():
            assert torch.is_autocast_cache_enabled() is cached, distributed
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
                assert torch.is_autocast_cache_enabled() is cached, distributed


# --- two processes train the one-process update ---------------------------------------------------------------

def _train_settings(quantization: str = "none", **other) -> TrainConfig:
    # no dropout anywhere (the tiny Qwen2 has none, the adapter's is 0), four micro-batches a step; full
    # fine-tuning, or QLoRA (nf4 stored and computed in fp32) at a learning rate that moves its loss as far
    method = {"method": "full", "learning_rate": 2e-3} if quantization == "none" else {
        "method": "lora", "quantization": quantization, "learning_rate": 1e-2, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}
    return TrainConfig(**method, **other, max_steps=STEPS, micro_batch_size=2, gradient_accumulation_steps=4,
                       warmup_steps=0, lr_scheduler="constant_with_warmup", eval_every=STEPS,
                       group_by_length=False, profile={"steps": 0}, checkpoint_every=0)


class _WithoutAllReduce(runtime.DataParallel):
    """The broken variant: each rank steps on its own gradients (no DDP), so the ranks drift apart."""

    def wrap(self, model, optimizer):
        return model

    def accumulating(self, wrapped, more_to_come):
        return runtime.Single.accumulating(self, wrapped, more_to_come)

    def backward(self, loss):
        loss.backward()


class _FullyShardWithoutReduce(FullyShard):
    """The broken FSDP variant: each rank shards over itself alone (a mesh of one), so no gradient is reduced."""

    def shard_model(self, model):
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh("cpu", (self.world_size, 1), mesh_dim_names=("alone", "shard"))["shard"]
        return super().shard_model(model)

    def backward(self, loss):
        loss.backward()


def _every_weight_partitioned(train: TrainConfig) -> runtime.DeepSpeed:
    """ZeRO-3 keeps weights under 1e5 elements whole on every rank (the tiny model's are), and gathered weights
    it will reuse soon: partition them all, and release each after use."""
    worker = runtime.DeepSpeed(train)
    worker.config["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                              stage3_max_live_parameters=0)
    return worker


RUNTIMES = {"ddp": (runtime.DataParallel, _WithoutAllReduce), "fsdp": (FullyShard, _FullyShardWithoutReduce),
            "deepspeed": (_every_weight_partitioned, None)}


def _rank(rank: int, world: int, port: int, base: str, tokens: str, out: str, broken: bool, strategy: str,
          quantization: str, other: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train = _train_settings(quantization, **other)
    torch.manual_seed(0)
    worker = RUNTIMES[strategy][broken](train) if world > 1 else runtime.Single()
    model = attach_method(worker.load_model(base, train), train)
    # the weights this rank holds before sharding: all of them, or none where it receives its shards from rank 0
    held = [sum(w.numel() for w in model.parameters() if not w.is_meta), sum(w.numel() for w in model.parameters())]
    Path(f"{out}.{rank}.held.json").write_text(json.dumps(held))
    metrics = fit(model, read_jsonl(Path(tokens) / "train.jsonl"), read_jsonl(Path(tokens) / "validation.jsonl")[:4],
                  train, 0, runtime=worker)
    Path(f"{out}.{rank}.json").write_text(json.dumps(metrics["loss_curve"]))
    worker.close()


def _losses(tmp_path, tiny_base, tiny_tokens, world: int, broken: bool = False, strategy: str = "ddp",
            quantization: str = "none", **other) -> list[list[float]]:
    out = tmp_path / f"w{world}{'-broken' if broken else ''}"
    args = (world, _free_port(), str(tiny_base), str(tiny_tokens / "tokens"), str(out), broken, strategy, quantization,
            other)
    mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
    return [[loss for _, loss in json.loads(Path(f"{out}.{r}.json").read_text())] for r in range(world)]


def _matches(reference: list[float], other: list[float]) -> bool:
    return all(abs(a - b) <= TOLERANCE * abs(a) for a, b in zip(reference, other, strict=True))


@pytest.mark.parametrize("strategy, quantization", [("ddp", "none"), ("fsdp", "none"), ("fsdp", "nf4")])
def test_two_processes_train_the_one_process_curve(tmp_path, tiny_base, tiny_tokens, strategy, quantization):
    """DDP and FSDP2 (full fine-tuning, and QLoRA with its 4-bit weights sharded) against one process."""
    [single] = _losses(tmp_path, tiny_base, tiny_tokens, 1, quantization=quantization)
    assert single[0] - min(single) >= 10 * TOLERANCE * single[0], f"the loss must fall well past the tolerance: {single}"
    both = _losses(tmp_path, tiny_base, tiny_tokens, 2, strategy=strategy, quantization=quantization)
    assert both[0] == both[1]  # every rank logs the all-reduced loss
    assert _matches(single, both[0]), list(zip(single, both[0]))
    held = [json.loads((tmp_path / f"w2.{rank}.held.json").read_text()) for rank in range(2)]
    if strategy == "fsdp" and quantization == "none":  # rank 0 alone read the weights; rank 1 built on meta
        assert held[0][0] == held[0][1] > 0 and held[1] == [0, held[0][1]], held
        # and received them, buffers too (rotary frequencies left unsent: 1.4e-3 off): fp32 sums in another order only
        assert max(abs(a - b) / a for a, b in zip(single, both[0])) <= 1e-5, list(zip(single, both[0]))
    else:  # DDP holds everything everywhere; QLoRA quantizes while it loads, on every rank
        assert all(materialised == total > 0 for materialised, total in held), held
    # the broken variant (no gradient all-reduce / reduce-scatter) is caught by the same check
    broken = _losses(tmp_path, tiny_base, tiny_tokens, 2, broken=True, strategy=strategy, quantization=quantization)
    assert not _matches(single, broken[0]), list(zip(single, broken[0]))
    worst = max(abs(a - b) / a for a, b in zip(single, both[0]))
    print(f"loss {single[0]:.4f} -> {min(single):.4f}; 2 processes off by at most {worst:.2e} (relative); without "
          f"the all-reduce by {max(abs(a - b) / a for a, b in zip(single, broken[0])):.2e}")


DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                               reason="deepspeed is not installed (pip install -e .[gpu])")


@DEEPSPEED
@pytest.mark.parametrize("stage", [2, 3])
def test_qlora_and_8bit_optimizers_under_deepspeed_train_the_one_process_curve(tmp_path, tiny_base, tiny_tokens, stage):
    """QLoRA (its 4-bit weights partitioned by ZeRO-3 too) with bitsandbytes' paged 8-bit AdamW, which ZeRO steps
    on its flattened partitions: the loss curve of one process within 1 % at every step."""
    other = {"optimizer": "paged_adamw_8bit"}
    [single] = _losses(tmp_path, tiny_base, tiny_tokens, 1, quantization="nf4", **other)
    assert single[0] - min(single) >= 10 * TOLERANCE * single[0], single
    both = _losses(tmp_path, tiny_base, tiny_tokens, 2, strategy="deepspeed", quantization="nf4", **other,
                   distributed={"strategy": "deepspeed", "zero_stage": stage, "gpus": 2})
    assert both[0] == both[1] and _matches(single, both[0]), list(zip(single, both[0]))
    print(f"ZeRO-{stage}: off by at most {max(abs(a - b) / a for a, b in zip(single, both[0])):.2e} (relative)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the launcher: signals reach every rank, the rerun resumes --------------------------------------------------

RESUME_STEPS, EVERY = 12, 4


def _start(tmp_path: Path, tiny_base: Path, tiny_tokens: Path, out: Path, strategy: str = "ddp") -> subprocess.Popen:
    """`tunelab train` of a 2-process run as the rule starts it: it starts torchrun, which starts the ranks."""
    study = tmp_path / "study.yaml"
    if not study.exists():
        study.write_text(study_text(
            max_steps=RESUME_STEPS, checkpoint_every=EVERY, gradient_accumulation_steps=2, learning_rate=2e-3,
            warmup_steps=2, eval_every=6, log_every=1, profile={"steps": 0},
            lora={"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: every rank's RNG must resume
            distributed={"strategy": strategy, "gpus": 2}))
    command = [sys.executable, "-m", "tunelab.cli", "train", "--config", str(study), "--run", "r",
               "--base", str(tiny_base), "--tokens", str(tiny_tokens / "tokens"), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=open(f"{out}.log", "a"), stderr=subprocess.STDOUT, env=env)


def _finish(tmp_path, tiny_base, tiny_tokens, out: Path, strategy: str = "ddp") -> dict:
    process = _start(tmp_path, tiny_base, tiny_tokens, out, strategy)
    assert process.wait(timeout=600) == 0, Path(f"{out}.log").read_text()[-3000:]
    return read_json(out / "train_metrics.json")


# what each strategy's checkpoint holds besides trainer.pt and progress.json: every rank's part where it shards
RANK_FILES = {"ddp": ["optimizer.pt", "weights.pt"],
              "fsdp": ["sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"],
              "deepspeed": ["deepspeed/mp_rank_00_model_states.pt", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                            "zero_to_fp32.py", "zero_to_torch.py"]}  # DeepSpeed's scripts that consolidate it
# deepspeed is in the gpu extra; where it is installed (it runs on the CPU with gloo), its checkpoints are tested too
STRATEGIES = ["ddp", "fsdp", pytest.param("deepspeed", marks=DEEPSPEED)]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_usr1_to_the_launcher_reaches_every_rank_and_the_rerun_resumes(tmp_path, tiny_base, tiny_tokens, strategy):
    reference = _finish(tmp_path, tiny_base, tiny_tokens, tmp_path / "uninterrupted", strategy)
    assert reference["processes"] == 2 and reference["gpus"] == 0 and reference["gpu_hours"] == 0

    out = tmp_path / "interrupted"
    process = _start(tmp_path, tiny_base, tiny_tokens, out, strategy)
    deadline = time.monotonic() + 600
    while f"r step {EVERY + 2}/{RESUME_STEPS} " not in Path(f"{out}.log").read_text():
        assert process.poll() is None and time.monotonic() < deadline, Path(f"{out}.log").read_text()[-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # to `tunelab train`, as SLURM's --signal=USR1 or a B:USR1 would
    assert process.wait(timeout=300) != 0
    log = Path(f"{out}.log").read_text()
    stops = [line.split("stopped by SIGUSR1 after step ")[1].split("/")[0] for line in log.splitlines()
             if "stopped by SIGUSR1 after step " in line]
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]  # both ranks, after the same step
    stopped = int(stops[0])
    checkpoint = out / "checkpoints" / f"step-{stopped:08d}"
    manifest = read_json(checkpoint / "manifest.json")["files"]
    assert sorted(manifest) == sorted([*RANK_FILES[strategy], "progress.json", "trainer.pt"]), sorted(manifest)
    assert len(torch.load(checkpoint / "trainer.pt", weights_only=True)["rng_of_ranks"]) == 2
    assert not (out / "train_metrics.json").exists()

    metrics = _finish(tmp_path, tiny_base, tiny_tokens, out, strategy)
    assert metrics["resumed_from_step"] == stopped
    for curve in ("loss_curve", "validation_loss_curve"):
        torch.testing.assert_close(torch.tensor(metrics[curve]), torch.tensor(reference[curve]), atol=1e-4, rtol=0)
    # the saved adapter is the uninterrupted run's, whole (FSDP and ZeRO gather it onto rank 0)
    adapter, expected = (load_file(run / "model" / "adapter_model.safetensors") for run in (out, tmp_path / "uninterrupted"))
    assert adapter.keys() == expected.keys() and len(adapter) == 2 * 7 * 2  # 2 layers x 7 projections x A, B
    for name, weight in expected.items():
        assert adapter[name].shape == weight.shape and weight.abs().amax() > 0, name
        torch.testing.assert_close(adapter[name], weight, atol=1e-5, rtol=0)
    # merge (and generate, which loads the run the same way) read it as a one-process run's
    merged = run_merge(out, tiny_tokens / "tokens")
    assert merged["top1_agreement_vs_trained"] == 1.0 and merged["max_logit_difference_vs_trained"] < 1e-3, merged


# --- the command lines: srun across nodes, one torchrun per node, rendezvous on the first host ------------------

def test_multi_node_command_lines(tmp_path, monkeypatch):
    distributed = DistributedConfig(gpus=4, nodes=2)
    srun = launch.srun_command(distributed, ["--run", "r"], "4711", gpus=True)
    assert srun[:8] == ["srun", "--jobid=4711", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1", "--gpus-per-node=4"]
    assert srun[-5:] == ["-m", "tunelab.cli", "train", "--run", "r"]
    scontrol = tmp_path / "scontrol"  # the job's node list as SLURM expands it
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[07-08]' ] && printf 'gpu07\\ngpu08\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    node = launch.slurm_node_command(distributed, {"SLURM_JOB_ID": "4711", "SLURM_JOB_NODELIST": "gpu[07-08]"})
    text = " ".join(node)
    assert "--nproc_per_node 4 --nnodes 2 --rdzv_backend c10d --rdzv_endpoint gpu07:30211 --rdzv_id tunelab-4711" in text
    assert node[-2:] == ["-m", "tunelab.distributed.rank"]
    with pytest.raises(TunelabError, match="needs 'SLURM_JOB_NODELIST'"):
        launch.slurm_node_command(distributed, {"SLURM_JOB_ID": "4711"})
    with pytest.raises(TunelabError, match="nodes 2 needs a SLURM job"):
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        monkeypatch.delenv(launch.ROLE, raising=False)
        launch.launch(distributed, [], gpus=False)


def test_two_node_launchers_train_the_single_launcher_run(tmp_path, tiny_base, tiny_tokens):
    """The per-node command lines as two gloo launchers on this machine (c10d rendezvous on 127.0.0.1) train
    what one launcher of two processes trains."""
    runs = {"one": {"strategy": "ddp", "gpus": 2}, "two": {"strategy": "ddp", "gpus": 1, "nodes": 2}}
    study = {"name": "nodes", "data": {"source": "synthetic:300", "test_size": 8, "max_length": 96},
             "models": {"tiny": {"source": "tiny"}},
             "train": {"max_steps": 6, "micro_batch_size": 2, "gradient_accumulation_steps": 2, "eval_every": 6,
                       "profile": {"steps": 0}, "lora": {"dropout": 0.0}},
             "runs": [{"name": name, "model": "tiny", "distributed": d} for name, d in runs.items()]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}

    def arguments(run):
        return ["--config", str(tmp_path / "study.yaml"), "--run", run, "--base", str(tiny_base),
                "--tokens", str(tiny_tokens / "tokens"), "--out", str(tmp_path / run)]

    single = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", *arguments("one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    config, port = load_study(tmp_path / "study.yaml").run("two").train.distributed, _free_port()
    launchers = [subprocess.Popen(launch.node_command(config, port=port, rendezvous_id="test"),
                                  env={**env, launch.TRAIN_ARGS: json.dumps(arguments("two"))},
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(config.nodes)]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:]
    one, two = (read_json(tmp_path / run / "train_metrics.json") for run in ("one", "two"))
    assert two["processes"] == 2 and two["nodes"] == 2
    torch.testing.assert_close(torch.tensor(two["loss_curve"]), torch.tensor(one["loss_curve"]), atol=1e-5, rtol=0)


# --- sharded runs save whole weights: what merge and generate read --------------------------------------------

def _save_rank(rank: int, world: int, port: int, base: str, tokens: str, out: str, distributed: dict,
               method: str) -> None:
    """Train a few steps sharded, save as `tunelab train` does, and keep the logits of the model in memory."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train = TrainConfig(method=method, max_steps=3, micro_batch_size=2, gradient_accumulation_steps=2,
                        learning_rate=1e-2, warmup_steps=0, eval_every=3, profile={"steps": 0}, checkpoint_every=0,
                        lora={"r": 4, "alpha": 8, "dropout": 0.0}, distributed=distributed)
    worker = _every_weight_partitioned(train) if distributed["strategy"] == "deepspeed" else runtime.from_environment(train)
    model = attach_method(worker.load_model(base, train), train)
    fit(model, read_jsonl(Path(tokens) / "train.jsonl"), read_jsonl(Path(tokens) / "validation.jsonl")[:4], train, 0,
        runtime=worker)
    # what this rank holds of the weights before the save: a share, unless they were left whole
    held = sum((w.to_local() if hasattr(w, "to_local") else w.data).numel() for w in model.parameters())
    save_trained(model, modeling.load_tokenizer(base), Path(out), worker)
    model.eval()
    with torch.no_grad():  # every rank runs the forward: the sharded weights are gathered layer by layer
        logits = model(input_ids=torch.tensor([read_jsonl(Path(tokens) / "train.jsonl")[0]["input_ids"]])).logits
    if worker.is_main:
        torch.save(logits, Path(out) / "logits.pt")
        (Path(out) / "held.json").write_text(json.dumps([held, sum(_numel(w) for w in model.parameters())]))
    worker.close()


@pytest.mark.parametrize("distributed, method", [
    ({"strategy": "fsdp", "gpus": 2}, "lora"), ({"strategy": "fsdp", "gpus": 2}, "full"),
    pytest.param({"strategy": "deepspeed", "zero_stage": 3, "gpus": 2}, "lora", marks=DEEPSPEED),
    pytest.param({"strategy": "deepspeed", "zero_stage": 3, "gpus": 2}, "full", marks=DEEPSPEED)])
def test_sharded_runs_save_whole_weights_with_the_logits_in_memory(tmp_path, tiny_base, tiny_tokens, distributed,
                                                                   method):
    """Adapters and models saved under FSDP2 and ZeRO-3 are complete: full-size, non-zero (the adapter's B moved
    from its zero start), and the plain directory reloaded in one process gives the logits the sharded model
    computed in memory."""
    out = tmp_path / "run"
    mp.start_processes(_save_rank, args=(2, _free_port(), str(tiny_base), str(tiny_tokens / "tokens"), str(out),
                                         distributed, method), nprocs=2, start_method="spawn")
    held, total = json.loads((out / "held.json").read_text())
    # rank 0 held about half of the weights: they were sharded (FSDP2 leaves the root's, here the embedding, whole
    # after a forward: 65 %)
    assert held < 0.7 * total, (held, total)
    in_memory = torch.load(out / "logits.pt", weights_only=True)
    tokens = torch.tensor([read_jsonl(tiny_tokens / "tokens" / "train.jsonl")[0]["input_ids"]])
    from transformers import AutoModelForCausalLM

    if method == "lora":
        from peft import PeftModel

        saved = load_file(out / "model" / "adapter_model.safetensors")
        assert len(saved) == 2 * 7 * 2  # 2 layers x 7 projections x (A, B)
        for name, weight in saved.items():
            assert weight.ndim == 2, (name, weight.shape)  # a partition left unsaved is 1-D and empty
            rows, columns = weight.shape
            assert (rows == 4) if ".lora_A." in name else (columns == 4), (name, weight.shape)
            assert max(rows, columns) in (128, 256, 64), (name, weight.shape)  # hidden, MLP or key-value width
            assert weight.abs().amax() > 0, name
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), out / "model")
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
        base = AutoModelForCausalLM.from_pretrained(tiny_base)
        assert reloaded.num_parameters() == base.num_parameters()
        assert all(not torch.equal(a, b) for a, b in zip(reloaded.parameters(), base.parameters()))  # all trained
    with torch.no_grad():
        logits = reloaded.eval()(input_ids=tokens).logits
    untrained = AutoModelForCausalLM.from_pretrained(tiny_base).eval()(input_ids=tokens).logits.detach()
    assert (in_memory - untrained).abs().amax() > 1e-2  # training moved the logits, so equality below means something
    torch.testing.assert_close(logits, in_memory, atol=1e-4, rtol=0)
