"""CUDA kernel: Transformer Engine fused attention (cuDNN), varlen "thd", with an optional FP8 forward.

It calls TE's low-level `fused_attn_fwd` / `fused_attn_bwd` (transformer_engine.pytorch.cpp_extensions)
directly rather than DotProductAttention, because the ring needs the log-sum-exp of every block and a
backward that consumes the *merged* out and lse. Written against TE v2.9 through v2.18 and main
(2.20.0.dev0); TE 1.x (a different argument list) is refused with BackendUnavailable.

How the interface maps onto TE:
- q/k/v [T, H, D] are TE's "thd_thd_thd" layout; our segments are TE's cu_seqlens (int32, on device),
  also passed as the "padded" offsets because the segments are packed back to back.
- causal segments use "padding_causal" (equal q/k lengths, so top-left alignment is the right one),
  others "padding". GQA is native: K/V keep their own head count.
- TE returns the softmax statistics (natural-log log-sum-exp of the scaled scores, fp32) as the first
  aux tensor, either packed [T, H, 1] (cuDNN >= 9.6, not sm120) or padded [B, H, max_seqlen_q, 1].
  We convert to lse [H, T]; for the backward we rebuild that tensor from the merged lse, so every
  block's gradient is exact, and pass a zero rng_state (dropout is always 0).

FP8 (TEConfig.fp8, registered as backend "te_fp8"): cuDNN's FP8 attention has no "thd" support in
any TE release, so each block is padded to "bshd" [B, max_len, H, D] with a padding mask, q/k/v are
quantized to E4M3 with per-tensor current scaling *per block call*, the softmax probabilities use a
fixed E4M3 scale (they are <= 1), and O comes back in q's dtype. The lse is fp32 from the kernel. The
backward is the fp16/bf16 fused kernel on the high-precision inputs with the merged lse (what TE does
with NVTE_FP8_DPA_BWD=0), i.e. gradients of unquantized attention around an FP8 forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from ...runtime.device import host_to_device
from ...runtime.te_compat import implied_defaults, te_kwargs
from .base import acc_dtype, AttentionBackend
from ...errors import BackendUnavailable
from ...plan.segments import SegmentCoords, Segments

# ---------------------------------------------------------------------------------------------------
# Pure helpers (torch only, any device): segment packing and softmax-statistics layouts.
# ---------------------------------------------------------------------------------------------------


class PackedSegments(NamedTuple):
    """Non-empty segments laid out back to back, as TE's cu_seqlens need."""

    cu_q: List[int]
    cu_k: List[int]
    q_index: Optional[torch.Tensor]
    """Rows of q taking part, or None when they are q[:cu_q[-1]] in order."""
    k_index: Optional[torch.Tensor]
    """Rows of k/v taking part, or None when they are k[:cu_k[-1]] in order."""


def pack_segments(cu_q: List[int], cu_k: List[int]) -> PackedSegments:
    """Drop segments with an empty side (TE has no defined result for a zero-length key set); rows
    of dropped segments keep out = 0 and lse = -inf. A gather is needed only if a dropped segment
    still owns rows on the other side."""
    kq, kk, qi, ki = [0], [0], [], []
    for qa, qb, ka, kb in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
        if qb > qa and kb > ka:
            kq.append(kq[-1] + qb - qa)
            kk.append(kk[-1] + kb - ka)
            qi.append((qa, qb))
            ki.append((ka, kb))
    # Kept rows are x[:n] in order exactly when every kept segment starts at its packed offset.
    need_q = any(a != o for (a, _), o in zip(qi, kq))
    need_k = any(a != o for (a, _), o in zip(ki, kk))

    def index(ranges):
        return torch.cat([torch.arange(a, b) for a, b in ranges]) if ranges else torch.zeros(0, dtype=torch.long)

    return PackedSegments(kq, kk, index(qi) if need_q else None, index(ki) if need_k else None)


