"""Shared builders for the LongVILA model tests: tiny micro-batches and Megatron setup on CPU."""

from __future__ import annotations

from typing import List, Optional

import torch

from megatron_longvila.models.longvila import IGNORE_INDEX, LongVILASample, Media, MicroBatch

MEDIA = 5  # media placeholder token id
SEP = 7  # frame separator token id
VOCAB = 96


def _sample(g, frames: int, size: int, tpf: int, text: int, kind: str, sep: bool = True) -> LongVILASample:
    ids: List[int] = torch.randint(10, VOCAB, (3,), generator=g).tolist()
    pos = []
    for _ in range(frames):
        pos.append(list(range(len(ids), len(ids) + tpf)))
        ids += [MEDIA] * tpf + ([SEP] if sep else [])
    ids += torch.randint(10, VOCAB, (text,), generator=g).tolist()
    ids_t = torch.tensor(ids)
    labels = ids_t.clone()
    labels[: len(ids) - text] = IGNORE_INDEX  # learn the answer only
    media = []
    if frames:
        media.append(Media(token_positions=torch.tensor(pos), frames=torch.randn(frames, 3, size, size, generator=g),
                           kind=kind))
    return LongVILASample(input_ids=ids_t, labels=labels, media=media)


def micro_batch(case: str) -> MicroBatch:
    """"seven": a 6-frame video + an image (7 frames) + a text-only sample; "three": a 2-frame video at
    a different resolution + an image (3 frames) + text-only, first."""
    g = torch.Generator().manual_seed({"seven": 1, "three": 2}[case])
    if case == "seven":
        s = [_sample(g, 6, 56, 4, 9, "video"), _sample(g, 1, 28, 1, 5, "image", sep=False),
             _sample(g, 0, 28, 1, 11, "text")]
    else:
        s = [_sample(g, 0, 28, 1, 7, "text"), _sample(g, 2, 42, 4, 6, "video"),
             _sample(g, 1, 56, 4, 8, "image", sep=False)]
    return MicroBatch.from_samples(s)


def setup_megatron(tp: int = 1, cp: int = 1, hier: Optional[list] = None, seed: int = 1234) -> None:
    """(Re)initialize megatron's parallel state on the CPU runtime, with a fixed seed."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=hier)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def build(tp: int = 1, cp: int = 1, hier: Optional[list] = None, **llm_overrides):
    from megatron_longvila.models.registry import build_longvila

    return build_longvila(encoder="siglip_tiny", llm="tiny", tensor_model_parallel_size=tp,
                          context_parallel_size=cp, hierarchical_context_parallel_sizes=hier,
                          media_token_id=MEDIA, llm_overrides=llm_overrides or None)


def _gated_fc1(name: str) -> bool:
    # The LLM's SwiGLU fc1 stacks [gate; up]; each TP rank holds [gate shard; up shard].
    return name.startswith("language_model.") and ".mlp.linear_fc1." in name


def tp_slice(name: str, param: torch.nn.Parameter, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The TP shard of a full (TP=1) tensor that `param` holds on TP rank `rank`."""
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if _gated_fc1(name):
        return torch.cat([h.chunk(tp, dim)[rank] for h in full.chunk(2, dim)], dim)
    return full.chunk(tp, dim)[rank]


def load_from(model, ref_state: dict, tp: int, tp_rank: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tp_slice(name, p, ref_state[name], tp, tp_rank))
