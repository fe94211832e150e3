"""Measuring activation memory on any device, independently of the memory model (planning.memory).

    SavedTensorMeter    bytes autograd keeps for the backward: the distinct storages of every tensor saved inside the
                        context (saved-tensor hooks), parameters and buffers excluded
    LiveTensorTracker   the peak of live tensor storage allocated inside the context (a dispatch mode sees every
                        tensor an operator returns; a weak reference to its storage says when it is freed)
    rss_bytes()         this process's resident set size, for reporting beside them

Neither knows anything about the model's structure: they count what autograd and the operators actually did. Storage
that existed before the context (parameters, gradient buffers, the planned micro-batch) is not counted by the tracker.
On the CPU build, activation offload's host copies are made outside dispatch modes (models.offload), as a CUDA
allocator's statistics never see pinned host memory; they are counted by the offload's own statistics instead.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SavedTensorMeter", "LiveTensorTracker", "rss_bytes", "max_rss_bytes"]


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


class SavedTensorMeter:
    """Count the distinct storages saved for the backward inside `with meter:` (parameters excluded).

    Only the innermost saved-tensor hooks see a saved tensor: inside a block whose activations are offloaded the
    offload's hooks take them, so this meter counts what stays on the device side.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: Dict[int, tuple] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        ptr, nbytes = _storage_key(t)
        if ptr not in self._exclude and nbytes and ptr not in self._seen:
            self._seen[ptr] = (nbytes, StorageWeakRef(t.untyped_storage()), t.dtype)
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        """Bytes of distinct saved storages (a storage saved by several operators counts once)."""
        return sum(v[0] for v in self._seen.values())

    def bytes_by_dtype(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for nbytes, _, dtype in self._seen.values():
            out[str(dtype)] = out.get(str(dtype), 0) + nbytes
        return out

    def live_bytes(self) -> int:
        """Of those, the bytes still alive now (after a backward: what it failed to free)."""
        return sum(v[0] for v in self._seen.values() if not v[1].expired())


class LiveTensorTracker(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the context and alive at once.

    Every operator's fresh outputs are recorded by storage (views and in-place results, which the operator's schema
    marks as aliases of an input, allocate nothing); a storage counts from the operator that returned it until its
    weak reference expires. Freed storage is noticed at the next operator
    (a sweep), which is exact for the peak because memory only grows at operators. `mark(name)` records the live
    bytes at a point (e.g. the end of the forward).
    """

    def __init__(self, device: Optional[str] = None):
        super().__init__()
        self.device = device
        self._live: Dict[int, tuple] = {}
        self.current = 0
        self.peak = 0
        self.allocated = 0
        self.marks: Dict[str, int] = {}
        self._preexisting: set = set()
        self.peak_phase = ""
        """"forward" or "backward": where the peak happened."""
        self.peak_op = ""
        """The operator that allocated the peak's last bytes (diagnostics)."""
        self._op = ""

    def _sweep(self) -> None:
        dead = [k for k, (_, ref) in self._live.items() if ref.expired()]
        for k in dead:
            self.current -= self._live.pop(k)[0]

    def _record(self, t) -> None:
        if not isinstance(t, torch.Tensor) or (self.device is not None and t.device.type != self.device):
            return
        if t.device.type == "meta":
            return
        s = t.untyped_storage()
        ptr, nbytes = s.data_ptr(), s.nbytes()
        if not nbytes or ptr in self._live or ptr in self._preexisting:
            return
        self._live[ptr] = (nbytes, StorageWeakRef(s))
        self.current += nbytes
        self.allocated += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
            self.peak_op = self._op

    def exclude_existing(self, tensors: Iterable[torch.Tensor]) -> "LiveTensorTracker":
        """Storages alive before the context (e.g. gradient buffers an operator writes in place) are not new."""
        self._preexisting |= {t.untyped_storage().data_ptr() for t in tensors}
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        returns = func._schema.returns
        for i, o in enumerate(outs):
            # Views and in-place results (the schema marks them as aliases of an input) allocate nothing.
            if i < len(returns) and returns[i].alias_info is not None:
                continue
            self._record(o)
        return out

    def mark(self, name: str) -> int:
        self._sweep()
        self.marks[name] = self.current
        return self.current

    def finish(self) -> int:
        """Live bytes at the end (sweeps first)."""
        self._sweep()
        return self.current


def rss_bytes() -> int:
    """Resident set size of this process now (0 where it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:
        return 0


def max_rss_bytes() -> int:
    """The most resident memory this process has used (getrusage; kilobytes on Linux)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except Exception:
        return 0
