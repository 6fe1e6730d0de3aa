"""The student stage for real: Ray Train with 2 CPU workers, peft LoRA, checkpoints, export, vLLM evaluation."""

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from distill_llm.config import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(generated, tmp_path_factory):
    from distill_llm.student.stage import train

    cfg, _ = generated
    tmp = tmp_path_factory.mktemp("lora")
    cfg = cfg.model_copy(deep=True)
    cfg.output.student_dir = str(tmp / "student")
    cfg.train.storage_path = str(tmp / "train")
    cfg.student.lora = {"r": 8, "alpha": 16}
    cfg.train.max_steps, cfg.train.checkpoint_every, cfg.train.keep_checkpoints = 6, 2, 2
    cfg.train.batch_size, cfg.train.log_every = 8, 2
    return cfg, train(cfg)


def test_lora_student_is_exported_as_a_hf_folder(trained):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, out = trained
    out = Path(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
                 "training_curves.png", "adapter/adapter_config.json", "distill_llm.json"):
        assert (out / name).is_file(), name
    assert list((out / "logs").glob("events.out.tfevents.*")), "TensorBoard events"
    info = json.loads((out / "distill_llm.json").read_text())
    assert info["steps"] == 6 and info["lora"]["r"] == 8 and info["shard_fingerprint"]
    card = (out / "README.md").read_text()
    assert "toy-teacher" in card and info["shard_fingerprint"] in card
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters()), "LoRA is merged"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    base = AutoModelForCausalLM.from_pretrained(_base_path())
    changed = any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
    assert changed, "training changed the weights"


def _base_path():
    from distill_llm.paths import resolve_model

    return resolve_model("toy-student")


def test_checkpoints_are_kept_and_metrics_logged(trained):
    cfg, _ = trained
    runs = list(Path(cfg.train.storage_path).iterdir())
    assert len(runs) == 1
    ckpts = sorted(p.name for p in runs[0].glob("checkpoint_step*"))
    assert ckpts == ["checkpoint_step0000004", "checkpoint_step0000006"], "retention keeps the last 2"
    metrics = [json.loads(l) for l in (runs[0] / ckpts[-1] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["kd"] > 0 and m["ce"] > 0 for m in metrics)


def _losses(storage_path: str) -> list[float]:
    (metrics,) = Path(storage_path).glob("*/checkpoint_step0000006/metrics.jsonl")
    return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]


def test_same_config_trains_the_same_student(trained, tmp_path):
    """A cached corpus is split per worker by the seed, in block order: a second run repeats every loss."""
    from distill_llm.student.stage import train

    cfg, _ = trained
    again = cfg.model_copy(deep=True)
    again.output.student_dir, again.train.storage_path = str(tmp_path / "student"), str(tmp_path / "train")
    train(again)
    assert _losses(again.train.storage_path) == _losses(cfg.train.storage_path)


