"""The toy world shows distillation working: distilled students learn the teacher's format and answers.

Measured on 2 CPU cores with the quickstart settings: teacher 100%, untrained student 0% (it never stops,
96 tokens). The distilled students' pass@1 is NOT stable from run to run: which worker gets which shard
blocks each epoch (Ray Data's dynamic split) and train.seed move it a lot. On 2026-11-23, with the prompts
in one block, KD (alpha 0.5, T 2) gave 80.5% and sequence-level (alpha 0) 31.5%; on 2026-11-24, with the
prompts split into engine-sized blocks, the same test gave KD 44.5% and sequence-level 81.5%, the
quickstart gave KD 93.0%, and train.seed=1 gave KD 6.0%. So this test asserts what held in every run (the
format is learnt: completion lengths match the teacher's; both students beat the untrained one) and prints
the KD-vs-sequence comparison instead of asserting an ordering that the toy cannot support.
"""

from pathlib import Path

import pytest

from distill_llm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_kd_student_beats_sequence_level_and_untrained(ray_session, tmp_path):
    from distill_llm.evaluate import evaluate
    from distill_llm.generation import generate
    from distill_llm.training import train

    def config(name, *extra):
        return load_config(ROOT / "configs" / "quickstart.yaml", [
            f"output.dir={tmp_path / 'shards'}", f"output.student_dir={tmp_path / name}",
            f"output.eval_dir={tmp_path / name / 'eval'}", f"train.storage_path={tmp_path / 'train'}", *extra])

    kd_cfg = config("kd")
    generate(kd_cfg)
    kd_student = train(kd_cfg)
    seq_cfg = config("seq", "train.alpha=0")
    seq_student = train(seq_cfg)
    seq_cfg.eval.include_teacher = seq_cfg.eval.include_base_student = False
    results = evaluate(kd_cfg, student=kd_student)
    seq_result = evaluate(seq_cfg, student=seq_student)["student (distilled)"]
    teacher, kd_result, untrained = (results[k] for k in ("teacher", "student (distilled)", "student (before)"))
    print(f"teacher {teacher['pass@1']:.3f} kd {kd_result['pass@1']:.3f} seq {seq_result['pass@1']:.3f} "
          f"untrained {untrained['pass@1']:.3f}")
    assert teacher["pass@1"] >= 0.95
    assert untrained["pass@1"] <= 0.05 and untrained["mean_completion_tokens"] > 2 * teacher["mean_completion_tokens"]
    for student in (kd_result, seq_result):
        # the untrained student runs to max_new_tokens; a distilled one stops where the teacher does
        assert abs(student["mean_completion_tokens"] - teacher["mean_completion_tokens"]) \
            <= 0.15 * teacher["mean_completion_tokens"]
        assert student["pass@1"] > untrained["pass@1"]
