"""Distillation losses on completion tokens, computed in chunks so logits never exist for a whole batch.

    loss = (1 - alpha) * CE(student, teacher's sampled tokens) + alpha * s(T) * D(teacher_T || student_T)

s(T) = T^2 for the KL divergences (Hinton et al.: their gradient w.r.t. the logits shrinks as 1/T^2, and T^2 keeps
the KD term's weight independent of T); 1 for jsd and tvd, which are bounded and whose gradients do not follow
that 1/T^2 law (tvd's shrinks as 1/T), as in TRL's GKD and torchtune (see the README's loss section).

The teacher distribution is its stored top-k log-probabilities renormalised at temperature T, with
an optional (k+1)-th bucket for the mass outside the top k. The student distribution is taken over
the same buckets, built the same way: its probabilities at the teacher's top-k ids (renormalised
over those k, or with the rest of its mass as the tail bucket), then tempered. D is one of forward_kl, reverse_kl,
jsd (with beta) or tvd; or, with estimator "sampled" (on the student's own samples), the one-sample reverse KL
estimate at the sampled token's bucket (sampled_reverse_kl). Pure torch: no Ray, no transformers.

Shapes: N completion positions, H hidden size, V vocabulary, k top-k size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
T2_SCALED = ("forward_kl", "reverse_kl")  # divergences whose KD term is multiplied by T^2
_EPS = 1e-6


@dataclass(frozen=True)
class KDSettings:
    alpha: float = 0.5
    temperature: float = 1.0
    divergence: str = "forward_kl"
    jsd_beta: float = 0.5
    tail_bucket: bool = False
    chunk_size: int = 1024
    estimator: str = "topk"  # topk: the divergence over the buckets; sampled: sampled_reverse_kl


# Logit elements one loss chunk may hold (chunk x vocabulary): 256 MiB of fp32. Its gradient, the
# log-softmax and the recompute in backward keep a few such tensors alive at once.
CHUNK_LOGITS_BUDGET = 2**26
CHUNK_SIZE_RANGE = (64, 8192)


def default_chunk_size(vocab_size: int) -> int:
    """train.loss_chunk_size when unset: the power of two nearest CHUNK_LOGITS_BUDGET / vocabulary, in
    CHUNK_SIZE_RANGE (512 for Qwen's 152k vocabulary, 2048 for a 32k one)."""
    ideal = CHUNK_LOGITS_BUDGET / max(vocab_size, 1)
    low, high = CHUNK_SIZE_RANGE
    return int(min(high, max(low, 2 ** round(math.log2(ideal)))))


def _log_tail(logp_top: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logp_top))) per row, clamped so a top-k holding all mass gives a tiny tail."""
    mass = torch.logsumexp(logp_top, dim=-1).exp().clamp(max=1 - _EPS)
    return torch.log1p(-mass)


def teacher_buckets(topk_logprobs: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """[N, k] untempered teacher log-probs -> [N, k(+1)] log-probs at temperature T, summing to 1."""
    lp = topk_logprobs.float()
    if tail:
        lp = torch.cat([lp, _log_tail(lp).unsqueeze(-1)], dim=-1)
    return F.log_softmax(lp / temperature, dim=-1)


def student_buckets(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """[N, V] student logits -> [N, k(+1)] log-probs at temperature T over the teacher's buckets.

    Built exactly like the teacher's: untempered buckets first, then tempered, so a student equal
    to the teacher has zero divergence at any T, with or without the tail bucket.
    """
    if not tail:
        return F.log_softmax(logits.float().gather(-1, topk_ids.long()) / temperature, dim=-1)
    top = F.log_softmax(logits.float(), dim=-1).gather(-1, topk_ids.long())
    return F.log_softmax(torch.cat([top, _log_tail(top).unsqueeze(-1)], dim=-1) / temperature, dim=-1)


def divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-position divergence [N] between teacher and student bucket log-probs [N, B]."""
    p, q = t_logp.exp(), s_logp.exp()
    if kind == "forward_kl":
        return (p * (t_logp - s_logp)).sum(-1)
    if kind == "reverse_kl":
        return (q * (s_logp - t_logp)).sum(-1)
    if kind == "jsd":
        m_logp = torch.logsumexp(torch.stack([t_logp + torch.log(torch.tensor(beta)),
                                              s_logp + torch.log(torch.tensor(1 - beta))]), dim=0)
        return beta * (p * (t_logp - m_logp)).sum(-1) + (1 - beta) * (q * (s_logp - m_logp)).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def sampled_bucket(targets: torch.Tensor, topk_ids: torch.Tensor, tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([N] bucket index, [N] usable) of each sampled token: its place in the teacher's top k, else the tail
    bucket (index k) when there is one; without it a token outside the top k has no bucket (not usable)."""
    hit = topk_ids.long() == targets.long().unsqueeze(-1)
    inside = hit.any(-1)
    index = torch.where(inside, hit.float().argmax(-1), torch.full_like(targets.long(), topk_ids.shape[-1]))
    return index, inside | tail


def sampled_reverse_kl(t_logp: torch.Tensor, s_logp: torch.Tensor, bucket: torch.Tensor,
                       usable: torch.Tensor) -> torch.Tensor:
    """Per-position one-sample estimate of reverse KL from the student's own sampled token (its bucket b):
    a = log q(b) - log p(b), whose mean over b ~ q is KL(q || p). Its value is a; its gradient a * grad log q(b),
    the score-function (REINFORCE) gradient, whose mean over b ~ q is the gradient of KL(q || p). [N]."""
    index = bucket.clamp(max=s_logp.shape[-1] - 1).unsqueeze(-1)  # an unusable position's index is never used
    s_b = s_logp.gather(-1, index).squeeze(-1)
    a = (s_b - t_logp.gather(-1, index).squeeze(-1)).detach()
    return torch.where(usable, a + a * (s_b - s_b.detach()), torch.zeros_like(a))


def kd_scale(settings: KDSettings) -> float:
    """The factor on the KD term: T^2 for the KL divergences, 1 for jsd and tvd (module docstring)."""
    return settings.temperature ** 2 if settings.divergence in T2_SCALED else 1.0


def _chunk_terms(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor | None,
                 topk_logprobs: torch.Tensor | None, s: KDSettings, kd_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Summed (CE, KD) of one chunk as a [2] tensor; the chunk's logits live only inside this call. With
    ``kd_weights`` [N] each position's KD term is scaled by its sample's weight."""
    logits = (hidden @ weight.t()).float()
    ce = F.cross_entropy(logits, targets.long(), reduction="sum")
    if topk_ids is None:  # with top-k given, kd is computed (and logged) even at alpha = 0
        return torch.stack([ce, ce.new_zeros(())])
    t_logp = teacher_buckets(topk_logprobs, s.temperature, s.tail_bucket)
    s_logp = student_buckets(logits, topk_ids, s.temperature, s.tail_bucket)
    if s.estimator == "sampled":  # targets are the student's own samples (distill-llm rounds)
        kd = sampled_reverse_kl(t_logp, s_logp, *sampled_bucket(targets, topk_ids, s.tail_bucket))
    else:
        kd = divergence(t_logp, s_logp, s.divergence, s.jsd_beta)
    kd = (kd * kd_weights).sum() if kd_weights is not None else kd.sum()
    return torch.stack([ce, kd])


def distill_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                 topk_ids: torch.Tensor | None, topk_logprobs: torch.Tensor | None,
                 settings: KDSettings, normalizer: float | None = None,
                 kd_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Mixed CE + KD over N completion positions, computed ``settings.chunk_size`` rows at a time.

    hidden [N, H] are the student's final hidden states at the positions that predict each
    completion token; weight [V, H] its output embedding; targets [N] the teacher's sampled tokens;
    topk_ids [N, k] and topk_logprobs [N, k] the stored teacher top-k. Each chunk is recomputed in
    backward (activation checkpointing), so peak memory is O(chunk_size x V), not O(N x V).
    kd_weights [N] (optional): the KD term's weight at each position, its sample's ``kd_weight`` (0: CE only).
    Returns loss (the mean over ``normalizer`` positions, default N), ce and kd (means, detached).
    """
    n = hidden.shape[0]
    denom = float(max(normalizer if normalizer is not None else n, 1))  # a count of tokens; 0 would divide by 0
    totals = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, n, settings.chunk_size):
        sl = slice(start, start + settings.chunk_size)
        ids = topk_ids[sl] if topk_ids is not None else None
        lps = topk_logprobs[sl] if topk_logprobs is not None else None
        args = (hidden[sl], weight, targets[sl], ids, lps, settings,
                kd_weights[sl] if kd_weights is not None and ids is not None else None)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            terms = checkpoint(_chunk_terms, *args, use_reentrant=False)
        else:
            terms = _chunk_terms(*args)
        totals = totals + terms
    ce, kd = totals[0] / denom, totals[1] / denom
    a, scale = settings.alpha, kd_scale(settings)
    loss = (1 - a) * ce + a * scale * kd
    return {"loss": loss, "ce": ce.detach(), "kd": kd.detach()}
