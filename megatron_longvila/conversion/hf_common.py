"""Hugging Face folders: weights (safetensors only), tokenizer and media facts, non-tensor files, and the writer of
the VILA layout shared by every source.

    FolderWeights(folder, where)      the safetensors tensors of one folder (index or files); pickled .bin refused
    collect_assets(root, prefix)      every non-weight file under a folder, byte for byte
    tokenizer_facts(files, ...)       vocabulary size, VILA's media token ids, "\\n" id, eos/pad, chat template
    media_facts(top_config, preprocessor)   image aspect mode, mean/std, size, frames, fps, frame separator
    write_hf_vila(source, root, dtype, progress)   the VILA layout (config.json, llm/, vision_tower/, mm_projector/)
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..data.tokenizer import VILA_TOKENS
from ..errors import ConversionError
from ..models.record import HF_FACTS_FILE, ModelRecord, hf_facts_file
from .mappings import (canonical_specs, canonical_to_hf, COMPONENTS, encoder_configs, hf_sources_of, hf_specs,
                       llm_config_v4, vila_config_mismatches, vila_export_problems, vila_frame_separator)
from .storage import (SafetensorsFile, SafetensorsWriter, check_inside, plain_file_name, safe_join,
                      tensor_nbytes)

__all__ = ["FolderWeights", "collect_assets", "tokenizer_facts", "media_facts", "write_hf_vila", "read_json",
           "SHARD_BYTES", "dump_json"]

SHARD_BYTES = 5 * 10**9
"""Largest LLM shard written when the source's own layout is not reused (transformers 4.x's default 5GB)."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_INDEX = "model.safetensors.index.json"
MAX_ASSET_BYTES = 64 * 2**20
"""Largest non-weight file collected (larger than any tokenizer or processor file); larger ones are skipped."""


def read_json(path: str, where: Optional[str] = None) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{where or path}: missing") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{where or path}: not JSON ({e})") from None


def dump_json(d: dict) -> bytes:
    """JSON as transformers writes configs (indent 2, sorted keys, final newline)."""
    return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()


class FolderWeights:
    """The tensors of one Hugging Face folder: `model.safetensors.index.json`'s files, or every *.safetensors file.

    Pickled weights (`*.bin`, `*.pt`) are refused: loading them runs arbitrary code. `rename` maps stored names to
    the names the mapping uses (e.g. SigLIP saved by transformers 5 without the `vision_model.` prefix).
    """

    def __init__(self, folder: str, where: str, rename=None):
        self.folder = folder
        if not os.path.isdir(folder):
            raise ConversionError(f"{where}: folder {folder} is missing")
        files = sorted(os.listdir(folder))
        st = [f for f in files if f.endswith(".safetensors")]
        pickled = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if not st:
            if pickled:
                raise ConversionError(f"{where}: {os.path.join(folder, pickled[0])} is a pickled checkpoint, which "
                                      f"this converter refuses to load (unpickling runs arbitrary code). Convert it "
                                      f"to safetensors with a trusted tool first (transformers' save_pretrained(..., "
                                      f"safe_serialization=True))")
            raise ConversionError(f"{where}: no *.safetensors weights in {folder}")
        index = os.path.join(folder, _INDEX)
        if os.path.isfile(index):
            check_inside(index, folder, "the index")
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict):
                raise ConversionError(f"{index}: no weight_map")
            st = sorted({plain_file_name(v, index) for v in wm.values()})
            missing = [f for f in st if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise ConversionError(f"{index} names shard files that are missing: {missing}")
        for f in st:
            check_inside(os.path.join(folder, f), folder, "a weight file")
        self.files = {f: SafetensorsFile(os.path.join(folder, f)) for f in st}
        self.where: Dict[str, Tuple[str, str]] = {}  # mapped name -> (file, stored name)
        dup = []
        for fname, sf in self.files.items():
            for name in sf.names():
                mapped = rename(name) if rename else name
                if mapped is None:
                    continue
                if mapped in self.where:
                    dup.append(mapped)
                self.where[mapped] = (fname, name)
        if dup:
            raise ConversionError(f"{where}: tensors stored twice: {dup[:10]}")

    def shape(self, name: str) -> Tuple[int, ...]:
        f, n = self.where[name]
        return self.files[f].entries[n][1]

    def dtype(self, name: str) -> torch.dtype:
        f, n = self.where[name]
        return self.files[f].entries[n][0]

    def read(self, name: str) -> torch.Tensor:
        f, n = self.where[name]
        return self.files[f].read(n)

    def headers(self) -> Dict[str, str]:
        return {f: sf.header_text for f, sf in self.files.items()}

    def close(self) -> None:
        for sf in self.files.values():
            sf.close()


def collect_assets(folder: str, prefix: str, skip_dirs: Iterable[str] = ()) -> Dict[str, bytes]:
    """Every file under `folder` that is not a weight file, keyed `prefix + relative path`, byte for byte.
    A symlink out of `folder` is refused; a file over MAX_ASSET_BYTES is skipped with a warning."""
    import logging

    out: Dict[str, bytes] = {}
    skip = {os.path.normpath(os.path.join(folder, d)) for d in skip_dirs}
    for dirpath, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if os.path.normpath(os.path.join(dirpath, d)) not in skip
                         and not d.startswith("."))
        for name in sorted(files):
            if name.endswith(_WEIGHT_SUFFIXES) or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            check_inside(full, folder, "a non-weight file")
            size = os.path.getsize(full)
            if size > MAX_ASSET_BYTES or not os.path.isfile(full):
                logging.getLogger("megatron_longvila.conversion").warning(
                    "%s: skipped (%d bytes, not a regular file or over the %d MiB asset limit: not a tokenizer or "
                    "processor file; it does not travel with the conversion)", full, size, MAX_ASSET_BYTES >> 20)
                continue
            with open(full, "rb") as f:
                out[prefix + os.path.relpath(full, folder).replace(os.sep, "/")] = f.read()
    return out


