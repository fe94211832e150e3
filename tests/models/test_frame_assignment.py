"""Stage-1 frame assignment: balance bound, determinism, preferences, errors (single process)."""

import math

import pytest

from megatron_longvila.plan.frames import assign_frames, AssignmentError, encoder_cost


@pytest.mark.parametrize("F", [1, 2, 3, 5, 7, 8, 9, 16, 17, 100, 1001])
@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_equal_costs_meet_ceil_bound(F, P):
    a = assign_frames([1.0] * F, P)
    bound = math.ceil(F / P) / (F / P)
    assert a.imbalance() <= bound + 1e-12
    counts = sorted(len(a.frames_of(r)) for r in range(P))
    assert counts[-1] - counts[0] <= 1
    assert sorted(f for r in range(P) for f in a.frames_of(r)) == list(range(F))


def test_equal_costs_are_contiguous_per_rank():
    a = assign_frames([1.0] * 7, 4)
    for r in range(4):
        fr = a.frames_of(r)
        assert fr == list(range(fr[0], fr[0] + len(fr))) if fr else True
    assert a.owner == [0, 0, 1, 1, 2, 2, 3]


def test_fewer_frames_than_ranks_leaves_ranks_empty():
    a = assign_frames([1.0] * 3, 8)
    assert [len(a.frames_of(r)) for r in range(8)] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert a.imbalance() == pytest.approx(8 / 3)  # = ceil(3/8) / (3/8)


def test_mixed_resolutions_balance_cost_not_count():
    big = encoder_cost(448, 448, 14, hidden=1152)
    small = encoder_cost(224, 224, 14, hidden=1152)
    costs = [big] * 4 + [small] * 12
    a = assign_frames(costs, 4)
    loads = a.loads()
    # LPT bound: max load <= mean + the largest single cost.
    assert max(loads) <= sum(costs) / 4 + max(costs)
    assert a.imbalance() < 1.05
    assert big > 4 * small  # attention makes cost super-linear in the patch count


def test_preferred_ranks_keep_loads_and_are_honoured():
    costs = [1.0] * 8
    pref = [3, 3, 2, 2, 1, 1, 0, 0]
    a = assign_frames(costs, 4, preferred=pref)
    assert a.owner == pref
    plain = assign_frames(costs, 4)
    assert sorted(a.loads()) == sorted(plain.loads())
    # An over-subscribed preference is capped by the balanced counts.
    b = assign_frames(costs, 4, preferred=[0] * 8)
    assert b.imbalance() == 1.0 and b.owner[:2] == [0, 0]


def test_deterministic_and_empty():
    costs = [3.0, 1.0, 2.0, 2.0, 1.0, 5.0, 1.0]
    assert assign_frames(costs, 3).owner == assign_frames(list(costs), 3).owner
    e = assign_frames([], 4)
    assert e.owner == [] and e.imbalance() == 1.0


@pytest.mark.parametrize("costs,P,pref,msg", [
    ([1.0], 0, None, "num_ranks"),
    ([0.0], 2, None, "positive"),
    ([1.0, float("nan")], 2, None, "positive"),
    ([1.0], 2, [5], "outside"),
    ([1.0, 1.0], 2, [0], "entries"),
])
def test_bad_input_is_rejected(costs, P, pref, msg):
    with pytest.raises(AssignmentError, match=msg):
        assign_frames(costs, P, preferred=pref)


def test_encoder_cost_counts_whole_patches_and_rejects_tiny_frames():
    assert encoder_cost(384, 384, 14) == encoder_cost(378, 378, 14)  # 27x27 patches either way
    with pytest.raises(AssignmentError, match="smaller than one"):
        encoder_cost(10, 28, 14)
