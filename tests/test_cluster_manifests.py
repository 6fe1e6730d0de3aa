"""The manifests in cluster/ and the recipes in configs/ agree: modules, config files, and where work can land.

A checker reads each RayJob's entrypoint, validates the config it names with the entrypoint's overrides,
and checks that the RayCluster it selects (and the AWS launcher's node types) can place the work the
config asks for: engines of TP x PP GPUs with ``teacher.resources``, Ray Train workers with
``train.resources_per_worker``. Broken copies show the checker fails.
"""

from __future__ import annotations

import copy
import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from distill_llm.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
CONFIGS = ROOT / "configs"
MODULES = {"generate_teacher": "generate", "train_student": "train", "evaluate": "eval", "run": "run"}
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "quickstart.yaml")


@dataclass
class Group:
    """One node type: what each pod (node) advertises to Ray, and how many the autoscaler may start."""

    name: str
    resources: dict[str, float]  # CPU, GPU and custom resources of one pod
    max_pods: int


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests(kind: str) -> dict[str, tuple[Path, dict]]:
    found = {}
    for path in sorted(CLUSTER.glob("*.yaml")):
        for d in docs(path):
            if d.get("kind") == kind:
                found[d["metadata"]["name"]] = (path, d)
    return found


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_start_resources(params: dict) -> dict[str, float]:
    """KubeRay's rayStartParams.resources is a shell-quoted JSON string: '"{\\"teacher\\": 1}"'."""
    raw = params.get("resources")
    if not raw:
        return {}
    return json.loads(raw.strip().strip("'").strip('"').replace('\\"', '"'))


def pod_resources(group_spec: dict) -> dict[str, float]:
    params = group_spec.get("rayStartParams", {})
    out = {"CPU": 0.0, "GPU": 0.0}
    for container in group_spec["template"]["spec"]["containers"]:
        limits = container.get("resources", {}).get("limits", {})
        out["CPU"] += _quantity(limits.get("cpu", 0))
        out["GPU"] += _quantity(limits.get("nvidia.com/gpu", 0))
    for key, name in (("num-cpus", "CPU"), ("num-gpus", "GPU")):
        if key in params:
            out[name] = float(params[key])
    return {**out, **ray_start_resources(params)}


def k8s_groups(cluster: dict) -> list[Group]:
    spec = cluster["spec"]
    assert spec.get("enableInTreeAutoscaling") is True, "worker groups scale between minReplicas and maxReplicas"
    groups = []
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["maxReplicas"], g["groupName"]
        groups.append(Group(g["groupName"], pod_resources(g), g["maxReplicas"]))
    return groups


def launcher_groups(launcher: dict) -> list[Group]:
    return [Group(name, {"CPU": 0.0, "GPU": 0.0, **t.get("resources", {})}, t.get("max_workers", 0))
            for name, t in launcher["available_node_types"].items()]


def _fits(need: dict[str, float], pod: dict[str, float]) -> int:
    """How many units of ``need`` one pod holds."""
    return min((math.floor(pod.get(k, 0) / v) for k, v in need.items() if v > 0), default=10**6)


def placement_problems(cfg: Config, stage: str, groups: list[Group]) -> list[str]:
    """Why the work of ``stage`` cannot be placed on ``groups`` (empty: it can)."""
    problems = []
    if stage in ("generate", "eval", "run"):
        # The same check generate runs before its engines start, over the groups' pods as node types: a
        # TP-only engine actor asks for all its GPUs on one pod (teacher.stage.engine_need); with pipeline
        # stages a replica is a placement group, each TP group on one pod (teacher.placement.ReplicaGroup).
        from distill_llm.teacher.placement import NodeType, ReplicaGroup, group_problem, problem

        t = cfg.teacher
        need = {"GPU": float(t.tensor_parallel_size * t.pipeline_parallel_size), **t.resources}
        keys = {"GPU": f"TP {t.tensor_parallel_size} x PP {t.pipeline_parallel_size} GPUs",
                **{k: f"teacher.resources {k}" for k in t.resources}}
        types = [NodeType(g.name, g.resources, g.max_pods) for g in groups]
        reason = (problem(need, t.replicas, [], types, keys) if t.pipeline_parallel_size == 1 else
                  group_problem(ReplicaGroup(t.tensor_parallel_size, t.pipeline_parallel_size, dict(t.resources)),
                                t.replicas, [], types, keys))
        if reason:
            problems.append(reason)
    if stage in ("train", "run"):
        tr = cfg.train
        need = {"CPU": tr.cpus_per_worker, "GPU": 1.0 if tr.use_gpu else 0.0, **tr.resources_per_worker}
        if not any(_fits(need, g.resources) >= 1 and math.ceil(tr.num_workers / _fits(need, g.resources)) <= g.max_pods
                   for g in groups):
            problems.append(f"{tr.num_workers} train workers of {need} fit no group's max pods")
    return problems


