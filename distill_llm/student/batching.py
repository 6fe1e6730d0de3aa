"""Training batches: shard rows -> padded prompt + completion ids, the positions that predict each completion
token, and the teacher's top-k rows for them."""

from __future__ import annotations

def _lists(column) -> list:
    return column.to_pylist()


def build_batch(table, *, max_seq_len: int, pad_id: int, with_topk: bool, retokenize=None,
                pack: bool = False) -> tuple[dict, dict]:
    """Shard rows (pyarrow) -> padded tensors for StudentWithLoss, plus counts of truncated/skipped rows.

    Position t of the sequence predicts token t+1, so completion token i (sequence position P+i)
    is predicted at P+i-1; ``gather_index`` holds those flat positions, ``targets`` the tokens and
    ``topk_*`` the teacher's rows for them. ``retokenize(row) -> (prompt_ids, completion_ids)``
    replaces the stored ids for a student with another vocabulary (sequence-level KD only).
    With ``pack`` the sequences are laid end to end in rows of at most ``max_seq_len`` tokens, with
    ``position_ids`` restarting at 0 for each and no ``attention_mask`` (see ``_layout``).
    """
    import numpy as np
    import torch

    n = table.num_rows
    prompts = _lists(table.column("prompt_token_ids"))
    completions = _lists(table.column("completion_token_ids"))
    rows_for_retok = table.select(["messages", "completion_text", "finish_reason"]).to_pylist() if retokenize else None
    if with_topk:
        # list<fixed_size_list<k>> -> one flat [sum(C), k] array and per-row offsets; no Python per token
        col = table.column("topk_token_ids").combine_chunks()
        lcol = table.column("topk_logprobs").combine_chunks()
        k = col.type.value_type.list_size
        offsets = col.offsets.to_numpy()
        flat_ids = col.values.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
        flat_lps = lcol.values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)
    seqs, gathers, targets, tk_rows = [], [], [], []
    stats = {"rows": 0, "truncated": 0, "skipped_prompt_too_long": 0, "skipped_empty": 0,
             "skipped_non_finite": 0}
    kept = 0
    for i in range(n):
        p, c = (prompts[i], completions[i]) if not retokenize else retokenize(rows_for_retok[i])
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
        kept += 1
    stats["rows"] = kept
    batch = _layout(seqs, [(n_p, n_c) for _, n_p, n_c in gathers], max_seq_len if pack else None, pad_id)
    batch["targets"] = torch.tensor(targets, dtype=torch.long)
    if with_topk:
        sel = np.concatenate([np.arange(r.start, r.stop) for r in tk_rows]) if tk_rows else np.zeros(0, dtype=int)
        batch["topk_ids"] = torch.from_numpy(flat_ids[sel].astype(np.int64))
        batch["topk_logprobs"] = torch.from_numpy(flat_lps[sel])
    return batch, stats


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
