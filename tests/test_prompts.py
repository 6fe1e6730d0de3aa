"""Prompt sources through Ray Data (no engine): JSONL, Parquet, saved HF datasets, toy splits, bad files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_llm.config import ConfigError, DataConfig
from distill_llm.corpus.prompts import expand_samples, normalize_prompt, prompt_id, read_prompts


def rows(ds):
    return sorted(ds.take_all(), key=lambda r: str(r["prompt_id"]))


def test_prompt_ids_are_stable_and_content_derived():
    a = normalize_prompt({"prompt": "What is 1+1?"}, 0)
    b = normalize_prompt({"messages": [{"role": "user", "content": "What is 1+1?"}]}, 7)
    assert a["prompt_id"] == b["prompt_id"] == prompt_id([{"role": "user", "content": "What is 1+1?"}])
    assert normalize_prompt({"prompt": "What is 1+2?"}, 0)["prompt_id"] != a["prompt_id"]
    assert normalize_prompt({"prompt": 5}, 3)["skip_reason"] == "bad_prompt"
    assert normalize_prompt({"prompt": "x", "answer": 12}, 0)["answer"] == "12"


def test_parquet_and_hf_dataset_sources(ray_session, tmp_path):
    import datasets

    data = {"prompt": ["What is 1+2?", "What is 3+4?", ""], "answer": ["3", "7", "0"]}
    pq.write_table(pa.table(data), tmp_path / "p.parquet")
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp_path / "hf"))
    for source in (str(tmp_path / "p.parquet"), str(tmp_path / "hf")):
        got = rows(read_prompts(DataConfig(prompts=source, num_prompts=None)))
        good = [r for r in got if r["skip_reason"] is None]
        assert len(got) == 3 and len(good) == 2, source
        assert {r["answer"] for r in good} == {"3", "7"}
        assert [r["skip_reason"] for r in got if r["skip_reason"]] == ["empty_prompt"]
    limited = read_prompts(DataConfig(prompts=str(tmp_path / "p.parquet"), num_prompts=1))
    assert limited.count() == 1


def test_samples_are_expanded_and_resume_filters(ray_session):
    ds = read_prompts(DataConfig(prompts="toy:train", num_prompts=5))
    all_samples = expand_samples(ds, 3, set()).take_all()
    ids = [r["sample_id"] for r in all_samples]
    assert len(ids) == len(set(ids)) == 15
    done = set(ids[:4])
    rest = expand_samples(ds, 3, done).take_all()
    assert {r["sample_id"] for r in rest} == set(ids) - done


def test_unreadable_and_columnless_sources(ray_session, tmp_path):
    garbage = tmp_path / "broken.parquet"
    garbage.write_bytes(b"this is not parquet at all")
    with pytest.raises(ConfigError, match="cannot read prompts"):
        read_prompts(DataConfig(prompts=str(garbage)))
    pq.write_table(pa.table({"question": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(ConfigError, match="needs a 'prompt'"):
        read_prompts(DataConfig(prompts=str(tmp_path / "q.parquet")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="no rows"):
        read_prompts(DataConfig(prompts=str(empty)))
    with pytest.raises(ConfigError, match="toy split"):
        read_prompts(DataConfig(prompts="toy:test"))


def test_eval_model_shorthand():
    from distill_llm.cli import load

    cfg = load("eval", ["model=/a/b", "model=c", "eval.samples=2"])
    assert cfg.eval.models == ["/a/b", "c"] and cfg.eval.samples == 2
    assert json.loads(json.dumps(cfg.model_dump(mode="json")))["eval"]["models"] == ["/a/b", "c"]


def test_repeated_prompts_are_skipped_not_duplicated(ray_session, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in ["a?", "b?", "a?"]) + "\n")
    got = read_prompts(DataConfig(prompts=str(path), num_prompts=None)).take_all()
    assert sorted(r["skip_reason"] or "" for r in got) == ["", "", "duplicate_prompt"]
    assert len({r["prompt_id"] for r in got}) == 3


def numina_like_folder(root):
    """A folder datasets.load_dataset reads, with NuminaMath's column names and two configurations."""
    import yaml

    rows = {"main": [{"problem": f"What is {i}+{i}?", "solution": f"{2 * i}", "source": "x"} for i in range(5)],
            "hard": [{"problem": f"What is {i}*{i}?", "solution": f"{i * i}", "source": "y"} for i in range(3)]}
    for name, items in rows.items():
        (root / name).mkdir(parents=True)
        for split, part in (("train", items), ("test", items[:1])):
            pq.write_table(pa.Table.from_pylist(part), root / name / f"{split}.parquet")
    configs = [{"config_name": n, "default": n == "main",
                "data_files": [{"split": s, "path": f"{n}/{s}.parquet"} for s in ("train", "test")]} for n in rows]
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": configs}) + "---\n")
    return root


