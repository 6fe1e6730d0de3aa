"""Prompts in: JSONL, Parquet, a saved HF dataset or a plug-in's split -> normalised prompt rows -> sample rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from .. import registry
from ..config import ConfigError, DataConfig
from ..paths import filesystem, is_url
from .schema import MESSAGE, SKIP_DETAIL, SKIP_REASON

PROMPT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)), ("answer", pa.string()),
    (SKIP_REASON, pa.string()), (SKIP_DETAIL, pa.string()),
])


def prompt_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt: a hash of its chat messages (so reruns and reorderings agree)."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


def normalize_prompt(row: dict[str, Any], index: int) -> dict[str, Any]:
    """One input row -> (prompt_id, messages, answer) or a row carrying the reason it is skipped."""
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    messages = row.get("messages")
    if messages is None:
        prompt = row.get("prompt")
        if prompt is None:
            return _bad(index, "missing_prompt", "row has neither 'prompt' nor 'messages'")
        if not isinstance(prompt, str):
            return _bad(index, "bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
        messages = [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return _bad(index, "bad_messages", "'messages' must be a list of {role, content} strings")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not messages or not any(m["content"].strip() for m in messages):
        return _bad(index, "empty_prompt", "prompt is empty")
    return {"prompt_id": prompt_id(messages), "messages": messages, "answer": answer,
            SKIP_REASON: None, SKIP_DETAIL: None}


def _bad(index: int, reason: str, detail: str) -> dict[str, Any]:
    # Skipped rows still need an id to be counted once across reruns: their position in the input.
    return {"prompt_id": f"row-{index}", "messages": None, "answer": None, SKIP_REASON: reason,
            SKIP_DETAIL: f"input row {index}: {detail}"}


def _read_jsonl(path: str, limit: int | None) -> list[dict[str, Any]]:
    fs, p = filesystem(path)
    rows: list[dict[str, Any]] = []
    with fs.open_input_stream(p) as f:
        for lineno, line in enumerate(f.read().decode("utf-8", errors="replace").splitlines(), 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(_bad(len(rows), "bad_json", f"line {lineno} is not JSON ({err.msg})"))
                continue
            rows.append(normalize_prompt(obj if isinstance(obj, dict) else {}, len(rows)))
    return rows


def _normalize_batch(batch: pa.Table, start: int = 0) -> pa.Table:
    rows = [normalize_prompt(r, start + i) for i, r in enumerate(batch.to_pylist())]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def drop_duplicates(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows read on the driver, with repeats of an earlier prompt marked skipped: ids are content hashes,
    so a repeated prompt would otherwise repeat its sample ids."""
    seen: set[str] = set()
    for index, row in enumerate(rows):
        if row[SKIP_REASON] is None:
            if row["prompt_id"] in seen:
                rows[index] = _bad(index, "duplicate_prompt", f"same messages as an earlier row ({row['prompt_id']})")
            seen.add(row["prompt_id"])
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def read_prompts(cfg: DataConfig, source: str | None = None, num_prompts: int | None = None):
    """A Ray Dataset of normalised prompt rows (PROMPT_SCHEMA) from a toy split, JSONL, Parquet or HF dir."""
    source = source or cfg.prompts
    limit = num_prompts if num_prompts is not None else cfg.num_prompts
    builtin = registry.prompt_source(source)
    if builtin is not None:  # a plug-in's prompts (toy:train), made on the driver
        make, split = builtin
        try:
            items = make(split, limit)
        except ValueError as err:
            raise ConfigError(f"data.prompts: {err}") from None
        return ray.data.from_arrow(drop_duplicates([normalize_prompt(p, i) for i, p in enumerate(items)]))
    fs, p = filesystem(source)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"prompts file {source} does not exist")
    if source.endswith((".jsonl", ".json")) and info.type == pafs.FileType.File:
        rows = _read_jsonl(source, limit)
        if not rows:
            raise ConfigError(f"prompts file {source} holds no rows")
        return ray.data.from_arrow(drop_duplicates(rows))
    if not is_url(source) and (Path(p) / "dataset_info.json").is_file():  # datasets.save_to_disk
        import datasets

        hf = datasets.load_from_disk(p)
        if isinstance(hf, datasets.DatasetDict):
            raise ConfigError(f"{source} holds splits {list(hf)}; point data.prompts at one split's folder")
        table = hf.data.table if limit is None else hf.select(range(min(limit, len(hf)))).data.table
        _check_columns(source, table.schema.names)
        return ray.data.from_arrow(drop_duplicates([normalize_prompt(r, i) for i, r in enumerate(table.to_pylist())]))
    try:
        ds = ray.data.read_parquet(p, filesystem=fs)  # the same file system (and endpoint) as every stage
        names = ds.schema().names
    except Exception as err:
        raise ConfigError(f"cannot read prompts from {source} as JSONL, Parquet or a saved HF dataset: {err}") from None
    _check_columns(source, names)
    if limit is not None:
        ds = ds.limit(limit)
    # Streamed Parquet is not deduplicated (that needs a shuffle); row positions in the ids of bad rows
    # are per batch here, while the reason and detail still describe the row.
    return ds.map_batches(_normalize_batch, batch_format="pyarrow", zero_copy_batch=True)


def _check_columns(source: str, names: list[str]) -> None:
    if "prompt" not in names and "messages" not in names:
        raise ConfigError(f"{source} has columns {names}; it needs a 'prompt' (string) or 'messages' (chat) "
                          "column, and optionally 'answer'")


def expand_samples(prompts, samples_per_prompt: int, done: set[str]):
    """One row per (prompt, sample index) with a stable sample_id; drops samples already committed."""

    def explode(batch: pa.Table) -> pa.Table:
        rows = []
        for row in batch.to_pylist():
            for index in range(1 if row[SKIP_REASON] else samples_per_prompt):
                sid = f"{row['prompt_id']}-{index}"
                if sid not in done:
                    rows.append({**row, "sample_index": index, "sample_id": sid})
        schema = PROMPT_SCHEMA.append(pa.field("sample_index", pa.int32())).append(pa.field("sample_id", pa.string()))
        return pa.Table.from_pylist(rows, schema=schema)

    return prompts.map_batches(explode, batch_format="pyarrow")