# ----------------------------------------------------------------------------------------------------
# Tokenizer and media facts
# ----------------------------------------------------------------------------------------------------

def _content(tok) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def tokenizer_facts(files: Dict[str, bytes], prefix: str, *, vila_tokens: bool) -> dict:
    """Facts of the tokenizer among `files` (assets under `prefix`, e.g. "llm/").

    vila_tokens: place VILA's three tokens (VILA_TOKENS) where VILA's loader does (existing ids, else appended
    after len(tokenizer)) and report `<image>` as the media token; False (a base model): media ids are left to the
    training run's tokenizer.
    """
    def get(name):
        return files.get(prefix + name)

    vocab: Dict[str, int] = {}
    added: Dict[str, int] = {}
    kind = None
    nl_piece = None
    if get("tokenizer.json") is not None:
        tj = json.loads(get("tokenizer.json"))
        model = tj.get("model", {})
        v = model.get("vocab")
        if isinstance(v, dict):
            vocab = {k: int(i) for k, i in v.items()}
        elif isinstance(v, list):  # unigram: [[piece, score], ...]
            vocab = {p[0]: i for i, p in enumerate(v)}
        for t in tj.get("added_tokens", []):
            added[t["content"]] = int(t["id"])
        kind = "tokenizer.json"
        nl_piece = "Ċ" if "Ċ" in vocab else ("<0x0A>" if "<0x0A>" in vocab else None)
    elif get("vocab.json") is not None:
        vocab = {k: int(i) for k, i in json.loads(get("vocab.json")).items()}
        kind = "vocab.json"
        nl_piece = "Ċ" if "Ċ" in vocab else None
    elif get("tokenizer.model") is not None:
        import tempfile

        import sentencepiece as spm

        with tempfile.NamedTemporaryFile(suffix=".model") as f:
            f.write(get("tokenizer.model"))
            f.flush()
            sp = spm.SentencePieceProcessor(model_file=f.name)
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        kind = "tokenizer.model"
        nl_piece = "<0x0A>" if "<0x0A>" in vocab else None
    if get("added_tokens.json") is not None:
        added.update({k: int(i) for k, i in json.loads(get("added_tokens.json")).items()})
    cfg = json.loads(get("tokenizer_config.json")) if get("tokenizer_config.json") is not None else {}
    for i, t in (cfg.get("added_tokens_decoder") or {}).items():
        added[_content(t)] = int(i)
    if kind is None:
        return {}
    table = dict(vocab)
    table.update(added)
    size = max(table.values()) + 1 if table else 0
    facts = {"vocab_size": size, "tokenizer_files": kind, "template": None,
             "chat_template": cfg.get("chat_template"),
             "eos_id": table.get(_content(cfg.get("eos_token"))), "pad_id": table.get(_content(cfg.get("pad_token"))),
             "bos_id": table.get(_content(cfg.get("bos_token"))),
             "frame_separator_id": table.get(nl_piece) if nl_piece else None}
    if vila_tokens:
        ids = {}
        for tok in VILA_TOKENS:
            if tok not in table:
                table[tok] = size
                size += 1
            ids[tok] = table[tok]
        facts.update({"vocab_size": size, "sentinel_token_id": ids["<vila/sentinel>"],
                      "media_token_id": ids["<image>"], "video_token_id": ids["<vila/video>"]})
    return facts


