"""Every collective of the project goes through here, so communication can be counted and tested.

Counters record the bytes each rank *sends to other ranks* (its own share of an all-to-all or all-gather
stays local and is not counted), keyed by (group name, kind). Groups are named when they are registered
(`register_group`), which the MM-SP mesh does for its Ulysses, ring and CP groups.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

# torch >= 2.13 renamed all_gather_into_tensor (and deprecated the old name); the GPU image has 2.11.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_GROUP_NAMES: Dict[int, str] = {}
_BYTES: Dict[Tuple[str, str], int] = defaultdict(int)
_CALLS: Dict[Tuple[str, str], int] = defaultdict(int)


def register_group(group: Optional[dist.ProcessGroup], name: str) -> None:
    """Give a process group a name for the byte counters."""
    _GROUP_NAMES[id(group)] = name


def group_name(group: Optional[dist.ProcessGroup]) -> str:
    return _GROUP_NAMES.get(id(group), "world" if group is None else "unnamed")


def _count(group, kind: str, nbytes: int) -> None:
    key = (group_name(group), kind)
    _BYTES[key] += int(nbytes)
    _CALLS[key] += 1


def reset_counters() -> None:
    _BYTES.clear()
    _CALLS.clear()


def counters() -> Dict[str, Dict[str, int]]:
    """Bytes sent by this rank so far, as {"group/kind": bytes}, plus call counts."""
    return {
        "bytes": {f"{g}/{k}": v for (g, k), v in sorted(_BYTES.items())},
        "calls": {f"{g}/{k}": v for (g, k), v in sorted(_CALLS.items())},
    }


def total_bytes() -> int:
    return sum(_BYTES.values())


@contextmanager
def counting():
    """Reset the counters on entry; yields the live counter dict accessor."""
    reset_counters()
    yield counters


def _nbytes(numel: int, t: torch.Tensor) -> int:
    return numel * t.element_size()


# ----------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------

def _host_staged(group, t: torch.Tensor) -> bool:
    """gloo moves only host memory: CUDA tensors on a gloo group (several ranks sharing one GPU in tests,
    since NCCL cannot put two ranks on one device) travel through host copies."""
    return t.is_cuda and dist.get_backend(group) == "gloo"


def all_to_all_single(output: torch.Tensor, input: torch.Tensor, output_split_sizes: Sequence[int],
                      input_split_sizes: Sequence[int], group, kind: str = "all_to_all") -> None:
    """`dist.all_to_all_single` on flat buffers with split sizes in elements (dim 0), counted."""
    me = dist.get_rank(group)
    _count(group, kind, _nbytes(sum(input_split_sizes) - input_split_sizes[me], input))
    if _host_staged(group, input):
        out = output.new_empty(output.shape, device="cpu")
        dist.all_to_all_single(out, input.cpu(), list(output_split_sizes), list(input_split_sizes), group=group)
        output.copy_(out)
        return
    dist.all_to_all_single(output, input, list(output_split_sizes), list(input_split_sizes), group=group)


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, group, kind: str = "all_gather") -> None:
    world = dist.get_world_size(group)
    _count(group, kind, _nbytes(input.numel() * (world - 1), input))
    if _host_staged(group, input):
        out = output.new_empty(output.shape, device="cpu")
        _all_gather_single(out, input.cpu(), group=group)
        output.copy_(out)
        return
    _all_gather_single(output, input, group=group)


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM, kind: str = "all_reduce") -> None:
    world = dist.get_world_size(group)
    # Ring all-reduce sends 2 (n-1)/n of the buffer per rank.
    _count(group, kind, _nbytes(tensor.numel() * 2 * (world - 1) // max(world, 1), tensor))
    if _host_staged(group, tensor):
        t = tensor.cpu()
        dist.all_reduce(t, op=op, group=group)
        tensor.copy_(t)
        return
    dist.all_reduce(tensor, op=op, group=group)


def broadcast(tensor: torch.Tensor, src: int, group, kind: str = "broadcast") -> None:
    """`dist.broadcast` from global rank `src`, counted on the sender (it sends the buffer to each other rank)."""
    world = dist.get_world_size(group)
    if dist.get_rank() == src:
        _count(group, kind, _nbytes(tensor.numel() * (world - 1), tensor))
    if _host_staged(group, tensor):
        t = tensor.cpu()
        dist.broadcast(t, src=src, group=group)
        tensor.copy_(t)
        return
    dist.broadcast(tensor, src=src, group=group)


def send(tensor: torch.Tensor, dst: int, group, kind: str = "send") -> None:
    """Blocking `dist.send` to global rank `dst`, counted."""
    _count(group, kind, _nbytes(tensor.numel(), tensor))
    dist.send(tensor.cpu() if _host_staged(group, tensor) else tensor, dst=dst, group=group)


def recv(tensor: torch.Tensor, src: int, group) -> None:
    """Blocking `dist.recv` from global rank `src` into `tensor` (the sender counts the bytes)."""
    if _host_staged(group, tensor):
        t = tensor.new_empty(tensor.shape, device="cpu")
        dist.recv(t, src=src, group=group)
        tensor.copy_(t)
        return
    dist.recv(tensor, src=src, group=group)


class P2PHandle:
    """Outstanding point-to-point requests; `wait()` completes them all (and lands host-staged receives)."""

    def __init__(self, reqs: List, landings: Sequence = (), keep: Sequence = ()):
        self._reqs = reqs
        self._landings = list(landings)
        self._keep = list(keep)  # host copies of sends must outlive the requests

    def wait(self) -> None:
        for r in self._reqs:
            r.wait()
        self._reqs = []
        for dst, src in self._landings:
            dst.copy_(src)
        self._landings, self._keep = [], []


def ring_exchange(sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], group, kind: str) -> P2PHandle:
    """Send each tensor of `sends` to the next rank of the ring `group` and receive each of `recvs` from the
    previous one, asynchronously. Returns a handle; the buffers must not be touched until `wait()`."""
    n = dist.get_world_size(group)
    me = dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % n)
    prv = dist.get_global_rank(group, (me - 1) % n)
    ops, landings, keep = [], [], []
    # Receives first: gloo pairs operations in posting order per peer.
    for t in recvs:
        if _host_staged(group, t):
            host = t.new_empty(t.shape, device="cpu")
            landings.append((t, host))
            t = host
        ops.append(dist.P2POp(dist.irecv, t, prv, group))
    for t in sends:
        _count(group, kind, _nbytes(t.numel(), t))
        if _host_staged(group, t):
            t = t.cpu()
            keep.append(t)
        ops.append(dist.P2POp(dist.isend, t, nxt, group))
    if not ops:
        return P2PHandle([])
    return P2PHandle(dist.batch_isend_irecv(ops), landings, keep)


# ----------------------------------------------------------------------------------------------------
# Autograd-aware all-to-all
# ----------------------------------------------------------------------------------------------------

class _AllToAll(torch.autograd.Function):
    """Flat all-to-all whose backward is the all-to-all with the split sizes swapped."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, kind):
        ctx.out_splits, ctx.in_splits, ctx.group, ctx.kind = out_splits, in_splits, group, kind
        x = x.contiguous()
        out = x.new_empty(sum(out_splits))
        all_to_all_single(out, x, out_splits, in_splits, group, kind)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        out = grad.new_empty(sum(ctx.in_splits))
        all_to_all_single(out, grad, ctx.in_splits, ctx.out_splits, ctx.group, ctx.kind + "_bwd")
        return out, None, None, None, None


def all_to_all_autograd(x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group,
                        kind: str = "all_to_all") -> torch.Tensor:
    """Differentiable flat all-to-all (1-D `x`, split sizes in elements)."""
    return _AllToAll.apply(x.reshape(-1), list(out_splits), list(in_splits), group, kind)
