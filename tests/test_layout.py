"""The package's layout holds: imports run one way between the ground and the stage wings (README, "Layout").

Walks every module of ``distill_llm`` with ``ast`` (nothing is imported) and fails on an import that runs
against the directions:
- the ground (top-level modules) never imports a stage wing; ``cli`` and ``__init__`` are the front door
  above the stages and may;
- ``corpus`` (the shard format) imports neither ``teacher`` nor ``student``;
- ``curation`` (shard sets in, a shard set out) imports ``corpus``, the answer checkers of ``evaluation`` and
  ``cluster.runtime`` (to start Ray), never ``teacher`` or ``student`` or the evaluation stage;
- ``rounds`` (the on-policy loop) composes the stages only through their public stage functions: it imports
  ``teacher.stage``, ``student.stage``, ``corpus`` and ``cluster.runtime``, and no other wing imports it;
- ``quantize`` (the exported student -> quantised folders) reads the shards through ``corpus`` and nothing
  else of the wings (tokenizers and paths come from the ground);
- no module imports a private name (``_x``) of another package;
- nothing imports the toy world, a plug-in that registers itself (``registry.py``);
- the pure-torch student modules never import Ray.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "distill_llm"
WINGS = {"teacher", "corpus", "student", "evaluation", "cluster", "curation", "rounds", "quantize"}
# What curation may import from the other wings: the shard format, the checkers, starting Ray.
CURATION_MAY_IMPORT = ("distill_llm.corpus", "distill_llm.evaluation.checkers", "distill_llm.cluster.runtime")
# What rounds may import from the other wings: the two stages' entry modules, the shard format, starting Ray.
ROUNDS_MAY_IMPORT = ("distill_llm.teacher.stage", "distill_llm.student.stage", "distill_llm.corpus",
                     "distill_llm.cluster.runtime")
QUANTIZE_MAY_IMPORT = ("distill_llm.corpus",)  # the shard reader, for calibration rows
FRONT_DOOR = {"distill_llm", "distill_llm.cli"}
PLUGINS = {"distill_llm.toy"}
NO_RAY = {"distill_llm.student.losses", "distill_llm.student.model", "distill_llm.student.batching"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def wing(module: str) -> str:
    """The room a module lives in: a stage wing, or 'ground' for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in WINGS else ("ground" if len(parts) > 1 else "front")


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE.parent / rel).with_suffix(".py").is_file() or (PACKAGE.parent / rel / "__init__.py").is_file()


def imports(path: Path):
    """(imported module, imported name or None, line) for every import in a file, relative ones resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if is_module(sub):  # ``from .. import faults``: the module itself
                    yield sub, None, node.lineno
                else:
                    yield base, alias.name, node.lineno


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        for target, name, line in imports(path):
            if not target.startswith("distill_llm"):
                if me in NO_RAY and target.split(".")[0] == "ray":
                    found.append(f"{me}:{line} imports {target}: the pure-torch student modules never import Ray")
                continue
            where = f"{me}:{line} imports {target}{'.' + name if name else ''}"
            mine, theirs = wing(me), wing(target)
            if target in PLUGINS and me not in PLUGINS:
                found.append(f"{where}: the toy world is a plug-in; register with distill_llm.registry instead")
            if mine == "ground" and theirs in WINGS and me not in FRONT_DOOR:
                found.append(f"{where}: the ground never imports a stage")
            if mine == "corpus" and theirs in {"teacher", "student"}:
                found.append(f"{where}: corpus (the shard format) imports neither teacher nor student")
            if mine == "curation" and theirs in WINGS - {"curation"} and not target.startswith(CURATION_MAY_IMPORT):
                found.append(f"{where}: curation imports only corpus, evaluation.checkers and cluster.runtime")
            if mine == "rounds" and theirs in WINGS - {"rounds"} and not target.startswith(ROUNDS_MAY_IMPORT):
                found.append(f"{where}: rounds imports only the stages' entry modules, corpus and cluster.runtime")
            if theirs == "rounds" and mine in WINGS - {"rounds"}:
                found.append(f"{where}: no wing imports rounds (it sits above the stages)")
            if mine == "quantize" and theirs in WINGS - {"quantize"} and not target.startswith(QUANTIZE_MAY_IMPORT):
                found.append(f"{where}: quantize imports only corpus of the wings")
            private = (name or "").startswith("_") or any(p.startswith("_") and p != "__init__"
                                                          for p in target.split("."))
            if private and (mine != theirs or mine == "ground" and me != target):
                found.append(f"{where}: a private name of another package")
    return found


def test_imports_run_one_way():
    assert violations() == []


def test_the_checker_sees_each_kind_of_violation(tmp_path, monkeypatch):
    """The rules fire: plant one module breaking each and find every one reported."""
    fake = tmp_path / "distill_llm"
    for sub in ("", "corpus", "student", "teacher", "curation", "rounds", "quantize"):
        (fake / sub).mkdir(parents=True, exist_ok=True)
        (fake / sub / "__init__.py").write_text("")
    (fake / "paths.py").write_text("from .teacher import stage\n")
    (fake / "toy.py").write_text("")
    (fake / "teacher" / "stage.py").write_text("from ..toy import x\nfrom ..corpus.shards import _read_json\n")
    (fake / "corpus" / "shards.py").write_text("from ..student.loop import run\n_read_json = 1\n")
    (fake / "student" / "loop.py").write_text("run = 1\n")
    (fake / "student" / "losses.py").write_text("import ray.train\n")
    (fake / "curation" / "stage.py").write_text("from ..teacher import stage\nfrom ..corpus import shards\n")
    (fake / "rounds" / "stage.py").write_text("from ..student.loop import run\n")
    (fake / "student" / "stage.py").write_text("from ..rounds import stage\n")
    (fake / "quantize" / "stage.py").write_text("from ..corpus import shards\nfrom ..student import loop\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    found = "\n".join(violations())
    for expected in ("distill_llm.paths:1 imports distill_llm.teacher.stage: the ground never imports a stage",
                     "distill_llm.teacher.stage:1 imports distill_llm.toy.x: the toy world is a plug-in",
                     "distill_llm.teacher.stage:2 imports distill_llm.corpus.shards._read_json: a private name",
                     "distill_llm.corpus.shards:1 imports distill_llm.student.loop.run: corpus",
                     "distill_llm.student.losses:1 imports ray.train: the pure-torch student modules",
                     "distill_llm.curation.stage:1 imports distill_llm.teacher.stage: curation imports only",
                     "distill_llm.rounds.stage:1 imports distill_llm.student.loop.run: rounds imports only",
                     "distill_llm.student.stage:1 imports distill_llm.rounds.stage: no wing imports rounds",

                     "distill_llm.quantize.stage:2 imports distill_llm.student.loop: quantize imports only corpus"):
        assert expected in found, found


def test_importing_the_package_loads_neither_torch_nor_ray():
    out = subprocess.run([sys.executable, "-c", "import sys, distill_llm, distill_llm.cli; "
                          "print(sorted({'torch', 'ray', 'vllm'} & set(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
