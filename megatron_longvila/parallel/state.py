"""MM-SP's state for one model: the validated settings and this rank's U x R mesh, attached to its TransformerConfig.

    initialize_mmsp(config, mmsp=None, *, seq_length=None, micro_batch_size=None, packed=False) -> MMSPMesh
        validate (config.validate_mmsp) and build the U x R mesh inside Megatron's CP group (the Ulysses and ring
        groups are Megatron's own hierarchical CP groups). Collective: every rank calls it, after
        parallel_state.initialize_model_parallel. The mesh and settings are attached to `config` (the model's
        TransformerConfig), not kept in module globals: two models with their own configs never share them, and
        a model built before initialize_mmsp sees them at its first forward.
    mmsp_state(config) -> MMSPState | None, get_mmsp_mesh(config), get_mmsp_config(config), reset_mmsp(config)

As Megatron's parallel_state holds the groups of the run, this holds the groups of one model's attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import MMSPConfig, validate_mmsp
from ..errors import MMSPConfigError, MMSPRuntimeError
from .groups import host_group_of
from .mesh import MMSPMesh, build_mmsp_mesh, single_rank_mesh

__all__ = ["MMSPState", "initialize_mmsp", "mmsp_state", "get_mmsp_mesh", "get_mmsp_config", "reset_mmsp"]


@dataclass(frozen=True)
class MMSPState:
    """What `initialize_mmsp` set up for one model (attached to its TransformerConfig)."""

    mesh: MMSPMesh
    """The U x R mesh of this rank."""
    config: MMSPConfig
    """The validated MM-SP settings (kernel, shard padding, ...)."""
    host_cp_group: Optional[object] = None
    """A gloo group over the CP group, for host-side agreement while planning (None when CP is 1)."""

    def __deepcopy__(self, memo):  # process groups cannot be copied; a copied config shares its mesh
        return self


_STATE_ATTR = "_mmsp_state"


def initialize_mmsp(config, mmsp: Optional[MMSPConfig] = None, *, seq_length: Optional[int] = None,
                    micro_batch_size: Optional[int] = None, packed: bool = False) -> MMSPMesh:
    """Validate the configuration, build the MM-SP mesh in Megatron's CP group (collective, all ranks) and
    attach both to `config`."""
    mmsp = validate_mmsp(config, mmsp, seq_length=seq_length, micro_batch_size=micro_batch_size, packed=packed)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise MMSPRuntimeError("initialize_mmsp needs Megatron's parallel state: call "
                               "parallel_state.initialize_model_parallel(...) first")
    if ps.get_context_parallel_world_size() != mmsp.cp_size:
        raise MMSPConfigError(f"parallel_state has context-parallel size {ps.get_context_parallel_world_size()} but "
                              f"the config says {mmsp.cp_size}: pass the same --context-parallel-size to both")
    host = None
    if mmsp.cp_size == 1:
        mesh = single_rank_mesh()
    else:
        mesh = build_mmsp_mesh(mmsp.ulysses_size, mmsp.ring_size, ps.get_context_parallel_group(),
                               ring_first=mmsp.ring_first)
        host = host_group_of(mesh.cp_group)
    setattr(config, _STATE_ATTR, MMSPState(mesh=mesh, config=mmsp, host_cp_group=host))
    return mesh


def mmsp_state(config) -> Optional[MMSPState]:
    """What initialize_mmsp attached to `config`, or None."""
    return getattr(config, _STATE_ATTR, None) if config is not None else None


def get_mmsp_mesh(config) -> MMSPMesh:
    """The mesh initialize_mmsp attached to `config`; MMSPRuntimeError when it was not called."""
    state = mmsp_state(config)
    if state is None:
        raise MMSPRuntimeError("MM-SP is not initialized for this model: call megatron_longvila.parallel.state."
                               "initialize_mmsp(model.config) after initialize_model_parallel")
    return state.mesh


def get_mmsp_config(config) -> MMSPConfig:
    """The validated MM-SP settings initialize_mmsp attached to `config`."""
    get_mmsp_mesh(config)
    return mmsp_state(config).config


def reset_mmsp(config=None) -> None:
    """Detach the MM-SP state from `config` (tests that reuse a config)."""
    if config is not None and hasattr(config, _STATE_ATTR):
        delattr(config, _STATE_ATTR)
