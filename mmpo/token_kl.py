"""Per-token KL(π_ref(·|x,y<t) ‖ πθ(·|x,y<t)) over the full vocabulary, without a (N, R, V) float32 tensor.

TDPO and SparsePO regularise each response token with the forward KL divergence between the reference's
and the policy's next-token distributions, summed over the whole vocabulary. Over a real vocabulary
(V ≈ 32k–152k) the (N, R, V) logits of both models in float32 are gigabytes, so
:func:`chunked_token_kl` starts from the final hidden states at the response positions and projects
``chunk_size`` positions at a time through each model's head, with the log-softmax in float32, so the
peak extra memory is a few (``chunk_size``, V) float32 blocks, forward and backward. The gradient reaches
the policy's hidden states and head only; the reference side is a constant. With a frozen linear policy
head (LoRA) each chunk's gradient is computed in the forward, from softmax(policy) − p_ref; with any other
head each chunk runs under activation checkpointing and is recomputed in the backward.
benchmarks/bench_token_kl.py measures both against the dense path.

:func:`token_kl_statistics` is the training module's pass for a loss with ``requires_token_kl``: the
reference's and the policy's response hidden states (the backbone's ``response_hidden``), their token
log-probs, the KL and the reference's mean activation per token, as :class:`~mmpo.losses.ResponseStats`
in a response-position layout (column j is response token j).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from mmpo.divergence import LOGIT_FLOOR, compute_dtype
from mmpo.losses.base import ResponseStats

if TYPE_CHECKING:
    from mmpo.module import PreferenceModule

__all__ = ["DEFAULT_KL_CHUNK", "chunked_token_kl", "response_columns", "token_kl", "token_kl_statistics"]

# Positions per chunk: 128 × 152k vocabulary × 4 bytes ≈ 78 MB per float32 block, a handful held at once.
DEFAULT_KL_CHUNK = 128

Head = Callable[[Tensor], Tensor]


def _kl_terms(reference_logits: Tensor, policy_logits: Tensor) -> Tensor:
    """Σ_v p_ref(v)·(log p_ref(v) − log πθ(v)) over the last axis, from logits already in the compute dtype.

    Logits floored at ``LOGIT_FLOOR`` keep every log-prob finite: a token the reference bans (probability
    exactly 0) contributes 0·(finite) = 0 and no NaN reaches the values or the gradients.
    """
    logp = torch.log_softmax(reference_logits.clamp(min=LOGIT_FLOOR), dim=-1)
    logq = torch.log_softmax(policy_logits.clamp(min=LOGIT_FLOOR), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _masked(values: Tensor, mask: Tensor | None) -> Tensor:
    return values if mask is None else values * mask.to(values.dtype)


def token_kl(reference_logits: Tensor, policy_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-position KL(softmax(reference_logits) ‖ softmax(policy_logits)), the full vocabulary at once.

    The dense path: for small vocabularies, as the reference :func:`chunked_token_kl` is tested against,
    and as the baseline of ``benchmarks/bench_token_kl.py``.

    Args:
        reference_logits: (..., R, V) the reference's next-token logits at the response positions.
        policy_logits: (..., R, V) the policy's, the same shape.
        mask: (..., R) bool or 0/1; positions where it is false give 0.

    Returns:
        (..., R) KL in nats, float32 (float64 for float64 inputs). Exactly ≥ 0; rounding can leave a value a
        few ulps below 0 where the two distributions agree.
    """
    dtype = compute_dtype(reference_logits, policy_logits)
    return _masked(_kl_terms(reference_logits.to(dtype), policy_logits.to(dtype)), mask)


def _chunk_kl(reference_hidden: Tensor, policy_hidden: Tensor, reference_head: Head, policy_head: Head) -> Tensor:
    """(c,) KL of c positions: both projections, upcast to the compute dtype, and the vocabulary sum."""
    dtype = compute_dtype(reference_hidden, policy_hidden)
    with torch.no_grad():  # the reference is a constant: no graph through its projection
        reference_logits = reference_head(reference_hidden).to(dtype)  # (c, V)
    return _kl_terms(reference_logits, policy_head(policy_hidden).to(dtype))


def _frozen_linear(head: Head) -> bool:
    """A plain ``nn.Linear`` (not a subclass: quantized or adapted layers are not) with no trainable parameter."""
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


