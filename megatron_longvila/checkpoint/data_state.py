"""Where a run's data position is kept in a checkpoint, one layout for both trainers.

    DATA_STATE_DIR                                  "data_state" inside an iteration folder
    data_state_path(iteration_dir, dp_rank) -> str  <iter>/data_state/dp_rank_00003.pt
    writes_data_state() -> bool                     whether this rank writes its replica's file
    read_data_state(iteration_dir, dp_rank) -> dict | None

The ranks of one data-parallel replica (its TP x CP x PP ranks) read identical streams, so a replica's position is
one file, written by its first rank (TP, CP and PP rank 0), and read back by data-parallel rank: a load at another
TP, CP or PP layout reads only its own replica's file (each rank's reads are measured in
tests/training/test_parallel_save.py: one file's worth). The project's loop writes it through the checkpoint's
integrity manifest (checkpoint.distributed); under megatron.training it goes beside Megatron's own files
(training.megatron_lm). Files hold tensors, numbers and strings only and are read with weights_only=True.
"""

from __future__ import annotations

import os
from typing import Optional

from .layout import safe_load

__all__ = ["DATA_STATE_DIR", "data_state_path", "writes_data_state", "read_data_state"]

DATA_STATE_DIR = "data_state"
"""Folder inside an iteration folder holding the training stream's position per data-parallel rank."""


def data_state_path(iteration_dir: str, dp_rank: int) -> str:
    """The file of data-parallel replica `dp_rank` inside `iteration_dir`."""
    return os.path.join(iteration_dir, DATA_STATE_DIR, f"dp_rank_{dp_rank:05d}.pt")


def writes_data_state() -> bool:
    """Whether this rank writes its replica's data position: the replica's TP, CP and PP rank 0."""
    from megatron.core import parallel_state as ps

    return not (ps.get_tensor_model_parallel_rank() or ps.get_context_parallel_rank()
                or ps.get_pipeline_model_parallel_rank())


def read_data_state(iteration_dir: str, dp_rank: int) -> Optional[dict]:
    """Replica `dp_rank`'s data position in `iteration_dir`, or None when the checkpoint holds none for it."""
    path = data_state_path(iteration_dir, dp_rank)
    if not os.path.isfile(path):
        return None
    return safe_load(path)
