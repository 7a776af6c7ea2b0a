"""Negative builders and media augmentations (tensor in, tensor out, explicit generators)."""

__all__: list[str] = []
