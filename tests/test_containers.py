"""The Apptainer definitions and their locks, checked without Apptainer (none for Debian 12 or on PyPI): each
containers/*.def has the header and sections Apptainer needs, a base image pinned by digest and files that exist;
every Python package in the hash-locked requirements is an exact version with hashes and satisfies pyproject.toml;
the conda environments of envs/ pin the same versions and hashes; every `container:` of the rules has a
definition to build it from; and the SLURM profile's apptainer command binds the Hugging Face cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from snakemake.cli import parse_args
from snakemake.deployment import singularity

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"setup", "files", "environment", "post", "runscript", "startscript", "test", "labels", "help",
            "arguments"}
REQUIRED_SECTIONS = {"files", "environment", "post", "test", "runscript", "help"}
DIGEST = re.compile(r"^[a-z0-9][a-z0-9._/-]*@sha256:[0-9a-f]{64}$")
# image: (definition, lock, conda environment, packages built after the environment (post-deploy), extras). The
# images run `tunelab <stage>` only; Snakemake (the workflow extra) runs outside them.
IMAGES = {
    "train": ("containers/train.def", "containers/requirements-gpu.txt", "envs/tunelab-gpu.yaml",
              {"flash-attn", "deepspeed"}, ("train", "gpu")),
    "cpu": ("containers/cpu.def", "containers/requirements-cpu.txt", "envs/tunelab-cpu.yaml", set(), ("train",)),
}


def parse_definition(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """An Apptainer definition's header (keyword: value) and its sections (name: lines), comments dropped."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("%"):
            current = line[1:].split()[0]
            assert current in SECTIONS, f"{path}:{number}: unknown section %{current}"
            assert current not in sections, f"{path}:{number}: %{current} twice"
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.startswith("#"):
            keyword, sep, value = line.partition(":")
            assert sep and keyword in ("Bootstrap", "From"), f"{path}:{number}: not a header line: {line!r}"
            header[keyword] = value.strip()
    return header, sections


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """A hash-locked requirements file: canonical name -> (version, hashes). Every entry must be name==version."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+) \\", line)
            assert match, f"{path}:{number}: not an exact pin with hashes: {line!r}"
            name = canonicalize_name(match.group(1))
            entries[name] = (match.group(2), [])
        else:
            found = re.fullmatch(r"\s+--hash=(sha256:[0-9a-f]{64})( \\)?", line)
            assert found and name, f"{path}:{number}: expected a --hash line: {line!r}"
            entries[name][1].append(found.group(1))
    return entries


def pyproject_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [dep for extra in extras for dep in project["optional-dependencies"][extra]]
    return [Requirement(dep) for dep in names]


@pytest.mark.parametrize("image", IMAGES)
def test_definition_parses_and_pins_its_base_by_digest(image):
    definition = REPO / IMAGES[image][0]
    header, sections = parse_definition(definition)
    assert header.get("Bootstrap") == "docker", header
    assert DIGEST.match(header.get("From", "")), f"{definition}: From must be image@sha256:<digest>: {header}"
    assert REQUIRED_SECTIONS <= sections.keys(), f"{definition}: missing {REQUIRED_SECTIONS - sections.keys()}"
    for line in filter(str.strip, sections["files"]):
        source, destination = line.split()
        assert (REPO / source).exists() or source == "README.md", f"{definition}: %files source {source} missing"
        assert destination.startswith("/opt/tunelab/"), line
    post = "\n".join(sections["post"])
    lock_name = Path(IMAGES[image][1]).name
    assert f"/opt/tunelab/{lock_name}" in post and "--require-hashes" in post, "installs from the lock, hash-checked"


def test_train_image_builds_the_cuda_extensions_for_a100_and_h100():
    _, sections = parse_definition(REPO / "containers/train.def")
    post = "\n".join(sections["post"])
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in post and "--no-build-isolation" in post
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0"' in "\n".join(sections["environment"]), "deepspeed's JIT ops"


@pytest.mark.parametrize("image", IMAGES)
def test_lock_pins_every_package_exactly_and_agrees_with_pyproject(image):
    _, lock_path, _, _, extras = IMAGES[image]
    lock = read_lock(REPO / lock_path)
    assert all(hashes for _, hashes in lock.values())
    for requirement in pyproject_requirements(extras):
        name = canonicalize_name(requirement.name)
        assert name in lock, f"{lock_path}: {requirement} of pyproject.toml is not locked"
        version = Version(lock[name][0])
        assert requirement.specifier.contains(version, prereleases=True), \
            f"{lock_path}: {name}=={version} does not satisfy pyproject.toml's {requirement}"


def test_cpu_lock_has_the_exact_cpu_versions():
    lock = read_lock(REPO / "containers/requirements-cpu.txt")
    checked = 0
    for line in (REPO / "envs/constraints-cpu.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if version and canonicalize_name(name) in lock:
            assert Version(lock[canonicalize_name(name)][0]).public == version, f"{name}: lock vs {line}"
            checked += 1
    assert checked >= 10, "the CPU lock should hold the constrained training packages"
    assert lock["torch"][0] == "2.13.0+cpu", "the CPU image must not pull torch's CUDA build"


@pytest.mark.parametrize("image", IMAGES)
def test_conda_environment_pins_what_the_lock_pins(image):
    _, lock_path, env_path, built_later, _ = IMAGES[image]
    lock = read_lock(REPO / lock_path)
    environment = yaml.safe_load((REPO / env_path).read_text())
    conda = [dep for dep in environment["dependencies"] if isinstance(dep, str)]
    assert all(re.fullmatch(r"[a-z0-9-]+=\d+(\.\d+)+", dep) for dep in conda), f"{env_path}: {conda}"
    (pip,) = [dep["pip"] for dep in environment["dependencies"] if isinstance(dep, dict)]
    pinned = {}
    for entry in pip:
        if entry.startswith("--"):
            continue
        requirement, *hashes = entry.split()
        name, version = requirement.split("==")
        pinned[canonicalize_name(name)] = (version, [h.removeprefix("--hash=") for h in hashes])
    assert pinned == {name: entry for name, entry in lock.items() if name not in built_later}
    post_deploy = REPO / env_path.replace(".yaml", ".post-deploy.sh")
    assert post_deploy.is_file(), "installs tunelab (and builds what the environment leaves out)"
    assert all(package in post_deploy.read_text() for package in built_later)


def test_every_rule_container_has_a_definition():
    common = (REPO / "workflow/rules/common.smk").read_text()
    images = dict(re.findall(r'^(\w+_IMAGE) = "containers/(\w+)\.sif"$', common, re.M))
    assert images.keys() == {"TRAIN_IMAGE", "CPU_IMAGE"}, images
    used = set()
    for rule in (REPO / "workflow/rules").glob("*.smk"):
        used.update(re.findall(r"^    container:\n        (\w+)$", rule.read_text(), re.M))
    assert used == images.keys(), f"container: lines use {used}"
    for name in images.values():
        assert (REPO / f"containers/{name}.def").is_file()


def apptainer_arguments(environment: dict[str, str]) -> list[str]:
    """The arguments `apptainer` gets for a rule's job under profiles/slurm: the profile read by snakemake's own
    command line parser, the command built by the function snakemake's shell() wraps a container job with, and
    that command expanded by bash in `environment` as on a compute node. Apptainer itself cannot be installed
    here, so a shell function in its place prints the arguments it was given."""
    _, args = parse_args(["--profile", "profiles/slurm"])
    command = singularity.shellcmd("containers/cpu.sif", "tunelab score --config config.yaml",
                                   args=args.apptainer_args, shell_executable="/bin/bash")
    print_arguments = "apptainer() { printf '%s\\0' \"$@\"; }; singularity() { apptainer \"$@\"; }; "
    result = subprocess.run(["bash", "-c", print_arguments + command], env=environment, capture_output=True,
                            text=True, check=True)
    return result.stdout.split("\0")[:-1]


def option_values(arguments: list[str], option: str) -> list[str]:
    return [value for name, value in zip(arguments, arguments[1:]) if name == option]


@pytest.mark.parametrize("hf_home", [None, "/shared/hf-cache"])
def test_slurm_profile_binds_the_hugging_face_cache_into_the_image(monkeypatch, hf_home):
    monkeypatch.chdir(REPO)  # the profile and the workflow profile are found from the repository root
    environment = {"PATH": os.environ["PATH"], "HOME": "/home/alice", **({"HF_HOME": hf_home} if hf_home else {})}
    cache = hf_home or "/home/alice/.cache/huggingface"  # huggingface_hub's default without HF_HOME

    arguments = apptainer_arguments(environment)

    assert arguments[:1] == ["exec"] and "--nv" in arguments
    assert option_values(arguments, "--home") == [str(REPO)], "snakemake makes the working directory $HOME"
    assert option_values(arguments, "--bind") == [cache]
    assert option_values(arguments, "--env") == [f"HF_HOME={cache}"]
    assert "--cleanenv" not in arguments and "-e" not in arguments, "the job's HF_*/TUNELAB_* must reach the image"
    assert arguments[-4:] == ["containers/cpu.sif", "bash", "-c", "tunelab score --config config.yaml"]
