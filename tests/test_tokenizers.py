"""The teacher/student tokenizer router on real tokenizers (tests/fixtures/tokenizers) and tiny model configs
with the real families' embedding rows."""

from __future__ import annotations

import numpy as np
import pytest

from distill_llm.config import ConfigError
from distill_llm.tokenizers import TokenizerRoute, classify, load_tokenizer, prompt_ids, refusal
from tokenizer_fixtures import ROWS, model_dir, tokenizer_dir

FAMILIES = ("qwen3", "qwen2.5", "r1-distill-qwen", "deepseek-v3")
MESSAGES = [{"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": "What is 12 + 30?\nThink step by step."}]


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """Each family's tokenizer, loaded once by distill_llm's loader."""
    root = tmp_path_factory.mktemp("tokenizers")
    return {f: load_tokenizer(str(tokenizer_dir(f, root / f))) for f in FAMILIES}


def test_the_four_cases_are_told_apart(toks):
    qwen = toks["qwen3"]
    assert classify(qwen, qwen, ROWS["qwen-1.5b"], ROWS["qwen-1.5b"]).case == "identical"
    padded = classify(qwen, qwen, ROWS["qwen-7b"], ROWS["qwen-1.5b"])
    assert padded.case == "padded_rows" and padded.token_level
    assert classify(toks["r1-distill-qwen"], qwen, ROWS["qwen-7b"], ROWS["qwen-1.5b"]).case == "special_remap"
    other = classify(toks["deepseek-v3"], qwen, ROWS["deepseek-v3"], ROWS["qwen-1.5b"])
    assert other.case == "different" and not other.token_level
    # R1-Distill-Qwen writes </think> (151649), a token Qwen2.5's tokenizer does not have
    r1_to_qwen25 = classify(toks["r1-distill-qwen"], toks["qwen2.5"], ROWS["qwen-7b"], ROWS["qwen-1.5b"])
    assert r1_to_qwen25.case == "different" and "'</think>' (id 151649)" in r1_to_qwen25.detail
    # Qwen2.5 -> Qwen3: every id the teacher writes means the same for the student
    assert classify(toks["qwen2.5"], qwen, ROWS["qwen-1.5b"], ROWS["qwen-1.5b"]).case == "identical"


def test_padded_rows_drop_teacher_ids_beyond_the_student(toks):
    from distill_llm.student.batching import translate_topk

    route = classify(toks["qwen3"], toks["qwen3"], ROWS["qwen-7b"], ROWS["qwen-1.5b"])
    assert route.spare_row == ROWS["qwen-1.5b"] - 1  # a padding row no Qwen token uses
    lookup = route.lookup()
    ids = np.array([[9707, 152000, 1879], [151936, 152063, 6023]])
    lps = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32))
    out_ids, out_lps, dropped = translate_topk(ids, lps, lookup, route.spare_row)
    assert dropped == 3
    assert out_ids.tolist() == [[9707, route.spare_row, 1879], [route.spare_row, route.spare_row, 6023]]
    assert (out_ids < ROWS["qwen-1.5b"]).all()
    teacher = np.exp(out_lps) / np.exp(out_lps).sum(1, keepdims=True)  # what the loss renormalises
    np.testing.assert_allclose(teacher, [[0.5 / 0.7, 0, 0.2 / 0.7], [0, 0, 1]], atol=1e-6)


def test_r1_distill_specials_are_mapped_by_name_and_role(toks):
    route = classify(toks["r1-distill-qwen"], toks["qwen3"], ROWS["qwen-7b"], ROWS["qwen-1.5b"])
    # <think>/</think> by name, <｜end▁of▁sentence｜> (the teacher's EOS) to the student's EOS <|im_end|>
    assert route.id_map == {151643: 151645, 151648: 151667, 151649: 151668}
    assert route.unmapped == [151644, 151645, 151646, 151647]  # User, Assistant, BOS, EOT: prompt-side specials
    assert route.reprompt
    lookup = route.lookup()
    assert lookup[151648] == 151667 and lookup[151645] == -1 and lookup[9707] == 9707 and lookup[152000] == -1
    assert TokenizerRoute.from_record({**route.record(), "counted": {}}) == route  # as workers and cards read it
    text = "id map 151643->151645, 151648->151667, 151649->151668"
    assert text in route.describe() and route.record()["id_map"]["151643"] == 151645


