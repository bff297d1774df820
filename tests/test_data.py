"""Data sources and the split: deterministic, disjoint, fractions of the train split only."""

from __future__ import annotations

import json

from tunelab.config import DataConfig
from tunelab.data import load_records, run_data, split_records
from tunelab.artifacts import read_json, read_jsonl
from tunelab.synthetic import alpaca_records, generic_text
from conftest import DEMO


def keys(rows):
    return {json.dumps(r, sort_keys=True) for r in rows}


def test_split_is_seeded_disjoint_and_complete(tmp_path, demo_records):
    source = tmp_path / "repeats.json"  # 6 records twice: none may straddle the split
    source.write_text(json.dumps(demo_records + demo_records[10:16]))
    data = DataConfig(source=str(source), test_size=30, validation_fraction=0.1, seed=3)
    run_data(data, tmp_path / "out")
    first = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "validation", "test")}
    assert first == split_records(demo_records, data)  # the same seed gives the same split
    assert read_json(tmp_path / "out" / "stats.json")["duplicates_removed"] == 6
    assert [len(first[s]) for s in ("train", "validation", "test")] == [78, 12, 30]
    assert keys(first["train"]).isdisjoint(keys(first["test"]))
    assert keys(first["validation"]).isdisjoint(keys(first["test"]))
    other_seed = split_records(demo_records, data.model_copy(update={"seed": 4}))
    assert other_seed["test"] != first["test"]


def test_train_fraction_takes_from_train_only(demo_records):
    full = split_records(demo_records, DataConfig(source=str(DEMO), test_size=30))
    fifth = split_records(demo_records, DataConfig(source=str(DEMO), test_size=30, train_fraction=0.2))
    assert fifth["test"] == full["test"] and fifth["validation"] == full["validation"]
    assert len(fifth["train"]) == round(0.2 * len(full["train"]))
    assert keys(fifth["train"]) <= keys(full["train"])


def test_local_json_and_jsonl_sources_agree(tmp_path, demo_records):
    (tmp_path / "a.json").write_text(json.dumps(demo_records[:20]))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demo_records[:20]))
    assert load_records(str(tmp_path / "a.json")) == load_records(str(tmp_path / "a.jsonl")) == demo_records[:20]


def test_run_data_writes_splits_and_stats(tmp_path):
    counts = run_data(DataConfig(source="synthetic:200", test_size=20), tmp_path)
    assert counts == {"train": 170, "validation": 10, "test": 20}
    assert read_json(tmp_path / "stats.json")["records"] == 200
    test = read_jsonl(tmp_path / "test.jsonl")
    assert len(test) == 20 and all(r["instruction"] and r["output"] for r in test)


def test_synthetic_data_is_deterministic_and_correct():
    records = alpaca_records(50, seed=1)
    assert records == alpaca_records(50, seed=1) != alpaca_records(50, seed=2)
    sums = [r for r in records if r["instruction"] == "Add the two numbers."]
    assert sums and all(int(r["output"]) == sum(int(x) for x in r["input"].split(" + ")) for r in sums)
    sorts = [r for r in records if r["instruction"].startswith("Sort")]
    assert all(r["output"].split() == sorted(r["input"].split(), key=int) for r in sorts)
    assert any(not r["input"] for r in records)  # the template without input is exercised too
    assert generic_text(5) == generic_text(5) and all("\n" in t or t for t in generic_text(5))
