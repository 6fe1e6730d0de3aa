"""Unit tests for distill_llm.student.losses against an independent float64 full-vocabulary reference.

The reference below materialises logits for all N positions at once and builds the teacher and
student bucket distributions from scratch; it shares no code with the module under test.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from distill_llm.student.losses import DIVERGENCES, KDSettings, distill_loss, divergence

N, H, V, K = 37, 16, 50, 5
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# Independent reference (float64, whole batch at once)
# ----------------------------------------------------------------------------------------------

def _ref_teacher(topk_logprobs: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    lp = topk_logprobs.double()
    if tail:
        leftover = 1.0 - lp.exp().sum(-1, keepdim=True)
        lp = torch.cat([lp, leftover.log()], dim=-1)
    z = lp / temperature
    return z - torch.logsumexp(z, dim=-1, keepdim=True)


def _ref_student(logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float, tail: bool) -> torch.Tensor:
    """The student's buckets built like the teacher's: untempered probabilities (+ leftover), then tempered."""
    z = logits.double()
    if not tail:
        g = z.gather(1, topk_ids) / temperature
        return g - torch.logsumexp(g, dim=-1, keepdim=True)
    full = z - torch.logsumexp(z, dim=-1, keepdim=True)
    top = full.gather(1, topk_ids)
    leftover = 1.0 - top.exp().sum(-1, keepdim=True)
    b = torch.cat([top, leftover.log()], dim=-1) / temperature
    return b - torch.logsumexp(b, dim=-1, keepdim=True)


def _ref_divergence(t_logp: torch.Tensor, s_logp: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    p, q = t_logp.exp(), s_logp.exp()
    if kind == "forward_kl":
        return (p * (p.log() - q.log())).sum(-1)
    if kind == "reverse_kl":
        return (q * (q.log() - p.log())).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_distill(hidden, weight, targets, topk_ids, topk_logprobs, *, alpha, temperature, kind,
                beta=0.5, tail=False, normalizer=None):
    """Returns float64 (loss, ce, kd) with loss differentiable w.r.t. hidden/weight."""
    logits = hidden.double() @ weight.double().t()
    n = logits.shape[0]
    denom = float(normalizer) if normalizer is not None else float(max(n, 1))
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    ce = -log_probs.gather(1, targets.long().unsqueeze(1)).sum() / denom
    t = _ref_teacher(topk_logprobs, temperature, tail)
    s = _ref_student(logits, topk_ids.long(), temperature, tail)
    kd = _ref_divergence(t, s, kind, beta).sum() / denom
    scale = temperature ** 2 if kind in ("forward_kl", "reverse_kl") else 1.0  # T^2 for the KL divergences only
    loss = (1 - alpha) * ce + alpha * scale * kd
    return loss, ce, kd


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def make_inputs(seed: int = 0, n: int = N, h: int = H, v: int = V, k: int = K):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float32)
    weight = torch.randn(v, h, generator=g, dtype=torch.float32) * 0.3
    teacher_logits = torch.randn(n, v, generator=g, dtype=torch.float32) * 2.0
    teacher_logp = F.log_softmax(teacher_logits, dim=-1)
    topk_logprobs, topk_ids = torch.topk(teacher_logp, k, dim=-1, sorted=True)
    if n:
        targets = torch.multinomial(teacher_logp.exp(), 1, generator=g).squeeze(1)
    else:
        targets = torch.zeros(0, dtype=torch.long)
    return hidden, weight, targets, topk_ids, topk_logprobs, teacher_logits


def _close(a, b, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny; intra-op threads only add overhead (badly so on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# 1. Agreement with the reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_matches_reference(kind, tail, temperature, alpha):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=1)
    s = KDSettings(alpha=alpha, temperature=temperature, divergence=kind, tail_bucket=tail, chunk_size=8)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    r_loss, r_ce, r_kd = ref_distill(hidden, weight, targets, ids, lps, alpha=alpha,
                                     temperature=temperature, kind=kind, tail=tail)
    assert out["loss"].dtype == torch.float32
    _close(out["loss"], r_loss)
    _close(out["ce"], r_ce)
    _close(out["kd"], r_kd)
    assert not out["ce"].requires_grad and not out["kd"].requires_grad


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("tail", [False, True])
def test_jsd_beta_matches_reference(beta, tail):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=2)
    s = KDSettings(alpha=0.6, temperature=1.5, divergence="jsd", jsd_beta=beta, tail_bucket=tail, chunk_size=5)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    r_loss, r_ce, r_kd = ref_distill(hidden, weight, targets, ids, lps, alpha=0.6, temperature=1.5,
                                     kind="jsd", beta=beta, tail=tail)
    _close(out["loss"], r_loss)
    _close(out["ce"], r_ce)
    _close(out["kd"], r_kd)


@pytest.mark.parametrize("kind,tail,temperature",
                         [(d, tl, tp) for d in DIVERGENCES for tl in (False, True) for tp in (1.0, 2.0)])
def test_gradients_match_reference(kind, tail, temperature):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=3)
    s = KDSettings(alpha=0.4, temperature=temperature, divergence=kind, tail_bucket=tail, chunk_size=6)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    distill_loss(h, w, targets, ids, lps, s)["loss"].backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    ref_distill(h64, w64, targets, ids, lps, alpha=0.4, temperature=temperature, kind=kind,
                tail=tail)[0].backward()
    _close(h.grad, h64.grad, rtol=1e-4, atol=1e-6)
    _close(w.grad, w64.grad, rtol=1e-4, atol=1e-6)


def test_kd_reported_when_alpha_zero():
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=1)
    s = KDSettings(alpha=0.0, temperature=1.0, divergence="forward_kl")
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    _, _, r_kd = ref_distill(hidden, weight, targets, ids, lps, alpha=0.0, temperature=1.0, kind="forward_kl")
    assert r_kd > 0.1
    _close(out["kd"], r_kd)


# ----------------------------------------------------------------------------------------------
# 2. Chunk boundaries
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,tail", [("forward_kl", False), ("reverse_kl", True), ("jsd", True), ("tvd", False)])
def test_chunk_size_invariance(kind, tail):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=4)
    results = []
    for cs in (1, 3, 7, N, N + 5):
        s = KDSettings(alpha=0.5, temperature=2.0, divergence=kind, tail_bucket=tail, chunk_size=cs)
        h = hidden.clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        out = distill_loss(h, w, targets, ids, lps, s)
        out["loss"].backward()
        results.append((cs, out["loss"].detach(), out["ce"], out["kd"], h.grad, w.grad))
    base = results[-2]  # chunk_size == N: one chunk
    for cs, loss, ce, kd, gh, gw in results:
        for a, b in zip((loss, ce, kd, gh, gw), base[1:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"chunk_size={cs}: {m}")


def test_chunk_size_invariance_no_grad():
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=5)
    vals = []
    with torch.no_grad():
        for cs in (1, 3, 7, N, N + 5):
            s = KDSettings(alpha=0.3, temperature=1.0, divergence="forward_kl", tail_bucket=True, chunk_size=cs)
            out = distill_loss(hidden, weight, targets, ids, lps, s)
            vals.append(torch.stack([out["loss"], out["ce"], out["kd"]]))
    for v in vals:
        torch.testing.assert_close(v, vals[0], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 3. Empty input and normalizer
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalizer", [None, 4.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_all_masked_returns_finite_zeros(kind, normalizer):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=6, n=0)
    assert hidden.shape == (0, H) and ids.shape == (0, K)
    s = KDSettings(alpha=0.5, temperature=2.0, divergence=kind, tail_bucket=True, chunk_size=4)
    out = distill_loss(hidden, weight.requires_grad_(True), targets, ids, lps, s, normalizer=normalizer)
    for key in ("loss", "ce", "kd"):
        assert out[key].shape == ()
        assert torch.isfinite(out[key]), key
        assert out[key].item() == 0.0, key


@pytest.mark.parametrize("normalizer", [1.0, 10.0, 123.5])
@pytest.mark.parametrize("tail", [False, True])
def test_normalizer_divides_sums(normalizer, tail):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=7)
    s = KDSettings(alpha=0.3, temperature=2.0, divergence="jsd", tail_bucket=tail, chunk_size=10)
    out = distill_loss(hidden, weight, targets, ids, lps, s, normalizer=normalizer)
    r_loss, r_ce, r_kd = ref_distill(hidden, weight, targets, ids, lps, alpha=0.3, temperature=2.0, kind="jsd",
                                     tail=tail, normalizer=normalizer)
    _close(out["loss"], r_loss)
    _close(out["ce"], r_ce)
    _close(out["kd"], r_kd)
    # normalizer scales every term relative to the default mean over N
    default = distill_loss(hidden, weight, targets, ids, lps, s)
    for key in ("loss", "ce", "kd"):
        _close(out[key] * normalizer, default[key] * N)


def test_no_teacher_topk_gives_pure_ce():
    hidden, weight, targets, _, _, _ = make_inputs(seed=8)
    s = KDSettings(alpha=0.5, temperature=2.0)
    out = distill_loss(hidden, weight, targets, None, None, s)
    logits = hidden.double() @ weight.double().t()
    ce = F.cross_entropy(logits, targets, reduction="mean")
    _close(out["ce"], ce)
    assert out["kd"].item() == 0.0
    _close(out["loss"], 0.5 * ce)


# ----------------------------------------------------------------------------------------------
# 4. Established implementation: torch.nn.functional.kl_div with a full-vocabulary "top-k"
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_forward_kl_matches_torch_kl_div_when_k_equals_v(temperature):
    hidden, weight, targets, ids, lps, teacher_logits = make_inputs(seed=9, k=V)
    s = KDSettings(alpha=0.5, temperature=temperature, divergence="forward_kl", tail_bucket=False, chunk_size=9)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    logits = hidden.double() @ weight.double().t()
    expected = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                        F.log_softmax(teacher_logits.double() / temperature, dim=-1),
                        log_target=True, reduction="batchmean")
    _close(out["kd"], expected)
    ce = F.cross_entropy(logits, targets)
    _close(out["loss"], 0.5 * ce + 0.5 * temperature ** 2 * expected)


# ----------------------------------------------------------------------------------------------
# 5. Properties
# ----------------------------------------------------------------------------------------------

def _self_distill_inputs(k):
    hidden, weight, targets, _, _, _ = make_inputs(seed=10)
    logits = hidden @ weight.t()
    lp_full = F.log_softmax(logits, dim=-1)
    lps, ids = torch.topk(lp_full, k, dim=-1, sorted=True)
    return hidden, weight, targets, ids, lps


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_kd_zero_when_student_equals_teacher_full_vocab(kind, temperature):
    hidden, weight, targets, ids, lps = _self_distill_inputs(k=V)
    s = KDSettings(alpha=0.5, temperature=temperature, divergence=kind, tail_bucket=False, chunk_size=8)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    assert abs(out["kd"].item()) < 1e-6


@pytest.mark.parametrize("tail,temperature", [(False, 1.0), (False, 2.0), (True, 1.0)])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_kd_zero_when_student_equals_teacher_topk(kind, tail, temperature):
    hidden, weight, targets, ids, lps = _self_distill_inputs(k=K)
    s = KDSettings(alpha=0.5, temperature=temperature, divergence=kind, tail_bucket=tail, chunk_size=8)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    assert abs(out["kd"].item()) < 1e-6


@pytest.mark.parametrize("k", [K, V])
def test_kd_zero_when_student_equals_teacher_tail_tempered(k):
    hidden, weight, targets, ids, lps = _self_distill_inputs(k=k)
    s = KDSettings(alpha=0.5, temperature=2.0, divergence="forward_kl", tail_bucket=True, chunk_size=8)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    assert abs(out["kd"].item()) < 1e-6


@pytest.mark.parametrize("kind,tail,temperature",
                         list(itertools.product(DIVERGENCES, (False, True), (1.0, 2.0))))
def test_kd_nonnegative(kind, tail, temperature):
    for seed in range(3):
        hidden, weight, targets, ids, lps, _ = make_inputs(seed=20 + seed)
        s = KDSettings(alpha=0.5, temperature=temperature, divergence=kind, tail_bucket=tail, chunk_size=16)
        out = distill_loss(hidden, weight, targets, ids, lps, s)
        assert out["kd"].item() >= 0.0
        assert out["ce"].item() >= 0.0


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_per_position_nonnegative(kind):
    g = torch.Generator().manual_seed(11)
    t = F.log_softmax(torch.randn(200, 6, generator=g) * 3, dim=-1)
    s = F.log_softmax(torch.randn(200, 6, generator=g) * 3, dim=-1)
    d = divergence(t, s, kind)
    assert d.shape == (200,)
    assert torch.isfinite(d).all()
    assert (d >= -1e-6).all()
    assert divergence(t, t, kind).abs().max() < 1e-6
    if kind == "tvd":
        assert (d <= 1 + 1e-6).all()
    if kind == "jsd":
        assert (d <= torch.log(torch.tensor(2.0)) + 1e-6).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
def test_alpha_zero_loss_equals_ce(kind, tail):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=12)
    s = KDSettings(alpha=0.0, temperature=2.0, divergence=kind, tail_bucket=tail, chunk_size=7)
    out = distill_loss(hidden, weight, targets, ids, lps, s)
    torch.testing.assert_close(out["loss"].detach(), out["ce"], rtol=0, atol=0)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("tail", [False, True])
def test_gradient_flows(kind, tail):
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=13)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    s = KDSettings(alpha=0.5, temperature=2.0, divergence=kind, tail_bucket=tail, chunk_size=10)
    distill_loss(h, w, targets, ids, lps, s)["loss"].backward()
    for g in (h.grad, w.grad):
        assert g is not None
        assert torch.isfinite(g).all()
        assert g.abs().sum() > 0


def test_kd_only_gradient_flows():
    """alpha=1: the gradient comes from the KD term alone and matches the reference."""
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=14)
    h = hidden.clone().requires_grad_(True)
    s = KDSettings(alpha=1.0, temperature=1.0, divergence="reverse_kl", chunk_size=4)
    distill_loss(h, weight, targets, ids, lps, s)["loss"].backward()
    h64 = hidden.double().requires_grad_(True)
    ref_distill(h64, weight, targets, ids, lps, alpha=1.0, temperature=1.0, kind="reverse_kl")[0].backward()
    assert torch.isfinite(h.grad).all()
    _close(h.grad, h64.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. Errors
# ----------------------------------------------------------------------------------------------

def test_unknown_divergence_raises():
    t = F.log_softmax(torch.randn(3, 4), dim=-1)
    with pytest.raises(ValueError, match="nope"):
        divergence(t, t, kind="nope")


def test_distill_loss_unknown_divergence_raises():
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=15)
    s = dataclasses.replace(KDSettings(), divergence="nope", alpha=0.5)
    with pytest.raises(ValueError):
        distill_loss(hidden, weight, targets, ids, lps, s)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_t_squared_scales_only_the_kl_divergences(kind):
    """At T=3 the KD term is 9 x kd for forward/reverse KL and 1 x kd for jsd and tvd (README, loss section)."""
    hidden, weight, targets, ids, lps, _ = make_inputs(seed=7)
    settings = KDSettings(alpha=1.0, temperature=3.0, divergence=kind)
    out = distill_loss(hidden, weight, targets, ids, lps, settings)
    expected = 9.0 if kind in ("forward_kl", "reverse_kl") else 1.0
    assert out["kd"] > 0
    torch.testing.assert_close(out["loss"], expected * out["kd"], rtol=1e-6, atol=0)
