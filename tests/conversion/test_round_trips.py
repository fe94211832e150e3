"""Conversions without ranks: the mappings, round trips byte for byte, exports transformers loads, and every bad
input's one clear error.

- Mappings: QKV per GQA group [q heads, k, v] (weight and bias) and its inverse, SigLIP's per-head QKV, SwiGLU fc1 =
  [gate; up], Megatron's vocabulary padding, RoPE theta and linear scaling from 4.x keys and transformers 5's
  rope_parameters; our safetensors writer produces the `safetensors` library's bytes.
- HF -> MCore (TP2, PP2) -> HF and HF -> NeMo -> HF reproduce every file of the release byte for byte (three cases:
  tied and untied Qwen2, a Megatron-padded Llama; dev and remote-code flavours; sharded and single files; bf16 and
  fp32), keeping every key (SigLIP's unused last layer, post-LayerNorm and pooling head included).
- Base models -> HF VILA: 4.x configs, `vision_model.` keys, and llm/ and vision_tower/ load into transformers'
  classes with no missing or unexpected key.
- Bad inputs: pickled weights, NVILA S2, the 3x3 projector, InternViT, select_feature "patch", non-linear RoPE
  scaling, a layout that does not divide, missing + unexpected + misshaped tensors (all listed in one error), a
  corrupt file, an unknown folder, an existing target, the source as target.
- A conversion killed half-way leaves no target; the next one to the same target succeeds.
- The command line: --json summary; a refusal exits 2 with the message.
"""

import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys

import pytest
import torch

from .fixtures import CASES, list_files, make_base, make_vila

pytest.importorskip("transformers")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("conv_rt"))
    return root, {name: make_vila(root, name) for name in CASES}


def _same_files(a, b):
    fa, fb = list_files(a), list_files(b)
    differ = [f for f in fa if f in fb and open(os.path.join(a, f), "rb").read() != open(os.path.join(b, f), "rb").read()]
    return fa == fb and not differ, (sorted(set(fa) ^ set(fb)), differ)


# ------------------------------------------------------------------------------------------------------
# Mappings
# ------------------------------------------------------------------------------------------------------

def test_qkv_interleave_per_group_and_inverse():
    from megatron_longvila.conversion.mappings import merge_qkv, split_qkv

    d, nq, g, h = 2, 4, 2, 3
    q = torch.arange(nq * d * h).reshape(nq * d, h).float()
    k = 100 + torch.arange(g * d * h).reshape(g * d, h).float()
    v = 200 + torch.arange(g * d * h).reshape(g * d, h).float()
    fused = merge_qkv(q, k, v, g)
    # Group 0: q heads 0, 1 then k head 0 then v head 0; group 1 likewise.
    expect = torch.cat([q[0:4], k[0:2], v[0:2], q[4:8], k[2:4], v[2:4]])
    assert torch.equal(fused, expect)
    assert not torch.equal(fused, torch.cat([q, k, v]))  # the plain concatenation is not Megatron's layout
    back = split_qkv(fused, nq, g, d)
    assert all(torch.equal(x, y) for x, y in zip(back, (q, k, v)))
    bias = merge_qkv(q[:, 0], k[:, 0], v[:, 0], g)  # Qwen2's QKV bias: the same interleave
    assert torch.equal(bias, expect[:, 0])
    # SigLIP: groups = heads -> [q_h, k_h, v_h] per head.
    vit = merge_qkv(q, 100 + q, 200 + q, nq)
    assert torch.equal(vit[: 3 * d], torch.cat([q[:d], 100 + q[:d], 200 + q[:d]]))


