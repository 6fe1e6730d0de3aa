"""Shared fixtures: one local Ray per session, tiny toy models built once, small real shard sets."""

from __future__ import annotations

import os
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
    """The quickstart config shrunk for tests, with every output under ``tmp``."""
    from distill_llm.config import load_config

    overrides = [f"output.dir={tmp / 'shards'}", f"output.student_dir={tmp / 'student'}",
                 f"train.storage_path={tmp / 'train'}", "data.num_prompts=48", "eval.num_prompts=24",
                 "generate.top_k_logprobs=8", "generate.samples_per_prompt=2"]
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
