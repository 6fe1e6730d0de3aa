"""Evaluation: held-out prompts through each model's vLLM engine (same Ray Data path), scored by the checker."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .checkers import get_checker
from ..config import Config, ConfigError
from ..paths import (absolute, cache_dir, check_weights_format, filesystem, is_url, join, makedirs, read_text,
                     resolve_model)
from ..quantize.stage import quantized_folders, weight_bytes
from ..teacher.engine import ENGINE_JOB_ENV, EngineSpec, SamplingSpec


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    """pass@1 (and pass@k for k in 2, 4, ... <= n), mean completion length, finish reasons."""
    by_prompt: dict[str, list[bool]] = {}
    lengths, finish = [], {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(bool(r["answer_correct"]))
        lengths.append(len(r["completion_token_ids"] or []))
        finish[r["finish_reason"]] = finish.get(r["finish_reason"], 0) + 1
    out: dict[str, Any] = {"prompts": len(by_prompt), "samples": len(rows)}
    ks = [1] + [k for k in (2, 4, 8, 16, 32, 64) if k <= samples]
    for k in ks:
        vals = [pass_at_k(len(v), sum(v), k) for v in by_prompt.values() if len(v) >= k]
        out[f"pass@{k}"] = sum(vals) / len(vals) if vals else 0.0
    out["mean_completion_tokens"] = sum(lengths) / len(lengths) if lengths else 0.0
    out["finish_reasons"] = finish
    return out


def models_to_score(cfg: Config, student: str | None) -> list[tuple[str, str]]:
    """(label, model) pairs in table order: teacher, untrained student, trained student, extras."""
    models: list[tuple[str, str]] = []
    if cfg.eval.include_teacher:
        models.append(("teacher", cfg.teacher.model))
    if cfg.eval.include_base_student:
        models.append(("student (before)", cfg.student.model))
    trained = student or (cfg.output.student_dir if _exported(cfg.output.student_dir) else None)
    if trained:
        models.append(("student (distilled)", trained))
    models += [(f"student ({scheme})", folder) for scheme, folder in quantized_folders(cfg)]
    models += [(m, m) for m in cfg.eval.models]
    if not models:
        raise ConfigError("nothing to evaluate: pass model=PATH or enable eval.include_teacher")
    return models


ADAPTER_CONFIG = "adapter_config.json"  # a peft LoRA export (student.merge_lora: false): base reference + adapter


def folder_kind(location: str) -> str | None:
    """'model' (a Hugging Face folder), 'adapter' (a peft adapter folder), or None when ``location`` is no
    folder (a hub id, or a student not exported yet). A folder holding neither is an error naming it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(join(path, "config.json")).type != pafs.FileType.NotFound:
        return "model"
    if fs.get_file_info(join(path, ADAPTER_CONFIG)).type != pafs.FileType.NotFound:
        return "adapter"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
        raise ConfigError(f"model folder {location} holds neither config.json (a Hugging Face model) nor "
                          f"{ADAPTER_CONFIG} (a LoRA adapter): evaluation cannot serve it")
    return None


def _exported(folder: str) -> bool:
    return folder_kind(folder) is not None


@dataclass(frozen=True)
class Served:
    """One row of the table and how its engine loads the model: each model with its own settings."""

    label: str
    model: str  # what vLLM loads: a local folder or a hub id
    revision: str | None
    tokenizer: str | None
    trust_remote_code: bool
    allow_pickle: bool
    is_teacher: bool
    quantised: bool = False  # a compressed-tensors folder: served in its own dtype (quantised_dtype)


def served_model(cfg: Config, label: str, model: str) -> Served:
    """The teacher with teacher.*, the base student with student.*, exports and extras as found (an adapter
    folder merged over its base first); pickled weights refused unless the role's allow_pickle_weights."""
    t, s = cfg.teacher, cfg.student
    if label == "teacher":
        served = Served(label, resolve_model(model), t.revision, t.tokenizer, t.trust_remote_code,
                        t.allow_pickle_weights, True)
    elif label == "student (before)":
        served = Served(label, resolve_model(model), s.revision, None, s.trust_remote_code,
                        s.allow_pickle_weights, False)
    else:
        kind = folder_kind(model) if _looks_like_folder(model) else None
        path = merge_adapter(cfg, model) if kind == "adapter" else resolve_model(model)
        served = Served(label, path, None, None, s.trust_remote_code, s.allow_pickle_weights, False,
                        _is_quantised(path))
    key = "teacher.allow_pickle_weights" if served.is_teacher else "student.allow_pickle_weights"
    check_weights_format(served.model, served.allow_pickle, key)
    return served


