"""The checkpoint record of a model: what a checkpoint holds, written beside its tensors as versioned JSON.

Every checkpoint the project writes carries `model_record.json`: the LLM's, vision encoder's and projector's
type and shape, RoPE (theta and scaling), which encoder layer feeds the projector, the visual token order and
the tokenizer facts training depends on (vocabulary, media and separator token ids, chat template). A run that
loads a checkpoint builds its model from the record (flags such as --llm default to "from the checkpoint")
and compares the record with the model it built before any tensor is read, so a shape mismatch is an error
naming both values rather than a failure deep inside the distributed-checkpoint reader.

Checkpoints converted from Hugging Face VILA, base models or NeMo (megatron_longvila.conversion) carry more: the
media facts VILA preprocesses with (image aspect mode, mean/std, size, frames, fps), where the weights came from
and what was guessed, the parallel layout the conversion padded for, and the source's non-tensor files (configs,
tokenizer files; `assets`, written verbatim under `model_assets/` beside the record) with the layout of its
safetensors files, so any checkpoint the project saves, after any training, exports back to the VILA layout.

    ModelRecord                               the record (dataclass; to_json / from_json)
    record_of(...) -> ModelRecord             the record of a model being built
    compare_records(saved, built, ...)        raise RecordMismatch naming every difference; return notes
    read_model_record(ckpt_dir) -> ModelRecord | None
    write_model_record(ckpt_dir, record)
    media_settings(record, args=None) -> dict   frames, sampling, separator, image mode, mean, std (flags win)
    training_media(record, settings) -> dict    the record's media after training with those settings
    hf_facts_file(record, tokenizer, media) / merge_hf_facts(data, ...)   what a Hugging Face VILA export cannot say
    RECORD_FILE, RECORD_VERSION, HF_FACTS_FILE

Versions: 1 (the model's shape, RoPE, token order, tokenizer facts), 2 (adds media, default_layout, source, hf and
the assets; the vision dict gains select_layer's companions apply_post_layernorm and head). A reader refuses a
newer version with a message; fields added by later versions get defaults so older records still load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..errors import RecordMismatch
from ..runtime.entry import once
from ..runtime.files import write_text_atomic
from .registry import LLMShape
from .vision import VisionConfig

__all__ = ["ModelRecord", "RecordMismatch", "record_of", "compare_records", "read_model_record",
           "write_model_record", "media_settings", "training_media", "RECORD_FILE", "RECORD_VERSION", "TOKEN_ORDERS", "ASSETS_DIR", "HF_FACTS_FILE",
           "hf_facts_file", "merge_hf_facts"]

RECORD_FILE = "model_record.json"
"""File name of the record inside a checkpoint directory (iter_N/)."""
RECORD_VERSION = 2
"""Schema version written by this code."""
ASSETS_DIR = "model_assets"
"""Folder beside the record holding `ModelRecord.assets`, one file per asset at its relative path."""
TOKEN_ORDERS = ("row_major", "column_major")
"""Order of the projector's output tokens over the 2x2-downsampled grid (VILA since Dec 2024: row-major)."""


