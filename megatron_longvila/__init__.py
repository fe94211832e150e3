"""megatron_longvila: LongVILA (arXiv 2408.10188) Multi-Modal Sequence Parallelism on Megatron-Core."""

__version__ = "0.1.0"
