"""Local attention kernels behind one interface (see base.py). `get_backend(name, q)` picks one.

- cpu:        ATen flash attention for CPU (returns log-sum-exp; exact in fp32/fp64).
- torch_cuda: PyTorch's built-in CUDA flash kernels, varlen, fp16/bf16.
- te:         Transformer Engine fused attention (thd), when transformer_engine imports.
- te_fp8:     the same with an FP8 (E4M3) forward; unverified numerics, opt-in only (never chosen by auto).
- math:       plain tensor algebra on any device and dtype (references, fp32 on a GPU).
- auto:       cpu on CPU; on CUDA te if importable (sm80+) else torch_cuda for fp16/bf16, math for fp32/fp64.
"""

from __future__ import annotations

import torch

from ...runtime.probes import te_available
from .base import AttentionBackend
from ...errors import BackendUnavailable
from ...plan.segments import Segments

_INSTANCES = {}


def get_backend(name: str, q: torch.Tensor) -> AttentionBackend:
    """Resolve a backend name for tensors like `q`. Raises BackendUnavailable with the reason."""
    if name == "auto":
        if q.device.type == "cpu":
            name = "cpu"
        elif q.device.type == "cuda":
            if q.dtype in (torch.float16, torch.bfloat16):
                # TE's thd fused attention needs Ampere or newer; older GPUs get PyTorch's kernels.
                sm80 = torch.cuda.get_device_capability(q.device) >= (8, 0)
                name = "te" if sm80 and te_available() else "torch_cuda"
            else:
                name = "math"
        else:
            name = "math"
    if name not in _INSTANCES:
        if name == "cpu":
            from .cpu import CPUBackend as cls
        elif name == "math":
            from .math import MathBackend as cls
        elif name == "torch_cuda":
            from .torch_cuda import TorchCUDABackend as cls
        elif name in ("te", "te_fp8"):
            if not te_available():
                raise BackendUnavailable(f"backend {name!r} needs transformer_engine (pip install "
                                         "'megatron_longvila[gpu]' on a CUDA machine); use 'torch_cuda' or 'auto'")
            from functools import partial

            from .te import TEBackend

            cls = partial(TEBackend, fp8=name == "te_fp8")
        else:
            raise BackendUnavailable(f"unknown attention backend {name!r}; "
                                     "choose auto, cpu, torch_cuda, te, te_fp8 or math")
        _INSTANCES[name] = cls()
    return _INSTANCES[name]


__all__ = ["AttentionBackend", "BackendUnavailable", "Segments", "get_backend", "te_available"]
