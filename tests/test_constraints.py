"""The tested dependency sets (constraints-*.txt) and the cluster image (cluster/Dockerfile) agree with
pyproject.toml, the README's commands, CI and the KubeRay manifests. Nothing is installed or built here."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pins(path: Path) -> dict[str, str]:
    """name -> version of every ``name==version`` line (comments and blanks skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"{path.name}: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = version
    return found


def unpinned(requirements: list[str], pinned: dict[str, str]) -> list[str]:
    """The requirements the pins leave open or contradict."""
    bad = []
    for text in requirements:
        req = Requirement(text)
        version = pinned.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(Version(version), prereleases=True):
            bad.append(f"{text} (pinned: {version})")
    return bad


def test_cpu_constraints_pin_every_direct_dependency():
    extras = PROJECT["optional-dependencies"]
    direct = PROJECT["dependencies"] + extras["cpu"] + extras["test"]
    assert "datasets" in {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    assert unpinned(direct, pins(ROOT / "constraints-cpu.txt")) == []


def test_gpu_constraints_pin_the_core_and_the_engine():
    assert unpinned(PROJECT["dependencies"] + PROJECT["optional-dependencies"]["gpu"],
                    pins(ROOT / "constraints-gpu.txt")) == []
    cpu, gpu = pins(ROOT / "constraints-cpu.txt"), pins(ROOT / "constraints-gpu.txt")
    shared = {name for name in gpu if name in cpu}
    assert shared and all(gpu[name] == cpu[name] for name in shared), "the GPU set keeps the CPU-tested versions"
    assert "untested on gpu" in (ROOT / "constraints-gpu.txt").read_text().lower()


def test_pin_check_can_fail():
    assert unpinned(["ray[data]==2.60.0", "peft>=0.17", "x>=1"], {"ray": "2.60.0", "peft": "0.16.0"}) == [
        "peft>=0.17 (pinned: 0.16.0)", "x>=1 (pinned: None)"]


def test_readme_commands_and_ci_install_through_the_cpu_constraints():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("pip install torch")]
    assert len(commands) == 2 and all("pip install -c constraints-cpu.txt -e " in c for c in commands)
    assert "-c constraints-cpu.txt" in (ROOT / ".ci" / "run").read_text()


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "cluster" / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def manifest_docs() -> list[dict]:
    return [d for p in sorted((ROOT / "cluster").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def walk(node, key: str):
    """Every value of ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item, key)


def test_dockerfile_matches_the_manifests():
    steps = dockerfile()
    base = next(args for op, args in steps if op == "FROM")
    kube = [d for d in manifest_docs() if d.get("apiVersion", "").startswith("ray.io/")]
    ray_versions = {v for d in kube for v in walk(d, "rayVersion")}
    assert ray_versions == {"2.60.0"} and base.startswith("rayproject/ray:2.60.0-py311-gpu")
    assert PROJECT["dependencies"][0].startswith("ray[") and "==2.60.0" in PROJECT["dependencies"][0]
    assert PROJECT["requires-python"] == ">=3.11"
    # the manifests' working directory is where the Dockerfile puts the repository
    workdirs = {v for d in kube for v in walk(d, "workingDir")} | {v for d in kube for v in walk(d, "working_dir")}
    assert workdirs == {"/app"} and ("WORKDIR", "/app") in steps
    images = {v for d in kube for v in walk(d, "image")}
    assert images == {f"your-registry.example.com/distill-llm:{PROJECT['version']}"}
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    assert any("-c constraints-gpu.txt" in a and '".[gpu]"' in a for a in installs)
    copied = {shlex.split(args)[-2] for op, args in steps if op == "COPY"}
    # every entrypoint's module and config file is in the image at the path the job runs it from
    entrypoints = [v for d in kube for v in walk(d, "entrypoint")]
    assert entrypoints
    for entry in entrypoints:
        words = shlex.split(entry)
        assert words[:3] == ["python", "-m", words[2]] and words[2].startswith("pipelines.")
        module, config = words[2].replace(".", "/") + ".py", words[3]
        assert (ROOT / module).is_file() and (ROOT / config).is_file(), entry
        assert module.split("/")[0] in copied and config.split("/")[0] in copied, entry
    assert "constraints-gpu.txt" in " ".join(args for op, args in steps if op == "COPY")


@pytest.mark.parametrize("edit, words", [
    (lambda t: t.replace("2.60.0-py311", "2.59.0-py311"), "2.59"),
    (lambda t: t.replace("WORKDIR /app", "WORKDIR /srv"), "/srv"),
    (lambda t: t.replace("COPY --chown=ray configs /app/configs\n", ""), "configs"),
])
def test_dockerfile_check_can_fail(edit, words, monkeypatch, tmp_path):
    original = (ROOT / "cluster" / "Dockerfile").read_text()
    broken = edit(original)
    assert broken != original and words
    fake = tmp_path / "Dockerfile"
    fake.write_text(broken)
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: real_read(fake if self.name == "Dockerfile" and
                                                                            self.parent.name == "cluster" else self,
                                                                            *a, **k))
    with pytest.raises(AssertionError):
        test_dockerfile_matches_the_manifests()
