"""Which checkpoint a folder named on a command line holds, told from its file names alone (no torch), so a tool
refuses a wrong folder before any rank starts.

    checkpoint_format(path) -> "nemo" | "mcore" | "hf" | None     the rules of conversion.load.detect_format
    check_checkpoint_folder(path, flag="--load") -> format        ArgumentError when `path` is none of them, naming
                                                                  the sub-folder that holds one when there is
                                                                  (`--load longvila_demo`: the demo's checkpoint is
                                                                  in longvila_demo/checkpoints)

The formats: NeMo 2 (context/ and weights/), this project's torch_dist (an iteration folder, or a folder whose
tracker names one: layout.iteration_folder), Hugging Face VILA (config.json and the llm/, vision_tower/,
mm_projector/ sub-folders). A tracker that names a missing iteration is refused with layout's message.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..errors import ArgumentError, CheckpointError
from .layout import TRACKER, iteration_folder

__all__ = ["HF_VILA_COMPONENTS", "FORMAT_NAMES", "HINT_SCAN", "checkpoint_format", "check_checkpoint_folder"]

HF_VILA_COMPONENTS = ("llm", "vision_tower", "mm_projector")
"""The sub-folders of the Hugging Face VILA layout (conversion.mappings.COMPONENTS; a test keeps them equal)."""

FORMAT_NAMES = {"nemo": "NeMo 2", "mcore": "this project's torch_dist", "hf": "Hugging Face VILA"}
"""How a message names each format."""

_EXPECTED = (f"a Hugging Face VILA folder (config.json, {'/, '.join(HF_VILA_COMPONENTS)}/), a project torch_dist "
             f"checkpoint ({TRACKER} or an iter_N folder) or NeMo 2 (context/, weights/)")


def checkpoint_format(path: str) -> Optional[str]:
    """The format of the folder `path`, in conversion.load.detect_format's order; None when it is none of them."""
    if os.path.isdir(os.path.join(path, "context")) and os.path.isdir(os.path.join(path, "weights")):
        return "nemo"
    if iteration_folder(path) is not None:
        return "mcore"
    if os.path.isfile(os.path.join(path, "config.json")) and all(
            os.path.isdir(os.path.join(path, c)) for c in HF_VILA_COMPONENTS):
        return "hf"
    return None


HINT_SCAN = 100
"""Sub-folders looked into for the hint, at most (`checkpoints` first): a data folder with thousands of them
answers as quickly as any other."""


def _holding_subfolders(path: str) -> List[Tuple[str, str]]:
    """(name, format) of the sub-folders of `path` that hold a checkpoint, `checkpoints` first (the folder the demo
    saves to), among the first HINT_SCAN."""
    try:
        names = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)))
    except OSError:
        return []
    names.sort(key=lambda n: n != "checkpoints")
    found = []
    for name in names[:HINT_SCAN]:
        try:
            fmt = checkpoint_format(os.path.join(path, name))
        except CheckpointError:  # a tracker naming nothing usable: still this project's format, as detect_format says
            fmt = "mcore"
        if fmt is not None:
            found.append((name, fmt))
    return found


def check_checkpoint_folder(path: str, flag: str = "--load") -> str:
    """The format of the checkpoint folder `path`, or ArgumentError saying what `flag` should name instead."""
    if not os.path.exists(path):
        raise ArgumentError(f"{flag} {path}: no such folder")
    if not os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: a file, not a checkpoint folder")
    try:
        fmt = checkpoint_format(path)
    except CheckpointError as e:  # a tracker that names nothing usable: layout's message says which
        raise ArgumentError(f"{flag} {path}: {e}") from None
    if fmt is not None:
        return fmt
    inside = _holding_subfolders(path)
    if inside:
        first = os.path.join(path, inside[0][0])
        others = f"; {', '.join(n for n, _ in inside[1:4])} too" if len(inside) > 1 else ""
        raise ArgumentError(f"{flag} {path}: not a checkpoint folder, but {first} holds one "
                            f"({FORMAT_NAMES[inside[0][1]]}{others}): give {flag} {first}")
    raise ArgumentError(f"{flag} {path}: not a checkpoint this project reads: expected {_EXPECTED}")
