"""The training step: device discipline and exact fractional loss weights through Megatron's schedules.

1. Device discipline. (a) One rank, the model's parameters on PyTorch's `meta` device: a planned micro-batch
   moved to `meta` runs the forward, the step's loss function and the backward while a dispatch-mode check
   records every aten op that meets a tensor on another device (CPU scalars excepted, as PyTorch allows them);
   `.item()`, `.tolist()` or `nonzero` inside the model would raise on meta, so the same run also proves there
   is no host synchronization in the model's forward and backward. (b) Four ranks in a 2x2 mesh, model on
   `meta`: every tensor handed to torch.distributed while the model runs (Ulysses all-to-all, ring P2P, stage-2
   routing, gathers) is recorded and must be on the model's device; the collectives are skipped for meta
   tensors, which have no data. The planning collectives before the step (decode failures, step totals) are host
   collectives on gloo groups by design, and are checked to be so.
2. Fractional loss weights. Per-sample weights (0.3, 1.7, 0.05, ...) through Megatron's no-pipelining schedule,
   DDP's reduction and finalize_model_grads with calculate_per_token_loss: at CP 2x2 x DP 2 and at TP 2 x CP 1x2
   x DP 2 (two micro-batches per replica), every gradient equals the single-process gradient of
   sum(weight x CE) / sum(weight) over all micro-batches, and the logged loss equals that mean. fp32, 1e-5
   relative (max abs error / max abs reference, per parameter).
"""

import torch
import torch.distributed as dist

from megatron_longvila.parallel.launch import run_distributed

RTOL = 1e-5


# ---------------------------------------------------------------------------------------------------------
# Device checks
# ---------------------------------------------------------------------------------------------------------

def _device_check_mode(device):
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class DeviceCheck(TorchDispatchMode):
        """Records aten ops whose tensor arguments are not all on `device` (0-dim CPU scalars allowed)."""

        def __init__(self):
            super().__init__()
            self.device = torch.device(device)
            self.bad = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            flat, _ = tree_flatten((args, kwargs or {}))
            devs = {t.device for t in flat if isinstance(t, torch.Tensor)
                    and not (t.dim() == 0 and t.device.type == "cpu")}
            if any(d != self.device for d in devs):
                self.bad.append((str(func), sorted(str(d) for d in devs)))
            return func(*args, **(kwargs or {}))

    return DeviceCheck()


def _meta_one_rank(rank, world):
    from tests.models._longvila_cases import build, micro_batch, setup_megatron

    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.training.step import LongVILAStep

    setup_megatron()
    model = build().to("meta")
    out = {}
    for case in ("seven", "three"):
        planned = plan_microbatch(model.visual_spec, micro_batch(case), single_rank_mesh()).to("meta", torch.float32)
        planned.step_scale = 1.0
        mode = _device_check_mode("meta")
        with mode:
            output = model(planned, reduction="none")
            loss, count, report = LongVILAStep.loss_func(planned, output)
            loss.backward()
        out[case] = {"bad": mode.bad[:5], "n_bad": len(mode.bad), "loss_device": str(loss.device),
                     "count_device": str(count.device), "report_device": str(report["lm loss"].device),
                     "grads_on_meta": all(p.grad is None or p.grad.device.type == "meta" for p in model.parameters())}
    return out


def test_one_rank_step_on_meta_touches_no_host_tensor():
    out = run_distributed(_meta_one_rank, 1)[0]
    for case, r in out.items():
        assert r["n_bad"] == 0, (case, r["bad"])
        assert r["loss_device"] == r["count_device"] == r["report_device"] == "meta", r
        assert r["grads_on_meta"]