def test_each_epoch_is_reshuffled_and_a_step_takes_the_same_rows_on_any_worker_count(ray_session):
    """A cached corpus is one stream of every epoch: each epoch every row once, in its own seeded order, the
    same whatever order or files the rows came in; a step's rows are the same for every layout of 16 rows a
    step (workers x batch x grad_accum), from the start or resumed."""
    import random

    import ray

    from distill_llm.student.loop import step_rows
    from distill_llm.student.stage import ordered_data, worker_datasets

    ids = [f"{i:04d}-0" for i in range(96)]

    def stream(order: list[str], parts: int) -> list[pa.Table]:
        table = pa.table({"sample_id": order})
        cut = [table.slice(i * len(order) // parts, len(order) // parts) for i in range(parts)]
        with ordered_data():
            datasets, _ = worker_datasets(ray.data.from_arrow(cut).materialize(), epochs=3, seed=0)
            return list(datasets["train"].iter_batches(batch_size=None, batch_format="pyarrow"))

    blocks = stream(ids, 1)
    rows = [r for b in blocks for r in b.column("sample_id").to_pylist()]
    epochs = [rows[e * 96:(e + 1) * 96] for e in range(3)]
    assert all(sorted(e) == ids for e in epochs), "every row once an epoch"
    assert epochs[0] != epochs[1] != epochs[2], "each epoch in its own order"
    shuffled = random.Random(1).sample(ids, len(ids))
    assert [r for b in stream(shuffled, 4) for r in b.column("sample_id").to_pylist()] == rows, \
        "the order does not depend on how the shards laid the rows out"

    def steps(world: int, batch_size: int, grad_accum: int, start: int = 0) -> list[list[str]]:
        t = SimpleNamespace(batch_size=batch_size, grad_accum=grad_accum)
        out: dict[int, list[str]] = {}
        for rank in range(world):
            for step, tables in step_rows(iter(blocks), rank, world, t, start):
                assert [x.num_rows for x in tables] == [batch_size] * grad_accum
                out.setdefault(step, []).extend(r for x in tables for r in x.column("sample_id").to_pylist())
        return [out[s] for s in sorted(out)]

    reference = steps(2, 8, 1)
    assert len(reference) == 18 and reference[0] == rows[:16] and reference[-1] == rows[-16:]
    for layout in [(1, 8, 2), (1, 16, 1), (4, 2, 2)]:
        assert steps(*layout) == reference, layout
    assert steps(1, 4, 4, start=5) == reference[5:], "resumed at step 5: the same rows from step 6 on"


def test_rerun_on_another_worker_count_resumes_from_the_finished_checkpoint(trained):
    from distill_llm.student.stage import train

    cfg, out = trained
    fewer = cfg.model_copy(deep=True)  # on 1 worker with the same rows per step: the same run
    fewer.train.num_workers, fewer.train.grad_accum = 1, cfg.train.grad_accum * cfg.train.num_workers
    again = train(fewer)
    info = json.loads((Path(again) / "distill_llm.json").read_text())
    assert info["steps"] == 6, "same run name: restored at step 6, nothing more to do"
    assert len([p for p in Path(cfg.train.storage_path).iterdir() if p.is_dir()]) == 1, "no second run was started"


def test_vllm_serves_the_student_for_evaluation(trained):
    from distill_llm.evaluation.stage import evaluate

    cfg, out = trained
    cfg = cfg.model_copy(deep=True)
    cfg.eval.include_teacher = cfg.eval.include_base_student = False
    cfg.eval.num_prompts = 16
    results = evaluate(cfg, student=out)
    r = results["student (distilled)"]
    assert r["prompts"] == 16 and 0.0 <= r["pass@1"] <= 1.0 and r["mean_completion_tokens"] > 0
    assert (Path(cfg.eval_dir) / "report.md").is_file()
    assert "## Evaluation" in (Path(out) / "README.md").read_text()


def _shard_copy(src: str, dst: Path, change=None) -> str:
    """A copy of a shard set, optionally with its rows changed (the manifest rewritten to match)."""
    from distill_llm.corpus.shards import write_manifest

    shutil.copytree(src, dst)
    if change:
        for commit in (dst / "_commits").glob("*.json"):
            rec = json.loads(commit.read_text())
            path = dst / rec["file"]
            table = change(pq.read_table(path))
            pq.write_table(table, path)
            rec["bytes"], rec["sha256"] = path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()
            rec["correct"] = table.column("answer_correct").to_pylist().count(True)  # the manifest's count
            commit.write_text(json.dumps(rec))
        write_manifest(str(dst))
    return str(dst)


def test_empty_after_filtering_is_an_error(generated, tmp_path):
    from distill_llm.student.stage import train

    cfg, _ = generated
    shards = _shard_copy(cfg.output.dir, tmp_path / "wrong",
                         lambda t: t.set_column(t.schema.get_field_index("answer_correct"), "answer_correct",
                                                pa.array([False] * t.num_rows)))
    bad = small_config(tmp_path, data={"shards": shards}, train={"filter_correct": "true"})
    with pytest.raises(ConfigError, match="empty after train.filter_correct"):
        train(bad)


@pytest.mark.parametrize("overrides, message", [
    ({"student": {"model": "./no/such/student"}}, "model path ./no/such/student does not exist"),
    ({"student": {"lora": "{r: 4, target_modules: [nonexistent_proj]}"}}, "matched no layer"),
])
def test_bad_student_settings_fail_before_training(generated, tmp_path, overrides, message):
    from distill_llm.student.stage import train

    cfg, _ = generated
    with pytest.raises(ConfigError, match=message):
        train(small_config(tmp_path, data={"shards": cfg.output.dir}, **overrides))


def test_shards_without_manifest_are_refused(generated, tmp_path):
    from distill_llm.student.stage import train

    cfg, _ = generated
    shards = _shard_copy(cfg.output.dir, tmp_path / "partial")
    (Path(shards) / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="no manifest.json"):
        train(small_config(tmp_path, data={"shards": shards}))


def test_token_level_kd_refuses_a_student_with_other_token_ids(generated, tmp_path):
    from distill_llm.paths import resolve_model
    from distill_llm.student.stage import check_tokenizers
    from distill_llm.tokenizers import load_tokenizer

    cfg, manifest = generated
    student = tmp_path / "other-student"
    shutil.copytree(resolve_model("toy-student"), student)
    tok = json.loads((student / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (student / "tokenizer.json").write_text(json.dumps(tok))
    other = load_tokenizer(str(student))
    with pytest.raises(ConfigError, match="token 'a' is id"):
        check_tokenizers(small_config(tmp_path), manifest["run"], other)
    assert check_tokenizers(small_config(tmp_path, train={"alpha": 0}), manifest["run"], other) is True
    assert check_tokenizers(small_config(tmp_path), manifest["run"], load_tokenizer(resolve_model("toy-student"))) is False


def _bf16_student(tmp_path) -> str:
    """The toy student saved in bfloat16 (its config.json says so), as hub checkpoints of real students are."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "bf16-student"
    AutoModelForCausalLM.from_pretrained(_base_path(), dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(_base_path()).save_pretrained(out)
    return str(out)


def _safetensors_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {str(st.get_slice(k).get_dtype()) for k in st.keys()}
    return dtypes


def test_bf16_student_is_exported_in_bf16_by_a_ray_task(generated, tmp_path):
    """Full fine-tuning of a bf16 base (trained in fp32 on CPU) exports bf16 weights, from a process not the driver.

    The corpus streams (train.cache_max_gb=0), so the run also goes through the row-shuffled streaming path."""
    import os

    from transformers import AutoConfig

    from distill_llm.student.stage import train

    cfg, _ = generated
    base = _bf16_student(tmp_path)
    assert _safetensors_dtypes(Path(base)) == {"BF16"}
    small = small_config(tmp_path, data={"shards": cfg.output.dir}, student={"model": base, "lora": "null"},
                         train={"max_steps": 2, "num_workers": 1, "batch_size": 8, "log_every": 1, "cache_max_gb": 0})
    out = Path(train(small))
    assert _safetensors_dtypes(out) == {"BF16"}, "the student's own dtype, not fp32"
    assert str(AutoConfig.from_pretrained(out).dtype).removeprefix("torch.") == "bfloat16"
    info = json.loads((out / "distill_llm.json").read_text())
    assert info["export"]["dtype"] == "bfloat16" and info["export"]["format"] == "merged"
    assert info["export"]["pid"] != os.getpid(), "the export ran in a Ray worker, not in the driver"
    assert "merged weights in bfloat16" in (out / "README.md").read_text()


def _last_checkpoint(cfg) -> Path:
    return sorted(Path(cfg.train.storage_path).glob("*/checkpoint_step*"))[-1]


def test_unmerged_lora_is_exported_as_an_adapter_folder_that_loads(trained, tmp_path):
    """student.merge_lora=false: an adapter folder naming its base, which transformers (with peft) loads
    to the same model as the merged export of the same checkpoint, and which resolve_model accepts."""
    import ray.train
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distill_llm.corpus.shards import read_manifest
    from distill_llm.paths import resolve_model
    from distill_llm.student.stage import export_student

    cfg, merged = trained
    unmerged = cfg.model_copy(deep=True)
    unmerged.student.merge_lora = False
    unmerged.output.student_dir = str(tmp_path / "adapter-student")
    manifests = {cfg.output.dir: read_manifest(cfg.output.dir)}
    ckpt = ray.train.Checkpoint.from_directory(str(_last_checkpoint(cfg)))
    out = Path(export_student(unmerged, ckpt, _base_path(), manifests[cfg.output.dir]["run"], manifests, "run"))

    assert not (out / "config.json").exists() and (out / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == _base_path()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    info = json.loads((out / "distill_llm.json").read_text())
    assert info["export"]["format"] == "adapter" and info["steps"] == 6
    assert "a LoRA adapter (not merged)" in (out / "README.md").read_text()
    assert resolve_model(str(out)) == str(out), "eval and run accept the adapter folder"

    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    want = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    auto = AutoModelForCausalLM.from_pretrained(out).eval()  # peft installed: base + adapter from the folder
    assert hasattr(auto, "peft_config"), "transformers attached the adapter"
    torch.testing.assert_close(auto(ids).logits, want, rtol=1e-4, atol=1e-4)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(_base_path()), str(out)).eval()
    torch.testing.assert_close(peft(ids).logits, want, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def generated_with_system_prompt(ray_session, tmp_path_factory):
    """A small real shard set whose prompts the teacher stage built with data.system_prompt."""
    from distill_llm.teacher.stage import generate

    tmp = tmp_path_factory.mktemp("gen-system")
    cfg = small_config(tmp, data={"num_prompts": 8, "system_prompt": "Add the numbers, column by column."},
                       generate={"samples_per_prompt": 1, "max_new_tokens": 64})
    return cfg, generate(cfg)


def test_retokenised_prompts_carry_the_system_prompt(generated_with_system_prompt, tmp_path):
    """A student with another vocabulary (train.alpha=0) rebuilds prompts from messages: with the run's system
    prompt they are the teacher's prompt ids, so it trains exactly like a student reading the stored ids."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from distill_llm.student.stage import check_tokenizers, train
    from distill_llm.tokenizers import load_tokenizer

    cfg, manifest = generated_with_system_prompt
    assert manifest["run"]["prompts"]["system_prompt"] == cfg.data.system_prompt
    other = tmp_path / "other-vocab-student"
    shutil.copytree(_base_path(), other)
    spec = json.loads((other / "tokenizer.json").read_text())
    # a byte-level token only the student has: another vocabulary, the same ids for every token the run uses
    spec["model"]["vocab"]["ĠĠextra"] = max(spec["model"]["vocab"].values()) + len(spec["added_tokens"]) + 1
    (other / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(other)
    assert check_tokenizers(small_config(tmp_path, train={"alpha": 0}), manifest["run"], load_tokenizer(str(other)))

    row = pq.read_table(sorted(Path(cfg.output.dir).glob("part-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    teacher_prompt = tok.apply_chat_template([{"role": "system", "content": cfg.data.system_prompt}, *row["messages"]],
                                             add_generation_prompt=True, tokenize=False)
    assert row["prompt_token_ids"] == tok(teacher_prompt, add_special_tokens=False)["input_ids"]

    def losses(student: str, name: str) -> list[float]:
        run = small_config(tmp_path / name, data={"shards": cfg.output.dir}, student={"model": student, "lora": "null"},
                           train={"alpha": 0, "max_steps": 2, "num_workers": 1, "batch_size": 4, "log_every": 1})
        train(run)
        (metrics,) = Path(run.train.storage_path).glob("*/checkpoint_step0000002/metrics.jsonl")
        return [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]

    stored = losses(_base_path(), "stored-ids")
    assert losses(str(other), "retokenised") == stored, "re-tokenised prompts equal the teacher stage's"


def test_streamed_corpus_is_shuffled_by_row_and_each_epoch_differs(generated, tmp_path):
    """train.cache_max_gb=0 streams the shards: the two samples of a prompt (neighbours in their shard) are
    spread over the epoch, every row comes once per epoch, and the epochs come in different orders."""
    from ray.data.dataset import MaterializedDataset

    from distill_llm.corpus.shards import read_manifest
    from distill_llm.student.stage import (cache_small, ordered_data, shuffle_window_rows, streamed_epoch,
                                           training_dataset, verified_files, worker_datasets)

    gen, _ = generated
    cfg = small_config(tmp_path, data={"shards": gen.output.dir}, train={"cache_max_gb": 0, "alpha": 0})
    manifests = {gen.output.dir: read_manifest(gen.output.dir)}
    files = verified_files([gen.output.dir], "size")
    stored = [r["sample_id"] for f in files[gen.output.dir] for r in pq.read_table(f, columns=["sample_id"]).to_pylist()]
    prompt = {s: s.rsplit("-", 1)[0] for s in stored}
    assert sum(prompt[a] == prompt[b] for a, b in zip(stored, stored[1:])) == 48, "shards keep a prompt's samples together"

    ds = cache_small(training_dataset(cfg, files, False), manifests, cfg.train.cache_max_gb)
    assert not isinstance(ds, MaterializedDataset), "cache_max_gb=0 streams"
    window = shuffle_window_rows(manifests)
    with ordered_data():  # so the union's epochs come one after the other and can be told apart here
        datasets, _ = worker_datasets(ds, 2, cfg.train.seed,
                                      epoch_data=lambda e: streamed_epoch(cfg, files, False, cfg.train.seed + e, window))
        ids = [r["sample_id"] for r in datasets["train"].iter_rows()]
    epochs = [ids[:96], ids[96:]]
    for order in epochs:
        assert sorted(order) == sorted(stored), "every row once per epoch"
        together = sum(prompt[a] == prompt[b] for a, b in zip(order, order[1:]))
        assert together <= 8, f"{together} of 48 prompts still have their samples side by side"
        where = {s: i for i, s in enumerate(order)}
        gaps = [abs(where[f"{p}-0"] - where[f"{p}-1"]) for p in {prompt[s] for s in stored}]
        assert sum(gaps) / len(gaps) > 10, "a prompt's samples are spread over the epoch"
    assert epochs[0] != epochs[1], "each epoch in its own order"
