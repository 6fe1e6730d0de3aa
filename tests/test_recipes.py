"""The recipes in configs/: their headers state what `distill-llm plan` computes, and each one runs.

The unit tests compare each recipe's header with an offline plan. The slow test runs every recipe for
real in a shrunken form: same keys and code paths (checker, filters, strategy, LoRA or full fine-tuning,
packing, dtype, system prompt), with the toy teacher and student, a handful of prompts from a local
Parquet file, a few steps and CPU workers.
"""

from __future__ import annotations

import json
import re
import time
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


# ---------------------------------------------------------------- every recipe runs, shrunk

# What a shrunk recipe changes; every other key stays as the recipe has it. The models become the toy
# teacher and student, the prompts a local Parquet file with the recipes' `prompt`/`answer` columns,
# and the GPU and cluster settings a CPU's.
SHRINK = [
    "teacher.model=toy-teacher", "teacher.use_gpu=false", "teacher.dtype=float32", "teacher.tensor_parallel_size=1",
    "teacher.pipeline_parallel_size=1", "teacher.replicas=1", "teacher.max_model_len=320",
    "teacher.cpu_kv_cache_gb=0.5",
    "data.num_prompts=12", "generate.max_new_tokens=96",
    "student.model=toy-student",
    "train.max_steps=2", "train.max_seq_len=512", "train.use_gpu=false", "train.cpus_per_worker=1",
    "train.log_every=1",
]  # and no custom Ray resources (teacher.resources, train.resources_per_worker), set in shrink()
# Shard sets are shared where the shrunk teacher settings agree except these, which only the teacher
# stage reads (the train stage takes the system prompt from the shards' run record), and the engine's
# capacity settings.
SHARED_ACROSS = ("system_prompt", "rows_per_shard", "logprobs_dtype")
ENGINE_CAPACITY = {"gpu_memory_utilization", "max_num_seqs", "batch_size"}


def shrink(path: Path, tmp: Path, prompts: Path):
    """The recipe at ``path`` with the SHRINK overrides, CPU workers (2 only where FSDP shards) and ``tmp`` outputs."""
    workers = 2 if load_config(path).train.strategy == "fsdp" else 1
    out = tmp / path.stem
    cfg = load_config(path, SHRINK + [
        f"data.prompts={prompts}", f"train.num_workers={workers}", f"output.dir={out}/shards",
        f"output.student_dir={out}/student", f"output.eval_dir={out}/eval", f"train.storage_path={out}/train"])
    cfg.teacher.resources, cfg.train.resources_per_worker = {}, {}  # an override merges into a mapping
    return cfg


def teacher_key(cfg) -> str:
    """What decides the shards a shrunk recipe trains on (SHARED_ACROSS left out)."""
    data = cfg.data.model_dump(exclude={"system_prompt"})
    return json.dumps([cfg.teacher.model_dump(exclude=ENGINE_CAPACITY), data, cfg.generate.model_dump(exclude=set(SHARED_ACROSS))],
                      sort_keys=True, default=str)


# Training settings that are sizes, not code paths: recipes that differ only in these (after shrinking)
# train the same way, so one of them is trained for all.
TRAIN_SIZES = {"lr", "warmup_steps", "epochs", "max_steps", "batch_size", "grad_accum", "storage_path",
               "checkpoint_every", "keep_checkpoints", "cache_max_gb", "max_failures"}
# The student's sizes: max_position_embeddings is a context length, one value in the loaded config
# (test_max_position_embeddings_is_applied_at_load_and_saved). A recipe that sets it is trained before the
# recipes that share its run (trained_first), so the slow test checks it in that recipe's export.
STUDENT_SIZES = {"max_position_embeddings", "export_memory_gb"}


def train_key(cfg) -> str:
    """What decides how a shrunk recipe trains: every train and student key but sizes and the model's name."""
    train = cfg.train.model_dump(exclude=TRAIN_SIZES)
    student = cfg.student.model_dump(exclude={"model", "revision"} | STUDENT_SIZES)
    return json.dumps([teacher_key(cfg), train, student], sort_keys=True, default=str)