@dataclass(kw_only=True)
class ModelRecord:
    """What a LongVILA checkpoint holds (see the module docstring)."""

    llm_type: str = "qwen2"
    """"qwen2" (QKV bias) or "llama" (no QKV bias): the Hugging Face family the LLM maps to."""
    llm: Dict[str, Any] = field(default_factory=dict)
    """The LLM's shape: the fields of `registry.LLMShape` (vocab_size = rows that are real tokens)."""
    padded_vocab_size: int = 0
    """Rows of the embedding and output tables (vocab_size padded for tensor parallelism)."""
    rope_theta: float = 10000.0
    """RoPE base of the LLM."""
    rope_scaling: Optional[Dict[str, Any]] = None
    """None, or {"type": "linear", "factor": f} (positions divided by f; Megatron's seq_len_interpolation_factor)."""
    vision_type: str = "siglip"
    """The encoder family ("siglip")."""
    vision: Dict[str, Any] = field(default_factory=dict)
    """The encoder's shape: the fields of `vision.VisionConfig`."""
    vision_select_layer: int = -1
    """Which encoder hidden state feeds the projector, as transformers' hidden_states index (-1: the last layer,
    followed by the post-norm when vision.apply_post_layernorm; VILA uses -2: 26 of 27 layers, no post-norm)."""
    projector_type: str = "mlp_downsample"
    """Projector family (2x2 space-to-channel, LayerNorm, Linear, GELU, Linear)."""
    projector: Dict[str, Any] = field(default_factory=dict)
    """Projector settings: {"layernorm_epsilon": 1e-5}."""
    token_order: str = "row_major"
    """Order of the projector's tokens over the downsampled grid (TOKEN_ORDERS)."""
    tokenizer: Dict[str, Any] = field(default_factory=dict)
    """Tokenizer facts: vocab_size, media_token_id, frame_separator_id (or None), pad_id, eos_id, template."""
    registry_names: Dict[str, Optional[str]] = field(default_factory=dict)
    """The registry entries the shapes came from ({"llm": "qwen2_7b", "vision": ...}), informational."""
    media: Dict[str, Any] = field(default_factory=dict)
    """How the checkpoint's model sees media (from VILA's configs): image_aspect_ratio ("resize", "pad"),
    image_mean, image_std, image_size, num_video_frames, fps, frame_separator (the text after each frame, "\n"));
    a checkpoint this project trained records what its training used the same way, plus frame_sampling
    ("uniform": frames evenly spread over the video)."""
    default_layout: Dict[str, int] = field(default_factory=dict)
    """The layout a conversion padded the vocabulary for and checked ({"tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 2, "make_vocab_size_divisible_by": 128}); loads at other layouts that divide
    work too."""
    source: Dict[str, Any] = field(default_factory=dict)
    """Provenance of converted weights: {"format": "hf_vila" | "hf_base" | "nemo" | ..., "flavour", "path",
    "notes": [what was guessed, e.g. the token order]}; informational."""
    hf: Dict[str, Any] = field(default_factory=dict)
    """How to write the Hugging Face VILA layout back: {"flavour", "vision_key_prefix", "dtype", "safetensors":
    {relative path: raw header text}, "files": [relative paths of the assets that belong to the layout]}."""
    assets: Dict[str, bytes] = field(default_factory=dict, repr=False, compare=False)
    """Non-tensor files of the source checkpoint by relative path (configs, tokenizer files), byte for byte. Not
    part of the JSON: written as files under ASSETS_DIR beside the record."""
    version: int = RECORD_VERSION
    """Schema version."""

    # ---- views ---------------------------------------------------------------------------------------
    def llm_shape(self) -> LLMShape:
        """The LLM's shape as the builder takes it (vocab_size: the padded table rows)."""
        known = {f.name for f in dataclasses.fields(LLMShape)}
        kw = {k: v for k, v in self.llm.items() if k in known}
        kw["vocab_size"] = int(self.padded_vocab_size or kw["vocab_size"])
        kw["rotary_base"] = self.rope_theta
        return LLMShape(**kw)

    def vision_config(self) -> VisionConfig:
        known = {f.name for f in dataclasses.fields(VisionConfig)}
        kw = {k: v for k, v in self.vision.items() if k in known}
        kw["select_layer"] = int(self.vision_select_layer)
        if kw["select_layer"] != -1 and "apply_post_layernorm" not in self.vision:
            kw["apply_post_layernorm"] = False  # a version-1 record: only -1 ran the post-norm
        return VisionConfig(**kw)

    # ---- JSON ----------------------------------------------------------------------------------------
    def to_json(self) -> str:
        """The record as JSON (the assets are files of their own, see write_model_record)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "assets"}
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Dict[str, Any], where: str = "record") -> "ModelRecord":
        version = int(d.get("version", 0))
        if version < 1 or version > RECORD_VERSION:
            raise RecordMismatch(f"{where}: model record version {version}; this code reads versions 1.."
                                 f"{RECORD_VERSION} (a newer megatron_longvila wrote it: upgrade)")
        known = {f.name for f in dataclasses.fields(cls)} - {"assets"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecordMismatch(f"{where}: unknown model record fields {unknown}")
        rec = cls(**d)
        if rec.token_order not in TOKEN_ORDERS:
            raise RecordMismatch(f"{where}: token_order {rec.token_order!r}, expected one of {TOKEN_ORDERS}")
        return rec

    @classmethod
    def from_json(cls, text: str, where: str = "record") -> "ModelRecord":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordMismatch(f"{where}: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise RecordMismatch(f"{where}: a model record is a JSON object")
        return cls.from_dict(d, where)


def record_of(shape: LLMShape, vision: VisionConfig, *, real_vocab_size: int, tokenizer: Optional[dict] = None,
              llm_type: Optional[str] = None, rope_scaling: Optional[dict] = None,
              vision_select_layer: Optional[int] = None, projector_epsilon: float = 1e-5,
              token_order: str = "row_major", registry_names: Optional[dict] = None, **extra) -> ModelRecord:
    """The record of a model built from `shape` (vocab_size = padded table rows) and `vision`.

    vision_select_layer: defaults to vision.select_layer (and must equal it when given).
    extra: the other ModelRecord fields (media, default_layout, source, hf, assets).
    """
    llm = dataclasses.asdict(shape)
    llm["vocab_size"] = int(real_vocab_size)
    llm.pop("rotary_base")
    vis = dataclasses.asdict(vision)
    select = vis.pop("select_layer")
    if vision_select_layer is not None and int(vision_select_layer) != select:
        raise RecordMismatch(f"vision_select_layer {vision_select_layer} disagrees with the VisionConfig's "
                             f"select_layer {select}")
    return ModelRecord(
        llm_type=llm_type or ("qwen2" if shape.qkv_bias else "llama"), llm=llm, padded_vocab_size=shape.vocab_size,
        rope_theta=float(shape.rotary_base), rope_scaling=rope_scaling, vision=vis,
        vision_select_layer=select, projector={"layernorm_epsilon": projector_epsilon},
        token_order=token_order, tokenizer=dict(tokenizer or {}), registry_names=dict(registry_names or {}), **extra)


# Fields whose difference means the tensors do not fit (or mean something else): always an error.
_SHAPE_FIELDS = ("llm_type", "padded_vocab_size", "vision_type", "vision_select_layer", "projector_type",
                 "token_order")
_LLM_FREE = ("max_position_embeddings",)  # the rotary table's length: not a weight
_TOKENIZER_FIELDS = ("media_token_id",)
"""Tokenizer facts that must agree: the model checks every frame's positions against the media id. The vocabulary
size may grow within the padded tables and the frame separator is the data's choice: differences are notes."""
_TOKENIZER_NOTES = ("vocab_size", "frame_separator_id")


