"""The curation stage: shard sets in (``curate.inputs``) -> filters -> one shard set out (``curate.output``).

Two passes over the inputs, each one Ray task per group of consecutive input shard files (about 50,000
rows) in a fresh worker process, so a worker's memory is bounded by its group, not by the rows of every
input. The first reads a few light columns and computes each row's features (filters.row_features) into
the object store. Ray tasks then decide which rows go (filters.decide), one task per hash partition of the
prompt keys, so each holds a bounded share of the rows and the driver holds only object refs and counts.
The second streams every column of every row of its files through the shard writer of the teacher stage:
kept rows become shards, removed rows go to rejects/ with their reason, under the same commit protocol (a
rerun resumes; a killed run never commits a row twice) and a manifest listing the inputs, their
manifests' sha256 and the rows each filter removed.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import Config, ConfigError, CurateConfig, DataConfig
from ..corpus.schema import KD_WEIGHT_COLUMN, SCHEMA_VERSION, SKIP_DETAIL, SKIP_REASON, TEACHER_COLUMN
from ..corpus.shards import (IDENTITY_KEYS, ShardError, ShardWriter, check_compatible, prepare_output, read_manifest,
                             shard_files, storage_errors, write_manifest)
from ..paths import absolute, check_location, filesystem, join, makedirs, read_text
from . import filters

CURATE_IDENTITY = (*IDENTITY_KEYS, "curate")
VERDICT_KEYS = ("correct_only", "max_correct_per_prompt", "prefer_shortest")


def policy(c: CurateConfig, pass_rates: dict[str, tuple[int, int]] | None = None) -> filters.Policy:
    v, length = c.verify, c.length
    return filters.Policy(
        drop_unsolved=c.difficulty.drop_unsolved, max_pass_rate=c.difficulty.student_max_pass_rate,
        pass_rates=pass_rates or {},
        dedup_prompts=c.dedup_prompts, dedup_completions=c.dedup_completions, near_duplicates=c.near_dup.enabled,
        decontaminate=True, drop_truncated=v.drop_truncated, min_tokens=length.min_completion_tokens,
        max_tokens=length.max_completion_tokens, require_think=length.require_think, correct_only=v.correct_only,
        max_correct=v.max_correct_per_prompt, prefer_shortest=v.prefer_shortest,
        weights=tuple(i.weight for i in c.inputs))


def manifest_sha256(shard_dir: str) -> str:
    fs, root = filesystem(shard_dir)
    return hashlib.sha256((read_text(fs, join(root, "manifest.json")) or "").encode()).hexdigest()


def check_inputs(cfg: Config) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """Input dirs and their manifests, refused before any work when they cannot be curated as asked."""
    c = cfg.curate
    out_dir = absolute(c.output)
    dirs = [absolute(i.dir) for i in c.inputs]
    for index, d in enumerate(dirs):
        if d.rstrip("/") == out_dir.rstrip("/"):
            raise ConfigError(f"curate.inputs[{index}].dir and curate.output are both {d}: write the curated set to "
                              "another folder (curation never rewrites its input)")
        if dirs.index(d) != index:
            raise ConfigError(f"curate.inputs[{index}].dir={d} is listed twice")
    manifests = {d: read_manifest(d) for d in dirs}
    check_compatible(manifests)
    asked = [f"verify.{k}" for k in VERDICT_KEYS if getattr(c.verify, k) not in (False, None)]
    asked += ["difficulty.drop_unsolved"] if c.difficulty.drop_unsolved else []
    if asked and c.verify.checker is None:
        blind = [d for d, m in manifests.items() if (m["run"].get("prompts") or {}).get("checker", "none") == "none"]
        if blind:
            raise ConfigError(f"curate.{asked[0]} needs an answer verdict, but {blind[0]} was generated with "
                              "data.checker=none (its rows carry no answer_correct): set curate.verify.checker "
                              "(math, exact, toy or pkg.module:function) to check the answers now")
    if c.difficulty.student_max_pass_rate is not None and student_checker(c, manifests) is None:
        raise ConfigError("curate.difficulty.student_max_pass_rate needs an answer checker for the student's "
                          "samples, but the inputs were generated with data.checker=none: set curate.verify.checker")
    if c.verify.checker is not None:
        try:
            filters.resolve_checker(c.verify.checker)
        except (ImportError, AttributeError, ConfigError) as err:
            raise ConfigError(f"curate.verify.checker={c.verify.checker}: {err}") from None
    return dirs, manifests


def student_checker(c: CurateConfig, manifests: dict[str, dict[str, Any]]) -> str | None:
    """The checker of the difficulty pass: curate.verify.checker, else the inputs' data.checker."""
    if c.verify.checker is not None:
        return c.verify.checker
    names = [(m["run"].get("prompts") or {}).get("checker", "none") for m in manifests.values()]
    return next((n for n in names if n != "none"), None)


