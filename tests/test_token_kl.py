"""The chunked per-token KL(π_ref ‖ πθ) over the full vocabulary equals a float64 dense computation, values and
gradients; the reference side gets no gradient; banned tokens stay finite; the layout helper."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mmpo.token_kl import chunked_token_kl, response_columns, token_kl

F64 = torch.float64


def _heads(h: int, v: int, seed: int, dtype=torch.float32, bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    g = torch.Generator().manual_seed(seed)
    ref, pol = nn.Linear(h, v, bias=bias, dtype=dtype), nn.Linear(h, v, bias=bias, dtype=dtype)
    with torch.no_grad():
        for p in (*ref.parameters(), *pol.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    ref.requires_grad_(False)
    return ref, pol


def _hidden(n: int, r: int, h: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, h, generator=g, dtype=dtype), torch.randn(n, r, h, generator=g, dtype=dtype)


def _dense_f64(ref_h, pol_h, ref_head, pol_head, mask=None):
    """The definition in float64 over the full vocabulary: Σ_v p_ref (log p_ref − log πθ)."""
    logp = torch.log_softmax(ref_head(ref_h.to(F64)).to(F64), -1)
    logq = torch.log_softmax(pol_head(pol_h.to(F64)).to(F64), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl if mask is None else kl * mask


def test_dense_kl_hand_value_two_words():
    # p = softmax([0, ln 3]) = (1/4, 3/4), q = softmax([0, 0]) = (1/2, 1/2)
    ref = torch.tensor([[0.0, math.log(3.0)]], dtype=F64)
    pol = torch.zeros(1, 2, dtype=F64)
    want = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert token_kl(ref, pol).item() == pytest.approx(want, rel=1e-14)
    assert token_kl(ref, ref).item() == 0.0  # identical distributions: exactly 0
    assert token_kl(ref, pol, mask=torch.tensor([False])).item() == 0.0


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_float64_dense_with_masks(chunk_size):
    n, r, h, v = 3, 7, 16, 50
    ref_head, pol_head = _heads(h, v, seed=1, dtype=F64)
    ref_h, pol_h = _hidden(n, r, h, seed=2, dtype=F64)
    mask = torch.arange(r)[None] < torch.tensor([7, 4, 0])[:, None]  # (N, R): a full, a short, an empty response
    got = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, mask, chunk_size=chunk_size)
    want = _dense_f64(ref_h, pol_h, ref_head, pol_head, mask)
    assert got.dtype == F64 and got.shape == (n, r)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got[2].eq(0).all() and got[1, 4:].eq(0).all() and got[0].gt(0).all()


def test_float32_chunks_match_float64_definition_at_float32_precision():
    n, r, h, v = 2, 5, 32, 300
    ref_head, pol_head = _heads(h, v, seed=3)
    ref_h, pol_h = _hidden(n, r, h, seed=4)
    got = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=4)
    assert got.dtype == torch.float32
    want = _dense_f64(ref_h, pol_h, copy.deepcopy(ref_head).double(), copy.deepcopy(pol_head).double())
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-4)
    torch.testing.assert_close(got, token_kl(ref_head(ref_h), pol_head(pol_h)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [2, 5, 100])
def test_gradient_equals_dense_gradient_and_reaches_the_policy_only(chunk_size):
    n, r, h, v = 2, 5, 8, 40
    ref_head, pol_head = _heads(h, v, seed=5, dtype=F64)
    ref_h, pol_h = _hidden(n, r, h, seed=6, dtype=F64)
    ref_h.requires_grad_(True)
    mask = torch.arange(r)[None] < torch.tensor([5, 3])[:, None]
    weights = torch.linspace(0.5, 2.0, n * r, dtype=F64).view(n, r)  # a non-uniform upstream gradient

    pol_a = pol_h.clone().requires_grad_(True)
    (chunked_token_kl(ref_h, pol_a, ref_head, pol_head, mask, chunk_size) * weights).sum().backward()
    grads_chunked = [pol_a.grad.clone(), pol_head.weight.grad.clone(), pol_head.bias.grad.clone()]
    assert ref_h.grad is None  # the reference is a constant: no gradient reaches it
    pol_head.zero_grad()

    pol_b = pol_h.clone().requires_grad_(True)
    (_dense_f64(ref_h.detach(), pol_b, ref_head, pol_head, mask) * weights).sum().backward()
    grads_dense = [pol_b.grad, pol_head.weight.grad, pol_head.bias.grad]
    for a, b in zip(grads_chunked, grads_dense, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert pol_a.grad[1, 3:].eq(0).all() and pol_a.grad[0].abs().sum() > 0  # masked positions: no gradient


def test_gradient_is_q_minus_p_through_the_head():
    # d KL / d policy logits = softmax(policy) − p_ref; with an identity head the hidden state is the logits
    v = 4
    eye = nn.Linear(v, v, bias=False, dtype=F64)
    with torch.no_grad():
        eye.weight.copy_(torch.eye(v, dtype=F64))
    ref = torch.tensor([[[1.0, 0.0, -1.0, 2.0]]], dtype=F64)
    pol = torch.tensor([[[0.0, 0.5, 0.0, 0.0]]], dtype=F64, requires_grad=True)
    chunked_token_kl(ref, pol, eye, eye, chunk_size=1).sum().backward()
    torch.testing.assert_close(pol.grad[0, 0], pol[0, 0].softmax(-1).detach() - ref[0, 0].softmax(-1))


def test_no_grad_skips_checkpointing_and_gives_the_same_values():
    ref_head, pol_head = _heads(8, 30, seed=7)
    ref_h, pol_h = _hidden(2, 3, 8, seed=8)
    with torch.no_grad():
        a = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=2)
    b = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=2)
    assert not a.requires_grad and b.requires_grad
    torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_banned_tokens_stay_finite_and_contribute_nothing():
    # a bias of −inf bans word 0 for the reference (probability exactly 0) and word 1 for the policy
    h, v = 4, 6
    ref_head, pol_head = _heads(h, v, seed=9, dtype=F64)
    with torch.no_grad():
        ref_head.bias[0] = float("-inf")
    ref_h, pol_h = _hidden(1, 3, h, seed=10, dtype=F64)
    pol_h.requires_grad_(True)
    kl = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=2)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(pol_h.grad).all()
    # the same as the KL over words 1..V−1 (word 0 carries no reference mass)
    trimmed_ref = nn.Linear(h, v - 1, dtype=F64)
    trimmed_pol = nn.Linear(h, v, dtype=F64)
    with torch.no_grad():
        trimmed_ref.weight.copy_(ref_head.weight[1:])
        trimmed_ref.bias.copy_(ref_head.bias[1:])
        trimmed_pol.load_state_dict(pol_head.state_dict())
    logp = torch.log_softmax(trimmed_ref(ref_h), -1)
    logq = torch.log_softmax(trimmed_pol(pol_h.detach()), -1)[..., 1:]
    torch.testing.assert_close(kl.detach(), (logp.exp() * (logp - logq)).sum(-1), rtol=1e-12, atol=1e-12)


def test_chunk_size_and_shapes_are_checked():
    ref_head, pol_head = _heads(4, 5, seed=11)
    ref_h, pol_h = _hidden(1, 2, 4, seed=12)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=0)
    with pytest.raises(ValueError, match="same"):
        chunked_token_kl(ref_h, pol_h[:, :1], ref_head, pol_head)


def test_empty_responses_give_an_empty_result():
    ref_head, pol_head = _heads(4, 5, seed=13)
    empty = torch.zeros(2, 0, 4)
    out = chunked_token_kl(empty, empty, ref_head, pol_head)
    assert out.shape == (2, 0)


def test_response_columns_move_each_response_to_the_front():
    values = torch.tensor([[0.0, 0.0, -1.0, -2.0, 0.0], [0.0, -3.0, -4.0, -5.0, 0.0]])
    cols, mask = response_columns(values, prompts=[2, 1], counts=[2, 3])
    assert cols.tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert mask.tolist() == [[True, True, False], [True, True, True]]
    cols, mask = response_columns(values, prompts=[2, 1], counts=[0, 0])
    assert cols.shape == (2, 0) and mask.shape == (2, 0)


class _Counting:
    """A head that counts its calls (to see whether the backward recomputed the chunks)."""

    def __init__(self, head: nn.Module) -> None:
        self.head, self.calls = head, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(x)


@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_frozen_linear_policy_head_takes_the_fused_path_with_the_dense_gradient(chunk_size):
    n, r, h, v = 2, 5, 8, 40
    ref_head, pol_head = _heads(h, v, seed=14, dtype=F64)
    pol_head.requires_grad_(False)  # the LoRA case: the LM head is frozen
    ref_h, pol_h = _hidden(n, r, h, seed=15, dtype=F64)
    mask = torch.arange(r)[None] < torch.tensor([5, 2])[:, None]
    weights = torch.linspace(-1.0, 2.0, n * r, dtype=F64).view(n, r)
    counting = _Counting(ref_head)
    pol_a = pol_h.clone().requires_grad_(True)
    kl = chunked_token_kl(ref_h, pol_a, counting, pol_head, mask, chunk_size)
    (kl * weights).sum().backward()
    chunks = math.ceil(n * r / chunk_size)
    assert counting.calls == chunks  # the backward recomputed nothing
    pol_b = pol_h.clone().requires_grad_(True)
    want = _dense_f64(ref_h, pol_b, ref_head, pol_head, mask)
    (want * weights).sum().backward()
    torch.testing.assert_close(kl, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pol_a.grad, pol_b.grad, rtol=1e-10, atol=1e-12)

    # a trainable head takes the checkpointed path: each chunk's reference projection runs again in the backward
    pol_head.requires_grad_(True)
    counting.calls = 0
    (
        chunked_token_kl(ref_h, pol_h.clone().requires_grad_(True), counting, pol_head, mask, chunk_size) * weights
    ).sum().backward()
    assert counting.calls == 2 * chunks


def test_fused_path_in_bfloat16_matches_the_float64_definition():
    n, r, h, v = 2, 6, 16, 64
    ref_head, pol_head = _heads(h, v, seed=16, dtype=torch.bfloat16)
    pol_head.requires_grad_(False)
    ref_h, pol_h = _hidden(n, r, h, seed=17, dtype=torch.bfloat16)
    pol_h.requires_grad_(True)
    kl = chunked_token_kl(ref_h, pol_h, ref_head, pol_head, chunk_size=5)
    assert kl.dtype == torch.float32  # bfloat16 logits, upcast per chunk
    kl.sum().backward()
    assert pol_h.grad.dtype == torch.bfloat16 and torch.isfinite(pol_h.grad.float()).all()
    want = _dense_f64(ref_h, pol_h.detach(), copy.deepcopy(ref_head).double(), copy.deepcopy(pol_head).double())
    torch.testing.assert_close(kl.double(), want, rtol=2e-2, atol=2e-2)  # the bfloat16 projection's rounding
