"""How the VAR stages meet Lightning's sharded strategies: FSDP2 units per transformer block
(``ModelParallelStrategy``) and, for the legacy FSDP1 strategy, the frozen modules it must leave alone."""

from __future__ import annotations

from torch import nn


def shard_var(model: nn.Module, mesh) -> None:
    """FSDP2: each VAR block (and its cross-attention) is a unit, the rest of ``model`` the root unit.

    ``model`` is a VAR or a module holding one as ``.var`` (the control stage's ControlledVAR, whose branch
    then sits in the root unit, unsharded whenever the VAR runs). Methods called outside ``forward``
    (modulation, text context, generate) are registered so FSDP gathers their parameters too.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    var = getattr(model, "var", model)
    for block in var.blocks:
        if block.cross_attn is not None:
            fully_shard(block.cross_attn, mesh=mesh)
            register_fsdp_forward_method(block.cross_attn, "context")
        fully_shard(block, mesh=mesh)
        register_fsdp_forward_method(block, "modulation")
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "generate")


def ignore_in_fsdp1(strategy, modules: list[nn.Module | None]) -> None:
    """Keep frozen modules (tokenizer, text encoder) out of FSDP1's sharding and mixed-precision casts."""
    ignored = list(strategy.kwargs.get("ignored_modules") or [])
    ignored += [m for m in modules if m is not None and m not in ignored]
    strategy.kwargs["ignored_modules"] = ignored
