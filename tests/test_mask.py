"""The bit-packed mask layout every op takes."""
import pytest
import torch

from sparsebert.ops import mask_nnz, masks_equal, pack_mask, unpack_mask


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 8), (2, 3, 13), (0, 5), (4, 0)])
def test_round_trip_and_count(shape):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(shape, generator=g) < 0.3
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*shape[:-1], (shape[-1] + 7) // 8)
    assert torch.equal(unpack_mask(packed, shape[-1]), mask)
    assert mask_nnz(packed) == int(mask.sum())


def test_bit_order_is_little_endian_within_a_byte():
    mask = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert pack_mask(mask).tolist() == [[1, 2]]


def test_errors():
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_mask(torch.tensor(True))
    with pytest.raises(TypeError, match="uint8"):
        unpack_mask(torch.zeros(2, 1, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="packs into 2 bytes"):
        unpack_mask(torch.zeros(2, 1, dtype=torch.uint8), 9)


@pytest.mark.parametrize("shape", [(3072, 96), (33, 3), (7,), (5, 8)])
def test_masks_equal_finds_any_single_differing_bit(shape):
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    assert masks_equal(a, a.clone())
    flat = a.reshape(-1)
    for i in (0, flat.numel() // 2, flat.numel() - 1):  # first, middle, last byte of an 8-byte word
        for bit in (0, 7):
            b = a.clone()
            b.view(-1)[i] ^= 1 << bit
            assert not masks_equal(a, b) and not masks_equal(b, a)


def test_masks_equal_on_views_and_shapes():
    a = torch.arange(256, dtype=torch.uint8).repeat(4).reshape(16, 64)
    assert masks_equal(a[:, 8:16], a.clone()[:, 8:16])        # non-contiguous
    assert masks_equal(a.view(-1)[3:67], a.clone().view(-1)[3:67])  # unaligned offset
    assert not masks_equal(a.view(-1)[3:67], a.view(-1)[4:68])
    assert not masks_equal(a, a.reshape(64, 16))               # same bytes, another shape
    assert not masks_equal(a[:2], a[:1])
