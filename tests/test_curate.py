"""The curation stage: planted duplicates, near-duplicates, contamination and failing traces are removed and
counted by reason, on small real shard sets written through the corpus code and curated on Ray Data."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from distill_llm.config import ConfigError, build_config
from distill_llm.corpus.prompts import prompt_id
from distill_llm.corpus.schema import SCHEMA_VERSION, engine_output_schema
from distill_llm.corpus.shards import (ShardWriter, prepare_output, read_manifest, read_shards, shard_files,
                                       write_manifest)
from distill_llm.curation import filters

K = 2
WORDS = ("apple river stone cloud seven paper window silver garden orange number circle yellow bridge "
         "market forest candle summer winter engine planet rocket pencil marble spider violin tomato "
         "dragon castle island jungle meadow thunder shadow crystal harbor lantern mirror needle ocean").split()


def sentence(seed: int, n: int = 80) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n))


def trace(answer: str, steps: str = "think") -> str:
    return f"<think>{steps}</think>{answer}"


def row(prompt: str, index: int, completion: str, correct: bool | None = True, finish: str = "stop",
        system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    pid = prompt_id(messages)
    n = len(completion.split())
    return {"sample_id": f"{pid}-{index}", "prompt_id": pid, "sample_index": index, "messages": messages,
            "prompt_token_ids": [1, 2, 3], "completion_token_ids": list(range(n)), "completion_text": completion,
            "finish_reason": finish, "answer": "7", "answer_correct": correct,
            "topk_token_ids": [[1, 2]] * n, "topk_logprobs": [[-0.1, -2.0]] * n, "skip_reason": None,
            "skip_detail": None}


def write_set(out, rows, checker="toy", teacher="t", version=SCHEMA_VERSION, per_shard=7):
    """A complete shard set of ``rows`` through the teacher stage's writer and manifest, ``per_shard`` rows a
    file; ``version=1``: as a v1 writer left it (the same files, no teacher column, v1 in run.json and the
    manifest)."""
    run = {"schema_version": version, "teacher": {"model": teacher, "revision": None},
           "tokenizer_fingerprint": "abc", "prompts": {"source": "x.jsonl", "checker": checker},
           "sampling": {"temperature": 1.0, "seed": 0}, "top_k_logprobs": K, "logprobs_dtype": "float16"}
    prepare_output(str(out), run, resume=True, overwrite=False)
    writer = ShardWriter(str(out), K, "float16", metadata=run)
    schema = engine_output_schema(K, "float16")
    for start in range(0, len(rows), per_shard):  # several shards
        writer.write([pa.Table.from_pylist(rows[start:start + per_shard], schema=schema)])
    manifest = write_manifest(str(out))
    if version != SCHEMA_VERSION:
        manifest["schema_version"] = version
        (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def planted(tmp_path):
    """A shard set with one of each kind of bad row, and the eval file one prompt is contaminated by.

    Returns (input dir, eval file, {sample_id: expected reason}, ids expected kept)."""
    eval_problem = sentence(900)
    base = [sentence(i) for i in range(8)]
    near = base[1].split()
    near[40] = "zebra"  # one word edited: Jaccard of 3-word shingles 75/81
    words = sentence(901, 12).split()
    contaminated = " ".join(words[:6] + eval_problem.split()[10:18] + words[6:])  # an 8-gram of the eval problem
    rows, expect = [], {}

    def add(r, reason=None):
        rows.append(r)
        expect[r["sample_id"]] = reason

    for i, p in enumerate(base):
        add(row(p, 0, trace("7", f"steps {i} a")))
        add(row(p, 1, trace("7", f"steps {i} a b")))
    # Of two duplicate prompts the first by prompt_id stays: here the planted copy or the original.
    for copy, base_index, reason in ((row("  " + base[0].upper().replace(" ", "   ") + " ", 0, trace("7", "other")),
                                      0, "duplicate_prompt"),
                                     (row(" ".join(near), 0, trace("7", "near")), 1, "near_duplicate_prompt")):
        original = [r for r in rows if r["prompt_id"] == row(base[base_index], 0, "")["prompt_id"]]
        add(copy, reason if original[0]["prompt_id"] < copy["prompt_id"] else None)
        for r in original if expect[copy["sample_id"]] is None else []:
            expect[r["sample_id"]] = reason
    add(row(contaminated, 0, trace("7", "leak")), "contaminated")
    add(row(base[2], 2, trace("7", "cut off"), finish="length"), "truncated")
    add(row(base[3], 2, trace("8", "wrong"), correct=False), "incorrect")
    add(row(base[4], 2, trace("7", "steps 4 a")), "duplicate_completion")
    add(row(base[5], 2, "7 without a think block"), "bad_format")
    add(row(base[6], 2, trace("7", "a much longer and correct trace than the others")), "over_max_correct")
    inp = tmp_path / "in"
    write_set(inp, rows)
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": eval_problem, "answer": "1"}) + "\n")
    return inp, eval_file, expect


def curate_config(tmp_path, inputs, **curate):
    tree = {"curate": {"inputs": [str(i) for i in inputs], "output": str(tmp_path / "out"), **curate}}
    return build_config(tree)


ALL_FILTERS = {"verify": {"correct_only": True, "max_correct_per_prompt": 2, "prefer_shortest": True,
                          "drop_truncated": True},
               "length": {"require_think": True}}


# ---------------------------------------------------------------- the stage on Ray Data


def test_curate_removes_planted_rows_by_reason(ray_session, tmp_path, monkeypatch):
    from distill_llm.curation import stage
    from distill_llm.curation.stage import curate

    monkeypatch.setattr(stage, "GROUP_ROWS", 14)  # the planted set's 7-row files in groups of two: 2 tasks a pass
    inp, eval_file, expect = planted(tmp_path)
    assert len(stage.file_groups(read_manifest(str(inp)))) > 1
    cfg = curate_config(tmp_path, [inp], decontaminate=[str(eval_file)], **ALL_FILTERS)
    manifest = curate(cfg)
    wanted = {reason: sum(1 for r in expect.values() if r == reason) for reason in set(expect.values()) - {None}}
    assert manifest["curate"]["removed"] == wanted
    assert manifest["rejected"] == wanted
    out = read_shards(str(tmp_path / "out"))
    assert sorted(out["sample_id"].to_pylist()) == sorted(s for s, r in expect.items() if r is None)
    # the input's schema, top-k columns included, plus the v2 teacher and kd_weight columns
    assert pq.read_schema(shard_files(str(tmp_path / "out"))[0]).remove_metadata() == \
        pq.read_schema(shard_files(str(inp))[0]).remove_metadata().append(pa.field("teacher", pa.string())).append(
            pa.field("kd_weight", pa.float32()))
    assert set(out["kd_weight"].to_pylist()) == {1.0}
    assert set(out["teacher"].to_pylist()) == {"t"}
    rejects = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "out" / "rejects").glob("*.parquet")])
    assert dict(zip(rejects["sample_id"].to_pylist(), rejects["reason"].to_pylist())) == \
        {s: r for s, r in expect.items() if r is not None}
    saved = read_manifest(str(tmp_path / "out"))["curate"]["inputs"][0]
    assert saved["manifest_sha256"] == __import__("hashlib").sha256((inp / "manifest.json").read_bytes()).hexdigest()
    # A rerun resumes: nothing is committed twice and the set is the same; other settings are refused.
    files = sorted(p.name for p in (tmp_path / "out").rglob("*.parquet"))
    again = curate(cfg)
    assert again["shards"] == manifest["shards"] and again["rejected"] == wanted
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.parquet")) == files
    cfg.curate.verify.correct_only = False
    with pytest.raises(ConfigError, match=r"curate.verify.correct_only: True -> False(.|\n)*curate.overwrite=true"):
        curate(cfg)


def test_curate_merges_two_teachers_and_weights_them(ray_session, tmp_path):
    """Two teachers' sets of the same prompts: a teacher column, distinct sample ids, identical completions
    across teachers removed, the second input kept at weight 0.5; a v1 input (no teacher column) reads."""
    from distill_llm.curation.stage import curate

    prompts = [sentence(100 + i) for i in range(6)]
    write_set(tmp_path / "a", [row(p, 0, trace("7", f"a{i}")) for i, p in enumerate(prompts)], teacher="ta", version=1)
    write_set(tmp_path / "b", [row(p, 0, trace("7", f"b{i}")) for i, p in enumerate(prompts)]
              + [row(prompts[0], 1, trace("7", "a0"))], teacher="tb")  # the same completion as teacher a's
    cfg = build_config({"curate": {"inputs": [str(tmp_path / "a"),
                                              {"dir": str(tmp_path / "b"), "weight": 0.5, "kd_weight": 0.0}],
                                   "output": str(tmp_path / "out")}})
    manifest = curate(cfg)
    removed = manifest["curate"]["removed"]
    assert removed["duplicate_completion"] == 1
    out = read_shards(str(tmp_path / "out"))
    ids = out["sample_id"].to_pylist()
    assert {i[:3]: t for i, t in zip(ids, out["teacher"].to_pylist())} == {"t0:": "ta", "t1:": "tb"}
    assert len([i for i in ids if i.startswith("t0:")]) == 6  # weight 1: every surviving row
    kept_b = len([i for i in ids if i.startswith("t1:")])
    assert kept_b + removed.get("mixing_weight", 0) == 6 and 0 < kept_b < 6
    assert {i[:3]: w for i, w in zip(ids, out["kd_weight"].to_pylist())} == {"t0:": 1.0, "t1:": 0.0}
    # Training reads the weights; a set without them, trained beside, gets weight 1.
    from distill_llm.student.stage import training_dataset

    files = {str(tmp_path / d): shard_files(str(tmp_path / d)) for d in ("out", "a")}
    rows = training_dataset(build_config({}), files, with_topk=True).to_arrow_refs()
    table = pa.concat_tables([__import__("ray").get(r) for r in rows])
    weight_of = dict(zip(table["sample_id"].to_pylist(), table["kd_weight"].to_pylist()))
    assert len(weight_of) == out.num_rows + 6
    assert sorted(set(weight_of.values())) == [0.0, 1.0]
    assert all(weight_of[i] == 0.0 for i in ids if i.startswith("t1:"))
    assert "kd_weight" not in training_dataset(build_config({}), files, with_topk=False).schema().names


def test_curate_refuses_before_work(tmp_path):
    from distill_llm.curation.stage import curate

    inp = tmp_path / "in"
    write_set(inp, [row(sentence(1), 0, trace("7"), correct=None)], checker="none")
    with pytest.raises(ConfigError, match="curate.verify.correct_only needs an answer verdict"):
        curate(curate_config(tmp_path, [inp], verify={"correct_only": True}))
    with pytest.raises(ConfigError, match="curate.output are both"):
        curate(build_config({"curate": {"inputs": [str(inp)], "output": str(inp)}}))
    with pytest.raises(ConfigError, match="no manifest.json"):
        curate(curate_config(tmp_path, [tmp_path / "missing"]))
    with pytest.raises(ConfigError, match="curate: the config has no curate section"):
        curate(build_config({}))
    with pytest.raises(ConfigError, match="curate.difficulty.student_max_pass_rate needs an answer checker"):
        curate(curate_config(tmp_path, [inp], difficulty={"student_max_pass_rate": 0.5}))
    with pytest.raises(ConfigError, match="curate.difficulty.drop_unsolved needs an answer verdict"):
        curate(curate_config(tmp_path, [inp], difficulty={"drop_unsolved": True}))


def test_submit_curate_is_checked_before_anything_is_sent(tmp_path, monkeypatch, capsys):
    """`distill-llm submit --stage curate`: the job runs pipelines.curate; a config without a curate section
    or with relative curate paths is refused here (exit 2), before the job server is contacted."""
    import shlex

    from distill_llm.cli import main
    from distill_llm.cluster import jobs

    assert shlex.split(jobs.entrypoint("curate", ["curate.output=s3://b/c"]))[:3] == ["python", "-m", "pipelines.curate"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    closed = "http://127.0.0.1:9"  # nothing may be sent: every refusal comes before the address is used
    plain = tmp_path / "plain.yaml"
    plain.write_text("train: {alpha: 0.5}\n")
    assert main(["submit", str(plain), "--stage", "curate", "--address", closed]) == 2
    assert "curate: the config has no curate section" in capsys.readouterr().err
    curated = tmp_path / "curate.yaml"
    curated.write_text("curate: {inputs: [/data/shards], output: runs/curated}\n")
    assert main(["submit", str(curated), "--stage", "curate", "--address", closed]) == 2
    assert "curate.output=runs/curated is a relative path" in capsys.readouterr().err
    assert main(["submit", str(curated), "--stage", "curate", "--address", closed,
                 "curate.inputs=[shards]", "curate.output=s3://b/c"]) == 2
    assert "curate.inputs[0].dir=shards is a relative path" in capsys.readouterr().err
    jobs.check_cluster_paths(build_config({"curate": {"inputs": ["s3://b/a"], "output": "/shared/c"}}), "curate")


def test_curate_refuses_to_keep_nothing(ray_session, tmp_path):
    from distill_llm.curation.stage import curate

    inp = tmp_path / "in"
    write_set(inp, [row(sentence(i), 0, trace("8"), correct=False) for i in range(3)])
    with pytest.raises(ConfigError, match=r"every one of the 3 input rows would be removed \(\{'incorrect': 3\}\)"):
        curate(curate_config(tmp_path, [inp], verify={"correct_only": True}))
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- the filters alone


def test_minhash_estimates_jaccard():
    hasher = filters.MinHasher(num_perm=256)
    a = sentence(5, 60)
    words = a.split()
    for edits in (1, 5, 20):
        b = words.copy()
        for j in range(edits):
            b[3 * j] = f"w{j}"
        b = " ".join(b)
        exact = len(hasher.shingles(a) & hasher.shingles(b)) / len(hasher.shingles(a) | hasher.shingles(b))
        estimate = filters.estimated_jaccard(hasher.signature(a), hasher.signature(b))
        assert abs(estimate - exact) < 0.1, (edits, exact, estimate)
    assert filters.estimated_jaccard(hasher.signature(a), hasher.signature(a.upper())) == 1.0


def test_lsh_bands_put_the_threshold_where_asked():
    bands, rows = filters.lsh_params(0.8, 128)
    assert bands * rows <= 128
    collide = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
    assert collide(0.9) > 0.9 and collide(0.5) < 0.1


def test_think_format():
    assert filters.has_think_block("<think>a</think>7")
    assert not filters.has_think_block("7")
    assert not filters.has_think_block("<think>a</think>")
    assert not filters.has_think_block("<think>a<think>b</think>7")


def test_decontamination_needs_a_whole_ngram():
    grams = frozenset(filters.word_ngrams("one two three four five six seven eight nine", 8))
    spec = filters.FeatureSpec(eval_ngrams=grams, ngram=8)
    assert filters.contaminated("zero ONE two three  four five six seven eight ten", spec)
    assert not filters.contaminated("one two three four five six seven nine", spec)


def test_plan_counts_curate_rows(tmp_path):
    from distill_llm.cluster.plan import (CURATE_FEATURE_BYTES_PER_ROW, CURATE_WORKER_BYTES, MODEL_TABLE, ModelShape,
                                          make_plan)

    qwen = ModelShape(**MODEL_TABLE["Qwen/Qwen2.5-7B"], source="table")
    write_set(tmp_path / "other", [row(sentence(i), 0, trace("7")) for i in range(5)])
    overrides = {"data": {"num_prompts": 100}, "generate": {"samples_per_prompt": 2},
                 "output": {"dir": str(tmp_path / "gen")},
                 "curate": {"inputs": [str(tmp_path / "gen"), str(tmp_path / "other")], "output": str(tmp_path / "out")}}
    numbers = make_plan(build_config(overrides), qwen, qwen).numbers
    assert numbers["curate input rows"] == 200 + 5 and numbers["curate output rows"] == 205
    assert numbers["curate worker memory"] == CURATE_WORKER_BYTES
    assert numbers["curate object store"] == 205 * CURATE_FEATURE_BYTES_PER_ROW
    run = {"schema_version": SCHEMA_VERSION, "top_k_logprobs": K}
    prepare_output(str(tmp_path / "out"), run, resume=True, overwrite=False)
    ShardWriter(str(tmp_path / "out"), K, "float16", metadata=run).write(
        [pa.Table.from_pylist([row(sentence(1), 0, trace("7"))], schema=engine_output_schema(K, "float16"))])
    write_manifest(str(tmp_path / "out"), extra={"curate": {"removed": {"incorrect": 204}}})
    numbers = make_plan(build_config(overrides), qwen, qwen).numbers
    assert numbers["curate output rows"] == 1


def test_curate_config_names_bad_keys():
    with pytest.raises(ConfigError, match=r"curate.verify.corect_only: unknown key \(did you mean curate.verify.correct_only"):
        build_config({"curate": {"inputs": ["a"], "output": "o", "verify": {"corect_only": True}}})
    with pytest.raises(ConfigError, match="curate.near_dup.threshold"):
        build_config({"curate": {"inputs": ["a"], "output": "o", "near_dup": {"threshold": 1.5}}})
    with pytest.raises(ConfigError, match="curate.inputs"):
        build_config({"curate": {"inputs": [], "output": "o"}})
    with pytest.raises(ConfigError, match="curate.verify: kd_weight_incorrect weighs failed traces, but correct_only"):
        build_config({"curate": {"inputs": ["a"], "output": "o",
                                 "verify": {"correct_only": True, "kd_weight_incorrect": 0}}})
    with pytest.raises(ConfigError, match=r"curate.inputs.0.kd_weight|curate.inputs\[0\].kd_weight"):
        build_config({"curate": {"inputs": [{"dir": "a", "kd_weight": -1}], "output": "o"}})
    with pytest.raises(ConfigError, match="curate.output: the URL carries credentials"):
        build_config({"curate": {"inputs": ["a"], "output": "s3://user:secret@bucket/x"}})


def test_removed_rows_are_found_by_hash_exactly():
    """The write pass finds each removed row by its sample id's hash, compared by value: the same rows as a
    lookup by value, none for an id whose hash is a removed row's but whose text is not; and by value when
    two removed ids share a hash."""
    from distill_llm.curation import stage

    ids = [f"p{i}-{s}" for i in range(300) for s in range(4)]
    removed = pa.table({"sample_id": ids[::3], "reason": ["incorrect"] * len(ids[::3])})
    batch = pa.array(ids + ["absent"], pa.string())
    by_value = pc.take(removed["sample_id"], pc.index_in(batch, value_set=removed["sample_id"]))
    index = stage.indexed(removed)
    assert "hash" in index.schema.names and index.num_rows == removed.num_rows
    assert pc.take(index["sample_id"], stage.removed_at(index, batch)).equals(by_value)
    forged = index.set_column(index.schema.get_field_index("sample_id"), "sample_id",
                              pa.array(["x" + s for s in index["sample_id"].to_pylist()]))
    assert stage.removed_at(forged, batch).null_count == len(batch)  # same hashes, other ids: nothing found
    twin = pa.concat_tables([removed, removed.slice(0, 1)])  # one id twice: its hash is shared
    assert "hash" not in stage.indexed(twin).schema.names
    assert pc.take(twin["sample_id"], stage.removed_at(stage.indexed(twin), batch)).equals(by_value)


def test_mark_keeps_a_curated_teacher_and_skips_committed_rows():
    """The write pass's batch function alone: a resumed run leaves committed rows out, a curated input's own
    teacher values stay, and each removed row carries its reason."""
    from distill_llm.curation.stage import indexed, mark

    schema = engine_output_schema(K, "float16")
    batch = pa.Table.from_pylist([row(sentence(i), 0, trace("7")) for i in range(3)], schema=schema)
    batch = batch.drop_columns(["skip_reason", "skip_detail"]).append_column("teacher", pa.array(["old", None, None], pa.string()))
    ids = ["t1:" + s for s in batch["sample_id"].to_pylist()]
    removed = pa.table({"sample_id": [ids[2]], "reason": ["incorrect"], "detail": ["the answer check failed"]})
    for decisions in (removed, indexed(removed)):  # looked up by value, and by hash as the write pass does
        out = mark(batch, (decisions, pa.array([ids[0]]), pa.array([], pa.string())), "t1:", "new")
        assert out["sample_id"].to_pylist() == ids[1:]
        assert out["teacher"].to_pylist() == ["new", "new"]
        assert out["skip_reason"].to_pylist() == [None, "incorrect"]
    assert out["kd_weight"].to_pylist() == [1.0, 1.0]
    none = pa.array([], pa.string())
    assert mark(batch, (removed, none, none), "t1:", "new")["teacher"].to_pylist()[0] == "old"
    # KD weights: the input's, times kd_weight_incorrect for a failed row, times a curated input's own.
    batch = batch.append_column("kd_weight", pa.array([0.5, None, 1.0], pa.float32()))
    out = mark(batch, (removed, none, pa.array([ids[1]])), "t1:", "new", kd_weight=0.5, kd_weight_incorrect=0.0)
    assert out["kd_weight"].to_pylist() == [0.25, 0.0, 0.5]


def test_write_pass_takes_each_files_decisions_and_cuts_shards(tmp_path, monkeypatch):
    """The two passes' per-group helpers alone: shard files are grouped by rows, the feature pass reads a
    group's files in batches and labels each row with its input and file, decisions sorted by (input, file)
    give a group's rows as a slice equal to a filter, and a group's marked rows are cut into shards of
    curate.rows_per_shard rows in order, the remainder joined to the last."""
    from distill_llm.curation import stage
    from distill_llm.curation.stage import (by_file, file_decisions, file_groups, group_features, rows_of_files,
                                            shard_chunks, with_files)

    monkeypatch.setattr(stage, "GROUP_ROWS", 10)
    shards = {"shards": [{"rows": n} for n in (4, 6, 3, 12, 2, 2)]}
    assert file_groups(shards) == [range(0, 2), range(2, 3), range(3, 4), range(4, 6)]
    assert file_groups({"shards": []}) == []
    rows = pa.Table.from_pylist([row(sentence(i), 0, trace("7")) for i in range(5)], schema=engine_output_schema(K, "float16"))
    pq.write_table(rows.slice(0, 3), tmp_path / "part-b.parquet")
    pq.write_table(rows.slice(3), tmp_path / "part-c.parquet")
    monkeypatch.setattr(stage, "BATCH_ROWS", 2)  # the files are read in three batches
    feats, n = group_features(str(tmp_path), [str(tmp_path / "part-b.parquet"), str(tmp_path / "part-c.parquet")],
                              1, 6, filters.FeatureSpec(), 3)
    whole = filters.row_features(rows.select(filters.FEATURE_COLUMNS), filters.FeatureSpec(), 1)
    assert n == 5 and feats["input"].to_pylist() == [1] * 5
    assert dict(zip(feats["sample_id"].to_pylist(), feats["file"].to_pylist())) == dict(
        zip(rows["sample_id"].to_pylist(), [6, 6, 6, 7, 7]))
    assert feats.drop_columns(["file"]).sort_by("sample_id").equals(whole.drop_columns(["file"]).sort_by("sample_id"))
    assert feats.equals(filters.order_by_partition(feats, 3))  # ordered for the decision tasks' key partitions
    rng = np.random.default_rng(0)
    table = pa.table({"input": pa.array(rng.integers(0, 2, 200), pa.int32()),
                      "file": pa.array(rng.integers(0, 5, 200), pa.int32()),
                      "sample_id": [f"s{i}" for i in range(200)]})
    removed = pa.table({"input": table["input"], "sample_id": table["sample_id"], "reason": ["incorrect"] * 200,
                        "detail": [None] * 200}, schema=pa.schema([("input", pa.int32()), ("sample_id", pa.string()),
                                                                   ("reason", pa.string()), ("detail", pa.string())]))
    joined = by_file(with_files(removed.slice(0, 150), table))
    for index in (0, 1):
        for files in (range(f, f + 1) for f in range(6)), (range(0, 2), range(2, 5), range(5, 6)):
            for group in files:
                mine = pc.and_(pc.equal(table["input"], index), pc.is_in(table["file"], pa.array(list(group), pa.int32())))
                got = rows_of_files(joined, index, group)
                assert sorted(got["sample_id"].to_pylist()) == sorted(
                    s for s, m, i in zip(table["sample_id"].to_pylist(), mine.to_pylist(), range(200)) if m and i < 150)
                assert set(got["file"].to_pylist()) <= set(group)
    group = range(2, 4)
    mine, done, failed = file_decisions(1, group, "t1:", [joined.slice(0, 70), joined.slice(70)], [by_file(table)],
                                        pa.array(["x"]))
    in_group = pc.is_in(joined["file"], pa.array([2, 3], pa.int32()))
    expect = joined.filter(pc.and_(pc.equal(joined["input"], 1), in_group))
    assert sorted(mine["sample_id"].to_pylist()) == sorted("t1:" + s for s in expect["sample_id"].to_pylist())
    assert len(failed) == table.filter(pc.and_(pc.equal(table["input"], 1),
                                               pc.is_in(table["file"], pa.array([2, 3], pa.int32())))).num_rows
    rows = [pa.table({"n": list(range(a, b))}) for a, b in ((0, 5), (5, 12), (12, 13))]
    chunks = list(shard_chunks(rows, 3))
    assert [c.num_rows for c in chunks] == [3, 3, 3, 4]
    assert pa.concat_tables(chunks)["n"].to_pylist() == list(range(13))
    assert [c.num_rows for c in shard_chunks(rows, 100)] == [13] and list(shard_chunks([], 3)) == []


@pytest.mark.slow
def test_curated_generated_set_trains(generated, tmp_path):
    """The session's real shard set curated (verified, shortest correct, no truncated trace) trains a student."""
    from conftest import small_config
    from distill_llm.curation.stage import curate
    from distill_llm.evaluation.stage import sample_passes
    from distill_llm.student.stage import train

    gen, manifest = generated
    cfg = small_config(tmp_path, data={"shards": str(tmp_path / "curated")},
                       train={"max_steps": 1, "num_workers": 1, "batch_size": 4, "log_every": 1})
    cfg.curate = {"inputs": [gen.output.dir], "output": str(tmp_path / "curated"),
                  "verify": {"correct_only": True, "prefer_shortest": True, "drop_truncated": True},
                  "difficulty": {"student_max_pass_rate": 0.0, "samples": 2}}
    with pytest.raises(ConfigError, match="needs the evaluation stage's student pass"):
        curate(cfg)
    curated = curate(cfg, sample_passes)
    # The base student's quick pass: every prompt sampled twice, its solved prompts' rows removed as too_easy.
    passes = pq.read_table(tmp_path / "curated" / "difficulty" / "student_passes.parquet").to_pylist()
    assert len(passes) == len(set(read_shards(gen.output.dir, columns=["prompt_id"])["prompt_id"].to_pylist()))
    assert {p["samples"] for p in passes} == {2}
    easy = {p["prompt_id"] for p in passes if p["correct"] > 0}
    rejects = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "curated" / "rejects").glob("*.parquet")])
    too_easy = {p for p, r in zip(rejects["prompt_id"].to_pylist(), rejects["reason"].to_pylist()) if r == "too_easy"}
    assert too_easy <= easy and curated["curate"]["student_pass"]["prompts"] == len(passes)
    rows = read_shards(str(tmp_path / "curated"), columns=["prompt_id", "answer_correct", "finish_reason"])
    assert not easy & set(rows["prompt_id"].to_pylist())
    assert curated["totals"]["rows"] + sum(curated["curate"]["removed"].values()) == manifest["totals"]["rows"]
    rerun = curate(cfg, lambda *args: pytest.fail("a rerun must read the saved pass rates, not sample again"))
    assert rerun["shards"] == curated["shards"]
    assert rows.num_rows == curated["totals"]["rows"] > 0
    assert all(rows["answer_correct"].to_pylist()) and "length" not in rows["finish_reason"].to_pylist()
    assert len(set(rows["prompt_id"].to_pylist())) == rows.num_rows, "one (the shortest) correct sample per prompt"
    assert (Path(train(cfg)) / "config.json").is_file()


