"""Training batches: shard rows -> padded prompt + completion ids, the positions that predict each completion
token, and the teacher's top-k rows for them."""

from __future__ import annotations

def _lists(column) -> list:
    return column.to_pylist()


def build_batch(table, *, max_seq_len: int, pad_id: int, with_topk: bool, retokenize=None) -> tuple[dict, dict]:
    """Shard rows (pyarrow) -> padded tensors for StudentWithLoss, plus counts of truncated/skipped rows.

    Position t of the sequence predicts token t+1, so completion token i (sequence position P+i)
    is predicted at P+i-1; ``gather_index`` holds those flat positions, ``targets`` the tokens and
    ``topk_*`` the teacher's rows for them. ``retokenize(row) -> (prompt_ids, completion_ids)``
    replaces the stored ids for a student with another vocabulary (sequence-level KD only).
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
    width = max((len(s) for s in seqs), default=1)
    ids = torch.full((max(kept, 1), width), pad_id, dtype=torch.long)
    mask = torch.zeros((max(kept, 1), width), dtype=torch.long)
    index = []
    for row, (s, (_, n_p, n_c)) in enumerate(zip(seqs, gathers)):
        ids[row, : len(s)] = torch.tensor(s)
        mask[row, : len(s)] = 1
        index.extend(row * width + n_p - 1 + j for j in range(n_c))
    batch = {"input_ids": ids, "attention_mask": mask, "gather_index": torch.tensor(index, dtype=torch.long),
             "targets": torch.tensor(targets, dtype=torch.long)}
    if with_topk:
        sel = np.concatenate([np.arange(r.start, r.stop) for r in tk_rows]) if tk_rows else np.zeros(0, dtype=int)
        batch["topk_ids"] = torch.from_numpy(flat_ids[sel].astype(np.int64))
        batch["topk_logprobs"] = torch.from_numpy(flat_lps[sel])
    return batch, stats
