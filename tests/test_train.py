"""The student stage for real: Ray Train with 2 CPU workers, peft LoRA, checkpoints, export, vLLM evaluation."""

import hashlib
import json
import shutil
from pathlib import Path

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


def test_each_epoch_is_reshuffled_and_split_evenly(ray_session):
    import ray

    from distill_llm.student.stage import ordered_data, worker_datasets

    def epochs_by_worker() -> dict[str, list[list[int]]]:
        with ordered_data():  # a small shard set is read as one block, like this one
            ds = ray.data.range(96, override_num_blocks=1).materialize()
            datasets, _ = worker_datasets(ds, epochs=3, workers=2, batch_size=8, seed=0)
            ids = {name: [row["id"] for row in d.iter_rows()] for name, d in datasets.items()}
        return {name: [rows[e * 48:(e + 1) * 48] for e in range(3)] for name, rows in ids.items()}

    first = epochs_by_worker()
    assert set(first) == {"train_0", "train_1"}
    for epoch in range(3):
        assert sorted(first["train_0"][epoch] + first["train_1"][epoch]) == list(range(96)), "every row once"
    assert first["train_0"][0] != first["train_0"][1] != first["train_0"][2], "each epoch in its own order"
    assert epochs_by_worker() == first, "the same seed gives the same order"


def test_rerun_resumes_from_the_finished_checkpoint(trained):
    from distill_llm.student.stage import train

    cfg, out = trained
    again = train(cfg)
    info = json.loads((Path(again) / "distill_llm.json").read_text())
    assert info["steps"] == 6, "same run name: restored at step 6, nothing more to do"


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