class _FrozenHeadKL(torch.autograd.Function):
    """The chunked KL of a frozen linear policy head, its gradient computed chunk by chunk in the forward.

    The KL of one position depends on the policy's hidden state h only through z = W h + b, and
    ∂KL/∂z = softmax(z) − p_ref. So the forward stores ∂KL/∂h = Wᵀ(softmax(z) − p_ref), an (M, H) tensor
    the size of the hidden states, and the backward scales it by the incoming (M,) gradient: three
    projections per chunk (reference, policy, gradient), as many as the dense path, where activation
    checkpointing needs five. Only valid when W and b take no gradient (LoRA keeps the LM head frozen).
    """

    @staticmethod
    def forward(ctx, pol_flat, ref_flat, reference_head, weight, bias, chunk_size):  # type: ignore[override]
        dtype = compute_dtype(ref_flat, pol_flat)
        kl = pol_flat.new_empty(pol_flat.shape[0], dtype=dtype)  # (M,)
        grad = torch.empty_like(pol_flat) if ctx.needs_input_grad[0] else None  # (M, H)
        for s in range(0, pol_flat.shape[0], chunk_size):
            logp = torch.log_softmax(reference_head(ref_flat[s : s + chunk_size]).to(dtype).clamp(min=LOGIT_FLOOR), -1)
            logits = F.linear(pol_flat[s : s + chunk_size], weight, bias).to(dtype)  # (c, V)
            logq = torch.log_softmax(logits.clamp(min=LOGIT_FLOOR), -1)
            p = logp.exp()
            kl[s : s + chunk_size] = (p * (logp - logq)).sum(-1)
            if grad is not None:
                dz = (logq.exp() - p).masked_fill_(logits < LOGIT_FLOOR, 0.0)  # the floor passes no gradient
                grad[s : s + chunk_size] = dz.to(weight.dtype) @ weight  # (c, H), in the head's dtype as autograd
        ctx.save_for_backward(grad)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        grad_h = None if grad is None else (grad_kl[:, None] * grad).to(grad.dtype)
        return grad_h, None, None, None, None, None


def chunked_token_kl(
    reference_hidden: Tensor,
    policy_hidden: Tensor,
    reference_head: Head,
    policy_head: Head,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_KL_CHUNK,
) -> Tensor:
    """Per-position KL(π_ref ‖ πθ) over the full vocabulary from hidden states, ``chunk_size`` positions at a time.

    Each chunk projects its positions through both heads, upcasts the (c, V) logits to float32 (float64
    for float64 hidden states) and sums p_ref·(log p_ref − log πθ) over the vocabulary. No (…, R, V)
    tensor is built. The gradient flows into ``policy_hidden`` and the policy head's parameters; the
    reference side runs under ``no_grad``. With autograd on:

    - a frozen ``nn.Linear`` policy head (LoRA's case) takes a fused path: each chunk's gradient with
      respect to its hidden states, Wᵀ(softmax(z) − p_ref), is computed in the forward and kept, (M, H),
      and the backward only scales it;
    - any other head (trainable, adapted, any callable) runs every chunk under non-reentrant activation
      checkpointing: the graph keeps the chunk's inputs and its (c,) result, not its (c, V)
      intermediates, and the backward recomputes them one chunk at a time.

    Args:
        reference_hidden: (..., R, H) the reference's final hidden states at the positions that predict
            the response tokens (no gradient needed).
        policy_hidden: (..., R, H) the policy's at the same positions, the same shape.
        reference_head: the reference's output projection (hidden → vocabulary logits), e.g. an
            ``nn.Linear`` or ``lambda h: F.linear(h, weight, bias)`` over frozen tensors.
        policy_head: the policy's output projection (its LM head module; trainable or not).
        mask: (..., R) bool or 0/1; positions where it is false give 0 (they are computed all the same:
            selecting the true ones would read the mask back from the device).
        chunk_size: positions projected at once (memory: a few (chunk_size, V) float32 blocks).

    Returns:
        (..., R) KL in nats, float32 (float64 for float64 hidden states), 0 where ``mask`` is false.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if reference_hidden.shape != policy_hidden.shape:
        raise ValueError(
            f"reference hidden states {tuple(reference_hidden.shape)} and policy ones {tuple(policy_hidden.shape)} "
            "must have the same (..., R, H) shape"
        )
    lead, width = policy_hidden.shape[:-1], policy_hidden.shape[-1]
    ref_flat = reference_hidden.detach().reshape(-1, width)  # (M, H), M = N·R
    pol_flat = policy_hidden.reshape(-1, width)
    dtype = compute_dtype(reference_hidden, policy_hidden)
    if torch.is_grad_enabled() and pol_flat.requires_grad and _frozen_linear(policy_head):
        flat = _FrozenHeadKL.apply(pol_flat, ref_flat, reference_head, policy_head.weight, policy_head.bias, chunk_size)
        return _masked(flat.view(lead), mask)
    parts = []
    for s in range(0, pol_flat.shape[0], chunk_size):
        args = (ref_flat[s : s + chunk_size], pol_flat[s : s + chunk_size], reference_head, policy_head)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_kl, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_chunk_kl(*args))
    flat = torch.cat(parts) if parts else policy_hidden.new_zeros(0, dtype=dtype)
    return _masked(flat.view(lead), mask)


def response_columns(values: Tensor, prompts: Sequence[int], counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-token values of each row's response, moved to columns 0..R−1.

    Args:
        values: (N, T) values aligned with the input ids (token log-probs), the response of row i being
            ``counts[i]`` tokens from column ``prompts[i]``.
        prompts: each row's prompt length (host ints).
        counts: each row's response length (host ints).

    Returns:
        ``(columns (N, R), mask (N, R))`` with R the longest response; 0 and False past a row's end.
    """
    n, t = values.shape
    r = max(counts) if counts else 0
    offsets = torch.arange(r, device=values.device)  # (R,)
    cols = (torch.tensor(list(prompts), device=values.device)[:, None] + offsets).clamp(max=max(t - 1, 0))  # (N, R)
    mask = offsets[None] < torch.tensor(list(counts), device=values.device)[:, None]  # (N, R)
    picked = values.gather(1, cols) if r else values.new_zeros(n, 0)
    return picked * mask.to(picked.dtype), mask


