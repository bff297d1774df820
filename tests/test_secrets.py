"""A Hugging Face token lives in the environment only (HF_TOKEN, read by huggingface_hub itself): running the tiny
study with one set writes it nowhere, neither into results/ (logs, metrics, reports) nor into .snakemake/.

The suite runs the tiny study once (conftest's session fixture `tiny_study`). It runs with this fake token: the
variable is set here, when pytest collects this module, which is before any fixture runs. A token already in the
environment is kept and searched for instead."""

from __future__ import annotations

import os
import re
import secrets

from conftest import REPO

TOKEN = os.environ.setdefault("HF_TOKEN", "hf_fake" + secrets.token_hex(16))


def test_hf_token_is_written_nowhere(tiny_study):
    assert os.environ["HF_TOKEN"] == TOKEN, "the study ran with the token set"
    files = [p for p in tiny_study.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.match(".snakemake/log/*.log") for p in files), "the study ran and logged"
    assert (tiny_study / "results/report/report.html").is_file()
    leaks = [str(p.relative_to(tiny_study)) for p in files if TOKEN.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"


def test_no_stage_reads_the_environment():
    """tunelab never reads HF_TOKEN (or any variable) itself, so it can't pass a token on to a file."""
    readers = [f"{p.name}:{n}" for p in sorted((REPO / "src" / "tunelab").glob("*.py"))
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"os\.environ|getenv\(", line)]
    assert not readers, readers
