"""Training batches: shard rows -> padded prompt + completion ids, the positions that predict each completion
token, and the teacher's top-k rows for them."""

from __future__ import annotations

def _lists(column) -> list:
    return column.to_pylist()


def build_batch(table, *, max_seq_len: int, pad_id: int, with_topk: bool, retokenize=None,
                pack: bool = False, id_lookup=None, spare_row: int | None = None,
                reprompt=None) -> tuple[dict, dict]:
    """Shard rows (pyarrow) -> padded tensors for StudentWithLoss, plus counts of truncated/skipped rows.

    Position t of the sequence predicts token t+1, so completion token i (sequence position P+i)
    is predicted at P+i-1; ``gather_index`` holds those flat positions, ``targets`` the tokens and
    ``topk_*`` the teacher's rows for them. ``retokenize(row) -> (prompt_ids, completion_ids)``
    replaces the stored ids for a student with another vocabulary (sequence-level KD only).
    With ``pack`` the sequences are laid end to end in rows of at most ``max_seq_len`` tokens, with
    ``position_ids`` restarting at 0 for each and no ``attention_mask`` (see ``_layout``).
    ``id_lookup`` (tokenizers.TokenizerRoute.lookup: teacher id -> student id, -1 dropped) translates the
    stored completion and top-k ids; a row whose completion holds a dropped id is skipped, dropped top-k
    entries are counted (see ``translate_topk``). ``reprompt(row) -> prompt_ids`` renders prompts anew.
    With top-k and a ``kd_weight`` column (curated sets), ``kd_weights`` holds each completion position's
    sample weight for the KD term (a null weight is 1).
    """
    import numpy as np
    import torch

    n = table.num_rows
    prompts = _lists(table.column("prompt_token_ids"))
    completions = _lists(table.column("completion_token_ids"))
    rows_for_retok = (table.select(["messages", "completion_text", "finish_reason"]).to_pylist()
                      if retokenize or reprompt else None)
    if with_topk:
        # list<fixed_size_list<k>> -> one flat [sum(C), k] array and per-row offsets; no Python per token
        col = table.column("topk_token_ids").combine_chunks()
        lcol = table.column("topk_logprobs").combine_chunks()
        k = col.type.value_type.list_size
        offsets = col.offsets.to_numpy()
        flat_ids = col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        flat_lps = lcol.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)
        if id_lookup is not None:
            sampled = table.column("completion_token_ids").combine_chunks().values.to_numpy(zero_copy_only=False)
            flat_ids, flat_lps, dropped = translate_topk(flat_ids, flat_lps, id_lookup, spare_row,
                                                         sampled if len(sampled) == len(flat_ids) else None)
    weighted = with_topk and "kd_weight" in table.column_names
    row_weights = table.column("kd_weight").to_pylist() if weighted else None
    seqs, gathers, targets, tk_rows, kd_weights = [], [], [], [], []
    stats = {"rows": 0, "truncated": 0, "skipped_prompt_too_long": 0, "skipped_empty": 0,
             "skipped_non_finite": 0, **({"skipped_unmapped_token": 0} if id_lookup is not None else {}),
             **({"topk_ids_dropped": int(dropped)} if with_topk and id_lookup is not None else {})}
    kept = 0
    for i in range(n):
        p, c = (prompts[i], completions[i]) if not retokenize else retokenize(rows_for_retok[i])
        if id_lookup is not None and not retokenize:
            c = translate_ids(c, id_lookup)
            if c is None:
                stats["skipped_unmapped_token"] += 1
                continue
        if reprompt is not None and not retokenize:
            p = reprompt(rows_for_retok[i])
        if not c:
            stats["skipped_empty"] += 1
            continue
        if len(p) >= max_seq_len:
            stats["skipped_prompt_too_long"] += 1
            continue
        keep_c = min(len(c), max_seq_len - len(p))
        if with_topk:
            rows = slice(offsets[i], offsets[i] + keep_c)
            if not np.isfinite(flat_lps[rows]).all():
                stats["skipped_non_finite"] += 1
                continue
            tk_rows.append(rows)
        stats["truncated"] += keep_c < len(c)
        seqs.append(p + c[:keep_c])
        base = kept * max_seq_len  # flat index into [B, max_seq_len] before trimming
        gathers.append((base, len(p), keep_c))
        targets.extend(c[:keep_c])
        if weighted:
            kd_weights.extend([1.0 if row_weights[i] is None else row_weights[i]] * keep_c)
        kept += 1
    stats["rows"] = kept
    batch = _layout(seqs, [(n_p, n_c) for _, n_p, n_c in gathers], max_seq_len if pack else None, pad_id)
    batch["targets"] = torch.tensor(targets, dtype=torch.long)
    if with_topk:
        sel = np.concatenate([np.arange(r.start, r.stop) for r in tk_rows]) if tk_rows else np.zeros(0, dtype=int)
        batch["topk_ids"] = torch.from_numpy(flat_ids[sel].astype(np.int64))
        batch["topk_logprobs"] = torch.from_numpy(flat_lps[sel])
    if weighted:
        batch["kd_weights"] = torch.tensor(kd_weights, dtype=torch.float32)
    return batch, stats


