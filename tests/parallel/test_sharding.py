"""Sharding plans: pure layout properties on one process (a mesh object needs no process group)."""

import pytest
import torch

from megatron_longvila.parallel.mesh import MMSPMesh
from megatron_longvila.plan.sequence import coords_of
from megatron_longvila.errors import PlanError
from megatron_longvila.parallel.sharding import plan_sequence
from megatron_longvila.plan.sequence import zigzag_chunk_sizes


def _mesh(U, R, cp_rank=0, ring_first=False):
    r, u = coords_of(cp_rank, U, R, ring_first)
    return MMSPMesh(None, None, None, U, R, cp_rank, u, r, ring_first)


@pytest.mark.parametrize("U,R", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4), (1, 8)])
@pytest.mark.parametrize("seq_lens", [[1], [2], [3], [97], [1, 2, 3, 5, 7, 11, 13], [1000, 1, 1, 1, 17]])
def test_every_token_owned_exactly_once(U, R, seq_lens):
    plan = plan_sequence(_mesh(U, R), seq_lens)
    owned = torch.cat([plan.token_index(c) for c in range(U * R)])
    assert sorted(owned.tolist()) == list(range(sum(seq_lens)))
    assert max(plan.real_lens) - min(plan.real_lens) <= max(2 * len(seq_lens), 2)


def test_zigzag_chunks_are_balanced_and_rotate():
    sizes = zigzag_chunk_sizes([16, 5, 5, 5], 2)
    assert sizes[0] == [4, 4, 4, 4]
    per_rank = [0, 0]
    for s in sizes[1:]:
        assert sum(s) == 5 and max(s) - min(s) <= 1
        per_rank[0] += s[0] + s[3]
        per_rank[1] += s[1] + s[2]
    assert abs(per_rank[0] - per_rank[1]) <= 1  # extras rotate over ranks across documents


def test_zigzag_layout_of_one_document():
    # R=2: rank 0 owns chunks 0 and 3, rank 1 owns chunks 1 and 2
    p0 = plan_sequence(_mesh(1, 2, 0), [8])
    p1 = plan_sequence(_mesh(1, 2, 1), [8])
    assert p0.token_index().tolist() == [0, 1, 6, 7]
    assert p1.token_index().tolist() == [2, 3, 4, 5]
    assert p1.position_ids().tolist() == [2, 3, 4, 5]


def test_position_ids_restart_per_document():
    plan = plan_sequence(_mesh(1, 1), [3, 2])
    assert plan.position_ids().tolist() == [0, 1, 2, 0, 1]


def test_uniform_plan_pads_to_multiple():
    plans = [plan_sequence(_mesh(2, 2, c), [10, 3], uniform=True, pad_to_multiple=4) for c in range(4)]
    assert {p.local_len for p in plans} == {4}
    x = torch.arange(13.0)
    for p in plans:
        s = p.shard(x)
        n = p.token_index().numel()
        assert s.shape[0] == 4 and torch.equal(s[:n], x[p.token_index()]) and torch.all(s[n:] == 0)


def test_shard_gather_single_rank_roundtrip():
    plan = plan_sequence(_mesh(1, 1), [4, 3])
    x = torch.randn(7, 2, requires_grad=True)
    y = plan.gather(plan.shard(x))
    assert torch.equal(y, x)


@pytest.mark.parametrize("bad,msg", [([], "empty"), ([3, 0], ">= 1"), ([-1], ">= 1")])
def test_bad_seq_lens(bad, msg):
    with pytest.raises(PlanError, match=msg):
        plan_sequence(_mesh(2, 2), bad)


def test_bad_padding_and_shapes():
    with pytest.raises(PlanError, match="uniform=True"):
        plan_sequence(_mesh(2, 2), [8], pad_to_multiple=2)
    plan = plan_sequence(_mesh(2, 2), [8])
    with pytest.raises(PlanError, match="covers 8"):
        plan.shard(torch.zeros(9))
