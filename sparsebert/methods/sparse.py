"""SparseMethod: what every pruning method shares. A method is a table of defaults (its papers'
recipe) over these knobs; every knob can be overridden from the recipe's `method:` section.

Steps: the trainer calls training_loss(batch, step), optimizer.step(), after_step(step) with the same
0-based step; pruning schedules count t = step + 1 completed steps (t = 0 is the event in setup()).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import weakref
from typing import Any, ClassVar

import torch

from ..distributed import is_ddp, unwrap
from ..distill.contrastive import ContrastiveConfig, ContrastiveModule
from ..distill.kd import DistillConfig, distill_loss
from ..objectives import model_inputs
from ..optim import MaskedAdamW
from ..sparsity.criteria import CRITERIA
from ..sparsity.pruner import Pruner
from ..sparsity.quant import enable_qat
from ..sparsity.schedules import SCHEDULES, LRRewind, linear_warmup_decay
from ..sparsity.sparsify import masked_modules, sparsify
from .base import Method

# Zero scores rank weights by movement alone, which needs about an epoch of warm-up before the masks
# stop collapsing a short run; scores from |W| make the first masks magnitude masks.
SCORE_INITS = ("zeros", "magnitude")

COMMON: dict[str, Any] = {
    "warmup_ratio": 0.1,
    "sparsity": 0.9,  # final sparsity of the pruned set
    "targets": None,  # regexes of the nn.Linear modules to prune; None: the encoder matrices (sparsebert.families)
    "criterion": "magnitude",  # CRITERIA: magnitude | movement | soft-movement | obert
    "criterion_kwargs": {},  # obert: the Fisher's block, grads (moving-average horizon), damp and fold (sparsity/fisher.py)
    "pattern": "tensor",  # PATTERNS: global | tensor | row | nm | block | structured
    "pattern_kwargs": {},
    "schedule": "cubic",  # SCHEDULES: cubic | one-shot | sanh | lock | none
    "initial_sparsity": 0.0,
    "begin_frac": 0.0,  # cubic: pruning window as fractions of the run, and the number of events
    "end_frac": 0.5,
    "events": 100,
    "warmup_frac": 0.1,  # sanh: steps at the initial value, then at the final value, as fractions
    "cooldown_frac": 0.2,
    "frequency": 1,  # sanh: steps between mask updates
    "threshold_initial": 0.0,  # soft movement: threshold on sigmoid(S) and L1 penalty weight
    "threshold_final": 0.1,
    "soft_lambda": 10.0,
    "score_lr": 1e-2,  # movement scores' learning rate (Sanh et al.), as an absolute LR at the peak
    "score_init": "zeros",  # movement scores start at 0 (Sanh et al.), or at |W| ("magnitude")
    "lr_rewind": False,
    "lr_scales": {},  # {regex on parameter names: multiplier of the LR}, first match wins
    "quantize": False,
    "quant_bits": 8,
    "distill": {"task": 1.0},  # DistillConfig fields
    "contrastive": None,  # ContrastiveConfig fields, or None
    "compact": None,  # compact optimizer state; None: when the mask is locked for the whole run
}


class SparseMethod(Method):
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **config):
        known = {**COMMON, **self.defaults}
        self._refuse_unknown(config, known, "options")
        self.config = copy.deepcopy({**known, **config})
        super().__init__(warmup_ratio=self.config["warmup_ratio"])
        c = self.config
        if not 0.0 <= c["sparsity"] < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {c['sparsity']}")
        schedule = SCHEDULES.get(c["schedule"])
        self.criterion_name = getattr(schedule, "criterion", c["criterion"])
        self.criterion = CRITERIA.get(self.criterion_name)
        if c["score_init"] not in SCORE_INITS:
            raise ValueError(f"score_init must be one of {sorted(SCORE_INITS)}, got {c['score_init']!r}")
        if c["score_init"] != "zeros" and not self.criterion.learns_scores:
            raise ValueError(f"score_init={c['score_init']!r} needs a movement criterion (one that learns scores), "
                             f"not {self.criterion_name!r}")
        self.criterion.check_options(self.criterion_name, c["criterion_kwargs"])  # before setup changes the model
        self.lr_scales = _lr_scales(c["lr_scales"])
        self.distill = self._section(DistillConfig, c["distill"], "distill")
        self.contrastive_config = self._section(ContrastiveConfig, c["contrastive"], "contrastive") if c["contrastive"] else None
        self.pruner: Pruner | None = None
        self._watched = weakref.WeakSet()  # optimizers whose steps feed the criterion's statistics
        self.contrastive: ContrastiveModule | None = None

    def _section(self, cls, values, option: str):
        """A nested option (`distill:`, `contrastive:`) as its dataclass; a misspelt field is a ValueError
        that names it, as for the top-level options."""
        if not isinstance(values, dict):
            raise ValueError(f"method {self.name!r}: {option} must be a mapping of options, got {values!r}")
        self._refuse_unknown(values, {f.name for f in dataclasses.fields(cls)}, f"{option} options")
        return cls(**values)

    def _refuse_unknown(self, given, known, what: str) -> None:
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown {what} {sorted(unknown)}; known: {sorted(known)}")

    # --- setup ---------------------------------------------------------------------------------------
    def needs(self) -> frozenset[str]:
        cc = self.contrastive_config
        return frozenset({"teacher"} if self.distill.needs_teacher or (cc and cc.finetuned) else set()) | \
            frozenset({"pretrained"} if cc and cc.pretrained else set())

    def adapt(self, model: torch.nn.Module) -> None:
        """MaskedLinear modules (with movement scores when the criterion learns them) at the targets."""
        model = unwrap(model)
        if self.distill.attention:
            _eager_attention(model)
        targets = {"include": self.config["targets"]} if self.config["targets"] else {}
        sparsify(model, {**targets, "scores": self.criterion.learns_scores})

    def setup(self, ctx) -> None:
        """Works on a student wrapped in DistributedDataParallel too (its forward stays wrapped);
        movement scores must then exist before the wrapping (DDP synchronizes only the parameters
        it was built with). Under FSDP2, set up before fully_shard."""
        student = unwrap(ctx.student)
        if is_ddp(ctx.student) and self.criterion.learns_scores and \
                (not masked_modules(student) or any(m.scores is None for m in masked_modules(student).values())):
            raise ValueError(f"criterion {self.criterion_name!r} trains movement scores, new parameters that the "
                             "DistributedDataParallel wrapper of the student would not synchronize: call "
                             "sparsebert.sparsify(model, {'scores': True}) before wrapping it, or set the method up "
                             "on the unwrapped model and wrap it afterwards")
        super().setup(ctx)
        c, criterion = self.config, self.criterion
        if self.distill.attention:
            _eager_attention(unwrap(ctx.teacher))
        modules = masked_modules(student)
        if c["score_init"] == "magnitude":
            with torch.no_grad():
                for module in modules.values():
                    module.scores.copy_(module.weight.abs())
        prune_with = {"pattern_kwargs": c["pattern_kwargs"], "num_heads": student.config.num_attention_heads}
        schedule = SCHEDULES.get(c["schedule"]).from_config(c, ctx.total_steps, criterion)
        self.pruner = Pruner(modules, self.criterion_name, c["pattern"], schedule, criterion_kwargs=c["criterion_kwargs"],
                             **prune_with)
        self.pruner.step(0)
        if criterion.exact:
            self.exact_pruner = Pruner(modules, criterion.exact, c["pattern"], None, zero_weights=False, **prune_with)
        if c["quantize"]:
            enable_qat(modules, c["quant_bits"])
        if self.contrastive_config:
            self.contrastive = ContrastiveModule(self.contrastive_config, student.config.hidden_size, ctx.train_size, ctx.device)
            self.snapshot_every = max(1, ctx.total_steps // (self.contrastive_config.max_snapshots + 1))

    # --- optimizer and LR ----------------------------------------------------------------------------
    def optimizer_masks(self) -> dict[torch.Tensor, torch.Tensor]:
        # A criterion that learns scores keeps pruned weights (a revived weight resumes where it was), so
        # its weights get no optimizer mask: their gradient is already G * M. Others keep them at 0.
        return {} if self.criterion.learns_scores else {m.weight: m.mask for m in self.pruner.modules}

    def added_param_groups(self) -> list[dict]:
        scores = [p for name, p in self.ctx.student.named_parameters() if p.requires_grad and name.endswith(".scores")]
        # Scores move at their own LR (Sanh et al.: 1e-2 vs 3e-5), without weight decay.
        return [{"params": scores, "lr": self.config["score_lr"], "weight_decay": 0.0}] if scores else []

    def optimizer(self, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        c = self.config
        groups = self._param_groups(weight_decay, self.lr_scales)
        for group in self.added_param_groups():  # their LR as a scale of the scheduled one
            groups.append({**{k: v for k, v in group.items() if k != "lr"}, "lr_scale": group["lr"] / lr})
        compact = self.pruner.locked if c["compact"] is None else c["compact"]
        optimizer = MaskedAdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                masks=self.optimizer_masks(), compact=compact)
        self.watch(optimizer)
        return optimizer

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients a criterion's statistics need are those the optimizer steps with: after the
        # loop's backward, gradient accumulation, all-reduce, unscaling and clipping, whatever the loop.
        if self.pruner.grad_stats is None:
            return
        while not hasattr(optimizer, "_optimizer_step_pre_hooks") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer  # a wrapper's step (accelerate's AcceleratedOptimizer) runs the inner one's
        if not hasattr(optimizer, "register_step_pre_hook"):
            raise TypeError(f"criterion {self.criterion_name!r} reads the gradients of every optimizer step, through "
                            f"torch.optim.Optimizer's step hooks, which a {type(optimizer).__name__} does not have")
        if optimizer in self._watched:
            return
        self._watched.add(optimizer)

        def observe(opt, args, kwargs):
            if self.pruner.wants_gradients():
                self.pruner.observe()
        optimizer.register_step_pre_hook(observe)

    def lr_at(self, step: int, base_lr: float) -> float:
        total = self.ctx.total_steps
        if self.config["lr_rewind"]:
            end = self.pruner.schedule.end
            return base_lr * LRRewind(total, end, int(self.warmup_ratio * (end or total))).multiplier(step)
        return base_lr * linear_warmup_decay(step, total, int(self.warmup_ratio * total))

    # --- loss ----------------------------------------------------------------------------------------
    def _forward(self, model, batch, hidden: bool, attentions: bool):
        return model(**model_inputs(batch), output_hidden_states=hidden, output_attentions=attentions)

    def _wants(self) -> tuple[bool, bool]:
        """(hidden states, attentions): what the loss reads of the student's and teachers' outputs."""
        return bool(self.distill.hidden) or self.contrastive_config is not None, bool(self.distill.attention)

    def forward_kwargs(self) -> dict[str, Any]:
        hidden, attentions = self._wants()
        return {**({"output_hidden_states": True} if hidden else {}), **({"output_attentions": True} if attentions else {})}

    @property
    def adds_parameters(self) -> bool:
        return self.criterion.learns_scores

    @property
    def adds_loss_terms(self) -> bool:
        d = self.distill
        return d.task != 1.0 or d.needs_teacher or self.criterion.penalty is not None or self.contrastive_config is not None

    def loss_from_outputs(self, batch: dict, outputs: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ctx, d = self.ctx, self.distill
        want_cls = self.contrastive is not None
        if want_cls and "index" not in batch:
            raise ValueError(
                f"method {self.name!r} (contrastive terms) needs batch['index']: the index of each example in the "
                f"training set, in [0, {ctx.train_size}), which keys its memory banks. Add it to the batches (with "
                "transformers' Trainer: an 'index' column, e.g. dataset.map(lambda e, i: {'index': i}, with_indices=True))")
        hidden, attentions = self._wants()
        teacher_out = None
        if d.needs_teacher or (want_cls and self.contrastive_config.finetuned):
            with torch.no_grad():
                teacher_out = self._forward(ctx.teacher, batch, hidden, attentions)
        loss, logs = distill_loss(d, outputs, teacher_out, batch, ctx.objective)
        if self.criterion.penalty is not None and not self.pruner.finalized:
            schedule = self.pruner.schedule
            penalty = self.criterion.penalty(self.pruner.modules)
            # Sanh et al. ramp the penalty with the threshold schedule.
            loss = loss + self.config["soft_lambda"] * schedule.value_at(step) / (schedule.final or 1.0) * penalty
            logs["l1_scores"] = penalty.item()
        if want_cls:
            pretrained_z = None
            if self.contrastive_config.pretrained:
                with torch.no_grad():
                    pretrained_z = _cls(self._forward(ctx.pretrained, batch, True, False))
            labels = batch.get("labels") if ctx.objective == "classification" else None
            extra, extra_logs = self.contrastive.loss(_cls(outputs), batch["index"], labels, pretrained_z,
                                                      _cls(teacher_out) if teacher_out is not None else None)
            loss = loss + extra
            logs.update(extra_logs)
        return loss, logs

    # --- pruning events ------------------------------------------------------------------------------
    def after_step(self, step: int) -> dict[str, float]:
        t = step + 1
        stats = {} if self.pruner.locked else self.pruner.step(t)
        if self.contrastive is not None and t % self.snapshot_every == 0:
            self.contrastive.new_snapshot()
        if t >= self.ctx.total_steps and self.criterion.learns_scores and not self.pruner.finalized:
            if self.criterion.exact:
                stats = self.exact_pruner.prune(self.config["sparsity"])
            self.pruner.finalize()
        return stats

    def state_dict(self) -> dict:
        state = {f"pruner.{k}": v for k, v in self.pruner.state_dict().items()}
        if self.contrastive is not None:
            state.update({f"contrastive.{k}": v for k, v in self.contrastive.state_dict().items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.pruner.load_state_dict({k[len("pruner."):]: v for k, v in state.items() if k.startswith("pruner.")})
        if self.contrastive is not None:
            self.contrastive.load_state_dict({k[len("contrastive."):]: v for k, v in state.items() if k.startswith("contrastive.")})


def _lr_scales(spec: dict) -> list[tuple[re.Pattern, float]]:
    if not isinstance(spec, dict):
        raise ValueError(f"lr_scales must map parameter-name regexes to LR multipliers, got {spec!r}")
    out = []
    for pattern, scale in spec.items():
        try:
            compiled = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"lr_scales: bad regex {pattern!r}: {error}") from None
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"lr_scales[{pattern!r}] must be a positive number, got {scale!r}")
        out.append((compiled, float(scale)))
    return out


def _cls(outputs) -> torch.Tensor:
    """Sentence representation: [CLS] of the last layer."""
    hidden = outputs.hidden_states[-1] if getattr(outputs, "hidden_states", None) else outputs.last_hidden_state
    return hidden[:, 0]


def _eager_attention(model) -> None:
    """Attention probabilities are only returned by the eager attention implementation."""
    if model is None:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