class _Recorder:
    """Replaces torch.distributed's collectives: records each tensor's device; skips the communication for meta
    tensors (no data), runs it for real otherwise."""

    NAMES = ("all_to_all_single", "all_reduce", "broadcast", "all_gather_into_tensor", "all_gather_single",
             "reduce_scatter_tensor", "batch_isend_irecv", "send", "recv")  # isend/irecv: inside P2POps

    def __init__(self):
        self.seen = []
        self._orig = {}

    def __enter__(self):
        from megatron_longvila.parallel import comm

        for name in self.NAMES:
            if hasattr(dist, name):
                self._orig[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._orig[name]))
        self._orig_gather = comm._all_gather_single
        comm._all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        return self

    def __exit__(self, *exc):
        from megatron_longvila.parallel import comm

        for name, fn in self._orig.items():
            setattr(dist, name, fn)
        comm._all_gather_single = self._orig_gather

    def _wrap(self, name, fn):
        def call(*args, **kwargs):
            tensors = []
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor):
                    tensors.append(a)
                elif isinstance(a, (list, tuple)):
                    for x in a:
                        t = getattr(x, "tensor", x)  # P2POp
                        if isinstance(t, torch.Tensor):
                            tensors.append(t)
            self.seen.append((name, sorted({str(t.device) for t in tensors})))
            if tensors and all(t.is_meta for t in tensors):
                if name == "batch_isend_irecv":
                    return [_Done() for _ in args[0]]
                return _Done() if kwargs.get("async_op") else None
            return fn(*args, **kwargs)

        return call


class _Done:
    def wait(self):
        return True


def _meta_mesh(rank, world):
    from tests.models._longvila_cases import build, micro_batch, setup_megatron

    from megatron_longvila.parallel.state import initialize_mmsp, mmsp_state
    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.training.step import LongVILAStep, StepConfig

    setup_megatron(cp=4, hier=[2, 2])
    model = build(1, 4, [2, 2], calculate_per_token_loss=True)
    mesh = initialize_mmsp(model.config, packed=True)
    state = mmsp_state(model.config)
    model = model.to("meta")
    step = LongVILAStep(StepConfig(seq_length=512), model)
    planned = [plan_microbatch(model.visual_spec, micro_batch(c), mesh) for c in ("seven", "three")]
    # Planning collectives: host tensors on host groups (real gloo communication), before the model runs.
    step.finish_step([p.to("meta", torch.float32) for p in planned])
    from megatron.core import parallel_state as ps

    host_groups_gloo = dist.get_backend(ps.get_data_parallel_group_gloo(with_context_parallel=True)) == "gloo" \
        and dist.get_backend(state.host_cp_group) == "gloo"
    seen = {}
    for case, p in zip(("seven", "three"), planned):
        with _Recorder() as rec:
            output = model(p, reduction="none")
            loss, _, _ = step.loss_func(p, output)
            loss.backward()
        seen[case] = rec.seen
    return {"seen": seen, "host_groups_gloo": host_groups_gloo, "scale": planned[0].step_scale}


def test_four_rank_step_hands_only_device_tensors_to_collectives():
    results = run_distributed(_meta_mesh, 4, timeout=120)
    for r in results:
        assert r["host_groups_gloo"]
        assert r["scale"] == 1.0  # unit weights: the step's count equals its weight
        for case, seen in r["seen"].items():
            kinds = {name for name, _ in seen}
            # Ulysses (all-to-all), ring (batched P2P) and stage-2 routing all ran in a 2x2 mesh.
            assert {"all_to_all_single", "batch_isend_irecv"} <= kinds, (case, kinds)
            off = [(name, devs) for name, devs in seen if devs != ["meta"]]
            assert not off, (case, off)


# ---------------------------------------------------------------------------------------------------------
# Fractional loss weights through Megatron's schedule
# ---------------------------------------------------------------------------------------------------------

WEIGHTS = {(0, 0): (0.3, 1.7, 0.05), (0, 1): (1.25, 0.5, 2.0), (1, 0): (0.7, 0.11, 3.0), (1, 1): (1.0, 0.45, 0.9)}
LAYOUTS = [(1, 2, 2), (2, 1, 2)]  # (TP, U, R) in 8 ranks: DP 2 each


