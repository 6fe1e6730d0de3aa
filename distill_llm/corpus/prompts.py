"""Prompts in: JSONL, Parquet, a saved HF dataset, a load_dataset source (hub id or local folder, with a column
mapping) or a plug-in's split -> normalised prompt rows -> sample rows."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import ray.data

from .. import registry
from ..config import HF_PREFIX, PROMPT_COLUMNS, ConfigError, DataConfig, DatasetSource
from ..paths import filesystem, is_url
from .schema import MESSAGE, SKIP_DETAIL, SKIP_REASON

PROMPT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("messages", pa.list_(MESSAGE)), ("answer", pa.string()),
    (SKIP_REASON, pa.string()), (SKIP_DETAIL, pa.string()),
    # score mode only (generate.mode: score): the trace's final assistant turn and why it ended
    ("completion", pa.string()), ("finish_reason", pa.string()),
    # score mode, optional: the completion's teacher-tokenizer ids, scored as they are (a sampler's own tokens,
    # which decoding and re-tokenising the text need not give back)
    ("completion_token_ids", pa.list_(pa.int32())),
])
FINISH_REASONS = ("stop", "length")


def prompt_id(messages: list[dict[str, str]]) -> str:
    """Stable id of a prompt: a hash of its chat messages (so reruns and reorderings agree)."""
    canon = json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


def _row_key(row: Any) -> str:
    """A hash of a raw input row's content: the id of a row that cannot be used, the same in every rerun
    and in whichever batch the row is read."""
    canon = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:20]


def normalize_prompt(row: dict[str, Any], index: int | None = None, score: bool = False) -> dict[str, Any]:
    """One input row -> (prompt_id, messages, answer) or a row carrying the reason it is skipped.

    ``score`` (generate.mode: score) reads a trace instead: ``messages`` ending with an assistant turn, or
    ``prompt`` + ``completion``; its ``prompt_id`` hashes the whole trace, so two traces of one prompt are
    two samples. ``index`` (the row's position, when the reader knows it) only goes into the skip detail.
    """
    answer = row.get("answer")
    answer = None if answer is None else str(answer)
    messages, completion = row.get("messages"), None
    if messages is None:
        prompt = row.get("prompt")
        if prompt is None:
            return _bad(row, index, "missing_prompt", "row has neither 'prompt' nor 'messages'")
        if not isinstance(prompt, str):
            return _bad(row, index, "bad_prompt", f"'prompt' must be a string, got {type(prompt).__name__}")
        messages = [{"role": "user", "content": prompt}]
        completion = row.get("completion") if score else None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        return _bad(row, index, "bad_messages", "'messages' must be a list of {role, content} strings")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if score and completion is None and messages and messages[-1]["role"] == "assistant":
        completion, messages = messages[-1]["content"], messages[:-1]
    if not messages or not any(m["content"].strip() for m in messages):
        return _bad(row, index, "empty_prompt", "prompt is empty")
    out = {"prompt_id": prompt_id(messages), "messages": messages, "answer": answer,
           SKIP_REASON: None, SKIP_DETAIL: None, "completion": None, "finish_reason": None}
    if not score:
        return out
    if not isinstance(completion, str) or not completion:
        return _bad(row, index, "missing_completion", "generate.mode=score needs a final assistant turn "
                    "('messages' ending with role assistant, or a 'completion' string)")
    finish = row.get("finish_reason") or "stop"
    if finish not in FINISH_REASONS:
        return _bad(row, index, "bad_finish_reason", f"'finish_reason' must be one of {FINISH_REASONS}, "
                    f"got {finish!r}")
    trace = [*messages, {"role": "assistant", "content": completion}]
    token_ids = row.get("completion_token_ids")
    if token_ids is not None and (not isinstance(token_ids, list) or not token_ids
                                  or not all(isinstance(t, int) and t >= 0 for t in token_ids)):
        return _bad(row, index, "bad_completion_token_ids", "'completion_token_ids' must be a non-empty list of "
                    "token ids (ints >= 0)")
    trace_id = row.get("trace_id")
    if trace_id is not None and (not isinstance(trace_id, str) or not trace_id):
        return _bad(row, index, "bad_trace_id", "'trace_id' must be a non-empty string")
    return {**out, "prompt_id": trace_key(trace, trace_id), "completion": completion, "finish_reason": finish,
            "completion_token_ids": token_ids}


def trace_key(trace: list[dict[str, str]], trace_id: str | None) -> str:
    """The prompt_id of a trace to score: a hash of the whole trace, and of its ``trace_id`` when it has one.

    Without a trace_id two identical traces are one (the second is skipped as a duplicate). A sampler's
    draws carry their sample id as trace_id: two equal samples of one prompt are two draws from the student,
    and on-policy training must weigh a completion by how often the student samples it, so each stays a row
    (and a sample id) of its own.
    """
    if trace_id is None:
        return prompt_id(trace)
    return hashlib.sha256(json.dumps([prompt_id(trace), trace_id]).encode()).hexdigest()[:20]


def _bad(row: Any, index: int | None, reason: str, detail: str) -> dict[str, Any]:
    # A skipped row still needs an id, to be counted once across reruns: a hash of its content, the same
    # whichever batch (or block of a streamed read) holds it. Identical bad rows share it until
    # deduplicate tells them apart.
    where = "input row" if index is None else f"input row {index}"
    return {"prompt_id": f"bad-{_row_key(row)}", "messages": None, "answer": None, SKIP_REASON: reason,
            SKIP_DETAIL: f"{where}: {detail}", "completion": None, "finish_reason": None}


def _parse_line(line: str, score: bool) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        return _bad(line, None, "bad_json", f"a line is not JSON ({err.msg}): {line[:80]!r}")
    return normalize_prompt(obj if isinstance(obj, dict) else {"value": obj}, None, score)


def _normalize_lines(batch: pa.Table, score: bool = False) -> pa.Table:
    rows = [_parse_line(line, score) for line in batch.column("text").to_pylist() if line.strip()]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _normalize_batch(batch: pa.Table, score: bool = False) -> pa.Table:
    rows = [normalize_prompt(r, None, score) for r in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _repeat(row: dict[str, Any], n: int, first: dict[str, Any]) -> dict[str, Any]:
    """The n-th repeat (n >= 1) of a row id: a skipped row with an id of its own."""
    if row[SKIP_REASON] is None:
        reason, detail = "duplicate_prompt", f"same messages as an earlier row ({first['prompt_id']})"
    else:
        reason, detail = row[SKIP_REASON], row[SKIP_DETAIL]
    return {**row, "prompt_id": f"{first['prompt_id']}-dup{n}", "messages": None, SKIP_REASON: reason,
            SKIP_DETAIL: detail}


def drop_duplicates(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows read on the driver, with repeats of an earlier row's id marked skipped (ids are content
    hashes, so a repeated prompt would otherwise repeat its sample ids); the first occurrence is kept."""
    seen: dict[str, int] = {}
    for index, row in enumerate(rows):
        n = seen.get(row["prompt_id"], 0)
        seen[row["prompt_id"]] = n + 1
        if n:
            rows[index] = _repeat(row, n, row)
    return pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA)


