"""One conversion: open the source, write the target format into a temporary folder, rename it into place.

    convert(target=..., target_format=..., source=... | llm=... + vision_tower=..., ...) -> dict (summary)

Streaming: the source is read one canonical tensor at a time (a stacked layer tensor at most), each written and
freed before the next is read, so peak memory stays near the largest tensor, not the model (tools/bench_convert.py
measures it). A conversion killed at any point leaves nothing at the target (storage.AtomicTarget); a refused one
leaves the file system as it was (no target, no staging sibling, no parent folder made for it, nothing in the
source). A target that is, contains or lies inside a source is refused, --overwrite or not.
"""

from __future__ import annotations

import time
from typing import Optional

from .hf_common import write_hf_vila
from .load import FORMATS, open_source
from ..errors import ConversionError
from .mcore import write_mcore
from .nemo import write_nemo
from .storage import AtomicTarget, Progress, overlap_error, parse_dtype

__all__ = ["convert"]


def convert(*, target: str, target_format: str, source: Optional[str] = None, source_format: Optional[str] = None,
            llm: Optional[str] = None, vision_tower: Optional[str] = None, tensor_model_parallel_size: int = 1,
            pipeline_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128,
            dtype: Optional[str] = None, overwrite: bool = False, token_order: Optional[str] = None, seed: int = 0,
            progress: bool = True, hooks: Optional[dict] = None) -> dict:
    """Convert a checkpoint (see tools/convert_checkpoint.py for the meaning of each argument).

    hooks (tests): {"after_tensor": fn(name)} runs after each tensor is written.
    Returns {"target", "target_format", "source_format", "seconds", "bytes", "notes"}.
    """
    if target_format not in FORMATS:
        raise ConversionError(f"--target-format {target_format}: choose one of {FORMATS}")
    # Checked before anything is read or written: replacing a target that holds the source deletes the source,
    # and a target inside the source changes it (and the next read of it).
    for src_dir in (source, llm, vision_tower):
        err = overlap_error(src_dir, target) if src_dir is not None else None
        if err is not None:
            raise err
    out_dtype = parse_dtype(dtype)
    t0 = time.perf_counter()
    src = open_source(source, source_format, llm=llm, vision_tower=vision_tower,
                      tensor_model_parallel_size=tensor_model_parallel_size,
                      pipeline_model_parallel_size=pipeline_model_parallel_size,
                      make_vocab_size_divisible_by=make_vocab_size_divisible_by, token_order=token_order, seed=seed)
    out = AtomicTarget(target, overwrite=overwrite)
    try:
        total = src.nbytes()
        bar = Progress(total, f"{src.format} -> {target_format}", enabled=progress)
        layout = dict(tensor_model_parallel_size=tensor_model_parallel_size,
                      pipeline_model_parallel_size=pipeline_model_parallel_size,
                      make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        notes = list(src.record.source.get("notes", []))
        if target_format == "hf":
            notes += write_hf_vila(src, out.tmp, dtype=out_dtype, progress=bar, hooks=hooks)
        elif target_format == "mcore":
            write_mcore(src, out.tmp, dtype=out_dtype, progress=bar, hooks=hooks, **layout)
        else:
            write_nemo(src, out.tmp, dtype=out_dtype, progress=bar, hooks=hooks, **layout)
        bar.close()
        path = out.commit()
    except BaseException:
        out.abort()
        raise
    finally:
        src.close()
    return {"target": path, "target_format": target_format, "source_format": src.format,
            "seconds": time.perf_counter() - t0, "bytes": total, "notes": notes}
