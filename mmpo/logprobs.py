"""Response-token log-probabilities without a float32 (2B, T, V) tensor.

The language-model head is applied only to the positions that predict response tokens, a chunk of
positions at a time, and the log-softmax is computed in float32 per chunk. Peak extra memory is
``chunk_size * V`` floats instead of ``2B * T * V``.

Where the caller knows the rows' prompt and response lengths on the host (``host_lengths``), response
positions are selected by integer coordinates built on the device; a boolean-mask selection
instead waits for the accelerator to count the mask, in the forward and again in the backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "gather_logprobs",
    "head_logprobs",
    "response_logprobs",
    "response_logprobs_from_hidden",
    "sequence_stats",
    "soft_capped",
    "span_coordinates",
]


def gather_logprobs(logits: Tensor, targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log_softmax(logits)[i, targets[i]]`` for a flat batch of rows, in float32 chunks.

    Args:
        logits: (M, V) logits in any dtype.
        targets: (M,) token ids.
        chunk_size: rows per chunk.

    Returns:
        (M,) float32 log-probabilities.
    """
    out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    for s in range(0, logits.shape[0], chunk_size):
        chunk = logits[s : s + chunk_size].float()  # (m, V)
        # log_softmax then gather, not gather minus logsumexp: the same values, and on the CPU about
        # twice as fast forward and backward (one fused kernel each way; measured in docs/performance.md)
        out[s : s + chunk_size] = chunk.log_softmax(-1).gather(-1, targets[s : s + chunk_size, None]).squeeze(-1)
    return out


def head_logprobs(h: Tensor, lm_head: Callable[[Tensor], Tensor], targets: Tensor, chunk_size: int = 1024) -> Tensor:
    """``log_softmax(lm_head(h))[i, targets[i]]``, projecting ``chunk_size`` rows of ``h`` at a time.

    Args:
        h: (M, H) hidden states of the positions that predict ``targets``.
        lm_head: the output projection (hidden → vocabulary logits).
        targets: (M,) token ids.
        chunk_size: rows projected through the head at once.

    Returns:
        (M,) float32 log-probabilities.
    """
    flat = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    for s in range(0, h.shape[0], chunk_size):
        flat[s : s + chunk_size] = gather_logprobs(
            lm_head(h[s : s + chunk_size]), targets[s : s + chunk_size], chunk_size
        )
    return flat


def soft_capped(lm_head: Callable[[Tensor], Tensor], cap: float | None) -> Callable[[Tensor], Tensor]:
    """``lm_head`` followed by the logit soft-cap ``cap · tanh(logits / cap)``; ``lm_head`` itself if ``cap`` is None.

    Gemma 2 (and PaliGemma 2 over it) caps its final logits so (``final_logit_softcapping``, Gemma Team
    2024, "Gemma 2", section 2). The cap is applied in the head's dtype, before the float32
    log-softmax, as transformers' models apply it before their loss.
    """
    if cap is None:
        return lm_head
    if not cap > 0:
        raise ValueError(f"the logit soft-cap must be > 0 or None, got {cap}")

    def capped(h: Tensor) -> Tensor:
        return torch.tanh(lm_head(h) / cap) * cap

    return capped


def span_coordinates(counts: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Row and offset of every slot of a layout whose row r holds ``counts[r]`` slots from offset 0.

    Row-major order, as a boolean mask ``offsets < counts[:, None]`` would select them. ``total`` is
    ``counts.sum()``, known on the host, so nothing is read back from the device.
    """
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=total)
    starts = counts.cumsum(0) - counts
    return rows, torch.arange(total, device=counts.device) - starts[rows]


def _predicting_positions(input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    # The token at position t is predicted by the output at t-1: shift the mask left by one.
    pred_mask = torch.zeros_like(response_mask)
    pred_mask[:, :-1] = response_mask[:, 1:]
    targets = input_ids[:, 1:][response_mask[:, 1:]]  # (M,)
    return pred_mask, targets


def _response_coordinates(response_mask: Tensor, num_tokens: int) -> tuple[Tensor, Tensor]:
    """(row, column) of every response token, for rows whose response is one contiguous span."""
    counts = response_mask.sum(-1)
    starts = response_mask.int().argmax(-1)  # first response column (0 for an empty row, which adds nothing)
    rows, k = span_coordinates(counts, num_tokens)
    return rows, starts[rows] + k


def response_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_size: int = 1024) -> Tensor:
    """Per-token log-probs of the response tokens from full-sequence logits.

    Args:
        logits: (N, T, V) causal-LM logits (output t predicts token t+1).
        input_ids: (N, T) token ids.
        response_mask: (N, T) bool, True at response tokens.
        chunk_size: rows of the flattened (M, V) selection processed at once.

    Returns:
        (N, T) float32 token log-probs aligned with ``input_ids``, zero outside the response.
    """
    response_mask = response_mask.bool()
    pred_mask, targets = _predicting_positions(input_ids, response_mask)
    flat = gather_logprobs(logits[pred_mask], targets, chunk_size)  # (M,)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=logits.device)
    out[response_mask] = flat
    return out


def response_logprobs_from_hidden(
    hidden: Tensor,
    lm_head: Callable[[Tensor], Tensor],
    input_ids: Tensor,
    response_mask: Tensor,
    chunk_size: int = 1024,
    host_lengths: tuple[Sequence[int], Sequence[int]] | None = None,
) -> Tensor:
    """Per-token response log-probs from the last hidden states, never forming (N, T, V).

    Args:
        hidden: (N, T, H) final hidden states of the language model.
        lm_head: the output projection (hidden → vocabulary logits).
        input_ids: (N, T) token ids.
        response_mask: (N, T) bool, True at response tokens.
        chunk_size: positions projected through the head at once.
        host_lengths: each row's prompt and response token counts, if known on the host (the
            collator records them); the response must then be the span right after the prompt, and no
            value is read back from the device.

    Returns:
        (N, T) float32 token log-probs, zero outside the response.
    """
    response_mask = response_mask.bool()
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    if host_lengths is not None:
        prompts, responses = host_lengths
        if any(n > 0 and p < 1 for p, n in zip(prompts, responses, strict=True)):
            raise ValueError("a response starts at the first position: nothing predicts its first token")
        rows, cols = _response_coordinates(response_mask, sum(responses))
        out[rows, cols] = head_logprobs(hidden[rows, cols - 1], lm_head, input_ids[rows, cols], chunk_size)
        return out
    pred_mask, targets = _predicting_positions(input_ids, response_mask)
    flat = head_logprobs(hidden[pred_mask], lm_head, targets, chunk_size)  # only positions predicting a response token
    out[response_mask] = flat
    return out


def sequence_stats(token_logps: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Summed and mean response log-probs and token counts per row.

    Args:
        token_logps: (N, T) token log-probs, zero outside the response.
        response_mask: (N, T) response mask.

    Returns:
        ``(summed (N,), mean (N,), counts (N,))``; the mean of an empty response is 0.
    """
    mask = response_mask.to(token_logps.dtype)
    counts = mask.sum(-1)
    summed = (token_logps * mask).sum(-1)
    return summed, summed / counts.clamp(min=1), counts
