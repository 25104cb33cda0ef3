"""Helpers that let YAML configs build distributed strategies (FSDP wrap policies name classes by path)."""

from __future__ import annotations

from collections.abc import Sequence


def module_wrap_policy(classes: Sequence[str]):
    """An FSDP ``ModuleWrapPolicy`` over the classes named by import path, e.g. the VAR transformer block."""
    from hydra.utils import get_class
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    if not classes:
        raise ValueError("module_wrap_policy: 'classes' must name at least one module class")
    return ModuleWrapPolicy({get_class(c) for c in classes})
