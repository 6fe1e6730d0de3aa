"""Scoring without engines: pass@k, the score table, and which models are compared."""

import pytest

from distill_llm.config import build_config
from distill_llm.evaluation.stage import format_table, models_to_score, pass_at_k, score


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 1) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - (3 / 4) * (2 / 3))  # 1 - C(3,2)/C(4,2) = 0.5
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))


def test_score_groups_samples_by_prompt():
    rows = [{"prompt_id": p, "answer_correct": c, "completion_token_ids": [1] * n, "finish_reason": "stop"}
            for p, c, n in [("a", True, 2), ("a", False, 4), ("b", False, 6), ("b", False, 8)]]
    s = score(rows, samples=2)
    assert s["prompts"] == 2 and s["pass@1"] == pytest.approx(0.25) and s["pass@2"] == pytest.approx(0.5)
    assert s["mean_completion_tokens"] == 5 and s["finish_reasons"] == {"stop": 4}
    table = format_table({"teacher": s})
    assert "| teacher | 25.0% | 50.0% | 5.0 | 2 |" in table


def test_models_compared(tmp_path):
    cfg = build_config({"output": {"student_dir": str(tmp_path / "none")}, "eval": {"models": ["x"]}})
    assert [label for label, _ in models_to_score(cfg, None)] == ["teacher", "student (before)", "x"]
    assert models_to_score(cfg, "/s")[2] == ("student (distilled)", "/s")


def _pinned(tmp_path, **eval_section):
    return build_config({
        "teacher": {"model": "org/teacher", "revision": "teacher-v1", "tokenizer": "org/teacher-tok",
                    "trust_remote_code": True, "dtype": "bfloat16", "max_model_len": 32768, "replicas": 3,
                    "tensor_parallel_size": 8, "engine_kwargs": {"quantization": "fp8"}, "resources": {"teacher": 1},
                    "cpu_kv_cache_gb": 0.5},
        "student": {"model": "org/student", "revision": "student-v2", "allow_pickle_weights": True},
        "output": {"student_dir": str(tmp_path / "none")}, "eval": eval_section})


def test_each_model_is_served_with_its_own_settings(tmp_path):
    from distill_llm.evaluation.stage import eval_engine_spec, eval_replicas, served_model

    cfg = _pinned(tmp_path)
    teacher, student = (served_model(cfg, label, m) for label, m in models_to_score(cfg, None))
    t, s = eval_engine_spec(cfg, teacher, False), eval_engine_spec(cfg, student, False)
    assert (t.revision, t.tokenizer, t.trust_remote_code, t.dtype, t.max_model_len) == (
        "teacher-v1", "org/teacher-tok", True, "bfloat16", 32768)
    assert (t.tensor_parallel_size, t.engine_kwargs, t.resources, t.load_format) == (
        8, {"quantization": "fp8"}, {"teacher": 1}, "safetensors")
    assert (s.revision, s.tokenizer, s.trust_remote_code, s.dtype, s.max_model_len) == (
        "student-v2", None, False, "auto", None), "nothing of the teacher's engine reaches the student"
    assert (s.tensor_parallel_size, s.engine_kwargs, s.resources, s.load_format) == (1, {}, {}, "auto")
    assert s.kv_cache_memory_bytes == 2**30 and t.kv_cache_memory_bytes == 2**29
    assert (eval_replicas(cfg, teacher), eval_replicas(cfg, student)) == (3, 1)


