"""The GPT-only path's loss function (batch.gpt.loss_func): Megatron's (sum, count, report) triple."""

import torch

from megatron_longvila.batch.gpt import loss_func


def test_binary_mask_counts_its_ones():
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    s, n, report = loss_func(torch.tensor([[1.0, 1.0, 0.0, 1.0]]), losses)
    assert float(s) == 7.0 and int(n) == 3 and n.dtype == torch.int
    assert report["lm loss"].tolist() == [7.0, 3.0]


def test_fractional_mask_is_not_truncated_into_the_count():
    """A fractional loss mask weighs each token's loss; the count is the number of tokens that count (3), not the
    mask's sum cast to int (int(1.6) = 1), which would scale the gradient by 3x."""
    losses = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    s, n, _ = loss_func(torch.tensor([[0.3, 0.3, 1.0, 0.0]]), losses)
    assert abs(float(s) - (0.3 + 0.6 + 3.0)) < 1e-6
    assert int(n) == 3
