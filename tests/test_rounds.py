"""`distill-llm rounds`: config refusals (fast) and one real round on the toy world, killed between its stages
and resumed (slow: vLLM serves the student, then scores with the teacher; Ray Train trains the student)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_config
from distill_llm.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def rounds_config(tmp: Path, **sections):
    """A one-round config: 4 prompts x 2 student samples of at most 24 tokens, 3 training steps."""
    base = {"rounds": {"n": 1, "prompts_per_round": 4, "samples_per_prompt": 2, "dir": tmp / "rounds"},
            "train": {"alpha": 1.0, "divergence": "reverse_kl", "max_steps": 3, "num_workers": 1, "batch_size": 4,
                      "log_every": 1, "cache_max_gb": 0},
            "generate": {"max_new_tokens": 24}, "data": {"num_prompts": 16}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return small_config(tmp, **base)


@pytest.mark.parametrize("sections, message", [
    ({"train": {"alpha": 0}}, "train.alpha=0 would train the student on its own samples"),
    ({"teacher": {"model": "round:1"}}, "teacher.model=round:1"),
    ({"teacher": {"model": "round:x"}}, "teacher.model=round:x: expected round:N"),
    ({"student": {"lora": "{r: 4}", "merge_lora": "false"}}, "set student.merge_lora=true"),
    ({"rounds": {"dir": "s3://bucket/rounds"}}, "rounds.dir=s3://bucket/rounds"),
    ({"rounds": {"n": 5}}, "rounds.n=5 x rounds.prompts_per_round=4 = 20 prompts"),
])
def test_rounds_refuse_configs_that_cannot_run(tmp_path, sections, message):
    from distill_llm.rounds.stage import check_rounds

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_rounds(rounds_config(tmp_path, **sections))


def test_rounds_need_a_rounds_section(tmp_path):
    from distill_llm.rounds.stage import check_rounds

    with pytest.raises(ConfigError, match="needs a rounds: section"):
        check_rounds(small_config(tmp_path))


@pytest.mark.parametrize("key, value, message", [
    ("rounds.n", "0", "rounds.n: Input should be greater than or equal to 1"),
    ("rounds.prompt_per_round", "2", "rounds.prompt_per_round: unknown key (did you mean rounds.prompts_per_round?)"),
])
def test_rounds_keys_are_validated_by_name(key, value, message):
    from distill_llm.config import load_config

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "quickstart.yaml", [f"{key}={value}"])
    assert message in str(err.value)


def test_prompts_are_drawn_without_replacement_across_rounds(tmp_path):
    from distill_llm.rounds.stage import draw

    cfg = rounds_config(tmp_path, rounds={"n": 3, "prompts_per_round": 5})
    prompts = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": str(i)}], "answer": None}
               for i in range(16)]
    drawn = [[p["messages"][0]["content"] for p in draw(prompts, cfg, r)] for r in (1, 2, 3)]
    flat = [x for d in drawn for x in d]
    assert len(flat) == 15 and len(set(flat)) == 15
    assert drawn == [[p["messages"][0]["content"] for p in draw(prompts, cfg, r)] for r in (1, 2, 3)]  # seeded
    other = rounds_config(tmp_path, rounds={"n": 3, "prompts_per_round": 5, "seed": 1})
    assert [p["messages"] for p in draw(prompts, other, 1)] != [p["messages"] for p in draw(prompts, cfg, 1)]
    with pytest.raises(ConfigError, match="has 16 usable prompts"):
        draw(prompts, rounds_config(tmp_path, rounds={"n": 4, "prompts_per_round": 5}, data={"num_prompts": 64}), 1)
