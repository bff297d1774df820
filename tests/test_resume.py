"""Training survives being killed: a real `tunelab train` process gets a real SIGTERM mid-run, exits non-zero
with a checkpoint, and the rerun ends where an uninterrupted run ends (loss curves and adapter weights).
Also: a corrupt newest checkpoint is skipped for the one before it, and a rerun through Snakemake resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.artifacts import read_json
from conftest import REPO

STEPS, EVERY, SIGNAL_AFTER = 40, 10, 15
STUDY = f"""\
name: resume
data: {{source: synthetic:300, test_size: 8, max_length: 96}}
models: {{tiny: {{source: tiny, tiny: {{vocab_size: 512, warmup_steps: 0}}}}}}
train: {{max_steps: {STEPS}, checkpoint_every: {EVERY}, micro_batch_size: 2, gradient_accumulation_steps: 2,
         learning_rate: 2.0e-3, warmup_steps: 5, eval_every: 15, log_every: 1, profile: {{start_step: 2, steps: 2}}}}
runs:
  - {{name: r, model: tiny, method: lora, lora: {{r: 4, alpha: 8, dropout: 0.1}}}}   # dropout: the RNG must resume
"""


def environment() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_base, tiny_tokens) -> dict:
    root = tmp_path_factory.mktemp("resume")
    (root / "study.yaml").write_text(STUDY)
    return {"root": root, "base": tiny_base, "tokens": tiny_tokens / "tokens"}


def train(setup: dict, out: Path) -> subprocess.Popen:
    """`tunelab train` as the rule runs it, its log in `out`.log."""
    command = [sys.executable, "-m", "tunelab.cli", "train", "--config", str(setup["root"] / "study.yaml"),
               "--run", "r", "--base", str(setup["base"]), "--tokens", str(setup["tokens"]), "--out", str(out)]
    log = open(f"{out}.log", "a")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment())


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def logged_step(out: Path, step: int):
    return lambda: f"r step {step}/{STEPS} " in Path(f"{out}.log").read_text()


def interrupt(setup: dict, out: Path, when) -> list[str]:
    """Start a run, SIGTERM it once `when()` holds; return the checkpoints it left."""
    process = train(setup, out)
    wait_for(when, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM, Path(f"{out}.log").read_text()[-3000:]
    assert not (out / "train_metrics.json").exists() and not (out / "model").exists()
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def finish(setup: dict, out: Path) -> dict:
    process = train(setup, out)
    assert process.wait(timeout=300) == 0, Path(f"{out}.log").read_text()[-3000:]
    assert not (out / "checkpoints").exists(), "a finished run drops its checkpoints"
    return read_json(out / "train_metrics.json")


@pytest.fixture(scope="module")
def uninterrupted(setup) -> dict:
    out = setup["root"] / "uninterrupted"
    return {"metrics": finish(setup, out), "adapter": load_file(out / "model" / "adapter_model.safetensors")}


def assert_same_run(out: Path, metrics: dict, uninterrupted: dict) -> None:
    for curve in ("loss_curve", "validation_loss_curve", "learning_rate_curve"):
        expected, got = torch.tensor(uninterrupted["metrics"][curve]), torch.tensor(metrics[curve])
        assert got.shape == expected.shape == (len(expected), 2)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    adapter = load_file(out / "model" / "adapter_model.safetensors")
    assert adapter.keys() == uninterrupted["adapter"].keys()
    for name, tensor in adapter.items():
        torch.testing.assert_close(tensor, uninterrupted["adapter"][name], atol=1e-3, rtol=0)
    largest = max((t - uninterrupted["adapter"][n]).abs().max().item() for n, t in adapter.items())
    print(f"{out.name}: resumed from step {metrics['resumed_from_step']}; largest adapter difference {largest:.3g}, "
          f"final loss {metrics['final_loss']:.6f} vs {uninterrupted['metrics']['final_loss']:.6f}")


def test_sigterm_checkpoints_and_rerun_resumes_to_the_same_run(setup, uninterrupted):
    out = setup["root"] / "interrupted"
    left = interrupt(setup, out, logged_step(out, SIGNAL_AFTER))
    stopped = int(left[-1].removeprefix("step-"))
    assert stopped >= SIGNAL_AFTER, f"a checkpoint on the signal, after the step it came in: {left}"
    assert left[0] == f"step-{(stopped - 1) // EVERY * EVERY:08d}" and len(left) == 2, "the newest two are kept"
    assert "stopped by SIGTERM" in Path(f"{out}.log").read_text()

    metrics = finish(setup, out)
    assert f"resumed from {out / 'checkpoints' / left[-1]}" in Path(f"{out}.log").read_text()
    assert metrics["resumed_from_step"] == stopped
    assert_same_run(out, metrics, uninterrupted)


def test_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(setup, uninterrupted):
    out = setup["root"] / "corrupt"
    left = interrupt(setup, out, logged_step(out, EVERY + 1))  # after the step-10 checkpoint
    newest, previous = out / "checkpoints" / left[-1], out / "checkpoints" / left[-2]
    weights = newest / "weights.pt"
    with open(weights, "r+b") as handle:  # a half-copied file: the manifest still names its full size
        handle.truncate(weights.stat().st_size // 2)

    metrics = finish(setup, out)
    log = Path(f"{out}.log").read_text()
    assert f"skipping checkpoint {newest}: weights.pt has" in log
    assert f"resumed from {previous}" in log
    assert metrics["resumed_from_step"] == int(previous.name.removeprefix("step-"))
    assert_same_run(out, metrics, uninterrupted)


def test_snakemake_rerun_of_a_killed_train_job_resumes(tmp_path):
    """Snakemake deletes a failed job's outputs, but checkpoints/ is no declared output: the rerun resumes."""
    (tmp_path / "study.yaml").write_text(STUDY)
    target = "results/runs/r/train_metrics.json"
    command = [sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
               "--cores", "2", "--config", f"study={tmp_path / 'study.yaml'}"]
    log = tmp_path / "results/runs/r/logs/train.log"
    snakemake = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=environment())
    wait_for(lambda: log.exists() and f"r step {SIGNAL_AFTER}/{STEPS} " in log.read_text(), snakemake, timeout=300)
    os.kill(_train_process(tmp_path), signal.SIGTERM)
    first = snakemake.communicate(timeout=120)[0]
    assert snakemake.returncode != 0 and "Error in rule train" in first, first[-3000:]
    assert not (tmp_path / target).exists()
    checkpoints = sorted((tmp_path / "results/runs/r/checkpoints").iterdir())
    assert checkpoints, "the checkpoints survive Snakemake's cleanup of the failed job"

    second = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resumed from results/runs/r/checkpoints/{checkpoints[-1].name}" in log.read_text()
    assert read_json(tmp_path / target)["resumed_from_step"] == int(checkpoints[-1].name.removeprefix("step-"))


