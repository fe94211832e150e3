"""Checkpoint conversion: Hugging Face VILA / base models / NeMo 2 <-> this project's torch_dist checkpoints.

    load_longvila(path, *, params_dtype=torch.float32) -> LongVILAModel   any format, this rank's TP x PP (the public contract)
    convert(target=..., target_format="hf" | "mcore" | "nemo", source=... | llm=..., vision_tower=...)
    detect_format(path), open_source(path, ...), read_record(path, ...), load_weights(model, path),
    load_pretrained(path, model)          (the training loop's --pretrained-checkpoint)
    ConversionError                       every refusal, naming the key, file or flag

Modules: mappings (every tensor mapping, both directions), storage (streaming safetensors / torch_dist, atomic
targets, progress), hf_vila (VILA's released layout, both flavours), hf_base (Qwen2/Llama + SigLIP folders, a
stage-1 start), mcore (this project's checkpoints), nemo (NeMo 2's NeVA layout), hf_common (the HF writer),
load, convert. docs/CONVERSION.md describes the formats, the mappings and what was guessed.
"""

from ..errors import ConversionError
from .convert import convert
from .load import FORMATS, apply_record, detect_format, load_longvila, load_pretrained, load_weights, open_source, \
    read_record

__all__ = ["load_longvila", "convert", "detect_format", "open_source", "read_record", "load_weights",
           "load_pretrained", "apply_record", "ConversionError", "FORMATS"]
