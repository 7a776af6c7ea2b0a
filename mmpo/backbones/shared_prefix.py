"""Shared-prefix forward: the prompt and its images once per group, all K responses on top.

A naive preference step runs every group's prompt (image tokens included) and its images once per
response, K times per model (twice for a pair). Here the prompt runs once and the K responses run on
its key/value cache. Gradients reach the prompt and the vision tower through the cache, so the
losses and gradients equal the naive path's. Images read through cross-attention layers (Llama 3.2
Vision) leave their keys and values in the same cache; a soft-capped head (PaliGemma 2) is capped as
the model's forward caps it; a bidirectional prompt (PaliGemma's prefix) is bidirectional in the prompt
pass, and its responses attend causally after it, as on the naive path.

Two layouts for the responses: *packed* puts a group's K responses side by side in one row on the
group's (unrepeated) cache under a block mask; *repeated* repeats the cache K times and runs one
response per row, rows interleaved (group 0's responses 0..K-1, group 1's, ...) to match
``batch_repeat_interleave(K)``. Prompts are left-padded so every prompt ends in the last column. The
result is returned in the batch's row layout (response-major) so everything downstream is unchanged.

No step reads a tensor back from the accelerator: widths come from the token counts the collator
recorded on the host (``PreferenceBatch.host_lengths``), and response tokens are selected by integer
coordinates built on the device (a boolean-mask selection would wait for the device to count the
mask). ``tests/test_device_syncs.py`` keeps it so.

Under activation checkpointing a checkpointed layer runs again in the backward pass, on the arguments
it was given, cache included. The cache here never changes what a layer's second run sees: the prompt
pass records each layer's keys and values once (a rerun gets back the states it computed, as on an
empty cache), and the response pass reads the prompt's states and writes nothing. So the decoder
layers may keep it under checkpointing (transformers' ``_can_checkpoint_with_cache``, set only for
the two passes), and the response pass's gradient reaches the prompt pass through the recorded
states, which with ``use_reentrant=False`` carry the prompt layers' graph like any other output.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer

from datamodules.vision_text.collator import TOKEN_ALIGNED_MEDIA
from mmpo.backbones.module_scan import modules_found_once
from mmpo.logprobs import head_logprobs, soft_capped, span_coordinates

__all__ = ["checkpointing_fallback_reason", "logit_head", "shared_prefix_supported", "shared_prefix_token_logps"]


def shared_prefix_supported(base: nn.Module) -> bool:
    """Whether ``base`` can take the shared-prefix path.

    Needs an inner model returning hidden states and taking a key/value cache, and an LM head that is a
    projection, soft-capped or not (:func:`logit_head`); a scaled head (``logit_scale``) is refused.
    Multimodal rotary positions (Qwen2-VL's ``get_rope_index``) are computed here for the prompts and
    continued over the responses (:func:`_rope_positions`).
    """
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(base, "get_output_embeddings"):
        return False
    return not getattr(getattr(base.config, "text_config", base.config), "logit_scale", None)


def logit_head(base: nn.Module) -> Callable[[Tensor], Tensor]:
    """``base``'s LM head as its forward applies it: the output projection, then the final logit soft-cap
    (``final_logit_softcapping``: Gemma 2, PaliGemma 2) where the config sets one.
    """
    cap = getattr(getattr(base.config, "text_config", base.config), "final_logit_softcapping", None)
    return soft_capped(base.get_output_embeddings(), cap)


# First position of a row where the model numbers positions itself: PaliGemma counts from 1
# (``PaliGemmaModel.forward``), the others from 0. Rotary attention depends only on differences, so
# this keeps the two paths' numbers identical rather than equal up to rounding.
_FIRST_POSITION = {"paligemma": 1}


@functools.cache
def _cache_keyword(model_type: type) -> str:
    """The forward's name for a key/value cache: ``cache`` from transformers 5.24, else ``past_key_values``.

    Passing the old name to a newer model works but warns on every call.
    """
    params = inspect.signature(model_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layers_of(inner: nn.Module) -> list[nn.Module]:
    return modules_found_once(inner, "_mmpo_checkpointable_layers", lambda m: isinstance(m, GradientCheckpointingLayer))


def checkpointing_fallback_reason(base: nn.Module) -> str | None:
    """Why the activation checkpointing on in ``base`` keeps the shared prefix off, or None if it does not.

    The prompt pass's keys and values must carry its graph out of each checkpointed layer: true of
    ``torch.utils.checkpoint`` with ``use_reentrant=False`` (mmpo's setting), not of the reentrant
    variant, which runs the layer without gradients. And the layer class must let a cache through
    (``_can_checkpoint_with_cache``); a transformers that lacks the switch drops it.
    """
    for layer in _layers_of(getattr(base, "model", base)):
        if not layer.gradient_checkpointing:
            continue
        if not hasattr(type(layer), "_can_checkpoint_with_cache"):
            return f"this transformers' {type(layer).__name__} drops the key/value cache under checkpointing"
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if not (isinstance(func, functools.partial) and func.keywords.get("use_reentrant") is False):
            return "reentrant gradient checkpointing runs the prompt pass without gradients (use use_reentrant=False)"
    return None


class _PromptCache(DynamicCache):
    """A key/value cache that a checkpointed layer's rerun in the backward pass finds unchanged.

    As built, it records the prompt pass: a layer's first ``update`` stores its states as
    ``DynamicCache`` does (sliding-window layers keep their window); a later one for the same layer is
    the layer's rerun, whose past was empty, and gets back the states it passed. :meth:`reader` gives
    the response pass a view that returns the prompt's states (repeated along the batch for the
    repeated layout) followed by the new ones, and stores nothing. The view shares the layers, whose
    lengths size the masks; the recording never changes once the response pass starts.
    """

    def __init__(self, config: Any, cross_layers: frozenset[int] = frozenset()) -> None:
        super().__init__(config=config)
        self.written: set[int] = set()
        self.read: set[int] | None = None  # layers read, on a reader
        self.repeats = 1
        self.cross_layers = cross_layers  # cross-attention layers (Mllama): they hold the image states

    def reader(self, repeats: int = 1) -> _PromptCache:
        view = copy.copy(self)
        view.read, view.repeats = set(), repeats
        if self.cross_layers:
            view.layers = [
                _CrossStates(layer, i, repeats, view.read) if i in self.cross_layers else layer
                for i, layer in enumerate(self.layers)
            ]
        return view

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if self.read is not None:
            self.read.add(layer_idx)
            layer = self.layers[layer_idx]
            keys, values = layer.keys, layer.values  # (B, heads, Tp, d), the last window for a sliding layer
            if self.repeats > 1:
                keys, values = keys.repeat_interleave(self.repeats, 0), values.repeat_interleave(self.repeats, 0)
            return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)
        if layer_idx in self.written:  # a checkpointed layer's rerun
            return key_states, value_states
        self.written.add(layer_idx)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


class _CrossStates:
    """A cross-attention layer's recorded image keys and values as the response pass reads them.

    Mllama's cross-attention layers, given no image states, read the cache's ``layers[i].keys`` and
    ``.values`` directly instead of calling ``update``: this gives them the prompt pass's
    (B, heads, image tokens, d), repeated along the batch for the repeated layout, and notes the read.
    """

    is_initialized = True

    def __init__(self, layer: Any, index: int, repeats: int, read: set[int]) -> None:
        self._layer, self._index, self._repeats, self._read = layer, index, repeats, read
        self._states: dict[str, Tensor] = {}

    def _get(self, name: str) -> Tensor:
        self._read.add(self._index)
        if name not in self._states:
            states = getattr(self._layer, name)
            self._states[name] = states.repeat_interleave(self._repeats, 0) if self._repeats > 1 else states
        return self._states[name]

    @property
    def keys(self) -> Tensor:
        return self._get("keys")

    @property
    def values(self) -> Tensor:
        return self._get("values")


@contextlib.contextmanager
def _cache_kept_under_checkpointing(inner: nn.Module) -> Iterator[None]:
    """Checkpointed layers keep the (replay-safe) cache inside the block instead of setting it to None."""
    layers = [m for m in _layers_of(inner) if "_can_checkpoint_with_cache" not in m.__dict__]
    for m in layers:
        m._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for m in layers:
            del m._can_checkpoint_with_cache


def _run(inner: nn.Module, cache: _PromptCache, **inputs: Any) -> Tensor:
    """``inner``'s last hidden state on ``inputs`` with ``cache``; the cache is ours, so ``use_cache=False``.

    Asking for ``use_cache=True`` under checkpointing only earns transformers' warning that it is
    switched off; the layers read and write the cache they are given either way.
    """
    with _cache_kept_under_checkpointing(inner):
        out = inner(**inputs, use_cache=False, **{_cache_keyword(type(inner)): cache})
    return out.last_hidden_state


def _prompt_pass(inner: nn.Module, cross_layers: frozenset[int], **inputs: Any) -> tuple[Tensor, _PromptCache]:
    cache = _PromptCache(inner.config, cross_layers)
    hidden = _run(inner, cache, **inputs)
    if not cache.written:
        raise RuntimeError("the decoder layers dropped the key/value cache; use the naive path (shared_prefix: false)")
    return hidden, cache


def _response_pass(inner: nn.Module, prompt: _PromptCache, repeats: int, **inputs: Any) -> Tensor:
    reader = prompt.reader(repeats)
    hidden = _run(inner, reader, **inputs)
    if reader.read != prompt.written:  # a layer that dropped the cache would attend to the response alone
        raise RuntimeError(f"layers {sorted(prompt.written - reader.read)} did not read the prompt's cache")
    return hidden


def _left_padded_prompts(
    batch: Any, pad_id: int, prompt_lengths: tuple[int, ...], per_token: dict[str, Tensor]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The B prompts left-padded to one width (Tp), their mask, and per-token inputs cut and padded alike."""
    b = batch.num_groups
    lengths = batch.prompt_lengths[:b]  # (B,)
    width = max(prompt_lengths[:b])
    cols = torch.arange(width, device=lengths.device)
    src = cols[None, :] - (width - lengths[:, None])  # (B, Tp): source column, negative = padding
    valid = src >= 0
    ids = batch.input_ids[:b].gather(1, src.clamp(min=0))
    ids = torch.where(valid, ids, torch.full_like(ids, pad_id))
    # per-token inputs (B, T, ...) in the first rows' layout (the media of a group's rows are stored once)
    cut = {}
    for key, v in per_token.items():
        index = src.clamp(min=0).view(*src.shape, *[1] * (v.dim() - 2)).expand(-1, -1, *v.shape[2:])
        picked = v[:b].gather(1, index)
        cut[key] = torch.where(valid.view(*valid.shape, *[1] * (v.dim() - 2)), picked, torch.zeros_like(picked))
    return ids, valid.long(), cut


def _rope_positions(
    inner: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, inputs: dict[str, Tensor], lengths: Tensor
) -> tuple[Tensor, Tensor]:
    """Multimodal rotary positions of the prompts (3, B, Tp), and each group's first response position (B,).

    The model's own ``get_rope_index`` numbers the (left-padded) prompts' image and text tokens; text
    after them continues from the largest position + 1, one per token, in all three axes, which is what
    the model computes for the whole row on the naive path. Passing the positions keeps the model from
    computing (and storing) its own on the cache-reading response pass.
    """
    accepted = inspect.signature(inner.get_rope_index).parameters
    kwargs = {key: v for key, v in inputs.items() if key in accepted}
    positions, deltas = inner.get_rope_index(prompt_ids, attention_mask=prompt_mask, **kwargs)  # (3, B, Tp), (B, 1)
    return positions, lengths + deltas.view(-1).to(lengths.dtype)


def _axes(positions: Tensor, rope: bool) -> Tensor:
    """(B, W) text positions as the model takes them: (3, B, W) with multimodal rotary positions."""
    return positions[None].expand(3, -1, -1) if rope else positions


def _response_ids(batch: Any, rows: Tensor, width: int, counts: Tensor, pad_id: int) -> Tensor:
    """(len(rows), width): the response tokens of batch rows ``rows``, left-aligned, padded with ``pad_id``."""
    cols = torch.arange(width, device=counts.device)
    src = (batch.prompt_lengths[rows, None] + cols[None]).clamp(max=batch.input_ids.shape[1] - 1)
    ids = batch.input_ids[rows].gather(1, src)
    return torch.where(cols[None] < counts[:, None], ids, torch.full_like(ids, pad_id))


def _sliding_window(text_cfg: Any) -> bool:
    """Whether some layer attends within a sliding window (the packed block mask knows no window)."""
    types = getattr(text_cfg, "layer_types", None)
    if types is not None:
        return any(t != "full_attention" for t in types)
    return getattr(text_cfg, "sliding_window", None) is not None and getattr(text_cfg, "use_sliding_window", True)


def _attention_kind(inner: nn.Module) -> str | None:
    """The attention implementation of ``inner``'s language model if the packed layout may use it.

    ``sdpa`` and ``eager`` take a custom 4-D mask; models with sliding-window layers are left to
    the repeated layout, whose masks transformers builds per layer type.
    """
    config = getattr(inner, "config", None)
    text_cfg = getattr(config, "text_config", config)
    if _sliding_window(text_cfg):
        return None
    impl = getattr(text_cfg, "_attn_implementation", None) or getattr(config, "_attn_implementation", None)
    return impl if impl in ("sdpa", "eager") else None


# Packing pays when the prompt is long against the responses: it saves copying the prompt's keys and
# values (in proportion to the prompt's length) and costs attention between the two responses' blocks
# (the response length squared). Measured on a 2-core CPU, 128-token responses, a policy forward and
# backward plus a reference forward, median of 10-20 interleaved runs: prompts 13.7x the response
# 9% faster, 4.7x 7% faster, 1.7x even, 0.7x 8% slower (docs/performance.md).
PACK_MIN_PROMPT_RATIO = 2


def _packing_pays(response_lengths: tuple[int, ...], prompt_width: int) -> bool:
    return prompt_width >= PACK_MIN_PROMPT_RATIO * max(response_lengths)


def _packed_responses(
    inner: nn.Module, head: nn.Module, batch: Any, prompt_mask: Tensor, last: Tensor, cache: _PromptCache, pad_id: int,
    chunk_size: int, kind: str, response_lengths: tuple[int, ...], starts_at: Tensor, rope: bool, cross: Tensor | None,
) -> Tensor:  # fmt: skip
    """A group's K responses in one row on the group's (unrepeated) cache, under a block mask.

    Row b holds response 0 of group b (columns ``[0, W0)``), then response 1 (``[W0, W0 + W1)``), and
    so on; a response token sees the prompt and the earlier tokens of its own response only, at the
    positions it would have after the prompt alone. Repeating the cache for the K responses would copy
    every layer's prompt keys and values, and appending the responses to the repeated cache would copy
    them again.
    """
    b, k = batch.num_groups, batch.group_size
    mask = batch.response_mask.bool()
    dev = mask.device
    counts = [mask[j * b : (j + 1) * b].sum(-1) for j in range(k)]  # K x (B,)
    widths = [max(response_lengths[j * b : (j + 1) * b]) for j in range(k)]
    starts = [sum(widths[:j]) for j in range(k)]
    groups = torch.arange(b, device=dev)
    ids = torch.cat([_response_ids(batch, groups + j * b, widths[j], counts[j], pad_id) for j in range(k)], dim=1)
    cols = [torch.arange(w, device=dev) for w in widths]
    valid = torch.cat([cols[j][None] < counts[j][:, None] for j in range(k)], dim=1)  # (B, W)
    positions = _axes(starts_at[:, None] + torch.cat(cols)[None], rope)  # (B, W), or (3, B, W)

    # Key j is visible to query q when both are in the same response and j <= q, or j is a real
    # prompt token. A padding query sees the prompt, so no row of the mask is empty.
    total = sum(widths)
    block = torch.cat([torch.full((w,), j, device=dev) for j, w in enumerate(widths)])  # (W,) response of a column
    own = (block[:, None] == block[None, :]).tril()  # (W, W)
    visible = torch.cat([prompt_mask.bool()[:, None, :].expand(-1, total, -1), own[None] & valid[:, None, :]], dim=-1)[
        :, None
    ]  # (B, 1, W, Tp + W)
    if kind == "eager":  # an additive mask in the model's dtype
        dtype = last.dtype
        visible = torch.zeros(visible.shape, dtype=dtype, device=dev).masked_fill(~visible, torch.finfo(dtype).min)
    extra = {} if cross is None else {"cross_attention_mask": cross.expand(-1, total, *cross.shape[2:])}
    hidden = _response_pass(
        inner, cache, 1, input_ids=ids, attention_mask=visible, position_ids=positions, **extra
    )  # (B, W, H)

    # Token i of a response is predicted by the prompt's last state (i = 0) or its own state i-1.
    start = last[:, None]
    pieces = [x for j in range(k) for x in (start, hidden[:, starts[j] : starts[j] + widths[j] - 1])]
    predictors = torch.cat(pieces, dim=1)  # (B, W, H)
    spans = [span_coordinates(counts[j], sum(response_lengths[j * b : (j + 1) * b])) for j in range(k)]
    rows = torch.cat([r for r, _ in spans])  # packed slots, response 0's first
    slots = torch.cat([i + starts[j] for j, (_, i) in enumerate(spans)])
    flat = head_logprobs(predictors[rows, slots], head, ids[rows, slots], chunk_size)
    out_rows = torch.cat([r + j * b for j, (r, _) in enumerate(spans)])
    out = torch.zeros(mask.shape, dtype=torch.float32, device=dev)
    out[out_rows, batch.prompt_lengths[out_rows] + torch.cat([i for _, i in spans])] = flat
    return out


def shared_prefix_token_logps(
    base: nn.Module, batch: Any, pad_id: int, chunk_size: int = 1024, pack_responses: bool | None = None
) -> Tensor:
    """Response-token log-probs (N, T), in the batch's row layout, from one prompt pass per group.

    Args:
        base: the transformers model (LoRA layers may be injected; adapters may be disabled).
        batch: a ``PreferenceBatch`` whose K rows per group share prompt and media.
        pad_id: token id used for padding.
        chunk_size: positions projected through the LM head at once.
        pack_responses: run a group's K responses in one row on its cache under a block mask
            (``True``; needs the ``sdpa`` or ``eager`` attention), or on the cache repeated for them
            (``False``). None packs where the attention allows and the prompt is at least
            ``PACK_MIN_PROMPT_RATIO`` times the longest response.
    """
    inner, head = base.model, logit_head(base)
    b, k = batch.num_groups, batch.group_size
    mask = batch.response_mask.bool()  # (N, T), N = K·B
    prompt_lengths, response_lengths = batch.host_lengths()

    # 1. Prompts (and each group's images, stored once per group by the collator) once. Per-token inputs
    # (Qwen2-VL's mm_token_type_ids, Gemma 3's and PaliGemma's token_type_ids, Mllama's cross_attention_mask)
    # are cut to the prompts; the responses are text, which the token types leave out (PaliGemma's prompt
    # attends bidirectionally, its responses causally on the cache).
    per_token = {key: v for key, v in batch.media.items() if key in TOKEN_ALIGNED_MEDIA}
    prompt_ids, prompt_mask, prompt_inputs = _left_padded_prompts(batch, pad_id, prompt_lengths, per_token)
    media = {**{key: v for key, v in batch.media.items() if key not in per_token}, **prompt_inputs}
    # Mllama reads the images through cross-attention layers: the prompt pass records their image keys and
    # values in the cache, and every response token sees the images its prompt's last token sees (the
    # collator extends that row of the mask over the responses), (B, 1, images, tiles).
    cross = prompt_inputs["cross_attention_mask"][:, -1:] if "cross_attention_mask" in prompt_inputs else None
    text_cfg = getattr(base.config, "text_config", base.config)
    cross_layers = frozenset(getattr(text_cfg, "cross_attention_layers", None) or ())
    starts_at = batch.prompt_lengths[:b]  # (B,) position of each group's first response token
    rope = hasattr(inner, "get_rope_index")
    if rope:
        positions, starts_at = _rope_positions(inner, prompt_ids, prompt_mask, media, starts_at)
    else:
        first = _FIRST_POSITION.get(getattr(base.config, "model_type", None), 0)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0) + first
        starts_at = starts_at + first
    # prompts of one length need no mask: plain causal attention, and no check of the mask's values
    same_length = len(set(prompt_lengths[:b])) == 1
    prompt_hidden, cache = _prompt_pass(
        inner, cross_layers, input_ids=prompt_ids, attention_mask=None if same_length else prompt_mask,
        position_ids=positions, **media,
    )  # fmt: skip
    last = prompt_hidden[:, -1]  # (B, H): predicts each response's first token

    kind = _attention_kind(inner)
    if pack_responses is None:
        pack_responses = kind is not None and _packing_pays(response_lengths, prompt_ids.shape[1])
    if pack_responses:
        if kind is None:
            raise ValueError(
                "packed responses need the sdpa or eager attention implementation and no sliding-window layers"
            )
        return _packed_responses(
            inner, head, batch, prompt_mask, last, cache, pad_id, chunk_size, kind, response_lengths, starts_at, rope,
            cross,
        )  # fmt: skip

    # 2. Responses on the cache repeated for each (layer by layer, inside the layer), interleaved rows:
    # (group 0's responses 0..K-1, group 1's, ...).
    order = torch.arange(k * b, device=mask.device).view(k, b).t().reshape(-1)  # (N,): 0, B, .., (K-1)B, 1, ...
    counts = mask.sum(-1)[order]  # (N,)
    width = max(response_lengths)
    resp_valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]  # (N, Tr)
    resp_ids = _response_ids(batch, order, width, counts, pad_id)
    full_mask = torch.cat([prompt_mask.repeat_interleave(k, dim=0), resp_valid.long()], dim=1)
    resp_pos = _axes(starts_at.repeat_interleave(k)[:, None] + torch.arange(width, device=mask.device), rope)
    extra = {} if cross is None else {"cross_attention_mask": cross.repeat_interleave(k, 0).expand(-1, width, -1, -1)}
    hidden = _response_pass(
        inner, cache, k, input_ids=resp_ids, attention_mask=full_mask, position_ids=resp_pos, **extra
    )  # (N, Tr, H)

    # 3. Token i of a response is predicted by the prompt's last state (i = 0) or response state i-1.
    predictors = torch.cat([last.repeat_interleave(k, dim=0)[:, None], hidden[:, :-1]], dim=1)  # (N, Tr, H)
    rows, cols = span_coordinates(counts, sum(response_lengths))
    flat = head_logprobs(predictors[rows, cols], head, resp_ids[rows, cols], chunk_size)

    # 4. Back to the row layout: interleaved row r is batch row order[r], its response after the prompt.
    src = order[rows]
    result = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    result[src, batch.prompt_lengths[src] + cols] = flat
    return result
