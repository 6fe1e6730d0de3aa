"""Curation throughput and peak memory on synthetic shard sets as the row count grows 10x.

    PYTHONPATH=$PWD python bench/curate.py                      # 20,000 and 200,000 rows
    PYTHONPATH=$PWD python bench/curate.py --sizes 100000,1000000

Each size runs in a fresh interpreter with its own local Ray: a synthetic shard set is written first through
the teacher stage's writer in files of 4,096 rows (not timed: 4 samples per prompt, prompts of 40 words from a 2,000-word vocabulary,
1 in 50 prompts an exact duplicate and 1 in 50 a one-word edit of another, completions of 64 tokens, k=0),
then ``distill_llm.curation.stage.curate`` runs with every filter on (exact and near-duplicates,
decontamination against the toy eval split, correct only, at most 2 correct per prompt, shortest first,
truncated and format checks). RSS of the driver and of every Ray process is sampled as in bench/memory.py.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from common import append_results, emit, header, load_average, machine, scaling_runs, table

MIB = 2**20
SAMPLES = 4
TOKENS = 64


def synthetic_set(out: Path, rows: int, seed: int = 0, chunk: int = 50_000, file_rows: int = 4096) -> None:
    """``rows`` shard rows of ``rows / SAMPLES`` prompts, written through ShardWriter + write_manifest in files
    of ``file_rows`` rows (the teacher stage's default ``generate.rows_per_shard``)."""
    import numpy as np
    import pyarrow as pa

    from distill_llm.corpus.prompts import prompt_id
    from distill_llm.corpus.schema import SCHEMA_VERSION, engine_output_schema
    from distill_llm.corpus.shards import ShardWriter, prepare_output, write_manifest

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(2000)])
    run = {"schema_version": SCHEMA_VERSION, "teacher": {"model": "synthetic", "revision": None},
           "tokenizer_fingerprint": "synthetic", "prompts": {"source": "synthetic", "checker": "toy"},
           "sampling": {}, "top_k_logprobs": 0, "logprobs_dtype": "float16"}
    prepare_output(str(out), run, resume=True, overwrite=False)
    writer = ShardWriter(str(out), 0, "float16", metadata=run)
    schema = engine_output_schema(0, "float16")
    prompts = rows // SAMPLES
    texts: list[str] = []
    for p in range(prompts):
        if p % 50 == 1 and texts:  # an exact duplicate, upper-cased
            texts.append(texts[-1].upper())
        elif p % 50 == 2 and texts:  # a one-word edit
            words = texts[-2].split()
            words[20] = "edited"
            texts.append(" ".join(words))
        else:
            texts.append(" ".join(rng.choice(vocab, 40)))
    for start in range(0, prompts, chunk // SAMPLES):
        part = texts[start:start + chunk // SAMPLES]
        msgs = [[{"role": "user", "content": t}] for t in part]
        pids = [prompt_id(m) for m in msgs]
        n = len(part) * SAMPLES
        steps = rng.integers(0, 1000, n)
        cols = {
            "sample_id": [f"{pid}-{s}" for pid in pids for s in range(SAMPLES)],
            "prompt_id": [pid for pid in pids for _ in range(SAMPLES)],
            "sample_index": [s for _ in pids for s in range(SAMPLES)],
            "messages": [m for m in msgs for _ in range(SAMPLES)],
            "prompt_token_ids": pa.ListArray.from_arrays(np.arange(0, 8 * n + 1, 8, dtype=np.int32),
                                                         pa.array(np.ones(8 * n, dtype=np.int32))),
            "completion_token_ids": pa.ListArray.from_arrays(np.arange(0, TOKENS * n + 1, TOKENS, dtype=np.int32),
                                                             pa.array(np.ones(TOKENS * n, dtype=np.int32))),
            "completion_text": [f"<think>step {x}</think>7" for x in steps],
            "finish_reason": np.where(steps % 20 == 0, "length", "stop").tolist(),
            "answer": ["7"] * n,
            "answer_correct": (steps % 3 != 0).tolist(),
            "skip_reason": [None] * n, "skip_detail": [None] * n,
        }
        table = pa.table({f.name: pa.array(cols[f.name], f.type) if not isinstance(cols[f.name], pa.Array)
                          else cols[f.name] for f in schema}, schema=schema)
        for at in range(0, table.num_rows, file_rows):
            writer.write([table.slice(at, file_rows)])
    write_manifest(str(out))


def case(c: dict) -> dict:
    from memory import TreeSampler

    from distill_llm.config import build_config
    from distill_llm.curation.stage import curate

    work = Path(tempfile.mkdtemp(prefix="bench-curate-"))
    try:
        t = time.perf_counter()
        synthetic_set(work / "in", c["rows"])
        written = time.perf_counter() - t
        cfg = build_config({"eval": {"prompts": "toy:eval"}, "curate": {
            "inputs": [str(work / "in")], "output": str(work / "out"),
            "verify": {"correct_only": True, "max_correct_per_prompt": 2, "prefer_shortest": True,
                       "drop_truncated": True}, "length": {"require_think": True}}})
        sampler = TreeSampler(c["interval"])
        t = time.perf_counter()
        manifest = curate(cfg)
        seconds = time.perf_counter() - t
        peaks = sampler.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {**c, "write s": written, "seconds": seconds, "rows/s": c["rows"] / seconds,
            "kept": manifest["totals"]["rows"], "removed": json.dumps(manifest["curate"]["removed"]),
            **{k: v for k, v in peaks.items() if k.startswith(("driver", "ray workers", "ray system", "tree"))},
            "by task": json.dumps(peaks["by task"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="20000,200000")
    p.add_argument("--interval", type=float, default=0.25)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.case:
        emit(case(json.loads(args.case)))
        return
    info = machine()
    rows, ok = scaling_runs("curate.py", "rows", (int(x) for x in args.sizes.split(",")),
                            {"interval": args.interval}, timeout=3600)
    cols = ["rows", "seconds", "rows/s", "kept", "driver max MiB", "ray workers max MiB", "ray system max MiB",
            "tree_MiB"]
    append_results(args.results, header("Curation: rows/s and peak memory", info)
                   + f"\nSynthetic shard sets (see bench/curate.py), every filter on; RSS sampled every "
                   f"{args.interval}s; load average at end {load_average()}.\n\n" + table(rows, cols)
                   + "\n\nRemoved by reason: " + "; ".join(f"{r['rows']:,} rows: {r.get('removed')}" for r in ok)
                   + "\n\nRay workers by process title, peak MiB (RSS, RSS less shared pages): "
                   + "; ".join(f"{r['rows']:,} rows: {r.get('by task')}" for r in ok) + "\n")


if __name__ == "__main__":
    main()
