"""Optimisation pieces shared by the training stages: AdamW parameter groups, learning-rate scaling and
schedule (``configure_adamw``), and an exponential moving average (EMA) of the weights (``averaged``).

The recipe follows VAR (Tian et al., 2024, sec. 4 and the official trainer): AdamW with betas (0.9, 0.95),
lr = 1e-4 * batch / 256, weight decay 0.05 on matrices only, linear warmup then decay to a final fraction.
On a VAR the decayed parameters are those of the official trainer's name filter (``filter_params`` in its
utils/lr_control.py), the class embedding included; other embedding tables, such as the tokenizer's
codebook, are not decayed.
"""

from __future__ import annotations

import copy
import math

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.optim.swa_utils import AveragedModel

from varctl.lit.settings import OptimizerSettings

# Parameters whose name (last component) starts with one of these are never decayed: learned positions,
# per-head attention scales, shared AdaLN tables, null/start tokens.
NO_DECAY_PREFIXES = ("pos_", "scale_mul", "ada_gss", "start_token", "cls_token", "null_", "lvl_")
_NO_DECAY_MODULES = (nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)
# Embedding tables that are decayed all the same: the official VAR trainer decays its class embedding.
DECAYED_EMBEDDINGS = ("class_emb",)
# Wrappers that FSDP and activation checkpointing insert into parameter names.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """A parameter name with FSDP / checkpointing / compile wrapper components removed."""
    for w in _WRAPPER_NAMES:
        name = name.replace(w, "")
    return name


def _decayed_table(mod_name: str, mod: nn.Module) -> bool:
    return isinstance(mod, nn.Embedding) and mod_name.rsplit(".", 1)[-1] in DECAYED_EMBEDDINGS


def no_weight_decay_names(module: nn.Module) -> set[str]:
    """Names of trainable parameters that get no weight decay: biases, norms, embeddings (except a VAR's
    class embedding), positional tables, scale_mul, and any parameter with fewer than two dimensions.

    Call it on the plain (unwrapped) module: FSDP1 flattens parameters to 1-D shards, which hides their rank.
    """
    names = set()
    for mod_name, mod in module.named_modules():
        decayed_table = _decayed_table(mod_name, mod)
        for p_name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
            if (
                p.ndim < 2
                or p_name == "bias"
                or (isinstance(mod, _NO_DECAY_MODULES) and not decayed_table)
                or p_name.startswith(NO_DECAY_PREFIXES)
            ):
                names.add(full)
    return names


def _split(module: nn.Module, no_decay: set[str]) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable (name, parameter)s of the ``decay`` and ``no_decay`` groups, empty groups left out."""
    groups = {"decay": [], "no_decay": []}
    for name, p in module.named_parameters():
        if p.requires_grad:
            name = clean_name(name)
            groups["no_decay" if name in no_decay else "decay"].append((name, p))
    return {k: v for k, v in groups.items() if v}


def param_groups(module: nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """Two AdamW groups, ``decay`` and ``no_decay``; frozen parameters are left out.

    ``no_decay``: names from :func:`no_weight_decay_names` computed before wrapping (default: computed now).
    """
    if no_decay is None:
        no_decay = no_weight_decay_names(module)
    decays = {"decay": weight_decay, "no_decay": 0.0}
    return [
        {"params": [p for _, p in members], "weight_decay": decays[name], "name": name}
        for name, members in _split(module, no_decay).items()
    ]


def decayed_embedding_names(module: nn.Module) -> set[str]:
    """Names of the trainable embedding tables that are weight-decayed (``DECAYED_EMBEDDINGS``); runs saved
    before they were kept them in the no-decay group."""
    return {
        clean_name(f"{mod_name}.{p_name}")
        for mod_name, mod in module.named_modules()
        if _decayed_table(mod_name, mod)
        for p_name, p in mod.named_parameters(recurse=False)
        if p.requires_grad
    }


def regroup_optimizer_state(state: dict, module: nn.Module, saved: set[str], no_decay: set[str]) -> bool:
    """Move, in place, an optimizer state dict saved with ``param_groups(module, ..., saved)`` into the
    groups of ``param_groups(module, ..., no_decay)``: torch numbers the parameters across the groups, so a
    parameter that changed group changes every later number. Returns whether it moved anything; a state
    whose groups do not hold the parameters ``saved`` puts there, or not numbered by torch's optimizer (a
    sharded strategy's), is left as it is."""
    before, after = ({k: [n for n, _ in m] for k, m in _split(module, d).items()} for d in (saved, no_decay))
    groups = state.get("param_groups", [])
    if before == after or [g.get("name") for g in groups] != list(before) or list(after) != list(before):
        return False
    old = [n for names in before.values() for n in names]  # torch's numbering: group by group
    sizes, saved_numbers = [len(names) for names in before.values()], [i for g in groups for i in g["params"]]
    if [len(g["params"]) for g in groups] != sizes or saved_numbers != list(range(len(old))):
        return False  # not those groups, or not torch's numbering (FSDP numbers in the model's order)
    number = {n: i for i, n in enumerate(n for names in after.values() for n in names)}
    state["state"] = {number[old[i]]: v for i, v in state.get("state", {}).items()}
    for group, names in zip(groups, after.values()):
        group["params"] = [number[n] for n in names]
    return True


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


