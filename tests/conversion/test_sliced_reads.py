"""Sliced reads: a Hugging Face VILA folder loaded at TP 2 x PP 2 on 4 gloo ranks (one launch), each rank reading
only the byte ranges of its own shards.

Per rank and per case (the tied Qwen2 in two shard files; the Llama with a padded vocabulary):
- every loaded tensor equals the same slice of the whole canonical tensor read the old way (exact, the stored
  dtype widened to fp32);
- the safetensors bytes the reader counted: the headers exactly (8 + header length of every file, measured here
  from the files), and tensor data at most the rank's shards in the stored dtype (its TP/PP slices plus the tensors
  it replicates, padding rows included in the bound though they are not read), counted here from the model's
  sharded state dict, not from the loader;
- together well under the whole checkpoint: each rank reads less than 3/4 of the files' bytes, and the 4 ranks
  read less than 2x the checkpoint (an unsliced load reads 4x).
"""

import os

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

from .fixtures import make_vila

pytest.importorskip("transformers")

CASES = ("qwen2_tied", "llama")


def _setup(tp, pp):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)


def _ranks(rank, world, paths):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    from megatron_longvila.conversion import load_longvila, open_source

    _setup(2, 2)
    out = []
    for name, path in paths:
        stats = {}
        model = load_longvila(path, stats=stats)
        sd, _, _ = load_preprocess(model.sharded_state_dict())
        shards = [sh for sh in nested_values(sd) if isinstance(sh, ShardedTensor)]
        mismatched, bound = [], 0
        with open_source(path, tensor_model_parallel_size=2, pipeline_model_parallel_size=2) as ref:
            for sh in shards:
                p = sh.prepend_axis_num
                full = ref.canonical_layer(sh.key, sh.global_offset[0]) if p else ref.canonical(sh.key)
                idx = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
                if not torch.equal(full[idx].to(sh.data.dtype), sh.data):
                    mismatched.append(sh.key)
                bound += sh.data.numel() * torch.empty((), dtype=ref.dtype(sh.key)).element_size()
        out.append(dict(name=name, stats=stats, bound=bound, mismatched=mismatched, shards=len(shards)))
    ps.destroy_model_parallel()
    return out


def _files(path):
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".safetensors")]


def _headers(path):
    total = 0
    for f in _files(path):
        with open(f, "rb") as fh:
            total += 8 + int.from_bytes(fh.read(8), "little")
    return total


def test_each_rank_reads_its_slices_and_headers_only(tmp_path):
    paths = [(name, make_vila(str(tmp_path), name)) for name in CASES]
    results = run_distributed(_ranks, 4, paths, timeout=300)
    for name, path in paths:
        whole = sum(os.path.getsize(f) for f in _files(path))
        headers = _headers(path)
        per_rank = [next(r for r in res if r["name"] == name) for res in results]
        for rank, r in enumerate(per_rank):
            assert r["shards"] > 0 and r["mismatched"] == [], (name, rank, r["mismatched"])
            assert r["stats"]["header_bytes"] == headers, (name, rank, r["stats"], headers)
            assert 0 < r["stats"]["data_bytes"] <= r["bound"], (name, rank, r["stats"], r["bound"])
            assert r["stats"]["header_bytes"] + r["stats"]["data_bytes"] < 0.75 * whole, (name, rank, r, whole)
        assert sum(r["stats"]["header_bytes"] + r["stats"]["data_bytes"] for r in per_rank) < 2 * whole, name
