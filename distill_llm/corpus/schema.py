"""The shard contract between the teacher and student stages.

A shard set is a folder of plain Parquet files plus ``manifest.json`` (written last). Readers that
do not use this package (pandas, DuckDB, ``datasets``) see one row per sampled completion with the
columns below; the file metadata (key ``distill_llm``) and the manifest carry the run description.

Bump ``SCHEMA_VERSION`` on any change a reader could notice, and say what changed here:
  1: first version.
  2: an optional ``teacher`` column (string, last): the model that wrote the row, carried by curated sets
     (``distill-llm curate``) that merge several teachers; absent, every row is the run's ``teacher.model``.
    v1 sets are read as they are. Curated sets also carry ``kd_weight`` (float32, after ``teacher``): the
    weight of the row's KD term in the student's loss (1: as an uncurated row; 0: cross-entropy only);
    a set without it trains every row at weight 1.
  The run description (file metadata, run.json, the manifest's ``run``) may hold an optional ``rounds`` object
  on sets `distill-llm rounds` wrote (round, role, the sampling student's checkpoint hash, the teacher): a
  described key, not a column, so readers that ignore it read the set unchanged; no version bump.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # what read_manifest accepts: v2 only adds an optional column
TEACHER_COLUMN = "teacher"
KD_WEIGHT_COLUMN = "kd_weight"
METADATA_KEY = b"distill_llm"
MANIFEST_NAME = "manifest.json"
SHARD_PREFIX = "part-"
# Scratch records of the teacher stage's tries (teacher/attempts.py), left out of a finished set.
ATTEMPTS_DIR = "_attempts"
LOGPROB_SEMANTICS = (
    "topk_logprobs[i][j] is log p(topk_token_ids[i][j] | prompt, completion[:i]) under the teacher's "
    "untempered distribution (temperature 1, no top-p/top-k filtering: vLLM raw_logprobs), "
    "most likely first; the sampled token completion_token_ids[i] may lie outside the top k"
)

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


def shard_schema(k: int, logprobs_dtype: str = "float16", metadata: dict[str, Any] | None = None,
                 teacher: bool = False) -> pa.Schema:
    """Arrow schema of a shard file for top-k size ``k`` (k = 0: no logprob columns), with the curated
    columns ``teacher`` and ``kd_weight`` last when ``teacher`` is asked."""
    fields = [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("messages", pa.list_(MESSAGE)),
        pa.field("prompt_token_ids", pa.list_(pa.int32())),
        pa.field("completion_token_ids", pa.list_(pa.int32())),
        pa.field("completion_text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("answer_correct", pa.bool_()),
    ]
    if k > 0:
        fields += [
            pa.field("topk_token_ids", pa.list_(pa.list_(pa.int32(), k))),
            pa.field("topk_logprobs", pa.list_(pa.list_(pa.from_numpy_dtype(logprobs_dtype), k))),
        ]
    if teacher:
        fields += [pa.field(TEACHER_COLUMN, pa.string()), pa.field(KD_WEIGHT_COLUMN, pa.float32())]
    schema = pa.schema(fields)
    if metadata is not None:
        schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})
    return schema


# Rows the teacher could not turn into samples go to rejects/ with a reason, never into shards.
REJECT_SCHEMA = pa.schema([
    ("sample_id", pa.string()), ("prompt_id", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
])

# Columns the engine returns: a shard row plus the reason it must be rejected (null when good).
SKIP_REASON = "skip_reason"
SKIP_DETAIL = "skip_detail"


def engine_output_schema(k: int, logprobs_dtype: str) -> pa.Schema:
    return shard_schema(k, logprobs_dtype).append(pa.field(SKIP_REASON, pa.string())).append(
        pa.field(SKIP_DETAIL, pa.string()))




def read_metadata(schema: pa.Schema) -> dict[str, Any] | None:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else None