def teacher_label(c: CurateConfig, index: int, manifest: dict[str, Any]) -> str:
    return c.inputs[index].teacher or (manifest["run"].get("teacher") or {}).get("model") or f"input-{index}"


def run_record(cfg: Config, dirs: list[str], manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The curated set's run.json: the inputs' shared run description plus what curation did to them."""
    c = cfg.curate
    base = dict(manifests[dirs[0]]["run"])
    inputs = [{"dir": d, "manifest_sha256": manifest_sha256(d), "rows": manifests[d]["totals"]["rows"],
               "teacher": teacher_label(c, i, manifests[d]), "weight": c.inputs[i].weight,
               "kd_weight": c.inputs[i].kd_weight}
              for i, d in enumerate(dirs)]
    settings = c.model_dump(mode="json", exclude={"inputs", "output", "resume", "overwrite", "rows_per_shard"})
    settings["eval_prompts"] = cfg.eval.prompts
    return {**base, "schema_version": SCHEMA_VERSION, "curate": {"inputs": inputs, **settings}}


def eval_ngrams(cfg: Config) -> frozenset:
    """Every n-gram of the evaluation prompts: eval.prompts (all of its rows) and curate.decontaminate."""
    from ..corpus.prompts import read_prompts

    c = cfg.curate
    grams: set[str] = set()
    for key, source in [("eval.prompts", cfg.eval.prompts)] + [(f"curate.decontaminate[{i}]", s)
                                                               for i, s in enumerate(c.decontaminate)]:
        try:
            ds = read_prompts(DataConfig(prompts=source), source, None)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        for batch in ds.select_columns(["messages", SKIP_REASON]).iter_batches(batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row[SKIP_REASON] is None:
                    grams |= filters.word_ngrams(filters.prompt_text(row["messages"]), c.decontaminate_ngram)
    return frozenset(grams)


def feature_spec(c: CurateConfig, grams: frozenset) -> filters.FeatureSpec:
    spec = filters.FeatureSpec(eval_ngrams=grams, ngram=c.decontaminate_ngram,
                               decontaminate_completions=c.decontaminate_completions, checker=c.verify.checker)
    if c.near_dup.enabled:
        spec.minhash = filters.MinHasher(c.near_dup.num_perm, c.near_dup.shingle_words)
        spec.bands, spec.rows = filters.lsh_params(c.near_dup.threshold, c.near_dup.num_perm)
    return spec


# Arrow thread pools of the read tasks. Ray Data's Parquet reader sets them to 32 CPU and 128 IO threads per
# process (tuned for S3), each decoding column chunks at once with its own allocator cache, so a reader
# worker's private memory rises with the files a read task bundles. A few threads suffice for shard files;
# the read tasks then run in workers of their own (their env differs from the other tasks').
READER_THREADS = {"RAY_DATA_PARQUET_READER_CPU_COUNT": "2", "RAY_DATA_PARQUET_READER_IO_THREAD_COUNT": "4"}


def read_input(shard_dir: str, columns: list[str] | None = None):
    """A Ray Dataset of a complete shard set's rows (files checked against its manifest)."""
    import ray.data

    fs, _ = filesystem(shard_dir)
    ds = ray.data.read_parquet(shard_files(shard_dir), filesystem=fs, runtime_env={"env_vars": READER_THREADS})
    return ds.select_columns(columns) if columns else ds


# Input rows per decision task (a hash partition of the prompt keys): bounds each task's memory.
PARTITION_ROWS = 50_000
# Rows per batch of both passes' tasks: the feature pass holds a batch as Python objects.
BATCH_ROWS = 10_000
# Input rows per task of both passes: consecutive shard files are grouped up to this many rows (a larger
# file alone), so a task's memory is bounded by its group and a fresh worker is started once per group, not
# once per shard file (the teacher stage writes files of about 4,096 rows).
GROUP_ROWS = 50_000


def file_groups(manifest: dict[str, Any]) -> list[range]:
    """A shard set's files (indices into its manifest's shards, shard_files' order) as consecutive runs of
    at most GROUP_ROWS rows; a file of more rows makes a group of its own."""
    groups, start, rows = [], 0, 0
    for i, shard in enumerate(manifest["shards"]):
        if i > start and rows + shard["rows"] > GROUP_ROWS:
            groups.append(range(start, i))
            start, rows = i, 0
        rows += shard["rows"]
    return groups + ([range(start, len(manifest["shards"]))] if manifest["shards"] else [])


def read_group(shard_dir: str, paths: list[str], columns: list[str] | None = None):
    """The rows of a group's shard files, BATCH_ROWS at a time, as (file's index in ``paths``, table)."""
    import pyarrow.parquet as pq

    fs, _ = filesystem(shard_dir)
    for at, path in enumerate(paths):
        with fs.open_input_file(path) as f:
            for b in pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns):
                yield at, pa.Table.from_batches([b])


