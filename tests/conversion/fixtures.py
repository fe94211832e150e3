"""Tiny random Hugging Face checkpoints in the layouts NVIDIA released VILA in (4.x configs and keys), and base
model folders as transformers 5 writes them. Random weights from transformers' own classes (no downloads).

Cases (one per released shape worth telling apart):
    qwen2_tied    Qwen2 with tie_word_embeddings (like qwen2-1.5b-longvila: no lm_head), GQA 4/2, QKV bias, bf16
                  weights, LLM in two shards with an index, SigLIP with an odd 5x5 patch grid and the pooling head
                  (vision_use_head absent), mm_projector_type mlp_downsample, dev flavour (llava_llama), slow
                  tokenizer files (vocab.json + merges.txt) without VILA's tokens (VILA adds them at load)
    qwen2_1m      Qwen2 untied with linear RoPE scaling x4 (like qwen2-7b-longvila-1M), fp32, SigLIP 4x4 grid
                  without head (vision_use_head false), mlp_downsample_2x2_fix, remote-code flavour (model_type vila)
    llama         Llama (no biases) with a vocabulary Megatron pads (257 rows, like Llama-3-LongVILA's 128257),
                  GQA 4/2, a fast tokenizer.json that carries VILA's three tokens, mlp_downsample (column-major guess)
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, patch_size=14)
LLM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)

CASES = {
    "qwen2_tied": dict(llm_type="qwen2", tie=True, rope_theta=15300000.0, rope_scaling=None, image_size=70,
                       head=True, projector="mlp_downsample", flavour="dev", dtype=torch.bfloat16, shards=2,
                       tokenizer="slow"),
    "qwen2_1m": dict(llm_type="qwen2", tie=False, rope_theta=1062356830.0,
                     rope_scaling={"type": "linear", "factor": 4.0}, image_size=56, head=False,
                     projector="mlp_downsample_2x2_fix", flavour="remote", dtype=torch.float32, shards=1,
                     tokenizer="slow"),
    "llama": dict(llm_type="llama", tie=False, rope_theta=207112184.0, rope_scaling=None, image_size=70, head=True,
                  projector="mlp_downsample", flavour="dev", dtype=torch.bfloat16, shards=1, tokenizer="fast"),
}
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("t", "h")]


def _byte_vocab() -> Dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    return vocab


def _write_json(path: str, d: dict) -> None:
    with open(path, "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def write_tokenizer(folder: str, kind: str) -> int:
    """Tokenizer files; returns len(tokenizer) as stored (the LLM's embedding rows)."""
    vocab = _byte_vocab()
    if kind == "slow":  # Qwen2 as VILA saves it: vocab.json, merges.txt, added tokens in the configs
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
        added = {t: len(vocab) + i for i, t in enumerate(SPECIAL)}
        _write_json(os.path.join(folder, "added_tokens.json"), added)
        _write_json(os.path.join(folder, "special_tokens_map.json"), {"eos_token": "<|im_end|>",
                                                                       "pad_token": "<|endoftext|>"})
        _write_json(os.path.join(folder, "tokenizer_config.json"), {
            "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in added.items()},
            "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "model_max_length": 4096, "tokenizer_class": "Qwen2Tokenizer"})
        return len(vocab) + len(SPECIAL)
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Llama-3-LongVILA style: one special token in the stored rows, VILA's three tokens after them.
    tok.add_special_tokens([AddedToken("<|begin_of_text|>", special=True)])
    rows = tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<vila/sentinel>", "<image>", "<vila/video>")])
    tok.save(os.path.join(folder, "tokenizer.json"))
    _write_json(os.path.join(folder, "tokenizer_config.json"), {"bos_token": "<|begin_of_text|>",
                                                                "model_max_length": 4096})
    return rows


def _llm_config(case: dict, rows: int) -> dict:
    cfg = {"architectures": ["Qwen2ForCausalLM" if case["llm_type"] == "qwen2" else "LlamaForCausalLM"],
           "model_type": case["llm_type"], "hidden_act": "silu", **LLM, "vocab_size": rows,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-6 if case["llm_type"] == "qwen2" else 1e-5,
           "rope_theta": case["rope_theta"], "rope_scaling": case["rope_scaling"],
           "tie_word_embeddings": case["tie"], "torch_dtype": str(case["dtype"]).replace("torch.", ""),
           "transformers_version": "4.46.0", "use_cache": True, "attention_dropout": 0.0, "initializer_range": 0.02}
    if case["llm_type"] == "qwen2":
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": 4,
                    "model_max_length": 4096, "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right"})
    else:
        cfg.update({"attention_bias": False, "mlp_bias": False, "bos_token_id": 256})
    return cfg


def _vision_config(case: dict) -> dict:
    cfg = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
           "hidden_act": "gelu_pytorch_tanh", **VISION, "image_size": case["image_size"], "layer_norm_eps": 1e-6,
           "num_channels": 3, "attention_dropout": 0.0, "torch_dtype": str(case["dtype"]).replace("torch.", ""),
           "transformers_version": "4.46.0"}
    if not case["head"]:
        cfg["vision_use_head"] = False  # absent means a head (SigLIP's default), as in qwen2-1.5b-longvila
    return cfg


