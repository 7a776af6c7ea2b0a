"""QLoRA: the base model loaded in 4 or 8 bits through transformers' bitsandbytes integration.

The quantized weights stay frozen; LoRA adapters train in ``compute_dtype`` on top of them, and the
reference is the same quantized model with its adapters switched off (``DisabledAdapter``), so one
copy of the weights serves both. The vision tower, the projector and the LM head stay unquantized by
default (small, and the media features and log-probs are what preference training compares).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["DEFAULT_SKIP_MODULES", "QuantizationSettings", "bitsandbytes_unavailable"]

# Module names kept in full precision: vision encoders and projectors of the supported families, the LM head.
DEFAULT_SKIP_MODULES = [
    "vision_tower",
    "vision_model",
    "visual",
    "multi_modal_projector",
    "mm_projector",
    "lm_head",
]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bitsandbytes_unavailable() -> str | None:
    """Why 4/8-bit loading cannot run here (bitsandbytes missing or without a backend), or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a backend that fails to load its library
        return f"bitsandbytes cannot be imported ({type(e).__name__}: {e}); pip install bitsandbytes"
    return None


def _skip_patterns(names: list[str]) -> list[str]:
    """transformers matches skip entries from the start of a module's full name (or as its suffix):
    a name alone would miss ``model.vision_tower.encoder.layers.0.mlp.fc1``, so each also becomes a
    pattern that finds it after any prefix."""
    return [p for name in names for p in (name, rf"(?:.*\.)?{re.escape(name)}")]


class QuantizationSettings:
    """How to quantize the frozen base model (passed to ``transformers.BitsAndBytesConfig``).

    Args:
        bits: 4 (QLoRA's NF4) or 8 (LLM.int8()).
        quant_type: 4-bit data type, ``nf4`` (QLoRA's normal float) or ``fp4``.
        double_quant: also quantize the 4-bit quantization constants (about 0.4 bits a weight saved).
        compute_dtype: dtype of the 4-bit matmuls and of the LoRA weights; ``bfloat16`` on recent GPUs.
        skip_modules: names of modules kept unquantized, matched as a whole component anywhere in a
            module's dotted path (``vision_tower`` keeps ``model.vision_tower.encoder...``); None keeps
            the vision tower, the projector and the LM head in full precision (``DEFAULT_SKIP_MODULES``).
    """

    def __init__(
        self,
        bits: Literal[4, 8] = 4,
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
        compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16",
        skip_modules: list[str] | None = None,
    ) -> None:
        if bits not in (4, 8):
            raise ValueError(f"quantization.bits must be 4 or 8, got {bits!r}")
        if quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quantization.quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
        if compute_dtype not in _DTYPES:
            raise ValueError(f"quantization.compute_dtype must be one of {sorted(_DTYPES)}, got {compute_dtype!r}")
        self.bits, self.quant_type, self.double_quant = bits, quant_type, double_quant
        self.compute_dtype = compute_dtype
        self.skip_modules = list(DEFAULT_SKIP_MODULES if skip_modules is None else skip_modules)

    def transformers_config(self) -> Any:
        """The ``BitsAndBytesConfig`` for ``from_pretrained(quantization_config=...)``."""
        reason = bitsandbytes_unavailable()
        if reason is not None:
            raise ImportError(f"backbone.quantization needs bitsandbytes: {reason}")
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=self.bits == 4,
            load_in_8bit=self.bits == 8,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=_DTYPES[self.compute_dtype],
            llm_int8_skip_modules=_skip_patterns(self.skip_modules),
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        """Make a quantized model ready for adapters: peft's k-bit preparation, without its checkpointing.

        peft freezes every weight, casts the unquantized ones to float32 for stable training and lets
        the embeddings' outputs require gradients (needed under activation checkpointing); the
        backbone switches checkpointing on itself, non-reentrant.
        """
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

    def fingerprint(self) -> dict[str, Any]:
        """What changes the quantized model's outputs (part of the reference cache's fingerprint)."""
        return {
            "bits": self.bits,
            "quant_type": self.quant_type if self.bits == 4 else None,
            "double_quant": self.double_quant if self.bits == 4 else None,
            "compute_dtype": self.compute_dtype,
            "skip_modules": sorted(self.skip_modules),
        }

    def __repr__(self) -> str:
        kind = f"{self.bits}-bit" + (f" {self.quant_type}" if self.bits == 4 else "")
        return f"QuantizationSettings({kind}, compute {self.compute_dtype})"
