"""MM-SP attention: `mmsp_attention` (Ulysses x zigzag ring) and its single-process oracle."""

from .mmsp import mmsp_attention, reference_attention

__all__ = ["mmsp_attention", "reference_attention"]