# Padded layouts take each token's (segment, position) coordinates, planned on the host with the micro-batch
# (plan.segments.token_coords / Segments.device_coords): computing them from a device cu_seqlens would need its total
# on the host, a synchronization in every FP8 block.

def thd_to_bshd(x: torch.Tensor, coords: Tuple[torch.Tensor, torch.Tensor], segments: int,
                max_len: int) -> torch.Tensor:
    """[T, H, D] packed -> [segments, max_len, H, D], zero padded."""
    b, pos = coords
    out = x.new_zeros((segments, max_len) + tuple(x.shape[1:]))
    out[b, pos] = x
    return out


def bshd_to_thd(x: torch.Tensor, coords: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[B, S, H, D] padded -> [T, H, D] packed."""
    b, pos = coords
    return x[b, pos]


def stats_to_lse(stats: torch.Tensor, coords: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """TE softmax statistics -> lse [H, T] fp32. Accepts packed [T, H, 1] or padded [B, H, S, 1]."""
    if stats.dim() == 3:
        return stats[..., 0].transpose(0, 1).float()
    if stats.dim() == 4:
        b, pos = coords
        return stats[b, :, pos, 0].transpose(0, 1).float()
    raise ValueError(f"unexpected softmax statistics shape {tuple(stats.shape)}")


def lse_to_stats(lse: torch.Tensor, coords: Tuple[torch.Tensor, torch.Tensor], segments: int, max_len: int,
                 packed: bool) -> torch.Tensor:
    """lse [H, T] -> TE softmax statistics fp32, packed [T, H, 1] or padded [B, H, max_len, 1]."""
    lse = lse.float()
    if packed:
        return lse.transpose(0, 1).unsqueeze(-1).contiguous()
    b, pos = coords
    stats = lse.new_zeros(segments, lse.shape[0], max_len, 1)  # padding rows are never read
    stats[b, :, pos, 0] = lse.transpose(0, 1)
    return stats


# ---------------------------------------------------------------------------------------------------
# Transformer Engine binding (imported lazily so the helpers above work without TE).
# ---------------------------------------------------------------------------------------------------

_SUPPORTED = "Transformer Engine 2.x (written against v2.9-v2.18 and main)"
_E4M3_MAX = 448.0


class _TE:
    """The TE entry points this backend uses, resolved once."""

    def __init__(self):
        try:
            import transformer_engine
            import transformer_engine_torch as tex
            from transformer_engine.pytorch.cpp_extensions import fused_attn as fa
            from transformer_engine.pytorch.constants import TE_DType
        except Exception as e:  # missing package, missing cuDNN or an ABI mismatch
            raise BackendUnavailable(f"backend 'te' could not import transformer_engine ({e}); "
                                     "use 'torch_cuda' or 'auto'") from e
        self.version = getattr(transformer_engine, "__version__", "unknown")
        self.tex, self.fa, self.TE_DType = tex, fa, TE_DType
        self.fwd_params = set(inspect.signature(fa.fused_attn_fwd).parameters)
        self.bwd_params = set(inspect.signature(fa.fused_attn_bwd).parameters)
        # TE 1.x took qkv_dtype and raw d_scale/amax tensors instead of fake_dtype and quantizers.
        if "fake_dtype" not in self.fwd_params or "aux_ctx_tensors" not in self.bwd_params:
            raise BackendUnavailable(f"backend 'te' supports {_SUPPORTED}; found transformer_engine "
                                     f"{self.version} with the 1.x fused_attn API; use 'torch_cuda'")
        B = tex.NVTE_Fused_Attn_Backend
        self.NO_BACKEND, self.F16, self.FP8 = (int(B.NVTE_No_Backend), int(B.NVTE_F16_arbitrary_seqlen),
                                              int(B.NVTE_FP8))
        self._packed_stats = {}

    def version_tuple(self) -> Tuple[int, int]:
        try:
            major, minor = self.version.split(".")[:2]
            return int(major), int(minor)
        except ValueError:
            return (0, 0)

    def call_fwd(self, **kw):
        # The 2.x keyword differences (o_format since 2.16, softmax_type since 2.8, ...) are absorbed by
        # runtime.te_compat, which refuses to drop a keyword whose value the installed TE would not imply.
        implied = implied_defaults(kw, lambda dt: self.TE_DType[dt])
        return self.fa.fused_attn_fwd(**te_kwargs("fused_attn_fwd", self.fwd_params, kw, implied, self.version))

    def call_bwd(self, **kw):
        # dqkv_dtype exists before 2.16; o_format/do_format/dqkv_layout after.
        implied = implied_defaults(kw, lambda dt: self.TE_DType[dt])
        return self.fa.fused_attn_bwd(**te_kwargs("fused_attn_bwd", self.bwd_params, kw, implied, self.version))

    def select(self, te_dtype, layout: str, mask: str, h: int, hkv: int, sq: int, skv: int, d: int,
               window: Tuple[int, int], deterministic: bool):
        """tex.get_fused_attn_backend, whose positional argument list grew over 2.x. Returns the pybind
        enum itself: before 2.18 fused_attn_fwd compares it with pybind enums, which reject plain ints."""
        fa, tex = self.fa, self.tex
        head = [te_dtype, te_dtype, fa.QKVLayout[layout], fa.AttnBiasType["no_bias"], fa.AttnMaskType[mask]]
        tail = [0.0, h, hkv, sq, skv, d, d, window[0], window[1]]
        variants = [head + tail]  # 2.0-2.7
        if hasattr(fa, "SoftmaxType"):
            with_sm = [True] + head + [fa.SoftmaxType["vanilla"]] + tail
            # 2.12+ (return_max_logit, cuda_graph, deterministic), 2.9-2.11 (return_max_logit), 2.8
            variants = [with_sm + [False, False, deterministic], with_sm + [False], with_sm] + variants
        last = None
        for args in variants:
            try:
                return tex.get_fused_attn_backend(*args)
            except TypeError as e:  # pybind rejects a wrong argument count with TypeError
                last = e
        raise BackendUnavailable(f"backend 'te': tex.get_fused_attn_backend has an unknown signature in "
                                 f"transformer_engine {self.version} ({last}); supported: {_SUPPORTED}")

    def stats_packed(self, device: torch.device) -> bool:
        """Whether thd softmax statistics are [T, H, 1] (else [B, H, S, 1]); TE's own rule."""
        key = device.index if device.index is not None else torch.cuda.current_device()
        if key not in self._packed_stats:
            try:
                from transformer_engine.pytorch.utils import get_cudnn_version
                cudnn = tuple(get_cudnn_version())
            except Exception:
                v = torch.backends.cudnn.version() or 0
                cudnn = (v // 10000, v // 100 % 100, v % 100) if v >= 10000 else (v // 1000, v // 100 % 10, v % 100)
            self._packed_stats[key] = cudnn >= (9, 6, 0) and torch.cuda.get_device_capability(key) != (12, 0)
        return self._packed_stats[key]

    def observe_stats(self, device: torch.device, stats: torch.Tensor) -> None:
        # The forward's actual shape is the ground truth for the backward on the same device.
        key = device.index if device.index is not None else torch.cuda.current_device()
        self._packed_stats[key] = stats.dim() == 3


_TE_SINGLETON: Optional[_TE] = None


def _te() -> _TE:
    global _TE_SINGLETON
    if _TE_SINGLETON is None:
        _TE_SINGLETON = _TE()
    return _TE_SINGLETON


# ---------------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------------


@dataclass
class TEConfig:
    """Options of the Transformer Engine backend."""

    fp8: bool = False
    """Run the forward with FP8 (E4M3) q/k/v and probabilities; output and lse stay high precision."""
    fp8_s_scale: float = _E4M3_MAX
    """Fixed FP8 scale of the softmax probabilities; they are <= 1, so the E4M3 maximum uses the full
    range (TE's delayed scaling converges to the same value after one step)."""
    deterministic: bool = False
    """Ask cuDNN for a deterministic backward (may select a slower kernel or none)."""


class TEBackend(AttentionBackend):
    name = "te"

    def __init__(self, config: Optional[TEConfig] = None, *, fp8: Optional[bool] = None):
        self.config = config or TEConfig()
        if fp8 is not None:
            self.config = TEConfig(fp8=fp8, fp8_s_scale=self.config.fp8_s_scale,
                                   deterministic=self.config.deterministic)
        self.name = "te_fp8" if self.config.fp8 else "te"
        self.te = _te()
        if self.config.fp8 and self.te.version_tuple() < (2, 9):
            raise BackendUnavailable(f"backend 'te_fp8' needs transformer_engine >= 2.9 (current-scaling FP8 "
                                     f"attention), found {self.te.version}; use backend 'te'")
        self._sel = {}

    # -- checks and selection --------------------------------------------------------------------

    def _check(self, q, k, v):
        if q.device.type != "cuda":
            raise BackendUnavailable(f"backend '{self.name}' needs CUDA tensors, got {q.device}; use 'cpu' or 'auto'")
        if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
            raise BackendUnavailable(f"backend '{self.name}' needs fp16/bf16 q/k/v of one dtype, got "
                                     f"{q.dtype}/{k.dtype}/{v.dtype}; use backend='math' for fp32/fp64")
        d = q.shape[-1]
        if d % 8 or d > 256 or k.shape[-1] != d or v.shape[-1] != d:
            raise BackendUnavailable(f"backend '{self.name}': TE fused attention needs one head dim, a multiple "
                                     f"of 8 and <= 256 (<= 128 outside sm90), got q/k/v {q.shape[-1]}/"
                                     f"{k.shape[-1]}/{v.shape[-1]}; use 'torch_cuda' or 'math'")
        if q.shape[1] % k.shape[1]:
            raise BackendUnavailable(f"query heads {q.shape[1]} are not a multiple of KV heads {k.shape[1]}")

    @staticmethod
    def _mask(causal: bool) -> Tuple[str, Tuple[int, int]]:
        return ("padding_causal", (-1, 0)) if causal else ("padding", (-1, -1))

    def _backend(self, fp8: bool, q, k, layout: str, causal: bool, sq: int, skv: int):
        te = self.te
        mask, window = self._mask(causal)
        te_dtype = te.tex.DType.kFloat8E4M3 if fp8 else te.TE_DType[q.dtype]
        key = (fp8, q.dtype, layout, mask, q.shape[1], k.shape[1], sq, skv, q.shape[-1], q.device.index)
        if key not in self._sel:
            self._sel[key] = te.select(te_dtype, layout, mask, q.shape[1], k.shape[1], sq, skv, q.shape[-1],
                                       window, self.config.deterministic)
        got = self._sel[key]
        want = te.FP8 if fp8 else te.F16
        if int(got) != want:
            what = "FP8" if fp8 else "fp16/bf16 arbitrary-seqlen"
            cc = torch.cuda.get_device_capability(q.device)
            raise BackendUnavailable(
                f"backend '{self.name}': Transformer Engine {te.version} offers no {what} fused attention for "
                f"layout={layout} mask={mask} heads={q.shape[1]}/{k.shape[1]} head_dim={q.shape[-1]} "
                f"max_seqlen={sq}/{skv} {q.dtype} on sm{cc[0]}{cc[1]} (got sub-backend {int(got)}). TE's limits: thd "
                "needs sm90+ and cuDNN 9.1+ (9.6+ for GQA); FP8 training-mode attention needs sm90+, cuDNN 9.7+ "
                "and head_dim 128 on sm90; use backend 'te' / 'torch_cuda'")
        return got

    # -- segment plumbing -------------------------------------------------------------------------

    @staticmethod
    def _cu(seg: Segments, p: PackedSegments, device):
        if p.cu_q == list(seg.cu_q) and p.cu_k == list(seg.cu_k):
            return seg.device_tensors(device)  # cached on the segments, the common case
        return (host_to_device(torch.tensor(p.cu_q, dtype=torch.int32), device),
                host_to_device(torch.tensor(p.cu_k, dtype=torch.int32), device))

    @staticmethod
    def _coords(seg: Segments, p: PackedSegments, device) -> SegmentCoords:
        if p.cu_q == list(seg.cu_q) and p.cu_k == list(seg.cu_k):
            return seg.device_coords(device)  # moved with the micro-batch under FP8 attention
        return SegmentCoords.of(p.cu_q, p.cu_k, device)

    @staticmethod
    def _rows(x, index, n):
        return (x[:n] if index is None else x.index_select(0, host_to_device(index, x.device))).contiguous()

    @staticmethod
    def _max(cu: List[int]) -> int:
        return max(b - a for a, b in zip(cu, cu[1:]))

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, q, k, v, seg: Segments, scale: float):
        self._check(q, k, v)
        out = q.new_zeros(q.shape)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
        p = pack_segments(list(seg.cu_q), list(seg.cu_k))
        if len(p.cu_q) <= 1:
            return out, lse
        cu_q, cu_k = self._cu(seg, p, q.device)
        qq = self._rows(q, p.q_index, p.cu_q[-1])
        kk = self._rows(k, p.k_index, p.cu_k[-1])
        vv = self._rows(v, p.k_index, p.cu_k[-1])
        sq, skv = self._max(p.cu_q), self._max(p.cu_k)
        co = lambda: self._coords(seg, p, q.device)  # noqa: E731  (the padded layouts only)
        if self.config.fp8:
            o, l = self._forward_fp8(qq, kk, vv, cu_q, cu_k, sq, skv, seg.causal, scale, co())
        else:
            o, l = self._forward_f16(qq, kk, vv, cu_q, cu_k, sq, skv, seg.causal, scale, co)
        if p.q_index is None:
            out[: p.cu_q[-1]] = o
            lse[:, : p.cu_q[-1]] = l
        else:
            idx = host_to_device(p.q_index, q.device)
            out.index_copy_(0, idx, o.to(out.dtype))
            lse.index_copy_(1, idx, l)
        return out, lse

    def _common(self, causal, scale, cu_q, cu_k, sq, skv):
        mask, window = self._mask(causal)
        return dict(max_seqlen_q=sq, max_seqlen_kv=skv, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k,
                    cu_seqlens_q_padded=cu_q, cu_seqlens_kv_padded=cu_k, attn_scale=scale, dropout=0.0,
                    fast_zero_fill=True, attn_bias_type="no_bias", attn_mask_type=mask, window_size=window)

    def _forward_f16(self, q, k, v, cu_q, cu_k, sq, skv, causal, scale, coords):
        te = self.te
        backend = self._backend(False, q, k, "thd_thd_thd", causal, sq, skv)
        res = te.call_fwd(is_training=True, q=q, k=k, v=v, fake_dtype=q.dtype, fused_attention_backend=backend,
                          qkv_layout="thd_thd_thd", o_format="thd", **self._common(causal, scale, cu_q, cu_k, sq, skv))
        o, aux = res[0], res[1]
        te.observe_stats(q.device, aux[0])
        return o, stats_to_lse(aux[0], coords().q if aux[0].dim() == 4 else None)

    def _forward_fp8(self, q, k, v, cu_q, cu_k, sq, skv, causal, scale, coords: SegmentCoords):
        te = self.te
        from transformer_engine.pytorch.tensor.float8_tensor import Float8CurrentScalingQuantizer, Float8Quantizer

        backend = self._backend(True, q, k, "bshd_bshd_bshd", causal, sq, skv)
        e4m3 = te.tex.DType.kFloat8E4M3
        dev = q.device
        # Separate current-scaling quantizers: q, k and v each get their own amax-derived scale per call.
        cs = lambda: Float8CurrentScalingQuantizer(e4m3, dev, rowwise=True, columnwise=False)  # noqa: E731
        nseg = cu_q.numel() - 1
        qf, kf, vf = (cs()(thd_to_bshd(x, c, nseg, n))
                      for x, c, n in ((q, coords.q, sq), (k, coords.k, skv), (v, coords.k, skv)))
        s_quant = Float8Quantizer(torch.full((1,), self.config.fp8_s_scale, dtype=torch.float32, device=dev),
                                  torch.zeros(1, dtype=torch.float32, device=dev), e4m3,
                                  rowwise=True, columnwise=False)
        res = te.call_fwd(is_training=True, q=qf, k=kf, v=vf, fake_dtype=q.dtype, fused_attention_backend=backend,
                          s_quantizer=s_quant, o_quantizer=cs(), qkv_layout="bshd_bshd_bshd", o_format="bshd",
                          **self._common(causal, scale, cu_q, cu_k, sq, skv))
        o, aux = res[0], res[1]
        if hasattr(o, "dequantize"):  # a current-scaling O comes back unquantized; be safe otherwise
            o = o.dequantize(dtype=q.dtype)
        # aux[0] is cuDNN's stats ([B, H, S, 1]); 2.9-2.15 also return an unused ZInv before rng_state.
        return bshd_to_thd(o, coords.q).to(q.dtype), stats_to_lse(aux[0], coords.q)

    # -- backward ---------------------------------------------------------------------------------

    def backward(self, dout, q, k, v, out, lse, seg: Segments, scale: float):
        self._check(q, k, v)
        te = self.te
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        p = pack_segments(list(seg.cu_q), list(seg.cu_k))
        if len(p.cu_q) <= 1:
            return dq, dk, dv
        cu_q, cu_k = self._cu(seg, p, q.device)
        nq, nk = p.cu_q[-1], p.cu_k[-1]
        qq, kk, vv = self._rows(q, p.q_index, nq), self._rows(k, p.k_index, nk), self._rows(v, p.k_index, nk)
        oo = self._rows(out.to(q.dtype), p.q_index, nq)
        do = self._rows(dout.to(q.dtype), p.q_index, nq)
        ll = lse[:, :nq] if p.q_index is None else lse.index_select(1, host_to_device(p.q_index, lse.device))
        sq, skv = self._max(p.cu_q), self._max(p.cu_k)
        backend = self._backend(False, qq, kk, "thd_thd_thd", seg.causal, sq, skv)
        packed = te.stats_packed(q.device)
        stats = lse_to_stats(ll, None if packed else self._coords(seg, p, q.device).q, len(p.cu_q) - 1, sq, packed)
        rng_state = torch.zeros(2, dtype=torch.int64, device=q.device)  # unused: dropout is 0
        g = te.call_bwd(q=qq, k=kk, v=vv, o=oo, d_o=do, fake_dtype=q.dtype, dqkv_dtype=te.TE_DType[q.dtype],
                        aux_ctx_tensors=[stats, rng_state], fused_attention_backend=backend,
                        qkv_layout="thd_thd_thd", o_format="thd", do_format="thd", dqkv_layout="thd_thd_thd",
                        deterministic=self.config.deterministic,
                        **self._common(seg.causal, scale, cu_q, cu_k, sq, skv))
        gq, gk, gv = g[0], g[1], g[2]
        for full, part, index, n in ((dq, gq, p.q_index, nq), (dk, gk, p.k_index, nk), (dv, gv, p.k_index, nk)):
            if index is None:
                full[:n] = part
            else:
                full.index_copy_(0, host_to_device(index, full.device), part.to(full.dtype))
        return dq, dk, dv
