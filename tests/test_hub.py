"""Pinned Hub inputs: `hf:<id>@<revision>`, the study's lock file, and the commit each stage really downloaded.

The Hub is a stand-in served over HTTP on 127.0.0.1 (tests/hub_standin.py) and reached through HF_ENDPOINT by
the real `tunelab` commands, as the rules run them; it records every revision asked for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_snakemake
from hub_standin import HubStandIn, local_repo
from tunelab import hub, modeling
from tunelab.config import DataConfig, ModelConfig, TinyModelConfig, load_study
from tunelab.errors import TunelabError

OLD, NEW, TAGGED = "1" * 40, "2" * 40, "3" * 40
DATASET, MODEL = "org/alpaca-mini", "org/tiny-model"


def _records(answer: str) -> bytes:
    rows = [{"instruction": f"Say {answer} number {i}.", "input": "", "output": f"{answer} {i}"} for i in range(40)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture()
def standin(tmp_path):
    tokenizer = modeling.train_tiny_tokenizer([f"say {w} {i}" for w in ("old", "new") for i in range(50)], 300)
    modeling.build_tiny_model(TinyModelConfig(hidden_size=16, intermediate_size=32), tokenizer).save_pretrained(
        tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    model_files = local_repo(tmp_path / "model")
    server = HubStandIn({
        ("datasets", DATASET): {"refs": {"main": NEW, "v1": TAGGED},
                                "commits": {OLD: {"data/train.jsonl": _records("old")},
                                            NEW: {"data/train.jsonl": _records("new")},
                                            TAGGED: {"data/train.jsonl": _records("tagged")}}},
        ("models", MODEL): {"refs": {"main": NEW}, "commits": {OLD: model_files, NEW: model_files}},
    })
    yield server
    server.close()


def _env(standin: HubStandIn, tmp_path: Path) -> dict:
    return {**os.environ, "HF_ENDPOINT": standin.url, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _study(tmp_path: Path, data_source: str, model_source: str = "tiny") -> Path:
    study = {"name": "pinned", "data": {"source": data_source, "test_size": 4},
             "models": {"m": {"source": model_source}}, "runs": [{"name": "r", "model": "m"}]}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def _tunelab(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _answers(data_dir: Path) -> set[str]:
    rows = [json.loads(line) for split in ("train", "test") for line in (data_dir / f"{split}.jsonl").open()]
    return {row["output"].split()[0] for row in rows}


@pytest.mark.parametrize("source, expected", [
    ("hf:org/set", hub.HubSource("hf:org/set", "org/set", "dataset", None)),
    ("hf:org/set@v1.2", hub.HubSource("hf:org/set@v1.2", "org/set", "dataset", "v1.2")),
    (f"hf:org/set@{OLD}", hub.HubSource(f"hf:org/set@{OLD}", "org/set", "dataset", OLD)),
    ("data/train.json", None),
])
def test_parse(source, expected):
    assert hub.parse(source, "dataset") == expected
    assert (expected.pinned_commit if expected else None) == (OLD if expected and expected.revision == OLD else None)


@pytest.mark.parametrize("source", ["hf:org/set@", "hf:", "hf:org/set@a@b", "hf:org set"])
def test_malformed_sources_are_refused_by_the_schema(source):
    with pytest.raises(ValueError, match="hf:<id>\\[@<revision>\\]"):
        DataConfig(source=source)
    with pytest.raises(ValueError, match="hf:<id>\\[@<revision>\\]"):
        ModelConfig(source=source)


def test_pinned_dataset_downloads_that_commit_and_records_it(standin, tmp_path):
    study = _study(tmp_path, f"hf:{DATASET}@{OLD}")
    result = _tunelab(_env(standin, tmp_path), "data", "--config", str(study), "--out", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _answers(tmp_path / "data") == {"old"}  # main serves "new"
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["revision"] == OLD
    assert {revision for _, repo, revision in standin.requests if repo == DATASET} == {OLD}


def test_the_lock_file_pins_an_unpinned_source(standin, tmp_path):
    study = _study(tmp_path, f"hf:{DATASET}")
    env = _env(standin, tmp_path)
    warned = _tunelab(env, "validate", str(study))
    assert warned.returncode == 0 and f"hf:{DATASET} is not pinned" in warned.stderr
    locked = _tunelab(env, "lock", "--config", str(study))
    assert locked.returncode == 0, locked.stderr[-2000:]
    assert hub.read_lock(study) == {f"hf:{DATASET}": NEW}
    assert "not pinned" not in _tunelab(env, "validate", str(study)).stderr
    standin.repos[("datasets", DATASET)]["refs"]["main"] = OLD  # the Hub moves on; the lock keeps NEW
    standin.requests.clear()
    result = _tunelab(env, "data", "--config", str(study), "--out", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert _answers(tmp_path / "data") == {"new"}
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["revision"] == NEW
    assert "main" not in {revision for _, _, revision in standin.requests}


def test_a_tag_resolves_to_its_commit_and_unlocked_sources_resolve_today(standin, tmp_path):
    env = _env(standin, tmp_path)
    tagged = _study(tmp_path, f"hf:{DATASET}@v1")
    assert _tunelab(env, "lock", "--config", str(tagged)).returncode == 0
    assert hub.read_lock(tagged) == {f"hf:{DATASET}@v1": TAGGED}
    (tmp_path / "unlocked").mkdir()
    unlocked = _study(tmp_path / "unlocked", f"hf:{DATASET}")
    result = _tunelab(env, "data", "--config", str(unlocked), "--out", str(tmp_path / "data"))
    assert result.returncode == 0 and "is not locked" in result.stderr
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["revision"] == NEW


def test_offline_lock_takes_only_commit_pins(tmp_path):
    study = _study(tmp_path, f"hf:{DATASET}@v1")
    result = _tunelab({**os.environ, "HF_HUB_OFFLINE": "1"}, "lock", "--config", str(study), "--offline")
    assert result.returncode == 2 and "needs a source pinned to a full commit hash" in result.stderr
    assert not hub.lock_path(study).exists()


def test_a_bad_lock_file_is_one_clear_error(tmp_path):
    study = _study(tmp_path, f"hf:{DATASET}")
    hub.lock_path(study).write_text('{"sources": {"hf:x": {}}}')
    with pytest.raises(TunelabError, match="not a tunelab lock file"):
        hub.read_lock(study)


def test_base_downloads_the_locked_model_commit(standin, tmp_path):
    study = _study(tmp_path, "synthetic:40", f"hf:{MODEL}@{OLD}")
    env = _env(standin, tmp_path)
    assert _tunelab(env, "data", "--config", str(study), "--out", str(tmp_path / "data")).returncode == 0
    result = _tunelab(env, "base", "--config", str(study), "--model", "m", "--data", str(tmp_path / "data"),
                      "--out", str(tmp_path / "base"))
    assert result.returncode == 0, result.stderr[-2000:]
    base = json.loads((tmp_path / "base" / "base.json").read_text())
    assert base["revision"] == OLD and Path(base["path"]).name == OLD and (Path(base["path"]) / "config.json").is_file()
    assert {revision for _, repo, revision in standin.requests if repo == MODEL} == {OLD}


def test_a_changed_lock_reruns_the_data_stage(standin, tmp_path):
    workdir = tmp_path / "study"
    workdir.mkdir()
    study = _study(workdir, f"hf:{DATASET}")
    env = _env(standin, tmp_path)
    assert _tunelab(env, "lock", "--config", str(study)).returncode == 0
    target = "--until=data"  # the data rule alone
    first = run_snakemake(workdir, study, target, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert run_snakemake(workdir, study, target, "-n", env=env).stdout.count("rule data") == 0
    standin.repos[("datasets", DATASET)]["refs"]["main"] = OLD
    assert _tunelab(env, "lock", "--config", str(study)).returncode == 0
    dry = run_snakemake(workdir, study, target, "-n", env=env)
    assert "rule data" in dry.stdout + dry.stderr and "study.lock.json" in dry.stdout + dry.stderr


def test_the_real_study_is_pinned_and_locked():
    study = load_study(REPO / "config.yaml")
    sources = hub.study_sources(study)
    assert sources and all(s.pinned_commit for s in sources)
    assert hub.read_lock(study.path) == {s.text: s.pinned_commit for s in sources}
    assert not hub.unpinned_warnings(study)
