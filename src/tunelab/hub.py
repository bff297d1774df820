"""Hugging Face Hub sources, pinned: `hf:<id>[@<revision>]` resolved to a commit and recorded in a lock file.

A study's lock file (`config.yaml` -> `config.lock.json`, written by `tunelab lock`) maps every `hf:` source of
the study to the commit it resolved to; the data and base stages download exactly that commit and record it.
A source pinned to a full commit hash needs no lock entry. An unpinned source outside any lock is resolved on
the day (`tunelab validate` warns about it), so two runs months apart could differ.
The Hub is reached through huggingface_hub (HF_ENDPOINT, HF_TOKEN from the environment only).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from tunelab.artifacts import write_text
from tunelab.errors import TunelabError

log = logging.getLogger(__name__)
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSource:
    """One `hf:` source: the repository, its kind and the revision written in the study (None: unpinned)."""

    text: str
    repo_id: str
    repo_type: str
    revision: str | None

    @property
    def pinned_commit(self) -> str | None:
        return self.revision if self.revision and COMMIT.fullmatch(self.revision) else None


def parse(source: str, repo_type: str) -> HubSource | None:
    """The `hf:<id>[@<revision>]` source as a HubSource; None for any other kind of source."""
    if not source.startswith("hf:"):
        return None
    repo_id, _, revision = source.removeprefix("hf:").partition("@")
    if not repo_id or (_ and not revision):
        raise TunelabError(f"source {source!r}: expected hf:<id> or hf:<id>@<revision>")
    return HubSource(source, repo_id, repo_type, revision or None)


def study_sources(study) -> list[HubSource]:
    """Every `hf:` source of a study: its dataset and its models."""
    found = [parse(study.data.source, "dataset")]
    found += [parse(model.source, "model") for model in study.models.values()]
    return [source for source in found if source is not None]


def lock_path(study_path: Path) -> Path:
    return Path(study_path).with_suffix(".lock.json")


def read_lock(study_path: Path) -> dict[str, str]:
    """The study's lock: source text -> commit ({} when the study has no lock file)."""
    path = lock_path(study_path)
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["sources"]
        return {source: entry["commit"] for source, entry in entries.items()}
    except (ValueError, KeyError, TypeError) as err:
        raise TunelabError(f"{path}: not a tunelab lock file ({err}); rewrite it with `tunelab lock`") from None


def unpinned_warnings(study) -> list[str]:
    """One line per `hf:` source that is neither pinned to a commit nor in the study's lock."""
    lock = read_lock(study.path)
    return [f"{study.path}: {s.text} is not pinned: the Hub serves whatever it has on the day (write "
            f"hf:{s.repo_id}@<commit>, or run `tunelab lock` to record today's commit in {lock_path(study.path)})"
            for s in study_sources(study) if s.pinned_commit is None and s.text not in lock]


def commit_of(source: HubSource, lock: dict[str, str]) -> str:
    """The commit to download: the lock's entry, the pinned commit, or (unlocked) what the Hub resolves today."""
    if source.text in lock:
        return lock[source.text]
    if source.pinned_commit:
        return source.pinned_commit
    commit = resolve(source)
    log.warning("%s is not locked: resolved to today's commit %s", source.text, commit)
    return commit


def resolve(source: HubSource) -> str:
    """Ask the Hub which commit the source's revision (default: main) is."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        info = HfApi().repo_info(source.repo_id, repo_type=source.repo_type, revision=source.revision or "main")
    except HfHubHTTPError as err:
        raise TunelabError(f"{source.text}: the Hub could not resolve it ({str(err).splitlines()[0]})") from None
    return info.sha


def download(source: HubSource, commit: str, allow_patterns: list[str] | None = None) -> Path:
    """The snapshot of `source` at `commit` in the local Hugging Face cache."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source.repo_id, repo_type=source.repo_type, revision=commit,
                                  allow_patterns=allow_patterns))


def write_lock(study, offline: bool = False) -> dict[str, str]:
    """Resolve every `hf:` source of the study and write its lock file; return source -> commit.

    `offline` records sources pinned to a full commit hash as they are, without asking the Hub, and refuses
    the others (a branch or tag needs the Hub to resolve)."""
    entries = {}
    for source in study_sources(study):
        if offline and not source.pinned_commit:
            raise TunelabError(f"{study.path}: {source.text}: lock --offline needs a source pinned to a full "
                               "commit hash (hf:<id>@<40 hex digits>); run without --offline where the Hub is reachable")
        commit = source.pinned_commit if offline else resolve(source)
        entries[source.text] = {"repo_type": source.repo_type, "commit": commit}
    write_text(lock_path(study.path), json.dumps({"sources": entries}, indent=2, sort_keys=True) + "\n")
    return {text: entry["commit"] for text, entry in entries.items()}
