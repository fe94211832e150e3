"""Saves and loads at scale: the fully parallel save strategy writes the same checkpoint with each replicated shard
written once and the writes spread over the data-parallel replicas; the fully parallel load reads a share per rank;
a load at another layout reads only this replica's data-position file.

One 4-rank launch (gloo, CPU): the tiny LongVILA at TP 2 x DP 2 with the distributed optimizer after one Adam step,
saved twice from the same state, once with the replica-0 ranks writing (--no-ckpt-fully-parallel-save) and once
fully parallel (the default). Both are then loaded at PP 2 x DP 2 (another layout, RNG not restored), the plain one
with every rank reading its slice, the fully parallel one with --ckpt-fully-parallel-load. In this process: the two
checkpoints hold the same tensors, bitwise (torch's own single-process reader), the same common state and
byte-identical data-position and RNG files.
"""

import os

import pytest
import torch

from megatron_longvila.checkpoint import integrity
from megatron_longvila.checkpoint.data_state import data_state_path
from megatron_longvila.checkpoint.distributed import (_thread_bytes_read, ParallelIO, bytes_written_per_rank,
                                                      load_checkpoint, save_checkpoint)
from megatron_longvila.checkpoint.layout import checkpoint_dir, safe_load
from megatron_longvila.errors import ArgumentError
from megatron_longvila.parallel.launch import run_distributed
from megatron_longvila.training.arguments import parse_args

WORLD = 4
MEDIA = 7


def _setup(tp: int, pp: int, seed: int) -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed + 100 * ps.get_pipeline_model_parallel_rank())
    model_parallel_cuda_manual_seed(seed)


def _build(tp: int, pp: int):
    """The tiny LongVILA in Megatron's DDP with the distributed optimizer (torch Adam)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_longvila.models.registry import build_longvila

    model = build_longvila(encoder="siglip_tiny", llm="tiny", tensor_model_parallel_size=tp,
                           pipeline_model_parallel_size=pp, media_token_id=MEDIA,
                           llm_overrides=dict(calculate_per_token_loss=True, batch_p2p_comm=False))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True,
                                                       params_dtype=torch.float32), [ddp])
    return model, ddp, optimizer


def _state(model, optimizer):
    """This rank's parameters and Adam moments by name (local shards)."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {}
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            for p in group["params"]:
                for k in ("exp_avg", "exp_avg_sq"):  # none before the first step or load
                    if k in opt.optimizer.state[p]:
                        moments.setdefault(k, []).append(opt.optimizer.state[p][k].detach().clone())
    return params, moments


def _world(rank, world, tmp):
    from megatron.core import parallel_state as ps

    _setup(tp=2, pp=1, seed=1234)
    model, ddp, optimizer = _build(tp=2, pp=1)
    g = torch.Generator().manual_seed(7 + ps.get_tensor_model_parallel_rank())  # the same gradient on DP replicas
    for p in ddp.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=g))
    optimizer.step()  # Adam moments and a changed model: a state worth saving
    dp = ps.get_data_parallel_rank()
    data_state = {"dp_rank": dp, "position": torch.arange(5 + dp)}
    out = {"rank": rank, "dp": dp}
    for name, fully in (("plain", False), ("fully", True)):
        save_checkpoint(os.path.join(tmp, name), 1, ddp, optimizer, None, data_state=data_state,
                        train_state={"consumed_samples": 4}, parallel_io=ParallelIO(fully_parallel_save=fully))

    # Another layout (PP 2 x DP 2, the same DP size): fresh weights, then the loads.
    loads = {}
    for name, fully in (("plain", False), ("fully", True)):
        _setup(tp=1, pp=2, seed=99)
        model, ddp, optimizer = _build(tp=1, pp=2)
        before, _ = _state(model, optimizer)
        loaded = load_checkpoint(os.path.join(tmp, name), ddp, optimizer, None, load_rng=False,
                                 parallel_io=ParallelIO(fully_parallel_load=fully))
        params, moments = _state(model, optimizer)
        out["load_dp"] = ps.get_data_parallel_rank()  # this rank's replica at the loading layout
        loads[name] = {"params": params, "moments": moments, "bytes_read": loaded.bytes_read,
                       "per_rank": loaded.bytes_read_per_rank, "data_state": loaded.data_state,
                       "changed": sum(not torch.equal(before[n], params[n]) for n in params), "n": len(params),
                       "summary": loaded.reads_summary()}
    out["same_params"] = all(torch.equal(loads["plain"]["params"][n], loads["fully"]["params"][n])
                             for n in loads["plain"]["params"])
    out["moments"] = {k: len(v) for k, v in loads["fully"]["moments"].items()}
    out["same_moments"] = all(torch.equal(a, b) for k in loads["plain"]["moments"]
                              for a, b in zip(loads["plain"]["moments"][k], loads["fully"]["moments"][k]))
    out["loads"] = {k: {kk: vv for kk, vv in v.items() if kk not in ("params", "moments")} for k, v in loads.items()}
    out["data_state"] = data_state
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("parallel_save"))
    return tmp, run_distributed(_world, WORLD, tmp, timeout=240)