def adamw(
    groups: list[dict], lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, allow_fused: bool = True
) -> torch.optim.AdamW:
    """AdamW, fused (one kernel over all parameters, as the official trainer's ``fused=True``) when every
    parameter is a plain floating tensor on the CPU or a GPU; otherwise torch's default implementation (FSDP2
    shards are DTensors). On the CPU the fused step is ~3x faster than the per-tensor loop it replaces.
    ``allow_fused=False`` under fp16 loss scaling: a fused step unscales inside ``step``, after Lightning's
    gradient clipping would have needed the unscaled gradients (``clip_gradients`` below)."""
    params = [p for g in groups for p in g["params"]]
    fused = allow_fused and all(
        type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return torch.optim.AdamW(
        groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None
    )


def configure_adamw(trainer, groups: list[dict], settings: OptimizerSettings) -> dict:
    """AdamW over ``groups`` with the warmup/decay schedule stepped per optimizer step, as
    ``configure_optimizers`` returns it; the lr is scaled to the global batch when the settings say so."""
    lr = settings.lr
    if settings.lr_scale_by_batch:
        batch_size = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
        if batch_size is None:
            raise ValueError(
                "model.optimizer.lr_scale_by_batch needs a datamodule with batch_size; or set it to false"
            )
        world, accumulate = trainer.world_size, trainer.accumulate_grad_batches
        lr = scaled_lr(settings.lr, batch_size, world, accumulate, settings.reference_batch)
        ref = settings.reference_batch
        rank_zero_info(f"lr = {settings.lr:g} * {batch_size} x {world} x {accumulate} / {ref} = {lr:.3g}")
    # fp16 loss scaling unscales inside a fused step, too late for clipping; FSDP1 clips its own flat shards
    allow_fused = str(trainer.precision) != "16-mixed" and not isinstance(trainer.strategy, FSDPStrategy)
    optimizer = adamw(groups, lr, settings.betas, settings.weight_decay, allow_fused)
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):  # a run without end: only a constant lr (after warmup) needs none
        if settings.decay != "constant":
            raise ValueError(_endless(trainer, settings))
        total = 0
    scheduler = warmup_decay_scheduler(
        optimizer, settings.warmup_steps, total, settings.decay, settings.final_lr_fraction
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def check_schedule(trainer, settings: OptimizerSettings) -> None:
    """Before the run: a decaying lr needs the run's end (``trainer.max_steps`` or ``trainer.max_epochs``)."""
    if settings.decay != "constant" and trainer.max_steps == -1 and trainer.max_epochs == -1:
        raise ValueError(_endless(trainer, settings))


def _endless(trainer, settings: OptimizerSettings) -> str:
    return (
        f"trainer.max_steps={trainer.max_steps} with trainer.max_epochs={trainer.max_epochs} trains without "
        f"end, but model.optimizer.decay={settings.decay!r} decays the lr to "
        "model.optimizer.final_lr_fraction at the last step: set trainer.max_steps (or trainer.max_epochs), "
        "or model.optimizer.decay=constant"
    )


def averaged(module: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """A float32 exponential moving average of ``module``'s parameters (torch's ``AveragedModel``; buffers
    are copied at each update). The copy made here counts as the first average, so update k (0-based) uses
    the decay min(decay, (1 + k) / (10 + k)) with ``warmup``: early, noisy weights fade fast.

    Frozen float32 parameters (a control stage's backbone, a frozen pretrained encoder) are their own
    average: the copy shares them instead of holding a second set (at d16, 1.2 GB of memory and of every
    checkpoint, and a pass over them per update). Decide what is frozen before calling this. FSDP2 shards
    the copy on its own (``fully_shard`` gives each module new parameters), so sharded runs keep two sets.

    Lightning's ``WeightAveraging`` callback is not used: it averages the whole LightningModule (frozen
    tokenizer and text encoder included), cannot shard the copy under FSDP2, and swaps the averaged weights
    into the checkpoint's state_dict, where ``VAR.load`` expects the trained ones.
    """
    if not 0.0 < decay < 1.0:
        raise ValueError(f"model.ema_decay={decay}: expected a value in (0, 1) (0 disables EMA)")

    def ema_step(averaged_params: list[torch.Tensor], params: list[torch.Tensor], n_averaged) -> None:
        k = int(n_averaged) - 1  # updates before this one
        d = min(decay, (1 + k) / (10 + k)) if warmup else decay
        for a, p in zip(averaged_params, params):  # one lerp per tensor: works on FSDP2 shards (DTensors)
            if isinstance(a, DTensor) or a.data_ptr() != p.data_ptr():  # a shared frozen one stays
                a.lerp_(p.to(a.dtype), 1.0 - d)

    frozen = {id(p): p for p in module.parameters() if not p.requires_grad and p.dtype == torch.float32}
    ema = AveragedModel(nn.Module(), multi_avg_fn=ema_step)
    ema.module = copy.deepcopy(module, memo=frozen)  # the frozen ones are not copied
    ema = ema.float().requires_grad_(False)
    ema.n_averaged.fill_(1)
    return ema


def load_shared_from_model(state: dict, module: nn.Module, ema: AveragedModel, prefix: str, ema_prefix: str):
    """Before ``state`` (a checkpoint's state_dict) is loaded: where ``ema`` shares a frozen parameter with
    ``module`` (``averaged``), the checkpoint's two entries for it load into one tensor, and the one loaded
    last would win. The model's entry is copied over the average's, so a run whose backbone trained before
    and is frozen now keeps its trained weights (a frozen weight's average is the weight). Returns the names
    whose two entries differed."""
    differed = []
    for name, param in module.named_parameters():
        key, ema_key = prefix + name, ema_prefix + name
        if key in state and ema_key in state and ema.module.get_parameter(name) is param:
            if not torch.equal(state[key], state[ema_key]):
                differed.append(name)
            state[ema_key] = state[key]
    return differed


@torch.no_grad()
def update_average(ema: AveragedModel, module: nn.Module) -> None:
    """One EMA step towards ``module``'s current weights."""
    for m in (ema.module, module):  # FSDP2 may leave a root unsharded after forward: pair the shards
        if isinstance(m, FSDPModule):
            m.reshard()
    ema.update_parameters(module)


def clip_gradients(module, optimizer, clip_val, algorithm) -> None:
    """``configure_gradient_clipping`` of the stages. Lightning's mixed-precision plugin refuses to clip for a
    fused optimizer, as fp16 loss scaling would need it to; bf16 has no scaler, so its gradients are clipped
    here, as Lightning clips them otherwise."""
    if not clip_val or not optimizer.defaults.get("fused") or str(module.trainer.precision) != "bf16-mixed":
        module.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm in (None, "norm"):
        torch.nn.utils.clip_grad_norm_(params, clip_val)
    else:
        torch.nn.utils.clip_grad_value_(params, clip_val)
