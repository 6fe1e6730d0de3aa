"""The curation filters as plain functions over Arrow tables: per-row features, then one decision per row.

Two steps, so the expensive per-row work runs in parallel (Ray Data tasks, ``row_features``) and the
decisions that need every row at once (duplicates across inputs, near-duplicate clusters, at most N
correct per prompt) run over a slim table of those features (``decide``). Every decision depends on the
rows' content only, never on their arrival order, so a rerun decides the same.

A removed row gets the first reason in ``REASONS`` that applies to it.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Removal reasons, in the order a row's reason is chosen (rejects/ and the manifest use these names).
REASONS = ("duplicate_prompt", "near_duplicate_prompt", "contaminated", "truncated", "too_short", "too_long",
           "bad_format", "no_verdict", "incorrect", "unsolved", "too_easy", "duplicate_completion",
           "over_max_correct", "mixing_weight")

# Columns the feature pass reads from a shard (never the top-k columns: they are most of the bytes).
FEATURE_COLUMNS = ["sample_id", "prompt_id", "messages", "completion_text", "completion_token_ids",
                   "finish_reason", "answer", "answer_correct"]

MERSENNE = np.uint64((1 << 61) - 1)


# ---------------------------------------------------------------- text


def normalize(text: str) -> str:
    """Lower case, whitespace runs folded to one space (open-r1's decontaminate.py normalisation)."""
    return " ".join(text.lower().split())


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def prompt_text(messages: list[dict[str, str]] | None) -> str:
    """The problem a prompt poses: its non-system messages (a shared system prompt is boilerplate)."""
    return "\n".join(m["content"] for m in messages or [] if m["role"] != "system")


def prompt_key(messages: list[dict[str, str]] | None) -> int:
    """Exact-duplicate key of a prompt: every message, role and normalised content."""
    return stable_hash("\x1e".join(f"{m['role']}\x1f{normalize(m['content'])}" for m in messages or []))


def word_ngrams(text: str, n: int) -> set[str]:
    words = normalize(text).split()
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def has_think_block(text: str) -> bool:
    """``<think>...</think>answer``: one think block, first, closed, followed by a non-empty answer."""
    body = (text or "").lstrip()
    return (body.startswith("<think>") and body.count("<think>") == 1 and body.count("</think>") == 1
            and bool(body.split("</think>", 1)[1].strip()))


# ---------------------------------------------------------------- MinHash LSH


def lsh_params(threshold: float, num_perm: int, steps: int = 200) -> tuple[int, int]:
    """(bands, rows per band) minimising the false-positive plus false-negative probability mass around
    ``threshold``, as datasketch's MinHashLSH chooses them (equal weights)."""
    best, best_err = (1, num_perm), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            lo, hi = np.linspace(0, threshold, steps), np.linspace(threshold, 1, steps)
            fp = np.trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = np.trapezoid((1 - hi ** r) ** b, hi)
            if fp + fn < best_err:
                best, best_err = (b, r), fp + fn
    return best


@dataclass(frozen=True)
class MinHasher:
    """MinHash over word shingles with ``num_perm`` hash functions h(x) = (a x + b) mod (2^61 - 1), kept
    to 32 bits; x is a shingle's 32-bit hash and a, b < 2^31, so a x + b never leaves 64 bits."""

    num_perm: int = 128
    shingle_words: int = 3
    seed: int = 1

    @property
    def ab(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        return (rng.integers(1, 1 << 31, self.num_perm, dtype=np.uint64),
                rng.integers(0, 1 << 31, self.num_perm, dtype=np.uint64))

    def shingles(self, text: str) -> set[str]:
        words = normalize(text).split()
        n = min(self.shingle_words, max(len(words), 1))
        return {" ".join(words[i:i + n]) for i in range(max(len(words) - n + 1, 1))}

    def signature(self, text: str, ab: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        a, b = ab or self.ab
        x = np.array([stable_hash(s) & 0xFFFFFFFF for s in self.shingles(text)], dtype=np.uint64)
        return (((x[:, None] * a[None, :] + b[None, :]) % MERSENNE) & np.uint64(0xFFFFFFFF)).min(axis=0)


def band_hashes(signature: np.ndarray, bands: int, rows: int) -> list[int]:
    """One 64-bit hash per LSH band: prompts sharing any band are candidates of one cluster."""
    sig = signature.astype("<u4")
    return [int.from_bytes(hashlib.blake2b(bytes([j]) + sig[j * rows:(j + 1) * rows].tobytes(),
                                           digest_size=8).digest(), "little") >> 1 for j in range(bands)]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


# ---------------------------------------------------------------- checkers


def resolve_checker(name: str | None):
    """A checker by registered name (``math``, ``exact``, ``toy``) or import path (``pkg.mod:function``)."""
    if name is None:
        return None
    if ":" in name:
        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    from ..evaluation.checkers import get_checker

    return get_checker(name)


# ---------------------------------------------------------------- per-row features (Ray Data tasks)


@dataclass
class FeatureSpec:
    """What the feature pass computes; picklable, shipped to every task."""

    eval_ngrams: frozenset = frozenset()  # n-grams of every evaluation prompt
    ngram: int = 8
    decontaminate_completions: bool = False
    minhash: MinHasher | None = None
    bands: int = 0
    rows: int = 0
    checker: str | None = None  # None: the shards' own answer_correct
    extra: dict[str, Any] = field(default_factory=dict)


FEATURE_SCHEMA = pa.schema([
    ("input", pa.int32()), ("sample_id", pa.string()), ("prompt_id", pa.string()), ("key", pa.uint64()),
    ("completion", pa.uint64()), ("tokens", pa.int32()), ("truncated", pa.bool_()), ("think", pa.bool_()),
    ("correct", pa.bool_()), ("contaminated", pa.bool_()), ("bands", pa.list_(pa.uint64())),
    ("file", pa.int32()),  # the row's shard file in its input (the write pass reads one file per task)
])


def contaminated(text: str, spec: FeatureSpec) -> bool:
    return bool(spec.eval_ngrams) and not spec.eval_ngrams.isdisjoint(word_ngrams(text, spec.ngram))


def row_features(batch: pa.Table, spec: FeatureSpec, input_index: int) -> pa.Table:
    """One slim row per shard row: hashes, length, verdict, contamination, (once per prompt in the batch)
    the prompt's LSH band hashes, and the batch's ``file`` column when it has one (null otherwise)."""
    checker = resolve_checker(spec.checker)
    ab = spec.minhash.ab if spec.minhash else None
    prompts: dict[str, tuple[int, bool]] = {}
    out: dict[str, list] = {name: [] for name in FEATURE_SCHEMA.names}
    tokens = pc.list_value_length(batch["completion_token_ids"]).to_pylist()
    for row, n in zip(batch.select([c for c in FEATURE_COLUMNS if c != "completion_token_ids"]).to_pylist(), tokens):
        bands = None
        if row["prompt_id"] not in prompts:
            text = prompt_text(row["messages"])
            prompts[row["prompt_id"]] = (prompt_key(row["messages"]), contaminated(text, spec))
            if spec.minhash is not None:
                bands = band_hashes(spec.minhash.signature(text, ab), spec.bands, spec.rows)
        key, dirty = prompts[row["prompt_id"]]
        completion = row["completion_text"] or ""
        if spec.decontaminate_completions and not dirty:
            dirty = contaminated(completion, spec)
        correct = row["answer_correct"]
        if checker is not None:
            from ..evaluation.checkers import check

            correct = check(checker, completion, row["answer"])
        for name, value in (("input", input_index), ("sample_id", row["sample_id"]), ("prompt_id", row["prompt_id"]),
                            ("key", key), ("completion", stable_hash(" ".join(completion.split()))),
                            ("tokens", n or 0), ("truncated", row["finish_reason"] == "length"),
                            ("think", has_think_block(completion)), ("correct", correct), ("contaminated", dirty),
                            ("bands", bands)):
            out[name].append(value)
    out["file"] = batch["file"] if "file" in batch.schema.names else [None] * batch.num_rows
    return pa.table(out, schema=FEATURE_SCHEMA)


# ---------------------------------------------------------------- decisions (driver, over every row)


@dataclass
class Policy:
    """The filters ``decide`` applies (see CurateConfig for each setting)."""

    dedup_prompts: bool = True
    dedup_completions: bool = True
    near_duplicates: bool = True
    decontaminate: bool = True
    drop_truncated: bool = False
    min_tokens: int = 0
    max_tokens: int | None = None
    require_think: bool = False
    correct_only: bool = False
    max_correct: int | None = None
    prefer_shortest: bool = False
    weights: tuple[float, ...] = ()  # per input: the fraction of its surviving rows kept
    drop_unsolved: bool = False
    max_pass_rate: float | None = None  # with pass_rates: prompts the student solves more often are dropped
    pass_rates: dict[str, tuple[int, int]] = field(default_factory=dict)  # prompt_id -> (correct, samples)


def clusters(keys: np.ndarray, bands: np.ndarray) -> np.ndarray:
    """Connected components of prompts sharing any LSH band: a component id per prompt."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(keys)
    src, dst = [], []
    for j in range(bands.shape[1] if n else 0):
        order = np.argsort(bands[:, j], kind="stable")
        same = bands[order[1:], j] == bands[order[:-1], j]
        src.append(order[1:][same])
        dst.append(order[:-1][same])
    src_all = np.concatenate(src) if src else np.zeros(0, dtype=np.int64)
    dst_all = np.concatenate(dst) if dst else np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(src_all), dtype=np.int8), (src_all, dst_all)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def key_partition(features: pa.Table, part: int, parts: int) -> pa.Table:
    """The rows whose prompt key falls in hash partition ``part`` of ``parts`` (every row of a key in one),
    in table order. On a table ordered by ``order_by_partition`` they are a few runs of rows, taken as
    zero-copy slices, so a task reading its partition from the object store touches only those rows and
    the key column."""
    if parts == 1:
        return features
    return rows_where(features, features["key"].to_numpy() % np.uint64(parts) == part)


def banded_rows(features: pa.Table) -> pa.Table:
    """The rows carrying LSH bands (one per prompt and feature block), in table order; on a table ordered
    by ``order_by_partition`` they come first."""
    return rows_where(features, features["bands"].is_valid().to_numpy(zero_copy_only=False))


def rows_where(table: pa.Table, mask: np.ndarray) -> pa.Table:
    """``table.filter(mask)``, as zero-copy slices of the mask's runs when there are few of them."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    if len(starts) > max(8, len(mask) // 64):  # many short runs: a copy is cheaper than the slices
        return table.filter(pa.array(mask))
    if len(starts) == 1 and starts[0] == 0 and ends[0] == len(mask):
        return table
    return pa.concat_tables([table.slice(a, b - a) for a, b in zip(starts, ends)] or [table.slice(0, 0)])


def order_by_partition(features: pa.Table, parts: int) -> pa.Table:
    """The feature rows reordered: banded rows first, then the rest, each group by key partition of
    ``parts``; decisions never depend on row order (see ``decide``), and ``key_partition`` and
    ``banded_rows`` then read contiguous runs."""
    unbanded = features["bands"].is_null().to_numpy(zero_copy_only=False)
    part = features["key"].to_numpy() % np.uint64(max(parts, 1))
    return features.take(pa.array(np.lexsort((part, unbanded))))


def _unit(sample_ids: Iterable[str]) -> np.ndarray:
    """A number in [0, 1) per sample id, the same in every run (the mixing draw)."""
    return np.array([stable_hash("mix:" + s) / 2.0 ** 64 for s in sample_ids])


def decide(features: pa.Table, policy: Policy, heads: dict[int, str] | None = None) -> pa.Table:
    """(input, sample_id, reason, detail) for every removed row; rows not listed are kept. ``heads``: the
    near-duplicate map of ``near_duplicate_heads`` over every row, when ``features`` is one key partition
    (every decision but the near-duplicate clusters is made within the rows of one prompt key); computed
    from ``features`` when None."""
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
        near = pd.Series(looked_up(near_duplicate_heads(features) if heads is None else heads,
                                   df["key"].to_numpy()), index=df.index)
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
        remove_too_easy(df, policy, remove)
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
        remove(_unit(df["sample_id"]) >= weight, "mixing_weight", "not drawn at its input's weight")
    gone = df[df["reason"].notna()]
    return pa.table({"input": pa.array(gone["input"], pa.int32()), "sample_id": pa.array(gone["sample_id"], pa.string()),
                     "reason": pa.array(gone["reason"], pa.string()), "detail": pa.array(gone["detail"], pa.string())})


def remove_too_easy(df, policy: Policy, remove) -> None:
    """Rows of prompts the student solved at a pass rate above ``policy.max_pass_rate`` (s1's difficulty)."""
    rates = {pid: (c, n) for pid, (c, n) in policy.pass_rates.items() if n and c / n > policy.max_pass_rate}
    easy = df["prompt_id"].map(lambda pid: rates.get(pid))
    detail = easy.map(lambda r: f"the student solved {r[0]}/{r[1]} samples (> {policy.max_pass_rate:g})"
                      if r else None)
    remove(easy.notna().to_numpy(), "too_easy", detail.to_numpy())


def looked_up(heads: dict[int, str], keys: np.ndarray) -> np.ndarray:
    """``heads[key]`` per key (uint64), None where absent."""
    out = np.full(len(keys), None, dtype=object)
    if heads:
        known = np.array(list(heads), dtype=np.uint64)
        order = np.argsort(known)
        known, values = known[order], np.array(list(heads.values()), dtype=object)[order]
        at = np.minimum(np.searchsorted(known, keys), len(known) - 1)
        hit = known[at] == keys
        out[hit] = values[at[hit]]
    return out


# A band task's candidate near-duplicates (band_links): per prompt key in a shared LSH bucket, the bucket's
# smallest key and the key's first (input, prompt_id).
LINK_SCHEMA = pa.schema([("key", pa.uint64()), ("link", pa.uint64()), ("input", pa.int32()),
                         ("prompt_id", pa.string())])


def band_entries(features: pa.Table, part: int, parts: int) -> pa.Table:
    """(key, input, prompt_id, band, value) of every LSH band of the banded rows whose band hash ``value``
    falls in band partition ``part`` of ``parts`` (value modulo parts; each band hash mixes in its band
    index): every entry of a bucket goes to one partition."""
    banded = banded_rows(features)
    lists = banded["bands"].combine_chunks() if banded.num_rows else pa.array([], pa.list_(pa.uint64()))
    values = lists.flatten().to_numpy()
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    parent = np.repeat(np.arange(len(lengths)), lengths)
    band = np.arange(len(values)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    mine = values % np.uint64(max(parts, 1)) == part
    rows = pa.array(parent[mine])
    return pa.table({"key": banded["key"].take(rows), "input": banded["input"].take(rows),
                     "prompt_id": banded["prompt_id"].take(rows), "band": pa.array(band[mine], pa.int32()),
                     "value": pa.array(values[mine], pa.uint64())})


def band_links(blocks: Iterable[pa.Table], part: int, parts: int) -> pa.Table:
    """Band partition ``part`` of ``parts`` of the near-duplicate search (LINK_SCHEMA rows): each
    (band, band hash) bucket of the partition holding two or more distinct prompt keys gives a row per key
    in it, linked to the bucket's smallest key. ``blocks``: feature tables (every row of a key carries the
    same bands, so a partition holding one of a key's bands sees all its banded rows and their first
    (input, prompt_id)). Prompts sharing no band with another give no row: the result holds only
    near-duplicates."""
    entries = [band_entries(block, part, parts) for block in blocks]
    entries = pa.concat_tables([e for e in entries if e.num_rows]) if any(e.num_rows for e in entries) else None
    if entries is None:
        return LINK_SCHEMA.empty_table()
    key, band, value = (entries[c].to_numpy() for c in ("key", "band", "value"))
    order = np.lexsort((key, value, band))
    key, band, value = key[order], band[order], value[order]
    new_bucket = np.concatenate(([True], (band[1:] != band[:-1]) | (value[1:] != value[:-1])))
    distinct = new_bucket | np.concatenate(([True], key[1:] != key[:-1]))
    bucket = np.cumsum(new_bucket) - 1
    shared = (np.bincount(bucket, weights=distinct) >= 2)[bucket] & distinct
    link = key[np.flatnonzero(new_bucket)][bucket]  # sorted by key within a bucket: its smallest key
    pairs = np.unique(np.stack([key[shared], link[shared]], axis=1), axis=0).reshape(-1, 2)
    first = entries.take(pc.sort_indices(entries, [("input", "ascending"), ("prompt_id", "ascending")]))
    firsts, at = np.unique(first["key"].to_numpy(), return_index=True)  # a stable sort: each key's first row
    rows = pa.array(at[np.searchsorted(firsts, pairs[:, 0])])
    return pa.table({"key": pa.array(pairs[:, 0], pa.uint64()), "link": pa.array(pairs[:, 1], pa.uint64()),
                     "input": first["input"].take(rows), "prompt_id": first["prompt_id"].take(rows)},
                    schema=LINK_SCHEMA)


def heads_of_links(links: pa.Table) -> dict[int, str]:
    """near_duplicate_heads from every band partition's band_links: the clusters are the connected
    components of the links (a key sharing no bucket is alone, as there), and the first prompt by
    (input, prompt_id) stands for its cluster."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if links.num_rows == 0:
        return {}
    links = links.take(pc.sort_indices(links, [("input", "ascending"), ("prompt_id", "ascending")]))
    keys = links["key"].to_numpy()
    _, first = np.unique(keys, return_index=True)
    first = np.sort(first)  # each key's first row, in (input, prompt_id) order: node i is keys[first[i]]
    by_key = np.argsort(keys[first])

    def node(k: np.ndarray) -> np.ndarray:
        return by_key[np.searchsorted(keys[first][by_key], k)]

    n = len(first)
    graph = coo_matrix((np.ones(len(keys), dtype=np.int8), (node(keys), node(links["link"].to_numpy()))),
                       shape=(n, n))
    component = connected_components(graph, directed=False)[1]
    _, head_at = np.unique(component, return_index=True)  # each cluster's first prompt
    heads = head_at[np.unique(component, return_inverse=True)[1]]
    pids = links["prompt_id"].take(pa.array(first))
    led = np.flatnonzero(pc.not_equal(pids.take(pa.array(heads)), pids).to_numpy(zero_copy_only=False))
    return dict(zip(keys[first[led]].tolist(), pids.take(pa.array(heads[led])).to_pylist()))


def near_duplicate_heads(features: pa.Table) -> dict[int, str]:
    """Prompt key -> the prompt_id standing for its near-duplicate cluster, for the keys whose cluster is
    headed by another prompt. Clusters are over distinct normalised prompts (the rows carrying LSH bands);
    the first by (input, prompt_id) stands for its cluster, and for its own key."""
    banded = features.select(["input", "prompt_id", "key", "bands"]).filter(pc.invert(pc.is_null(features["bands"])))
    if banded.num_rows == 0:
        return {}
    banded = banded.take(pc.sort_indices(banded, [("input", "ascending"), ("prompt_id", "ascending")]))
    keys = banded["key"].to_numpy()
    _, first = np.unique(keys, return_index=True)  # a stable sort: each key's first row in (input, prompt_id) order
    first = np.sort(first)
    flat = pc.list_flatten(banded["bands"].take(pa.array(first))).to_numpy()
    component = clusters(keys[first], flat.reshape(len(first), -1))
    _, head_at = np.unique(component, return_index=True)  # each cluster's first prompt
    heads = head_at[np.unique(component, return_inverse=True)[1]]
    led = np.flatnonzero(pc.not_equal(banded["prompt_id"].take(pa.array(first[heads])),
                                      banded["prompt_id"].take(pa.array(first))).to_numpy(zero_copy_only=False))
    pids = banded["prompt_id"].take(pa.array(first[heads[led]])).to_pylist()
    return dict(zip(keys[first[led]].tolist(), pids))
