"""The toy world shows distillation working: the top-k KD student learns most of the teacher's skill and
stops where the teacher does (the untrained student solves nothing: bench/quickstart.py's table, README).

Sequence-level KD alone against top-k KD, and the spread over seeds, are measured by bench/quickstart.py
(bench/RESULTS.md), not here: a second 1,000-step student would double this test's minutes in CI.

A cached corpus trains in one order fixed by train.seed and the rows themselves (sorted by sample_id, then
shuffled in blocks; student.stage.worker_datasets), so one config trains one student; the floor below still
leaves room for the spread over seeds (README "Two commands", bench/RESULTS.md).
"""

from pathlib import Path

import pytest

from distill_llm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_kd_student_learns_most_of_the_teacher(ray_session, tmp_path):
    from distill_llm.evaluation.stage import evaluate
    from distill_llm.teacher.stage import generate
    from distill_llm.student.stage import train

    def config(name, *extra):
        return load_config(ROOT / "configs" / "quickstart.yaml", [
            f"output.dir={tmp_path / 'shards'}", f"output.student_dir={tmp_path / name}",
            f"output.eval_dir={tmp_path / name / 'eval'}", f"train.storage_path={tmp_path / 'train'}", *extra])

    # The untrained student is not scored here (eval.include_base_student=false): its 200 prompts run to
    # max_new_tokens in an engine of its own, a minute of CI for a row the README command prints anyway.
    kd_cfg = config("kd", "eval.include_base_student=false")
    generate(kd_cfg)
    kd_student = train(kd_cfg)
    results = evaluate(kd_cfg, student=kd_student)
    assert list(results) == ["teacher", "student (distilled)"]
    teacher, kd_result = results["teacher"], results["student (distilled)"]
    print(f"teacher {teacher['pass@1']:.3f} kd {kd_result['pass@1']:.3f}")
    assert teacher["pass@1"] >= 0.95
    # The floor sits below the 90% the quickstart reaches on seed 0 (98%): over seeds 0-2 it spans 83.5-98%
    # (bench/RESULTS.md), and another CPU's float order is another draw from that spread.
    assert kd_result["pass@1"] >= 0.8 * teacher["pass@1"], "the KD student learns most of the teacher (issue 13)"
    # a distilled student stops where the teacher does (an untrained one runs to max_new_tokens)
    assert abs(kd_result["mean_completion_tokens"] - teacher["mean_completion_tokens"]) \
        <= 0.15 * teacher["mean_completion_tokens"]