# The per-group and per-partition tasks each run in a process of their own: a worker that ran other tasks
# before keeps the heap they grew and every object-store page they read or wrote mapped, so a reused
# worker's memory would add up its share of every group and partition, growing with the inputs. Ray's
# max_calls ends the worker after its task; the env var gives these tasks a worker pool of their own, so
# no worker that ran another task (a band task, Ray Data's) is leased to them.
FRESH_WORKER = {"max_calls": 1, "runtime_env": {"env_vars": {"DISTILL_LLM_CURATE_TASK": "1"}}}


def fresh_task(fn, **options):
    """``fn`` as a Ray task that runs in a fresh worker process (FRESH_WORKER)."""
    import ray

    return ray.remote(**FRESH_WORKER, **options)(fn)


def partitions(rows: int) -> int:
    """Decision tasks (key partitions) for ``rows`` input rows: PARTITION_ROWS rows each."""
    return max(1, -(-rows // PARTITION_ROWS))


def group_features(shard_dir: str, paths: list[str], index: int, first: int, spec: filters.FeatureSpec,
                   parts: int) -> tuple[pa.Table, int]:
    """The feature rows of a group of input ``index``'s shard files (a Ray task; ``first``: the index of
    ``paths[0]`` in shard_files), the light columns read BATCH_ROWS rows at a time, ordered for ``parts`` key
    partitions (filters.order_by_partition); and their row count."""
    tables = [filters.row_features(b.append_column("file", pa.array(np.full(b.num_rows, first + at, np.int32))),
                                   spec, index)
              for at, b in read_group(shard_dir, paths, filters.FEATURE_COLUMNS)]
    table = pa.concat_tables(tables) if tables else filters.FEATURE_SCHEMA.empty_table()
    return filters.order_by_partition(table, parts), table.num_rows


def input_groups(dirs: list[str], manifests: dict[str, dict[str, Any]]) -> list[tuple[int, str, list[str], int]]:
    """The tasks of both passes, one per file group (file_groups) of every input: (input index, input dir,
    the group's shard paths, the first one's index in shard_files). Each input is listed once: the listing
    reads its manifest and checks every file."""
    groups = []
    for i, d in enumerate(dirs):
        paths = shard_files(d)
        groups += [(i, d, paths[g.start:g.stop], g.start) for g in file_groups(manifests[d])]
    return groups


def features(groups: list[tuple[int, str, list[str], int]], spec: filters.FeatureSpec,
             parts: int) -> tuple[list, int]:
    """The first pass: the slim feature table of every input row as object refs, one per file group
    (input_groups; left in the object store), each ordered for ``parts`` key partitions, and the row count."""
    import ray

    task = fresh_task(group_features, num_returns=2)
    spec_ref = ray.put(spec)
    outs = [task.remote(d, paths, i, first, spec_ref, parts) for i, d, paths, first in groups]
    return [o[0] for o in outs], sum(ray.get([o[1] for o in outs]))


def feature_rows(refs: list, part: int, parts: int) -> pa.Table:
    """The feature rows whose prompt key falls in hash partition ``part`` of ``parts`` (in a Ray task)."""
    import ray

    tables = [filters.key_partition(ray.get(ref), part, parts) for ref in refs]
    tables = [t for t in tables if t.num_rows]
    return pa.concat_tables(tables).cast(filters.FEATURE_SCHEMA) if tables else filters.FEATURE_SCHEMA.empty_table()


def band_task(refs: list, part: int, parts: int) -> pa.Table:
    """LSH band partition ``part`` of ``parts`` of the near-duplicate search over every feature block (a
    Ray task, filters.band_links): only the links of prompts sharing a bucket come back."""
    import ray

    return filters.band_links((ray.get(ref) for ref in refs), part, parts)


def heads_task(*links: pa.Table) -> dict[int, str]:
    """The near-duplicate map over every prompt (a Ray task) from the band tasks' links alone."""
    return filters.heads_of_links(pa.concat_tables(links))


def near_duplicates(refs: list, parts: int):
    """A ref of the near-duplicate map: one band task per LSH band partition (``parts``, as many as the key
    partitions), each holding its share of every prompt's bands, then heads_task over their links."""
    import ray

    links = [ray.remote(band_task).remote(refs, j, parts) for j in range(parts)]
    return ray.remote(heads_task).remote(*links)


def decide_task(refs: list, part: int, parts: int, pol: filters.Policy, heads: dict[int, str] | None,
                weigh_failed: bool) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """One key partition's decisions (a Ray task): its removed rows, its failed rows (see failed_rows) and
    {rows, removed: counts by reason}. Every decision but the near-duplicate clusters (``heads``, over
    every prompt) depends on the rows of one prompt key only, so the partitions decide as the whole would."""
    table = feature_rows(refs, part, parts)
    removed = filters.decide(table, pol, heads if pol.near_duplicates else {})
    stats = {"rows": table.num_rows, "removed": removed_counts(removed)}
    return by_file(with_files(removed, table)), by_file(failed_rows(table, weigh_failed)), stats


def with_files(removed: pa.Table, table: pa.Table) -> pa.Table:
    """filters.decide's removed rows with their shard file (``file``), looked up in the feature rows
    ``table`` by (input, sample_id)."""
    return removed.join(table.select(["input", "sample_id", "file"]), keys=["input", "sample_id"])


def by_file(table: pa.Table) -> pa.Table:
    """Rows sorted by (input, file), so each write task takes its files' rows as one slice (rows_of_files)."""
    return table.sort_by([("input", "ascending"), ("file", "ascending")]).combine_chunks()


def rows_of_files(table: pa.Table, index: int, files: range) -> pa.Table:
    """The rows of input ``index``'s shard files ``files`` (consecutive) in a table sorted by by_file: a
    zero-copy slice, so a write task touches only its own files' decisions."""
    code = (table["input"].to_numpy().astype(np.int64) << 32) | pc.fill_null(table["file"], -1).to_numpy()
    lo, hi = np.searchsorted(code, [(index << 32) | files.start, (index << 32) | files.stop])
    return table.slice(lo, hi - lo)


def decide_all(refs: list, rows: int, parts: int, pol: filters.Policy,
               weigh_failed: bool) -> tuple[list, list, dict[str, int]]:
    """Every partition decided by Ray tasks: refs of the removed and failed rows per partition, and the
    removed counts; refuses a curation that keeps nothing (it would train nothing), before writing."""
    import ray

    heads = near_duplicates(refs, parts) if pol.near_duplicates else None
    pol_ref = ray.put(pol)
    task = fresh_task(decide_task, num_returns=3)
    outs = [task.remote(refs, j, parts, pol_ref, heads, weigh_failed) for j in range(parts)]
    stats = ray.get([o[2] for o in outs])
    counts = {r: sum(s["removed"].get(r, 0) for s in stats) for r in filters.REASONS}
    counts = {r: n for r, n in counts.items() if n}
    if rows and sum(counts.values()) == rows:
        raise ConfigError(f"curate: every one of the {rows:,} input rows would be removed "
                          f"({counts}); loosen the filters that removed the most")
    return [o[0] for o in outs], [o[1] for o in outs], counts


def mark(batch: pa.Table, decisions: tuple, prefix: str, teacher: str, kd_weight: float = 1.0,
         kd_weight_incorrect: float | None = None) -> pa.Table:
    """A shard batch as the writer takes it: output sample ids, the teacher column (a curated input's own
    values kept), the KD weight column (see kd_weights), rows committed before (a resumed run) left out,
    and the removal reason (null: kept). ``decisions``: (removed rows, committed ids, failed ids)."""
    removed, done, failed = decisions
    label = pa.array([teacher] * batch.num_rows, pa.string())
    if TEACHER_COLUMN in batch.schema.names:
        where = batch.schema.get_field_index(TEACHER_COLUMN)
        batch = batch.set_column(where, TEACHER_COLUMN, pc.coalesce(batch[TEACHER_COLUMN], label))
    else:
        batch = batch.append_column(TEACHER_COLUMN, label)
    sample_ids = pc.binary_join_element_wise(pa.scalar(prefix), batch["sample_id"], "") if prefix else batch["sample_id"]
    batch = batch.set_column(batch.schema.get_field_index("sample_id"), "sample_id", sample_ids)
    weights = kd_weights(batch, kd_weight, failed, kd_weight_incorrect)
    if KD_WEIGHT_COLUMN in batch.schema.names:
        batch = batch.set_column(batch.schema.get_field_index(KD_WEIGHT_COLUMN), KD_WEIGHT_COLUMN, weights)
    else:
        batch = batch.append_column(KD_WEIGHT_COLUMN, weights)
    if len(done):
        batch = batch.filter(pc.invert(pc.is_in(batch["sample_id"], value_set=done)))
    where = removed_at(removed, batch["sample_id"])
    return (batch.append_column(SKIP_REASON, pc.take(removed["reason"], where))
            .append_column(SKIP_DETAIL, pc.take(removed["detail"], where)))


def id_hashes(ids) -> np.ndarray:
    """A 64-bit hash per sample id (filters.stable_hash)."""
    return np.fromiter((filters.stable_hash(s) for s in ids.to_pylist()), np.uint64, len(ids))


def indexed(removed: pa.Table) -> pa.Table:
    """The removed rows sorted by a 64-bit hash of their sample id (column ``hash``), so each write batch
    finds its removed rows by binary search instead of hashing every removed id again; unchanged when two
    ids share a hash (``removed_at`` then looks them up by value)."""
    hashes = id_hashes(removed["sample_id"])
    order = np.argsort(hashes, kind="stable")
    if np.any(np.diff(hashes[order]) == 0):
        return removed
    return removed.take(pa.array(order)).append_column("hash", pa.array(hashes[order])).combine_chunks()


def removed_at(removed: pa.Table, sample_ids) -> pa.Array:
    """Per sample id: its row in ``removed``, null when it is kept; exact (a hash hit is compared by value)."""
    if "hash" not in removed.schema.names or removed.num_rows == 0:
        return pc.index_in(sample_ids, value_set=removed["sample_id"])
    known, hashes = removed["hash"].to_numpy(), id_hashes(sample_ids)
    at = np.minimum(np.searchsorted(known, hashes), len(known) - 1)
    hit = known[at] == hashes
    same = pc.equal(removed["sample_id"].take(pa.array(at[hit])), pc.filter(sample_ids, pa.array(hit)))
    hit[hit] = same.to_numpy(zero_copy_only=False)
    return pa.array(at, pa.int64(), mask=~hit)


def kd_weights(batch: pa.Table, kd_weight: float, failed: pa.Array, kd_weight_incorrect: float | None) -> pa.Array:
    """Per row: the input's ``kd_weight``, times ``kd_weight_incorrect`` for a row whose answer check failed
    (``failed``: output sample ids), times the row's own weight when the input is itself curated."""
    import numpy as np

    w = np.full(batch.num_rows, kd_weight, dtype=np.float32)
    if kd_weight_incorrect is not None and len(failed):
        w[pc.is_in(batch["sample_id"], value_set=failed).to_numpy(zero_copy_only=False)] *= kd_weight_incorrect
    if KD_WEIGHT_COLUMN in batch.schema.names:
        w *= pc.fill_null(batch[KD_WEIGHT_COLUMN], 1.0).to_numpy().astype(np.float32)
    return pa.array(w, pa.float32())


def prefixes(dirs: list[str]) -> list[str]:
    """Sample id prefixes: none for one input; ``t<i>:`` per input otherwise, since teachers run on the same
    prompts give the same sample ids."""
    return [""] if len(dirs) == 1 else [f"t{i}:" for i in range(len(dirs))]


def removed_counts(removed: pa.Table) -> dict[str, int]:
    counts = pc.value_counts(removed["reason"]).to_pylist() if removed.num_rows else []
    found = {c["values"]: c["counts"] for c in counts}
    return {reason: found[reason] for reason in filters.REASONS if reason in found}


def file_decisions(index: int, files: range, prefix: str, removed: list, failed: list,
                   done_ids: pa.Array) -> tuple:
    """mark's decisions for a group of shard files (in its write task, from every partition's refs): their
    removed rows and failed rows by output sample id, and the ids committed before. ``removed``, ``failed``:
    object refs of decide_task's tables, or the tables."""
    import ray

    def mine(refs: list) -> pa.Table:
        tables = [ray.get(r) if isinstance(r, ray.ObjectRef) else r for r in refs]
        table = pa.concat_tables([rows_of_files(t, index, files) for t in tables]).drop_columns(["input", "file"])
        ids = pc.binary_join_element_wise(pa.scalar(prefix), table["sample_id"], "") if prefix else table["sample_id"]
        return table.set_column(table.schema.get_field_index("sample_id"), "sample_id", ids.combine_chunks())

    return indexed(mine(removed)), done_ids, mine(failed)["sample_id"].combine_chunks()


def shard_chunks(tables, rows: int):
    """The rows of ``tables`` in order, cut into shards of ``rows`` rows; the last shard takes the remainder
    too (``rows`` to 2 x ``rows`` - 1 rows; fewer only when there are fewer in all)."""
    pending = None
    for table in tables:
        pending = table if pending is None else pa.concat_tables([pending, table])
        while pending.num_rows >= 2 * rows:
            yield pending.slice(0, rows)
            pending = pending.slice(rows)
    if pending is not None and pending.num_rows:
        yield pending


def write_group(shard_dir: str, paths: list[str], index: int, first: int, prefix: str, removed: list,
                failed: list, done_ids: pa.Array, writer: ShardWriter, rows_per_shard: int,
                marking: dict[str, Any]) -> list:
    """A group of input shard files through mark and the writer (a Ray task; ``first``: the index of
    ``paths[0]`` in shard_files): read BATCH_ROWS rows at a time, committed in shards of
    curate.rows_per_shard rows; its commit records. A task holds its group's decisions and a shard's rows,
    however many rows the inputs hold."""
    decisions = file_decisions(index, range(first, first + len(paths)), prefix, removed, failed, done_ids)
    marked = (mark(b, decisions, prefix, **marking) for _, b in read_group(shard_dir, paths))
    return [writer.write([chunk]) for chunk in shard_chunks(marked, rows_per_shard)]


def write_pass(cfg: Config, dirs: list[str], groups: list[tuple[int, str, list[str], int]], removed: list,
               done: set[str], run: dict[str, Any], failed: list) -> None:
    """The second pass: every input row through the teacher stage's writer (shards + rejects, committed),
    one Ray task per file group (input_groups). ``removed``, ``failed``: refs of decide_task's removed and
    failed rows (the rows whose answer check failed, weighted by kd_weight_incorrect) per partition; each
    task takes its own files' share of them."""
    import ray

    c = cfg.curate
    done_ids = pa.array(sorted(done), pa.string())
    labels = [t["teacher"] for t in run["curate"]["inputs"]]
    writer = ShardWriter(absolute(c.output), run.get("top_k_logprobs") or 0, run.get("logprobs_dtype") or "float16",
                         metadata=run, teacher_column=True)
    task = fresh_task(write_group)
    refs = [ray.put(x) for x in (removed, failed, done_ids, writer)]
    markings = [{"teacher": labels[i], "kd_weight": c.inputs[i].kd_weight,
                 "kd_weight_incorrect": c.verify.kd_weight_incorrect} for i in range(len(dirs))]
    ids = prefixes(dirs)
    ray.get([task.remote(d, paths, i, first, ids[i], *refs, c.rows_per_shard, markings[i])
             for i, d, paths, first in groups])


def curate(cfg: Config, sample_passes=None) -> dict[str, Any]:
    """Run the curation stage; returns the manifest of the curated set. Resumes a matching run.
    ``sample_passes``: evaluation.stage.sample_passes, for curate.difficulty.student_max_pass_rate (curation
    never imports the evaluation stage; the front door hands it in)."""
    from ..cluster.runtime import init_ray

    if cfg.curate is None:
        raise ConfigError("curate: the config has no curate section; add curate.inputs (shard sets) and "
                          "curate.output (a new folder)")
    start, c = time.time(), cfg.curate
    out_dir = absolute(c.output)
    check_location(out_dir, "curate.output")
    dirs, manifests = check_inputs(cfg)
    if c.difficulty.student_max_pass_rate is not None and sample_passes is None:
        raise ConfigError("curate.difficulty.student_max_pass_rate needs the evaluation stage's student pass: "
                          "run it as `distill-llm curate` (or pass sample_passes to curate())")
    run = run_record(cfg, dirs, manifests)
    with storage_errors(out_dir):  # another run's set in curate.output is refused before any work
        resume = claim_output(out_dir, run, c)
    init_ray(cfg.ray)
    grams = eval_ngrams(cfg)
    parts = partitions(sum(m["totals"]["rows"] for m in manifests.values()))
    manifest, rows = curate_passes(cfg, dirs, grams, parts, resume, run, out_dir, manifests, sample_passes)
    t = manifest["totals"]
    print(f"curate: {rows:,} rows from {len(dirs)} shard sets -> {t['rows']:,} kept, "
          f"{t['rejected']:,} removed ({manifest['curate']['removed'] or 'none'}) in {time.time() - start:.1f}s "
          f"-> {out_dir}")
    return manifest


def curate_passes(cfg: Config, dirs: list[str], grams: frozenset, parts: int, resume, run: dict[str, Any],
                  out_dir: str, manifests: dict[str, dict[str, Any]], sample_passes) -> tuple[dict[str, Any], int]:
    """curate's work once its output is claimed: features, decisions, the write pass; the manifest and
    the input rows."""
    c = cfg.curate
    groups = input_groups(dirs, manifests)
    refs, rows = features(groups, feature_spec(c, grams), parts)
    rates = (student_pass_rates(cfg, dirs, manifests, out_dir, sample_passes)
             if c.difficulty.student_max_pass_rate is not None else {})
    removed, failed, counts = decide_all(refs, rows, parts, policy(c, rates), c.verify.kd_weight_incorrect is not None)
    del refs  # the feature blocks leave the object store
    with storage_errors(out_dir):
        if resume.committed:
            print(f"curate: resuming {out_dir}: {len(resume.done_sample_ids):,} rows already committed")
        write_pass(cfg, dirs, groups, removed, resume.done_sample_ids, run, failed)
        extra = {"curate": {**run["curate"], "removed": counts, "eval_ngrams": len(grams),
                            **({"student_pass": pass_summary(rates)} if rates else {})},
                 "config": cfg.model_dump(mode="json")}
        return write_manifest(out_dir, extra=extra, expected=rows), rows


def failed_rows(table: pa.Table, weigh: bool) -> pa.Table:
    """(input, file, sample_id) of the rows whose answer check failed, when curate.verify.kd_weight_incorrect
    weighs them (``weigh``); none otherwise."""
    if not weigh:
        table = table.slice(0, 0)
    return table.filter(pc.equal(pc.fill_null(table["correct"], True), False)).select(["input", "file", "sample_id"])


def claim_output(out_dir: str, run: dict[str, Any], c: CurateConfig):
    """prepare_output for curate.output: its refusals name the curate.* keys, not output.*."""
    try:
        return prepare_output(out_dir, run, c.resume, c.overwrite, identity_keys=CURATE_IDENTITY)
    except ShardError as err:
        text = str(err)
        for key in ("output.dir", "output.overwrite", "output.resume"):
            text = text.replace(key, "curate." + key.split(".")[1].replace("dir", "output"))
        raise ShardError(text) from None


# ---------------------------------------------------------------- the difficulty pass (s1)

# Per prompt: the student's correct samples of how many; kept for reruns, in a folder of its own (a
# top-level .parquet that is no shard would be cleared as an orphan when the manifest is written).
DIFFICULTY_FILE = "difficulty/student_passes.parquet"
DIFFICULTY_SCHEMA = pa.schema([("prompt_id", pa.string()), ("correct", pa.int32()), ("samples", pa.int32())])


def input_prompts(dirs: list[str]) -> pa.Table:
    """Every distinct prompt of the inputs (prompt_id, messages, answer), in the prompt reader's schema."""
    from ..corpus.prompts import PROMPT_SCHEMA

    seen: dict[str, dict[str, Any]] = {}
    for d in dirs:
        for batch in read_input(d, ["prompt_id", "messages", "answer"]).iter_batches(batch_format="pyarrow"):
            for r in batch.to_pylist():
                seen.setdefault(r["prompt_id"], r)
    schema = pa.schema([PROMPT_SCHEMA.field(n) for n in ("prompt_id", "messages", "answer")])
    return pa.Table.from_pylist([seen[p] for p in sorted(seen)], schema=schema)


def student_pass_rates(cfg: Config, dirs: list[str], manifests: dict[str, dict[str, Any]], out_dir: str,
                       sample_passes) -> dict[str, tuple[int, int]]:
    """prompt_id -> (correct, samples) of the base student on every input prompt, from ``sample_passes``
    (the evaluation stage's quick pass, evaluation.stage.sample_passes, handed in by the front door),
    checked like the teacher's rows. Saved beside the curated set, so a resumed run reuses it and decides
    the same."""
    import pyarrow.parquet as pq

    c, d = cfg.curate, cfg.curate.difficulty
    fs, root = filesystem(out_dir)
    path = join(root, DIFFICULTY_FILE)
    if fs.get_file_info(path).type.name == "File":
        saved = pq.read_table(path, filesystem=fs)
        print(f"curate: the student's pass rates of {saved.num_rows:,} prompts read from {out_dir}/{DIFFICULTY_FILE}")
        return {r["prompt_id"]: (r["correct"], r["samples"]) for r in saved.to_pylist()}
    counts = sample_passes(cfg, input_prompts(dirs), d.student or cfg.student.model, d.samples, d.temperature,
                           d.max_new_tokens, filters.resolve_checker(student_checker(c, manifests)))
    table = pa.table({"prompt_id": list(counts), "correct": [v[0] for v in counts.values()],
                      "samples": [v[1] for v in counts.values()]}, schema=DIFFICULTY_SCHEMA)
    makedirs(fs, join(root, DIFFICULTY_FILE.split("/")[0]))
    pq.write_table(table.sort_by("prompt_id"), path + ".tmp", filesystem=fs)
    fs.move(path + ".tmp", path)  # whole or absent: a killed pass is rerun, never read half-written
    return counts


def pass_summary(rates: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """The manifest's record of the difficulty pass: prompts, samples, and the mean pass rate."""
    samples = sum(n for _, n in rates.values())
    return {"prompts": len(rates), "samples": samples,
            "pass_rate": sum(c for c, _ in rates.values()) / samples if samples else 0.0}
