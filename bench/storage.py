"""Bytes per completion token on disk for the shard format, per codec and dtype, and the KD loss error of
each lossy logprob encoding.

    PYTHONPATH=$PWD python bench/storage.py                       # toy shards (generated, k=64) + synthetic
    PYTHONPATH=$PWD python bench/storage.py --shards DIR          # an existing shard set with k >= 64

Data:
  toy        real rows of the generation stage (toy teacher, vocabulary 128): generated here at k = 64
             (or read from --shards); smaller k are the first k columns (top-k is stored most likely first).
  synthetic  rows drawn like a real reasoning LLM's: Qwen vocabulary (151,936), token frequencies Zipf(1.1)
             with ids only loosely ordered by frequency (BPE-like: id ~ rank x lognormal(0, 1.5)), a heavy
             head (55% of positions have a top-1 near 0.97, the rest 0.2-0.9) and a power-law tail over
             1,000 alternatives, ~1,000-token completions with text.
Options (same rows, whole file counted, divided by completion tokens):
  current    ``ShardWriter.write`` as the library runs it (zstd 3, BYTE_STREAM_SPLIT ids, float16 logprobs).
  zstd-L plain   zstd level L with plain ids (the writer before BYTE_STREAM_SPLIT ids); dict: dictionary on
             the top-k ids; delta: DELTA_BINARY_PACKED ids; bss: BYTE_STREAM_SPLIT ids and/or logprobs.
             These are lossless physical encodings (schema 'v1' unchanged); DuckDB 2.0 cannot read
             BYTE_STREAM_SPLIT float16, so 'bss lps' breaks the promise that DuckDB reads shards.
  fp32 / bf16 / u8-*   other logprob dtypes (bf16 as uint16 bits; u8-lin20: -logprob in [0, 20] in 256
             steps; u8-sqrtp: sqrt(p) in 256 steps): bf16 and u8 change the public schema.
The toy shards already hold float16 logprobs, so their KD reference is float16 (its error is 0 there).
KD error: relative error of the mean forward-KL KD term (distill_llm.student.losses, temperature T, no tail bucket)
against float32 logprobs, for a student near the teacher (teacher logits + N(0, 0.5)); 'per-pos' is the mean
per-position |error| over the mean KD, which cannot cancel out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import QUICKSTART, QWEN_VOCAB, append_results, header, load_average, machine, table

KS = (8, 20, 64)
LEAF = ".list.element.list.element"


# ---------------------------------------------------------------- rows


def toy_rows(args, work: Path) -> pa.Table:
    from distill_llm.corpus.shards import shard_files

    shards = args.shards
    if not shards:
        from distill_llm.config import load_config
        from distill_llm.teacher.stage import generate

        shards = str(work / "toy-shards")
        generate(load_config(QUICKSTART, [f"output.dir={shards}", f"data.num_prompts={args.toy_prompts}",
                                          "generate.top_k_logprobs=64"]))
    t = pa.concat_tables([pq.read_table(f) for f in shard_files(shards)])
    if t.schema.field("topk_token_ids").type.value_type.list_size < max(KS):
        raise SystemExit(f"--shards {shards}: needs top_k_logprobs >= {max(KS)}")
    return t


def _zipf_ranks(rng, size, a: float, vocab: int) -> np.ndarray:
    r = rng.zipf(a, size) - 1
    bad = r >= vocab
    r[bad] = rng.integers(0, vocab, bad.sum())
    return r


def synthetic_rows(rows: int, k: int, seed: int = 0) -> pa.Table:
    """Shard rows (float32 logprobs) drawn like a real LLM's reasoning traces; see the module docstring."""
    rng = np.random.default_rng(seed)
    vocab = QWEN_VOCAB
    rank_to_id = np.argsort(np.log1p(np.arange(vocab)) + rng.normal(0, 1.5, vocab)).argsort().astype(np.int32)
    lengths = rng.integers(400, 1600, rows)
    n = int(lengths.sum())
    # top-k ids: distinct Zipf draws per position (duplicates redrawn uniformly)
    ranks = _zipf_ranks(rng, (n, k), 1.1, vocab)
    for _ in range(4):
        s = np.sort(ranks, axis=1)
        dup_rows = np.nonzero((s[:, 1:] == s[:, :-1]).any(1))[0]
        if not len(dup_rows):
            break
        for i in dup_rows:
            _, first = np.unique(ranks[i], return_index=True)
            mask = np.ones(k, bool)
            mask[first] = False
            ranks[i, mask] = rng.integers(0, vocab, mask.sum())
    ids = rank_to_id[ranks]
    # probabilities: top-1 from a two-mode mixture, the rest a power law over 1,000 alternatives
    peaked = rng.random(n) < 0.55
    p1 = np.where(peaked, rng.beta(30, 1, n), rng.uniform(0.2, 0.9, n))
    s_exp = rng.uniform(1.0, 2.5, n)
    j = np.arange(2, 1001, dtype=np.float64)
    lps = np.empty((n, k), np.float32)
    for lo in range(0, n, 4096):
        sl = slice(lo, lo + 4096)
        w = j[None, :] ** -s_exp[sl, None]
        rest = (1 - p1[sl])[:, None] * w / w.sum(1, keepdims=True)
        lps[sl, 0] = np.log(p1[sl])
        lps[sl, 1:] = np.log(rest[:, : k - 1])
    order = np.argsort(-lps, axis=1, kind="stable")
    lps = np.take_along_axis(lps, order, 1)
    # the sampled token: the top-1 with probability p1, else the second
    sampled = np.where(rng.random(n) < p1, ids[:, 0], ids[:, 1]).astype(np.int32)
    words = np.array(["".join(rng.choice(list("etaoinshrdlucmfwypvbgk"), rng.integers(1, 8))) for _ in range(30000)])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    texts = [" ".join(words[sampled[offsets[r]:offsets[r + 1]] % len(words)]) for r in range(rows)]
    prompts = [rank_to_id[_zipf_ranks(rng, int(rng.integers(60, 200)), 1.1, vocab)].tolist() for _ in range(rows)]
    ids_col = pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(ids.ravel()), k))
    lps_col = pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(pa.array(lps.ravel()), k))
    sid = [f"{rng.bytes(10).hex()}-0" for _ in range(rows)]
    return pa.table({
        "sample_id": sid, "prompt_id": [s[:20] for s in sid], "sample_index": pa.array([0] * rows, pa.int32()),
        "messages": [[{"role": "user", "content": "Solve: " + " ".join(words[p[:40]])}] for p in
                     (np.array(x) % len(words) for x in prompts)],
        "prompt_token_ids": pa.array(prompts, pa.list_(pa.int32())),
        "completion_token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(sampled)),
        "completion_text": texts, "finish_reason": ["stop"] * rows, "answer": ["42"] * rows,
        "answer_correct": [bool(x) for x in rng.random(rows) < 0.7],
        "topk_token_ids": ids_col, "topk_logprobs": lps_col,
    })


