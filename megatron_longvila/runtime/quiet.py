"""Dependency warnings that carry no information for this project, filtered in one place.

Importing this module installs the filters (before megatron-core is imported, which is when most of them fire);
`MEGATRON_LONGVILA_VERBOSE=1` in the environment, or `--verbose` on the command line of the project's scripts,
keeps every warning. Each filter matches a message and the module that raises it, so nothing else is hidden:

| module | message | why it is noise here |
|---|---|---|
| megatron.core (optimizer, clip_grads, fsdp, backends) | "Transformer Engine and Apex are not installed" / "Apex is not installed" | the CPU build and the local spec never use them; TE paths check for TE themselves and say so |
| torch.jit | "`torch.jit.script_method` is deprecated" | megatron-core 0.16.1 decorates helpers at import |
| megatron.core.inference.contexts | "The following imports from `dynamic_context.py` will be removed" | an upstream import cycle note |
| megatron.core.transformer.transformer_config | "full scope is deprecated" | megatron-core's own default (cuda_graph_scope) |
| torch.distributed.checkpoint | "Please use DTensor instead and we are deprecating ShardedTensor" | megatron-core's dist_checkpointing uses ShardedTensor |
| torch.distributed.checkpoint | "torch.distributed is disabled, unavailable or uninitialized" | single-process conversion writes torch_dist on purpose |
| megatron.core.dist_checkpointing | "`load_state_dict` is deprecated and will be removed" | megatron-core 0.16.1 calls torch's older loader |
"""

from __future__ import annotations

import os
import sys
import warnings

__all__ = ["FILTERS", "install", "verbose"]

FILTERS = [
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core"),
    (r"Apex is not installed", UserWarning, r"megatron\.core"),
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning, r"torch\.jit"),
    (r"The following imports from `dynamic_context\.py` will be removed", DeprecationWarning,
     r"megatron\.core\.inference"),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer"),
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning, r"torch\.distributed"),
    (r"torch\.distributed is disabled, unavailable or uninitialized", UserWarning, r"torch\.distributed"),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning, r"megatron\.core\.dist_checkpointing"),
]
"""(message regex, category, module regex) of each filtered warning."""


def verbose() -> bool:
    return os.environ.get("MEGATRON_LONGVILA_VERBOSE") == "1" or "--verbose" in sys.argv[1:]


def install() -> None:
    """Install the filters (idempotent), unless verbose output was asked for."""
    if verbose():
        return
    for message, category, module in FILTERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


install()
