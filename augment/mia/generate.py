"""MIA-DPO attention-aware selection, generation step: greedy answers with attention on augmented inputs.

Liu et al., "MIA-DPO: Multi-Image Augmented Direct Preference Optimization for Large
Vision-Language Models" (2024). The base model answers each augmented sample (sequence, grid
collage or pic-in-pic, :mod:`augment.mia.formats`) greedily, keeping one layer's attention. For
each answer this module returns the text, its perplexity and the target-attention ratio: the
attention of one middle decoder layer, averaged over heads and generated tokens
(:mod:`augment.mia.select`), summarised over the token groups of the sample's images, tiles or
regions (:mod:`augment.mia.tokens`). :func:`augment.mia.select.select_rejected` then decides
which answers become *rejected* responses.

Prompts are built as the collator builds them (chat template with the ``<image>`` placeholders as
image items, then the processor), batched with left padding so every prompt ends where generation
starts. Key ``k`` of a padded row is position ``k − pad`` of the sample's own prompt, so the
padding is sliced off before token groups index the attention.

The model must be loaded with ``attn_implementation="eager"``: SDPA and flash attention return no
attention weights.

Example:
    >>> model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager")
    >>> results = generate_with_attention(model, AutoProcessor.from_pretrained(path), samples)
    >>> kept = [r for r in results if select_rejected(r.ratio, r.perplexity, r.answer,
    ...         r.sample.answer, r.sample.format, r.sample.n_images)[0]]
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from augment.mia.formats import AugmentedSample
from augment.mia.prompts import IMAGE_PLACEHOLDER
from augment.mia.select import (
    attention_to_tokens,
    perplexity,
    resolve_layer,
    stack_attention_rows,
    target_attention_ratio,
)
from augment.mia.tokens import augmented_token_groups

__all__ = [
    "GenerationResult",
    "VisionGeometry",
    "generate_with_attention",
    "num_layers",
    "prompt_messages",
    "vision_geometry",
]


@dataclass
class GenerationResult:
    """The base model's greedy answer on one augmented sample, with what selection needs.

    Attributes:
        sample: the augmented sample the answer is for.
        answer: decoded answer, special tokens (and so the EOS) removed, whitespace stripped.
        ratio: target-attention ratio in [0, 1] (NaN when every group got zero attention).
        perplexity: ``exp(−mean log p)`` of the generated tokens, EOS included when produced.
        n_generated: tokens the model produced for this sample, up to and including its EOS.
        layer: 0-based decoder layer whose attention was read.
    """

    sample: AugmentedSample
    answer: str
    ratio: float
    perplexity: float
    n_generated: int
    layer: int


@dataclass(frozen=True)
class VisionGeometry:
    """How one image becomes tokens: ``patch_grid`` (rows, cols) of a square ``input_size`` input."""

    image_token_id: int
    patch_grid: tuple[int, int]
    input_size: int

    @property
    def tokens_per_image(self) -> int:
        return self.patch_grid[0] * self.patch_grid[1]


def prompt_messages(prompt: str, placeholder: str = IMAGE_PLACEHOLDER) -> list[dict[str, Any]]:
    """One user turn with each ``<image>`` of a plain-text prompt as an image item, in order.

    The same split as the datamodules' plain-text prompts (``datamodules.core.records``).
    """
    content: list[dict[str, Any]] = []
    for piece in re.split(f"({re.escape(placeholder)})", prompt):
        if piece == placeholder:
            content.append({"type": "image"})
        elif piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return [{"role": "user", "content": content}]


def _size_side(size: Any) -> int:
    """Side of a square size given as an int, a ``{"height", "width"}`` mapping or a SizeDict."""
    if isinstance(size, int):
        return size
    height, width = (size.get(k) if isinstance(size, dict) else getattr(size, k, None) for k in ("height", "width"))
    if height is None or height != width:
        raise ValueError(f"need a square processor crop size, got {size}")
    return int(height)


def vision_geometry(model: Any, processor: Any) -> VisionGeometry:
    """Image token id, patch grid and input side from the processor and the model config (LLaVA-style)."""
    config = model.config
    image_token_id = getattr(config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(config, "image_token_index", None)
    if image_token_id is None:
        image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    crop = getattr(processor.image_processor, "crop_size", None)
    input_size = _size_side(crop) if crop is not None else int(config.vision_config.image_size)
    patch = int(config.vision_config.patch_size)
    if input_size % patch:
        raise ValueError(f"input size {input_size} is not a multiple of the patch size {patch}")
    return VisionGeometry(int(image_token_id), (input_size // patch, input_size // patch), input_size)


def num_layers(model: Any) -> int:
    """Decoder layers of the language model (``text_config`` of a vision-language config, else the config)."""
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.num_hidden_layers)


def _eos_ids(model: Any, processor: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def _answer_mask(generated: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """(B, S) True on generated tokens up to and including the first EOS of each row."""
    is_eos = torch.isin(generated, torch.tensor(list(eos_ids), device=generated.device, dtype=generated.dtype))
    eos_before = is_eos.long().cumsum(dim=1) - is_eos.long()  # EOS strictly before each position
    return eos_before == 0


def _attention_module(model: Any, layer: int) -> Any:
    """The self-attention module of decoder layer ``layer`` of the language model."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model.language_model
    return decoder.layers[layer].self_attn