def _save(state: Dict[str, torch.Tensor], folder: str, shards: int) -> None:
    from safetensors.torch import save_file

    names = list(state)
    if shards == 1:
        save_file({n: state[n].contiguous() for n in names}, os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n].contiguous() for n in part}, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
        total += sum(state[n].numel() * state[n].element_size() for n in part)
    _write_json(os.path.join(folder, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_vila(root: str, name: str, seed: int = 0) -> str:
    """Write case `name` as a Hugging Face VILA checkpoint under root/name; returns the folder."""
    from transformers import AutoConfig, LlamaForCausalLM, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    case = CASES[name]
    out = os.path.join(root, name)
    for sub in ("llm", "vision_tower", "mm_projector"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    rows = write_tokenizer(os.path.join(out, "llm"), case["tokenizer"])
    llm_cfg = _llm_config(case, rows)
    _write_json(os.path.join(out, "llm", "config.json"), llm_cfg)
    _write_json(os.path.join(out, "llm", "generation_config.json"), {"do_sample": False, "max_new_tokens": 64})
    torch.manual_seed(seed)
    cls = Qwen2ForCausalLM if case["llm_type"] == "qwen2" else LlamaForCausalLM
    lm = cls(AutoConfig.from_pretrained(os.path.join(out, "llm")))
    with torch.no_grad():  # norms away from 1 and biases away from 0, so every mapping matters
        for n, p in lm.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    state = {n: t.to(case["dtype"]) for n, t in lm.state_dict().items()
             if not (case["tie"] and n == "lm_head.weight")}
    _save(state, os.path.join(out, "llm"), case["shards"])

    vis_cfg = _vision_config(case)
    _write_json(os.path.join(out, "vision_tower", "config.json"), vis_cfg)
    _write_json(os.path.join(out, "vision_tower", "preprocessor_config.json"), {
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor", "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": case["image_size"], "width": case["image_size"]}})
    vm = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in vis_cfg.items() if k not in (
        "architectures", "model_type", "torch_dtype", "transformers_version", "vision_use_head")},
        vision_use_head=case["head"]))
    with torch.no_grad():
        for n, p in vm.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    # VILA (transformers 4.46) stores SigLIP under vision_model.*; transformers 5 drops the prefix.
    _save({"vision_model." + n: t.to(case["dtype"]) for n, t in vm.state_dict().items()},
          os.path.join(out, "vision_tower"), 1)

    c, h = VISION["hidden_size"], LLM["hidden_size"]
    g = torch.Generator().manual_seed(seed + 1)
    proj = {"layers.1.weight": 1 + 0.1 * torch.randn(4 * c, generator=g),
            "layers.1.bias": 0.1 * torch.randn(4 * c, generator=g),
            "layers.2.weight": torch.randn(h, 4 * c, generator=g) / (4 * c) ** 0.5,
            "layers.2.bias": 0.1 * torch.randn(h, generator=g),
            "layers.4.weight": torch.randn(h, h, generator=g) / h ** 0.5,
            "layers.4.bias": 0.1 * torch.randn(h, generator=g)}
    _save({n: t.to(case["dtype"]) for n, t in proj.items()}, os.path.join(out, "mm_projector"), 1)
    proj_cfg = {"architectures": ["MultimodalProjector"], "mm_projector_type": case["projector"],
                "model_type": "v2l_projector", "torch_dtype": str(case["dtype"]).replace("torch.", ""),
                "transformers_version": "4.46.0"}
    _write_json(os.path.join(out, "mm_projector", "config.json"), proj_cfg)

    top = {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "llm_cfg": llm_cfg,
           "vision_tower_cfg": vis_cfg, "mm_projector_cfg": proj_cfg, "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize", "num_video_frames": 8,
           "fps": 2.0, "s2": False, "dynamic_s2": False, "hidden_size": h, "mm_hidden_size": c,
           "model_dtype": f"torch.{str(case['dtype']).replace('torch.', '')}", "transformers_version": "4.46.0"}
    if case["flavour"] == "remote":
        top.update({"architectures": ["VILAForCausalLM"], "model_type": "vila", "version": "2.0",
                    "auto_map": {"AutoConfig": "modeling_vila.VILAConfig",
                                 "AutoModel": "modeling_vila.VILAForCausalLM"}})
        with open(os.path.join(out, "modeling_vila.py"), "w") as f:
            f.write("# VILA's remote code would be here (copied verbatim by a conversion round trip)\n")
    _write_json(os.path.join(out, "config.json"), top)
    return out


def make_base(root: str, seed: int = 0) -> tuple:
    """A Qwen2 base LLM folder and a SigLIP folder as transformers 5's save_pretrained writes them (rope_parameters,
    SigLIP keys without `vision_model.`), the LLM with a fast tokenizer.json. Returns (llm_dir, vision_dir)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    llm_dir, vis_dir = os.path.join(root, "qwen2_base"), os.path.join(root, "siglip_base")
    os.makedirs(llm_dir, exist_ok=True)
    torch.manual_seed(seed)
    rows = write_tokenizer(llm_dir, "fast")
    cfg = Qwen2Config(vocab_size=rows, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                      **LLM)
    Qwen2ForCausalLM(cfg).save_pretrained(llm_dir)
    vm = SiglipVisionModel(SiglipVisionConfig(**VISION, image_size=56))
    vm.save_pretrained(vis_dir)
    return llm_dir, vis_dir


def list_files(root: str) -> List[str]:
    out = []
    for d, _, files in os.walk(root):
        out += [os.path.relpath(os.path.join(d, f), root) for f in files]
    return sorted(out)