def _train_process(workdir: Path) -> int:
    """The pid of the `tunelab train` that Snakemake started in `workdir`."""
    pids = [pid for pid, command in _processes(workdir).items() if b"train" in command]
    assert len(pids) == 1, f"expected one tunelab train process of {workdir}, found {pids}"
    return pids[0]


def _processes(workdir: Path) -> dict[int, list[bytes]]:
    """This test's `tunelab` processes: those whose command line names the study file in `workdir`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if any(part.endswith(b"tunelab") for part in command[:2]) and str(workdir / "study.yaml").encode() in command:
            found[int(entry.name)] = command
    return found


def test_a_failed_write_leaves_no_half_file_and_no_mix_of_runs(tmp_path, monkeypatch):
    """A write that fails half-way (disk full) leaves no half-written file under a final name, no temporary
    debris, and no stats.json: the old and new splits never look like one finished output."""
    from pathlib import Path as PathClass

    from tunelab.cli import main

    (tmp_path / "study.yaml").write_text(STUDY)
    out = tmp_path / "data"
    assert main(["data", "--config", str(tmp_path / "study.yaml"), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "study.yaml").write_text(STUDY.replace("test_size: 8", "test_size: 9"))
    write_text, calls = PathClass.write_text, []

    def disk_full_on_the_second_file(self, text, *args, **kwargs):
        calls.append(self)
        if len(calls) == 2:  # validation.jsonl: half of it reaches the disk, then ENOSPC
            write_text(self, text[:len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(PathClass, "write_text", disk_full_on_the_second_file)
    with pytest.raises(OSError, match="No space left"):
        main(["data", "--config", str(tmp_path / "study.yaml"), "--out", str(out)])

    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "validation.jsonl"], \
        "no temporary file is left, and no stats.json marks the mix as finished"
    assert (out / "validation.jsonl").read_bytes() == before["validation.jsonl"], "the old file, whole"
    assert (out / "train.jsonl").read_bytes() != before["train.jsonl"]


def test_snakemake_redoes_a_job_killed_mid_write_with_its_node(tmp_path):
    """SIGKILL Snakemake and the `tunelab base` job while the base is half-written (a lost node): after --unlock,
    the next run redoes the job (--rerun-incomplete, also set in profiles/default), leaving no temporary debris."""
    (tmp_path / "study.yaml").write_text(STUDY.replace("warmup_steps: 0", "warmup_steps: 40"))
    command = [sys.executable, "-m", "snakemake", "results/tokens/tiny/stats.json", "-s", str(REPO / "Snakefile"),
               "-d", str(tmp_path), "--cores", "2", "--config", f"study={tmp_path / 'study.yaml'}"]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment(),
                             start_new_session=True)
    half_written = lambda: list((tmp_path / "results/base").glob(".tiny.*.tmp"))  # noqa: E731
    wait_for(lambda: (tmp_path / "results/base").is_dir() and half_written(), first, timeout=300)
    os.killpg(first.pid, signal.SIGKILL)
    for pid in _processes(tmp_path):
        os.kill(pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert not (tmp_path / "results/base/tiny").exists() and half_written()

    refused = subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=300)
    assert refused.returncode != 0 and "--unlock" in refused.stderr, "the dead run's lock stops a blind rerun"
    subprocess.run([*command[:4], "--unlock", *command[4:]], check=True, capture_output=True, env=environment())
    redone = subprocess.run([*command[:4], "--rerun-incomplete", *command[4:]], capture_output=True, text=True,
                            env=environment(), timeout=600)
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "rule base:" in redone.stderr or "rule base:" in redone.stdout
    assert read_json(tmp_path / "results/base/tiny/base.json")["source"] == "tiny"
    assert read_json(tmp_path / "results/tokens/tiny/stats.json")["train"]["examples"] > 0
    assert not list((tmp_path / "results").rglob(".*.tmp")), "the killed writer's temporary directory is gone"


@pytest.mark.parametrize("method, precision", [("adalora", "fp32"), ("full", "fp32"), ("lora", "fp16")])
def test_resume_is_exact_for_adalora_full_and_fp16(tmp_path, tiny_base, tiny_tokens, method, precision):
    """In process, a real SIGUSR1 (SLURM's `--signal`) mid-run: AdaLoRA's budget state (importance scores, rank
    pattern), a full fine-tune's weights and optimizer, and fp16's GradScaler resume as exactly as LoRA does."""
    from tunelab import modeling
    from tunelab.artifacts import read_jsonl
    from tunelab.checkpoint import Checkpoints
    from tunelab.config import TrainConfig
    from tunelab.train import attach_method, fit

    train = TrainConfig(method=method, precision=precision, max_steps=24, checkpoint_every=5, micro_batch_size=2,
                        learning_rate=2e-3, warmup_steps=2, eval_every=12, profile={"steps": 0},
                        adalora={"init_r": 6, "target_r": 2, "tinit": 4, "tfinal": 6, "delta_t": 2})
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    validation = read_jsonl(tiny_tokens / "tokens" / "validation.jsonl")[:8]
    pad = modeling.load_tokenizer(tiny_base).pad_token_id

    def attempt(checkpoints=None):
        torch.manual_seed(0)
        model = attach_method(modeling.load_model(tiny_base, train, for_training=True), train)
        return model, fit(model, examples, validation, train, pad, checkpoints=checkpoints)

    reference, expected = attempt()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        interrupted = Checkpoints(tmp_path, train, "test")
        after_step = interrupted.after_step
        interrupted.after_step = lambda step: (step == 13 and signal.raise_signal(signal.SIGUSR1), after_step(step))
        with pytest.raises(SystemExit) as stopped:
            attempt(interrupted)
        assert stopped.value.code == 128 + signal.SIGUSR1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010", "step-00000013"]
        resumed = Checkpoints(tmp_path, train, "test")
        model, got = attempt(resumed)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert resumed.resumed_step == 13
    for curve in ("loss_curve", "validation_loss_curve", "learning_rate_curve"):
        torch.testing.assert_close(torch.tensor(got[curve]), torch.tensor(expected[curve]), atol=1e-3, rtol=0)
    trained = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, trained[name], atol=1e-3, rtol=0)
    if method == "adalora":
        assert model.peft_config["default"].rank_pattern == reference.peft_config["default"].rank_pattern
        assert model.peft_config["default"].rank_pattern is not None, "the budget was allocated after the resume"


def test_a_run_resumed_inside_its_profiler_window_still_writes_its_trace(tmp_path, tiny_base, tiny_tokens):
    """Killed inside the profiler window (steps 3-6), the run wrote no trace; resumed at step 5, it profiles
    steps 5-8 instead and writes one."""
    from tunelab import modeling
    from tunelab.artifacts import read_jsonl
    from tunelab.checkpoint import Checkpoints
    from tunelab.config import TrainConfig
    from tunelab.train import attach_method, fit

    train = TrainConfig(max_steps=10, checkpoint_every=0, micro_batch_size=2, eval_every=10,
                        profile={"start_step": 3, "steps": 4})
    examples = read_jsonl(tiny_tokens / "tokens" / "train.jsonl")
    pad = modeling.load_tokenizer(tiny_base).pad_token_id
    profile = tmp_path / "profile"

    def attempt(checkpoints):
        model = attach_method(modeling.load_model(tiny_base, train, for_training=True), train)
        return fit(model, examples, examples[:4], train, pad, profile_dir=profile, checkpoints=checkpoints)

    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        interrupted = Checkpoints(tmp_path / "checkpoints", train, "test")
        after_step = interrupted.after_step
        interrupted.after_step = lambda step: (step == 4 and signal.raise_signal(signal.SIGUSR1), after_step(step))
        with pytest.raises(SystemExit):
            attempt(interrupted)
        assert not profile.exists(), "killed inside the window: no trace yet"
        metrics = attempt(Checkpoints(tmp_path / "checkpoints", train, "test"))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert metrics["profiled_steps"] == [5, 8]
    assert (profile / "trace.json.gz").stat().st_size > 1000
    assert "aten::" in (profile / "key_averages.txt").read_text()


def test_a_signal_handled_during_the_ranks_agreement_stops_the_next_step(tmp_path):
    """A rank blocked in the all-reduce that agrees whether to stop handles a signal when the call returns, after
    the value it contributed was read: the signal must stop the run one step later, not be lost (it was, once: the
    reduced 0 overwrote the handler's flag, and a 2-rank run trained to its end after SIGUSR1)."""
    from tunelab.checkpoint import Checkpoints
    from tunelab.config import TrainConfig
    from tunelab.distributed.runtime import Single

    class SignalledInsideTheCollective(Single):
        world_size = 2  # one rank of two; the other rank contributes 0
        calls = 0

        def maximum(self, value: float) -> float:
            self.calls += 1
            if self.calls == 1:
                signal.raise_signal(signal.SIGUSR1)  # handled before the reduced value is returned
            return value

    train = TrainConfig(max_steps=10, checkpoint_every=0)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    checkpoints = Checkpoints(tmp_path, train, "test", SignalledInsideTheCollective())
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        checkpoints.resume(model, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), iter([]), {}, {})
        checkpoints.after_step(1)  # the agreement was read before the signal: this step goes on
        with pytest.raises(SystemExit) as stopped:
            checkpoints.after_step(2)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert stopped.value.code == 128 + signal.SIGUSR1
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000002"]