def _keep_last_row(rows: list[Tensor | None]) -> Any:
    def hook(module: Any, args: Any, output: Any) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None  # (B, heads, q, K)
        rows.append(None if weights is None else weights[:, :, -1].detach())  # the row that makes the next token

    return hook


@torch.no_grad()
def _generate_batch(
    model: Any,
    processor: Any,
    samples: Sequence[AugmentedSample],
    geometry: VisionGeometry,
    layer: int,
    eos_ids: Sequence[int],
    max_new_tokens: int,
) -> list[GenerationResult]:
    tokenizer = processor.tokenizer
    texts = [
        processor.apply_chat_template(prompt_messages(s.prompt), add_generation_prompt=True, tokenize=False)
        for s in samples
    ]
    enc = processor(text=texts, images=[list(s.images) for s in samples], return_tensors="pt", padding=True)
    enc = enc.to(model.device)
    if "pixel_values" in enc:
        enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
    # Only the chosen layer's last query row is kept, step by step, through a hook: asking generate for
    # output_attentions would hold every layer's full (heads, P, P) maps, far too much for a 7B model.
    rows: list[Tensor | None] = []
    handle = _attention_module(model, layer).register_forward_hook(_keep_last_row(rows))
    try:
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    finally:
        handle.remove()
    if not rows or rows[0] is None:
        raise RuntimeError(
            "generate returned no attention weights: load the model with "
            'from_pretrained(..., attn_implementation="eager") (SDPA and flash attention return none)'
        )
    prompt_len = enc["input_ids"].shape[1]
    generated = out.sequences[:, prompt_len:]  # (B, S); rows that stopped early hold pad tokens
    mask = _answer_mask(generated, eos_ids)  # (B, S)
    # Raw logits when available: processed scores (e.g. a repetition penalty) are not the model's probabilities.
    logits = torch.stack(out.logits if out.logits is not None else out.scores, dim=1).float()  # (B, S, V)
    token_logps = logits.log_softmax(-1).gather(-1, generated[..., None]).squeeze(-1)  # (B, S)
    ppl = perplexity(token_logps, mask)  # (B,)
    attn = attention_to_tokens(stack_attention_rows(rows), mask)  # (B, P + S − 1)
    pads = (enc["attention_mask"] == 0).sum(dim=1).tolist()  # left padding per row

    results = []
    for b, sample in enumerate(samples):
        pad = pads[b]
        ids = enc["input_ids"][b, pad:]  # the sample's own prompt: key k of row b is position k − pad
        n_image_tokens = int((ids == geometry.image_token_id).sum())
        if n_image_tokens != len(sample.images) * geometry.tokens_per_image:
            raise ValueError(
                f"prompt holds {n_image_tokens} image tokens for {len(sample.images)} image(s), expected "
                f"{geometry.tokens_per_image} each ({geometry.patch_grid} patches): unsupported processor layout"
            )
        groups = augmented_token_groups(
            sample,
            ids,
            geometry.image_token_id,
            tokens_per_image=geometry.tokens_per_image,
            patch_grid=geometry.patch_grid,
            input_size=geometry.input_size,
        )
        n = int(mask[b].sum())
        answer_ids = [t for t in generated[b, :n].tolist() if t not in eos_ids]  # EOS may not be a special token
        results.append(
            GenerationResult(
                sample=sample,
                answer=tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                ratio=target_attention_ratio(attn[b, pad:], groups, sample.target_index),
                perplexity=float(ppl[b]),
                n_generated=n,
                layer=layer,
            )
        )
    return results


def generate_with_attention(
    model: Any,
    processor: Any,
    samples: Sequence[AugmentedSample],
    *,
    layer: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    progress: bool = True,
) -> list[GenerationResult]:
    """Greedy answers, perplexities and target-attention ratios for augmented samples.

    Args:
        model: a LLaVA-style image-text-to-text model loaded with ``attn_implementation="eager"``.
        processor: its processor (chat template, tokenizer, image processor).
        samples: augmented samples; results come back in the same order.
        layer: 0-based decoder layer whose attention is read; None is ``num_layers // 2`` (16 of 32
            for LLaVA-7B, as in MIA-DPO); negative counts from the end.
        max_new_tokens: longest answer.
        batch_size: samples per ``generate`` call (prompts left-padded).
        progress: show a progress bar over batches.

    Returns:
        One :class:`GenerationResult` per sample.

    Raises:
        RuntimeError: when the model returns no attention weights (not loaded with eager attention).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"need batch_size ≥ 1 and max_new_tokens ≥ 1, got {batch_size} and {max_new_tokens}")
    layer = resolve_layer(num_layers(model), layer)
    geometry = vision_geometry(model, processor)
    eos_ids = _eos_ids(model, processor)
    tokenizer = processor.tokenizer
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt must end where generation starts
    was_training = model.training
    model.eval()
    results: list[GenerationResult] = []
    try:
        starts = range(0, len(samples), batch_size)
        for start in tqdm(starts, desc="MIA-DPO generation", unit="batch", disable=not progress):
            batch = samples[start : start + batch_size]
            results += _generate_batch(model, processor, batch, geometry, layer, eos_ids, max_new_tokens)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results