def _weighted_batch(dp_rank, m):
    from tests.models._longvila_cases import _sample

    from megatron_longvila.models.longvila import MicroBatch

    g = torch.Generator().manual_seed(100 + 10 * dp_rank + m)
    samples = [_sample(g, 3, 56, 4, 9, "video"), _sample(g, 0, 28, 1, 13, "text"), _sample(g, 1, 28, 1, 6, "image",
                                                                                        sep=False)]
    for s, w in zip(samples, WEIGHTS[(dp_rank, m)]):
        s.loss_weight = w
    return MicroBatch.from_samples(samples)


def _fractional(rank, world):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from tests.models._longvila_cases import build, load_from, setup_megatron, tp_slice

    from megatron_longvila.parallel.state import initialize_mmsp
    from megatron_longvila.parallel.mesh import single_rank_mesh
    from megatron_longvila.runtime.modules import model_device
    from megatron_longvila.batch.microbatch import plan_microbatch
    from megatron_longvila.training.step import LongVILAStep, StepConfig

    # Reference: one process, every micro-batch of every DP replica, weighted global mean.
    setup_megatron()
    ref = build(calculate_per_token_loss=True)
    state0 = {n: p.detach().clone() for n, p in ref.named_parameters()}
    total_w, loss_sum = 0.0, 0.0
    for key in sorted(WEIGHTS):
        ce, w = ref(_weighted_batch(*key), single_rank_mesh(), reduction="none")
        loss_sum = loss_sum + (ce * w).sum()
        total_w += float(w.sum())
    (loss_sum / total_w).backward()
    ref_loss = float(loss_sum) / total_w
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}

    out = []
    for tp, u, r in LAYOUTS:
        cp = u * r
        setup_megatron(tp=tp, cp=cp, hier=[u, r])
        model = build(tp, cp, [u, r], calculate_per_token_loss=True)
        load_from(model, state0, tp, ps.get_tensor_model_parallel_rank())
        mesh = initialize_mmsp(model.config, packed=True)
        cfg = model.config
        ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(), model)
        cfg.finalize_model_grads_func = finalize_model_grads
        cfg.no_sync_func = ddp.no_sync
        step = LongVILAStep(StepConfig(seq_length=512), model)
        dp_rank = ps.get_data_parallel_rank()
        planned = [plan_microbatch(model.visual_spec, _weighted_batch(dp_rank, m), mesh).to(model_device(model))
                   for m in range(2)]
        step.finish_step(planned)
        ddp.zero_grad_buffer()
        store = get_forward_backward_func()(forward_step_func=step.forward_step, data_iterator=iter(planned),
                                            model=[ddp], num_microbatches=2, seq_length=512, micro_batch_size=1)
        rep = torch.stack([x["lm loss"] for x in store]).sum(0)
        dist.all_reduce(rep, group=ps.get_data_parallel_group(with_context_parallel=True))
        worst = 0.0
        for n, p in model.named_parameters():
            exp = tp_slice(n, p, ref_grads[n], tp, ps.get_tensor_model_parallel_rank())
            err = float((p.main_grad - exp).abs().max()) / max(float(exp.abs().max()), 1e-30)
            worst = max(worst, err)
        out.append({"layout": (tp, u, r), "grad_err": worst, "loss": float(rep[0] / rep[1]),
                    "scale": planned[0].step_scale})
    return {"ref_loss": ref_loss, "layouts": out}


def test_fractional_loss_weights_are_exact_through_megatron_schedules():
    results = run_distributed(_fractional, 8, timeout=240)
    for r in results:
        for row in r["layouts"]:
            assert row["grad_err"] <= RTOL, row
            assert abs(row["loss"] - r["ref_loss"]) <= RTOL * abs(r["ref_loss"]), (row, r["ref_loss"])
            assert row["scale"] != 1.0  # fractional weights: the factor N / W is really applied
