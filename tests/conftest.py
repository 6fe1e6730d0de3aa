"""Shared fixtures: one local Ray per session, tiny toy models built once, small real shard sets."""

from __future__ import annotations

import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("DISTILL_LLM_NO_PROGRESS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Toy students and other cached artifacts go to a per-session folder, built through the real code."""
    os.environ["DISTILL_LLM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def ray_session():
    import ray

    from distill_llm.config import RayConfig
    from distill_llm.cluster.runtime import init_ray

    init_ray(RayConfig())
    yield ray
    ray.shutdown()


def small_config(tmp: Path, **sections):
    """The quickstart config shrunk for tests, with every output under ``tmp``; the student is the narrow
    ``toy-student`` (cheaper than the quickstart's ``toy-student-wide``)."""
    from distill_llm.config import load_config

    overrides = [f"output.dir={tmp / 'shards'}", f"output.student_dir={tmp / 'student'}",
                 f"train.storage_path={tmp / 'train'}", "data.num_prompts=48", "eval.num_prompts=24",
                 "generate.top_k_logprobs=8", "generate.samples_per_prompt=2", "student.model=toy-student"]
    for section, values in sections.items():
        overrides += [f"{section}.{k}={v}" for k, v in values.items()]
    root = Path(__file__).resolve().parent.parent
    return load_config(root / "configs" / "quickstart.yaml", overrides)


@pytest.fixture(scope="session")
def generated(ray_session, tmp_path_factory):
    """A real shard set from the toy teacher through Ray Data + vLLM (48 prompts x 2 samples, k=8)."""
    from distill_llm.teacher.stage import generate

    tmp = tmp_path_factory.mktemp("gen")
    cfg = small_config(tmp)
    manifest = generate(cfg)
    return cfg, manifest


@contextmanager
def ray_restarted_with(env: dict[str, str]):
    """Set ``env`` and shut the local Ray down, so the next one's workers take it (a local Ray's workers
    inherit the driver's environment when Ray starts); afterwards restore both."""
    import ray

    from distill_llm.cluster.runtime import init_ray
    from distill_llm.config import RayConfig

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    was_running = ray.is_initialized()
    ray.shutdown()
    try:
        yield
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if was_running:
            init_ray(RayConfig())


def marked_pids(marker: str, ident: str, path: str) -> list[int]:
    """Processes a test started: ``marker=ident`` is in their environment (every Ray process and what it
    spawns inherits it) or ``path`` (their unique temp dir) is on their command line."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid != os.getpid() and (path in " ".join(proc.info["cmdline"] or [])
                                            or proc.environ().get(marker) == ident):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_marked(marker: str, ident: str, path: str) -> None:
    """SIGTERM, then SIGKILL, the processes ``marked_pids`` finds, rescanning until none is left; then
    remove ``path``. Fails if any survives."""
    import psutil

    for _ in range(5):
        procs = []
        for pid in marked_pids(marker, ident, path):
            try:
                proc = psutil.Process(pid)
                proc.send_signal(signal.SIGTERM)
                procs.append(proc)
            except psutil.NoSuchProcess:
                continue
        if not procs:
            break
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(alive, timeout=10)
    assert not marked_pids(marker, ident, path), "processes survived SIGKILL"
    shutil.rmtree(path, ignore_errors=True)


def pytest_runtest_logreport(report):
    """With DISTILL_LLM_TEST_TIMES=FILE, append each test phase's seconds to FILE as it ends (a partial or
    killed run still says where its time went; pytest's --durations prints only at the end)."""
    path = os.environ.get("DISTILL_LLM_TEST_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(f"{report.duration:.2f}\t{report.when}\t{report.outcome}\t{report.nodeid}\n")


@pytest.fixture(scope="session")
def rescored(ray_session, tmp_path_factory):
    """The first 8 prompts of the ``generated`` set again (2 samples each), sampled without logprobs and then
    scored by prefill (generate.logprobs=rescore), graded by the math checker: test_generate checks the top-k,
    test_checkers the math checker's verdicts inside the engine actor (one engine run for both)."""
    from distill_llm.teacher.stage import generate

    tmp = tmp_path_factory.mktemp("rescore")
    cfg = small_config(tmp, data={"num_prompts": 8, "checker": "math"}, generate={"logprobs": "rescore"})
    return cfg, generate(cfg)


def toy_lora_adapter(out: Path) -> Path:
    """A peft LoRA adapter over the toy student with random (non-zero) LoRA weights, saved in ``out`` as
    ``student.merge_lora: false`` exports it: adapter_config.json naming the base, no config.json."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distill_llm.paths import resolve_model

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model("toy-student")), lora).save_pretrained(str(out))
    assert not (out / "config.json").exists() and (out / "adapter_config.json").is_file()
    return out
