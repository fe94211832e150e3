"""Where checkpoints live on disk: Megatron's folder naming, the tracker file, and the committed iteration folders.

    TRACKER                                "latest_checkpointed_iteration.txt" (Megatron's name)
    checkpoint_dir(root, iteration)        <root>/iter_0000010
    read_tracker(root) -> int | None       the iteration the tracker names (CheckpointError for a bad tracker)
    write_tracker(root, iteration)         replace the tracker atomically (temporary file, fsync, rename)
    committed_iterations(root) -> [int]    the iter_* folders present, oldest first
    committed_folder(root, iteration)      the folder of a committed iteration, or its `.old` copy mid re-save
    iteration_folder(path) -> str | None   `path` itself when it is an iteration folder, else the one its tracker names
    recover_interrupted_resave(root)       put back an `iter_N.old` whose re-save stopped before the commit
    safe_load(path)                        a file the project wrote with torch.save, read with weights_only=True

A re-save of an existing iteration moves the committed copy to `iter_N.old` first (checkpoint.distributed): until the
new copy is renamed into place, `iter_N.old` is the committed one, and every reader here takes it.

The readers here see the files through runtime.file_view (`visible`, `check_readable`), so a test can give one rank a
stale or failing view of a checkpoint (checkpoint.resume agrees on what every rank loads); unset, nothing changes.
"""

from __future__ import annotations

import os
import re
import shutil
from typing import List, Optional

from ..errors import CheckpointError
from ..runtime.file_view import check_readable, visible
from ..runtime.files import write_text_atomic

__all__ = ["TRACKER", "checkpoint_dir", "read_tracker", "write_tracker", "committed_iterations", "committed_folder",
           "iteration_folder", "recover_interrupted_resave", "is_iteration_folder", "safe_load"]

TRACKER = "latest_checkpointed_iteration.txt"
"""Megatron's tracker file name: the iteration of the last complete checkpoint."""

_ITER_RE = re.compile(r"^iter_(\d{7})$")


def checkpoint_dir(root: str, iteration: int) -> str:
    """Megatron's iteration folder name under `root`."""
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> Optional[int]:
    """The iteration named by the tracker file, or None when there is no complete checkpoint."""
    path = os.path.join(root, TRACKER)
    if not (visible(path) and os.path.isfile(path)):
        return None
    try:
        check_readable(path)
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e.strerror or e})") from None
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number")
    return int(text)


def write_tracker(root: str, iteration: int) -> str:
    """Name `iteration` in the tracker; a reader (or a crash) sees the old or the new number, never half a file."""
    return write_text_atomic(os.path.join(root, TRACKER), str(iteration))


def committed_iterations(root: str) -> List[int]:
    """The iterations with an `iter_*` folder under `root`, oldest first."""
    if not _isdir(root):
        return []
    return sorted(int(m.group(1)) for m in map(_ITER_RE.match, os.listdir(root)) if m
                  and _isdir(os.path.join(root, m.group(0))))


def committed_folder(root: str, iteration: int) -> str:
    """The committed folder of `iteration`: iter_N, or iter_N.old when a re-save of it stopped mid-way."""
    path = checkpoint_dir(root, iteration)
    if not _isdir(path) and _isdir(path + ".old"):
        return path + ".old"
    if not _isdir(path):
        raise CheckpointError(f"{os.path.join(root, TRACKER)} names iteration {iteration} but {path} is missing")
    return path


def is_iteration_folder(path: str) -> bool:
    """Whether `path` holds a torch_dist checkpoint itself (its .metadata and megatron-core's metadata.json)."""
    return all(visible(p) and os.path.isfile(p) for p in (os.path.join(path, ".metadata"),
                                                           os.path.join(path, "metadata.json")))


def iteration_folder(path: str) -> Optional[str]:
    """The iteration folder of a checkpoint: `path` itself when it holds a torch_dist checkpoint, else the one its
    tracker names (or that iteration's committed `.old` copy); None when neither. CheckpointError for a tracker
    that names nothing usable."""
    if is_iteration_folder(path):
        return path
    iteration = read_tracker(path)
    if iteration is None:
        return None
    return committed_folder(path, iteration)


def recover_interrupted_resave(root: str) -> None:
    """Undo a re-save of an existing iteration that stopped between moving the old copy aside and renaming the new
    one into place: `iter_N.old` without `iter_N` is the committed checkpoint; move it back. With `iter_N`
    present, `.old` is a superseded copy and is removed."""
    if not os.path.isdir(root):
        return
    for name in os.listdir(root):
        if not name.endswith(".old"):
            continue
        old = os.path.join(root, name)
        final = old[: -len(".old")]
        if os.path.isdir(final):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def _isdir(path: str) -> bool:
    return visible(path) and os.path.isdir(path)


def safe_load(path: str):
    """A file the project wrote with torch.save, read with weights_only=True (no arbitrary unpickling)."""
    import torch  # here: the rest of this module serves --help and flag checks, which need no torch

    try:
        check_readable(path)
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as e:  # a failing read (EIO on a network file system), not a bad file
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {e.strerror or e})") from None
    except Exception as e:  # pickle.UnpicklingError for forbidden globals, RuntimeError for corrupt zip files
        raise CheckpointError(f"{path} is not a checkpoint file this project wrote (refused to unpickle it: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
