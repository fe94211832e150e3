"""LongVILAModel.sharded_state_dict() under megatron.core.dist_checkpointing: a TP=2 x PP=2 save loads at
TP=1 x PP=1, and every saved shard (vision encoder, projector, each LLM layer by its global number, embedding,
output layer) reappears exactly at its place in the unsharded model."""

import torch

from megatron_longvila.parallel.launch import run_distributed

from .test_longvila_pipeline import _build, _setup


def _shards(model):
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [sh for sh in nested_values(model.sharded_state_dict()) if isinstance(sh, ShardedTensor)]


def _world(rank, world, ckpt):
    import os

    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    if rank == 0:
        os.makedirs(ckpt)
    _setup(tp=2, pp=2)
    model = _build(tp=2, pp=2)
    saved = [(sh.key, tuple(sh.global_offset), sh.prepend_axis_num, sh.data.detach().clone())
             for sh in _shards(model)]
    dist_checkpointing.save(model.sharded_state_dict(), ckpt, sharded_strategy=TorchDistSaveShardedStrategy(
        "torch_dist", 1))
    dist.barrier()

    _setup()  # TP=1, PP=1: DP=4, every rank holds the whole model
    torch.manual_seed(99)  # different initial weights than the saved ones
    model = _build()

    def agreeing():
        loaded = {}
        for sh in _shards(model):
            loaded.setdefault(sh.key, []).append(sh)
        same, same_random, numel, keys = 0, 0, 0, set()
        for key, off, p, data in saved:
            match = [sh for sh in loaded[key] if tuple(sh.global_offset[:p]) == off[:p]]
            assert len(match) == 1, (key, off)
            full = match[0]
            index = tuple(slice(o - fo, o - fo + n) for o, fo, n in zip(off[p:], full.global_offset[p:], data.shape))
            eq = int(torch.equal(full.data[index], data))
            same += eq
            same_random += eq if data.numel() > 1 and float(data.float().std()) > 0 else 0
            numel += data.numel()
            keys.add(key)
        return same, same_random, numel, keys

    _, before, _, _ = agreeing()
    assert before == 0  # no randomly initialized shard agrees before the load (norms and biases may)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt), strict=True)
    same, _, checked, keys = agreeing()
    assert same == len(saved), (same, len(saved))
    return {"checked": checked, "keys": sorted(keys), "pp_rank_saved": ps.get_pipeline_model_parallel_rank()}


def test_tp2_pp2_save_loads_at_tp1_pp1(tmp_path):
    out = run_distributed(_world, 4, str(tmp_path / "ckpt"), timeout=120)
    keys = set().union(*(o["keys"] for o in out))
    assert all(o["checked"] > 0 for o in out)
    for part in ("vision_model.", "projector.", "language_model.model.embedding.",
                 "language_model.model.output_layer.", "language_model.model.decoder.final_layernorm."):
        assert any(k.startswith(part) for k in keys), (part, sorted(keys))
