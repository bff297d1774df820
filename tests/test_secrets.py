"""A Hugging Face token lives in the environment only (HF_TOKEN, read by huggingface_hub itself): running the tiny
study with one set writes it nowhere, neither into results/ (logs, metrics, reports) nor into .snakemake/."""

from __future__ import annotations

import re
import secrets
import shutil

from conftest import REPO, run_snakemake


def test_hf_token_is_written_nowhere(tmp_path):
    token = "hf_fake" + secrets.token_hex(16)
    study = tmp_path / "tiny.yaml"
    shutil.copy(REPO / "studies" / "tiny.yaml", study)

    result = run_snakemake(tmp_path, study, env={"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token})

    assert result.returncode == 0, result.stderr[-4000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p != study]
    assert len(files) > 50 and any(p.match(".snakemake/log/*.log") for p in files), "the study ran and logged"
    assert (tmp_path / "results/report/report.html").is_file()
    leaks = [str(p.relative_to(tmp_path)) for p in files if token.encode() in p.read_bytes()]
    assert not leaks, f"the token was written to {leaks}"
    assert token not in result.stdout + result.stderr


def test_no_stage_reads_the_environment():
    """tunelab never reads HF_TOKEN (or any variable) itself, so it can't pass a token on to a file."""
    readers = [f"{p.name}:{n}" for p in sorted((REPO / "src" / "tunelab").glob("*.py"))
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"os\.environ|getenv\(", line)]
    assert not readers, readers