def translate_ids(ids: list[int], lookup) -> list[int] | None:
    """Teacher ids -> student ids through ``lookup``; None when one of them has no student id."""
    out = [int(lookup[i]) if 0 <= i < len(lookup) else -1 for i in ids]
    return None if any(i < 0 for i in out) else out


def translate_topk(ids, logprobs, lookup, spare_row: int | None, sampled=None):
    """Top-k rows [N, k] of teacher ids -> student ids; returns (ids, logprobs, entries dropped).

    A dropped entry (an id at or beyond the student's rows, or a special the student lacks) keeps its place
    as a bucket the teacher gives probability 0 (tokenizers.DROPPED_LOGPROB), so the loss renormalises the
    teacher over the kept entries; its id becomes ``spare_row``, a student embedding row no token uses,
    or else the row's first kept id. A row with every entry dropped puts all the teacher's mass on the
    token it sampled there (``sampled``, the flat completion ids, translated), which is what it wrote.
    """
    import numpy as np

    from ..tokenizers import DROPPED_LOGPROB

    safe = np.clip(ids.astype(np.int64), 0, len(lookup) - 1)
    mapped = np.where((ids >= 0) & (ids < len(lookup)), lookup[safe], -1)
    drop = mapped < 0
    if not drop.any():
        return mapped, logprobs, 0
    first_kept = np.take_along_axis(mapped, np.argmax(~drop, axis=1)[:, None], axis=1)
    fill = np.full_like(first_kept, spare_row) if spare_row is not None else np.maximum(first_kept, 0)
    out_ids = np.where(drop, fill, mapped)
    out_lps = np.where(drop, np.float32(DROPPED_LOGPROB), logprobs).astype(np.float32)
    none_kept = drop.all(axis=1)
    if none_kept.any() and sampled is not None:
        target = np.asarray(sampled, dtype=np.int64)[none_kept]
        inside = (target >= 0) & (target < len(lookup))
        out_ids[none_kept, 0] = np.where(inside, lookup[np.clip(target, 0, len(lookup) - 1)], 0).clip(min=0)
        out_lps[none_kept, 0] = 0.0
    return out_ids, out_lps, int(drop.sum())


def _layout(seqs: list[list[int]], spans: list[tuple[int, int]], pack_len: int | None, pad_id: int) -> dict:
    """Place sequences in rows: one per row, right-padded with an attention mask; or, with ``pack_len``,
    several per row in their order (a new row when the next would pass ``pack_len``), with position ids
    restarting per sequence, from which transformers builds a mask that keeps attention inside each
    sequence. Trailing padding of a packed row is a segment of its own and is never gathered.
    """
    import torch

    rows: list[list[int]] = []  # sequence numbers per row
    for i, s in enumerate(seqs):
        if pack_len and rows and sum(len(seqs[j]) for j in rows[-1]) + len(s) <= pack_len:
            rows[-1].append(i)
        else:
            rows.append([i])
    width = max((sum(len(seqs[j]) for j in row) for row in rows), default=1)
    ids = torch.full((max(len(rows), 1), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    positions = torch.zeros_like(ids)
    index = []
    for r, row in enumerate(rows):
        at = 0
        for j in row:
            s, (n_p, n_c) = seqs[j], spans[j]
            ids[r, at: at + len(s)] = torch.tensor(s)
            mask[r, at: at + len(s)] = 1
            positions[r, at: at + len(s)] = torch.arange(len(s))
            index.extend(r * width + at + n_p - 1 + k for k in range(n_c))
            at += len(s)
        positions[r, at:] = torch.arange(width - at)
    batch = {"input_ids": ids, "gather_index": torch.tensor(index, dtype=torch.long)}
    if pack_len:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = mask
    return batch
