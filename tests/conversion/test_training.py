"""Converted checkpoints train through the example script (--pretrained-checkpoint DIR, no shape flags), on 4 gloo
ranks in one launch, and what training saves exports back to VILA's layout:

- stage 1 from Hugging Face base models: `--llm DIR --vision-tower DIR` -> MCore, then `--recipe align` at TP2 x CP2
  trains a few iterations (finite losses); the saved checkpoint still holds the base LLM and SigLIP unchanged and
  a projector that moved away from its seeded start;
- HF VILA -> MCore -> `--recipe pretrain` (the vision tower frozen) at PP2 x CP2 -> HF: every file and every tensor
  key and shape of the release comes back; the vision tower (its unused last layer, post-LayerNorm and pooling
  head included) byte-identical, the LLM and projector changed.
"""

import os

import pytest
import torch

from megatron_longvila.parallel.launch import run_distributed

from .fixtures import list_files, make_base, make_vila

pytest.importorskip("transformers")
pytest.importorskip("av")


def _argv(manifest, recipe, ckpt, tok, save, layout):
    return ["--cpu", "--recipe", recipe, *layout, "--seq-length", "384", "--global-batch-size", "2", "--train-iters", "3",
            "--lr", "5e-3", "--min-lr", "5e-4", "--lr-warmup-iters", "1", "--num-frames", "4", "--data-path",
            manifest, "--log-interval", "100", "--seed", "7", "--pretrained-checkpoint", ckpt,
            "--tokenizer-model", tok, "--save", save]


def _ranks(rank, world, runs):
    from tests.training.example_script import load_example_script

    mod = load_example_script()
    out = []
    for argv in runs:
        res = mod.pretrain(mod.train_valid_test_datasets_provider, mod.model_provider, mod.forward_step,
                           extra_args_provider=mod.extra_args_provider, argv=argv)
        out.append({"losses": res.losses, "start": res.start_iteration, "saved": res.saved})
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from megatron_longvila.conversion import convert
    from tests.training.example_script import load_example_script

    root = str(tmp_path_factory.mktemp("conv_train"))
    manifest = load_example_script().write_demo_dataset(os.path.join(root, "data"), num_videos=6, frames=8)
    llm, vis = make_base(root)
    base = convert(llm=llm, vision_tower=vis, target=f"{root}/base_mcore", target_format="mcore",
                   progress=False)["target"]
    hf = make_vila(root, "llama")
    vila = convert(source=hf, target=f"{root}/llama_mcore", target_format="mcore", progress=False)["target"]
    runs = [_argv(manifest, "align", base, os.path.join(llm, "tokenizer.json"), f"{root}/stage1",
                  ["--tensor-model-parallel-size", "2", "--context-parallel-size", "2",
                   "--hierarchical-context-parallel-sizes", "2", "1"]),
            _argv(manifest, "pretrain", vila, os.path.join(hf, "llm", "tokenizer.json"), f"{root}/stage2",
                  ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
                   "--hierarchical-context-parallel-sizes", "1", "2"])]
    out = run_distributed(_ranks, 4, runs, timeout=300)
    return dict(root=root, out=out, llm=llm, vis=vis, base=base, hf=hf)


def _last_rank_losses(out, i):
    found = [o[i]["losses"] for o in out if o[i]["losses"]]
    assert found, "no rank reported losses"
    return found[-1]


def _tensors(folder):
    from safetensors import safe_open

    out = {}
    for f in list_files(folder):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as sf:
                for k in sf.keys():
                    out[(f.split("/")[0], k)] = sf.get_tensor(k)
    return out


def test_stage1_from_base_models_trains(trained):
    from megatron_longvila.conversion import open_source
    from megatron_longvila.conversion.hf_base import HFBaseSource

    losses = _last_rank_losses(trained["out"], 0)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert all(o[0]["start"] == 0 for o in trained["out"])
    saved = open_source(os.path.join(trained["root"], "stage1"))
    start = HFBaseSource(trained["llm"], trained["vis"])
    moved = 0
    for spec in saved.specs():
        a, b = saved.canonical(spec.key), start.canonical(spec.key).to(torch.float32)
        if spec.key.startswith("projector."):
            moved += int(not torch.equal(a, b))
        else:  # the alignment stage trains the projector only
            assert torch.equal(a, b), spec.key
    assert moved >= 4, moved  # LayerNorm weight/bias may stay close; the linears move
    assert saved.record.vision_select_layer == -2 and saved.record.source["format"] == "hf_base"


def test_vila_trained_with_frozen_vision_exports_every_key(trained):
    from megatron_longvila.conversion import convert

    root, hf = trained["root"], trained["hf"]
    losses = _last_rank_losses(trained["out"], 1)
    assert sorted(losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    back = convert(source=os.path.join(root, "stage2"), target=f"{root}/stage2_hf", target_format="hf",
                   dtype="bf16", progress=False)["target"]
    assert list_files(back) == list_files(hf)
    a, b = _tensors(hf), _tensors(back)
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    assert any(k[1].startswith("vision_model.head.") for k in a)  # the kept-but-never-run parts are there
    assert ("vision_tower", "vision_model.encoder.layers.2.mlp.fc2.weight") in a
    for f in list_files(hf):
        same = open(os.path.join(hf, f), "rb").read() == open(os.path.join(back, f), "rb").read()
        if f.startswith("vision_tower/") or not f.endswith(".safetensors"):
            assert same, f  # frozen (and never-run) vision state, configs and tokenizer files: byte for byte
        else:
            assert not same, f  # the LLM and the projector trained
