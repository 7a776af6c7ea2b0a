"""Backbones: how a model family is loaded and how its per-response statistics are computed."""

from mmpo.backbones.diffusion import DiffusionBackbone
from mmpo.backbones.protocol import Backbone
from mmpo.backbones.quantization import QuantizationSettings
from mmpo.backbones.vlm import DEFAULT_LORA_TARGETS, LoraSettings, VisionLanguageBackbone

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "Backbone",
    "DiffusionBackbone",
    "LoraSettings",
    "QuantizationSettings",
    "VisionLanguageBackbone",
]
