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
