"""Training sequences: positions, truncation, top-k alignment and counted skips."""

import numpy as np
import pyarrow as pa
import torch

from distill_llm.corpus.schema import shard_schema
from distill_llm.student.batching import build_batch

K = 3


def table(rows):
    schema = shard_schema(K, "float32")
    data = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.table({k: pa.array(v, type=schema.field(k).type) for k, v in data.items()}, schema=schema)


def row(prompt, completion, lp=None):
    c = len(completion)
    ids = [[t, t + 100, t + 200] for t in completion]  # the sampled token first in each top-k row
    lps = lp if lp is not None else [[-0.1 - i, -2.0, -3.0] for i in range(c)]
    return {"sample_id": "s", "prompt_id": "p", "sample_index": 0, "prompt_token_ids": prompt,
            "completion_token_ids": completion, "topk_token_ids": ids, "topk_logprobs": lps}


def test_positions_targets_and_topk_line_up():
    t = table([row([1, 2, 3], [10, 11]), row([4], [20, 21, 22])])
    batch, stats = build_batch(t, max_seq_len=16, pad_id=0, with_topk=True)
    ids = batch["input_ids"]
    assert ids.tolist() == [[1, 2, 3, 10, 11], [4, 20, 21, 22, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    flat = ids.reshape(-1)
    # the token at gather position p + 1 is the target predicted from position p
    assert flat[batch["gather_index"] + 1].tolist() == batch["targets"].tolist() == [10, 11, 20, 21, 22]
    assert batch["topk_ids"][:, 0].tolist() == [10, 11, 20, 21, 22]
    assert torch.allclose(batch["topk_logprobs"][:, 0], torch.tensor([-0.1, -1.1, -0.1, -1.1, -2.1]))
    assert stats["rows"] == 2 and stats["truncated"] == 0


def test_truncation_and_skips_are_counted():
    t = table([row([1, 2, 3], [10, 11, 12, 13]),  # truncated to 5 tokens: 2 completion tokens kept
               row([1, 2, 3, 4, 5, 6], [30]),  # prompt alone fills max_seq_len: skipped
               row([1], [40, 41], lp=[[-0.1, float("nan"), -3.0], [-0.1, -2.0, -3.0]]),  # NaN: skipped
               row([1], [])])  # empty completion: skipped
    batch, stats = build_batch(t, max_seq_len=5, pad_id=0, with_topk=True)
    assert stats == {"rows": 1, "truncated": 1, "skipped_prompt_too_long": 1, "skipped_empty": 1,
                     "skipped_non_finite": 1}
    assert batch["targets"].tolist() == [10, 11] and batch["topk_ids"].shape == (2, K)


def test_sequence_level_only_needs_no_topk_and_can_retokenize():
    t = table([row([1, 2], [7, 8])])
    batch, _ = build_batch(t, max_seq_len=8, pad_id=0,
                           with_topk=False, retokenize=lambda r: ([5, 5, 5], [9]))
    assert "topk_ids" not in batch
    assert batch["input_ids"].tolist() == [[5, 5, 5, 9]] and batch["targets"].tolist() == [9]


def test_empty_batch_still_has_shapes():
    t = table([row([1, 2, 3, 4], [9])])
    batch, stats = build_batch(t, max_seq_len=3, pad_id=0, with_topk=True)
    assert stats["rows"] == 0 and batch["gather_index"].numel() == 0 and batch["topk_ids"].shape == (0, K)
    assert np.all(batch["input_ids"].numpy() == 0)


def test_packing_puts_sequences_end_to_end_with_restarting_positions():
    t = table([row([1, 2, 3], [10, 11]), row([4], [20, 21, 22]), row([5, 6], [30] * 9)])
    batch, stats = build_batch(t, max_seq_len=12, pad_id=0, with_topk=True, pack=True)
    assert "attention_mask" not in batch and stats["rows"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 4, 20, 21, 22, 0, 0], [5, 6] + [30] * 9]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1], list(range(11))]
    flat = batch["input_ids"].flatten()
    # each gathered position is followed by its target; targets and top-k rows in sequence order
    assert flat[batch["gather_index"] + 1].tolist() == batch["targets"].tolist() == [10, 11, 20, 21, 22] + [30] * 9
    assert batch["topk_ids"][:, 0].tolist() == batch["targets"].tolist()