def test_eval_engine_overrides_every_model(tmp_path):
    from distill_llm.evaluation.stage import eval_engine_spec, eval_replicas, served_model

    cfg = _pinned(tmp_path, engine={"dtype": "float16", "max_model_len": 4096, "engine_kwargs": {"x": 1},
                                    "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5},
                  replicas=2, resources={"eval": 1})
    for label, model in models_to_score(cfg, None):
        served = served_model(cfg, label, model)
        spec = eval_engine_spec(cfg, served, True)
        assert (spec.dtype, spec.max_model_len, spec.tensor_parallel_size, spec.gpu_memory_utilization) == (
            "float16", 4096, 2, 0.5)
        assert spec.resources == {"eval": 1} and spec.kv_cache_memory_bytes is None and not spec.enforce_eager
        assert spec.engine_kwargs == ({"quantization": "fp8", "x": 1} if served.is_teacher else {"x": 1})
        assert eval_replicas(cfg, served) == 2


def test_eval_use_gpu_is_the_config_not_the_cluster(tmp_path):
    from distill_llm.evaluation.stage import eval_use_gpu

    assert eval_use_gpu(_pinned(tmp_path, use_gpu=False)) is False
    assert eval_use_gpu(_pinned(tmp_path, use_gpu=True)) is True


def test_a_folder_eval_cannot_serve_is_an_error_naming_it(tmp_path):
    from distill_llm.config import ConfigError

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"")
    cfg = build_config({"output": {"student_dir": str(junk)}})
    with pytest.raises(ConfigError, match=f"model folder {junk} holds neither config.json"):
        models_to_score(cfg, None)
    (junk / "adapter_config.json").write_text("{}")
    assert models_to_score(cfg, None)[2] == ("student (distilled)", str(junk)), "an adapter export is a row"
    from distill_llm.evaluation.stage import served_model

    with pytest.raises(ConfigError, match=f"adapter folder {junk}: adapter_config.json names no base"):
        served_model(cfg, "student (distilled)", str(junk))


def _tree(seconds: float):
    """A process that starts a child and exits with it after ``seconds``: an engine actor and its engine core."""
    import subprocess
    import sys

    code = (f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep({seconds})']); print(c.pid, flush=True); c.wait()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    return proc, child


def test_wait_for_exit_waits_for_a_process_and_the_processes_under_it():
    import time

    import psutil

    from distill_llm.evaluation.stage import wait_for_exit

    proc, child = _tree(1.5)
    began = time.time()
    assert wait_for_exit([(proc.pid, time.time())], began + 30) == []
    assert time.time() - began > 1.0, "waited for the child the process was waiting on"
    proc.wait()
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_wait_for_exit_waits_for_an_orphaned_engine_process_of_its_job():
    """An engine actor killed in its ``__init__`` leaves its engine core without a parent: found by the job
    mark in its environment (teacher/engine.py), not under any actor; another job's is not waited for."""
    import os
    import subprocess
    import sys
    import time

    from distill_llm.evaluation.stage import wait_for_exit
    from distill_llm.teacher.engine import ENGINE_JOB_ENV

    def orphan(job: str, seconds: float) -> int:
        code = (f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', 'import time; "
                f"time.sleep({seconds})'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
        out = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENGINE_JOB_ENV: job},
                             capture_output=True, text=True, check=True)
        return int(out.stdout)

    other = orphan("0b000000", 30)
    try:
        mine = orphan("0a000000", 2)
        began = time.time()
        assert wait_for_exit([], began + 30, "0a000000") == []
        assert time.time() - began > 1.0, f"waited for the orphaned engine process {mine} of its job"
        assert wait_for_exit([], time.time() + 1, "0b000000") == [other], "named when it outlives the deadline"
    finally:
        os.kill(other, 9)


def test_wait_for_exit_names_what_outlives_the_deadline_and_skips_a_reused_pid():
    import os
    import signal
    import time

    from distill_llm.evaluation.stage import wait_for_exit

    proc, child = _tree(30)
    try:
        time.sleep(0.3)
        assert set(wait_for_exit([(proc.pid, time.time())], time.time() + 1)) == {proc.pid, child}
        # an actor that started before this process was created: the pid now names another process
        assert wait_for_exit([(proc.pid, time.time() - 3600)], time.time() + 30) == []
    finally:
        for pid in (child, proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.wait()


def test_samples_files_are_named_safely_whatever_the_model_label():
    """A model given in eval.models as a folder path or URL gets a plain file name, not a path under the
    eval dir; two labels that reduce to the same name get two files."""
    from distill_llm.evaluation.stage import samples_file

    assert samples_file("student (distilled)", {"teacher": {}, "student (distilled)": {}}) == \
        "samples-student_distilled.parquet"
    scored = {"/tmp/runs/a b/student": {}}
    assert samples_file("/tmp/runs/a b/student", scored) == "samples-tmp_runs_a_b_student.parquet"
    scored["/tmp/runs/a_b/student"] = {}
    assert samples_file("/tmp/runs/a_b/student", scored) == "samples-tmp_runs_a_b_student-2.parquet"
    assert "/" not in samples_file("s3://bucket/students/x", {"s3://bucket/students/x": {}})
