"""Block-diagonal empirical Fisher of a weight matrix: the curvature the oBERT criterion ranks with
(Kurtic et al., "The Optimal BERT Surgeon", 2022).

Each row of a weight is cut into blocks of `block` consecutive weights (the last one padded); a block's
Fisher is the average outer product g g^T of the gradients seen, here an exponential moving average
over the optimizer steps with horizon `grads` (bias-corrected as Adam's moments are), so that it
follows the weights as they are pruned and trained. It is damped by `damp` times its mean diagonal
(relative, like SparseGPT's dampening, so that it does not depend on the scale of the loss).

The blocks are `block` times the weight's size: updating them once per gradient is a memory-bound
pass over them that cost about half a MiniLM training step. Gradients are instead held, `fold` at a
time, and folded in with one batched matrix product (the same moving average, summed in another
order), before anything reads the blocks.

Pruning weight q of a block costs w_q^2 / (2 [F^-1]_qq) of loss (OBS) if the rest of the block moves
by -F^-1 e_q w_q / [F^-1]_qq; oBERT ranks by the cost and applies the sum of the moves of the weights
an event prunes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["BlockFisher"]


class BlockFisher:
    """The Fisher blocks of one (rows, cols) weight: `blocks` of shape (rows * nb, block, block) in fp32."""

    def __init__(self, rows: int, cols: int, *, block: int = 50, grads: int = 128, damp: float = 0.01,
                 fold: int = 8, device: torch.device | str | None = None):
        if block < 1 or grads < 1 or fold < 1:
            raise ValueError(f"the Fisher's block, grads and fold must be at least 1, got block={block}, "
                             f"grads={grads}, fold={fold}")
        if not 0.0 < damp:
            raise ValueError(f"the Fisher's damp must be positive, got {damp}")
        self.rows, self.cols, self.block, self.damp = rows, cols, block, float(damp)
        self.beta = 1.0 - 1.0 / grads
        self.nb = math.ceil(cols / block)
        self.blocks = torch.zeros(rows * self.nb, block, block, device=device)
        self.held = torch.empty(rows * self.nb, fold, block, device=device)  # gradients not folded in yet
        self.n_held = 0
        self.count = 0
        self._inverse: torch.Tensor | None = None

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) tensor as (rows * nb, block) fp32, zero-padded at the end of each row."""
        return F.pad(t.float(), (0, self.nb * self.block - self.cols)).view(-1, self.block)

    @torch.no_grad()
    def add(self, grad: torch.Tensor) -> None:
        """Add one gradient (the weight's shape) to the moving average."""
        self.held[:, self.n_held] = self._split(grad)
        self.n_held += 1
        self.count += 1
        self._inverse = None
        if self.n_held == self.held.shape[1]:
            self._fold()

    def _fold(self) -> None:
        """blocks <- beta^n blocks + sum_i (1 - beta) beta^(n-1-i) g_i g_i^T over the n held gradients."""
        n = self.n_held
        if n == 0:
            return
        ages = torch.arange(n - 1, -1, -1, dtype=torch.float64, device=self.blocks.device)
        g = self.held[:, :n] * ((1.0 - self.beta) * self.beta ** ages).sqrt().float()[:, None]
        self.blocks.baddbmm_(g.transpose(1, 2), g, beta=self.beta ** n)
        self.n_held = 0

    @torch.no_grad()
    def inverse(self) -> torch.Tensor:
        """The damped inverse of every block, (rows * nb, block, block); the identity before any gradient."""
        if self._inverse is None:
            self._fold()
            eye = torch.eye(self.block, device=self.blocks.device)
            if self.count == 0:
                self._inverse = eye.expand_as(self.blocks).clone()
            else:
                fisher = self.blocks / (1.0 - self.beta ** self.count)
                scale = fisher.diagonal(dim1=1, dim2=2).mean()
                fisher += (self.damp * scale if scale > 0 else 1.0) * eye
                factor, info = torch.linalg.cholesky_ex(fisher)
                if int(info.max()) > 0:
                    raise FloatingPointError("the damped Fisher is not positive definite: raise the damping")
                self._inverse = torch.cholesky_inverse(factor)
        return self._inverse

    def diag(self) -> torch.Tensor:
        """[F^-1]_qq for every weight, (rows, cols)."""
        return self.inverse().diagonal(dim1=1, dim2=2).reshape(self.rows, -1)[:, :self.cols]

    def saliency(self, weight: torch.Tensor) -> torch.Tensor:
        """The OBS loss of pruning each weight alone: w^2 / (2 [F^-1]_qq), (rows, cols) fp32."""
        return weight.float().square() / (2.0 * self.diag())

    @torch.no_grad()
    def compensate_(self, weight: torch.Tensor, pruned: torch.Tensor) -> None:
        """Move the weights of every block by -F^-1 v with v_q = w_q / [F^-1]_qq at the `pruned`
        (bool, weight's shape) positions: each pruned weight's OBS update, summed."""
        v = torch.where(pruned, weight.float() / self.diag(), 0.0)
        move = torch.bmm(self.inverse(), self._split(v).unsqueeze(2)).view(self.rows, -1)[:, :self.cols]
        weight.sub_(move.to(weight.dtype))

    def release(self) -> None:
        """Drop the cached inverse (it is as large as the blocks)."""
        self._inverse = None

    def state_dict(self) -> dict:
        # The held gradients are saved as they are: folding them at a checkpoint would sum them in
        # another order than the uninterrupted run, and the resumed run would not be the same.
        return {"blocks": self.blocks, "held": self.held[:, :self.n_held].clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        blocks = state["blocks"]
        held = state.get("held", blocks.new_empty(blocks.shape[0], 0, blocks.shape[-1]))  # states written before gradients were held have none
        if tuple(blocks.shape) != tuple(self.blocks.shape):
            raise ValueError(f"Fisher blocks of shape {tuple(blocks.shape)} do not fit {tuple(self.blocks.shape)}")
        if held.shape[0] != self.held.shape[0] or held.shape[2] != self.held.shape[2] or held.shape[1] > self.held.shape[1]:
            raise ValueError(f"{held.shape[1]} held Fisher gradients of shape {tuple(held.shape)} do not fit "
                             f"{tuple(self.held.shape)} (fold={self.held.shape[1]})")
        self.blocks.copy_(blocks)
        self.n_held = held.shape[1]
        self.held[:, :self.n_held] = held
        self.count = int(state["count"])
        self._inverse = None
