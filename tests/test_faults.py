"""Fault injection itself (distill_llm/faults.py): real kills, fired once per run. No engine needed."""

import subprocess

import pytest

from distill_llm import faults


def test_nothing_happens_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.on_engine_batch(1)
    faults.before_generate(["anything"])
    faults.after_commit(1)


def test_kill_engine_kills_the_engine_core_child_once(monkeypatch, tmp_path):
    monkeypatch.setenv(faults.ENV, "kill_engine:batch=2,delay=0")
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    core = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 120"])
    try:
        faults.on_engine_batch(1)
        assert core.poll() is None, "not at batch 1"
        faults.on_engine_batch(2)
        assert core.wait(timeout=10) == -9, "SIGKILL at batch 2"
        assert (tmp_path / "kill_engine.fired").exists()
        again = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 120"])
        faults.on_engine_batch(2)  # a restarted actor: the marker says it already fired
        assert again.poll() is None
        again.kill()
        again.wait()
    finally:
        core.kill()
        core.wait()


def test_one_shot_faults_need_a_marker_folder(monkeypatch):
    monkeypatch.setenv(faults.ENV, "kill_writer:shard=1")
    monkeypatch.delenv(faults.DIR_ENV, raising=False)
    with pytest.raises(RuntimeError, match=faults.DIR_ENV):
        faults.after_commit(1)
