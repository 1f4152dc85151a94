"""CAP's contrastive terms (Xu et al., AAAI 2022): the sparse model's sentence representation ([CLS] of
the last layer) is pulled towards the representation of the same example (unsupervised) or of
same-label examples (supervised) produced by another model, and pushed from other examples':
  PrC: the pre-trained model;  SnC: snapshots of the model taken during pruning;  FiC: the fine-tuned teacher.

For an anchor z_i and keys z'_a (a in A_i, the candidates), with cosine similarity s and temperature tau:
  L_i = -1/|P_i| sum_{p in P_i} log( exp(s(z_i, z'_p)/tau) / sum_{a in A_i} exp(s(z_i, z'_a)/tau) )
with P_i = {the same example} (unsupervised) or {examples with the same label} (supervised).
Keys are the other model's representations of the batch plus negatives sampled from a memory bank.

Banks are indexed by global example index (batch["index"]), never by batch position, so they stay right
under shuffling. They hold at most `capacity` examples (slot = index mod capacity, the stored index tells
a hit from a collision), in float16. Under data parallelism (inside `sparsebert.distributed.global_batch`)
the keys and bank writes are the global batch's, all-gathered: every rank's banks hold what a single
process at the same global batch holds, and each rank's anchors meet the same keys.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..distributed import gather_rows, mean_over


def contrastive_loss(anchors: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """anchors [B, d] (with grad), keys [K, d], positives [B, K] bool. Mean over anchors with >= 1 positive."""
    logits = F.normalize(anchors.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = positives.to(log_prob.dtype)
    count = pos.sum(1)
    has = count > 0
    per_anchor = -(log_prob * pos).sum(1)[has] / count[has]
    return mean_over(per_anchor.sum(), has.sum())


class MemoryBank:
    """Representations of training examples by global index: at most `capacity` of them, float16."""

    def __init__(self, capacity: int, dim: int, device: torch.device | str = "cpu"):
        self.capacity, self.dim = capacity, dim
        self.feats = torch.zeros(capacity, dim, dtype=torch.float16, device=device)
        self.index = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.labels = torch.full((capacity,), -1, dtype=torch.long, device=device)

    def write(self, index: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Store the representations (and labels) of these examples, replacing what their slots held."""
        slot = index % self.capacity
        self.feats[slot] = feats.detach().to(torch.float16)
        self.index[slot] = index
        self.labels[slot] = labels if labels is not None else -1

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(feats [B, d] float32, found [B] bool) for these examples."""
        slot = index % self.capacity
        return self.feats[slot].float(), self.index[slot] == index

    def sample(self, n: int, generator: torch.Generator,
               exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to n stored entries (feats float32, index, labels), uniformly, skipping `exclude` indices."""
        filled = (self.index >= 0).nonzero().squeeze(1)
        if exclude is not None and filled.numel():
            filled = filled[~torch.isin(self.index[filled], exclude)]
        if filled.numel() > n:
            pick = torch.randperm(filled.numel(), generator=generator)[:n].to(filled.device)
            filled = filled[pick]
        return self.feats[filled].float(), self.index[filled], self.labels[filled]

    def state_dict(self) -> dict:
        """The tensors to save for resume."""
        return {"feats": self.feats, "index": self.index, "labels": self.labels}

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()."""
        for key in ("feats", "index", "labels"):
            getattr(self, key).copy_(state[key])


@dataclasses.dataclass
class ContrastiveConfig:
    """Defaults from the CAP reference scripts (tau 0.1, 4096 extra examples, unsupervised weight 0.1).
    Their supervised weight (10) multiplies a loss normalised differently; with the per-anchor mean
    above, 0.1 puts both parts on the same footing."""
    temperature: float = 0.1
    unsupervised: float = 0.1
    supervised: float = 0.1
    pretrained: bool = True  # PrC
    snapshots: bool = True  # SnC
    finetuned: bool = True  # FiC
    negatives: int = 4096  # sampled from each bank per step
    capacity: int = 16384  # examples per bank
    max_snapshots: int = 4
    seed: int = 0


class ContrastiveModule:
    """Banks and losses for PrC, SnC and FiC. `loss(...)` is called once per training step."""

    def __init__(self, config: ContrastiveConfig, dim: int, train_size: int, device: torch.device | str = "cpu"):
        self.config = config
        capacity = min(config.capacity, max(1, train_size))
        self.banks: dict[str, MemoryBank] = {}
        if config.pretrained:
            self.banks["pretrained"] = MemoryBank(capacity, dim, device)
        if config.finetuned:
            self.banks["finetuned"] = MemoryBank(capacity, dim, device)
        self.snapshots = [MemoryBank(capacity, dim, device) for _ in range(config.max_snapshots if config.snapshots else 0)]
        self.current = 0  # the snapshot bank being written now
        self.taken = 0  # snapshots started so far
        self.generator = torch.Generator().manual_seed(config.seed)

    def new_snapshot(self) -> None:
        """Start a new snapshot (call at pruning milestones): the oldest bank is recycled. Until it is
        refilled, the other banks hold the models of earlier stages of pruning."""
        if not self.snapshots:
            return
        self.taken += 1
        self.current = self.taken % len(self.snapshots)
        bank = self.snapshots[self.current]
        bank.index.fill_(-1)

    def _term(self, z: torch.Tensor, batch_keys: torch.Tensor, banks: list[MemoryBank], index, labels,
              batch_index, batch_labels) -> dict[str, torch.Tensor]:
        """Unsupervised and supervised losses of anchors z (examples `index`, `labels`) against keys =
        batch_keys (the batch's `batch_index`, `batch_labels`; may be None) + bank entries."""
        keys, key_index, key_labels = [], [], []
        no_labels = torch.full_like(batch_index, -1)
        if batch_keys is not None:
            keys.append(batch_keys.float())
            key_index.append(batch_index)
            key_labels.append(batch_labels if batch_labels is not None else no_labels)
        per_bank = max(1, self.config.negatives // max(1, len(banks)))
        for bank in banks:
            if batch_keys is None:  # snapshots: the positives are the examples' stored representations
                feats, found = bank.lookup(batch_index)
                keys.append(feats[found])
                key_index.append(batch_index[found])
                key_labels.append((batch_labels if batch_labels is not None else no_labels)[found])
            feats, idx, lab = bank.sample(per_bank, self.generator, exclude=batch_index)
            keys.append(feats.to(z.device))
            key_index.append(idx.to(z.device))
            key_labels.append(lab.to(z.device))
        keys, key_index, key_labels = torch.cat(keys), torch.cat(key_index), torch.cat(key_labels)
        out = {}
        if keys.shape[0] == 0:
            return out
        tau = self.config.temperature
        if self.config.unsupervised:
            out["unsup"] = contrastive_loss(z, keys, index[:, None] == key_index[None, :], tau)
        if self.config.supervised and labels is not None:
            out["sup"] = contrastive_loss(z, keys, (labels[:, None] == key_labels[None, :]) & (key_labels[None, :] >= 0), tau)
        return out

    def loss(self, z: torch.Tensor, index: torch.Tensor, labels: torch.Tensor | None,
             pretrained_z: torch.Tensor | None, finetuned_z: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """z: the student's representations [B, d] (with grad); *_z: the other models' for the batch."""
        terms: dict[str, dict[str, torch.Tensor]] = {}
        if labels is not None and labels.is_floating_point():
            labels = None  # regression: no classes to share
        batch = (gather_rows(index), gather_rows(labels) if labels is not None else None)
        if self.config.pretrained and pretrained_z is not None:
            pretrained_z = gather_rows(pretrained_z)
            terms["prc"] = self._term(z, pretrained_z, [self.banks["pretrained"]], index, labels, *batch)
            self.banks["pretrained"].write(batch[0], pretrained_z, batch[1])
        if self.config.finetuned and finetuned_z is not None:
            finetuned_z = gather_rows(finetuned_z)
            terms["fic"] = self._term(z, finetuned_z, [self.banks["finetuned"]], index, labels, *batch)
            self.banks["finetuned"].write(batch[0], finetuned_z, batch[1])
        if self.snapshots:
            past = [b for i, b in enumerate(self.snapshots) if i != self.current and (b.index >= 0).any()]
            if past:
                terms["snc"] = self._term(z, None, past, index, labels, *batch)
            self.snapshots[self.current].write(batch[0], gather_rows(z), batch[1])
        total = z.sum() * 0.0
        logs = {}
        for name, parts in terms.items():
            for kind, value in parts.items():
                weight = self.config.unsupervised if kind == "unsup" else self.config.supervised
                total = total + weight * value
                logs[f"{name}_{kind}"] = value.item()
        return total, logs

    def state_dict(self) -> dict:
        """The tensors to save for resume."""
        state = {f"bank.{k}.{t}": v for k, b in self.banks.items() for t, v in b.state_dict().items()}
        state.update({f"snapshot.{i}.{t}": v for i, b in enumerate(self.snapshots) for t, v in b.state_dict().items()})
        state["current"], state["taken"] = self.current, self.taken
        state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore state_dict()."""
        for k, b in self.banks.items():
            b.load_state_dict({t: state[f"bank.{k}.{t}"] for t in ("feats", "index", "labels")})
        for i, b in enumerate(self.snapshots):
            b.load_state_dict({t: state[f"snapshot.{i}.{t}"] for t in ("feats", "index", "labels")})
        self.current, self.taken = int(state["current"]), int(state["taken"])
        self.generator.set_state(state["generator"])