def test_swiglu_vocab_and_rope():
    from megatron_longvila.errors import ConversionError
    from megatron_longvila.conversion.mappings import hf_to_canonical, padded_vocab_size, rope_from_config
    from megatron_longvila.models.record import record_of
    from megatron_longvila.models.registry import ENCODERS, LLMS

    assert padded_vocab_size(151648, 128, 1) == 151680 and padded_vocab_size(151651, 128, 2) == 151808
    assert padded_vocab_size(128257, 128, 1) == 128384
    rec = record_of(LLMS["tiny"], ENCODERS["siglip_tiny"], real_vocab_size=90)
    gate, up = torch.randn(64, 48), torch.randn(64, 48)
    tensors = {"model.layers.0.mlp.gate_proj.weight": gate, "model.layers.0.mlp.up_proj.weight": up,
               "model.embed_tokens.weight": torch.randn(90, 48)}
    fc1 = hf_to_canonical(rec, "language_model.model.decoder.layers.mlp.linear_fc1.weight",
                          lambda c, n: tensors[n], layer=0)
    assert torch.equal(fc1, torch.cat([gate, up]))
    emb = hf_to_canonical(rec, "language_model.model.embedding.word_embeddings.weight", lambda c, n: tensors[n])
    assert emb.shape == (96, 48) and torch.equal(emb[:90], tensors["model.embed_tokens.weight"])
    assert not emb[90:].any()  # padding rows are zero
    assert rope_from_config({"rope_theta": 1062356830, "rope_scaling": {"type": "linear", "factor": 4.0}}, "c") == \
        (1062356830.0, {"type": "linear", "factor": 4.0})
    assert rope_from_config({"rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e6}}, "c") == \
        (5e6, {"type": "linear", "factor": 4.0})
    assert rope_from_config({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "c") == (1e6, None)
    with pytest.raises(ConversionError, match=r"rope_scaling .*yarn"):
        rope_from_config({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "c")


def test_safetensors_writer_matches_the_library(tmp_path):
    from safetensors.torch import save_file

    from megatron_longvila.conversion.storage import SafetensorsFile, SafetensorsWriter

    d = {"b": torch.randn(3).bfloat16(), "a": torch.randn(2).half(), "c": torch.randn(2, 2).double(),
         "layers.10.w": torch.randn(4), "layers.2.w": torch.randn(1, 2), "i": torch.arange(3), "e": torch.zeros(0)}
    save_file(d, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    w = SafetensorsWriter(str(tmp_path / "mine.safetensors"), [(k, v.dtype, tuple(v.shape)) for k, v in d.items()],
                          {"format": "pt"})
    for k in reversed(list(d)):  # any order: each tensor goes to its offset
        w.write(k, d[k])
    w.close()
    assert (tmp_path / "ref.safetensors").read_bytes() == (tmp_path / "mine.safetensors").read_bytes()
    f = SafetensorsFile(str(tmp_path / "ref.safetensors"))
    assert all(torch.equal(f.read(k), v) for k, v in d.items())


# ------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------

def test_round_trips_are_byte_identical(hf):
    from megatron_longvila.conversion import convert, read_record

    root, cases = hf
    for name, src in cases.items():
        m = convert(source=src, target=f"{root}/{name}.mcore", target_format="mcore", tensor_model_parallel_size=2,
                    pipeline_model_parallel_size=2, progress=False)["target"]
        rec = read_record(m)
        assert rec.default_layout["tensor_model_parallel_size"] == 2 and rec.padded_vocab_size % 256 == 0
        assert open(os.path.join(m, "latest_checkpointed_iteration.txt")).read() == "0"
        back = convert(source=m, target=f"{root}/{name}.mcore.hf", target_format="hf", progress=False)["target"]
        ok, why = _same_files(src, back)
        assert ok, (name, "mcore", why)
        n = convert(source=src, target=f"{root}/{name}.nemo", target_format="nemo", progress=False)["target"]
        for f in ("context/model.yaml", "context/longvila/model_record.json", "weights/.metadata",
                  "weights/metadata.json"):
            assert os.path.isfile(os.path.join(n, f)), f
        back = convert(source=n, target=f"{root}/{name}.nemo.hf", target_format="hf", progress=False)["target"]
        ok, why = _same_files(src, back)
        assert ok, (name, "nemo", why)
    # NeMo's names, as NeVA stores them.
    from megatron_longvila.conversion.storage import DcpReader

    keys = set(DcpReader(os.path.join(root, "qwen2_tied.nemo", "weights")).tensors)
    assert {"module.vision_projection.1.weight", "module.vision_projection.2.weight",
            "module.vision_projection.4.bias", "module.language_model.embedding.word_embeddings.weight",
            "module.vision_model.head.probe",
            "module.language_model.decoder.layers.self_attention.linear_qkv.weight"} <= keys
    assert "module.language_model.output_layer.weight" not in keys  # tied: no output layer


def test_dtype_change_and_back(hf):
    from safetensors import safe_open

    from megatron_longvila.conversion import convert

    root, cases = hf
    src = cases["qwen2_tied"]  # bf16
    m = convert(source=src, target=f"{root}/fp32.mcore", target_format="mcore", dtype="fp32", progress=False)
    h = convert(source=m["target"], target=f"{root}/fp32.hf", target_format="hf", progress=False)["target"]
    cfg = json.load(open(os.path.join(h, "llm", "config.json")))
    assert cfg["torch_dtype"] == "float32"
    with safe_open(os.path.join(h, "vision_tower", "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    b = convert(source=h, target=f"{root}/bf16.hf", target_format="hf", dtype="bf16", progress=False)["target"]
    ok, why = _same_files(src, b)  # bf16 -> fp32 -> bf16 is exact, and the configs are retagged back
    assert ok, why


def test_base_models_export_to_vila_layout(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, SiglipVisionModel

    from megatron_longvila.conversion import convert, read_record

    llm, vis = make_base(str(tmp_path))
    assert "rope_parameters" in json.load(open(os.path.join(llm, "config.json")))  # transformers 5 wrote it
    out = convert(llm=llm, vision_tower=vis, target=str(tmp_path / "start_hf"), target_format="hf", seed=5,
                  progress=False)["target"]
    top = json.load(open(os.path.join(out, "config.json")))
    assert top["model_type"] == "llava_llama" and top["mm_vision_select_layer"] == -2
    assert top["mm_projector_cfg"]["mm_projector_type"] == "mlp_downsample_2x2_fix"
    llm_cfg = json.load(open(os.path.join(out, "llm", "config.json")))
    assert "rope_theta" in llm_cfg and "rope_parameters" not in llm_cfg  # the 4.x keys VILA reads
    with safe_open(os.path.join(out, "vision_tower", "model.safetensors"), "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    _, info = AutoModelForCausalLM.from_pretrained(os.path.join(out, "llm"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _, info = SiglipVisionModel.from_pretrained(os.path.join(out, "vision_tower"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    rec = read_record(out)  # and the export reads back as a VILA checkpoint
    assert rec.token_order == "row_major" and rec.vision_select_layer == -2


# ------------------------------------------------------------------------------------------------------
# Bad inputs
# ------------------------------------------------------------------------------------------------------

def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    d = json.load(open(path))
    d.update(changes)
    json.dump(d, open(path, "w"))


def _refused(match, **kwargs):
    from megatron_longvila.errors import ConversionError
    from megatron_longvila.conversion import convert

    with pytest.raises(ConversionError, match=match) as e:
        convert(progress=False, **kwargs)
    return str(e.value)


def test_each_bad_input_gets_one_clear_error(hf, tmp_path):
    from safetensors.torch import load_file, save_file

    _, cases = hf
    src = cases["qwen2_tied"]
    t = str(tmp_path / "out")

    d = _copy(src, tmp_path / "bin")
    for f in os.listdir(d / "llm"):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(d / "llm" / f)
    torch.save({"x": torch.zeros(1)}, d / "llm" / "pytorch_model.bin")
    _refused(r"pytorch_model.bin is a pickled checkpoint.*refuses", source=str(d), target=t, target_format="mcore")

    d = _copy(src, tmp_path / "s2")
    _edit_json(d / "config.json", s2=True)
    _refused(r"config.json: s2 = True: NVILA's multi-scale S2", source=str(d), target=t, target_format="mcore")

    d = _copy(src, tmp_path / "3x3")
    _edit_json(d / "mm_projector" / "config.json", mm_projector_type="mlp_downsample_3x3_fix")
    _refused(r"mm_projector_type 'mlp_downsample_3x3_fix' \(NVILA-Lite", source=str(d), target=t,
             target_format="mcore")

    d = _copy(src, tmp_path / "intern")
    _edit_json(d / "vision_tower" / "config.json", model_type="intern_vit_6b")
    _refused(r"model_type 'intern_vit_6b'.*InternViT", source=str(d), target=t, target_format="mcore")

    d = _copy(src, tmp_path / "patch")
    _edit_json(d / "config.json", mm_vision_select_feature="patch")
    _refused(r"mm_vision_select_feature 'patch'", source=str(d), target=t, target_format="mcore")

    d = _copy(src, tmp_path / "yarn")
    _edit_json(d / "llm" / "config.json", rope_scaling={"rope_type": "yarn", "factor": 4.0})
    _refused(r"rope_scaling .*'yarn'", source=str(d), target=t, target_format="mcore")

    _refused(r"TP 3 x PP 3 does not divide the model: LLM attention heads 4 .*LLM layers 4", source=src,
             target=t, target_format="mcore", tensor_model_parallel_size=3, pipeline_model_parallel_size=3)

    d = _copy(src, tmp_path / "tensors")
    vt = d / "vision_tower" / "model.safetensors"
    sd = load_file(vt)
    del sd["vision_model.post_layernorm.bias"]
    sd["vision_model.extra.weight"] = torch.zeros(2)
    sd["vision_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(7, 32, dtype=torch.bfloat16)
    save_file(sd, vt, metadata={"format": "pt"})
    msg = _refused(r"does not match the model", source=str(d), target=t, target_format="hf")
    assert "1 missing" in msg and "post_layernorm.bias" in msg
    assert "1 unexpected" in msg and "vision_model.extra.weight" in msg
    assert "1 misshaped" in msg and "layers.0.mlp.fc1.weight: [7, 32], the configs say [48, 32]" in msg

    d = _copy(src, tmp_path / "corrupt")
    with open(d / "mm_projector" / "model.safetensors", "r+b") as f:
        f.truncate(200)
    _refused(r"mm_projector/model.safetensors: .*(truncated|corrupt|not a safetensors)", source=str(d), target=t,
             target_format="mcore")

    os.makedirs(tmp_path / "nothing")
    _refused(r"not a checkpoint this project reads", source=str(tmp_path / "nothing"), target=t,
             target_format="mcore")
    _refused(r"is the source folder", source=src, target=src, target_format="hf")
    os.makedirs(t)
    _refused(r"exists: pass --overwrite", source=src, target=t, target_format="mcore")
    from megatron_longvila.conversion import convert

    convert(source=src, target=t, target_format="mcore", overwrite=True, progress=False)
    assert os.path.isfile(os.path.join(t, "latest_checkpointed_iteration.txt"))


def _kill_after(n):
    count = [0]

    def hook(name):
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), 9)

    return hook


def _convert_and_die(src, target, fmt):
    from megatron_longvila.conversion import convert

    convert(source=src, target=target, target_format=fmt, progress=False, hooks={"after_tensor": _kill_after(5)})


def test_killed_conversion_leaves_no_target(hf, tmp_path):
    from megatron_longvila.conversion import convert

    src = hf[1]["qwen2_tied"]
    for fmt in ("mcore", "hf"):
        target = str(tmp_path / f"killed_{fmt}")
        p = mp.get_context("fork").Process(target=_convert_and_die, args=(src, target, fmt))
        p.start()
        p.join(60)
        assert p.exitcode == -9, p.exitcode
        assert not os.path.exists(target)
        partial = [f for f in os.listdir(tmp_path) if f.startswith(f".killed_{fmt}.partial-")]
        assert len(partial) == 1 and os.listdir(tmp_path / partial[0])  # it had started writing
        convert(source=src, target=target, target_format=fmt, progress=False)
        assert os.path.exists(target)
        assert not [f for f in os.listdir(tmp_path) if f.startswith(f".killed_{fmt}.partial-")]


def test_command_line(hf, tmp_path):
    src = hf[1]["llama"]
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    r = subprocess.run([sys.executable, tool, "--source", src, "--target", str(tmp_path / "n"), "--target-format",
                        "nemo", "--json", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["source_format"] == "hf" and summary["target_format"] == "nemo" and summary["bytes"] > 0
    assert any("column_major is a guess" in n for n in summary["notes"])
    r = subprocess.run([sys.executable, tool, "--source", src, "--target", str(tmp_path / "n"), "--target-format",
                        "hf"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error:" in r.stderr and "--overwrite" in r.stderr