def test_batches_carry_r1_distill_ids_as_the_student_s(toks):
    """Stored targets and top-k ids go through the id map; a completion holding a teacher special the student
    lacks skips its row (counted); prompts are the student's chat template."""
    import pyarrow as pa

    from distill_llm.corpus.schema import shard_schema
    from distill_llm.student.batching import build_batch

    route = classify(toks["r1-distill-qwen"], toks["qwen3"], ROWS["qwen-7b"], ROWS["qwen-1.5b"])
    good, bad = [9707, 151648, 1879, 151649, 151643], [9707, 151644, 151643]  # 151644: <｜User｜>
    rows = [{"sample_id": str(i), "prompt_id": str(i), "sample_index": 0, "messages": MESSAGES[1:],
             "prompt_token_ids": prompt_ids(toks["r1-distill-qwen"], MESSAGES[1:]), "completion_token_ids": c,
             "completion_text": "", "finish_reason": "stop", "answer": None, "answer_correct": None,
             "topk_token_ids": [[t, 152000, 151648, 11] for t in c],
             "topk_logprobs": [[-0.1, -3.0, -4.0, -5.0]] * len(c)} for i, c in enumerate([good, bad])]
    table = pa.Table.from_pylist(rows, schema=shard_schema(4, "float16"))
    batch, stats = build_batch(table, max_seq_len=256, pad_id=0, with_topk=True, id_lookup=route.lookup(),
                               spare_row=route.spare_row, reprompt=lambda row: prompt_ids(toks["qwen3"], row["messages"]))
    assert batch["targets"].tolist() == [9707, 151667, 1879, 151668, 151645]
    assert batch["topk_ids"][:, 2].tolist() == [151667] * 5 and batch["topk_ids"][:, 1].tolist() == [route.spare_row] * 5
    assert stats["skipped_unmapped_token"] == 1 and stats["rows"] == 1
    assert stats["topk_ids_dropped"] == len(good) + len(bad) + 1  # 152000 everywhere, and <｜User｜> sampled
    student_prompt = prompt_ids(toks["qwen3"], MESSAGES[1:])
    assert batch["input_ids"][0, :len(student_prompt)].tolist() == student_prompt

def test_token_level_kd_across_tokenizers_is_refused_naming_both_and_the_ways_forward(toks):
    route = classify(toks["deepseek-v3"], toks["qwen3"], ROWS["deepseek-v3"], ROWS["qwen-1.5b"], "deepseek-ai/DeepSeek-R1",
                     "Qwen/Qwen3-1.7B")
    why = refusal(route, 0.5)
    assert "deepseek-ai/DeepSeek-R1" in why and "Qwen/Qwen3-1.7B" in why
    assert "train.alpha=0" in why and "shares the teacher's tokenizer" in why and "Universal Logit Distillation" in why
    assert refusal(route, 0.0) is None
    assert refusal(classify(toks["qwen3"], toks["qwen3"], ROWS["qwen-7b"], ROWS["qwen-1.5b"]), 0.5) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_ids_are_the_chat_template_s_without_a_doubled_bos(toks, family):
    tok = toks[family]
    ids = prompt_ids(tok, MESSAGES)
    expected = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    assert ids == list(expected["input_ids"] if hasattr(expected, "keys") else expected)
    if tok.bos_token_id is not None:
        assert ids.count(tok.bos_token_id) == (1 if tok.bos_token else 0) and ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True).count("12 + 30?") == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_fingerprint_reads_the_added_tokens_once(toks, family):
    """transformers rebuilds `added_tokens_encoder` on every access; read per token, fingerprinting
    DeepSeek-V3's tokenizer took a minute in every teacher run record (and every test writing shards)."""
    from distill_llm.tokenizers import tokenizer_fingerprint

    tok, reads = toks[family], []

    class Counting(type(tok)):
        @property
        def added_tokens_encoder(self):
            reads.append(1)
            return super().added_tokens_encoder

    before = tokenizer_fingerprint(tok)
    tok.__class__ = Counting
    try:
        assert tokenizer_fingerprint(tok) == before
    finally:
        tok.__class__ = Counting.__mro__[1]
    assert len(reads) == 1


