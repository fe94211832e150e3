"""Converted checkpoints run what VILA runs: per-token losses equal a reference composed from transformers' modules
and VILA's projector formula (fp32, max |error| <= 1e-5 x max |reference| over the learned tokens), on 4 gloo
ranks in one launch:

- TP1 on a 2x2 MM-SP mesh (CP 4): each case loaded straight from its Hugging Face VILA folder, and the Qwen2 and
  Llama cases again after HF -> MCore and HF -> NeMo conversions;
- TP2 x PP2, CP 1: the tied Qwen2 from its HF -> MCore conversion made for that layout, and the Llama case from HF;
- the LLM alone at TP2 gives transformers' logits over the stored vocabulary (and -inf on every padded column);
- the model's sharded state dict has exactly the canonical keys and shapes the converter writes (tensors and the
  `_extra_state` objects), so a conversion loads strictly;
- controls: the other projector token order, and linear RoPE scaling left off, are caught: their error exceeds
  10x the tolerance (tiny random models: the wrong order moves the losses by a few 1e-4 relative).
"""

from functools import partial

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

from .fixtures import CASES, make_vila
from .reference import VilaReference, micro_batch, samples

pytest.importorskip("transformers")

RTOL = 1e-5
SEED = 3
SEQ = 96  # longer than the packed samples (fixed shapes for the pipeline schedule)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from megatron_longvila.conversion import convert, read_record

    root = str(tmp_path_factory.mktemp("conv_losses"))
    hf = {name: make_vila(root, name) for name in CASES}
    mcore_tp2pp2 = convert(source=hf["qwen2_tied"], target=f"{root}/qwen2_tied_mcore", target_format="mcore",
                           tensor_model_parallel_size=2, pipeline_model_parallel_size=2, progress=False)["target"]
    mcore = convert(source=hf["llama"], target=f"{root}/llama_mcore", target_format="mcore", progress=False)["target"]
    nemo = convert(source=hf["qwen2_1m"], target=f"{root}/qwen2_1m_nemo", target_format="nemo",
                   progress=False)["target"]
    refs, infos, texts = {}, {}, {}
    for name, path in hf.items():
        rec = read_record(path)
        ref = VilaReference(path, rec.token_order)
        infos[name] = {k: (sorted(v["missing_keys"]), sorted(v["unexpected_keys"])) for k, v in ref.load_info.items()}
        refs[name] = ref.token_losses(samples(rec, SEED))
        ids = torch.randint(0, ref.rows, (17,), generator=torch.Generator().manual_seed(5))
        texts[name] = (ids, ref.logits(ids), ref.rows)
    jobs = {"cp": [("qwen2_tied", hf["qwen2_tied"]), ("qwen2_1m", hf["qwen2_1m"]), ("llama", hf["llama"]),
                   ("llama", mcore), ("qwen2_1m", nemo)],
            "tp2pp2": [("qwen2_tied", mcore_tp2pp2), ("llama", hf["llama"])],
            "logits": [(name, hf[name], texts[name][0]) for name in hf],
            "controls": [("llama", hf["llama"], "row_major")]}
    out = run_distributed(_ranks, 4, jobs, timeout=240)
    return dict(refs=refs, infos=infos, texts=texts, out=out, jobs=jobs)


def _setup(tp=1, pp=1, cp=1, hier=None):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_longvila.runtime.cpu import enable_cpu_runtime

    enable_cpu_runtime()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp, hierarchical_context_parallel_sizes=hier)
    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)


def _keys(model):
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    tensors, objects = {}, set()
    for v in nested_values(model.sharded_state_dict()):
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)):
            shape = tuple(v.global_shape) if isinstance(v, ShardedTensor) else None
            tensors[v.key] = shape
        elif isinstance(v, ShardedObject):
            objects.add(v.unique_key)
    return tensors, objects


