"""Reading and atomically writing the study's files: a failed job leaves no output that looks complete.

Every stage writes through these helpers: to a temporary sibling first, then `os.replace` onto the
final path, so Snakemake and DVC never see a half-written file or directory.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tunelab.errors import TunelabError

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_json(path: Path, data: object) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it onto `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        _sync(Path(tmp))
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary directory; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)
    try:
        yield tmp
        for written in (*tmp.rglob("*"), tmp):
            _sync(written)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _sync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _remove_stale(path: Path) -> None:
    """Temporary siblings of `path` that a killed writer left (SIGKILL or a lost node runs no `finally`)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """fsync a file or a directory entry, so a renamed output survives a crash of the node, not only of the job."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def invalidate(path: Path) -> None:
    """Remove a stage's last-written file before it rewrites the others: a failure in between then leaves outputs
    that look unfinished (Snakemake and DVC rerun them), never a complete-looking mix of old and new files."""
    Path(path).unlink(missing_ok=True)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TunelabError(f"{path}: not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as err:
        raise TunelabError(f"{path}: line {err.lineno}: malformed JSON ({err.msg})") from None


def read_jsonl(path: Path) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise TunelabError(f"{path}: line {number}: malformed JSON ({err.msg})") from None
    return records
