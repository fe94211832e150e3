"""Optional packages, probed in one place: each answers whether the package imports here (never raises).

    te_available() -> bool      Transformer Engine's PyTorch extension imports (needs CUDA, NCCL and cuDNN)

The video decoders probe their own backends (data.video: PyAV, DALI CPU and GPU) and the Energon reader its package
(data.energon): each is used by one folder only. Transformer Engine is asked about by the configuration check, the
attention kernels, the layer specs, the vision encoder, activation offloading and the megatron.training adapter,
hence this module.
"""

from __future__ import annotations

__all__ = ["te_available"]


def te_available() -> bool:
    """Whether `transformer_engine.pytorch` imports. Any failure counts as unavailable: TE raises several error types
    when CUDA, cuDNN or a matching torch ABI are missing, and a half-working TE must not be used."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True