def test_curate_command_and_job_entrypoint_refuse_a_config_without_curate(tmp_path):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    config = tmp_path / "c.yaml"
    config.write_text("train: {alpha: 0.5}\n")
    for cmd in (["-m", "distill_llm.cli", "curate"], ["-m", "pipelines.curate"]):
        proc = subprocess.run([sys.executable, *cmd, str(config)], capture_output=True, text=True, env=env, cwd=root,
                              timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert "distill-llm curate: error: curate: the config has no curate section" in proc.stderr


def test_decide_length_verdict_and_cap_policies():
    """The decision step alone over a hand-made feature table: each reason, and the first reason wins."""
    def feat(sid, pid, tokens, correct=True, think=True, completion=None, input_index=0):
        return {"input": input_index, "sample_id": sid, "prompt_id": pid, "key": filters.stable_hash(pid),
                "completion": completion if completion is not None else filters.stable_hash(sid), "tokens": tokens,
                "truncated": False, "think": think, "correct": correct, "contaminated": False, "bands": None}

    rows = [feat("a-0", "a", 5), feat("a-1", "a", 50), feat("a-2", "a", 500), feat("a-3", "a", 20, correct=None),
            feat("b-0", "b", 1), feat("b-1", "b", 30, think=False), feat("b-2", "b", 40, correct=False),
            feat("b-3", "b", 45)]
    table = pa.Table.from_pylist(rows, schema=filters.FEATURE_SCHEMA)
    policy = filters.Policy(near_duplicates=False, min_tokens=2, max_tokens=100, require_think=True,
                            correct_only=True, prefer_shortest=True)
    removed = filters.decide(table, policy)
    got = dict(zip(removed["sample_id"].to_pylist(), removed["reason"].to_pylist()))
    assert got == {"a-2": "too_long", "a-3": "no_verdict", "b-0": "too_short", "b-1": "bad_format",
                   "b-2": "incorrect", "a-1": "over_max_correct"}  # a-0 and b-3: the shortest correct of each
    assert dict(zip(removed["sample_id"].to_pylist(), removed["detail"].to_pylist()))["a-2"] == \
        "500 completion tokens > 100"
    # Difficulty: prompts the student solved above the rate; prompts whose every checked sample failed.
    hard = [feat("c-0", "c", 5, correct=False), feat("c-1", "c", 6, correct=False), feat("d-0", "d", 5, correct=None),
            feat("e-0", "e", 5, correct=False), feat("e-1", "e", 6), feat("f-0", "f", 5), feat("g-0", "g", 5)]
    table = pa.Table.from_pylist(hard, schema=filters.FEATURE_SCHEMA)
    policy = filters.Policy(near_duplicates=False, drop_unsolved=True, max_pass_rate=0.5,
                            pass_rates={"f": (3, 4), "g": (2, 4), "e": (4, 4)})
    removed = filters.decide(table, policy)
    got = dict(zip(removed["sample_id"].to_pylist(), removed["reason"].to_pylist()))
    assert got == {"c-0": "unsolved", "c-1": "unsolved", "f-0": "too_easy", "e-0": "too_easy", "e-1": "too_easy"}
    assert dict(zip(removed["sample_id"].to_pylist(), removed["detail"].to_pylist()))["f-0"] == \
        "the student solved 3/4 samples (> 0.5)"
    # Mixing weights draw by sample id: the same rows every time, about the weight's share of them.
    many = pa.Table.from_pylist([feat(f"m-{i}", f"m{i}", 10) for i in range(2000)], schema=filters.FEATURE_SCHEMA)
    half = filters.Policy(near_duplicates=False, weights=(0.5,))
    first, again = filters.decide(many, half), filters.decide(many, half)
    assert first.equals(again) and 900 < first.num_rows < 1100
    assert set(first["reason"].to_pylist()) == {"mixing_weight"}


# ---------------------------------------------------------------- per-sample KD weights in the student's loss


def weighted_rows(weights):
    rows = [row(sentence(i, 6), 0, trace("7", "s" * (i + 1))) for i in range(len(weights))]
    table = pa.Table.from_pylist(rows, schema=engine_output_schema(K, "float16"))
    return table.append_column("kd_weight", pa.array(weights, pa.float32()))


def kd_loss_of(batch, hidden, head, alpha=0.5):
    from distill_llm.student.losses import KDSettings, distill_loss

    return distill_loss(hidden, head, batch["targets"], batch["topk_ids"], batch["topk_logprobs"],
                        KDSettings(alpha=alpha, chunk_size=3), kd_weights=batch.get("kd_weights"))


def test_kd_weight_is_read_per_sample_by_the_loss():
    """A curated set's kd_weight column reaches the loss: weights of 1 give the unweighted route's loss and
    gradients exactly; a row of weight 0 contributes CE only (no KD gradient), a row of 0.5 half its KD."""
    import torch

    from distill_llm.student.batching import build_batch

    plain = weighted_rows([1.0, 1.0, 1.0]).drop_columns(["kd_weight"])
    args = {"max_seq_len": 64, "pad_id": 0, "with_topk": True}
    base, _ = build_batch(plain, **args)
    assert "kd_weights" not in base
    torch.manual_seed(0)
    n = base["targets"].numel()
    hidden, head = torch.randn(n, 8), torch.randn(16, 8)

    def grads(batch, alpha=0.5):
        h = hidden.clone().requires_grad_(True)
        out = kd_loss_of(batch, h, head, alpha)
        out["loss"].backward()
        return out, h.grad

    ones, _ = build_batch(weighted_rows([1.0, 1.0, 1.0]), **args)
    assert ones["kd_weights"].tolist() == [1.0] * n
    (out_base, g_base), (out_ones, g_ones) = grads(base), grads(ones)
    assert torch.equal(out_base["loss"], out_ones["loss"]) and torch.equal(g_base, g_ones)

    mixed, _ = build_batch(weighted_rows([1.0, 0.0, None]), **args)
    lengths = [len(c) for c in plain["completion_token_ids"].to_pylist()]
    zero = slice(lengths[0], lengths[0] + lengths[1])  # the positions of the weight-0 row
    assert mixed["kd_weights"][zero].eq(0).all() and mixed["kd_weights"].sum() == n - lengths[1]
    _, g_kd_only = grads(mixed, alpha=1.0)
    assert g_kd_only[zero].abs().max() == 0, "a weight-0 row has no KD gradient"
    assert g_kd_only[:lengths[0]].abs().max() > 0
    (_, g_mixed), (_, g_ce) = grads(mixed), grads(base, alpha=0.0)
    assert torch.allclose(g_mixed[zero], 0.5 * g_ce[zero]), "alpha=0.5: the weight-0 row's gradient is (1-alpha) CE's"
    half, _ = build_batch(weighted_rows([0.5, 0.5, 0.5]), **args)
    full, halved = kd_loss_of(base, hidden, head, 1.0), kd_loss_of(half, hidden, head, 1.0)
    assert torch.allclose(halved["kd"], 0.5 * full["kd"]) and torch.equal(halved["ce"], full["ce"])


@pytest.mark.slow
def test_killed_curate_run_reruns_to_the_same_set(ray_session, tmp_path):
    """`python -m pipelines.curate` SIGKILLed after its first shard commit, then the same command again: the
    curated set equals an uninterrupted run's, the committed shards are kept and no row is written twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from distill_llm.curation.stage import curate
    from test_generate_faults import kill_session

    rows = [row(sentence(i, 30), s, trace("7" if (i + s) % 3 else "8", f"steps {i} {s}"), correct=bool((i + s) % 3))
            for i in range(120) for s in range(2)]
    write_set(tmp_path / "in", rows, per_shard=60)  # 4 input files, one file group: one write task
    tree = {"curate": {"inputs": [str(tmp_path / "in")], "output": str(tmp_path / "out"), "rows_per_shard": 3,
                       "verify": {"kd_weight_incorrect": 0.0, "max_correct_per_prompt": 1}},
            "eval": {"num_prompts": 8}, "ray": {"num_cpus": 2}}
    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump(tree))
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray of its own
    log = tmp_path / "driver.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.curate", str(config)], cwd=root, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env={**env, "PYTHONPATH": str(root)})
    commits = tmp_path / "out" / "_commits"
    try:
        while not list(commits.glob("*.json")):
            assert proc.poll() is None, "the driver ended before its first commit:\n" + log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        kill_session(proc.pid)  # the killed driver's local Ray
    assert not (tmp_path / "out" / "manifest.json").exists(), "the run finished before it was killed"
    before = {p.name: p.read_bytes() for p in commits.glob("*.json")}

    cfg = build_config(tree)
    resumed = curate(cfg)  # the same command again
    tree["curate"]["output"] = str(tmp_path / "reference")
    reference = curate(build_config(tree))
    out, ref = read_shards(str(tmp_path / "out")), read_shards(str(tmp_path / "reference"))
    ids = out["sample_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a row was committed twice"
    assert out.sort_by("sample_id").equals(ref.sort_by("sample_id"))
    assert resumed["rejected"] == reference["rejected"] and resumed["totals"]["rows"] == reference["totals"]["rows"]
    assert set(out["kd_weight"].to_pylist()) == {0.0, 1.0}
    for name, record in before.items():  # what the killed run committed stays, byte for byte
        assert (commits / name).read_bytes() == record


# ---------------------------------------------------------------- decisions per key partition vs the whole


def decide_before(features, policy):
    """filters.decide as it was before the key partitions (pandas over every row at once): the oracle."""
    import pandas as pd

    df = features.drop_columns(["bands"]).to_pandas()
    df["reason"] = pd.Series([None] * len(df), dtype=object)
    df["detail"] = pd.Series([None] * len(df), dtype=object)
    df = df.sort_values(["input", "prompt_id", "sample_id"], kind="stable").reset_index(drop=True)

    def remove(mask, reason: str, detail=None) -> None:
        mask = np.asarray(mask, dtype=bool) & df["reason"].isna().to_numpy()
        df.loc[mask, "reason"] = reason
        if isinstance(detail, str):
            df.loc[mask, "detail"] = detail
        elif detail is not None:
            df.loc[mask, "detail"] = np.asarray(detail, dtype=object)[mask]

    # One prompt_id stands for each normalised prompt: the first by (input, prompt_id).
    rep = df.groupby("key", sort=False)["prompt_id"].transform("first")
    if policy.dedup_prompts:
        remove(df["prompt_id"] != rep, "duplicate_prompt", "same normalised prompt as " + rep)
    if policy.near_duplicates:
        near = near_duplicate_before(features, df)
        remove(near.notna(), "near_duplicate_prompt", "near-duplicate of prompt " + near.fillna(""))
    if policy.decontaminate:
        remove(df["contaminated"], "contaminated", "shares a word n-gram with an evaluation prompt")
    if policy.drop_truncated:
        remove(df["truncated"], "truncated", "finish_reason=length")
    count = df["tokens"].astype(str) + " completion tokens"
    remove(df["tokens"] < policy.min_tokens, "too_short", count + f" < {policy.min_tokens}")
    if policy.max_tokens is not None:
        remove(df["tokens"] > policy.max_tokens, "too_long", count + f" > {policy.max_tokens}")
    if policy.require_think:
        remove(~df["think"], "bad_format", "no <think>...</think>answer structure")
    if policy.correct_only:
        remove(df["correct"].isna(), "no_verdict", "no reference answer to check")
        remove(df["correct"] == False, "incorrect", "the answer check failed")  # noqa: E712 (a pandas mask)
    if policy.drop_unsolved:  # every verdict of the prompt (all inputs, before any removal) failed
        solved = (df["correct"] == True).groupby(df["key"]).transform("any")  # noqa: E712
        checked = df["correct"].notna().groupby(df["key"]).transform("any")
        remove(checked & ~solved, "unsolved", "no teacher sample of this prompt is correct")
    if policy.max_pass_rate is not None:
        filters.remove_too_easy(df, policy, remove)
    alive = df["reason"].isna()
    if policy.dedup_completions:
        first = df[alive].groupby(["key", "completion"], sort=False)["sample_id"].transform("first")
        dup = pd.Series(False, index=df.index)
        dup[first.index] = df.loc[first.index, "sample_id"] != first
        remove(dup, "duplicate_completion", "same completion as " + first.reindex(df.index).fillna(""))
    cap = policy.max_correct if policy.max_correct is not None else (1 if policy.prefer_shortest else None)
    if cap is not None:
        alive = df["reason"].isna() & (df["correct"] == True)  # noqa: E712
        order = ["key", "tokens", "input", "sample_id"] if policy.prefer_shortest else ["key", "input", "sample_id"]
        ranked = df[alive].sort_values(order, kind="stable")
        rank = ranked.groupby("key", sort=False).cumcount()
        over = pd.Series(False, index=df.index)
        over[rank.index] = rank >= cap
        remove(over, "over_max_correct", f"{cap} correct samples of this prompt kept"
               + (", shortest first" if policy.prefer_shortest else ""))
    if policy.weights and any(w < 1 for w in policy.weights):
        weight = df["input"].map(lambda i: policy.weights[i]).to_numpy()
        remove(np.array([filters.stable_hash("mix:" + s) / 2.0 ** 64 for s in df["sample_id"]]) >= weight, "mixing_weight", "not drawn at its input's weight")
    gone = df[df["reason"].notna()]
    return pa.table({"input": pa.array(gone["input"], pa.int32()), "sample_id": pa.array(gone["sample_id"], pa.string()),
                     "reason": pa.array(gone["reason"], pa.string()), "detail": pa.array(gone["detail"], pa.string())})


def near_duplicate_before(features, df):
    """Per row of ``df``: the prompt_id that stands for its near-duplicate cluster when that is another
    prompt's, else None. Clusters are over distinct normalised prompts; the first by (input, prompt_id)
    stands for its cluster."""
    import pandas as pd

    banded = features.filter(pc.invert(pc.is_null(features["bands"])))
    if banded.num_rows == 0:
        return pd.Series([None] * len(df), index=df.index, dtype=object)
    bands = pd.DataFrame({"input": banded["input"].to_numpy(), "prompt_id": banded["prompt_id"].to_pylist(),
                          "key": banded["key"].to_numpy(),
                          "row": list(np.array(banded["bands"].to_pylist(), dtype=np.uint64))})
    prompts = bands.sort_values(["input", "prompt_id"], kind="stable").drop_duplicates("key").reset_index(drop=True)
    component = filters.clusters(prompts["key"].to_numpy(), np.stack(prompts["row"].to_list()))
    prompts["head"] = pd.Series(prompts["prompt_id"].to_numpy()).groupby(component).transform("first")
    head_of_key = dict(zip(prompts["key"], prompts["head"]))
    own = df.groupby("key", sort=False)["prompt_id"].transform("first")
    head = df["key"].map(head_of_key)
    return head.where(head.notna() & (head != own), None)


def planted_features():
    """A feature table of two inputs (through filters.row_features, in batches of 10 rows) with exact and
    near-duplicate prompts within and across inputs, contamination, truncation, failing, unchecked and
    format-less traces, identical completions and ties of length."""
    base = [sentence(100 + i, 60) for i in range(24)]
    prompts = list(base)
    for i in range(0, 24, 4):
        prompts.append(base[i].upper())  # an exact duplicate
        words = base[i + 1].split()
        words[7] = "zebra"
        prompts.append(" ".join(words))  # a near-duplicate
    eval_problem = sentence(900, 12)
    prompts.append(" ".join(sentence(901, 6).split() + eval_problem.split()[:8]))
    spec = feature_spec(eval_problem)
    return features_of(((0, prompts), (1, prompts[::2] + [sentence(950 + i, 30) for i in range(5)])), spec)


def feature_spec(eval_problem: str = "") -> filters.FeatureSpec:
    """The planted tables' features: MinHash of 64 functions (5 bands of 11), 8-grams of ``eval_problem``."""
    spec = filters.FeatureSpec(eval_ngrams=frozenset(filters.word_ngrams(eval_problem, 8)), ngram=8,
                               minhash=filters.MinHasher(64, 3))
    spec.bands, spec.rows = filters.lsh_params(0.8, 64)
    return spec


def features_of(inputs, spec: filters.FeatureSpec) -> pa.Table:
    """filters.row_features of 4 samples per prompt of each (input index, prompts), shuffled, in batches of
    10 rows (a prompt's rows span batches, so its key carries bands in several)."""
    rng = np.random.default_rng(3)
    tables = []
    for input_index, chosen in inputs:
        rows = []
        for p in chosen:
            for s in range(4):
                step = int(rng.integers(0, 10))
                text = trace("7" if step % 3 else "8", " ".join(["s"] * step)) if step != 5 else "7 no think"
                r = row(p, s, text, correct=None if step == 4 else bool(step % 3), finish="length" if step == 1 and s == 3 else "stop")
                rows.append(r)
        order = rng.permutation(len(rows))
        table = pa.Table.from_pylist([rows[i] for i in order], schema=engine_output_schema(K, "float16"))
        tables += [filters.row_features(table.slice(start, 10).select(filters.FEATURE_COLUMNS), spec, input_index)
                   for start in range(0, table.num_rows, 10)]
    return pa.concat_tables(tables)


def test_key_partition_slices_are_the_filtered_rows():
    """key_partition and banded_rows take the rows a filter takes, in the same order, whether the block
    is ordered by partition (a few zero-copy slices) or not (many short runs: a filter)."""
    table = planted_features()
    for parts in (1, 2, 7, 20):
        for block in (table, filters.order_by_partition(table, parts)):
            part = block["key"].to_numpy() % np.uint64(parts)
            for j in range(parts):
                assert filters.key_partition(block, j, parts).equals(block.filter(pa.array(part == j)))
            assert filters.banded_rows(block).equals(block.filter(pc.is_valid(block["bands"])))
        ordered = filters.order_by_partition(table, parts)
        assert sorted(ordered["sample_id"].to_pylist()) == sorted(table["sample_id"].to_pylist())
        assert ordered["bands"].null_count == table["bands"].null_count
        assert ordered.slice(0, table.num_rows - table["bands"].null_count)["bands"].null_count == 0


def test_decisions_per_key_partition_are_the_decisions_over_every_row():
    """The stage's decision path (filters.decide per hash partition of the prompt keys, with the
    near-duplicate map over every row) removes exactly the rows, reasons and details that the decision over
    the whole table did before the partitions, under two sets of policies that use every filter."""
    table = planted_features()
    rates = {r["prompt_id"]: (3, 4) for r in table.slice(0, 10).to_pylist()}
    policies = [filters.Policy(drop_truncated=True, min_tokens=2, max_tokens=8, require_think=True,
                               correct_only=True, max_correct=2, prefer_shortest=True),
                filters.Policy(drop_unsolved=True, max_pass_rate=0.5, pass_rates=rates, max_correct=1,
                               weights=(0.7, 0.9))]
    heads = filters.near_duplicate_heads(table)
    assert heads  # the planted near-duplicates form clusters
    for policy in policies:
        before = decide_before(table, policy)
        assert set(before["reason"].to_pylist()) >= ({"duplicate_prompt", "near_duplicate_prompt", "contaminated",
                                                      "over_max_correct"})
        for parts in (1, 3, 7, 20):
            # as the stage reads them: feature blocks of 10 rows, each ordered by key partition
            blocks = [filters.order_by_partition(table.slice(start, 10), parts) for start in range(0, table.num_rows, 10)]
            assert filters.near_duplicate_heads(pa.concat_tables([filters.banded_rows(b) for b in blocks])) == heads
            for rows in (table, pa.concat_tables(blocks)):
                got = pa.concat_tables([filters.decide(pa.concat_tables([filters.key_partition(b, j, parts)
                                                                          for b in ([rows] if rows is table else blocks)]),
                                                       policy, heads) for j in range(parts)])
                key = [("input", "ascending"), ("sample_id", "ascending")]
                assert got.sort_by(key).equals(before.sort_by(key)), parts
        assert filters.decide(table, policy).sort_by(key).equals(before.sort_by(key))


def chains(seeds=(302, 303, 304), length: int = 6) -> list[list[str]]:
    """Prompts each one word from the one before (Jaccard about 0.9 of 3-word shingles), the ends of a
    chain further apart (about 0.6): a cluster only through its middle links."""
    out = []
    for seed in seeds:
        words = sentence(seed, 60).split()
        out.append([" ".join(words)])
        for i in range(1, length):
            words[9 * i] = f"edit{i}"
            out[-1].append(" ".join(words))
    return out


def test_near_duplicate_clusters_from_band_partitions_are_those_over_every_prompt():
    """The stage's distributed near-duplicate route (filters.band_links per LSH band partition over the
    feature blocks, filters.heads_of_links over their links alone) gives exactly near_duplicate_heads' map
    over every row: chains of near-duplicates whose links fall in different band partitions, exact
    duplicates of a key within and across inputs (the first by (input, prompt_id) stands for it), a key's
    bands in several blocks. Only the keys of clusters of two or more travel as links."""
    spec = feature_spec()
    chained = chains()
    tail = [c[3] for c in chained]  # in input 0 as an exact copy: the chain's head comes from input 0
    table = pa.concat_tables([planted_features(), features_of(
        ((0, [t.upper() for t in tail] + [sentence(400 + i, 60) for i in range(6)]),
         (1, [p for c in chained for p in c] + tail)), spec)])
    heads = filters.near_duplicate_heads(table)
    first = table.sort_by([("input", "ascending"), ("prompt_id", "ascending")])
    pid_key = dict(zip(first["prompt_id"].to_pylist(), first["key"].to_pylist()))
    key_pid = {k: p for p, k in reversed(list(pid_key.items()))}  # each key's first (input, prompt_id)
    clustered = set(heads) | {pid_key[p] for p in heads.values()}
    for chain in chained:
        keys = [filters.prompt_key([{"role": "user", "content": p}]) for p in chain]
        bands = [filters.band_hashes(spec.minhash.signature(p), spec.bands, spec.rows) for p in chain]
        assert not set(enumerate(bands[0])) & set(enumerate(bands[-1]))  # the ends share no bucket
        head = heads.get(keys[3], key_pid[keys[3]])
        assert {heads.get(k, key_pid[k]) for k in keys} == {head}  # one cluster through the middle links
        assert first.filter(pc.equal(first["prompt_id"], head))["input"][0].as_py() == 0  # the input-0 copy
    for parts in (1, 2, 5, 13):
        blocks = [filters.order_by_partition(table.slice(start, 10), parts) for start in range(0, table.num_rows, 10)]
        links = [filters.band_links(blocks, j, parts) for j in range(parts)]
        assert filters.heads_of_links(pa.concat_tables(links)) == heads, parts
        assert set(pa.concat_tables(links)["key"].to_pylist()) == clustered
        if parts >= 5:  # each chain's links come from several band partitions
            for chain in chained:
                keys = {filters.prompt_key([{"role": "user", "content": p}]) for p in chain}
                assert sum(bool(keys & set(l["key"].to_pylist())) for l in links) >= 2
