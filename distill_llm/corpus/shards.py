"""Shard sets on disk: atomic commits, the run record, the manifest, verification and ``inspect``.

Layout of ``output.dir`` (local path or object-store URL)::

    run.json                 what produced these shards (written first; a rerun must match it)
    part-<id>.parquet        committed shards (local: written under _tmp/ then renamed; object stores: one PUT)
    _commits/part-<id>.json  one record per committed shard: rows, tokens, bytes, sha256 (after the shard)
    rejects/part-<id>.parquet  rows the teacher could not use, with the reason
    _attempts/               engine tries in flight (teacher/attempts.py); removed with _tmp/ by the manifest
    manifest.json            written last, only when every prompt is accounted for

A shard without its commit record was cut off mid-commit and is ignored (and replaced on resume).
Every file is whole or absent to a reader: a local file is renamed into place, an object-store object
appears with its one PUT (S3 has no rename: pyarrow's move there is copy + delete, so it is not used).
A shard's <id> is a hash of its sample ids, so a write task that Ray retries after its commit rewrites
the same files instead of committing the same samples twice.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .. import faults
from ..config import ConfigError
from ..paths import WriteFailed, check_location, filesystem, is_object_store, join, makedirs, read_text, writing
from .schema import (ATTEMPTS_DIR, MANIFEST_NAME, READABLE_VERSIONS, REJECT_SCHEMA, SCHEMA_VERSION, SHARD_PREFIX,
                     SKIP_DETAIL, SKIP_REASON, shard_schema)

RUN_NAME = "run.json"
COMMITS = "_commits"
TMP = "_tmp"
REJECTS = "rejects"
# Keys of the run record that decide whether two runs produce the same samples.
IDENTITY_KEYS = ("schema_version", "teacher", "tokenizer_fingerprint", "prompts", "sampling", "top_k_logprobs",
                 "logprobs_dtype")


class ShardError(ConfigError):
    """A shard set that cannot be used as asked: incomplete, corrupt, or from another run."""


# ---------------------------------------------------------------- small file helpers


def read_json(fs, path: str) -> Any | None:
    text = read_text(fs, path)
    return None if text is None else json.loads(text)


def _write_bytes_atomic(fs, path: str, data: bytes, tmp_dir: str | None = None) -> None:
    """Readers see the old file or the new one, never half: a local file is written under a temporary
    name (in ``tmp_dir`` when given) and renamed; an object store's PUT is already all-or-nothing."""
    if is_object_store(fs):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    if tmp_dir is not None:
        fs.create_dir(tmp_dir, recursive=True)
    tmp = f"{join(tmp_dir, _base(path)) if tmp_dir else path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def write_json(fs, path: str, obj: Any) -> None:
    _write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _list(fs, path: str, suffix: str) -> list[str]:
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))