def _distcp_bytes(folder):
    """{rank: bytes of its torch_dist shard files}."""
    out = {}
    for n in os.listdir(folder):
        if n.endswith(".distcp"):
            r = int(n[2:].split("_")[0])
            out[r] = out.get(r, 0) + os.path.getsize(os.path.join(folder, n))
    return out


def test_fully_parallel_save_spreads_the_writes(saved):
    """Each replicated shard is written once: the shard bytes over all ranks are the same for both strategies
    (within 2%: torch's per-item pickle framing differs with the number of files), and the fully parallel save gives
    the DP-rank-1 ranks their share, so no rank writes more than 60% of what the busiest replica-0 rank writes
    (an even split of two replicas is 50%)."""
    tmp, outs = saved
    plain, fully = (checkpoint_dir(os.path.join(tmp, n), 1) for n in ("plain", "fully"))
    for folder in (plain, fully):
        assert integrity.check_checkpoint(folder)["ok"]
    dp_of = {o["rank"]: o["dp"] for o in outs}
    a, b = _distcp_bytes(plain), _distcp_bytes(fully)
    assert sum(a.values()) > 100_000
    assert abs(sum(b.values()) - sum(a.values())) <= 0.02 * sum(a.values()), (a, b)
    assert all(a.get(r, 0) == 0 for r in dp_of if dp_of[r] == 1), a  # replica-0 ranks wrote every shard
    assert all(b.get(r, 0) > 0 for r in dp_of), b
    assert max(b.values()) <= 0.6 * max(a.values()), (a, b)
    # The manifest-based figures (what save_checkpoint prints) agree with the files on disk.
    for folder, shards in ((plain, a), (fully, b)):
        written = bytes_written_per_rank(folder)
        for r in range(WORLD):
            own = sum(os.path.getsize(os.path.join(folder, rel)) for rel, e in
                      integrity.read_manifest(folder)["files"].items() if e["rank"] == r)
            assert written.get(r, 0) == own and own >= shards.get(r, 0)


