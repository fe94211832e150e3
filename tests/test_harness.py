"""The multi-process harness: results come back per rank, any rank's exception fails with its traceback,
and a hang becomes a timeout error."""

import time

import pytest

from megatron_longvila.errors import DistributedRunError
from megatron_longvila.parallel.launch import run_distributed


def _ok(rank, world, x):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return (rank, world, x, t.item())


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank one is unhappy")
    return rank


def _hang_on_rank_0(rank, world):
    if rank == 0:
        time.sleep(60)
    return rank


def test_results_per_rank():
    assert run_distributed(_ok, 3, "x") == [(r, 3, "x", 3.0) for r in range(3)]


def test_exception_reports_rank_and_traceback():
    with pytest.raises(DistributedRunError, match=r"(?s)rank 1 of 2 raised.*ValueError: rank one is unhappy"):
        run_distributed(_raise_on_rank_1, 2)


def test_timeout_instead_of_hang():
    t0 = time.monotonic()
    with pytest.raises(DistributedRunError, match="timed out"):
        run_distributed(_hang_on_rank_0, 2, timeout=5)
    assert time.monotonic() - t0 < 30
