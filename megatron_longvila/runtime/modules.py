"""The model inside Megatron's wrappers, and where it lives.

    unwrap_model(model) -> module        the innermost module under DDP, Float16Module and similar (`.module` chains)
    model_device(model) -> torch.device  the device of its parameters (every pipeline stage has some)
"""

from __future__ import annotations

import torch

__all__ = ["unwrap_model", "model_device"]


def unwrap_model(model):
    """The model inside Megatron's wrappers (DistributedDataParallel, Float16Module): each keeps it as `.module`."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_device(model) -> torch.device:
    """The device of the model's parameters; the host for a model without any."""
    for p in unwrap_model(model).parameters():
        return p.device
    return torch.device("cpu")
