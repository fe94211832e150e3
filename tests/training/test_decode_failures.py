"""A media file that fails to decode at training time: its frames are blanked (ranks stay in step) and the
documents that use it are dropped from the loss; other documents are untouched."""

import types

import torch

from megatron_longvila.training.step import drop_documents_with_failed_media

def test_failed_media_drops_its_document_only():
    from megatron_longvila.models.longvila import IGNORE_INDEX

    seq_lens = [5, 7, 4]
    labels = torch.arange(16)
    mb = types.SimpleNamespace(seq_lens=seq_lens, labels=labels.clone(), loss_weights=torch.ones(16))
    media = [types.SimpleNamespace(frame_offsets=[1]), types.SimpleNamespace(frame_offsets=[6, 8]),
             types.SimpleNamespace(frame_offsets=[12])]
    packed = types.SimpleNamespace(media=media)
    failed = torch.tensor([0.0, 1.0, 0.0])  # the second media item (document 1, positions 5..11) failed
    drop_documents_with_failed_media(mb, packed, failed)
    assert torch.equal(mb.labels[:5], labels[:5]) and torch.equal(mb.labels[12:], labels[12:])
    assert torch.all(mb.labels[5:12] == IGNORE_INDEX) and torch.all(mb.loss_weights[5:12] == 0)
    assert mb.loss_weights[:5].sum() == 5 and mb.loss_weights[12:].sum() == 4

    untouched = types.SimpleNamespace(seq_lens=seq_lens, labels=labels.clone(), loss_weights=torch.ones(16))
    drop_documents_with_failed_media(untouched, packed, torch.zeros(3))
    assert torch.equal(untouched.labels, labels)
