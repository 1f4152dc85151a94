"""Criteria and mask patterns against hand-computed masks."""
import pytest
import torch
from tinybert import encoder

from sparsebert.ops import unpack_mask
from sparsebert.sparsity import CRITERIA, PATTERNS, Importance, MaskedLinear, sparsify

W = torch.tensor([[0.1, -0.5, 0.3, 0.2], [0.4, -0.05, 0.6, -0.7]])
V = torch.tensor([[0.9, 0.0, -0.8, 0.1], [0.2, 0.3, 0.0, 0.05]])


def masks(pattern, tensors, sparsity, use_abs=True, **kw):
    packed, expected = PATTERNS.get(pattern)(Importance(list(tensors), use_abs), sparsity, **kw)
    dense = [unpack_mask(p, t.shape[-1]).int().tolist() for p, t in zip(packed, tensors)]
    assert expected == sum(int(unpack_mask(p, t.shape[-1]).sum()) for p, t in zip(packed, tensors))
    return dense


def test_global_ranks_all_matrices_together():
    # |values| over both: 0.9, 0.8, 0.7, 0.6, 0.5 are the top 5 of 16 at sparsity 0.7 (16 - floor(11.2) = 5).
    assert masks("global", [W, V], 0.7) == [[[0, 1, 0, 0], [0, 0, 1, 1]], [[1, 0, 1, 0], [0, 0, 0, 0]]]


def test_tensor_keeps_the_same_count_in_each_matrix():
    assert masks("tensor", [W, V], 0.5) == [[[0, 1, 0, 0], [1, 0, 1, 1]], [[1, 0, 1, 0], [1, 1, 0, 0]]]


def test_row_keeps_the_same_count_in_each_row():
    assert masks("row", [W], 0.5) == [[[0, 1, 1, 0], [0, 0, 1, 1]]]


def test_nm_two_of_four():
    assert masks("nm", [V], 0.5, n=2, m=4) == [[[1, 0, 1, 0], [1, 1, 0, 0]]]
    # below 1 - n/m the pattern is not reached yet: everything stays
    assert masks("nm", [V], 0.2, n=2, m=4) == [[[1, 1, 1, 1], [1, 1, 1, 1]]]


def test_block_ranks_blocks_by_l1_norm():
    # (1, 2) blocks: row 0 -> 0.6, 0.5; row 1 -> 0.45, 1.3: keep the 2 largest.
    assert masks("block", [W], 0.5, block=(1, 2)) == [[[1, 1, 0, 0], [0, 0, 1, 1]]]


def test_ties_go_to_the_lower_flat_index():
    assert masks("global", [torch.ones(2, 4)], 0.5) == [[[1, 1, 1, 1], [0, 0, 0, 0]]]


def test_signed_scores_for_movement():
    s = torch.tensor([[-3.0, 1.0, 2.0, -1.0]])
    assert masks("global", [s], 0.5, use_abs=False) == [[[0, 1, 1, 0]]]
    assert masks("global", [s], 0.5, use_abs=True) == [[[1, 0, 1, 0]]]


def _modules():
    model = encoder()
    return model, sparsify(model, {"scores": True})


def test_magnitude_and_movement_criteria_pick_their_tensors():
    model, mods = _modules()
    first = next(iter(mods.values()))
    first.scores.data.normal_()
    imp = CRITERIA.get("magnitude")([first])
    assert imp.use_abs and torch.equal(imp.tensors[0], first.weight) and not imp.by_threshold
    imp = CRITERIA.get("movement")([first])
    assert not imp.use_abs and torch.equal(imp.tensors[0], first.scores)
    imp = CRITERIA.get("soft-movement")([first])
    assert imp.by_threshold and torch.allclose(imp.tensors[0], torch.sigmoid(first.scores))


def test_movement_needs_scores():
    model = encoder()
    mods = sparsify(model)
    with pytest.raises(ValueError, match="scores"):
        CRITERIA.get("movement")(list(mods.values()))


def test_structured_prunes_whole_heads_and_neurons():
    # One layer, hidden 4, two heads of 2, four FFN neurons.
    model = encoder(hidden_size=4, num_attention_heads=2, intermediate_size=4, num_hidden_layers=1)
    mods = sparsify(model)
    names, modules = list(mods), list(mods.values())
    for m in modules:
        m.weight.data.fill_(1.0)
    layer = model.encoder.layer[0]
    for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
        lin.weight.data[:2] = 0.1  # head 0 is weak
    layer.attention.output.dense.weight.data[:, :2] = 0.1
    layer.intermediate.dense.weight.data[[1, 3]] = 0.1  # neurons 1 and 3 are weak
    layer.output.dense.weight.data[:, [1, 3]] = 0.1
    packed, expected = PATTERNS.get("structured")(CRITERIA.get("magnitude")(modules), 0.5, names=names, num_heads=2)
    dense = {n: unpack_mask(p, m.in_features) for n, p, m in zip(names, packed, modules)}
    q = dense["encoder.layer.0.attention.self.query"]
    assert not q[:2].any() and q[2:].all()
    o = dense["encoder.layer.0.attention.output.dense"]
    assert not o[:, :2].any() and o[:, 2:].all()
    i = dense["encoder.layer.0.intermediate.dense"]
    assert i[[0, 2]].all() and not i[[1, 3]].any()
    out = dense["encoder.layer.0.output.dense"]
    assert out[:, [0, 2]].all() and not out[:, [1, 3]].any()
    assert expected == sum(int(d.sum()) for d in dense.values()) == 6 * 8


def test_maskedlinear_is_an_nn_linear():
    model, mods = _modules()
    assert all(isinstance(m, torch.nn.Linear) and isinstance(m, MaskedLinear) for m in mods.values())
