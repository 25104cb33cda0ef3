"""Whether a plain value (YAML or JSON, already resolved to Python) fits a type annotation: the one check
behind the CLI's config validation (varctl/cli/config.py) and the model configs' (``ModelConfig.from_dict``),
so a wrong value is refused by name before anything is built, not met later as a TypeError deep in torch."""

from __future__ import annotations

import collections.abc as cabc
import inspect
import types
import typing
from typing import Any


def fits(value: Any, tp: Any) -> bool:
    """True when a YAML value (already resolved to plain Python) can be passed as ``tp``."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, typing.TypeVar):
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple, cabc.Sequence, cabc.Iterable) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(fits(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return all(fits(v, inner) for v in value)
    if origin in (dict, cabc.Mapping) or tp is dict:
        return isinstance(value, dict)
    if inspect.isclass(tp) and tp.__module__ == "pathlib":
        return isinstance(value, str)
    if isinstance(value, dict) and "_target_" in value:
        return True  # an object built by instantiate; its own keys are checked on its node
    if inspect.isclass(tp):
        return isinstance(value, tp)
    return True  # an annotation we do not model (callables, protocols): leave it to the target


def type_name(tp: Any) -> str:
    """``int``, ``float | None``, ``tuple[int, ...]``, ``one of 'l1', 'l2'``: an annotation as a message
    shows it."""
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_args(tp) or not hasattr(tp, "__name__"):
        return str(tp).replace("typing.", "")
    return tp.__name__
