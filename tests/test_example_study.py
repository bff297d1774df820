"""The committed example study (docs/example-study/: SmolLM2-135M-Instruct on 999 real Alpaca records, run by
hand on 2 CPU cores): its report re-renders from the committed results files, and what it claims holds in them."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tunelab.config import load_study
from tunelab.report import run_report

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example-study"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("example-report")
    run_report(load_study(EXAMPLE / "study.yaml"), EXAMPLE / "runs", out)
    return out


def test_the_report_re_renders_from_the_committed_files(rendered):
    assert (rendered / "report.md").read_text() == (EXAMPLE / "report.md").read_text()
    assert (rendered / "summary.csv").read_text() == (EXAMPLE / "summary.csv").read_text()


def test_every_trained_run_beats_its_own_base_row_on_test_loss(rendered):
    rows = {row["run"]: row for row in csv.DictReader((rendered / "summary.csv").open())}
    trained = [row for row in rows.values() if row["export"] == "as trained"]
    assert {row["method"] for row in trained} == {"lora", "adalora", "full"} and len(trained) == 4
    assert rows["smollm2-qlora"]["base_row"] == "base-smollm2.nf4"  # QLoRA against the untrained nf4 base
    for row in trained:
        assert float(row["test_loss"]) < float(rows[row["base_row"]]["test_loss"]), row["run"]


def test_the_report_states_the_prompt_format_and_the_gguf_round_trip():
    page = (EXAMPLE / "report.md").read_text()
    assert "Prompt format: the Alpaca template" in page
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in page and "not its original release" in page
