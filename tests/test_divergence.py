"""Jensen–Shannon divergence of next-token distributions: the chunked path against a naive float64 one,
its properties (symmetry, zero, ln 2 bound, masking, broadcasting) and its peak memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mmpo.divergence import chunked_js_divergence, js_divergence, masked_token_mean

F64 = torch.float64
LN2 = math.log(2.0)


def naive_js(hidden_p, hidden_q, weight, bias=None, scale=1.0, softcap=None):
    """Full-vocabulary JS in float64, written from the definition with probabilities (no log-space tricks)."""
    lp = hidden_p.to(F64) @ weight.to(F64).T
    lq = hidden_q.to(F64) @ weight.to(F64).T
    if bias is not None:
        lp, lq = lp + bias.to(F64), lq + bias.to(F64)
    lp, lq = lp * scale, lq * scale
    if softcap is not None:
        lp, lq = softcap * torch.tanh(lp / softcap), softcap * torch.tanh(lq / softcap)
    p, q = torch.softmax(lp, -1), torch.softmax(lq, -1)
    p, q = torch.broadcast_tensors(p, q)
    m = (p + q) / 2
    kl_pm = torch.where(p > 0, p * torch.log(p / m), torch.zeros_like(p)).sum(-1)
    kl_qm = torch.where(q > 0, q * torch.log(q / m), torch.zeros_like(q)).sum(-1)
    return 0.5 * (kl_pm + kl_qm)


def heads(k=3, t=5, h=16, v=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    bias = torch.randn(v, generator=g, dtype=dtype)
    hidden_p = torch.randn(1, t, h, generator=g, dtype=dtype)
    # candidates: the original plus noise of growing size, so the divergences span small to large
    noise = torch.randn(k, t, h, generator=g, dtype=dtype) * torch.linspace(0.05, 2.0, k, dtype=dtype)[:, None, None]
    return hidden_p, hidden_p + noise, weight, bias


# Float32 chunks against a float64 reference: per-token JS ≤ ln 2, so an absolute tolerance is the right
# measure. The error seen on these cases is about 2e-7 (float32 rounding summed over the vocabulary).
ATOL, RTOL = 2e-6, 1e-4


@pytest.mark.parametrize("vocab_chunk", [1, 5, 8, 36, 37, 4096])  # 5, 8, 36 do not divide V = 37
def test_chunked_equals_naive_float64(vocab_chunk):
    hidden_p, hidden_q, weight, bias = heads()
    got = chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=vocab_chunk)
    want = naive_js(hidden_p, hidden_q, weight, bias)
    assert got.shape == (3, 5) and got.dtype == torch.float32
    torch.testing.assert_close(got.to(F64), want, atol=ATOL, rtol=RTOL)
    assert want.min() < 0.05 and want.max() > 0.3  # the cases span near-identical to far apart


def test_float64_inputs_match_to_float64_precision_and_scale_softcap():
    hidden_p, hidden_q, weight, bias = heads(dtype=F64)
    got = chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=6, logit_scale=0.7, softcap=3.0)
    assert got.dtype == F64
    torch.testing.assert_close(got, naive_js(hidden_p, hidden_q, weight, bias, 0.7, 3.0), atol=1e-12, rtol=1e-10)
    # the scale and the cap change the value (they are applied, not ignored)
    assert (got - chunked_js_divergence(hidden_p, hidden_q, weight, bias)).abs().max() > 1e-3


def test_logits_variant_equals_naive_and_chunked():
    hidden_p, hidden_q, weight, bias = heads(dtype=F64)
    logits_p, logits_q = hidden_p @ weight.T + bias, hidden_q @ weight.T + bias  # (1, T, V), (K, T, V)
    want = naive_js(hidden_p, hidden_q, weight, bias)
    torch.testing.assert_close(js_divergence(logits_p, logits_q), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=7), want)


def test_symmetric_zero_for_identical_and_bounded_by_ln2():
    hidden_p, hidden_q, weight, bias = heads()
    forward = chunked_js_divergence(hidden_p.expand_as(hidden_q), hidden_q, weight, bias, vocab_chunk=8)
    backward = chunked_js_divergence(hidden_q, hidden_p.expand_as(hidden_q), weight, bias, vocab_chunk=8)
    torch.testing.assert_close(forward, backward, atol=1e-7, rtol=1e-6)
    same = chunked_js_divergence(hidden_p, hidden_p, weight, bias, vocab_chunk=8)
    assert same.abs().max() < 1e-6
    # disjoint supports: two one-hot distributions give exactly ln 2
    weight = torch.eye(4) * 200.0
    a, b = torch.tensor([[[1.0, 0, 0, 0]]]), torch.tensor([[[0, 1.0, 0, 0]]])
    far = chunked_js_divergence(a, b, weight, vocab_chunk=3)
    torch.testing.assert_close(far, torch.full((1, 1), LN2))
    big = chunked_js_divergence(hidden_p * 50, hidden_q * 50, weight=heads()[2], vocab_chunk=8)
    assert big.max() <= LN2 and big.min() >= 0.0


def test_zero_probabilities_give_no_nan_values_or_gradients():
    # a −inf bias bans tokens 0 and 1 in both distributions (p = q = 0 there); with chunks of 2 the first
    # chunk holds only banned tokens, so its log-sum-exp is −inf as well
    hidden_p, hidden_q, weight, _ = heads(v=6, h=4)
    bias = torch.tensor([-math.inf, -math.inf, 0.0, 0.0, 0.0, 0.0])
    hidden_q = hidden_q.clone().requires_grad_(True)
    js = chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=2)
    want = naive_js(hidden_p, hidden_q.detach(), weight[2:], bias[2:])  # the banned tokens carry no mass
    torch.testing.assert_close(js.detach().to(F64), want, atol=ATOL, rtol=RTOL)
    js.sum().backward()
    assert torch.isfinite(hidden_q.grad).all() and hidden_q.grad.abs().sum() > 0
    # p = (1, 0) (exp(−2000) underflows to exactly 0) against q = (½, ½): m = (¾, ¼), so
    # JS = ½[log(4/3)] + ½[½ log(2/3) + ½ log 2]
    logits_p = torch.tensor([[1000.0, -1000.0]], requires_grad=True)
    one_sided = js_divergence(logits_p, torch.zeros(1, 2))
    want = 0.5 * math.log(4 / 3) + 0.25 * (math.log(2 / 3) + math.log(2.0))
    torch.testing.assert_close(one_sided, torch.tensor([want]))
    one_sided.sum().backward()
    assert torch.isfinite(logits_p.grad).all()


def test_mask_and_masked_token_mean():
    hidden_p, hidden_q, weight, bias = heads()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    full = chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=8)
    masked = chunked_js_divergence(hidden_p, hidden_q, weight, bias, mask=mask, vocab_chunk=8)
    torch.testing.assert_close(masked, torch.where(mask, full, torch.zeros_like(full)))
    means = masked_token_mean(masked, mask)  # (K,)
    torch.testing.assert_close(means, torch.stack([full[0, :3].mean(), full[1, 0], torch.tensor(0.0)]))
    torch.testing.assert_close(masked_token_mean(full), full.mean(-1))
    # a mask shared by all candidates broadcasts
    shared = masked_token_mean(full, torch.tensor([1, 1, 0, 0, 0]))
    torch.testing.assert_close(shared, full[:, :2].mean(-1))


def test_original_broadcasts_against_batched_candidates():
    # (B, 1, T, H) originals against (B, K, T, H) candidates equals each pair computed on its own
    a = heads(seed=1)
    b = heads(seed=2)
    weight, bias = a[2], a[3]
    hidden_p = torch.stack([a[0][0], b[0][0]])[:, None]  # (2, 1, T, H)
    hidden_q = torch.stack([a[1], b[1]])  # (2, K, T, H)
    got = chunked_js_divergence(hidden_p, hidden_q, weight, bias, vocab_chunk=10)
    assert got.shape == (2, 3, 5)
    for i in range(2):
        for k in range(3):
            alone = chunked_js_divergence(hidden_p[i, 0], hidden_q[i, k], weight, bias, vocab_chunk=10)
            torch.testing.assert_close(got[i, k], alone)
    torch.testing.assert_close(got.to(F64), naive_js(hidden_p, hidden_q, weight, bias), atol=ATOL, rtol=RTOL)


def largest_allocation(fn) -> int:
    """Bytes of the largest single CPU allocation any operator makes while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_peak_allocation_is_chunk_sized_not_vocabulary_sized():
    k, t, h, v, chunk = 4, 8, 8, 50_000, 4096
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(v, h, generator=g)
    hidden_p, hidden_q = torch.randn(1, t, h, generator=g), torch.randn(k, t, h, generator=g)
    full_bytes = k * t * v * 4  # one float32 (K, T, V) tensor: 6.4 MB
    chunk_bytes = k * t * chunk * 4  # one float32 (K, T, chunk) tensor: 0.5 MB
    # the measurement sees a vocabulary-sized tensor when one is made (the naive path)
    assert largest_allocation(lambda: js_divergence(hidden_p @ weight.T, hidden_q @ weight.T)) >= full_bytes
    peak = largest_allocation(lambda: chunked_js_divergence(hidden_p, hidden_q, weight, vocab_chunk=chunk))
    assert peak <= chunk_bytes
    # and the answer is still right at this size
    got = chunked_js_divergence(hidden_p, hidden_q, weight, vocab_chunk=chunk)
    torch.testing.assert_close(got.to(F64), naive_js(hidden_p, hidden_q, weight), atol=ATOL, rtol=RTOL)


def test_errors():
    hidden_p, hidden_q, weight, _ = heads()
    with pytest.raises(ValueError, match="vocab_chunk"):
        chunked_js_divergence(hidden_p, hidden_q, weight, vocab_chunk=0)
    with pytest.raises(ValueError, match="hidden sizes"):
        chunked_js_divergence(hidden_p, hidden_q, weight[:, :3])
    with pytest.raises(ValueError, match="softcap"):
        chunked_js_divergence(hidden_p, hidden_q, weight, softcap=0.0)