def _reference_head(head: Any) -> Head:
    """The head's current weight and bias as a frozen projection.

    Read where the reference pass runs (inside the strategy's context): a peft-wrapped head answers
    ``weight`` with the original module's while the adapter is disabled.
    """
    weight = head.weight.detach()
    bias = getattr(head, "bias", None)
    bias = None if bias is None else bias.detach()
    return lambda h: F.linear(h, weight, bias)


def _group_layout(rows: Tensor, group_size: int) -> Tensor:
    """(K·B, R) rows → (B, K, R), response k of group b from row k·B + b (the batch's row layout)."""
    return rows.view(group_size, -1, rows.shape[-1]).transpose(0, 1)


def token_kl_statistics(
    module: PreferenceModule, batch: Any, chunk_size: int | None = None
) -> tuple[ResponseStats, ResponseStats]:
    """Policy and reference statistics of a batch with the per-token KL, for a loss with ``requires_token_kl``.

    The reference runs under ``no_grad`` through its strategy's model (the adapter-disabled policy, the
    frozen copy or the separate checkpoint: ``ReferenceStrategy.reference_model``); the policy runs with
    its gradient. Both take the backbone's naive path (``response_hidden``: each row its own prompt and
    media), whose token log-probs are the statistics, so the KL and the log-ratios come from the same
    passes.

    Args:
        module: the training module (its backbone, policy, reference strategy and loss).
        batch: a :class:`~datamodules.core.batch.PreferenceBatch`.
        chunk_size: positions per chunk of the KL; None takes the loss's ``kl_chunk_size`` (else
            ``DEFAULT_KL_CHUNK``).

    Returns:
        ``(policy, reference)``: ``ResponseStats`` whose per-token fields are in response-position layout
        (B, K, R): ``token_logps`` and ``mask`` on both; ``token_kl`` (KL(π_ref ‖ πθ) per token, with the
        policy's gradient) on the policy's; ``token_activation`` (the mean over the hidden axis of the
        reference's final hidden state at the position that predicts each token, no gradient) on the
        reference's, and there too ``token_masks`` (B, K, R, 2) when the module holds a
        ``token_mask_network`` (SparsePO's learned masks, from the reference's per-layer hidden states).
    """
    backbone, k = module.backbone, batch.group_size
    if chunk_size is None:
        chunk_size = getattr(module.loss, "kl_chunk_size", DEFAULT_KL_CHUNK)
    network = getattr(module, "token_mask_network", None)  # SparsePO's learned masks
    model, context = module.reference.reference_model(module)
    with torch.no_grad(), context:
        ref_out = backbone.response_hidden(model, batch, layers=True) if network is not None else None
        ref_hidden, mask, head, ref_logps = ref_out[:4] if ref_out else backbone.response_hidden(model, batch)
        reference_head = _reference_head(head)  # (N, R, H), (N, R), (N, T) above
    pol_hidden, _, policy_head, pol_logps = backbone.response_hidden(module.policy, batch)
    kl = chunked_token_kl(ref_hidden, pol_hidden, reference_head, policy_head, mask, chunk_size)  # (N, R)
    prompts, counts = batch.host_lengths()
    pol_cols, cols_mask = response_columns(pol_logps, prompts, counts)  # (N, R) each
    ref_cols, _ = response_columns(ref_logps, prompts, counts)
    activation = ref_hidden.float().mean(-1) * mask  # (N, R)
    policy = ResponseStats.from_rows(pol_cols, cols_mask, k)
    reference = ResponseStats.from_rows(ref_cols, cols_mask, k)
    policy = dataclasses.replace(policy, token_kl=_group_layout(kl, k))
    reference = dataclasses.replace(reference, token_activation=_group_layout(activation, k))
    if network is not None:  # (N, L, R, H) → (N, R, 2) masks with the network's gradient, 0 past a row's end
        masks = network(ref_out[4]) * mask[..., None]
        reference = dataclasses.replace(reference, token_masks=masks.view(k, -1, *masks.shape[1:]).transpose(0, 1))
    return policy, reference
