"""The shard contract: schema, atomic commits, manifest, verification, other readers. No engine needed."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distill_llm.corpus.schema import SCHEMA_VERSION, engine_output_schema, read_metadata, shard_schema
from distill_llm.corpus.shards import (ShardError, ShardWriter, check_compatible, inspect, prepare_output, read_manifest,
                                shard_files, write_manifest)

K = 4


def run_record(**changes):
    run = {"schema_version": SCHEMA_VERSION, "teacher": {"model": "t", "revision": None},
           "tokenizer_fingerprint": "abc", "prompts": {"source": "toy:train"},
           "sampling": {"temperature": 1.0, "seed": 0}, "top_k_logprobs": K, "logprobs_dtype": "float16"}
    run.update(changes)
    return run


def engine_rows(n, start=0, bad=()):
    """Engine output rows as the teacher returns them (shard columns + skip reason)."""
    rng = np.random.default_rng(start)
    rows = []
    for i in range(start, start + n):
        c = int(rng.integers(1, 6))
        lp = np.sort(np.log(rng.dirichlet(np.ones(K)))[None].repeat(c, 0), axis=1)[:, ::-1]
        row = {"sample_id": f"p{i}-0", "prompt_id": f"p{i}", "sample_index": 0,
               "messages": [{"role": "user", "content": f"q{i}"}], "prompt_token_ids": [1, 2, 3],
               "completion_token_ids": list(range(c)), "completion_text": "x" * c, "finish_reason": "stop",
               "answer": "1", "answer_correct": bool(i % 2), "topk_token_ids": np.arange(c * K).reshape(c, K),
               "topk_logprobs": lp, "skip_reason": None, "skip_detail": None}
        if i in bad:
            row.update({k: None for k in row if k not in ("sample_id", "prompt_id", "sample_index")})
            row.update(skip_reason="prompt_too_long", skip_detail="too long")
        rows.append(row)
    schema = engine_output_schema(K, "float16")
    cols = {}
    for f in schema:
        vals = [r[f.name] for r in rows]
        if f.name.startswith("topk_"):
            vals = [None if v is None else [list(map(float if "log" in f.name else int, x)) for x in v] for v in vals]
        cols[f.name] = pa.array(vals, type=f.type)
    return pa.table(cols, schema=schema)


def write_set(out, batches, run=None):
    run = run or run_record()
    prepare_output(str(out), run, resume=True, overwrite=False)
    writer = ShardWriter(str(out), K, "float16", metadata=run)
    for b in batches:
        writer.write([b])
    return write_manifest(str(out))


def test_schema_types_and_metadata():
    schema = shard_schema(K, "float16", {"a": 1})
    assert schema.field("topk_token_ids").type == pa.list_(pa.list_(pa.int32(), K))
    assert schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), K))
    assert schema.field("prompt_token_ids").type == pa.list_(pa.int32())
    assert read_metadata(schema) == {"a": 1}
    assert "topk_token_ids" not in shard_schema(0).names


def test_commit_manifest_and_rejects(tmp_path):
    manifest = write_set(tmp_path, [engine_rows(5), engine_rows(4, start=5, bad={6, 7})])
    assert manifest["complete"] and manifest["totals"]["rows"] == 7
    assert manifest["rejected"] == {"prompt_too_long": 2}
    assert manifest["totals"]["completion_tokens"] == sum(
        pq.read_table(f, columns=["completion_token_ids"]).column(0).combine_chunks().value_lengths().to_numpy().sum()
        for f in shard_files(str(tmp_path)))
    files = shard_files(str(tmp_path))
    meta = read_metadata(pq.read_schema(files[0]))
    assert meta["top_k_logprobs"] == K and meta["schema_version"] == SCHEMA_VERSION
    assert not list((tmp_path / "_tmp").glob("*")), "no temporary files left behind"
    info = inspect(str(tmp_path))
    assert info["rows"] == 7 and info["prompts"] == 7 and info["rejected"] == {"prompt_too_long": 2}
    assert info["answer_pass_rate"] == pytest.approx(np.mean([i % 2 for i in (0, 1, 2, 3, 4, 5, 8)]))


def test_other_readers_see_plain_parquet(tmp_path):
    write_set(tmp_path, [engine_rows(6)])
    files = shard_files(str(tmp_path))
    import duckdb
    import pandas as pd

    df = pd.read_parquet(files[0])
    assert len(df) == 6 and np.asarray(df.topk_token_ids[0][0]).shape == (K,)
    con = duckdb.connect()
    n, tokens = con.execute(f"select count(*), sum(len(completion_token_ids)) from read_parquet('{files[0]}')").fetchone()
    assert n == 6 and tokens == df.completion_token_ids.map(len).sum()
    first = con.execute(f"select topk_token_ids[1][1] from read_parquet('{files[0]}') limit 1").fetchone()[0]
    assert first == 0
    import datasets

    ds = datasets.Dataset.from_parquet(files[0])
    assert ds.num_rows == 6 and len(ds[0]["topk_logprobs"][0]) == K


def test_missing_manifest_and_wrong_version(tmp_path):
    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    with pytest.raises(ShardError, match="did not finish"):
        read_manifest(str(tmp_path))
    write_set(tmp_path / "b", [engine_rows(2)])
    path = tmp_path / "b" / "manifest.json"
    m = json.loads(path.read_text())
    m["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="schema v"):
        read_manifest(str(tmp_path / "b"))


def test_truncated_or_altered_shard_is_named(tmp_path):
    write_set(tmp_path, [engine_rows(5)])
    shard = shard_files(str(tmp_path))[0]
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[:-10])
    with pytest.raises(ShardError, match="truncated or altered"):
        shard_files(str(tmp_path))
    open(shard, "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    assert shard_files(str(tmp_path)), "same size passes the cheap check"
    with pytest.raises(ShardError, match="sha256"):
        shard_files(str(tmp_path), verify="sha256")


def test_other_run_is_refused_naming_the_difference(tmp_path):
    write_set(tmp_path, [engine_rows(3)])
    other = run_record(sampling={"temperature": 0.7, "seed": 0})
    with pytest.raises(ShardError) as err:
        prepare_output(str(tmp_path), other, resume=True, overwrite=False)
    assert "sampling.temperature: 1.0 -> 0.7" in str(err.value)
    prepare_output(str(tmp_path), other, resume=True, overwrite=True)
    assert not list(tmp_path.glob("part-*.parquet")), "overwrite starts anew"


def test_resume_knows_committed_samples_and_drops_orphans(tmp_path):
    write_set(tmp_path, [engine_rows(3), engine_rows(2, start=3, bad={4})])
    orphan = tmp_path / "part-orphan.parquet"
    orphan.write_bytes((tmp_path / shard_files(str(tmp_path))[0].split("/")[-1]).read_bytes())
    resume = prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    assert resume.done_sample_ids == {f"p{i}-0" for i in range(5)}, "rejected samples count as decided"
    assert not (tmp_path / "manifest.json").exists(), "a resumed set is incomplete until the new manifest"
    manifest = write_manifest(str(tmp_path))
    assert not orphan.exists(), "a shard without a commit record is not part of the set"
    assert manifest["totals"]["rows"] == 4


def test_sets_with_different_k_or_tokenizer_cannot_mix():
    a = {"run": run_record()}
    with pytest.raises(ShardError, match="top_k_logprobs"):
        check_compatible({"a": a, "b": {"run": run_record(top_k_logprobs=8)}})
    with pytest.raises(ShardError, match="tokenizer_fingerprint"):
        check_compatible({"a": a, "b": {"run": run_record(tokenizer_fingerprint="zzz")}})
    assert check_compatible({"a": a, "b": {"run": run_record()}})["top_k_logprobs"] == K


def test_error_budget_withholds_the_manifest(tmp_path):
    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    ShardWriter(str(tmp_path), K, "float16", run_record()).write([engine_rows(4, bad={1, 2})])
    with pytest.raises(ShardError, match="max_errored_rows"):
        write_manifest(str(tmp_path), max_rejected=1)
    assert not (tmp_path / "manifest.json").exists()


def test_a_retried_write_commits_the_same_shard_once(tmp_path):
    """A write task Ray retries after its commit writes the same rows under the same name."""
    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    writer = ShardWriter(str(tmp_path), K, "float16", run_record())
    first = writer.write([engine_rows(4, bad={1})])
    again = writer.write([engine_rows(4, bad={1}).take([3, 2, 1, 0])])  # same samples, another order
    assert first["file"] == again["file"] and first["rejects_file"] == again["rejects_file"]
    manifest = write_manifest(str(tmp_path))
    assert len(manifest["shards"]) == 1 and manifest["totals"]["rows"] == 3 and manifest["totals"]["rejected"] == 1


def test_samples_committed_twice_withhold_the_manifest(tmp_path):
    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    writer = ShardWriter(str(tmp_path), K, "float16", run_record())
    writer.write([engine_rows(3)])
    writer.write([engine_rows(3, start=2)])  # p2-0 again, in a shard of other samples
    with pytest.raises(ShardError, match="1 samples were committed more than once"):
        write_manifest(str(tmp_path))
    assert not (tmp_path / "manifest.json").exists()


def test_manifest_clears_scratch_and_attempt_records(tmp_path):
    from distill_llm.teacher.attempts import AttemptLog

    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    AttemptLog(str(tmp_path), 2).begin_batch(["p0-0"])
    (tmp_path / "_tmp" / "part-cut-off.parquet").write_bytes(b"half a shard")
    write_set(tmp_path, [engine_rows(2)])
    assert not (tmp_path / "_attempts").exists() and not (tmp_path / "_tmp").exists()
    assert len(shard_files(str(tmp_path))) == 1


def test_attempt_records_count_tries_and_stop_at_the_limit(tmp_path):
    from distill_llm.teacher.attempts import AttemptLog

    log = AttemptLog(str(tmp_path / "out"), max_row_attempts=2)
    batch = ["a-0", "b-0"]
    assert log.begin_batch(batch) == 0
    assert AttemptLog(str(tmp_path / "out"), 2).begin_batch(list(reversed(batch))) == 1, "a restarted actor sees it"
    log.end_batch(batch)
    assert log.begin_batch(batch) == 0, "a finished try leaves no record"
    assert [log.begin_row("b-0") for _ in range(4)] == [0, 1, 2, 2], "no record past the limit"
    log.end_row("b-0")
    assert log.begin_row("b-0") == 0


def test_storage_errors_say_what_is_safe(tmp_path):
    import errno

    from distill_llm.paths import WriteFailed, writing
    from distill_llm.corpus.shards import storage_errors

    write_set(tmp_path, [engine_rows(2)])
    with pytest.raises(ShardError) as err, storage_errors(str(tmp_path)):
        with writing():
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "part-x.parquet"))
    message = str(err.value)
    assert "No space left on device" in message and str(tmp_path) in message
    assert "The shards committed so far (1) are intact" in message and "rerun" in message
    with pytest.raises(ValueError, match="not storage"), storage_errors(str(tmp_path)):
        raise ValueError("not storage")
    assert issubclass(WriteFailed, OSError)
    # A write that fails inside an engine actor (its attempt record) reaches the driver as Ray Data's
    # UserCodeException, caused by the WriteFailed, wrapped in a RayTaskError: still a storage error.
    from ray.data.exceptions import UserCodeException
    from ray.exceptions import RayTaskError

    try:
        raise UserCodeException("UDF failed to process a data block.") from WriteFailed("[Errno 28] No space left")
    except UserCodeException as udf_error:
        wrapped = RayTaskError("submit", "traceback", udf_error).as_instanceof_cause()
    with pytest.raises(ShardError, match=r"failed: \[Errno 28\] No space left\. The shards committed so far"), \
            storage_errors(str(tmp_path)):
        raise wrapped


def test_a_write_whose_rows_were_all_rejected_leaves_no_shard_file(tmp_path):
    manifest = write_set(tmp_path, [engine_rows(3, bad={0, 1, 2}), engine_rows(2, start=3)])
    on_disk = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert on_disk == sorted(s["file"] for s in manifest["shards"]), "every shard file on disk is in the manifest"
    assert manifest["totals"]["rows"] == 2 and manifest["rejected"] == {"prompt_too_long": 3}
    resume = prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    assert resume.done_sample_ids == {f"p{i}-0" for i in range(5)}, "its rejects still count as decided"


def test_the_manifest_waits_for_every_sample_asked_for(tmp_path):
    prepare_output(str(tmp_path), run_record(), resume=True, overwrite=False)
    ShardWriter(str(tmp_path), K, "float16", run_record()).write([engine_rows(4, bad={1})])
    with pytest.raises(ShardError, match=r"asked for 6 samples, 3 were committed and 1 rejected: 2 samples are "
                                         r"missing. No manifest was written"):
        write_manifest(str(tmp_path), expected=6)
    assert not (tmp_path / "manifest.json").exists()
    assert write_manifest(str(tmp_path), expected=4)["complete"]


def test_the_manifest_counts_rows_whose_answer_passed(tmp_path):
    manifest = write_set(tmp_path, [engine_rows(5), engine_rows(4, start=5, bad={6})])
    passed = sum(pq.read_table(f, columns=["answer_correct"]).column(0).to_pylist().count(True)
                 for f in shard_files(str(tmp_path)))
    assert manifest["totals"]["correct"] == passed == sum(s["correct"] for s in manifest["shards"]) == 4
    old = json.loads((tmp_path / "manifest.json").read_text())  # a manifest written before the count existed
    del old["totals"]["correct"]
    for shard in old["shards"]:
        del shard["correct"]
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    from distill_llm.corpus.shards import read_shards

    assert read_shards(str(tmp_path)).num_rows == 8 and "correct" not in read_manifest(str(tmp_path))["totals"]
