import pytest
import torch

from megatron_longvila.data.packing import concat_samples, pack_samples
from megatron_longvila.data.sample import IGNORE_INDEX, MediaItem, Sample


def _sample(n, learned, weight=1.0, media=None, sid=""):
    ids = torch.arange(100, 100 + n)
    labels = torch.full((n,), IGNORE_INDEX)
    labels[n - learned :] = ids[n - learned :]
    return Sample(ids, labels, media or [], weight, sid, index=n)


def test_concat_positions_lens_and_media_offsets():
    v = MediaItem("video", "/v.mp4", [0, 5], [1, 4], 3, 24.0)
    a, b = _sample(5, 2, sid="a"), _sample(8, 3, media=[v], sid="b")
    p = concat_samples([a, b])
    assert p.seq_lens == [5, 8] and len(p) == 13
    assert p.position_ids.tolist() == list(range(5)) + list(range(8))
    assert torch.equal(p.input_ids, torch.cat([a.input_ids, b.input_ids]))
    assert p.media[0].frame_offsets == [6, 9] and v.frame_offsets == [1, 4]  # moved copy, original intact
    assert p.cu_seqlens.tolist() == [0, 5, 13] and p.sample_ids == ["a", "b"]


def test_loss_weighting_token_and_sample():
    a, b = _sample(5, 2, weight=2.0), _sample(8, 4, weight=1.0)
    tok = concat_samples([a, b], loss_weighting="token").loss_weights
    assert tok.tolist() == [0, 0, 0, 2, 2] + [0] * 4 + [1] * 4
    smp = concat_samples([a, b], loss_weighting="sample").loss_weights
    # Each sample's weights sum to its loss_weight, however many tokens it learns.
    assert smp[:5].sum().item() == pytest.approx(2.0) and smp[5:].sum().item() == pytest.approx(1.0)
    assert (smp[(concat_samples([a, b]).labels == IGNORE_INDEX)] == 0).all()


def test_pack_sequential_and_first_fit():
    samples = [_sample(n, 1) for n in (6, 5, 4, 3, 9)]
    seq = pack_samples(samples, 10)
    assert [p.seq_lens for p in seq] == [[6], [5, 4], [3], [9]]
    ff = pack_samples(samples, 10, strategy="first_fit")
    assert [p.seq_lens for p in ff] == [[9], [6, 4], [5, 3]]  # longest first, first bin with room
    assert all(len(p) <= 10 for p in ff)
    with pytest.raises(ValueError):
        pack_samples([_sample(11, 1)], 10)
