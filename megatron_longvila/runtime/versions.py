"""The fence around compatibility code: every workaround of a dependency says where it was verified.

Every piece of code that leans on a dependency's private or undocumented behaviour is registered here with the
versions it was verified on, whichever folder it lives in (the folder whose layer it needs): the CPU runtime and
the distributed optimizer's Adam `step` repair (runtime/), TE's fused-attention signature probing (runtime/),
the private process-group options read for timeouts (parallel/timeouts.py), torch_dist's shard file names
(checkpoint/integrity.py), the torch.save zip layout read by conversion (conversion/storage.py), the rendezvous
store the watchdog reaches (training/watchdog.py), and megatron.training's patches (training/megatron_lm.py).
`applying(name)` is called where it takes effect and warns once per process when the installed version is not
one of them, so a silent behaviour change upstream shows up in the log instead of as wrong numbers.

    WORKAROUNDS                    name -> Workaround
    applying(name) -> bool         True when the installed versions are verified (else one warning)
    installed_version(package)     "0.16.1", or None when the package does not import
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["Workaround", "WORKAROUNDS", "applying", "installed_version", "UnverifiedVersionWarning"]


class UnverifiedVersionWarning(UserWarning):
    """A workaround applied to a dependency version it was not verified on."""


@dataclass(frozen=True)
class Workaround:
    """A piece of compatibility code and the dependency versions it was checked against."""

    name: str
    """Short name, used in messages."""
    package: str
    """The importable package whose behaviour it works around ("megatron.core", "torch", ...)."""
    verified: Tuple[str, ...]
    """Versions (prefix match on the release, e.g. "2.13" matches "2.13.0+cpu") it was verified on."""
    why: str
    """What it works around, in one line."""


WORKAROUNDS: Dict[str, Workaround] = {w.name: w for w in (
    Workaround("cpu_runtime", "megatron.core", ("0.16.1",),
               "megatron-core calls CUDA directly on paths a CPU build of torch takes (runtime/cpu.py)"),
    Workaround("cpu_runtime_torch", "torch", ("2.13",),
               "the CPU runtime's torch proxy and Tensor.cuda/Tensor.type wrappers (runtime/cpu.py)"),
    Workaround("adam_step_repair", "megatron.core", ("0.16.1",),
               "the distributed optimizer's fully_reshardable load with torch Adam: KeyError 'step' and one "
               "shared step tensor (runtime/megatron_optimizer.py)"),
    Workaround("te_signature_probe", "transformer_engine", ("2.9", "2.10", "2.11", "2.12", "2.13", "2.14", "2.15",
                                                            "2.16", "2.17", "2.18"),
               "fused_attn_fwd/bwd keyword lists that grew over TE 2.x (runtime/te_compat.py)"),
    Workaround("megatron_lm_cpu", "megatron.core", ("0.16.1",),
               "megatron.training on a CPU build of torch (training/megatron_lm.py)"),
    Workaround("megatron_lm_save_hook", "megatron.core", ("0.16.1",),
               "megatron.training.training.save_checkpoint wrapped to write the data position first "
               "(training/megatron_lm.py)"),
    Workaround("pg_backend_options", "torch", ("2.13",),
               "the default group's timeout read from ProcessGroup._get_backend(device).options._timeout "
               "(parallel/timeouts.py)"),
    Workaround("dcp_shard_names", "torch", ("2.13",),
               "torch_dist's writer names a rank's shard files __<rank>_<n>.distcp (checkpoint/integrity.py)"),
    Workaround("torch_save_zip_layout", "torch", ("2.13",),
               "a torch.save file is a stored (uncompressed) zip whose <name>/data/<n> record holds the storage "
               "(conversion/storage.py)"),
    Workaround("default_store_access", "torch", ("2.13",),
               "distributed_c10d._get_default_store() and PrefixStore.underlying_store reach the rendezvous "
               "TCPStore (training/watchdog.py)"),
    Workaround("mp_helpers_stop", "python", ("3.11", "3.12"),
               "multiprocessing's forkserver and resource tracker ended through their private pid, fd and lock "
               "(parallel/launch.py stop_helpers; run on 3.11, 3.12's code read: the same)"),
)}

_WARNED: set = set()


def installed_version(package: str) -> Optional[str]:
    """The installed version of an importable package, or None when it does not import."""
    try:
        if package == "megatron.core":
            from importlib.metadata import version

            return version("megatron-core")
        mod = importlib.import_module(package)
    except Exception:  # not installed, or (TE) installed but failing to load its CUDA libraries
        return None
    return str(getattr(mod, "__version__", None) or "unknown")


def _matches(version: str, verified: Tuple[str, ...]) -> bool:
    release = version.split("+")[0]
    return any(release == v or release.startswith(v + ".") for v in verified)


def applying(name: str, version: Optional[str] = None) -> bool:
    """Note that workaround `name` takes effect; warn once if the dependency's version was not verified.

    Args:
        name: a key of WORKAROUNDS.
        version: the dependency's version when the caller already knows it (else it is looked up).
    """
    w = WORKAROUNDS[name]
    version = version if version is not None else installed_version(w.package)
    if version is None or _matches(version, w.verified):
        return True
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"megatron_longvila workaround '{name}' ({w.why}) was verified on {w.package} "
                      f"{', '.join(w.verified)}, not on the installed {version}: check its results (the tests under "
                      f"tests/ run it) before trusting a long run", UnverifiedVersionWarning, stacklevel=2)
    return False