def media_facts(top: dict, preprocessor: Optional[dict], frame_separator="\n") -> dict:
    """How VILA preprocesses media for this checkpoint (top-level config and the vision tower's processor);
    frame_separator: what VILA puts after each frame (mappings.vila_frame_separator)."""
    out = {"image_aspect_ratio": top.get("image_aspect_ratio"), "num_video_frames": top.get("num_video_frames"),
           "fps": top.get("fps"), "frame_separator": frame_separator}
    if preprocessor:
        size = preprocessor.get("size")
        if isinstance(size, dict):
            size = size.get("height", size.get("shortest_edge"))
        out.update({"image_mean": preprocessor.get("image_mean"), "image_std": preprocessor.get("image_std"),
                    "image_size": size, "resample": preprocessor.get("resample"),
                    "rescale_factor": preprocessor.get("rescale_factor")})
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------------
# Generated configs (when the source has none: base models, checkpoints trained from scratch)
# ----------------------------------------------------------------------------------------------------

_TORCH_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def llm_config(record: ModelRecord, dtype: torch.dtype) -> dict:
    llm = record.llm
    cfg = {"architectures": ["Qwen2ForCausalLM" if record.llm_type == "qwen2" else "LlamaForCausalLM"],
           "model_type": record.llm_type, "hidden_act": "silu", "hidden_size": llm["hidden_size"],
           "intermediate_size": llm["ffn_hidden_size"], "num_hidden_layers": llm["num_layers"],
           "num_attention_heads": llm["num_attention_heads"], "num_key_value_heads": llm["num_query_groups"],
           "max_position_embeddings": llm["max_position_embeddings"], "rms_norm_eps": llm["norm_epsilon"],
           "rope_theta": record.rope_theta, "rope_scaling": record.rope_scaling,
           "tie_word_embeddings": bool(llm.get("tie_embeddings")), "vocab_size": llm["vocab_size"],
           "torch_dtype": _TORCH_DTYPE.get(dtype, "float32"), "attention_dropout": 0.0, "initializer_range": 0.02,
           "use_cache": True, "transformers_version": "4.46.0"}
    if record.llm_type == "qwen2":
        cfg.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": llm["num_layers"]})
    else:
        cfg.update({"attention_bias": False, "mlp_bias": False})
    for k in ("bos_id", "eos_id"):
        if record.tokenizer.get(k) is not None:
            cfg[k.replace("_id", "_token_id")] = record.tokenizer[k]
    return cfg


def vision_config(record: ModelRecord, dtype: torch.dtype) -> dict:
    v = record.vision_config()
    cfg = {"architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
           "hidden_act": "gelu_pytorch_tanh" if v.activation == "gelu_tanh" else "gelu",
           "hidden_size": v.hidden_size, "image_size": v.image_size, "intermediate_size": v.ffn_hidden_size,
           "layer_norm_eps": v.layernorm_epsilon, "num_attention_heads": v.num_attention_heads,
           "num_channels": 3, "num_hidden_layers": v.num_layers, "patch_size": v.patch_size,
           "attention_dropout": 0.0, "torch_dtype": _TORCH_DTYPE.get(dtype, "float32"),
           "transformers_version": "4.46.0"}
    if not v.head:
        cfg["vision_use_head"] = False
    return cfg


