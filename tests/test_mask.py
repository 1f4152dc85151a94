"""The bit-packed mask layout every op takes."""
import pytest
import torch

from sparsebert.ops import mask_nnz, pack_mask, unpack_mask


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