def _keep_one(group: pa.Table) -> pa.Table:
    """One group of rows sharing a prompt_id: the first by content is kept, the others get ids of their own.

    Ordering by content (not by arrival) keeps the choice the same in every rerun, whatever order the
    shuffle delivered the rows in.
    """
    if group.num_rows == 1:
        return group
    rows = sorted(group.to_pylist(), key=_row_key)
    return pa.Table.from_pylist([rows[0], *(_repeat(r, n, rows[0]) for n, r in enumerate(rows[1:], 1))],
                                schema=PROMPT_SCHEMA)


ROWS_PER_PARTITION = 100_000  # rows per hash partition of the duplicate pass (Ray Data's default is 200 partitions)


def _repeated(counts: pa.Table) -> pa.Table:
    return counts.filter(pc.greater(counts.column("count()"), 1)).select(["prompt_id"])


def _rows_in(batch: pa.Table, ids: pa.Array, inside: bool) -> pa.Table:
    mask = pc.is_in(batch.column("prompt_id"), value_set=ids)
    return batch.filter(mask if inside else pc.invert(mask))


def deduplicate(ds):
    """A streamed prompt dataset with unique prompt ids, through hash-partitioned Ray Data passes (no driver
    memory per row): a groupby count finds the ids that occur more than once (only those reach the driver),
    then only their rows are grouped, and every repeat is marked skipped with an id of its own (_keep_one).
    The dataset is materialised once, so the source is read once.
    """
    ds = ds.materialize()
    partitions = max(1, min(200, ds.count() // ROWS_PER_PARTITION + 1))
    counts = ds.select_columns(["prompt_id"]).groupby("prompt_id", num_partitions=partitions).count()
    repeated = counts.map_batches(_repeated, batch_format="pyarrow").take_all()
    if not repeated:
        return ds
    ids = pa.array(sorted({r["prompt_id"] for r in repeated}), pa.string())
    once = ds.map_batches(_rows_in, fn_kwargs={"ids": ids, "inside": False}, batch_format="pyarrow")
    many = ds.map_batches(_rows_in, fn_kwargs={"ids": ids, "inside": True}, batch_format="pyarrow")
    kept = many.groupby("prompt_id", num_partitions=partitions).map_groups(_keep_one, batch_format="pyarrow")
    return once.union(kept)


def read_prompts(cfg: DataConfig, source: str | None = None, num_prompts: int | None = None, score: bool = False):
    """A Ray Dataset of normalised prompt rows (PROMPT_SCHEMA), each ``prompt_id`` once, from a toy split,
    JSONL, Parquet, a saved HF dataset or a load_dataset source. ``score``: rows are traces to score
    (generate.mode: score; see normalize_prompt)."""
    source = source or cfg.prompts
    limit = num_prompts if num_prompts is not None else cfg.num_prompts
    if cfg.dataset is not None and source == cfg.prompts:
        return read_dataset(cfg.dataset, limit, score)
    if source.startswith(HF_PREFIX):
        return read_dataset(DatasetSource.parse(source), limit, score)
    builtin = registry.prompt_source(source)
    if builtin is not None:  # a plug-in's prompts (toy:train), made on the driver
        make, split = builtin
        try:
            items = make(split, limit)
        except ValueError as err:
            raise ConfigError(f"data.prompts: {err}") from None
        return ray.data.from_arrow(drop_duplicates([normalize_prompt(p, i, score) for i, p in enumerate(items)]))
    fs, p = filesystem(source)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"prompts file {source} does not exist")
    if source.endswith((".jsonl", ".json")) and info.type == pafs.FileType.File:
        return read_jsonl(source, limit, score)
    if not is_url(source) and (Path(p) / "dataset_info.json").is_file():  # datasets.save_to_disk
        import datasets

        hf = datasets.load_from_disk(p)
        if isinstance(hf, datasets.DatasetDict):
            raise ConfigError(f"{source} holds splits {list(hf)}; point data.prompts at one split's folder")
        table = hf.data.table if limit is None else hf.select(range(min(limit, len(hf)))).data.table
        _check_columns(source, table.schema.names, score)
        rows = [normalize_prompt(r, i, score) for i, r in enumerate(table.to_pylist())]
        return ray.data.from_arrow(drop_duplicates(rows))
    try:
        ds = ray.data.read_parquet(p, filesystem=fs)  # the same file system (and endpoint) as every stage
        names = ds.schema().names
    except Exception as err:
        raise ConfigError(f"cannot read prompts from {source} as JSONL, Parquet or a saved HF dataset: {err}") from None
    _check_columns(source, names, score)
    if limit is not None:
        ds = ds.limit(limit)
    return deduplicate(ds.map_batches(_normalize_batch, fn_kwargs={"score": score}, batch_format="pyarrow",
                                      zero_copy_batch=True))


def read_jsonl(source: str, limit: int | None, score: bool = False):
    """JSON lines streamed through Ray Data like Parquet (the driver reads only up to the first line, to
    refuse an empty file before any work); a line that is not JSON is a skipped row (``bad_json``)."""
    fs, p = filesystem(source)
    with fs.open_input_stream(p) as f:
        head = b""
        while not head.strip():
            chunk = f.read(1 << 16)
            if not chunk:
                raise ConfigError(f"prompts file {source} holds no rows")
            head += chunk
    ds = ray.data.read_text(p, filesystem=fs, drop_empty_lines=True)
    if limit is not None:
        ds = ds.limit(limit)
    return deduplicate(ds.map_batches(_normalize_lines, fn_kwargs={"score": score}, batch_format="pyarrow",
                                      zero_copy_batch=True))


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
    traces = ("completion", "finish_reason")  # read by generate.mode=score
    keep = [c for c in names if c in spec.columns or (c in (*PROMPT_COLUMNS, *traces) and c not in targets)]
    if not {"prompt", "messages"} & {spec.columns.get(c, c) for c in keep}:
        raise ConfigError(f"{spec.uri} has columns {names}; it needs a 'prompt' (string) or 'messages' (chat) column: "
                          "map one with data.dataset.columns, e.g. {problem: prompt, solution: answer}")
    return keep, {c: t for c, t in spec.columns.items() if c != t}


def read_dataset(spec: DatasetSource, limit: int | None, score: bool = False):
    """A load_dataset source as normalised prompt rows; hub datasets stream (no full download) unless told not to.

    A limited or local read is normalised and deduplicated on the driver, like a saved dataset; an unlimited
    stream goes through Ray Data batch by batch and is deduplicated like Parquet.
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
        return ray.data.from_arrow(drop_duplicates([normalize_prompt(r, i, score) for i, r in enumerate(items)]))
    # Ray's datasource iterates the stream itself. Not ray.data.from_huggingface: for a stream it reads the hub's
    # Parquet export of whatever dataset bears the same name, dropping the column mapping (and, for a local
    # folder, possibly reading an unrelated hub dataset of that name).
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    ds = ray.data.read_datasource(HuggingFaceDatasource(dataset=hf))
    return deduplicate(ds.map_batches(_normalize_batch, fn_kwargs={"score": score}, batch_format="pyarrow",
                                      zero_copy_batch=True))


def _check_columns(source: str, names: list[str], score: bool = False) -> None:
    if "prompt" not in names and "messages" not in names:
        raise ConfigError(f"{source} has columns {names}; it needs a 'prompt' (string) or 'messages' (chat) "
                          "column, and optionally 'answer'")
    if score and "messages" not in names and "completion" not in names:
        raise ConfigError(f"generate.mode=score: {source} has columns {names}; traces to score need 'messages' "
                          "ending with an assistant turn, or 'prompt' and 'completion' columns")


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