def _base(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _write_error(err: BaseException) -> OSError | None:
    """The storage error behind ``err``: an OSError raised on the driver, or a WriteFailed raised in a
    Ray task or actor. The driver sees it wrapped (RayTaskError keeps the original as ``cause``; an actor's
    UDF error arrives as a UserCodeException caused by it), so every link of the chain is searched."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        cause = getattr(err, "cause", None)
        if isinstance(cause, WriteFailed):
            return cause
        if isinstance(err, OSError) and cause is None:
            return err
        todo += [cause if isinstance(cause, BaseException) else None, err.__cause__, err.__context__]
    return None


@contextmanager
def storage_errors(out_dir: str):
    """Turn a failed write to ``out_dir`` (disk full, read-only, no permission) into a ShardError that
    says what is safe: committed shards are intact, no manifest was written, a rerun resumes."""
    try:
        yield
    except ShardError:
        raise
    except Exception as err:
        cause = _write_error(err)
        if cause is None:
            raise
        try:  # reading still works on a full or read-only disk
            committed = len(commit_records(out_dir))
        except OSError:
            committed = -1
        safe = ("No shard was committed" if committed == 0 else "The shards committed so far"
                + (f" ({committed})" if committed > 0 else "") + " are intact (their records are in _commits/)")
        raise ShardError(f"writing to {out_dir} failed: {cause}. {safe} and no manifest was written: free space "
                         "or fix the permissions, then rerun the same command to resume.") from None


def _check_writable(fs, root: str) -> None:
    """Fail before any engine starts when the output dir cannot take a file (read-only, no permission)."""
    probe = join(root, TMP, f"write-probe-{uuid.uuid4().hex[:8]}")
    makedirs(fs, join(root, TMP))
    with fs.open_output_stream(probe) as f:
        f.write(b"probe")
    fs.delete_file(probe)


# ---------------------------------------------------------------- the run record


def identity_diff(old: dict[str, Any], new: dict[str, Any], keys: Iterable[str] = IDENTITY_KEYS) -> list[str]:
    """Dotted keys whose values differ between two run records (``keys`` only)."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            diffs.append(f"{prefix}: {a!r} -> {b!r}")

    for key in keys:
        walk(old.get(key), new.get(key), key)
    return diffs


@dataclass
class Resume:
    done_sample_ids: set[str]
    committed: int  # shard files already committed


def prepare_output(out_dir: str, run: dict[str, Any], resume: bool, overwrite: bool,
                   identity_keys: Iterable[str] = IDENTITY_KEYS) -> Resume:
    """Claim ``out_dir`` for this run: start fresh, resume the same run, or refuse another run's shards
    (runs whose ``identity_keys`` differ)."""
    fs, root = filesystem(out_dir)
    old = read_json(fs, join(root, RUN_NAME))
    existing = _list(fs, root, ".parquet")
    import pyarrow.fs as pafs

    if old is None and existing:
        if not overwrite:
            raise ShardError(f"{out_dir} holds Parquet files but no {RUN_NAME}: not a distill-llm shard set; "
                             "choose another output.dir or set output.overwrite=true")
    if old is not None:
        diffs = identity_diff(old, run, identity_keys)
        if diffs and not overwrite:
            raise ShardError(
                f"{out_dir} holds shards of a different run:\n  " + "\n  ".join(diffs)
                + "\nchoose another output.dir, or set output.overwrite=true to delete them and start anew")
        if not diffs and not resume and not overwrite:
            raise ShardError(f"{out_dir} already holds this run; set output.resume=true to continue it "
                             "or output.overwrite=true to start again")
    if overwrite and (old is not None or existing):
        fs.delete_dir_contents(root, missing_dir_ok=True)
        old = None
    makedirs(fs, root)
    _check_writable(fs, root)
    if old is None:
        write_json(fs, join(root, RUN_NAME), run)
        return Resume(set(), 0)
    # Resuming: a previous manifest no longer describes the set once more shards arrive.
    if fs.get_file_info(join(root, MANIFEST_NAME)).type != pafs.FileType.NotFound:
        fs.delete_file(join(root, MANIFEST_NAME))
    records = commit_records(out_dir)
    done: set[str] = set()
    for rec in records:
        if rec.get("file"):  # None: every row of that write was rejected
            done.update(pq.read_table(join(root, rec["file"]), columns=["sample_id"], filesystem=fs)
                        .column("sample_id").to_pylist())
        if rec.get("rejects_file"):
            done.update(pq.read_table(join(root, rec["rejects_file"]), columns=["sample_id"], filesystem=fs)
                        .column("sample_id").to_pylist())
    return Resume(done, len(records))


def commit_records(out_dir: str) -> list[dict[str, Any]]:
    fs, root = filesystem(out_dir)
    return [read_json(fs, p) for p in _list(fs, join(root, COMMITS), ".json")]


# ---------------------------------------------------------------- writing shards (runs in Ray tasks)


class ShardWriter:
    """Writes one batch of engine output as a committed shard plus its rejects; picklable."""

    def __init__(self, out_dir: str, k: int, logprobs_dtype: str, metadata: dict[str, Any],
                 compression: str = "zstd", compression_level: int = 3, teacher_column: bool = False):
        self.out_dir, self.k, self.dtype, self.teacher_column = out_dir, k, logprobs_dtype, teacher_column
        self.metadata, self.compression, self.level = metadata, compression, compression_level
        self.commits = 0  # by this copy (each write task unpickles its own); fault injection counts them

    def _encodings(self) -> dict[str, str] | None:
        """Physical encodings only (the schema is unchanged). Top-k ids are small integers in 32 bits:
        split into byte planes, zstd stores them smaller (bench/storage.py gives the figures). Not the
        float16 logprobs: DuckDB cannot read BYTE_STREAM_SPLIT on float16."""
        return {"topk_token_ids.list.element.list.element": "BYTE_STREAM_SPLIT"} if self.k > 0 else None

    def write(self, tables: Iterable[pa.Table]) -> dict[str, Any] | None:
        with writing():
            record = self._commit(pa.concat_tables(list(tables)))
        if record is not None:
            self.commits += 1
            faults.point("shard_commit", self.commits)
        return record

    def _commit(self, table: pa.Table) -> dict[str, Any] | None:
        fs, root = filesystem(self.out_dir)
        if table.num_rows == 0:
            return None
        schema = shard_schema(self.k, self.dtype, self.metadata, teacher=self.teacher_column)
        rejected = pa.compute.invert(pa.compute.is_null(table.column(SKIP_REASON)))
        good, bad = table.filter(pa.compute.invert(rejected)), table.filter(rejected)
        name = shard_name(table.column("sample_id").to_pylist())
        # A write whose every row was rejected commits its rejects only: no empty shard file on disk.
        record: dict[str, Any] = {"file": f"{name}.parquet" if good.num_rows else None, "rows": good.num_rows,
                                  "rejected": {}}
        if bad.num_rows:
            rejects = pa.table({"sample_id": bad["sample_id"], "prompt_id": bad["prompt_id"],
                                "reason": bad[SKIP_REASON], "detail": bad[SKIP_DETAIL]}, schema=REJECT_SCHEMA)
            makedirs(fs, join(root, REJECTS))
            record["rejects_file"] = f"{REJECTS}/{name}.parquet"
            _write_bytes_atomic(fs, join(root, record["rejects_file"]), _parquet_bytes(rejects))
            record["rejected"] = dict(Counter(bad.column(SKIP_REASON).to_pylist()))
        if not good.num_rows:
            makedirs(fs, join(root, COMMITS))
            write_json(fs, join(root, COMMITS, f"{name}.json"), record)  # the commit point
            return record
        good = good.select(schema.names).cast(schema)
        # Serialised in memory (a shard is one write task's rows) so its size and sha256 need no read-back.
        data = _parquet_bytes(good, compression=self.compression, compression_level=self.level,
                              use_dictionary=["sample_id", "prompt_id", "finish_reason"],
                              column_encoding=self._encodings())
        _write_bytes_atomic(fs, join(root, record["file"]), data, tmp_dir=join(root, TMP))
        record.update(
            bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
            prompt_tokens=int(pa.compute.sum(pa.compute.list_value_length(good["prompt_token_ids"])).as_py() or 0),
            completion_tokens=int(pa.compute.sum(
                pa.compute.list_value_length(good["completion_token_ids"])).as_py() or 0),
            prompts=len(set(good.column("prompt_id").to_pylist())),
            correct=int(pa.compute.sum(pa.compute.fill_null(good["answer_correct"], False)).as_py() or 0),
        )
        makedirs(fs, join(root, COMMITS))
        write_json(fs, join(root, COMMITS, f"{name}.json"), record)  # the commit point
        return record


def _parquet_bytes(table: pa.Table, **options) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    return sink.getvalue().to_pybytes()


def shard_name(sample_ids: list[str]) -> str:
    """A shard's name from the samples it holds: the same rows always commit under the same name."""
    return SHARD_PREFIX + hashlib.sha256("\n".join(sorted(sample_ids)).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the manifest


def write_manifest(out_dir: str, extra: dict[str, Any] | None = None, max_rejected: int | None = None,
                   expected: int | None = None) -> dict[str, Any]:
    """Gather every commit record into manifest.json, written last; returns the manifest.

    Past ``max_rejected`` rejected rows no manifest is written: the set stays visibly incomplete; nor when
    ``expected`` (every sample the run asked for) is not what was committed plus what was rejected.
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(out_dir)
    run = read_json(fs, join(root, RUN_NAME))
    records = commit_records(out_dir)
    keys = ("file", "rows", "prompt_tokens", "completion_tokens", "bytes", "sha256", "correct")
    shards = [{k: r[k] for k in keys if k in r} for r in records if r["rows"] > 0]
    rejected: Counter = Counter()
    for r in records:
        rejected.update(r.get("rejected", {}))
    if max_rejected is not None and sum(rejected.values()) > max_rejected:
        raise ShardError(f"{sum(rejected.values())} rows were rejected ({dict(rejected)}), more than "
                         f"generate.max_errored_rows={max_rejected}; see {join(out_dir, REJECTS)}/ for the reasons. "
                         "No manifest was written.")
    _check_unique(fs, root, records)
    _check_accounted(out_dir, expected, sum(r["rows"] for r in records), sum(rejected.values()))
    # A shard moved into place whose commit record never landed is an orphan of a killed run; temporary
    # files and attempt records of finished tries are scratch.
    known = {r["file"] for r in records if r.get("file")}
    for path in _list(fs, root, ".parquet"):
        if _base(path) not in known:
            fs.delete_file(path)
    for scratch in (TMP, ATTEMPTS_DIR):
        if fs.get_file_info(join(root, scratch)).type != pafs.FileType.NotFound:
            fs.delete_dir(join(root, scratch))
    totals = {
        "rows": sum(s["rows"] for s in shards),
        "prompt_tokens": sum(s["prompt_tokens"] for s in shards),
        "completion_tokens": sum(s["completion_tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "rejected": sum(rejected.values()),
    }
    if all("correct" in s for s in shards):  # rows whose answer check passed (train.filter_correct counts them)
        totals["correct"] = sum(s["correct"] for s in shards)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": run,
        "shards": shards,
        "totals": totals,
        "rejected": dict(rejected),
        **(extra or {}),
    }
    write_json(fs, join(root, MANIFEST_NAME), manifest)
    return manifest


def _check_accounted(out_dir: str, expected: int | None, rows: int, rejected: int) -> None:
    """Refuse to call a set complete unless every sample asked for was committed or rejected, once."""
    if expected is None or rows + rejected == expected:
        return
    gap = (f"{expected - rows - rejected} samples are missing" if rows + rejected < expected
           else f"{rows + rejected - expected} more than asked for")
    raise ShardError(f"{out_dir}: the run asked for {expected} samples, {rows} were committed and {rejected} "
                     f"rejected: {gap}. No manifest was written; rerun the same command to resume (committed "
                     "samples are kept, missing ones are generated)")


def _check_unique(fs, root: str, records: list[dict[str, Any]]) -> None:
    """Refuse to call a set complete when a sample was committed twice (in rows or rejects).

    Two passes over the files' ``sample_id`` columns, one file at a time, so the driver holds 8 bytes per
    sample rather than every id (a million-row set held ~120 MB of ids and hash table): a 64-bit hash of
    each id first; then only the ids whose hash repeats, compared exactly (a hash collision is no error).
    """
    import numpy as np

    files = [f for r in records for f in (r["file"], r.get("rejects_file")) if f]

    def ids_of(f: str) -> list[str]:
        return pq.read_table(join(root, f), columns=["sample_id"], filesystem=fs).column(0).to_pylist()

    if not files:
        return
    hashes = np.concatenate([np.fromiter(map(hash, ids_of(f)), np.int64) for f in files])
    hashes.sort()
    twice = set(hashes[1:][hashes[1:] == hashes[:-1]].tolist())
    del hashes
    if not twice:
        return
    seen: dict[str, list[str]] = {}
    for f in files:
        for sample_id in ids_of(f):
            if hash(sample_id) in twice:
                seen.setdefault(sample_id, []).append(f)
    repeated = {i: where for i, where in seen.items() if len(where) > 1}
    if repeated:
        holders = sorted({f for where in repeated.values() for f in where})
        raise ShardError(f"{len(repeated)} samples were committed more than once in {root}, in "
                         f"{', '.join(holders[:6])}. No manifest was written: delete the extra copies (a part file "
                         "with its _commits/ record) and rerun to resume")


def read_manifest(shard_dir: str) -> dict[str, Any]:
    """The manifest of a complete shard set, or a ShardError saying why it cannot be used."""
    fs, root = filesystem(shard_dir)
    manifest = read_json(fs, join(root, MANIFEST_NAME))
    if manifest is None:
        hint = " (a run was started there but did not finish: rerun `distill-llm generate` to resume it)" \
            if read_json(fs, join(root, RUN_NAME)) else ""
        raise ShardError(f"{shard_dir} has no {MANIFEST_NAME}: not a complete shard set{hint}")
    if manifest.get("schema_version") not in READABLE_VERSIONS:
        raise ShardError(f"{shard_dir} has shard schema v{manifest.get('schema_version')}, this distill-llm "
                         f"reads v{READABLE_VERSIONS[0]} to v{SCHEMA_VERSION}: regenerate it with this version")
    return manifest


def shard_files(shard_dir: str, verify: str = "size", threads: int = 8) -> list[str]:
    """Full paths of the manifest's shards, checked by size, or by size and sha256 (verify='sha256').

    Hashing reads every byte, so files are hashed ``threads`` at a time (hashlib and pyarrow's
    readers release the GIL; on object stores the reads overlap their latency).
    """
    import pyarrow.fs as pafs

    fs, root = filesystem(shard_dir)
    shards = read_manifest(shard_dir)["shards"]
    paths = [join(root, shard["file"]) for shard in shards]
    for shard, path in zip(shards, paths):
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ShardError(f"shard {path} listed in the manifest is missing; {_repair_hint(root, shard)}")
        if info.size != shard["bytes"]:
            raise ShardError(f"shard {path} is {info.size} bytes, the manifest says {shard['bytes']}: it was "
                             f"truncated or altered; {_repair_hint(root, shard)}")
    if verify == "sha256" and paths:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
            digests = list(pool.map(lambda p: _sha256(fs, p), paths))
        for shard, path, digest in zip(shards, paths, digests):
            if digest != shard["sha256"]:
                raise ShardError(f"shard {path} does not match its sha256 in the manifest: it was altered; "
                                 f"{_repair_hint(root, shard)}")
    return paths


def read_shards(shard_dir: str, columns: list[str] | None = None, verify: str = "size") -> pa.Table:
    """Every committed row of a shard set as one Arrow table (``.to_pandas()`` for a DataFrame).

    The files are checked against the manifest first (``verify``: "size" or "sha256"); ``columns`` limits
    what is read (the top-k columns are most of the bytes).
    """
    fs, _ = filesystem(shard_dir)
    paths = shard_files(shard_dir, verify=verify)
    if not paths:  # a set whose every row was rejected
        return pa.table({})
    return pa.concat_tables([pq.read_table(p, columns=columns, filesystem=fs) for p in paths], promote_options="default")


def _repair_hint(root: str, shard: dict[str, Any]) -> str:
    record = join(root, COMMITS, shard["file"].removesuffix(".parquet") + ".json")
    return (f"restore it from a copy, or delete it and {record} and rerun `distill-llm generate` with the "
            "config that made this set (resuming regenerates the missing samples), or regenerate the whole set "
            "with output.overwrite=true")


def check_compatible(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several shard sets may train one student only if k, dtype and tokenizer agree; returns the run."""
    items = list(manifests.items())
    first_dir, first = items[0]
    for other_dir, other in items[1:]:
        for key in ("top_k_logprobs", "tokenizer_fingerprint", "logprobs_dtype"):
            a, b = first["run"].get(key), other["run"].get(key)
            if a != b:
                raise ShardError(f"shard sets disagree on {key}: {first_dir} has {a!r}, {other_dir} has {b!r}")
    return first["run"]


# ---------------------------------------------------------------- inspect


def inspect(shard_dir: str) -> dict[str, Any]:
    """What a user wants to know about a shard set, computed from the files (not trusted from the manifest)."""
    check_location(shard_dir, "inspect")
    fs, root = filesystem(shard_dir)
    manifest = read_manifest(shard_dir)
    paths = shard_files(shard_dir)
    cols = ["prompt_id", "finish_reason", "answer_correct", "completion_token_ids"]
    rows = prompts_seen = tokens = 0
    prompt_ids: set[str] = set()
    finish: Counter = Counter()
    checked = passed = 0
    for path in paths:
        t = pq.read_table(path, columns=cols, filesystem=fs)
        rows += t.num_rows
        prompt_ids.update(t.column("prompt_id").to_pylist())
        finish.update(t.column("finish_reason").to_pylist())
        tokens += int(pa.compute.sum(pa.compute.list_value_length(t["completion_token_ids"])).as_py() or 0)
        correct = [c for c in t.column("answer_correct").to_pylist() if c is not None]
        checked, passed = checked + len(correct), passed + sum(correct)
    prompts_seen = len(prompt_ids)
    run = manifest["run"]
    size = sum(s["bytes"] for s in manifest["shards"])
    return {
        "dir": shard_dir, "schema_version": manifest["schema_version"], "teacher": run.get("teacher"),
        "shards": len(paths), "rows": rows, "prompts": prompts_seen, "completion_tokens": tokens,
        "k": run.get("top_k_logprobs"), "bytes": size, "bytes_per_token": size / tokens if tokens else None,
        "finish_reasons": dict(finish), "rejected": manifest.get("rejected", {}),
        "answer_pass_rate": passed / checked if checked else None, "answers_checked": checked,
    }


def format_inspect(info: dict[str, Any]) -> str:
    teacher = info["teacher"] or {}
    lines = [
        f"shard set      {info['dir']}  (schema v{info['schema_version']}, {info['shards']} shards)",
        f"teacher        {teacher.get('model')} (revision {teacher.get('revision')})",
        f"rows           {info['rows']:,} completions of {info['prompts']:,} prompts",
        f"tokens         {info['completion_tokens']:,} completion tokens, top-k k={info['k']}",
        f"size           {info['bytes']:,} bytes"
        + (f", {info['bytes_per_token']:.1f} bytes per token" if info["bytes_per_token"] else ""),
        "finish reasons " + ", ".join(f"{k}: {v}" for k, v in sorted(info["finish_reasons"].items())),
        "rejected rows  " + (", ".join(f"{k}: {v}" for k, v in info["rejected"].items()) or "none"),
        "answer check   " + (f"{info['answer_pass_rate']:.1%} of {info['answers_checked']} passed"
                             if info["answer_pass_rate"] is not None else "no reference answers"),
    ]
    return "\n".join(lines)
