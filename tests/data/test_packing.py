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


def test_sample_weighting_counts_only_learned_labels():
    """--loss-weighting sample: each sample counts loss_weight in the step's loss whatever its length, also where its
    first label is learned (a caption at position 0, which no position predicts). The step's reduction
    (models.longvila: sum(weight * CE over shifted targets) / total weight) against a hand computation: each
    sample's mean next-token loss, weighted by its loss_weight. Tolerance 1e-6 relative: the weights are float32
    (1/3 is rounded), the rest float64."""
    from megatron_longvila.batch.sample import shift_targets

    g = torch.Generator().manual_seed(0)
    vocab = 13

    def sample(n, first_learned, weight):
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[:first_learned] = IGNORE_INDEX
        return Sample(ids, labels, [], weight, "", index=n)

    # All learned from position 0 (3 and 6 tokens), learned from position 4, and a second weight.
    samples = [sample(3, 0, 1.0), sample(6, 0, 1.0), sample(9, 4, 2.0)]
    packed = concat_samples(samples, loss_weighting="sample")
    targets, weights = shift_targets(packed.labels, packed.loss_weights, packed.seq_lens)
    logits = torch.randn(len(packed), vocab, generator=g, dtype=torch.float64)
    ce = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    loss = (ce * weights).sum() / weights.sum()

    logp = torch.log_softmax(logits, -1)
    per_sample, start = [], 0
    for s in samples:
        terms = [-logp[start + t, int(s.labels[t + 1])].item() for t in range(len(s) - 1)
                 if s.labels[t + 1] != IGNORE_INDEX]
        per_sample.append(s.loss_weight * sum(terms) / len(terms))
        start += len(s)
    expected = sum(per_sample) / sum(s.loss_weight for s in samples)
    assert loss.item() == pytest.approx(expected, rel=1e-6, abs=0)
    # Each sample's shifted weights sum to its loss_weight; the first position of each carries none.
    ends = torch.cumsum(torch.tensor(packed.seq_lens), 0).tolist()
    for s, end in zip(samples, ends):
        assert weights[end - len(s):end].sum().item() == pytest.approx(s.loss_weight, rel=1e-6)
        assert packed.loss_weights[end - len(s)] == 0
