"""Prompts in: JSONL, Parquet, a saved HF dataset, a load_dataset source (hub id or local folder, with a column
mapping) or a plug-in's split -> normalised prompt rows -> sample rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import ray.data

from .. import registry
from ..config import HF_PREFIX, PROMPT_COLUMNS, ConfigError, DataConfig, DatasetSource
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
    if cfg.dataset is not None and source == cfg.prompts:
        return read_dataset(cfg.dataset, limit)
    if source.startswith(HF_PREFIX):
        return read_dataset(DatasetSource.parse(source), limit)
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


def _load_dataset(spec: DatasetSource, streaming: bool):
    """datasets.load_dataset of the source; what fails there is named as a config error."""
    import datasets

    local = Path(spec.path).expanduser()
    try:
        return datasets.load_dataset(str(local) if local.is_dir() else spec.path, spec.name, split=spec.split,
                                     revision=spec.revision, streaming=streaming)
    except Exception as err:  # DatasetNotFoundError, an unknown split or config, no network: all named alike
        text = " ".join(str(err).split())[:300]
        raise ConfigError(f"data.prompts={spec.uri}: datasets.load_dataset({spec.path!r}, name={spec.name!r}, "
                          f"split={spec.split!r}) failed: {type(err).__name__}: {text}") from None


def _mapped_columns(spec: DatasetSource, names: list[str]) -> tuple[list[str], dict[str, str]]:
    """(source columns to keep, renames) so the rows carry prompt/messages/answer as data.dataset.columns says."""
    missing = [c for c in spec.columns if c not in names]
    if missing:
        raise ConfigError(f"data.dataset.columns names {missing}, which {spec.uri} lacks; its columns: {names}")
    targets = set(spec.columns.values())
    keep = [c for c in names if c in spec.columns or (c in PROMPT_COLUMNS and c not in targets)]
    if not {"prompt", "messages"} & {spec.columns.get(c, c) for c in keep}:
        raise ConfigError(f"{spec.uri} has columns {names}; it needs a 'prompt' (string) or 'messages' (chat) column: "
                          "map one with data.dataset.columns, e.g. {problem: prompt, solution: answer}")
    return keep, {c: t for c, t in spec.columns.items() if c != t}


def read_dataset(spec: DatasetSource, limit: int | None):
    """A load_dataset source as normalised prompt rows; hub datasets stream (no full download) unless told not to.

    A limited or local read is normalised and deduplicated on the driver, like a saved dataset; an unlimited
    stream goes through Ray Data batch by batch (not deduplicated, like Parquet).
    """
    local = Path(spec.path).expanduser().is_dir()
    streaming = spec.streaming if spec.streaming is not None else not local
    hf = _load_dataset(spec, streaming)
    names = list(hf.column_names or next(iter(hf), {}).keys())  # a stream of untyped files has no features yet
    keep, renames = _mapped_columns(spec, names)
    hf = hf.select_columns(keep)
    if renames:
        hf = hf.rename_columns(renames)
    if not streaming or limit is not None:
        items = list(hf.take(limit)) if streaming else hf.select(range(min(limit or len(hf), len(hf)))).to_list()
        if not items:
            raise ConfigError(f"data.prompts={spec.uri} holds no rows")
        return ray.data.from_arrow(drop_duplicates([normalize_prompt(r, i) for i, r in enumerate(items)]))
    # Ray's datasource iterates the stream itself. Not ray.data.from_huggingface: for a stream it reads the hub's
    # Parquet export of whatever dataset bears the same name, dropping the column mapping (and, for a local
    # folder, possibly reading an unrelated hub dataset of that name).
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    ds = ray.data.read_datasource(HuggingFaceDatasource(dataset=hf))
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