def test_load_dataset_sources_map_their_columns(ray_session, tmp_path):
    from distill_llm.config import load_config

    folder = numina_like_folder(tmp_path / "numina")
    section = f"data.dataset={{path: {folder}, name: hard, split: train, columns: {{problem: prompt, solution: answer}}}}"
    cfg = load_config(None, [section, "data.num_prompts=null"])
    assert cfg.data.prompts == f"hf:{folder}:hard:train"  # the name the run identity records
    got = rows(read_prompts(cfg.data))
    assert len(got) == 3 and {r["answer"] for r in got} == {"0", "1", "4"}
    assert {r["messages"][0]["content"] for r in got} == {f"What is {i}*{i}?" for i in range(3)}
    # streamed (as hub datasets are), whole and limited
    streamed = cfg.data.model_copy(update={"dataset": cfg.data.dataset.model_copy(update={"streaming": True})})
    assert rows(read_prompts(streamed)) == got
    assert len(read_prompts(streamed, num_prompts=2).take_all()) == 2
    # hf:PATH[:NAME]:SPLIT with the dataset's own column names needs a mapping: the error names the columns
    with pytest.raises(ConfigError, match=r"columns \['problem', 'solution', 'source'\].*needs a 'prompt'"):
        read_prompts(DataConfig(prompts=f"hf:{folder}:test"))
    with pytest.raises(ConfigError, match=r"names \['question'\], which .* lacks"):
        read_prompts(load_config(None, [f"data.dataset={{path: {folder}, columns: {{question: prompt}}}}"]).data)
    with pytest.raises(ConfigError, match="load_dataset.*split='validation'.*failed"):
        read_prompts(DataConfig(prompts=f"hf:{folder}:main:validation"))


def test_hf_uri_and_dataset_section_are_checked_when_read():
    from distill_llm.config import DatasetSource, load_config

    assert DatasetSource.parse("hf:AI-MO/NuminaMath-CoT:train") == DatasetSource(path="AI-MO/NuminaMath-CoT")
    assert DatasetSource.parse("hf:org/set:sub:test").name == "sub"
    with pytest.raises(ConfigError, match="hf:PATH"):
        DatasetSource.parse("hf:a:b:c:d")
    with pytest.raises(ConfigError, match="data.dataset.columns: .*map onto prompt, messages, answer"):
        load_config(None, ["data.dataset={path: x, columns: {problem: question}}"])
    with pytest.raises(ConfigError, match="both name the prompts"):
        load_config(None, ["data.prompts=p.jsonl", "data.dataset={path: x}"])


def messy_parquet(folder, n=4_000, files=4):
    """``n`` rows over ``files`` Parquet files: 5% repeat an earlier prompt (half of them with another answer),
    1% lack a prompt and 1% are blank; the bad rows are identical to one another, so only their content
    cannot tell them apart."""
    rows = []
    for i in range(n):
        if i % 20 == 19:  # a repeat of a prompt from another file, i.e. another read task and batch
            j = (i * 7919) % (i - 1)
            while j % 20 == 19 or j % 100 in (3, 5):
                j -= 1
            rows.append({"prompt": f"What is {j}+1?", "answer": str(j + 1) if i % 40 == 39 else "other"})
        elif i % 100 == 3:
            rows.append({"prompt": None, "answer": None})
        elif i % 100 == 5:
            rows.append({"prompt": "   ", "answer": None})
        else:
            rows.append({"prompt": f"What is {i}+1?", "answer": str(i + 1)})
    table = pa.Table.from_pylist(rows, schema=pa.schema([("prompt", pa.string()), ("answer", pa.string())]))
    folder.mkdir()
    step = n // files
    for f in range(files):
        pq.write_table(table.slice(f * step, step), folder / f"part-{f}.parquet", row_group_size=250)
    return rows


def test_streamed_parquet_prompts_are_deduplicated_with_unique_ids(ray_session, tmp_path):
    from collections import Counter

    from distill_llm.teacher.stage import count_prompts

    rows = messy_parquet(tmp_path / "prompts")
    ds = read_prompts(DataConfig(prompts=str(tmp_path / "prompts"), num_prompts=None)).materialize()
    got = ds.take_all()
    assert len(got) == 4_000
    assert len({r["prompt_id"] for r in got}) == 4_000, "every row, good or bad, has an id of its own"
    reasons = Counter(r["skip_reason"] for r in got)
    assert reasons == {None: 3_720, "duplicate_prompt": 200, "missing_prompt": 40, "empty_prompt": 40}
    kept = {r["messages"][0]["content"]: r["answer"] for r in got if r["skip_reason"] is None}
    assert len(kept) == len({r["prompt"] for r in rows if r["prompt"] and r["prompt"].strip()}) == 3_720
    samples = expand_samples(ds, 2, set())
    ids = [r["sample_id"] for r in samples.iter_rows()]
    assert len(ids) == len(set(ids)) == 3_720 * 2 + 280
    # the pre-engine check counts by reason, and a rerun keeps the same rows and gives them the same ids
    assert count_prompts(ds) == (3_720, Counter({"duplicate_prompt": 200, "missing_prompt": 40,
                                                 "empty_prompt": 40}))
    again = read_prompts(DataConfig(prompts=str(tmp_path / "prompts"), num_prompts=None)).take_all()
    key = lambda r: (r["prompt_id"], r["skip_reason"], r["answer"])  # noqa: E731
    assert sorted(map(key, again)) == sorted(map(key, got))