def compare_records(saved: ModelRecord, built: ModelRecord, *, where: str = "checkpoint",
                    rope_change: Optional[str] = None) -> List[str]:
    """Check that `built` (this run's model) can load a checkpoint recorded as `saved`.

    Args:
        rope_change: why RoPE may differ (e.g. "--rotary-base", "recipe context_extension"); None: it may not.

    Returns:
        Notes on allowed differences (RoPE changed on purpose), to be logged once.

    Raises:
        RecordMismatch: every disallowed difference, each with both values.
    """
    bad, notes = [], []

    def diff(name, a, b):
        bad.append(f"{name}: {where} {a!r}, this run {b!r}")

    for f in _SHAPE_FIELDS:
        if getattr(saved, f) != getattr(built, f):
            diff(f, getattr(saved, f), getattr(built, f))
    for k in sorted(set(saved.llm) | set(built.llm)):
        if k not in _LLM_FREE and saved.llm.get(k) != built.llm.get(k):
            diff(f"llm.{k}", saved.llm.get(k), built.llm.get(k))
    # Vision fields a version-1 record lacks take VisionConfig's defaults (older records keep loading).
    vdefault = {f.name: f.default for f in dataclasses.fields(VisionConfig)}
    for k in sorted(set(saved.vision) | set(built.vision)):
        a, b = saved.vision.get(k, vdefault.get(k)), built.vision.get(k, vdefault.get(k))
        if a != b:
            diff(f"vision.{k}", a, b)
    for k in sorted(set(saved.projector) | set(built.projector)):
        if saved.projector.get(k) != built.projector.get(k):
            diff(f"projector.{k}", saved.projector.get(k), built.projector.get(k))
    def known(d, k):
        return d.get(k) is not None

    for k in _TOKENIZER_FIELDS:
        if known(saved.tokenizer, k) and known(built.tokenizer, k) and saved.tokenizer[k] != built.tokenizer[k]:
            diff(f"tokenizer.{k}", saved.tokenizer[k], built.tokenizer[k])
            bad[-1] += (" (give a tokenizer whose <image> has the checkpoint's id, e.g. one carrying the tokens "
                        "the checkpoint's model was trained with)")
    for k in _TOKENIZER_NOTES:
        if known(saved.tokenizer, k) and known(built.tokenizer, k) and saved.tokenizer[k] != built.tokenizer[k]:
            notes.append(f"tokenizer.{k}: {where} {saved.tokenizer[k]!r}, this run {built.tokenizer[k]!r}")
    rope_saved = (float(saved.rope_theta), saved.rope_scaling)
    rope_built = (float(built.rope_theta), built.rope_scaling)
    if rope_saved != rope_built:
        if rope_change is None:
            bad.append(f"RoPE: {where} theta {saved.rope_theta:g} scaling {saved.rope_scaling}, this run theta "
                       f"{built.rope_theta:g} scaling {built.rope_scaling}: RoPE changes only on purpose (give "
                       f"--rotary-base, or use a recipe that extends the context)")
        else:
            notes.append(f"RoPE changes from theta {saved.rope_theta:g} (scaling {saved.rope_scaling}) in the {where} "
                         f"to {built.rope_theta:g} (scaling {built.rope_scaling}): {rope_change}")
    if bad:
        raise RecordMismatch(f"the {where}'s model differs from the one this run builds:\n  " + "\n  ".join(bad)
                             + "\nDrop the flags that change the model (its shape comes from the checkpoint), or "
                               "start from a checkpoint of this shape")
    return notes