def trained_first(paths: list[Path]) -> list[Path]:
    """``paths`` with the recipes that set student.max_position_embeddings first: of recipes sharing a run,
    one of those is the one trained."""
    return sorted(paths, key=lambda p: load_config(p).student.max_position_embeddings is None)


def test_recipes_that_train_alike_share_one_run():
    """The slow test trains one recipe per training code path: the three FSDP recipes that differ only in sizes
    (Math-1.5B with its context raised, 7B on 8 GPUs, 32B on 16) share one, trained as the Math-1.5B recipe
    (the one that raises the context), as do the two LoRA recipes into Qwen2.5-7B that differ only in
    their teacher; nothing else does (a new recipe gets its own run)."""
    keys = {}
    for path in trained_first(RECIPES):
        keys.setdefault(train_key(shrink(path, Path("/tmp/x"), Path("/tmp/p.parquet"))), []).append(path.name)
    shared = [names for names in keys.values() if len(names) > 1]
    assert sorted(shared) == [["r1-671b-qwen7b-lora.yaml", "r1distill-32b-qwen7b-lora.yaml"],
                              ["r1distill-math1.5b-fsdp.yaml", "r1distill-qwen32b-fsdp-2nodes.yaml",
                               "r1distill-qwen7b-fsdp.yaml"]]


@pytest.mark.slow
def test_every_recipe_runs_shrunk(ray_session, tmp_path):
    """generate -> train for real for every recipe in configs/, shrunk; one shard set per distinct teacher
    setting, one training run per distinct training path (train_key). Checks the export is the recipe's
    kind (merged or adapter, full or LoRA) in its dtype, and a raised context (student.max_position_embeddings)
    in the export's config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distill_llm.student.stage import train
    from distill_llm.teacher.stage import generate
    from distill_llm.toy import make_problems

    rows = make_problems("train", 12)
    prompts = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": [r["prompt"] for r in rows], "answer": [r["answer"] for r in rows]}), prompts)
    # Each shard set is generated by the first recipe (in file order) of its teacher setting: the recipes
    # without a system prompt come first, and the toy teacher, trained without one, gets no answer right
    # under the R1 recipes' system prompt (train.filter_correct would leave nothing to train on).
    generators: dict[str, Path] = {}
    for path in RECIPES:
        generators.setdefault(teacher_key(shrink(path, tmp_path, prompts)), path)
    shards: dict[str, str] = {}
    trained: dict[str, str] = {}
    timings = {}
    for path in trained_first(RECIPES):
        start = time.monotonic()
        cfg = shrink(path, tmp_path, prompts)
        if train_key(cfg) in trained:
            timings[path.name] = f"as {trained[train_key(cfg)]}"
            continue
        trained[train_key(cfg)] = path.name
        key = teacher_key(cfg)
        if key not in shards:
            gen_cfg = shrink(generators[key], tmp_path, prompts)
            manifest = generate(gen_cfg)
            assert manifest["totals"]["rows"] > 0
            shards[key] = gen_cfg.output.dir
        cfg.data.shards = [shards[key]]
        out = Path(train(cfg))
        info = json.loads((out / "distill_llm.json").read_text())
        assert info["steps"] == 2, path.name
        adapter_only = cfg.student.lora is not None and not cfg.student.merge_lora
        assert (out / "adapter_config.json").is_file() == adapter_only, path.name
        if not adapter_only:
            assert (out / "model.safetensors").is_file(), path.name
        conf = json.loads((out / "config.json").read_text()) if not adapter_only else {}
        if cfg.student.max_position_embeddings:
            assert conf["max_position_embeddings"] == cfg.student.max_position_embeddings, path.name
        timings[path.name] = round(time.monotonic() - start, 1)
    print(f"recipes shrunk: {len(shards)} shard sets, {len(trained)} trainings for {len(RECIPES)} recipes; "
          f"seconds {timings}")
