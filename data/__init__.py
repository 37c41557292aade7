"""Synthetic image-caption data: procedural scenes and the dataset generator."""
