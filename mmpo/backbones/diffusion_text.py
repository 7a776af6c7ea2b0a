"""Caption conditioning of Stable Diffusion 1.x/2.x, SDXL, SD3 and Wan 2.1, from their frozen text encoders.

Each family conditions its denoiser on the captions differently; the functions here write down what
each pipeline feeds its denoiser (read from the diffusers pipelines' documented behaviour):

- ``sd``: the last hidden state of CLIP (``text_encoder``), (B, 77, D).
- ``sdxl``: the penultimate hidden states of CLIP-L and CLIP-G side by side, (B, 77, D_L + D_G), and
  CLIP-G's pooled projection (B, P) for the ``text_time`` added conditioning.
- ``sd3``: the penultimate hidden states of CLIP-L and CLIP-G side by side, zero-padded to T5's width
  and followed by T5's last hidden state along the sequence, (B, 77 + 256, D_T5); both CLIPs' pooled
  projections side by side (B, P_L + P_G).
- ``wan``: UMT5's last hidden state over the caption's own tokens, zeros after them up to 512 positions
  (B, 512, D), as ``WanPipeline`` builds it; no pooled embedding. Captions are cleaned as the pipeline does
  (HTML entities unescaped, whitespace collapsed; its optional ``ftfy`` repair is not applied).

Captions are padded to the tokenizer's window and cut there (77 tokens for CLIP, 256 for SD3's T5, 512 for
Wan's UMT5).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import repeat
from torch import Tensor, nn

__all__ = ["Family", "TextConditioning", "encode_captions", "family_of"]

Family = Literal["sd", "sdxl", "sd3", "wan"]

_T5_LENGTH = 256  # SD3's pipeline default max_sequence_length
_UMT5_LENGTH = 512  # WanPipeline's default max_sequence_length


@dataclass(eq=False)
class TextConditioning:
    """The encoded captions of B groups.

    Attributes:
        embeds: (B, L, D) token embeddings the denoiser cross-attends to.
        pooled: (B, P) pooled embedding (SDXL, SD3); None for SD 1.x/2.x.
    """

    embeds: Tensor
    pooled: Tensor | None = None

    def rows(self, group_size: int, dtype: torch.dtype) -> TextConditioning:
        """Each group's conditioning for its K rows (response-major), in ``dtype``."""

        def each(t: Tensor | None) -> Tensor | None:
            return None if t is None else repeat(t, "b ... -> (k b) ...", k=group_size).to(dtype)

        return TextConditioning(each(self.embeds), each(self.pooled))


def family_of(denoiser: nn.Module) -> Family:
    """The conditioning family of a denoiser, from its class and config.

    Raises:
        ValueError: a denoiser this backbone does not know how to condition.
    """
    name, config = type(denoiser).__name__, denoiser.config
    if name == "UNet2DConditionModel":
        added = getattr(config, "addition_embed_type", None)
        if added is None:
            return "sd"
        if added == "text_time":
            return "sdxl"
        raise ValueError(f"UNet2DConditionModel with addition_embed_type={added!r} is not supported")
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "WanTransformer3DModel":
        if getattr(config, "image_dim", None) is not None:
            raise ValueError("WanTransformer3DModel with image_dim (image-to-video, CLIP image input) is not supported")
        return "wan"
    raise ValueError(
        f"{name} is not supported: DiffusionBackbone trains UNet2DConditionModel (SD 1.x/2.x, SDXL), "
        "SD3Transformer2DModel (SD3) and WanTransformer3DModel (Wan 2.1 text-to-video) denoisers"
    )


def _token_ids(tokenizer: Any, captions: list[str], max_length: int, device: torch.device) -> Tensor:
    out = tokenizer(captions, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids.to(device)  # (B, L)


def _clip(encoder: nn.Module, tokenizer: Any, captions: list[str], device: torch.device) -> Any:
    ids = _token_ids(tokenizer, captions, tokenizer.model_max_length, device)
    return encoder(ids, output_hidden_states=True)


def _umt5(encoder: nn.Module, tokenizer: Any, captions: list[str], device: torch.device) -> Tensor:
    """WanPipeline's prompt embeddings: UMT5 over each cleaned caption, zeros past its last token, (B, 512, D)."""
    cleaned = [" ".join(html.unescape(html.unescape(c)).split()) for c in captions]
    out = tokenizer(
        cleaned, padding="max_length", max_length=_UMT5_LENGTH, truncation=True, add_special_tokens=True,
        return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    mask = out.attention_mask.to(device)  # (B, L)
    hidden = encoder(out.input_ids.to(device), mask).last_hidden_state  # (B, L, D)
    return hidden * mask.gt(0).unsqueeze(-1).to(hidden.dtype)  # the pipeline's cut-and-zero-pad


def encode_captions(
    family: Family, encoders: Mapping[str, nn.Module], tokenizers: Mapping[str, Any], captions: list[str]
) -> TextConditioning:
    """The conditioning of ``captions`` (B) for a denoiser of ``family``, without gradients.

    Args:
        family: ``sd``, ``sdxl``, ``sd3`` or ``wan`` (:func:`family_of`).
        encoders: the text encoders by pipeline name (``text_encoder``, ``text_encoder_2``, ...).
        tokenizers: their tokenizers by pipeline name (``tokenizer``, ``tokenizer_2``, ...).
        captions: the B captions.
    """
    needed = {"sd": 1, "sdxl": 2, "sd3": 3, "wan": 1}[family]
    names = ["text_encoder"] + [f"text_encoder_{i}" for i in range(2, needed + 1)]
    missing = [n for n in names if n not in encoders]
    if missing:
        raise ValueError(f"a {family} denoiser needs the text encoders {names}; the checkpoint lacks {missing}")
    device = next(encoders["text_encoder"].parameters()).device
    toks = [tokenizers[n.replace("text_encoder", "tokenizer")] for n in names]
    with torch.no_grad():
        if family == "wan":
            return TextConditioning(_umt5(encoders["text_encoder"], toks[0], captions, device))
        if family == "sd":
            return TextConditioning(_clip(encoders["text_encoder"], toks[0], captions, device).last_hidden_state)
        first = _clip(encoders["text_encoder"], toks[0], captions, device)
        second = _clip(encoders["text_encoder_2"], toks[1], captions, device)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)  # (B, 77, D_L + D_G)
        if family == "sdxl":
            return TextConditioning(clip, second.text_embeds)  # CLIP-G's pooled projection (B, P_G)
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)  # (B, P_L + P_G)
        ids = _token_ids(toks[2], captions, _T5_LENGTH, device)
        t5 = encoders["text_encoder_3"](ids).last_hidden_state  # (B, L_T5, D_T5)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zeros up to T5's width
        return TextConditioning(torch.cat([clip, t5.to(clip.dtype)], dim=1), pooled)