def job_problems(job: dict, clusters: dict[str, tuple[Path, dict]]) -> list[str]:
    """Everything wrong with one RayJob: its module, its config and overrides, and placement on its cluster."""
    words = shlex.split(job["spec"]["entrypoint"])
    if words[:2] != ["python", "-m"] or len(words) < 4 or not words[2].startswith("pipelines."):
        return [f"entrypoint {job['spec']['entrypoint']!r} is not `python -m pipelines.<module> CONFIG [overrides]`"]
    module, config, overrides = words[2].removeprefix("pipelines."), words[3], words[4:]
    if module not in MODULES or not (ROOT / "pipelines" / f"{module}.py").is_file():
        return [f"pipelines.{module} does not exist"]
    try:
        cfg = load_config(ROOT / config, overrides)
    except ConfigError as err:
        return [f"{config}: {err}"]
    name = job["spec"].get("clusterSelector", {}).get("ray.io/cluster")
    if name not in clusters:
        return [f"clusterSelector names {name!r}, not a RayCluster in cluster/"]
    cluster = clusters[name][1]
    problems = placement_problems(cfg, MODULES[module], k8s_groups(cluster))
    head = pod_resources(cluster["spec"]["headGroupSpec"])
    if head["GPU"]:
        problems.append("the head pod has GPUs")
    return problems


JOBS = manifests("RayJob")
CLUSTERS = manifests("RayCluster")
LAUNCHER = CLUSTER / "aws.yaml"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_parses_and_opens_with_its_command(path):
    loaded = docs(path)
    assert loaded, f"{path.name} is empty"
    first = path.read_text().splitlines()[0]
    rel = f"cluster/{path.name}"
    assert first in (f"# kubectl apply -f {rel}", f"# ray up {rel}"), f"{path.name} opens with {first!r}"
    for d in loaded:
        assert d.get("apiVersion") == "ray.io/v1" or "cluster_name" in d


def test_there_is_a_cluster_and_a_job_per_stage():
    assert CLUSTERS and {shlex.split(j["spec"]["entrypoint"])[2] for _, j in JOBS.values()} >= {
        f"pipelines.{m}" for m in MODULES}