def test_fully_parallel_save_keeps_the_contents(saved, tmp_path):
    """The same tensors (bitwise, every key of the model and the optimizer), common state, data-position and RNG
    files in both checkpoints."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp, _ = saved
    plain, fully = (checkpoint_dir(os.path.join(tmp, n), 1) for n in ("plain", "fully"))
    full = {}
    for name, folder in (("plain", plain), ("fully", fully)):
        dcp_to_torch_save(folder, str(tmp_path / name))
        full[name] = torch.load(str(tmp_path / name), weights_only=False)
    assert sorted(full["plain"]) == sorted(full["fully"]) and len(full["plain"]) > 20
    for key, value in full["plain"].items():
        other = full["fully"][key]
        if isinstance(value, torch.Tensor):
            assert value.dtype == other.dtype and torch.equal(value, other), key
        else:
            assert _plain(value) == _plain(other), key
    assert any("exp_avg" in k for k in full["plain"])  # the optimizer's moments are among them
    common = [torch.load(os.path.join(f, "common.pt"), weights_only=False) for f in (plain, fully)]
    assert _plain(common[0]) == _plain(common[1])
    rels = sorted(rel for rel in integrity.read_manifest(plain)["files"] if rel.startswith(("data_state/", "extra/")))
    assert rels == sorted(rel for rel in integrity.read_manifest(fully)["files"]
                          if rel.startswith(("data_state/", "extra/")))
    assert len([r for r in rels if r.startswith("data_state/")]) == 2  # one file per data-parallel replica
    for rel in rels:
        with open(os.path.join(plain, rel), "rb") as f1, open(os.path.join(fully, rel), "rb") as f2:
            assert f1.read() == f2.read(), rel


def _plain(x):
    """A comparable form of loaded non-tensor state (BytesIO objects by their bytes)."""
    if hasattr(x, "getvalue"):
        return x.getvalue()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return x


def _reads_of(path):
    """Bytes this thread's counter sees for reading one data-position file (torch.load re-reads parts of a zip
    file: about 8 KiB for a 1.5 KiB file), the second of two reads (the first may import)."""
    for _ in range(2):
        before = _thread_bytes_read()
        safe_load(path)
        after = _thread_bytes_read()
    return after - before


def test_loads_at_another_layout_read_their_share(saved):
    """At PP 2 x DP 2 both loads restore the same parameters and Adam moments (bitwise), which differ from the fresh
    ones; each rank reads only its replica's data-position file (what reading that one file costs here, within 512
    bytes: the counter's own reads are about 120 bytes); the fully parallel load's busiest rank reads at most 75% of
    the tensor bytes the plain load's busiest rank reads (an even split over two replicas is 50%, plus the metadata
    every rank reads)."""
    tmp, outs = saved
    for o in outs:
        assert o["same_params"] and o["same_moments"], o["rank"]
        assert o["moments"]["exp_avg"] > 0 and o["moments"]["exp_avg_sq"] > 0
        for name in ("plain", "fully"):
            load = o["loads"][name]
            assert load["changed"] > load["n"] // 2, (name, load["changed"], load["n"])
            how = "fully parallel" if name == "fully" else "each rank its slice"
            assert f"bytes read per rank ({how}): verify max" in load["summary"] and "; tensors max" in load["summary"]
            assert load["data_state"]["dp_rank"] == o["load_dp"]
            assert torch.equal(load["data_state"]["position"], torch.arange(5 + o["load_dp"]))
            path = data_state_path(checkpoint_dir(os.path.join(tmp, name), 1), o["load_dp"])
            got = load["bytes_read"]["data_state"]
            assert abs(got - _reads_of(path)) <= 512, (name, got, _reads_of(path))
    plain = [p["tensors"] for p in outs[0]["loads"]["plain"]["per_rank"]]
    fully = [p["tensors"] for p in outs[0]["loads"]["fully"]["per_rank"]]
    assert min(plain) > 50_000, plain
    assert max(fully) <= 0.75 * max(plain), (plain, fully)


@pytest.mark.parametrize("extra, fully_save, fully_load", [
    ([], True, False),
    (["--no-ckpt-fully-parallel-save"], False, False),
    (["--ckpt-fully-parallel-save", "--ckpt-fully-parallel-load"], True, True),
])
def test_parallel_io_flags(extra, fully_save, fully_load):
    base = ["--train-iters", "2", "--data-path", "x.jsonl", "--global-batch-size", "2"]
    a = parse_args(base + extra)
    assert (a.ckpt_fully_parallel_save, a.ckpt_fully_parallel_load) == (fully_save, fully_load)


def test_async_save_is_refused_with_the_reason():
    base = ["--train-iters", "2", "--data-path", "x.jsonl", "--global-batch-size", "2"]
    with pytest.raises(ArgumentError, match="--async-save.*synchronous"):
        parse_args(base + ["--async-save"])