def _ranks(rank, world, jobs):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_longvila.batch.packed_seq_params import MMSPPackedSeqParams
    from megatron_longvila.conversion import load_longvila
    from megatron_longvila.conversion.mappings import canonical_specs, extra_state_keys
    from megatron_longvila.parallel.mesh import build_mmsp_mesh, single_rank_mesh
    from megatron_longvila.parallel.sharding import plan_sequence
    from megatron_longvila.batch.gpt import loss_func
    from megatron_longvila.batch.microbatch import plan_microbatch

    out = {"cp": [], "tp2pp2": [], "logits": [], "controls": [], "keys": []}
    _setup(cp=4, hier=[2, 2])
    mesh = build_mmsp_mesh(2, 2)
    for name, path in jobs["cp"]:
        model = load_longvila(path, hierarchical_context_parallel_sizes=[2, 2])
        planned = plan_microbatch(model.visual_spec, micro_batch(model.record, SEED), mesh).to("cpu")
        with torch.no_grad():
            ce, w = model(planned, reduction="none")
        out["cp"].append((name, path, planned.plan.gather(ce[0]), planned.plan.gather(w[0])))
        tensors, objects = _keys(model)
        spec = {s.key: tuple(s.shape) for s in canonical_specs(model.record)}
        out["keys"].append((name, sorted(set(tensors) ^ set(spec)),
                            [k for k in spec if tensors.get(k) not in (None, spec[k])],
                            sorted(objects ^ set(extra_state_keys(model.record)))))
    for name, path, order in jobs["controls"]:
        model = load_longvila(path, token_order=order, hierarchical_context_parallel_sizes=[2, 2])
        planned = plan_microbatch(model.visual_spec, micro_batch(model.record, SEED), mesh).to("cpu")
        with torch.no_grad():
            ce, _ = model(planned, reduction="none")
        out["controls"].append((name, "token_order", planned.plan.gather(ce[0])))
    # RoPE scaling control: the 1M case without its linear factor.
    name, path = jobs["cp"][1]
    model = load_longvila(path, hierarchical_context_parallel_sizes=[2, 2])
    model.language_model.model.rotary_pos_emb.seq_len_interpolation_factor = None
    planned = plan_microbatch(model.visual_spec, micro_batch(model.record, SEED), mesh).to("cpu")
    with torch.no_grad():
        ce, _ = model(planned, reduction="none")
    out["controls"].append((name, "rope_scaling", planned.plan.gather(ce[0])))

    _setup(tp=2, pp=2)
    for name, path in jobs["tp2pp2"]:
        model = load_longvila(path, llm_overrides={"calculate_per_token_loss": True, "batch_p2p_comm": False})
        mb = micro_batch(model.record, SEED)
        kept = []

        def step(it, m):
            planned = plan_microbatch(m.visual_spec, next(it), single_rank_mesh(), seq_length=SEQ).to("cpu")
            res = m(planned, reduction="none")
            if isinstance(res, tuple):
                kept.append((planned.plan.gather(res[0][0]).detach(), planned.plan.gather(res[1][0]).detach()))
                return res[0], partial(loss_func, res[1])
            return res, partial(loss_func, None)

        with torch.no_grad():
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([mb]), model=[model],
                                        num_microbatches=1, seq_length=SEQ, micro_batch_size=1, forward_only=True)
        if kept:
            n = mb.total_len
            out["tp2pp2"].append((name, path, kept[0][0][:n], kept[0][1][:n]))

    _setup(tp=2)
    for name, path, ids in jobs["logits"]:
        model = load_longvila(path)
        gpt = model.language_model.model
        pos = torch.arange(len(ids))
        plan = plan_sequence(single_rank_mesh(), [len(ids)])
        with torch.no_grad():
            emb = model.language_model.embed(ids, pos)
            params = MMSPPackedSeqParams(qkv_format="sbhd", plan=plan, max_seqlen_q=len(ids), max_seqlen_kv=len(ids))
            logits = gpt(input_ids=None, position_ids=pos[None], attention_mask=None, decoder_input=emb,
                         labels=None, packed_seq_params=params)
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        out["logits"].append((name, logits.reshape(len(ids), -1)))
    ps.destroy_model_parallel()
    return out


def _rel(got, ref, mask):
    return float((got - ref)[mask].abs().max()) / float(ref[mask].abs().max())


def test_transformers_loads_the_fixtures(world):
    # The HF VILA folders load into transformers' own classes with no missing or unexpected key.
    for name, info in world["infos"].items():
        for part, (missing, unexpected) in info.items():
            assert missing == [] and unexpected == [], (name, part, missing, unexpected)


def test_per_token_losses_on_2x2_mesh_and_tp2_pp2(world):
    refs = world["refs"]
    seen = {"cp": set(), "tp2pp2": set()}
    for r in world["out"]:
        for kind in ("cp", "tp2pp2"):
            for name, path, got, w in r[kind]:
                mask = w > 0
                assert int(mask.sum()) > 20 and got.shape == refs[name].shape, (kind, name)
                err = _rel(got, refs[name], mask)
                assert err <= RTOL, (kind, name, path, err)
                seen[kind].add(path)
    assert seen["cp"] == {p for _, p in world["jobs"]["cp"]}
    assert seen["tp2pp2"] == {p for _, p in world["jobs"]["tp2pp2"]}


def test_llm_alone_gives_transformers_logits(world):
    for name, logits in world["out"][0]["logits"]:
        ids, ref, rows = world["texts"][name]
        assert logits.shape[1] > rows  # Megatron's padding
        err = float((logits[:, :rows] - ref).abs().max()) / float(ref.abs().max())
        assert err <= RTOL, (name, err)
        assert bool(torch.isneginf(logits[:, rows:]).all()), name  # padded (and VILA placeholder) rows masked


def test_model_state_is_exactly_the_canonical_keys(world):
    # (ShardedTensorFactory entries, the SwiGLU fc1, have no global shape to compare: their key is checked.)
    for name, diff, misshaped, objects_diff in world["out"][0]["keys"]:
        assert not diff and not misshaped and not objects_diff, (name, diff, misshaped, objects_diff)


def test_controls_are_caught(world):
    refs = world["refs"]
    for name, what, got in world["out"][0]["controls"]:
        mask = refs[name] != 0
        assert _rel(got, refs[name], mask) > 10 * RTOL, (name, what)