@pytest.mark.parametrize("name", sorted(JOBS), ids=str)
def test_rayjob_runs_an_existing_module_and_config_and_fits_its_cluster(name):
    assert job_problems(JOBS[name][1], CLUSTERS) == []


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_launcher_node_types_place_every_recipe(path):
    launcher = docs(LAUNCHER)[0]
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert launcher["available_node_types"][launcher["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any("[gpu]" in c for c in launcher["setup_commands"]), "nodes install this package with the [gpu] extra"
    assert placement_problems(load_config(path), "run", launcher_groups(launcher)) == []


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_opens_with_its_commands_and_gpus(path):
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("# distill-llm ") and f"configs/{path.name}" in lines[0]
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "python -m pipelines." in header and f"configs/{path.name}" in header and "ray job submit" in header
    assert "kubectl apply -f cluster/" in header and "GPUs:" in header
    for manifest in (w for w in header.split() if w.startswith("cluster/") and w.endswith(".yaml")):
        assert (ROOT / manifest.rstrip(")")).is_file(), f"{path.name} names {manifest}"
    cfg = load_config(path)
    assert cfg.data.checker == "math" and cfg.generate.samples_per_prompt > 1 and cfg.train.filter_correct


def test_recipes_plan_offline(monkeypatch):
    """Every recipe fits its GPUs by `distill-llm plan`, except the known multi-node replica of DeepSeek-R1."""
    from distill_llm.cluster.plan import plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for path in RECIPES:
        cfg = load_config(path)
        # a token-level KD refusal (train.alpha) is the tokenizer router's, tested per recipe in test_tokenizers
        errors = [f.key for f in plan(cfg).flags if f.level == "error" and f.key != "train.alpha"]
        if cfg.teacher.pipeline_parallel_size > 1:
            assert errors == ["teacher.pipeline_parallel_size"], path.name
            assert plan(load_config(path, ["teacher.pipeline_parallel_size=1", "plan.gpu_type=H200"])).fits
        else:
            assert errors == [], path.name


# ---------------------------------------------------------------- the checker fails on broken copies


def _job(stage_module: str) -> dict:
    return next(copy.deepcopy(j) for _, j in JOBS.values() if f"pipelines.{stage_module} " in j["spec"]["entrypoint"])


def _groups_edit(edit) -> dict[str, tuple[Path, dict]]:
    clusters = copy.deepcopy(CLUSTERS)
    for _, cluster in clusters.values():
        for g in cluster["spec"]["workerGroupSpecs"]:
            edit(g)
    return clusters


def _set_gpus(n):
    def edit(g):
        for c in g["template"]["spec"]["containers"]:
            c["resources"]["limits"]["nvidia.com/gpu"] = str(n)
    return edit


@pytest.mark.parametrize("module, edit, words", [
    ("generate_teacher", _set_gpus(4), "GPUs"),  # TP 8 on 4-GPU pods
    ("generate_teacher", lambda g: g["rayStartParams"].pop("resources", None), "teacher"),  # no custom resource
    ("train_student", lambda g: g.update(maxReplicas=0), "train workers"),
    ("train_student", _set_gpus(2), "train workers"),  # 8 workers need 4 pods of 2
])
def test_checker_catches_broken_clusters(module, edit, words):
    problems = job_problems(_job(module), _groups_edit(edit))
    assert problems and words in " ".join(problems)


def test_checker_catches_an_engine_wider_than_a_pod():
    """TP 16 is one actor asking for 16 GPUs: no 8-GPU pod can ever hold it (Ray would leave it pending);
    TP 8 x PP 2 is a placement group over two 8-GPU pods, which the group holds."""
    job = next(copy.deepcopy(j) for _, j in JOBS.values() if "r1-671b" in j["spec"]["entrypoint"])
    assert job_problems(job, CLUSTERS) == []  # as shipped: one 8-GPU pod per replica
    spanning = copy.deepcopy(job)
    spanning["spec"]["entrypoint"] += " teacher.pipeline_parallel_size=2"
    assert job_problems(spanning, CLUSTERS) == []
    job["spec"]["entrypoint"] += " teacher.tensor_parallel_size=16"
    assert "GPU: 16, but the largest node has 8" in " ".join(job_problems(job, CLUSTERS))


def test_checker_catches_more_replicas_than_pods():
    job = _job("generate_teacher")
    job["spec"]["entrypoint"] += " teacher.replicas=2"
    assert job_problems(job, CLUSTERS) == []  # 2 of the 4 teacher pods
    assert "at most 1 engine" in " ".join(job_problems(job, _groups_edit(lambda g: g.update(maxReplicas=1))))


def test_checker_catches_bad_entrypoints_and_configs():
    job = _job("train_student")
    for entrypoint, words in [
        ("python -m pipelines.train configs/quickstart.yaml", "does not exist"),
        ("python -m pipelines.train_student configs/missing.yaml", "does not exist"),
        ("python -m pipelines.train_student configs/quickstart.yaml train.alhpa=1", "unknown key"),
        ("distill-llm train configs/quickstart.yaml", "is not"),
    ]:
        job["spec"]["entrypoint"] = entrypoint
        assert words in " ".join(job_problems(job, CLUSTERS)), entrypoint
    job = _job("train_student")
    job["spec"]["clusterSelector"]["ray.io/cluster"] = "other"
    assert "not a RayCluster" in job_problems(job, CLUSTERS)[0]
    clusters = copy.deepcopy(CLUSTERS)
    for _, c in clusters.values():
        c["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = "1"
    assert "the head pod has GPUs" in job_problems(_job("train_student"), clusters)


def test_checker_catches_a_launcher_without_the_resources():
    launcher = docs(LAUNCHER)[0]
    del launcher["available_node_types"]["teacher"]["resources"]["teacher"]
    assert placement_problems(load_config(RECIPES[0]), "run", launcher_groups(launcher))


def test_ray_start_resources_parses_kuberay_quoting():
    assert ray_start_resources({"resources": '"{\\"teacher\\": 1, \\"x\\": 2.5}"'}) == {"teacher": 1, "x": 2.5}
    assert ray_start_resources({}) == {}


SUBREAPER = "RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"


def test_every_ray_node_kills_the_children_of_dead_workers():
    """A second guard beside vLLM's own: the raylet kills a dead engine actor's engine-core child, so a
    restarted engine finds the GPU memory free (tests/test_generate_faults.py checks it on CPU)."""
    for name, (path, cluster) in CLUSTERS.items():
        spec = cluster["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert env.get(SUBREAPER) == "true", f"{path.name}: {container['name']} of {name}"
    launcher = docs(LAUNCHER)[0]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in launcher[key] if " start " in f" {c} "]
        assert starts and all(c.startswith(f"{SUBREAPER}=true ") for c in starts), key