def _asset_path(ckpt_dir: str, name: str) -> str:
    norm = os.path.normpath(name)
    if os.path.isabs(norm) or norm.startswith(".."):
        raise RecordMismatch(f"asset name {name!r} leaves the checkpoint folder")
    return os.path.join(ckpt_dir, ASSETS_DIR, norm)


def write_model_record(ckpt_dir: str, record: ModelRecord) -> str:
    """Write `record` into `ckpt_dir` (atomically: temporary file, then rename), its assets first under
    ASSETS_DIR. Returns the record's path."""
    for name, data in sorted(record.assets.items()):
        p = _asset_path(ckpt_dir, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    return write_text_atomic(os.path.join(ckpt_dir, RECORD_FILE), record.to_json())


def read_model_record(ckpt_dir: str) -> Optional[ModelRecord]:
    """The record in `ckpt_dir`, or None when the checkpoint has none (written before records existed)."""
    path = os.path.join(ckpt_dir, RECORD_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = ModelRecord.from_json(f.read(), where=path)
    root = os.path.join(ckpt_dir, ASSETS_DIR)
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                record.assets[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    return record


DEFAULT_NUM_FRAMES = 8
"""Frames per video when neither a flag nor the checkpoint's record says."""

_ANNOUNCED: set = set()


def media_settings(record: ModelRecord, args=None) -> dict:
    """How a run lays out and preprocesses media for the model `record` describes: the record's (what training used,
    or VILA's configs when converted) unless `args` (a run's flags: --num-frames) says otherwise; a flag that differs
    from the record says so once. Training, generation, V-NIAH and conversion all take them from here.

    Returns {"num_frames", "frame_sampling", "frame_separator", "image_mode", "image_mean", "image_std"}."""
    media = getattr(record, "media", None) or {}
    sep = media.get("frame_separator", False)
    mode = {"resize": "resize", "pad": "pad"}.get(media.get("image_aspect_ratio"), "pad")
    recorded = media.get("num_video_frames")
    asked = getattr(args, "num_frames", None)
    if asked is not None and recorded is not None and int(asked) != int(recorded) \
            and (asked, recorded) not in _ANNOUNCED:
        _ANNOUNCED.add((asked, recorded))
        once(f"frames per video: {asked} asked (--num-frames, or the recipe's), the checkpoint's model was trained "
             f"with {recorded}; using {asked}")
    return {"frame_separator": sep if sep else False,
            "num_frames": int(asked or recorded or DEFAULT_NUM_FRAMES),
            "frame_sampling": media.get("frame_sampling", "uniform"),
            "image_mode": mode, "image_mean": tuple(media.get("image_mean") or (0.5, 0.5, 0.5)),
            "image_std": tuple(media.get("image_std") or (0.5, 0.5, 0.5))}


def training_media(record: ModelRecord, settings: dict) -> Dict[str, Any]:
    """The record's `media` after a run trained with `settings` (media_settings' result): what generation, V-NIAH
    and conversion then take by default. Keys VILA's configs use keep VILA's names."""
    media = dict(getattr(record, "media", None) or {})
    media.update(num_video_frames=int(settings["num_frames"]), frame_sampling=settings["frame_sampling"],
                 image_size=int(record.vision["image_size"]), image_aspect_ratio=settings["image_mode"],
                 image_mean=list(settings["image_mean"]), image_std=list(settings["image_std"]),
                 frame_separator=settings["frame_separator"])
    return media


HF_FACTS_FILE = "longvila_facts.json"
"""File an export to the Hugging Face VILA layout adds beside config.json when VILA's files cannot say a fact of the
model's record (a tokenizer without Hugging Face files, such as bytes; media settings VILA has no key for); the
reader takes those facts back from it, so a round trip keeps the record. VILA ignores the file."""
_HF_FACTS_VERSION = 1
VILA_MEDIA = {"frame_sampling": "uniform"}
"""Media settings VILA's code fixes, so its configs need no key for them (frames evenly spread over the video)."""


def hf_facts_file(record: ModelRecord, tokenizer: Dict[str, Any], media: Dict[str, Any]) -> Optional[bytes]:
    """HF_FACTS_FILE's bytes for an export of `record` whose files say `tokenizer` and `media` (what the reader
    derives from them), or None when they say everything (a release's round trip stays byte-identical)."""
    facts: Dict[str, Any] = {}
    if record.tokenizer and not tokenizer:
        facts["tokenizer"] = dict(record.tokenizer)
    extra = {k: v for k, v in (record.media or {}).items() if k not in media and VILA_MEDIA.get(k) != v}
    if extra:
        facts["media"] = extra
    if any(v is not None for v in (record.registry_names or {}).values()):
        facts["registry_names"] = dict(record.registry_names)
    if not facts:
        return None
    facts["version"] = _HF_FACTS_VERSION
    return (json.dumps(facts, indent=1, sort_keys=True) + "\n").encode()


def merge_hf_facts(data: Optional[bytes], tokenizer: Dict[str, Any], media: Dict[str, Any],
                   where: str) -> tuple:
    """(tokenizer, media, registry_names, notes): the facts VILA's files gave, completed from HF_FACTS_FILE's
    `data` (None: no file). VILA's own files win where both say something (someone changed them since)."""
    if data is None:
        return tokenizer, {**VILA_MEDIA, **media}, {}, []
    try:
        facts = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordMismatch(f"{where}: not JSON ({e})") from None
    if not isinstance(facts, dict) or int(facts.get("version", 0)) != _HF_FACTS_VERSION:
        raise RecordMismatch(f"{where}: expected a JSON object with version {_HF_FACTS_VERSION}")
    unknown = sorted(set(facts) - {"version", "tokenizer", "media", "registry_names"})
    if unknown:
        raise RecordMismatch(f"{where}: unknown fields {unknown}")
    notes = []
    tok = dict(tokenizer)
    if facts.get("tokenizer"):
        if tok:
            notes.append(f"{where}: tokenizer facts ignored: the tokenizer files in llm/ say them")
        else:
            tok = dict(facts["tokenizer"])
    med = dict(media)
    for k, v in (facts.get("media") or {}).items():
        if k in med and med[k] != v:
            notes.append(f"{where}: media {k} {v!r} ignored: VILA's configs say {med[k]!r}")
        else:
            med[k] = v
    return tok, {**VILA_MEDIA, **med}, dict(facts.get("registry_names") or {}), notes