def preprocessor_config(record: ModelRecord) -> dict:
    m = record.media
    size = int(m.get("image_size") or record.vision_config().image_size)
    return {"do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": m.get("image_mean", [0.5, 0.5, 0.5]), "image_std": m.get("image_std", [0.5, 0.5, 0.5]),
            "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
            "resample": m.get("resample", 3), "rescale_factor": m.get("rescale_factor", 1 / 255),
            "size": {"height": size, "width": size}}


def projector_type_hf(record: ModelRecord) -> str:
    """VILA's mm_projector_type for this model: the source's, else the one that means its token order."""
    t = record.hf.get("mm_projector_type")
    if t:
        return t
    # VILA's current code runs mlp_downsample and mlp_downsample_2x2_fix alike (row-major); the explicit name
    # is unambiguous for a row-major model. A column-major model has no VILA name (see write_hf_vila's warning).
    return "mlp_downsample_2x2_fix" if record.token_order == "row_major" else "mlp_downsample"


def projector_config(record: ModelRecord, dtype: torch.dtype) -> dict:
    return {"architectures": ["MultimodalProjector"], "mm_projector_type": projector_type_hf(record),
            "model_type": "v2l_projector", "torch_dtype": _TORCH_DTYPE.get(dtype, "float32"),
            "transformers_version": "4.46.0"}


def top_config(record: ModelRecord, dtype: torch.dtype, llm_cfg: dict, vision_cfg: dict, proj_cfg: dict) -> dict:
    """The dev-flavour top-level config.json (`llava_llama`, also for Qwen2 LLMs, as VILA writes it)."""
    m = record.media
    v = record.vision_config()
    return {"architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "llm_cfg": llm_cfg,
            "vision_tower_cfg": vision_cfg, "mm_projector_cfg": proj_cfg,
            "mm_vision_select_layer": int(record.vision_select_layer), "mm_vision_select_feature": "cls_patch",
            "mm_hidden_size": v.hidden_size, "hidden_size": int(record.llm["hidden_size"]),
            "image_aspect_ratio": m.get("image_aspect_ratio", "resize"),
            "num_video_frames": m.get("num_video_frames", 8), "fps": m.get("fps", 0.0),
            "chat_template": record.tokenizer.get("chat_template"), "s2": False, "dynamic_s2": False,
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "vision_resolution": -1,
            "interpolate_mode": "linear", "drop_path_rate": 0.0, "mm_projector_lr": None,
            "tune_language_model": True, "tune_mm_projector": True, "tune_vision_tower": True,
            "model_dtype": f"torch.{_TORCH_DTYPE.get(dtype, 'float32')}", "resume_path": None,
            "num_time_tokens": 0, "time_token_format": "<t{t}>", "soft_ce_std": 1.0,
            "transformers_version": "4.46.0", **encoder_configs((record.media or {}).get("frame_separator", False))}


# ----------------------------------------------------------------------------------------------------
# Writing the VILA layout
# ----------------------------------------------------------------------------------------------------

def _shards(component: str, names: List[Tuple[str, torch.dtype, Tuple[int, ...]]], headers: Dict[str, str]
            ) -> Tuple[Dict[str, List[Tuple[str, torch.dtype, Tuple[int, ...]]]], Dict[str, Optional[str]], bool]:
    """File layout of a component: the source's (same tensors, dtypes and shapes) or a fresh one.
    Returns ({file: entries}, {file: header text or None}, reused)."""
    mine = {rel[len(component) + 1:]: text for rel, text in headers.items() if rel.startswith(component + "/")}
    want = {n: (d, s) for n, d, s in names}
    if mine:
        layout: Dict[str, List] = {}
        seen = set()
        ok = True
        for fname, text in sorted(mine.items()):
            header = json.loads(text)
            header.pop("__metadata__", None)
            entries = []
            for n in header:
                if n not in want or n in seen:
                    ok = False
                    break
                entries.append((n, *want[n]))
                seen.add(n)
            layout[fname] = entries
            if not ok:
                break
        if ok and seen == set(want):
            return layout, {f: mine[f] for f in layout}, True
    if component != "llm":
        return {"model.safetensors": list(names)}, {"model.safetensors": None}, False
    shards, cur, size = [], [], 0
    for e in names:
        n = tensor_nbytes(e[2], e[1])
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    shards.append(cur)
    if len(shards) == 1:
        return {"model.safetensors": shards[0]}, {"model.safetensors": None}, False
    k = len(shards)
    files = {f"model-{i + 1:05d}-of-{k:05d}.safetensors": s for i, s in enumerate(shards)}
    return files, {f: None for f in files}, False


