"""MM-SP inside Megatron: its groups are Megatron's own, its state belongs to a model, compatibility code is fenced.

- With Megatron initialized with hierarchical CP sizes [U, R], the mesh's Ulysses and ring groups *are* Megatron's
  hierarchical CP groups (no new communicator); only the ring-first layout builds groups of its own.
- The MM-SP settings live on the model's TransformerConfig: a model built before initialize_mmsp runs the kernel
  initialize_mmsp then sets, and two models with their own settings do not share them.
- Workarounds warn once when applied to a dependency version they were not verified on; a Transformer Engine
  keyword missing from the installed TE is dropped only when its value is what that TE does anyway.
"""

import warnings

import pytest
import torch
import torch.distributed as dist

from megatron_longvila.parallel.launch import run_distributed


def _groups(rank, world):
    from megatron.core import parallel_state as ps

    from megatron_longvila.parallel import mesh as mesh_mod
    from megatron_longvila.parallel.mesh import build_mmsp_mesh
    from tests.models._longvila_cases import setup_megatron

    setup_megatron(cp=4, hier=[2, 2])
    created = []
    real_new_group = dist.new_group

    def counting_new_group(*a, **k):
        created.append(a[0] if a else k.get("ranks"))
        return real_new_group(*a, **k)

    dist.new_group = counting_new_group
    try:
        mesh = build_mmsp_mesh(2, 2)  # cp_group=None: Megatron's CP group
        hier = ps.get_hierarchical_context_parallel_groups()
        same = mesh.ulysses_group is hier[0] and mesh.ring_group is hier[1]
        megatron_created = list(created)
        ring_first = build_mmsp_mesh(2, 2, ring_first=True)
    finally:
        dist.new_group = real_new_group
    ring_ranks = dist.get_process_group_ranks(ring_first.ring_group)
    return {"same": same, "new_for_megatron": megatron_created, "new_for_ring_first": len(created),
            "ulysses": dist.get_process_group_ranks(mesh.ulysses_group),
            "ring": dist.get_process_group_ranks(mesh.ring_group), "ring_first_ring": ring_ranks,
            "coords": (mesh.ring_rank, mesh.ulysses_rank), "cached": len(mesh_mod._CACHE)}


def test_mesh_uses_megatrons_hierarchical_groups():
    out = run_distributed(_groups, 4)
    for rank, r in enumerate(out):
        assert r["same"] and r["new_for_megatron"] == [], r
        assert r["ulysses"] == [2 * (rank // 2), 2 * (rank // 2) + 1]  # consecutive: inside a node
        assert r["ring"] == [rank % 2, rank % 2 + 2]
        assert r["coords"] == (rank // 2, rank % 2)
        assert r["new_for_ring_first"] > 0 and r["ring_first_ring"] == [2 * (rank // 2), 2 * (rank // 2) + 1]


def _state(rank, world):
    from megatron_longvila.attention.megatron_core import MMSPCoreAttention
    from megatron_longvila.parallel.state import get_mmsp_config, initialize_mmsp
    from megatron_longvila.config import MMSPConfig, mmsp_config_from_megatron
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from tests.models._longvila_cases import build, micro_batch, setup_megatron

    setup_megatron()
    a = build()  # built before initialize_mmsp
    b = build()
    cores = lambda m: [x for x in m.modules() if isinstance(x, MMSPCoreAttention)]  # noqa: E731
    before = {x.backend for x in cores(a)}
    initialize_mmsp(a.config, MMSPConfig(**{**mmsp_config_from_megatron(a.config).__dict__,
                                           "attention_backend": "math"}))
    initialize_mmsp(b.config)
    loss = a(micro_batch("seven"), single_rank_mesh())
    return {"before": sorted(before), "a": sorted({x.backend for x in cores(a)}),
            "b": sorted({x.backend for x in cores(b)}), "cfg_a": get_mmsp_config(a.config).attention_backend,
            "finite": bool(torch.isfinite(loss))}


def test_mmsp_state_belongs_to_each_model():
    out = run_distributed(_state, 1)[0]
    assert out["before"] == ["auto"]
    assert out["a"] == ["math"] and out["cfg_a"] == "math"  # set after the model was built, and honoured
    assert out["b"] == ["auto"]  # the second model keeps its own
    assert out["finite"]


def test_workaround_fence_warns_once_on_unverified_versions():
    from megatron_longvila.runtime import versions

    versions._WARNED.discard("cpu_runtime")
    assert versions.applying("cpu_runtime", "0.16.1") is True
    with pytest.warns(versions.UnverifiedVersionWarning, match="verified on megatron.core 0.16.1, not on the "
                                                                "installed 0.17.0"):
        assert versions.applying("cpu_runtime", "0.17.0") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert versions.applying("cpu_runtime", "0.17.0") is False  # once per process
    assert versions.applying("cpu_runtime_torch", "2.13.0+cpu") is True


def test_te_keyword_dropped_only_when_it_means_the_default():
    from megatron_longvila.errors import TEKeywordError
    from megatron_longvila.runtime.te_compat import implied_defaults, te_kwargs

    kw = {"q": 1, "qkv_layout": "thd_thd_thd", "o_format": "thd", "attn_mask_type": "padding_causal",
          "window_size": (-1, 0)}
    accepted = {"q", "qkv_layout", "attn_mask_type"}  # an older TE: no o_format, no window_size
    assert te_kwargs("fused_attn_fwd", accepted, kw, implied_defaults(kw), "2.9") == {
        "q": 1, "qkv_layout": "thd_thd_thd", "attn_mask_type": "padding_causal"}
    bad = dict(kw, o_format="bshd")  # a thd layout with a bshd output: an older TE cannot do that
    with pytest.raises(TEKeywordError, match="o_format='bshd'"):
        te_kwargs("fused_attn_fwd", accepted, bad, implied_defaults(bad), "2.9")
    with pytest.raises(TEKeywordError, match="s_quantizer"):  # no implied value at all (FP8 needs it)
        te_kwargs("fused_attn_fwd", accepted, dict(kw, s_quantizer=object()), implied_defaults(kw), "2.9")