def first_k(t: pa.Table, k: int) -> tuple[pa.Table, np.ndarray]:
    """The table cut to top-k columns (float32 logprobs) and its [N, k] float32 logprobs."""
    out = t
    flat = {}
    for name in ("topk_token_ids", "topk_logprobs"):
        col = t.column(name).combine_chunks()
        width = col.type.value_type.list_size
        vals = col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)[:, :k]
        if name == "topk_logprobs":
            vals = vals.astype(np.float32)
        flat[name] = vals
        new = pa.ListArray.from_arrays(col.offsets, pa.FixedSizeListArray.from_arrays(pa.array(vals.ravel()), k))
        out = out.set_column(out.schema.get_field_index(name), name, new)
    return out, flat["topk_logprobs"]


# ---------------------------------------------------------------- encodings


def encode_logprobs(lps: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(stored values, decoded float32 logprobs) for a logprob encoding."""
    if kind == "fp32":
        return lps, lps
    if kind == "fp16":
        q = lps.astype(np.float16)
        return q, q.astype(np.float32)
    if kind == "bf16":
        bits = lps.astype(np.float32).view(np.uint32)
        q = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return q, (q.astype(np.uint32) << 16).view(np.float32)
    if kind == "u8-lin20":
        q = np.round(np.clip(-lps, 0, 20) / 20 * 255).astype(np.uint8)
        return q, -(q.astype(np.float32) * 20 / 255)
    if kind == "u8-sqrtp":
        q = np.round(np.sqrt(np.exp(lps)) * 255).astype(np.uint8)
        return q, 2 * np.log(np.maximum(q.astype(np.float32), 0.5) / 255)
    raise ValueError(kind)


def with_logprobs(t: pa.Table, stored: np.ndarray, k: int) -> pa.Table:
    col = t.column("topk_logprobs").combine_chunks()
    new = pa.ListArray.from_arrays(col.offsets, pa.FixedSizeListArray.from_arrays(pa.array(stored.ravel()), k))
    return t.set_column(t.schema.get_field_index("topk_logprobs"), "topk_logprobs", new)


def write(t: pa.Table, path: str, level: int = 3, dict_ids: bool = False, delta_ids: bool = False,
          bss_ids: bool = False, bss_lps: bool = False) -> dict:
    """Write like ShardWriter, with the physical options varied; returns bytes (whole file and per column)."""
    dictionary = ["sample_id", "prompt_id", "finish_reason"] + (["topk_token_ids" + LEAF] if dict_ids else [])
    encoding = {}
    if delta_ids or bss_ids:
        encoding["topk_token_ids" + LEAF] = "DELTA_BINARY_PACKED" if delta_ids else "BYTE_STREAM_SPLIT"
    if bss_lps:
        encoding["topk_logprobs" + LEAF] = "BYTE_STREAM_SPLIT"
    pq.write_table(t, path, compression="zstd", compression_level=level, use_dictionary=dictionary,
                   column_encoding=encoding or None)
    return column_bytes(path)


def column_bytes(path: str) -> dict:
    md = pq.ParquetFile(path).metadata
    per = {"file": os.path.getsize(path), "ids": 0, "lps": 0}
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            col = md.row_group(g).column(c)
            key = {"topk_token_ids": "ids", "topk_logprobs": "lps"}.get(col.path_in_schema.split(".")[0])
            if key:
                per[key] += col.total_compressed_size
    return per


def kd_error(ref: np.ndarray, decoded: np.ndarray, temperature: float, seed: int = 0) -> tuple[float, float]:
    """(relative error of the mean forward-KL KD term, mean per-position |error| / mean KD)."""
    import torch

    from distill_llm.student.losses import divergence, teacher_buckets

    g = torch.Generator().manual_seed(seed)
    ref_t = torch.from_numpy(ref.astype(np.float32))
    student = torch.log_softmax((ref_t + torch.randn(ref_t.shape, generator=g) * 0.5) / temperature, -1)
    kd_ref = divergence(teacher_buckets(ref_t, temperature, False), student, "forward_kl").double()
    kd = divergence(teacher_buckets(torch.from_numpy(decoded), temperature, False), student, "forward_kl").double()
    mean = kd_ref.mean().item()
    return abs(kd.mean().item() - mean) / mean, (kd - kd_ref).abs().mean().item() / mean


# ---------------------------------------------------------------- the table


def measure(name: str, table_: pa.Table, work: Path, levels: list[int]) -> list[dict]:
    from distill_llm.corpus.shards import ShardWriter
    from distill_llm.corpus.schema import SKIP_DETAIL, SKIP_REASON

    rows = []
    for k in KS:
        t, lps = first_k(table_, k)
        tokens = len(lps)
        # the library's own writer (float16, zstd 3): what a generate run writes today
        t16 = with_logprobs(t, lps.astype(np.float16), k)
        engine_rows = t16.append_column(SKIP_REASON, pa.nulls(t16.num_rows, pa.string())).append_column(
            SKIP_DETAIL, pa.nulls(t16.num_rows, pa.string()))
        out = work / f"{name}-{k}-current"
        shutil.rmtree(out, ignore_errors=True)
        record = ShardWriter(str(out), k, "float16", metadata={}).write([engine_rows])
        assert record["completion_tokens"] == tokens
        rows.append(dict(data=name, k=k, option="current (ShardWriter: zstd-3 bss ids)", schema="v1",
                         **_per_token(column_bytes(str(out / record["file"])), tokens)))
        variants = [(f"zstd-{lv} plain", "fp16", dict(level=lv)) for lv in levels]  # plain: the writer before
        variants += [("zstd-3 dict ids", "fp16", dict(dict_ids=True)),
                     ("zstd-3 delta ids", "fp16", dict(delta_ids=True)),
                     ("zstd-9 bss ids", "fp16", dict(level=9, bss_ids=True)),
                     ("zstd-3 bss ids+lps", "fp16", dict(bss_ids=True, bss_lps=True)),
                     ("zstd-9 bss ids+lps", "fp16", dict(level=9, bss_ids=True, bss_lps=True)),
                     ("zstd-3 bss ids, fp32", "fp32", dict(bss_ids=True)),
                     ("zstd-3 bss ids, bf16", "bf16", dict(bss_ids=True)),
                     ("zstd-3 bss ids+lps, bf16", "bf16", dict(bss_ids=True, bss_lps=True)),
                     ("zstd-3 bss ids, u8-lin20", "u8-lin20", dict(bss_ids=True)),
                     ("zstd-3 bss ids, u8-sqrtp", "u8-sqrtp", dict(bss_ids=True))]
        errors: dict[str, dict] = {}  # the KD error depends on the dtype only
        for option, kind, opts in variants:
            stored, decoded = encode_logprobs(lps, kind)
            path = str(work / f"{name}-{k}.parquet")
            t0 = time.perf_counter()
            sizes = write(with_logprobs(t, stored, k), path, **opts)
            schema = "v1" if kind in ("fp32", "fp16") else "changes"
            row = dict(data=name, k=k, option=option, schema=schema + (", no DuckDB" if opts.get("bss_lps") else ""),
                       write_s=time.perf_counter() - t0, **_per_token(sizes, tokens))
            if kind != "fp32":
                if kind not in errors:
                    errors[kind] = {}
                    for temp in (1.0, 2.0):
                        rel, per = kd_error(lps, decoded, temp)
                        errors[kind].update({f"kd rel err T={temp:g}": rel, f"per-pos T={temp:g}": per})
                row.update(errors[kind])
            rows.append(row)
            os.remove(path)
        print(f"{name} k={k}: {len(variants) + 1} options, load {load_average()}", flush=True)
    return rows


def _per_token(sizes: dict, tokens: int) -> dict:
    return {"B/token": sizes["file"] / tokens, "ids B/tok": sizes["ids"] / tokens, "lps B/tok": sizes["lps"] / tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", default=None, help="a shard set with top_k_logprobs >= 64 (default: generate one)")
    p.add_argument("--toy-prompts", type=int, default=512)
    p.add_argument("--synthetic-rows", type=int, default=96)
    p.add_argument("--levels", default="1,3,9,19", help="zstd levels to try")
    p.add_argument("--no-toy", action="store_true")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    levels = [int(x) for x in args.levels.split(",")]
    try:
        rows = measure("synthetic", synthetic_rows(args.synthetic_rows, max(KS)), work, levels)
        if not args.no_toy:
            rows += measure("toy", toy_rows(args, work), work, levels)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = ["data", "k", "option", "schema", "B/token", "ids B/tok", "lps B/tok", "kd rel err T=1", "per-pos T=1",
            "kd rel err T=2", "per-pos T=2", "write_s"]
    append_results(args.results, header("Storage: bytes per completion token", info)
                   + f"\nload average at end {load_average()}; target <= 80 B/token at k = 20 with KD error < 1e-3.\n\n"
                   + table(rows, cols) + "\n")


if __name__ == "__main__":
    main()
