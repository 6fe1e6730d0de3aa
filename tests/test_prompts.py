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
    assert [r["skip_reason"] for r in got] == [None, None, "duplicate_prompt"]
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