def _is_quantised(path: str) -> bool:
    """A local folder whose config.json carries a ``quantization_config`` (e.g. written by distill-llm quantize)."""
    config = Path(path) / "config.json"
    return config.is_file() and "quantization_config" in json.loads(config.read_text())


def _looks_like_folder(model: str) -> bool:
    return is_url(model) or Path(model).expanduser().is_dir()


def merge_adapter(cfg: Config, folder: str) -> str:
    """A LoRA adapter folder merged into its base with peft, saved in the cache: the folder vLLM serves.

    The base is the adapter's ``base_model_name_or_path`` (at its ``revision``), loaded in its own dtype with
    student.trust_remote_code / student.allow_pickle_weights. Merged again on every call: the adapter may
    have been re-exported since.
    """
    import hashlib
    import shutil

    import pyarrow.fs as pafs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = cfg.student
    target = cache_dir() / "merged" / hashlib.sha256(absolute(folder).encode()).hexdigest()[:16]
    if target.exists():
        shutil.rmtree(target)
    adapter = target.parent / f"{target.name}-adapter"
    if adapter.exists():
        shutil.rmtree(adapter)
    adapter.mkdir(parents=True)
    fs, path = filesystem(folder)  # a local copy: peft loads local folders (and URLs are copied like models)
    pafs.copy_files(path, str(adapter), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    conf = json.loads((adapter / ADAPTER_CONFIG).read_text())
    base_name = conf.get("base_model_name_or_path")
    if not base_name:
        raise ConfigError(f"adapter folder {folder}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    base = resolve_model(base_name)
    check_weights_format(base, s.allow_pickle_weights, "student.allow_pickle_weights")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, revision=conf.get("revision"), dtype="auto",
                                                     trust_remote_code=s.trust_remote_code,
                                                     use_safetensors=not s.allow_pickle_weights)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ConfigError(f"cannot merge adapter folder {folder} into its base {base_name}: {err}") from None
    merged.save_pretrained(str(target), safe_serialization=True)
    has_tokenizer = (adapter / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(str(adapter) if has_tokenizer else base, revision=None if has_tokenizer
                                  else conf.get("revision"), trust_remote_code=s.trust_remote_code
                                  ).save_pretrained(str(target))
    shutil.rmtree(adapter)
    print(f"eval: {folder} is a LoRA adapter over {base_name}; serving it merged (peft) from {target}")
    return str(target)


def eval_use_gpu(cfg: Config) -> bool:
    """Whether evaluation engines use GPUs: eval.use_gpu, or the rule of teacher.use_gpu=null (use_gpu_for),
    decided from the config and the installed engine, never from the GPUs the cluster has right now."""
    from ..teacher.stage import use_gpu_for

    return use_gpu_for(cfg.eval.use_gpu)


def eval_engine_spec(cfg: Config, served: Served, use_gpu: bool) -> EngineSpec:
    """The engine of one evaluated model: its own settings, eval.engine over them, eval.resources per engine."""
    t, o = cfg.teacher, cfg.eval.engine
    if served.is_teacher:
        own = dict(dtype=t.dtype, tensor_parallel_size=t.tensor_parallel_size,
                   pipeline_parallel_size=t.pipeline_parallel_size, gpu_memory_utilization=t.gpu_memory_utilization,
                   cpu_kv_cache_gb=t.cpu_kv_cache_gb, max_model_len=t.max_model_len, max_num_seqs=t.max_num_seqs,
                   enforce_eager=t.enforce_eager)
        kwargs, resources = dict(t.engine_kwargs), t.resources
    else:  # students have no engine section of their own: vLLM's defaults, one GPU per engine
        own = dict(dtype="auto", tensor_parallel_size=1, pipeline_parallel_size=1, gpu_memory_utilization=0.9,
                   cpu_kv_cache_gb=1.0, max_model_len=None, max_num_seqs=None, enforce_eager=None)
        kwargs, resources = {}, {}
    own.update({k: v for k, v in o.model_dump(exclude={"engine_kwargs"}).items() if v is not None})
    if served.quantised:  # eval.engine.dtype is for the unquantised models (the quickstart's float32)
        own["dtype"] = "auto"
    eager = own.pop("enforce_eager")
    kv_gb = own.pop("cpu_kv_cache_gb")
    return EngineSpec(
        model=served.model, tokenizer=served.tokenizer, revision=served.revision,
        trust_remote_code=served.trust_remote_code, **own,
        kv_cache_memory_bytes=None if use_gpu else int(kv_gb * 2**30),
        enforce_eager=(not use_gpu) if eager is None else eager, seed=cfg.eval.seed,
        load_format="auto" if served.allow_pickle else "safetensors",
        resources=dict(cfg.eval.resources or resources), engine_kwargs={**kwargs, **o.engine_kwargs})


def eval_replicas(cfg: Config, served: Served) -> int:
    """Engines serving one model at once: eval.replicas, else teacher.replicas for the teacher and 1 for students."""
    if cfg.eval.replicas is not None:
        return cfg.eval.replicas
    return cfg.teacher.replicas if served.is_teacher else 1


def evaluate_model(cfg: Config, served: Served, use_gpu: bool) -> tuple[dict[str, Any], pa.Table]:
    from ..corpus.prompts import expand_samples, read_prompts
    from ..teacher.stage import apply_engine

    e = cfg.eval
    prompts = read_prompts(cfg.data, source=e.prompts, num_prompts=e.num_prompts)
    sampling = SamplingSpec(max_new_tokens=e.max_new_tokens or cfg.generate.max_new_tokens,
                            temperature=e.temperature, top_p=1.0 if e.temperature == 0 else cfg.generate.top_p,
                            seed=e.seed, top_k_logprobs=0, checker=cfg.data.checker,
                            system_prompt=cfg.data.system_prompt)
    rows = apply_engine(expand_samples(prompts, e.samples, set()), eval_engine_spec(cfg, served, use_gpu), sampling,
                        eval_replicas(cfg, served), use_gpu, e.batch_size, e.max_restarts)
    batches = list(rows.iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        raise ConfigError(f"no evaluation prompts were read from {e.prompts}")
    table = pa.concat_tables(batches)
    good = table.filter(pa.compute.is_null(table["skip_reason"]))
    result = score(good.to_pylist(), e.samples)
    result["skipped"] = table.num_rows - good.num_rows
    return result, good


ENGINE_ACTOR = "TeacherEngine"  # in the class name Ray records for apply_engine's actors (MapWorker(MapBatches(...)))
RELEASE_TIMEOUT_S = 300.0


def engine_actors(job_id) -> list[dict[str, Any]]:
    """Every engine actor of this job in Ray's actor table (in the GCS), whatever its state.

    Read from the GCS rather than through ray.util.state, which needs the dashboard (a local Ray here
    runs without one)."""
    from ray._private import state

    return [a for a in state.actors(job_id=job_id).values() if ENGINE_ACTOR in a["ActorClassName"]]


def wait_for_release(label: str, released: set[str], timeout_s: float = RELEASE_TIMEOUT_S) -> None:
    """Block until the processes of the engines that served ``label`` have exited, so their GPUs and GPU
    memory are free before the next model's engines start; ``released`` (actor ids) grows by them.

    Two waits. Ray Data drops its actor handles when a dataset is consumed, and Ray ends the actors only
    once every handle is collected, which may be later: first until Ray's table says DEAD. But Ray marks a
    released actor DEAD, and frees its resources for the next actor, at once, while the actor's process
    still runs its graceful exit, shutting its vLLM engine down with the memory still held: then until
    each actor's process and the processes under it (the engine cores) are gone, looked at on its node.
    """
    import gc

    import ray

    job_id = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    deadline = time.time() + timeout_s
    while True:
        gc.collect()
        actors = [a for a in engine_actors(job_id) if a["ActorID"] not in released]
        alive = [a for a in actors if a["State"] != "DEAD"]
        if not alive:
            break
        if time.time() > deadline:
            _release_failed(label, timeout_s, [f"actor {a['ActorID']} ({a['State']}, pid {a['Pid']})" for a in alive])
        time.sleep(0.5)
    left = engine_processes_left(actors, deadline)
    if left:
        _release_failed(label, timeout_s, left)
    released.update(a["ActorID"] for a in actors)


def _release_failed(label: str, timeout_s: float, what: list[str]) -> None:
    raise RuntimeError(f"eval: the engines that served {label} did not exit within {timeout_s:.0f}s "
                       f"({', '.join(what)}); the next model's engines would not get their GPUs")


def engine_processes_left(actors: list[dict[str, Any]], deadline: float) -> list[str]:
    """Wait until the processes of ``actors`` (DEAD in Ray's table) are gone, by one task on each of their
    nodes; what is still alive at ``deadline``, named. A node that is gone took its processes with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    by_node: dict[str, list[tuple[int, float]]] = {}
    for a in actors:
        if a["Pid"]:  # 0: the actor never got a process
            by_node.setdefault(a["Address"]["NodeID"], []).append((a["Pid"], a["EndTime"] / 1000))
    for node in ray.nodes():  # an engine core orphaned by its killed actor may be on any node, under no actor
        if node["Alive"]:
            by_node.setdefault(node["NodeID"], [])
    job = ray.get_runtime_context().get_job_id()
    waits = {node: ray.remote(wait_for_exit).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(procs, deadline, job)
        for node, procs in by_node.items()}
    left = []
    for node, ref in waits.items():
        try:
            pids = ray.get(ref, timeout=max(0.0, deadline - time.time()) + 30)
        except ray.exceptions.TaskUnschedulableError:
            continue
        except ray.exceptions.GetTimeoutError:
            pids = sorted(pid for pid, _ in by_node[node])
        left += [f"pid {pid} on node {node[:8]}" for pid in pids]
    return left


def wait_for_exit(procs: list[tuple[int, float]], deadline: float, job: str | None = None) -> list[int]:
    """On one node: wait until each ``(pid, ended)`` process, and every process found under it, has
    exited, and with ``job`` every process an engine of that Ray job started (its environment says so: found
    also when its actor was killed and it was left without a parent); the pids still alive at ``deadline``.
    A pid whose process was created after ``ended`` (when Ray marked the actor dead) is another process that
    reuses the number; a zombie has let go of its memory."""
    import contextlib

    import psutil

    watched: dict[int, float] = {}  # pid -> create_time
    for pid, ended in procs:
        try:
            p = psutil.Process(pid)
            if p.create_time() <= ended + 1:
                watched[pid] = p.create_time()
        except psutil.Error:
            continue
    while True:
        if job:
            watched.update(_engine_processes(job))
        for pid, created in list(watched.items()):
            try:
                p = psutil.Process(pid)
                if p.create_time() != created or p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                children = p.children(recursive=True)
            except psutil.Error:
                del watched[pid]
                continue
            for child in children:
                with contextlib.suppress(psutil.Error):  # gone already: nothing to wait for
                    watched.setdefault(child.pid, child.create_time())
        if not watched or time.time() > deadline:
            return sorted(watched)
        time.sleep(0.2)


def samples_file(label: str, scored: dict[str, Any]) -> str:
    """The file name of a model's samples: its label in safe characters (a label may be a folder path or
    an object-store URL, given in eval.models), numbered after the first when two labels reduce alike."""
    import re

    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[-80:] or "model"

    stem = safe(label)
    same = [safe(other) for other in scored].count(stem) - 1  # ``scored`` already holds this label
    return f"samples-{stem}.parquet" if same <= 0 else f"samples-{stem}-{same + 1}.parquet"


def _engine_processes(job: str) -> dict[int, float]:
    """pid -> create_time of the live processes on this machine whose environment marks them as started by
    an engine of Ray job ``job`` (teacher/engine.py: ENGINE_JOB_ENV)."""
    import os

    import psutil

    found = {}
    for p in psutil.process_iter(["pid", "create_time", "status"]):
        if p.info["pid"] == os.getpid() or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(ENGINE_JOB_ENV) == job:
                found[p.info["pid"]] = p.info["create_time"]
        except psutil.Error:  # gone, or another user's
            continue
    return found


def format_table(results: dict[str, dict[str, Any]]) -> str:
    ks = sorted({k for r in results.values() for k in r if k.startswith("pass@")}, key=lambda s: int(s[5:]))
    head = "| model | " + " | ".join(ks) + " | mean tokens | prompts | weights on disk |"
    lines = [head, "|" + "---|" * (len(ks) + 4)]
    for label, r in results.items():
        size = f"{r['weight_bytes'] / 1e6:.2f} MB" if r.get("weight_bytes") else "-"
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:.1%}" for k in ks)
                     + f" | {r['mean_completion_tokens']:.1f} | {r['prompts']} | {size} |")
    return "\n".join(lines)


def evaluate(cfg: Config, student: str | None = None) -> dict[str, dict[str, Any]]:
    """Score every model on the held-out prompts; writes report.json/.md under the eval dir and prints the table."""
    import pyarrow.parquet as pq

    from ..cluster.runtime import init_ray

    if get_checker(cfg.data.checker) is None:
        raise ConfigError("evaluation needs an answer checker: set data.checker (toy, math, exact)")
    # every model is resolved (and an adapter merged) before any engine starts: one that cannot be served
    # stops the stage here, naming it, instead of after the others were scored
    served = [(model, served_model(cfg, label, model)) for label, model in models_to_score(cfg, student)]
    init_ray(cfg.ray)
    use_gpu = eval_use_gpu(cfg)
    start = time.time()
    fs, out = filesystem(cfg.eval_dir)  # a local folder or an object-store URL, like every output
    results: dict[str, dict[str, Any]] = {}
    released: set[str] = set()
    for model, one in served:
        label = one.label
        if one.quantised:
            print(f"eval: {label} ({one.model}) served by vLLM ({'GPU' if use_gpu else 'CPU'}) in the folder's own "
                  "dtype (eval.engine.dtype is not applied to quantised folders: vLLM CPU's int4 GEMM has no float32)")
        result, table = evaluate_model(cfg, one, use_gpu)
        wait_for_release(label, released)
        local = Path(one.model)  # a hub id has no size here
        results[label] = {"model": model, **result, "weight_bytes": weight_bytes(local) if local.is_dir() else None}
        makedirs(fs, out)
        pq.write_table(table, join(out, samples_file(label, results)), filesystem=fs)
    table = format_table(results)
    _write_text(fs, join(out, "report.json"), json.dumps(results, indent=2))
    _write_text(fs, join(out, "report.md"), f"# Evaluation on {cfg.eval.prompts}\n\n{table}\n")
    _add_to_card(cfg, student, table)
    print(f"\neval: {cfg.eval.num_prompts} held-out prompts ({cfg.eval.prompts}), {cfg.eval.samples} sample(s) each, "
          f"temperature {cfg.eval.temperature}, checker {cfg.data.checker}, {time.time() - start:.0f}s\n{table}")
    return results


def _write_text(fs, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _add_to_card(cfg: Config, student: str | None, table: str) -> None:
    fs, folder = filesystem(student or cfg.output.student_dir)
    card = join(folder, "README.md")
    text = read_text(fs, card)
    if text is not None:
        text = text.split("\n## Evaluation\n")[0].rstrip()
        _write_text(fs, card, f"{text}\n\n## Evaluation\n\nHeld-out prompts `{cfg.eval.prompts}` "
                              f"(n={cfg.eval.num_prompts}), checker `{cfg.data.checker}`:\n\n{table}\n")


def sample_passes(cfg: Config, prompts: pa.Table, model: str, samples: int, temperature: float,
                  max_new_tokens: int | None, checker) -> dict[str, tuple[int, int]]:
    """prompt_id -> (correct, samples): ``model`` served as the base student (student.*, eval.engine) on
    ``prompts`` (prompt_id, messages, answer), ``samples`` each, answers checked by ``checker`` (a callable).
    Curation's difficulty pass (curate.difficulty)."""
    import ray.data

    from ..corpus.prompts import PROMPT_SCHEMA, expand_samples
    from ..corpus.schema import SKIP_REASON
    from ..teacher.stage import apply_engine
    from .checkers import check

    full = pa.table({f.name: prompts[f.name] if f.name in prompts.schema.names else pa.nulls(prompts.num_rows, f.type)
                     for f in PROMPT_SCHEMA}, schema=PROMPT_SCHEMA)
    served = served_model(cfg, "student (before)", model)
    use_gpu = eval_use_gpu(cfg)
    sampling = SamplingSpec(max_new_tokens=max_new_tokens or cfg.generate.max_new_tokens, temperature=temperature,
                            top_p=1.0, seed=cfg.eval.seed, top_k_logprobs=0, checker="none",
                            system_prompt=cfg.data.system_prompt)
    rows = apply_engine(expand_samples(ray.data.from_arrow(full), samples, set()),
                        eval_engine_spec(cfg, served, use_gpu), sampling, eval_replicas(cfg, served), use_gpu,
                        cfg.eval.batch_size, cfg.eval.max_restarts)
    counts: dict[str, tuple[int, int]] = {}
    for batch in rows.select_columns(["prompt_id", "completion_text", "answer", SKIP_REASON]).iter_batches(
            batch_format="pyarrow"):
        for r in batch.to_pylist():
            if r[SKIP_REASON] is None:
                c, n = counts.get(r["prompt_id"], (0, 0))
                counts[r["prompt_id"]] = (c + bool(check(checker, r["completion_text"] or "", r["answer"])), n + 1)
    return counts
