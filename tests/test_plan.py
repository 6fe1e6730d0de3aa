"""`distill-llm plan`: parameter counts against real models, the cost formulas by hand, every fit flag."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from distill_llm.config import ConfigError, load_config
from distill_llm.cluster.plan import (MODEL_TABLE, ModelShape, dense_param_count, lora_param_count, make_plan, model_shape,
                              with_mla_cache,
                              shape_from_config, shard_bytes_per_token)

QWEN7 = ModelShape(**MODEL_TABLE["Qwen/Qwen2.5-7B"], source="table")
QWEN15 = ModelShape(**MODEL_TABLE["Qwen/Qwen2.5-1.5B-Instruct"], source="table")
QWQ = ModelShape(**MODEL_TABLE["Qwen/QwQ-32B"], source="table")
R1 = ModelShape(**MODEL_TABLE["deepseek-ai/DeepSeek-R1"], source="table")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # hub ids fall back to the table at once instead of retrying


def cfg(*overrides: str):
    # data.num_prompts is set: its default (all prompts) cannot be counted for the built-in toy:train source
    return load_config(None, ["train.use_gpu=true", "data.num_prompts=256", *overrides])


def meta_numel(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["qwen2-7b", "llama-untied-bias", "qwen3-tied"])
def test_param_formula_equals_transformers(kind):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    small = dict(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=3,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    config = {
        "qwen2-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                        tie_word_embeddings=False, max_position_embeddings=131072),
        "llama-untied-bias": lambda: LlamaConfig(**small, attention_bias=True, mlp_bias=True,
                                                  tie_word_embeddings=False),
        "qwen3-tied": lambda: Qwen3Config(**small, head_dim=64, tie_word_embeddings=True),
    }[kind]()
    shape = shape_from_config(config, "test")
    assert dense_param_count(shape) == meta_numel(config)


def test_table_shapes_match_published_counts():
    # model cards: Qwen2.5-7B 7.61B, 1.5B 1.54B, QwQ-32B 32.5B (32.76B counting both embeddings)
    assert QWEN7.total == 7_615_616_512
    assert QWEN15.total == 1_543_714_304
    assert round(QWQ.total / 1e9, 2) == 32.76
    assert R1.total == 671e9 and R1.active == 37e9


def test_toy_teacher_count_matches_its_safetensors():
    import json
    import struct

    from distill_llm.toy import TEACHER_ASSET

    shape, source = model_shape("toy-teacher", None, False)
    assert "config.json" in source
    raw = (TEACHER_ASSET / "model.safetensors").read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    assert shape.total == sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def test_lora_count_equals_peft():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    shape = shape_from_config(config, "test")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
        assert lora_param_count(shape, 8, targets) == sum(p.numel() for p in peft.parameters() if p.requires_grad)
        model = peft.unload()


def test_hub_id_falls_back_to_table_offline_and_says_so():
    shape, source = model_shape("Qwen/Qwen2.5-7B-Instruct", None, False)
    assert shape.max_positions == 32768 and source.startswith("built-in table")
    none, why = model_shape("someone/unknown-model", None, False)
    assert none is None and "unavailable" in why


def test_token_bytes_and_gpu_hours_by_hand():
    common = ["data.num_prompts=1000", "generate.samples_per_prompt=4", "generate.max_new_tokens=1000",
              "plan.mean_completion_fraction=0.5", "plan.teacher_tokens_per_s=1000", "teacher.tensor_parallel_size=2",
              "teacher.replicas=4", "plan.shard_bytes_per_token=50", "train.epochs=2", "train.max_seq_len=4096",
              "plan.mean_prompt_tokens=200", "plan.train_mfu=0.35", "plan.price_per_gpu_hour=2"]
    c = cfg(*common, "student.lora=null")
    student = ModelShape(vocab=1000, hidden=100, intermediate=0, layers=0, heads=1, kv_heads=1, head_dim=0,
                         tied=True, max_positions=8192, params=10**9)
    p = make_plan(c, QWEN7, student).numbers
    assert p["teacher tokens"] == 1000 * 4 * 500
    assert p["shard bytes"] == 2_000_000 * 50
    assert p["teacher GPU-hours"] == pytest.approx(2_000_000 / 1000 / 3600 * 2)
    assert p["teacher wall hours"] == pytest.approx(2_000_000 / 1000 / 3600 / 4)
    assert p["train tokens"] == 4000 * 2 * 700
    full = 6 * 1e9 * 5_600_000 / (989e12 * 0.35) / 3600
    assert p["train GPU-hours"] == pytest.approx(full)
    assert p["cost"] == pytest.approx(2 * (p["teacher GPU-hours"] + full))
    assert p["student checkpoint"] == 2e9
    lora = make_plan(cfg(*common, "student.lora.r=8"), QWEN7, student).numbers
    assert lora["train GPU-hours"] == pytest.approx(full * 2 / 3)
    measured = make_plan(load_config(None, ["plan.mean_completion_tokens=123", "data.num_prompts=10"]), QWEN7, student)
    assert measured.numbers["teacher tokens"] == 1230


def test_shard_byte_formula():
    # vocab 256: 1 B per id; k=20 float16: 20 x (1 + 1.2) + 1 (id) + 1 (text); row 32 + 200 prompt x 2 over 500
    assert shard_bytes_per_token(20, "float16", 256, 200, 500) == pytest.approx(46 + 432 / 500)
    assert shard_bytes_per_token(0, "float16", 256, 0, 100) == pytest.approx(2 + 0.32)


def test_default_throughput_rule_of_thumb():
    p = make_plan(cfg("teacher.tensor_parallel_size=8"), QWQ, QWEN15).numbers
    assert p["teacher tokens/s/replica"] == pytest.approx(18_000 * 3.35 * 8 / (QWQ.total / 1e9))


def flags(c, teacher=QWQ, student=QWEN15) -> dict[str, str]:
    return {f.key: f.level for f in make_plan(c, teacher, student).flags}


def test_fitting_config_has_no_errors():
    p = make_plan(cfg("teacher.tensor_parallel_size=8", "teacher.max_model_len=32768"), QWQ, QWEN15)
    assert p.fits and not p.flags


@pytest.mark.parametrize("overrides, teacher, student, key", [
    (["plan.gpu_type=A100-40GB"], QWQ, QWEN15, "teacher.tensor_parallel_size"),  # 65 GB of weights on 36 GB
    (["teacher.tensor_parallel_size=8", "teacher.max_model_len=65536"], QWQ, QWEN15, "teacher.max_model_len"),
    (["teacher.tensor_parallel_size=8"], QWEN15, QWEN15, "teacher.tensor_parallel_size"),  # 12 heads
    (["teacher.tensor_parallel_size=3"], QWEN15, QWEN15, "teacher.tensor_parallel_size"),  # 2 KV heads
    (["plan.gpu_type=H200", "teacher.gpu_memory_utilization=0.5"], QWQ, QWEN15, "teacher.max_model_len"),  # KV
    (["teacher.pipeline_parallel_size=8"], replace(QWQ, layers=4), QWEN15, "teacher.pipeline_parallel_size"),
    (["generate.top_k_logprobs=200"], replace(QWQ, vocab=100), QWEN15, "generate.top_k_logprobs"),
    (["teacher.tensor_parallel_size=16"], R1, QWEN15, "teacher.tensor_parallel_size"),  # a TP group wider than a node
    (["teacher.tensor_parallel_size=8", "student.lora=null", "plan.gpu_type=A100-40GB"], QWQ, QWEN7,
     "student.lora"),  # 76 GB of full fine-tuning state on 40 GB
    (["teacher.tensor_parallel_size=8", "train.max_seq_len=65536"], QWQ, QWEN15, "train.max_seq_len"),
])
def test_each_cannot_fit_flag_fires(overrides, teacher, student, key):
    c = cfg(*overrides)
    assert flags(c, teacher, student).get(key) == "error"
    assert not make_plan(c, teacher, student).fits


def test_a_replica_across_nodes_fits_when_each_tp_group_fits_a_node():
    """DeepSeek-R1 on 8 x H100 80GB nodes: TP 8 x PP 2 spans two nodes (vLLM's Ray executor); TP 16 cannot."""
    wide = make_plan(cfg("teacher.tensor_parallel_size=8", "teacher.pipeline_parallel_size=2",
                         "teacher.max_model_len=8192"), R1, QWEN15)
    assert wide.fits, wide.flags
    assert wide.numbers["teacher nodes/replica"] == 2
    tp16 = [f for f in make_plan(cfg("teacher.tensor_parallel_size=16"), R1, QWEN15).flags
            if f.key == "teacher.tensor_parallel_size"]
    assert tp16 and tp16[0].level == "error" and "must sit on one node" in tp16[0].message
    odd = make_plan(cfg("teacher.tensor_parallel_size=3", "teacher.pipeline_parallel_size=4"), replace(QWQ, heads=3 * 8,
                    kv_heads=3), QWEN15)
    assert {f.key: f.level for f in odd.flags}.get("teacher.tensor_parallel_size") == "warning"


def test_warnings_do_not_fail_the_plan():
    c = cfg("teacher.tensor_parallel_size=8", "student.lora=null", "train.strategy=fsdp")  # 7B full FT: ~68 GB of 80
    p = make_plan(c, QWQ, QWEN7)
    assert p.fits and {f.key: f.level for f in p.flags} == {"student.gradient_checkpointing": "warning"}


def test_training_memory_per_strategy():
    """A 7.6B full fine-tune: 22 B/param under DDP (no 80 GB GPU holds it: use FSDP), 16 B/param / workers
    under FSDP plus two gathered layers; plan names the strategy that fits."""
    c = cfg("teacher.tensor_parallel_size=8", "student.lora=null", "train.num_workers=8")
    p = make_plan(c, QWQ, QWEN7)
    n, layers = QWEN7.total, QWEN7.layers
    assert p.numbers["train memory/GPU (ddp)"] == pytest.approx(22 * n)
    assert p.numbers["train memory/GPU (fsdp)"] == pytest.approx(16 * n / 8 + 24 * n / layers)
    assert {f.key: f.level for f in p.flags}.get("train.strategy") == "error" and not p.fits
    fsdp = make_plan(cfg("teacher.tensor_parallel_size=8", "student.lora=null", "train.num_workers=8",
                         "train.strategy=fsdp"), QWQ, QWEN7)
    assert fsdp.fits and fsdp.numbers["train memory/GPU"] == p.numbers["train memory/GPU (fsdp)"]


def test_gpu_table_and_custom_gpu():
    with pytest.raises(ConfigError, match="plan.gpu_type='B300'"):
        make_plan(cfg("plan.gpu_type=B300"), QWQ, QWEN15)
    p = make_plan(cfg("plan.gpu_type=B300", "plan.gpu_memory_gb=288", "plan.gpu_peak_tflops=2250"), QWQ, QWEN15)
    assert p.fits and p.numbers["teacher memory/replica"] == pytest.approx(288e9 * 0.9)


def test_prompt_count_from_parquet_or_a_flag(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"]}), tmp_path / "p.parquet")
    p = make_plan(cfg(f"data.prompts={tmp_path / 'p.parquet'}", "data.num_prompts=null"), QWQ, QWEN15)
    assert p.numbers["completions"] == 3
    bad = make_plan(cfg("data.prompts=prompts.jsonl", "data.num_prompts=null"), QWQ, QWEN15)
    assert {f.key for f in bad.flags} >= {"data.num_prompts"} and not bad.fits


def test_unsized_model_is_an_error_unless_given(capsys):
    from distill_llm.cli import main

    assert main(["plan", "teacher.model=someone/unknown-model", "data.num_prompts=10"]) == 3
    assert "plan.teacher_params_b" in capsys.readouterr().out
    assert main(["plan", "teacher.model=someone/unknown-model", "plan.teacher_params_b=7", "data.num_prompts=10",
                 "train.max_seq_len=512"]) == 0


def test_cli_prints_the_table_and_exits_3_when_it_cannot_fit(capsys):
    from distill_llm.cli import main

    fits = ["teacher.model=Qwen/QwQ-32B", "teacher.tensor_parallel_size=8", "student.model=Qwen/Qwen2.5-7B-Instruct",
            "train.use_gpu=true", "teacher.dtype=auto", "data.num_prompts=256",
            "train.alpha=0"]  # QwQ writes </think>, a token Qwen2.5 lacks: token-level KD would be refused
    assert main(["plan", *fits]) == 0
    out = capsys.readouterr().out
    assert "teacher GPU-hours" in out and "built-in table" in out and "plan: fits" in out
    assert main(["plan", *fits, "teacher.tensor_parallel_size=1", "teacher.dtype=float32"]) == 3  # 131 GB
    out = capsys.readouterr().out
    assert "ERROR: teacher.tensor_parallel_size" in out and "CANNOT RUN" in out
    assert main(["plan", "plan.gpu_typo=x"]) == 2


def test_hub_ids_with_dots_resolve():
    from distill_llm.paths import resolve_model

    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_model("weights/model.safetensors")


def test_quickstart_plans_from_local_config_json(capsys):
    from distill_llm.cli import main

    assert main(["plan", "configs/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert "config.json of" in out and "built-in toy-student-wide shape" in out and "WARNING" not in out


def test_mla_latent_cache_is_counted_on_every_tensor_parallel_rank():
    from transformers import DeepseekV3Config

    c = cfg("plan.gpu_type=H200", "teacher.tensor_parallel_size=8", "teacher.max_model_len=32768")
    budget = 8 * 141e9 * 0.9
    room = make_plan(c, R1, QWEN15).numbers["KV cache room"]
    # 61 layers x (512 + 64) latent values x 2 bytes, held whole by each of the 8 ranks
    assert room == pytest.approx((budget - 671e9) / (61 * 576 * 2 * 8 * 32768))
    assert 18 < room < 19
    # 62 GB left after the weights: 5.4 full-context sequences if the latent were split, 0.7 as vLLM stores it
    full = cfg("plan.gpu_type=H200", "teacher.tensor_parallel_size=8", "teacher.max_model_len=163840",
               "teacher.gpu_memory_utilization=0.65")
    assert flags(full, R1, QWEN15).get("teacher.max_model_len") == "error"
    # the latent read from an MLA config.json replaces whatever the table said
    conf = DeepseekV3Config(num_hidden_layers=61, kv_lora_rank=256, qk_rope_head_dim=64, max_position_embeddings=4096)
    shape = with_mla_cache(replace(R1, mla=False, kv_elems_per_token=None), conf)
    assert shape.mla and shape.kv_elems_per_replica(8) == 61 * 320 * 8 and shape.max_positions == 4096
    assert with_mla_cache(QWEN7, QWEN7) == QWEN7  # a dense config has no latent


def test_kv_heads_fewer_than_tensor_parallel_ranks_are_replicated():
    # Qwen2.5-7B has 4 KV heads: at TP 8 each rank still holds one, so the replica stores 8 heads per layer
    assert QWEN7.kv_elems_per_replica(2) == 2 * 28 * 128 * 4
    assert QWEN7.kv_elems_per_replica(8) == 2 * 28 * 128 * 8


def test_an_unreachable_hub_is_detected_at_once_and_said_once(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with socket.socket() as s:  # a port nothing listens on: the hub's connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(root)}
    env.pop("HF_HUB_OFFLINE", None)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "distill_llm.cli", "plan", str(root / "configs" / "quickstart.yaml"),
                           "teacher.model=Qwen/Qwen2.5-7B-Instruct", "student.model=Qwen/Qwen2.5-1.5B-Instruct"],
                          env=env, capture_output=True, text=True, timeout=45, cwd=root)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert out.count("unreachable") == 1 and f"127.0.0.1:{port} unreachable" in proc.stdout
    assert "retry" not in out.lower() and "built-in table" in proc.stdout
    assert elapsed < 30, f"{elapsed:.0f}s"


def test_rounds_are_estimated_per_round_by_hand():
    """A rounds config adds, per round, the student's generation, the teacher's prefill and the training."""
    c = cfg("rounds.n=3", "rounds.prompts_per_round=100", "rounds.samples_per_prompt=4",
            "generate.max_new_tokens=1000", "plan.mean_completion_fraction=0.5", "plan.mean_prompt_tokens=200",
            "plan.train_mfu=0.5", "train.max_steps=10", "train.batch_size=8", "train.num_workers=2",
            "train.max_seq_len=4096", "student.lora=null")
    student = ModelShape(vocab=1000, hidden=100, intermediate=0, layers=0, heads=1, kv_heads=1, head_dim=0,
                         tied=True, max_positions=8192, params=10**9)
    p = make_plan(c, QWEN7, student).numbers
    assert p["round: student samples"] == 400 and p["round: student tokens generated"] == 400 * 500
    gen = 400 * 500 / (18_000 * 3.35 / 1.0) / 3600  # decode rule on one H100 (3.35 TB/s) for 1B params
    assert p["round: student generation GPU-hours"] == pytest.approx(gen)
    assert p["round: teacher tokens scored"] == 400 * 700
    prefill = 2 * QWEN7.active * 400 * 700 / (989e12 * 0.5) / 3600
    assert p["round: teacher prefill GPU-hours"] == pytest.approx(prefill)
    assert p["round: train tokens"] == 10 * 8 * 2 * 700
    train = 6 * 1e9 * 10 * 8 * 2 * 700 / (989e12 * 0.5) / 3600
    assert p["round: train GPU-hours"] == pytest.approx(train)
    assert p["rounds GPU-hours"] == pytest.approx(3 * (gen + prefill + train))
    assert p["total GPU-hours"] == pytest.approx(p["teacher GPU-hours"] + p["train GPU-hours"] + p["rounds GPU-hours"])
    assert "rounds GPU-hours" not in make_plan(cfg(), QWEN7, student).numbers