def test_packed_and_padded_batches_give_the_same_loss_and_gradients():
    """Rows of unequal lengths: packed (position ids restart, attention stays inside each sequence) and padded
    give the same loss and gradients; packing without the boundary (one long sequence) would not."""
    from distill_llm.paths import resolve_model
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import StudentWithLoss, load_student

    rng = np.random.default_rng(0)
    lengths = [(3, 20), (8, 4), (2, 33), (5, 9)]
    rows = []
    for p, c in lengths:  # ids inside the toy student's 128-row vocabulary
        r = row(rng.integers(3, 90, p).tolist(), rng.integers(3, 27, c).tolist())
        r["topk_token_ids"] = [[i, i + 30, i + 60] for i in r["completion_token_ids"]]
        rows.append(r)
    t = table(rows)
    model = StudentWithLoss(load_student(resolve_model("toy-student"), torch.float32), KDSettings(alpha=0.5))

    def loss_and_grads(batch):
        model.zero_grad()
        out = model(**batch)
        out["loss"].backward()
        return out["loss"].detach(), {n: p.grad.clone() for n, p in model.model.named_parameters()}

    padded, _ = build_batch(t, max_seq_len=64, pad_id=0, with_topk=True)
    packed, _ = build_batch(t, max_seq_len=64, pad_id=0, with_topk=True, pack=True)
    assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]
    loss_a, grads_a = loss_and_grads(padded)
    loss_b, grads_b = loss_and_grads(packed)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)
    crossing = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"]))
    assert not torch.allclose(loss_and_grads(crossing)[0], loss_a, rtol=1e-4)


def test_packed_attention_equals_a_block_diagonal_mask_and_trains_the_same():
    """packed_sdpa_attention (causal SDPA per packed sequence, used with train.packing) gives what one SDPA
    call with the dense block-diagonal causal mask gives, with grouped KV heads; a student switched to it
    gives the padded batch's loss and gradients."""
    from distill_llm.paths import resolve_model
    from distill_llm.student.losses import KDSettings
    from distill_llm.student.model import (PACKED_ATTENTION, StudentWithLoss, load_student, packed_sdpa_attention,
                                           use_packed_attention)

    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    q, k, v = (torch.randn(2, h, 10, 8, generator=g) for h in (4, 2, 2))
    seg = positions.eq(0).cumsum(-1)
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(10, 10, dtype=torch.bool).tril()
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                           attn_mask=allowed[:, None])
    module = torch.nn.Module()
    out, _ = packed_sdpa_attention(module, q, k, v, None, position_ids=positions)
    torch.testing.assert_close(out, dense.transpose(1, 2), rtol=1e-5, atol=1e-6)

    rng = np.random.default_rng(1)
    t = table([row(rng.integers(3, 90, p).tolist(), rng.integers(3, 27, c).tolist()) for p, c in [(3, 20), (8, 4),
                                                                                                  (2, 33)]])
    student = load_student(resolve_model("toy-student"), torch.float32)
    model = StudentWithLoss(student, KDSettings(alpha=0.0))
    padded, _ = build_batch(t, max_seq_len=64, pad_id=0, with_topk=False)
    packed, _ = build_batch(t, max_seq_len=64, pad_id=0, with_topk=False, pack=True)
    reference = model(**padded)["loss"]
    assert use_packed_attention(student) and student.config._attn_implementation == PACKED_ATTENTION
    torch.testing.assert_close(model(**packed)["loss"], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model(**padded)["loss"], reference, rtol=1e-5, atol=1e-6)
