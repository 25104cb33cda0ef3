"""Optimisation pieces shared by the training stages: AdamW parameter groups, learning-rate scaling and
schedule, and an exponential moving average (EMA) of the weights.

The recipe follows VAR (Tian et al., 2024, sec. 4 and the official trainer): AdamW with betas (0.9, 0.95),
lr = 1e-4 * batch / 256, weight decay 0.05 on matrices only, linear warmup then decay to a final fraction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule

# Parameters whose name (last component) starts with one of these are never decayed: learned positions,
# per-head attention scales, shared AdaLN tables, null/start tokens.
NO_DECAY_PREFIXES = ("pos_", "scale_mul", "ada_gss", "start_token", "cls_token", "null_", "lvl_")
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
# Wrappers that FSDP and activation checkpointing insert into parameter names.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name with FSDP / checkpointing / compile wrapper components removed."""
    for w in _WRAPPER_NAMES:
        name = name.replace(w, "")
    return name


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay: biases, norms, embeddings, positional
    tables, scale_mul, and any parameter with fewer than two dimensions.

    Call it on the plain (unwrapped) module: FSDP1 flattens parameters to 1-D shards, which hides their rank.
    """
    names = set()
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if (
                p.ndim < 2
                or p_name == "bias"
                or isinstance(mod, _NO_DECAY_MODULES)
                or p_name.startswith(NO_DECAY_PREFIXES)
            ):
                names.add(full)
    return names


def param_groups(module: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``; frozen parameters are left out.

    ``no_decay``: names from :func:`no_weight_decay_names` computed before wrapping (default: computed now).
    """
    if no_decay is None:
        no_decay = no_weight_decay_names(module)
    decay_params, plain_params = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (plain_params if clean_name(name) in no_decay else decay_params).append(p)
    groups = [
        {"params": decay_params, "weight_decay": weight_decay, "name": "decay"},
        {"params": plain_params, "weight_decay": 0.0, "name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def scaled_lr(
    base_lr: float, batch_size: int, world_size: int = 1, accumulate: int = 1, reference_batch: int = 256
):
    """``base_lr`` is given per ``reference_batch`` images; returns it scaled to the global batch."""
    return base_lr * batch_size * world_size * accumulate / reference_batch


def lr_factor(
    step: int, warmup_steps: int, total_steps: int, decay: str = "cosine", final_fraction: float = 0.0
) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Linear warmup from 1/warmup_steps to 1 over ``warmup_steps`` steps, then "cosine" or "linear" decay to
    ``final_fraction`` at ``total_steps``, or "constant".
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"model.decay={decay!r}: expected 'cosine', 'linear' or 'constant'")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if decay == "cosine" else 1.0 - t
    return final_fraction + (1.0 - final_fraction) * shape


def warmup_decay_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    final_fraction: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR over :func:`lr_factor`."""
    lr_factor(0, warmup_steps, total_steps, decay, final_fraction)  # validate the arguments now

    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps, total_steps, decay, final_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA(nn.Module):
    """A float32 exponential moving average of a module's parameters, kept as a frozen copy ``self.module``.

    Being a submodule, it moves with its parent, is saved in the parent's state_dict (so in Lightning
    checkpoints) and is restored on resume. Buffers are copied from the source at each update. With
    ``warmup``, the decay of update n is min(decay, (1 + n) / (10 + n)) so early, noisy weights fade fast.
    """

    def __init__(self, module: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"model.ema_decay={decay}: expected a value in (0, 1) (0 disables EMA)")
        self.decay, self.warmup = decay, warmup
        self.module = copy.deepcopy(module).float().requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True):
        return super().train(False)  # the average is only ever evaluated

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _pairs(self, source: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for m in (self.module, source):  # FSDP2 may leave a root unsharded after forward: pair the shards
            if isinstance(m, FSDPModule):
                m.reshard()
        ema, src = dict(self.module.named_parameters()), dict(source.named_parameters())
        if ema.keys() != src.keys():
            raise ValueError("EMA: the source module's parameters differ from the averaged copy's")
        for name, p_ema in ema.items():
            yield p_ema, src[name]

    @torch.no_grad()
    def update(self, source: nn.Module) -> None:
        """ema = d * ema + (1 - d) * source, for every parameter (in float32); buffers are copied."""
        d = self.current_decay()
        for p_ema, p in self._pairs(source):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, target: nn.Module) -> None:
        for p_ema, p in self._pairs(target):
            p.copy_(p_ema.to(p.dtype))

    @contextmanager
    def swap_into(self, target: nn.Module):
        """Temporarily load the averaged weights into ``target`` (e.g. to validate it), then restore."""
        backup = [p.detach().clone() for _, p in self._pairs(target)]
        self.copy_to(target)
        try:
            yield target
        finally:
            with torch.no_grad():
                for (_, p), saved in zip(self._pairs(target), backup):
                    p.copy_(saved)
