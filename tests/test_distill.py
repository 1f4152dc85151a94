"""Distillation losses against their formulas computed by hand on tiny tensors."""
import math

import pytest
import torch

from sparsebert.distill import (ContrastiveConfig, ContrastiveModule, DistillConfig, MemoryBank, attention_mse,
                                contrastive_loss, distill_loss, hidden_mse, kd_loss, layer_map, soft_cross_entropy)


def test_kd_loss_is_kl_times_t_squared():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    T = 2.0
    expected = 0.0
    for i in range(2):
        p = torch.softmax(t[i] / T, 0)
        q = torch.softmax(s[i] / T, 0)
        expected += float((p * (p.log() - q.log())).sum())
    expected = expected / 2 * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)


def test_soft_cross_entropy():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.0, 1.0]])
    p = torch.softmax(t, -1)[0]
    expected = -(p[0] * torch.log_softmax(s, -1)[0, 0] + p[1] * torch.log_softmax(s, -1)[0, 1])
    assert soft_cross_entropy(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_layer_map_uniform():
    assert layer_map(2, 6) == [0, 3, 6]
    assert layer_map(6, 6) == list(range(7))
    with pytest.raises(ValueError):
        layer_map(4, 6)


def test_hidden_mse_over_real_tokens():
    hs = (torch.zeros(1, 2, 2), torch.ones(1, 2, 2))
    ht = (torch.zeros(1, 2, 2), torch.ones(1, 2, 2), torch.full((1, 2, 2), 3.0))
    mask = torch.tensor([[1, 0]])
    # layer 0 -> 0: 0; layer 1 -> 2: (1 - 3)^2 = 4 on the real token; mean over the two layers = 2.
    assert hidden_mse(hs, ht, [0, 2], mask).item() == pytest.approx(2.0)
    ht2 = (torch.zeros(1, 2, 2), torch.tensor([[[1.0, 1.0], [1.0, 5.0]]]))
    assert hidden_mse(hs, ht2, [0, 1]).item() == pytest.approx((0 + (0 + 0 + 0 + 16) / 4) / 2)


def test_attention_mse_matches_mse_loss_without_padding():
    a_s = (torch.rand(2, 3, 4, 4),)
    a_t = (torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4))
    got = attention_mse(a_s, a_t, [0, 2])
    torch.testing.assert_close(got, torch.nn.functional.mse_loss(a_s[0], a_t[1]))


def test_distill_loss_mixes_by_weights():
    class Out:
        def __init__(self, logits):
            self.logits = logits
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    batch = {"labels": torch.tensor([0])}
    cfg = DistillConfig(task=0.1, logits=0.9, temperature=2.0)
    loss, logs = distill_loss(cfg, Out(s), Out(t), batch, "classification")
    expected = 0.1 * torch.nn.functional.cross_entropy(s, batch["labels"]) + 0.9 * kd_loss(s, t, 2.0)
    assert loss.item() == pytest.approx(expected.item())
    assert set(logs) == {"task", "kd"}


def test_contrastive_loss_is_infonce_by_hand():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    keys = torch.tensor([[1.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    tau = 0.5
    pos = torch.tensor([[True, False, False], [False, True, True]])
    zn = z / z.norm(dim=1, keepdim=True)
    kn = keys / keys.norm(dim=1, keepdim=True)
    sim = zn @ kn.T / tau
    l0 = -(sim[0, 0] - torch.logsumexp(sim[0], 0))
    l1 = -((sim[1, 1] - torch.logsumexp(sim[1], 0)) + (sim[1, 2] - torch.logsumexp(sim[1], 0))) / 2
    assert contrastive_loss(z, keys, pos, tau).item() == pytest.approx(((l0 + l1) / 2).item(), rel=1e-6)
    # the first anchor alone: cos 1/sqrt2, 0, -1 -> a closed form
    a = [math.exp(1 / math.sqrt(2) / tau), 1.0, math.exp(-1 / tau)]
    assert contrastive_loss(z[:1], keys, pos[:1], tau).item() == pytest.approx(-math.log(a[0] / sum(a)), rel=1e-6)


def test_memory_bank_indexes_by_example_and_bounds_memory():
    bank = MemoryBank(capacity=4, dim=3)
    assert bank.feats.dtype == torch.float16
    bank.write(torch.tensor([1, 6]), torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 1]))
    feats, found = bank.lookup(torch.tensor([6, 2, 1]))
    assert found.tolist() == [True, False, True]  # 2 shares slot 2 with 6: a collision is not a hit
    torch.testing.assert_close(feats[0], torch.tensor([0, 1.0, 0]))
    g = torch.Generator().manual_seed(0)
    f, idx, lab = bank.sample(10, g, exclude=torch.tensor([1]))
    assert idx.tolist() == [6] and lab.tolist() == [1]


def test_contrastive_module_terms_and_state():
    cfg = ContrastiveConfig(negatives=8, capacity=8, max_snapshots=2)
    mod = ContrastiveModule(cfg, dim=4, train_size=100)
    assert mod.banks["pretrained"].capacity == 8
    torch.manual_seed(0)
    z = torch.randn(3, 4, requires_grad=True)
    idx, labels = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0])
    loss, logs = mod.loss(z, idx, labels, torch.randn(3, 4), torch.randn(3, 4))
    assert {"prc_unsup", "prc_sup", "fic_unsup", "fic_sup"} <= set(logs) and "snc_unsup" not in logs
    loss.backward()
    assert z.grad is not None
    mod.new_snapshot()
    loss, logs = mod.loss(torch.randn(3, 4), idx, labels, torch.randn(3, 4), torch.randn(3, 4))
    assert "snc_unsup" in logs and logs["snc_unsup"] > 0  # the same examples met in the previous snapshot
    state = mod.state_dict()
    other = ContrastiveModule(cfg, dim=4, train_size=100)
    other.load_state_dict(state)
    assert torch.equal(other.snapshots[0].feats, mod.snapshots[0].feats) and other.current == mod.current
