"""Stage `data`: load the study's dataset, check every record, and split it once, deterministically.

Reads `data.source` (hf:<id>[@<revision>], a local .json/.jsonl file, or synthetic:<n>); writes
`results/data/{train,validation,test}.jsonl` and `results/data/stats.json` (with the Hub commit it read).
Run: `tunelab data --config config.yaml --out results/data`.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

from tunelab import hub, synthetic
from tunelab.artifacts import invalidate, write_json, write_jsonl
from tunelab.config import DataConfig
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
HUB_DATA_FILES = ["*.parquet", "*.json", "*.jsonl", "*.csv", "*.arrow"]  # a dataset repo's data, not its scripts


def run_data(data: DataConfig, out: Path, lock: dict[str, str] | None = None) -> dict[str, int]:
    """Load, validate and split `data.source` into `out`; return the record count per split.
    `lock` (source -> commit) pins an `hf:` dataset to the commit the study's lock file names."""
    source = hub.parse(data.source, "dataset")
    revision = hub.commit_of(source, lock or {}) if source else None
    loaded = _check_records(load_records(data.source, revision), data.source)
    records = _unique(loaded)
    splits = split_records(records, data)
    invalidate(out / "stats.json")
    for split, rows in splits.items():
        write_jsonl(out / f"{split}.jsonl", rows)
    counts = {split: len(rows) for split, rows in splits.items()}
    write_json(out / "stats.json", {"source": data.source, "revision": revision, "records": len(loaded),
                                    "duplicates_removed": len(loaded) - len(records), **counts})
    log.info("wrote %s train / %s validation / %s test records to %s",
             f"{counts['train']:,}", f"{counts['validation']:,}", f"{counts['test']:,}", out)
    return counts


def load_records(source: str, revision: str | None = None) -> list[dict]:
    """Records of `source`: hf:<dataset id> (at commit `revision`), synthetic:<n>, or a local .json/.jsonl file."""
    if source.startswith("synthetic:"):
        count = source.removeprefix("synthetic:")
        if not count.isdigit() or int(count) == 0:
            raise TunelabError(f"data.source {source!r}: synthetic:<n> needs a positive record count")
        return synthetic.alpaca_records(int(count))
    if source.startswith("hf:"):
        import datasets  # imported here: only this source needs it, and it is slow to import

        dataset = hub.parse(source, "dataset")
        snapshot = hub.download(dataset, revision or hub.commit_of(dataset, {}), HUB_DATA_FILES)
        return list(datasets.load_dataset(str(snapshot), split="train"))
    return _read_local(Path(source))


def _read_local(path: Path) -> list[dict]:
    if not path.is_file():
        raise TunelabError(f"data.source {str(path)!r}: file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise TunelabError(f"{path}: line {line} (byte {err.start}): not UTF-8 ({err.reason}); "
                           "re-encode the file as UTF-8") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_parse(line, f"{path}: line {number}"))
        return records
    records = _parse(text, str(path))
    if not isinstance(records, list):
        raise TunelabError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _parse(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise TunelabError(f"{where}: malformed JSON at line {err.lineno} column {err.colno} ({err.msg})") from None


def _check_records(records: list, source: str) -> list[dict]:
    """Keep instruction/input/output as strings (and `category`); name the first bad records, all at once."""
    problems, clean = [], []
    for index, record in enumerate(records):
        problem = _record_problem(record)
        if problem:
            problems.append(f"{source}: record {index}: {problem}")
        else:
            clean.append({"instruction": record["instruction"], "input": record.get("input") or "",
                          "output": record["output"], **_category(record)})
    if problems:
        more = f"\n... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise TunelabError("\n".join(problems[:10]) + more)
    if not clean:
        raise TunelabError(f"{source}: the dataset is empty")
    return clean


def _category(record: dict) -> dict:
    """A record's `category` (its task family, for per-family scores), kept when it is a string."""
    category = record.get("category")
    return {"category": category} if isinstance(category, str) and category else {}


def _record_problem(record: object) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object with instruction/input/output, got {type(record).__name__}"
    for key in ("instruction", "output"):
        if key not in record:
            return f"missing {key!r}"
        if not isinstance(record[key], str):
            return f"{key!r} must be a string, got {type(record[key]).__name__}"
        if not record[key].strip():
            return f"empty {key!r}"
    if not isinstance(record.get("input") or "", str):
        return f"'input' must be a string, got {type(record['input']).__name__}"
    return None


def _unique(records: list[dict]) -> list[dict]:
    """Drop exact duplicates (first kept), so no record sits in both the train and the test split."""
    seen, unique = set(), []
    for record in records:
        key = (record["instruction"], record["input"], record["output"])
        if key not in seen:
            seen.add(key)
            unique.append(record)
    if len(unique) < len(records):
        log.warning("dropped %d exact duplicate records", len(records) - len(unique))
    return unique


def split_records(records: list[dict], data: DataConfig) -> dict[str, list[dict]]:
    """Seeded split into test (test_size), validation (a fraction) and train (a fraction of the rest)."""
    order = list(range(len(records)))
    random.Random(data.seed).shuffle(order)
    validation_size = max(1, round(data.validation_fraction * len(records)))
    if data.test_size + validation_size >= len(records):
        raise TunelabError(f"data: {len(records)} records leave no training data after test_size "
                           f"{data.test_size} and {validation_size} validation records (lower test_size)")
    test, validation = order[:data.test_size], order[data.test_size:data.test_size + validation_size]
    train = order[data.test_size + validation_size:]
    train = train[:max(1, round(data.train_fraction * len(train)))]
    return {"train": [records[i] for i in train], "validation": [records[i] for i in validation],
            "test": [records[i] for i in test]}
