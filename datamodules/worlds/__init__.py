"""Synthetic worlds written to disk for tests and demonstrations: shapes (images) and video."""

from datamodules.worlds.shapes import ShapesWorld, objects_in_text, vocabulary, write_shapes_world

__all__ = ["ShapesWorld", "objects_in_text", "vocabulary", "write_shapes_world"]