@pytest.mark.parametrize("family", ["deepseek-v3", "r1-distill-qwen"])
def test_deepseek_tokenizer_keeps_its_spaces(toks, family):
    """transformers 5 rebuilds DeepSeek's byte-level tokenizers (tokenizer_class LlamaTokenizerFast) with a
    Metaspace pre-tokenizer that drops spaces; load_tokenizer reads tokenizer.json as it is."""
    tok = toks[family]
    text = "Hello world, 12 + 30 = 42."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _cfg(tmp_path, teacher: str, student: str, alpha: float):
    from conftest import small_config

    return small_config(tmp_path, teacher={"model": teacher}, student={"model": student, "lora": "null"},
                        train={"alpha": alpha})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Model folders (tokenizer + config.json, no weights) with the real embedding rows."""
    root = tmp_path_factory.mktemp("models")
    return {"r1-distill-32b": str(model_dir("r1-distill-qwen", ROWS["qwen-7b"], root / "r1d")),
            "deepseek-r1": str(model_dir("deepseek-v3", ROWS["deepseek-v3"], root / "r1")),
            "qwen3-student": str(model_dir("qwen3", ROWS["qwen-1.5b"], root / "q3")),
            "qwen2.5-student": str(model_dir("qwen2.5", ROWS["qwen-1.5b"], root / "q25"))}


def test_plan_refuses_token_level_kd_across_tokenizers(models, tmp_path):
    from distill_llm.cluster.plan import format_plan, plan

    cfg = _cfg(tmp_path, models["deepseek-r1"], models["qwen3-student"], 0.5)
    refused = plan(cfg)
    errors = [f for f in refused.flags if f.level == "error" and f.key == "train.alpha"]
    assert errors and "different tokenizers" in errors[0].message and not refused.fits
    assert ("tokenizers", "different") in [r[:2] for r in refused.rows]
    assert "ERROR: train.alpha: train.alpha=0.5 asks for token-level KD" in format_plan(refused, cfg)
    r1_qwen25 = plan(_cfg(tmp_path, models["r1-distill-32b"], models["qwen2.5-student"], 0.5))
    assert any(f.key == "train.alpha" and "'</think>'" in f.message for f in r1_qwen25.flags)


def test_generate_refuses_before_any_work(models, tmp_path):
    from distill_llm.teacher.stage import generate

    cfg = _cfg(tmp_path, models["deepseek-r1"], models["qwen3-student"], 0.5)
    with pytest.raises(ConfigError, match="different tokenizers"):
        generate(cfg)
    assert not (tmp_path / "shards").exists()  # nothing written, no engine started


def test_submit_refuses_before_reaching_the_cluster(models, tmp_path, capsys):
    """Nothing listens at the address: the refusal comes before submit tries to reach it."""
    from distill_llm.cli import main

    code = main(["submit", "configs/quickstart.yaml", "--address", "http://127.0.0.1:9", "--stage", "generate",
                 f"teacher.model={models['deepseek-r1']}", f"student.model={models['qwen3-student']}",
                 "train.alpha=0.5", f"output.dir={tmp_path / 'shards'}"])
    err = capsys.readouterr().err
    assert code == 2 and "different tokenizers" in err and "127.0.0.1:9" not in err

def test_r1_distill_recipes_train_or_are_refused_by_plan_without_the_hub(monkeypatch):
    """Offline, plan knows the hub families: a recipe asking for token-level KD across them is refused."""
    from pathlib import Path

    from distill_llm.cluster.plan import plan
    from distill_llm.config import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parent.parent / "configs"
    outcomes = {}
    for path in sorted(root.glob("r1*.yaml")):
        cfg = load_config(path)
        flags = [f for f in plan(cfg).flags if f.key == "train.alpha"]
        outcomes[path.name] = (cfg.train.alpha, flags[0].message if flags else None)
    assert outcomes["r1distill-32b-qwen7b-lora.yaml"] == (0.0, None)  # sequence-level KD: trains
    assert outcomes["r1-671b-qwen7b-lora.yaml"] == (0.0, None)
    # QwQ writes </think>, which Qwen2.5 has no token for: the recipe is sequence-level, and token-level KD is
    # refused by plan without the hub
    assert outcomes["r1distill-qwq32b-qwen1.5b.yaml"] == (0.0, None)
    cfg = load_config(root / "r1distill-qwq32b-qwen1.5b.yaml", ["train.alpha=0.5", "generate.top_k_logprobs=20"])
    why = next(f.message for f in plan(cfg).flags if f.key == "train.alpha")
    assert "Qwen/QwQ-32B" in why and "'</think>' (id 151668)" in why and "train.alpha=0" in why

def _write_shards(out, cfg, teacher_dir: str, think: tuple[int, int], k: int = 4) -> None:
    """A real shard set (the project's writer, manifest and run record) of a teacher over real tokenizer ids:
    completions ``<think>...</think> answer`` + EOS, each top-k holding the sampled id, a teacher padding id
    (beyond 151,936 rows) and two ordinary ids."""
    import pyarrow as pa

    from distill_llm.corpus.schema import SKIP_DETAIL, SKIP_REASON, engine_output_schema
    from distill_llm.corpus.shards import ShardWriter, prepare_output, write_manifest
    from distill_llm.teacher.stage import run_record

    tok = load_tokenizer(teacher_dir)
    run = run_record(cfg, teacher_dir, tok)
    prepare_output(str(out), run, resume=False, overwrite=True)
    rows = []
    for i in range(8):
        a, b = 10 + i, 30 + 2 * i
        messages = [{"role": "user", "content": f"What is {a} + {b}?"}]
        body = tok(f"\n{a} + {b} = {a + b}\n", add_special_tokens=False)["input_ids"]
        completion = [think[0], *body, think[1], *tok(f" {a + b}", add_special_tokens=False)["input_ids"],
                      tok.eos_token_id]
        topk = [[c, 152000 + (c % 64), 9707, 1879] for c in completion]
        rows.append({"sample_id": f"s{i}", "prompt_id": f"p{i}", "sample_index": 0, "messages": messages,
                     "prompt_token_ids": prompt_ids(tok, messages), "completion_token_ids": completion,
                     "completion_text": tok.decode(completion, skip_special_tokens=True), "finish_reason": "stop",
                     "answer": str(a + b), "answer_correct": True, "topk_token_ids": topk,
                     "topk_logprobs": [np.log([0.7, 0.1, 0.1, 0.1]).tolist()] * len(completion),
                     SKIP_REASON: None, SKIP_DETAIL: None})
    ShardWriter(str(out), k, "float16", run).write([pa.Table.from_pylist(rows, schema=engine_output_schema(k, "float16"))])
    write_manifest(str(out))


@pytest.mark.slow
def test_token_level_kd_trains_through_the_special_remap_and_padded_rows(ray_session, tmp_path):
    """KD from R1-Distill-Qwen's tokenizer over 152,064 rows into a Qwen3 student of 151,936 rows: the specials
    reach the student through the id map, teacher padding ids are dropped from the top-k and counted."""
    import json
    from pathlib import Path

    from conftest import small_config
    from distill_llm.student.stage import train

    teacher = str(model_dir("r1-distill-qwen", ROWS["qwen-7b"], tmp_path / "teacher"))
    student = str(model_dir("qwen3", ROWS["qwen-1.5b"], tmp_path / "student", weights=True))
    _write_shards(tmp_path / "shards", _cfg(tmp_path, teacher, student, 0.5), teacher, (151648, 151649))
    run = small_config(tmp_path, data={"shards": str(tmp_path / "shards")}, teacher={"model": teacher},
                       student={"model": student, "lora": "null"},
                       train={"alpha": 0.5, "max_steps": 2, "num_workers": 1, "batch_size": 4, "log_every": 1,
                              "cache_max_gb": 0})
    out = Path(train(run))
    route = json.loads((out / "distill_llm.json").read_text())["tokenizers"]
    assert route["case"] == "special_remap"
    assert route["id_map"] == {"151643": 151645, "151648": 151667, "151649": 151668}
    # every completion token's top-k held one teacher padding id; no row was skipped
    tokens = sum(len(r) for r in _completions(tmp_path / "shards"))
    assert route["counted"] == {"topk_ids_dropped": tokens, "skipped_unmapped_token": 0}
    assert "tokenizers: special_remap" in (out / "README.md").read_text()
    (record,) = Path(run.train.storage_path).glob("*/distill_llm_run.json")
    assert json.loads(record.read_text())["tokenizers"]["case"] == "special_remap"
    (metrics,) = Path(run.train.storage_path).glob("*/checkpoint_step0000002/metrics.jsonl")
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["kd"] > 0 and np.isfinite(last["loss"])


def _completions(shards) -> list[list[int]]:
    import pyarrow.parquet as pq

    return [c for f in sorted(shards.glob("part-*.parquet")) for c in pq.read_table(f).column(
        "completion_token_ids").to_pylist()]


@pytest.mark.slow
def test_sequence_level_kd_trains_a_qwen_student_on_a_deepseek_teacher_s_text(ray_session, tmp_path):
    """DeepSeek-V3's tokenizer (129,280 rows) into a Qwen2.5 student: the pair is `different`, so token-level
    KD is refused and sequence-level KD (alpha 0) trains on the teacher's text re-tokenised by the student."""
    import json
    from pathlib import Path

    from conftest import small_config
    from distill_llm.student.stage import train

    teacher = str(model_dir("deepseek-v3", ROWS["deepseek-v3"], tmp_path / "teacher"))
    student = str(model_dir("qwen2.5", ROWS["qwen-1.5b"], tmp_path / "student", weights=True))
    tok = load_tokenizer(teacher)
    words = tuple(tok(w, add_special_tokens=False)["input_ids"][0] for w in ("Hmm", "So"))
    _write_shards(tmp_path / "shards", _cfg(tmp_path, teacher, student, 0.0), teacher, words)
    run = small_config(tmp_path, data={"shards": str(tmp_path / "shards")}, teacher={"model": teacher},
                       student={"model": student, "lora": "null"},
                       train={"alpha": 0.0, "max_steps": 1, "num_workers": 1, "batch_size": 4, "log_every": 1,
                              "cache_max_gb": 0})
    with pytest.raises(ConfigError, match="different tokenizers"):
        train(small_config(tmp_path, data={"shards": str(tmp_path / "shards")}, teacher={"model": teacher},
                           student={"model": student, "lora": "null"}, train={"alpha": 0.5}))
    out = Path(train(run))
    assert json.loads((out / "distill_llm.json").read_text())["tokenizers"]["case"] == "different"
    (metrics,) = Path(run.train.storage_path).glob("*/checkpoint_step0000001/metrics.jsonl")
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert last["kd"] == 0 and last["ce"] > 0 and np.isfinite(last["loss"])
