"""megatron_longvila: LongVILA (arXiv 2408.10188) Multi-Modal Sequence Parallelism on Megatron-Core."""

from .runtime import quiet as _quiet  # noqa: F401  (dependency warnings filtered before megatron-core loads)

__version__ = "0.1.0"
