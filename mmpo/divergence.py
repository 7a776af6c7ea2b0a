"""Jensen–Shannon divergence between two models' next-token distributions, without a (K, T, V) tensor.

PaMi-VDPO scores how distinct an augmented clip is *for a prompt* by how much it changes the
reference model's next-token distributions over the fixed response: the JS divergence between the
distributions given the original clip and given each augmented clip. Over a real vocabulary
(V ≈ 150k) a float32 (K, T, V) tensor of probabilities is gigabytes, so :func:`chunked_js_divergence`
starts from the final hidden states and the output projection and visits the vocabulary a chunk of
columns at a time, in two passes: the log-sum-exp of every row's logits, then the divergence. Peak
extra memory is a few (K, T, ``vocab_chunk``) float32 tensors.

Notation: p = softmax(logits given the original clip), q = the same given a candidate clip,
m = (p + q)/2 and JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), in nats, in [0, ln 2].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["chunked_js_divergence", "compute_dtype", "js_divergence", "masked_token_mean"]

LN2 = math.log(2.0)
# Logits below this count as −inf (a banned token): the floor keeps every log-prob finite, so a
# probability of 0 contributes 0·(finite) = 0 and no NaN reaches the values or the gradients.
LOGIT_FLOOR = -1e30


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is (the tests' reference precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _js_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """Elementwise ½[p(log p − log m) + q(log q − log m)] from finite normalised log-probs of any shape.

    A probability that underflows to 0 multiplies a finite difference, so it contributes exactly 0
    (the limit of x·log x).
    """
    logm = torch.logaddexp(logp, logq) - LN2  # log((p + q)/2)
    return 0.5 * (logp.exp() * (logp - logm) + logq.exp() * (logq - logm))


def _finish(js: Tensor, mask: Tensor | None) -> Tensor:
    # Rounding can leave the sum a few ulps outside [0, ln 2]; the exact value never is.
    js = js.clamp(0.0, LN2)
    return js if mask is None else js * mask.to(js.dtype)


def js_divergence(logits_p: Tensor, logits_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-position JS divergence between softmax(logits_p) and softmax(logits_q), full vocabulary at once.

    For small vocabularies and as the reference :func:`chunked_js_divergence` is tested against.

    Args:
        logits_p: (..., T, V) logits of the first distribution (the original clip).
        logits_q: (..., T, V) logits of the second, broadcastable against ``logits_p`` (e.g. (1, T, V)
            against (K, T, V)).
        mask: (..., T) bool or 0/1, broadcastable against the result; positions where it is false give 0.

    Returns:
        (..., T) JS divergence in nats, in [0, ln 2], float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(logits_p, logits_q)
    logp = torch.log_softmax(logits_p.to(dtype).clamp(min=LOGIT_FLOOR), dim=-1)
    logq = torch.log_softmax(logits_q.to(dtype).clamp(min=LOGIT_FLOOR), dim=-1)
    return _finish(_js_terms(logp, logq).sum(-1), mask)


def _chunk_logits(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, lo: int, hi: int, scale: float, softcap: float | None
) -> Tensor:
    """(..., T, hi − lo) logits of vocabulary columns [lo, hi), upcast to the compute dtype."""
    # The matmul runs in the inputs' dtype, as the model's own head does; only the chunk is upcast.
    logits = F.linear(hidden, weight[lo:hi], None if bias is None else bias[lo:hi])
    logits = logits.to(compute_dtype(hidden, weight))
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.clamp(min=LOGIT_FLOOR)


def chunked_js_divergence(
    hidden_p: Tensor,
    hidden_q: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    vocab_chunk: int = 4096,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Per-position JS divergence of two heads' next-token distributions, the vocabulary a chunk at a time.

    logits = softcap·tanh(logit_scale·(hidden @ weightᵀ + bias) / softcap) (the softcap only when
    given), computed for ``vocab_chunk`` columns at a time in two passes: (1) each row's log-sum-exp,
    (2) the sum over the vocabulary of ½[p(log p − log m) + q(log q − log m)]. Each chunk is upcast to
    float32 (kept float64 for float64 inputs). No (…, T, V) tensor is built, and ``hidden_p`` is not
    expanded to the candidates' shape: broadcasting happens chunk by chunk.

    The caller aligns the positions: ``hidden_p[..., t, :]`` and ``hidden_q[..., t, :]`` must be the
    final hidden states that predict the same response token t (with different clips the prompts
    differ in length, so gather the response positions of each first; ``mask`` then marks padding).
    Gradients flow if the inputs carry them; wrap the call in ``torch.no_grad()`` for scoring.
    Logits of −inf (a bias that bans tokens) are floored at ``LOGIT_FLOOR``: probability exactly 0,
    contributing 0, with finite gradients.

    Args:
        hidden_p: (..., T, H) final hidden states given the original clip, e.g. (1, T, H) or
            (B, 1, T, H).
        hidden_q: (..., T, H) the same given each candidate clip, broadcastable against ``hidden_p``,
            e.g. (K, T, H) or (B, K, T, H).
        weight: (V, H) the output projection (the LM head's weight).
        bias: (V,) its bias, or None.
        mask: (..., T) bool or 0/1, broadcastable against the result; positions where it is false give 0.
        vocab_chunk: vocabulary columns per chunk (any V works; the last chunk may be shorter).
        logit_scale: a factor applied to the logits before the softmax (e.g. 1/temperature, or a
            model's own logit scale).
        softcap: cap c of a model that soft-caps its logits as c·tanh(logits/c) (Gemma 2), or None.

    Returns:
        (..., T) JS divergence in nats, in [0, ln 2], float32 (float64 for float64 inputs).
    """
    if vocab_chunk < 1:
        raise ValueError(f"vocab_chunk must be >= 1, got {vocab_chunk}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
    if hidden_p.shape[-1] != weight.shape[-1] or hidden_q.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden sizes {hidden_p.shape[-1]} and {hidden_q.shape[-1]} must match weight (V, H) {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    spans = [(lo, min(lo + vocab_chunk, vocab)) for lo in range(0, vocab, vocab_chunk)]

    def chunk(hidden: Tensor, lo: int, hi: int) -> Tensor:
        return _chunk_logits(hidden, weight, bias, lo, hi, logit_scale, softcap)

    # Pass 1: per-row log-sum-exp over the vocabulary from per-chunk ones, (n_chunks, ..., T) → (..., T)
    lse_p = torch.stack([chunk(hidden_p, lo, hi).logsumexp(-1) for lo, hi in spans]).logsumexp(0)
    lse_q = torch.stack([chunk(hidden_q, lo, hi).logsumexp(-1) for lo, hi in spans]).logsumexp(0)

    # Pass 2: accumulate the divergence; p's chunk is (..., T, c) in its own shape and broadcasts here
    js = None
    for lo, hi in spans:
        logp = chunk(hidden_p, lo, hi) - lse_p.unsqueeze(-1)  # (..., T, c)
        logq = chunk(hidden_q, lo, hi) - lse_q.unsqueeze(-1)  # (..., T, c)
        part = _js_terms(logp, logq).sum(-1)  # (..., T) broadcast shape
        js = part if js is None else js + part
    return _finish(js, mask)


def masked_token_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of per-token values over the true positions of ``mask``: a per-candidate score.

    Args:
        values: (..., T) per-token values, e.g. the output of :func:`chunked_js_divergence`.
        mask: (..., T) bool or 0/1, broadcastable against ``values``; None averages every position.

    Returns:
        (...,) the masked mean; 0 for a row with no true position.
    """
    if mask is None:
        return values.mean(-1)
    m = torch.broadcast_to(mask, values.shape).to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1.0)
