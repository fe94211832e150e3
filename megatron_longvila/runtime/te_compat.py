"""Transformer Engine's fused-attention entry points across TE 2.x: keyword probing, fenced.

`fused_attn_fwd` / `fused_attn_bwd` (transformer_engine.pytorch.cpp_extensions.fused_attn) gained keywords over
2.x (`o_format`, `do_format`, `dqkv_layout` and `qkv_scale_inv_format` since 2.16, `softmax_type` since 2.8) and
lost `dqkv_dtype`. The attention backend passes every keyword it means; `te_kwargs` keeps those the installed
TE takes and drops the others only where the value dropped is what that TE does implicitly anyway (e.g.
`o_format="thd"` for a thd layout). Dropping any other value would silently run a different computation: that
is an error naming the keyword. Verified against TE v2.9-v2.18 by reading their signatures
(`versions.WORKAROUNDS["te_signature_probe"]`); not yet run on a GPU by this project.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable

from ..errors import TEKeywordError
from .versions import applying

__all__ = ["te_kwargs", "implied_defaults", "TEKeywordError"]


def implied_defaults(kw: Dict[str, Any], te_dtype_of=None) -> Dict[str, Any]:
    """What a TE without these keywords does implicitly, for the call described by `kw`."""
    layout = kw.get("qkv_layout", "")
    fmt = layout.split("_")[0] if layout else None
    mask = kw.get("attn_mask_type", "")
    implied: Dict[str, Any] = {
        "o_format": fmt, "do_format": fmt, "dqkv_layout": layout, "softmax_type": "vanilla",
        "deterministic": False, "fast_zero_fill": True, "qkv_scale_inv_format": None,
        "window_size": (-1, 0) if "causal" in mask else (-1, -1),
    }
    if te_dtype_of is not None and "fake_dtype" in kw:
        implied["dqkv_dtype"] = te_dtype_of(kw["fake_dtype"])  # newer TE: gradients in the inputs' dtype
    return implied


def te_kwargs(fn_name: str, accepted: Iterable[str], kw: Dict[str, Any], implied: Dict[str, Any],
              version: str) -> Dict[str, Any]:
    """The keywords of `kw` the installed TE accepts; raise TEKeywordError for a dropped non-default value."""
    applying("te_signature_probe", version)
    accepted = set(accepted)
    out, bad = {}, []
    for name, value in kw.items():
        if name in accepted:
            out[name] = value
        elif name not in implied or implied[name] != value:
            bad.append(f"{name}={value!r}")
    if bad:
        raise TEKeywordError(f"transformer_engine {version}: {fn_name} takes no {', '.join(bad)}, and without it TE "
                             f"would compute something else; use TE 2.9-2.18 or the 'torch_cuda' attention backend")
    return out
