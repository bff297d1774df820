"""Credentials live in the environment only (HF_TOKEN, read by huggingface_hub itself; a tracker's WANDB_API_KEY or
MLFLOW_TRACKING_TOKEN, read by its own library): running the tiny study with them set writes them nowhere, neither
into results/ (logs, metrics, trackers' files, reports) nor into .snakemake/.

The suite runs the tiny study once (conftest's session fixture `tiny_study`). It runs with these fake tokens: the
variables are set here, when pytest collects this module, which is before any fixture runs. A token already in the
environment is kept and searched for instead."""

from __future__ import annotations

import os
import re
import secrets

from conftest import REPO

from tunelab.tracking import CONTAINER_VARIABLES

TOKENS = {name: os.environ.setdefault(name, prefix + secrets.token_hex(16)) for name, prefix in (
    ("HF_TOKEN", "hf_fake"), ("WANDB_API_KEY", "wandb_fake"), ("MLFLOW_TRACKING_TOKEN", "mlflow_fake"))}


def test_tokens_are_written_nowhere(tiny_study):
    assert all(os.environ[name] == token for name, token in TOKENS.items()), "the study ran with the tokens set"
    files = [p for p in tiny_study.rglob("*") if p.is_file()]
    assert len(files) > 50 and any(p.match(".snakemake/log/*.log") for p in files), "the study ran and logged"
    assert (tiny_study / "results/report/report.html").is_file()
    assert any(tiny_study.glob("results/runs/*/dvclive/params.yaml")), "the tracker's files are searched too"
    leaks = [f"{name} in {p.relative_to(tiny_study)}" for p in files for name, token in TOKENS.items()
             if token.encode() in p.read_bytes()]
    assert not leaks, f"a token was written: {leaks}"


def test_no_stage_reads_a_credential_from_the_environment():
    """tunelab reads no variable itself but the container's name and path (provenance), so it can't pass a token
    on to a file; the libraries that need a credential read it themselves."""
    readers = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in sorted((REPO / "src" / "tunelab").rglob("*.py"))
               for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"os\.environ|getenv\(", line)]
    assert all("in CONTAINER_VARIABLES" in reader for reader in readers), readers
    assert all(name.startswith(("APPTAINER_", "SINGULARITY_")) for name in CONTAINER_VARIABLES)