def _retag(data: bytes, dtype: torch.dtype, keys=("torch_dtype",)) -> bytes:
    cfg = json.loads(data)
    name = _TORCH_DTYPE.get(dtype, "float32")
    for k in keys:
        if k in cfg:
            cfg[k] = name
    if "model_dtype" in cfg:
        cfg["model_dtype"] = f"torch.{name}"
    for sub in ("llm_cfg", "vision_tower_cfg", "mm_projector_cfg"):
        if isinstance(cfg.get(sub), dict) and "torch_dtype" in cfg[sub]:
            cfg[sub]["torch_dtype"] = name
    return dump_json(cfg)


def write_hf_vila(source, root: str, *, dtype: Optional[torch.dtype] = None, progress=None, hooks=None) -> List[str]:
    """Write `source` (any Source) in the Hugging Face VILA layout under `root`; returns notes for the user.

    The source's own non-tensor files (record.assets) are written back byte for byte and its safetensors layout
    (file names, header text) reused when tensors, dtypes and shapes are unchanged, so a conversion round trip
    reproduces the released files exactly. Missing configs are generated in the 4.x form VILA reads.
    """
    import logging

    record: ModelRecord = source.record
    hf = record.hf
    prefix = hf.get("vision_key_prefix", "vision_model.")
    notes: List[str] = []
    problems = vila_export_problems(record)  # before anything is written
    if problems:
        raise ConversionError("VILA would run this model differently from the project, so it is not exported to "
                              "the Hugging Face VILA layout:\n  " + "\n  ".join(problems))
    if record.token_order == "column_major":
        notes.append("the model's projector tokens are column-major (VILA's 2024 code); VILA's current code runs "
                     "mlp_downsample row-major: run this export with VILA code of that time")
    # Output dtype of each HF tensor: --dtype, else the canonical tensor's stored dtype.
    out_dtype: Dict[Tuple[str, str], torch.dtype] = {}
    for spec in canonical_specs(record):
        d = dtype if dtype is not None else source.dtype(spec.key)
        for comp, name in hf_sources_of(record, spec.key, prefix):
            out_dtype[(comp, name)] = d
    per_comp: Dict[str, List] = {c: [] for c in COMPONENTS}
    for t in hf_specs(record, prefix):
        per_comp[t.component].append((t.name, out_dtype[(t.component, t.name)], tuple(t.shape)))
    headers = hf.get("safetensors", {})
    dtypes = {d for d in out_dtype.values()}
    main_dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    retag = hf.get("dtype") is not None and hf.get("dtype") != str(main_dtype).replace("torch.", "")

    writers: Dict[Tuple[str, str], SafetensorsWriter] = {}
    located: Dict[Tuple[str, str], Tuple[str, str]] = {}
    regenerated_index = []
    for comp in COMPONENTS:
        files, texts, reused = _shards(comp, per_comp[comp], headers)
        os.makedirs(os.path.join(root, comp), exist_ok=True)
        for fname, entries in files.items():
            w = SafetensorsWriter(safe_join(os.path.join(root, comp), fname, "a weight file"), entries,
                                  {"format": "pt"}, texts[fname])
            writers[(comp, fname)] = w
            for n, _, _ in entries:
                located[(comp, n)] = (comp, fname)
        if not reused and len(files) > 1:
            total = sum(tensor_nbytes(s, d) for n, d, s in per_comp[comp])
            index = {"metadata": {"total_size": total},
                     "weight_map": {n: f for f, entries in files.items() for n, _, _ in entries}}
            with open(os.path.join(root, comp, _INDEX), "wb") as f:
                f.write((json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
            regenerated_index.append(f"{comp}/{_INDEX}")
        elif not reused:
            regenerated_index.append(f"{comp}/{_INDEX}")  # a single file: no index

    # Non-tensor files: the source's, verbatim; generated where absent.
    assets = dict(record.assets)
    for name in regenerated_index:
        assets.pop(name, None)
    regenerate = set(hf.get("regenerate", []))
    gen_llm = llm_config(record, main_dtype)
    gen_vis = vision_config(record, main_dtype)
    gen_proj = projector_config(record, main_dtype)

    def existing(name):
        return name in assets and name not in regenerate

    if existing("llm/config.json"):
        llm_cfg = json.loads(assets["llm/config.json"])
        if "rope_parameters" in llm_cfg:  # transformers 5 wrote it: VILA reads the 4.x keys
            llm_cfg = llm_config_v4(llm_cfg)
            assets["llm/config.json"] = dump_json(llm_cfg)
    else:
        llm_cfg = gen_llm
        assets["llm/config.json"] = dump_json(llm_cfg)
    if existing("vision_tower/config.json"):
        vis_cfg = json.loads(assets["vision_tower/config.json"])
    else:
        vis_cfg = gen_vis
        assets["vision_tower/config.json"] = dump_json(vis_cfg)
    if not existing("vision_tower/preprocessor_config.json"):
        assets["vision_tower/preprocessor_config.json"] = dump_json(preprocessor_config(record))
    if existing("mm_projector/config.json"):
        proj_cfg = json.loads(assets["mm_projector/config.json"])
    else:
        proj_cfg = gen_proj
        assets["mm_projector/config.json"] = dump_json(proj_cfg)
    if not existing("config.json"):
        assets["config.json"] = dump_json(top_config(record, main_dtype, llm_cfg, vis_cfg, proj_cfg))
    # The configs written (the source's included) must make VILA run this model; what they cannot say travels in
    # HF_FACTS_FILE so the project reads the same record back.
    top = json.loads(assets["config.json"])
    bad = vila_config_mismatches(record, top, proj_cfg, "config.json")
    if bad:
        raise ConversionError("the export's configs would make VILA run another model:\n  " + "\n  ".join(bad))
    prep = json.loads(assets["vision_tower/preprocessor_config.json"])
    sep = vila_frame_separator(top, "config.json", "remote" if top.get("model_type") == "vila" else "dev")
    assets.pop(HF_FACTS_FILE, None)
    facts = hf_facts_file(record, tokenizer_facts(assets, "llm/", vila_tokens=True),
                          media_facts(top, prep, frame_separator=sep))
    if facts is not None:
        assets[HF_FACTS_FILE] = facts
    tok_files = [n for n in assets if n.startswith("llm/") and n.split("/")[-1] in (
        "tokenizer.json", "vocab.json", "tokenizer.model")]
    if not tok_files:
        notes.append("no tokenizer files travel with this checkpoint: copy the LLM's tokenizer into llm/ before "
                     "VILA loads the export")
    for name, data in sorted(assets.items()):
        if retag and name.endswith("config.json"):
            try:
                data = _retag(data, main_dtype)
            except (ValueError, TypeError):
                pass
        p = safe_join(root, name, "a non-weight file of the record")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)

    def write_one(key: str) -> int:
        # A function of its own so that the canonical tensor and its views die on return, before the next read.
        nbytes = 0
        for comp, name, ht in canonical_to_hf(record, key, source.canonical(key), vision_prefix=prefix):
            d = out_dtype[(comp, name)]
            nbytes += writers[located[(comp, name)]].write(name, ht.to(d) if ht.dtype != d else ht)
        return nbytes

    for spec in canonical_specs(record):
        nbytes = write_one(spec.key)
        if progress is not None:
            progress.update(nbytes, spec.key)
        if hooks and "after_tensor" in hooks:
            hooks["after_tensor"](spec.key)
    for w in writers.values():
        w.close()
    for n in notes:
        logging.getLogger("megatron_longvila.conversion").warning(n)
    return notes
