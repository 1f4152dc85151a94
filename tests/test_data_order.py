"""The epoch order: a permutation fixed by (seed, epoch, lengths); length grouping keeps batch slices
aligned and cuts padding."""
import pytest
import torch

from sparsebert.data.order import GROUP_BATCHES, epoch_order


def padded_tokens(order, lengths, batch_size):
    return sum(int(lengths[b].max()) * len(b) for b in order.split(batch_size))


@pytest.mark.parametrize("n,batch_size", [(1, 4), (37, 4), (400, 8), (1000, 32), (5, 16)])
def test_grouped_order_is_a_permutation_with_aligned_batches(n, batch_size):
    lengths = torch.randint(1, 64, (n,), generator=torch.Generator().manual_seed(n))
    order = epoch_order(n, 3, 1, lengths, batch_size)
    assert torch.equal(order.sort().values, torch.arange(n))
    window = batch_size * GROUP_BATCHES
    # every full batch is a run of one window sorted longest first; a short batch is the last one
    full = n // batch_size
    for b in order[:full * batch_size].split(batch_size):
        assert torch.all(lengths[b][:-1] >= lengths[b][1:])
    plain = epoch_order(n, 3, 1)
    windows = plain.split(window)
    for b in order[:full * batch_size].split(batch_size):
        assert sum(bool(torch.isin(b, w).all()) for w in windows) == 1
    assert torch.equal(order[full * batch_size:].sort().values,
                       torch.cat([w[torch.sort(lengths[w], descending=True, stable=True).indices] for w in windows])
                       [full * batch_size:].sort().values)


def test_order_depends_on_seed_and_epoch_only():
    lengths = torch.randint(1, 64, (500,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(epoch_order(500, 1, 2, lengths, 16), epoch_order(500, 1, 2, lengths.tolist(), 16))
    assert not torch.equal(epoch_order(500, 1, 2, lengths, 16), epoch_order(500, 1, 3, lengths, 16))
    assert not torch.equal(epoch_order(500, 1, 2, lengths, 16), epoch_order(500, 2, 2, lengths, 16))
    assert torch.equal(epoch_order(500, 1, 2), epoch_order(500, 1, 2))


def test_grouping_cuts_padding_of_sentence_lengths():
    # SST-2-like: mostly short phrases, a tail of long sentences
    u = torch.rand(8000, generator=torch.Generator().manual_seed(0))
    lengths = torch.clamp((-12 * torch.log1p(-u) + 3).long(), max=64)
    plain = padded_tokens(epoch_order(8000, 0, 0), lengths, 32)
    grouped = padded_tokens(epoch_order(8000, 0, 0, lengths, 32), lengths, 32)
    assert grouped < plain / 2
    assert grouped >= int(lengths.sum())


def test_bad_lengths():
    with pytest.raises(ValueError, match=r"lengths has shape \(3,\), expected \(4,\)"):
        epoch_order(4, 0, 0, [1, 2, 3], 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        epoch_order(4, 0, 0, [1, 2, 3, 4], 0)