def test_repeated_prompt_ids_fail_before_any_engine_starts(ray_session):
    import ray

    from distill_llm.teacher.stage import count_prompts

    good = normalize_prompt({"prompt": "What is 1+1?"}, 0)
    ds = ray.data.from_items([good, {**good, "answer": "2"}, normalize_prompt({"prompt": 3}, 2)])
    with pytest.raises(RuntimeError, match="1 prompt ids occur more than once .* nothing was generated"):
        count_prompts(ds)


def test_jsonl_prompts_stream_through_ray_data(ray_session, tmp_path):
    path = tmp_path / "p.jsonl"
    lines = [json.dumps({"prompt": p}) for p in ["a?", "b?", "a?"]] + ["{not json", "{not json", "", "[1, 2]"]
    path.write_text("\n".join(lines) + "\n")
    got = read_prompts(DataConfig(prompts=str(path), num_prompts=None)).take_all()
    assert sorted(r["skip_reason"] or "" for r in got) == ["", "", "bad_json", "bad_json", "duplicate_prompt",
                                                          "missing_prompt"]
    assert len({r["prompt_id"] for r in got}) == 6
    assert "not JSON" in " ".join(r["skip_detail"] for r in got if r["skip_reason"] == "bad_json")


def test_score_mode_reads_traces_from_messages_or_prompt_and_completion():
    chat = {"messages": [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]}
    flat = {"prompt": "What is 1+1?", "completion": "2"}
    a, b = normalize_prompt(chat, 0, score=True), normalize_prompt(flat, 1, score=True)
    assert a == b and a["completion"] == "2" and a["finish_reason"] == "stop"
    assert a["messages"] == [{"role": "user", "content": "What is 1+1?"}]
    assert a["prompt_id"] != normalize_prompt(flat, 1)["prompt_id"], "a trace's id covers its completion"
    assert normalize_prompt({**flat, "finish_reason": "length"}, 0, score=True)["finish_reason"] == "length"
    assert normalize_prompt({**flat, "finish_reason": "abort"}, 0, score=True)["skip_reason"] == "bad_finish_reason"
    assert normalize_prompt({"prompt": "What is 1+1?"}, 0, score=True)["skip_reason"] == "missing_completion"
    assert normalize_prompt(chat, 0)["messages"] == chat["messages"], "generate mode keeps the whole chat"


def test_jsonl_and_parquet_trace_sets_read_alike(ray_session, tmp_path):
    traces = [("What is 1+1?", "2", "stop"), ("What is 2+2?", "4 and more", "length"), ("What is 1+1?", "3", "stop")]
    pq.write_table(pa.Table.from_pylist([{"prompt": p, "completion": c, "finish_reason": f} for p, c, f in traces]),
                   tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}], "finish_reason": f}) + "\n"
        for p, c, f in traces) + json.dumps({"prompt": "no completion"}) + "\n")
    parquet = rows(read_prompts(DataConfig(prompts=str(tmp_path / "t.parquet"), num_prompts=None), score=True))
    jsonl = rows(read_prompts(DataConfig(prompts=str(tmp_path / "t.jsonl"), num_prompts=None), score=True))
    assert [r["skip_reason"] for r in jsonl if r["skip_reason"]] == ["missing_completion"]
    assert [r for r in jsonl if not r["skip_reason"]] == parquet and len(parquet) == 3, "two traces of one prompt"
    with pytest.raises(ConfigError, match="generate.mode=score.*'prompt' and 'completion'"):
        pq.write_table(pa.table({"prompt": ["x"]}), tmp_path / "p.parquet")
        read_prompts(DataConfig(prompts=str(tmp_path / "p.parquet")), score=True)


def test_score_mode_settings_are_checked_when_the_config_is_read():
    from distill_llm.config import load_config

    with pytest.raises(ConfigError, match="generate.mode=score scores each trace once: .*samples_per_prompt=2"):
        load_config(None, ["generate.mode=score", "generate.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match="generate.mode=score with generate.top_k_logprobs=0"):
        load_config(None, ["generate.mode=score", "generate.top_k_logprobs=0", "train.alpha=0"])
    with pytest.raises(ConfigError, match="generate.logprobs"):
        load_config(None, ["generate.logprobs=later"])
    assert load_config(None, ["generate.mode=score", "generate.samples_per_prompt=1"]).generate.logprobs is None
