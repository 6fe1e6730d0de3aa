"""Answer checkers: verdicts on the main thread, off it (where Ray Data runs an engine actor's batches),
and inside the real teacher stage's engine actor."""

import threading

import pyarrow.parquet as pq
import pytest

from distill_llm.evaluation.checkers import check, get_checker

CASES = [("<think>7+5=12</think>632", "632", True), ("<think></think>\\boxed{\\frac{1}{2}}", "0.5", True),
         ("<think></think>631", "632", False), ("no answer at all", "632", False), ("<think></think>x", "\\frac{", False)]


def _off_main_thread(fn, *args):
    out = {}
    worker = threading.Thread(target=lambda: out.update(value=fn(*args)))
    worker.start()
    worker.join()
    return out["value"]


def test_math_checker_gives_the_same_verdicts_off_the_main_thread():
    """math-verify times out with signal.alarm, which only works on a main thread: off it every check
    came back False (and every R1 recipe trained on nothing)."""
    math = get_checker("math")
    on_main = [check(math, c, a) for c, a, _ in CASES]
    assert on_main == [want for _, _, want in CASES]
    assert _off_main_thread(lambda: [check(math, c, a) for c, a, _ in CASES]) == on_main


def test_unknown_checker_names_the_key_and_the_choices():
    from distill_llm.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.checker: unknown checker 'maths'; choose one of .*'math'.*'toy'"):
        get_checker("maths")


@pytest.mark.slow
def test_math_checker_inside_the_teacher_stage(rescored):
    """The toy answers are integers, so the math checker must agree with the toy checker on every sample.

    The engine run is conftest.py's ``rescored`` (data.checker=math, 8 prompts x 2 samples), whose top-k
    test_generate.py checks. Evaluation grades its samples in the same engine actor (TeacherEngine._row, with
    ``data.checker``), and the evaluation tests pass through it with the toy checker, so one engine run covers
    both stages."""
    from distill_llm.corpus.shards import read_shards

    cfg, _ = rescored
    assert cfg.data.checker == "math"
    rows = read_shards(cfg.output.dir, columns=["completion_text", "answer", "answer_correct"]).to_pylist()
    assert len(rows) == 16
    toy = get_checker("toy")
    assert [r["answer_correct"] for r in rows] == [check(toy, r["completion_text"], r["answer"]) for r in rows]
    assert sum(r["answer_correct"] for r in rows) >= 13, "the toy teacher solves nearly every problem"
