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
    """A one-round config: 2 prompts x 2 student samples of at most 8 tokens, 1 training step (the engines'
    and Ray Train's start-up, not the rows, is what the end-to-end round costs)."""
    base = {"rounds": {"n": 1, "prompts_per_round": 2, "samples_per_prompt": 2, "dir": tmp / "rounds"},
            "train": {"alpha": 1.0, "divergence": "reverse_kl", "max_steps": 1, "num_workers": 1, "batch_size": 4,
                      "log_every": 1, "cache_max_gb": 0},
            "generate": {"max_new_tokens": 8}, "data": {"num_prompts": 8}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return small_config(tmp, **base)


@pytest.mark.parametrize("sections, message", [
    ({"train": {"alpha": 0}}, "train.alpha=0 would train the student on its own samples"),
    ({"teacher": {"model": "round:1"}}, "teacher.model=round:1"),
    ({"teacher": {"model": "round:x"}}, "teacher.model=round:x: expected round:N"),
    ({"student": {"lora": "{r: 4}", "merge_lora": "false"}}, "set student.merge_lora=true"),
    ({"rounds": {"dir": "s3://bucket/rounds"}}, "rounds.dir=s3://bucket/rounds"),
    ({"rounds": {"n": 5}}, "rounds.n=5 x rounds.prompts_per_round=2 = 10 prompts"),
    ({"train": {"estimator": "sampled"}}, "train.estimator=sampled with train.temperature=2.0, the student sampling "
                                          "at generate.temperature=1.0"),
    ({"train": {"estimator": "sampled", "temperature": 1.0}, "generate": {"top_p": 0.9}},
     "generate.top_p=0.9: the one-sample estimate is unbiased only"),
    ({"train": {"estimator": "sampled", "temperature": 1.0}, "rounds": {"offline_mix": 0.5}},
     "train.estimator=sampled with rounds.offline_mix=0.5: the one-sample estimate is the reverse-KL gradient only"),
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


def shard_state(folder: Path) -> dict[str, bytes]:
    """Every file of a shard set with its bytes: what a resumed run must not rewrite."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_teacher_scores_match_transformers(scored: Path) -> None:
    """The stored top-k of each scored position equals the toy teacher's log-softmax computed by transformers
    on the same prompt + completion tokens (to fp16 storage precision), and is its top k."""
    import torch
    from transformers import AutoModelForCausalLM

    from distill_llm.corpus.shards import read_shards
    from distill_llm.paths import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("toy-teacher"), dtype=torch.float32).eval()
    rows = read_shards(str(scored)).to_pylist()
    assert rows
    for row in rows:
        prompt, completion = row["prompt_token_ids"], row["completion_token_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1: len(prompt) + len(completion) - 1], dim=-1)
        ids = torch.tensor(row["topk_token_ids"], dtype=torch.long)
        stored = torch.tensor(row["topk_logprobs"], dtype=torch.float32)
        torch.testing.assert_close(logp.gather(1, ids), stored, atol=2e-2, rtol=1e-2)
        k = ids.shape[1]
        assert (stored[:, -1] >= logp.topk(k + 1, dim=-1).values[:, k] - 2e-2).all()  # nothing better left out


@pytest.mark.slow
def test_one_round_killed_between_stages_resumes_and_trains_the_student(ray_session, tmp_path):
    """A real round on the toy world: killed (SIGKILL) after the teacher scored the student's samples, rerun:
    nothing is sampled or scored again, the student trains and changes; the shards carry the round and the
    student checkpoint's hash; the teacher's scores are a transformers forward pass on the student's tokens."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    from distill_llm.config import dump_config
    from distill_llm.corpus.shards import read_shards
    from distill_llm.paths import resolve_model
    from distill_llm.rounds.stage import checkpoint_hash, rounds

    cfg = rounds_config(tmp_path)
    config_file = tmp_path / "rounds.yaml"
    config_file.write_text(dump_config(cfg))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address,
           "DISTILL_LLM_FAULTS": f"kill_rounds:round=1,after=scored,marker={tmp_path / 'killed'}"}
    first = subprocess.run([sys.executable, "-m", "pipelines.rounds", str(config_file)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == -9, first.stderr[-3000:]
    round1 = tmp_path / "rounds" / "round-1"
    assert (round1 / "samples" / "manifest.json").is_file() and (round1 / "scored" / "manifest.json").is_file()
    assert not (round1 / "round.json").exists() and not (round1 / "student").exists()
    before = {name: shard_state(round1 / name) for name in ("samples", "scored")}

    [record] = rounds(cfg)  # the rerun: train and export only

    assert {name: shard_state(round1 / name) for name in ("samples", "scored")} == before
    start = resolve_model("toy-student")
    start_hash = checkpoint_hash(start)
    assert record["round"] == 1 and record["student_sha256"] == start_hash
    assert record["student_out_sha256"] != start_hash and record["steps"] == 1
    for name, role, k in (("samples", "student_samples", 0), ("scored", "teacher_scores", 8)):
        manifest = json.loads((round1 / name / "manifest.json").read_text())
        shard = round1 / name / manifest["shards"][0]["file"]
        meta = json.loads(pq.read_schema(shard).metadata[b"distill_llm"])
        for run in (manifest["run"], meta):
            assert run["rounds"]["round"] == 1 and run["rounds"]["role"] == role
            assert run["rounds"]["student_sha256"] == start_hash and run["rounds"]["teacher"] == "toy-teacher"
            assert run["top_k_logprobs"] == k
    assert json.loads((round1 / "samples" / "manifest.json").read_text())["run"]["teacher"]["model"] == start
    sampled = {(json.dumps(r["messages"]), r["completion_text"]): r["completion_token_ids"]
               for r in read_shards(str(round1 / "samples")).to_pylist()}
    scored = read_shards(str(round1 / "scored")).to_pylist()
    assert len(scored) == record["rows"] == sum(1 for _ in read_shards(str(round1 / "samples")).to_pylist())
    assert all(r["completion_token_ids"] == sampled[(json.dumps(r["messages"]), r["completion_text"])]
               for r in scored)  # the teacher scored the student's own tokens (not its text re-tokenised)
    assert_teacher_scores_match_transformers(round1 / "scored")
    old, new = load_file(str(Path(start) / "model.safetensors")), load_file(str(round1 / "student" / "model.safetensors"))
    assert old.keys() == new.keys() and any(not (old[k] == new[k]).all() for k in old)


def test_score_mode_takes_a_traces_own_token_ids():
    """A trace's completion_token_ids (the sampler's own tokens) travel to the engine; bad ones are skipped."""
    from distill_llm.corpus.prompts import normalize_prompt
    from distill_llm.corpus.schema import SKIP_REASON

    trace = {"messages": [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "2"}],
             "completion_token_ids": [17, 2]}
    row = normalize_prompt(trace, 0, score=True)
    assert row[SKIP_REASON] is None and row["completion_token_ids"] == [17, 2] and row["completion"] == "2"
    assert normalize_prompt({**trace, "completion_token_ids": None}, 0, score=True)["completion_token_ids"] is None
    for bad in ([], [1, -1], "12", [1.5]):
        got = normalize_prompt({**trace, "completion_token_ids": bad}, 0, score=True)
        assert got[SKIP_REASON] == "bad_completion_token_ids"


def test_identical_samples_of_one_prompt_stay_two_scored_rows(tmp_path):
    """Two equal samples of one prompt are two draws of the student: as traces to score they keep two rows with
    sample ids of their own (the duplicate pass would otherwise skip the second as a repeated trace), while two
    equal traces without a trace_id are still one."""
    import pyarrow as pa
    from test_shards import engine_rows, write_set

    from distill_llm.corpus.prompts import drop_duplicates, normalize_prompt
    from distill_llm.corpus.schema import SKIP_REASON
    from distill_llm.rounds.stage import traces

    rows = engine_rows(3)
    same = {"messages": rows.column("messages")[0], "completion_text": rows.column("completion_text")[0],
            "completion_token_ids": rows.column("completion_token_ids")[0]}
    for name, value in same.items():  # sample 1 of p0 repeats sample 0 word for word
        column = rows.column(name).to_pylist()
        column[1] = value.as_py()
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(column, rows.schema.field(name).type))
    rows = rows.set_column(rows.schema.get_field_index("sample_id"), "sample_id", pa.array(["p0-0", "p0-1", "p2-0"]))
    write_set(tmp_path / "samples", [rows])
    got = drop_duplicates([normalize_prompt(t, i, score=True) for i, t in enumerate(traces(tmp_path / "samples"))])
    assert got.num_rows == 3 and got.column(SKIP_REASON).null_count == 3
    assert len(set(got.column("prompt_id").to_pylist())) == 3
    bare = [{k: v for k, v in t.items() if k != "trace_id"} for t in traces(tmp_path / "samples")]
    assert drop_duplicates([normalize_prompt(t, i, score=True) for i, t in enumerate(bare)]).column(
        SKIP_REASON).null_count == 2
    assert normalize_prompt({**bare[0], "trace_id": 7}, 0, score=True)[SKIP_REASON] == "bad_trace_id"


def test_offline_mix_writes_a_seeded_sample_of_the_offline_corpus(tmp_path):
    """rounds.offline_mix=f: f of the round's rows come from the offline sets, as a shard set of the round's own
    (chosen rows only, each once, the same on a rerun); sets the scores cannot train with are refused."""
    from test_shards import K, engine_rows, run_record, write_set

    from distill_llm.corpus.shards import read_manifest, read_shards
    from distill_llm.rounds.stage import offline_mix, offline_rows

    offline = tmp_path / "offline-set"
    write_set(offline, [engine_rows(30), engine_rows(30, start=30)])
    cfg = rounds_config(tmp_path, rounds={"offline_mix": 0.25}, data={"shards": f"[{offline}]"})
    assert offline_rows(cfg, 12) == 4 and offline_rows(rounds_config(tmp_path), 12) == 0
    out = offline_mix(cfg, run_record(), 12, tmp_path / "round-1" / "offline", 1)
    manifest = read_manifest(str(out))
    assert manifest["totals"]["rows"] == 4 and manifest["run"]["rounds"]["role"] == "offline_mix"
    ids = read_shards(str(out)).column("sample_id").to_pylist()
    source = {r["sample_id"]: r for r in read_shards(str(offline)).to_pylist()}
    assert len(set(ids)) == 4 and all(i in source for i in ids)
    assert sorted(read_shards(str(out)).to_pylist(), key=lambda r: r["sample_id"]) == \
        sorted((source[i] for i in ids), key=lambda r: r["sample_id"])  # the rows as they were
    again = offline_mix(cfg, run_record(), 12, tmp_path / "again" / "offline", 1)
    assert sorted(read_shards(str(again)).column("sample_id").to_pylist()) == sorted(ids)  # seeded
    other = offline_mix(cfg, run_record(), 12, tmp_path / "round-2" / "offline", 2)
    assert sorted(read_shards(str(other)).column("sample_id").to_pylist()) != sorted(ids)
    with pytest.raises(ConfigError, match="rounds.offline_mix=0.25: the offline shards .* top_k_logprobs"):
        offline_mix(cfg, run_record(top_k_logprobs=K + 1), 12, tmp_path / "bad" / "offline", 1)


# ---------------------------------------------------------------- train.estimator: sampled (pure torch, fast)


def _ref_sampled(hidden, weight, targets, ids, lps, temperature, tail):
    """Dense float64 reference of the sampled-token estimator: full-vocabulary logits, buckets from scratch,
    each position's bucket found by scanning; returns (loss, per-position a) with alpha = 1."""
    from test_losses import _ref_student, _ref_teacher

    logits = hidden.double() @ weight.double().t()
    t, s = _ref_teacher(lps, temperature, tail), _ref_student(logits, ids.long(), temperature, tail)
    terms, values = [], []
    for n in range(logits.shape[0]):
        place = [j for j in range(ids.shape[1]) if int(ids[n, j]) == int(targets[n])]
        if not place and not tail:
            continue
        b = place[0] if place else ids.shape[1]
        a = float((s[n, b] - t[n, b]).detach())
        terms.append(a * s[n, b])  # value a * log q(b): its gradient is a * grad log q(b)
        values.append(a)
    scale = temperature ** 2
    return scale * sum(terms) / logits.shape[0], scale * sum(values) / logits.shape[0]


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimator_matches_a_dense_reference(tail, temperature):
    """Value (the mean one-sample reverse KL) and gradient of train.estimator=sampled against float64 dense
    code; tokens outside the top k count only with the tail bucket."""
    import torch
    from test_losses import make_inputs

    from distill_llm.student.losses import KDSettings, distill_loss

    hidden, weight, targets, ids, lps, _ = make_inputs(seed=3)
    targets = targets.clone()
    targets[::3] = ids[::3, 1]  # some sampled tokens inside the top k, the rest mostly outside
    s = KDSettings(alpha=1.0, temperature=temperature, divergence="reverse_kl", tail_bucket=tail, chunk_size=7,
                   estimator="sampled")
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = distill_loss(h, w, targets, ids, lps, s)
    out["loss"].backward()
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref_grad_loss, ref_value = _ref_sampled(h64, w64, targets, ids, lps, temperature, tail)
    ref_grad_loss.backward()
    torch.testing.assert_close(out["loss"].double(), torch.tensor(ref_value, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad.double(), h64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_estimator_is_unbiased_for_the_reverse_kl_gradient(seed):
    """Averaged over the student's bucket distribution (enumerated exactly, tail bucket on), the sampled
    estimator's gradient equals the gradient of reverse KL over the top-k buckets."""
    import torch
    from test_losses import make_inputs

    from distill_llm.student.losses import KDSettings, distill_loss, student_buckets

    hidden, weight, _, ids, lps, _ = make_inputs(seed=seed, n=1)
    outside = next(t for t in range(weight.shape[0]) if t not in ids[0].tolist())
    exact = KDSettings(alpha=1.0, temperature=1.5, divergence="reverse_kl", tail_bucket=True)
    w = weight.clone().requires_grad_(True)
    distill_loss(hidden, w, torch.zeros(1, dtype=torch.long), ids, lps, exact)["loss"].backward()
    with torch.no_grad():
        q = student_buckets(hidden @ weight.t(), ids, 1.5, True).exp()[0]
    mean = torch.zeros_like(weight)
    for b in range(ids.shape[1] + 1):
        token = ids[0, b] if b < ids.shape[1] else torch.tensor(outside)
        wb = weight.clone().requires_grad_(True)
        sampled = KDSettings(alpha=1.0, temperature=1.5, divergence="reverse_kl", tail_bucket=True, estimator="sampled")
        distill_loss(hidden, wb, token.view(1), ids, lps, sampled)["loss"].backward()
        mean += q[b] * wb.grad
    torch.testing.assert_close(mean, w.grad, rtol=1e-4, atol=1e-6)


def test_sampled_estimator_needs_reverse_kl():
    from distill_llm.config import load_config

    with pytest.raises(ConfigError, match="train.estimator=sampled estimates reverse KL"):
        load_config(ROOT / "configs" / "quickstart.yaml", ["train.estimator=sampled"])
    assert load_config(ROOT / "configs" / "quickstart.yaml", ["train.estimator=sampled",
                                                              "train.divergence=reverse_kl"]).train.estimator == "sampled"


@pytest.mark.parametrize("temperature, unbiased", [(1.0, True), (2.0, False)])
def test_sampled_estimator_is_unbiased_only_at_the_sampling_temperature(temperature, unbiased):
    """The student samples its tokens at generate.temperature (1 here): averaged over that distribution
    (enumerated exactly, tail bucket on), the sampled estimator's gradient is the reverse-KL gradient at
    train.temperature 1, and not at 2 (why check_rounds refuses the mismatch)."""
    import torch
    from test_losses import make_inputs

    from distill_llm.student.losses import KDSettings, distill_loss, student_buckets

    hidden, weight, _, ids, lps, _ = make_inputs(seed=4, n=1)
    outside = next(t for t in range(weight.shape[0]) if t not in ids[0].tolist())
    w = weight.clone().requires_grad_(True)
    exact = KDSettings(alpha=1.0, temperature=temperature, divergence="reverse_kl", tail_bucket=True)
    distill_loss(hidden, w, torch.zeros(1, dtype=torch.long), ids, lps, exact)["loss"].backward()
    with torch.no_grad():
        sampling = student_buckets(hidden @ weight.t(), ids, 1.0, True).exp()[0]  # what the student samples from
    mean = torch.zeros_like(weight)
    for b in range(ids.shape[1] + 1):
        token = ids[0, b] if b < ids.shape[1] else torch.tensor(outside)
        wb = weight.clone().requires_grad_(True)
        sampled = KDSettings(alpha=1.0, temperature=temperature, divergence="reverse_kl", tail_bucket=True,
                             estimator="sampled")
        distill_loss(hidden, wb, token.view(1), ids, lps, sampled)["loss"].backward()
        mean += sampling[b] * wb.grad
    assert torch.allclose(mean, w.grad, rtol=1e-4, atol=1e-6) == unbiased
