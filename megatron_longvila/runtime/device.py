"""Host tensors onto the compute device without a host synchronization.

    host_to_device(host, device) -> Tensor    pinned and asynchronous where the build has pinned memory
"""

from __future__ import annotations

import torch

__all__ = ["host_to_device"]


def host_to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device`: from pinned memory, asynchronously, where the build supports pinning (a CUDA
    build; the CPU build has no pinned memory). The caching host allocator keeps the pinned copy alive until the
    transfer is done."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if device.type == "cuda" and torch.cuda.is_available():
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
