"""Tiny random-init models built offline from configs (tests, demos, benchmarks), and their pretraining."""

from mmpo.tiny.llava import build_tiny_llava

__all__ = ["build_tiny_llava"]
