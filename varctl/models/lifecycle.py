"""One lifecycle for every varctl model: build from a config or a preset, load any file kind, save, export
(litgpt's ``Config`` + ``GPT.from_name``, timm's single ``load_checkpoint``).

A model class names its file ``kind`` and its ``config_class`` (a dataclass deriving ``ModelConfig``) and
derives ``Model``, which gives it ``build``, ``load``, ``save`` and ``export_safetensors``. ``load`` reads:

- a varctl model file (``save``), ``{"format": "varctl", "kind", "config", "state_dict"}``;
- a varctl Lightning checkpoint, ``checkpoint["varctl"][KIND] = {"config": {...}, "prefix": "model."}``; the
  entry ``KIND + "_ema"`` holds the averaged weights of a run with EMA (``load(..., ema=True)``);
- a safetensors export: the weights, with format, kind and the config (JSON) in the metadata;
- an official checkpoint (``vae_ch160v4096z32.pth``, ``var_d16.pth``) or any bare state_dict, whose config the
  class reads off the tensor shapes (``config_from_state_dict``).

Every kind is restored the same way: the model is built on the meta device (no memory, no initialisation),
the file's keys are checked once, and its tensors are assigned strictly, so a wrong file fails with one
message naming the file, and an official checkpoint loads with no conversion and no second copy in memory.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from varctl.files import atomic_path, atomic_save, torch_load
from varctl.typecheck import fits, type_name

FORMAT = "varctl"
OFFICIAL_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the official scale schedule (256 px)
C = TypeVar("C", bound="ModelConfig")
M = TypeVar("M", bound="Model")


def same(a: Any, b: Any) -> bool:
    """Equal as config values (a YAML list equals a tuple field)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return tuple(a) == tuple(b)
    return a == b


def short_keys(keys: list[str], n: int = 8) -> str:
    """The first ``n`` keys of a long list, for error messages."""
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


class ModelConfig:
    """Base of the model config dataclasses: presets, reading a stored config, the scale schedule.

    Legend: L all tokens, l = pn * pn tokens of one scale.
    """

    presets: ClassVar[dict[str, dict]] = {}
    # fields no weight depends on: a loaded model may take other values (fine-tuning settings)
    free_on_load: ClassVar[tuple[str, ...]] = ()
    patch_nums: tuple[int, ...]

    def require(self, ok: bool, key: str, expected: str) -> None:
        """Raise a ValueError naming the field, what was expected and the value found, unless ``ok``."""
        if not ok:
            raise ValueError(f"{type(self).__name__}.{key} must be {expected}, found {getattr(self, key)!r}")

    def require_positive(self, *keys: str) -> None:
        """Each of ``keys`` (sizes and counts) at least 1, or None where the field allows it."""
        for key in keys:
            value = getattr(self, key)
            self.require(value is None or value >= 1, key, "at least 1")

    def require_rate(self, *keys: str) -> None:
        """Each of ``keys`` (a probability) in [0, 1], or None where the field allows it."""
        for key in keys:
            value = getattr(self, key)
            self.require(value is None or 0 <= value <= 1, key, "in [0, 1]")

    @classmethod
    def check_types(cls, values: Mapping[str, Any], source: str | None = None) -> None:
        """Raise a ValueError naming the first of ``values`` that does not fit its field's annotation (a
        string for a width, a float for a depth), before the config is built on it."""
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key in hints and not fits(value, hints[key]):
                where = f"{source}: " if source else ""
                raise ValueError(
                    f"{where}{cls.__name__}.{key} = {value!r} ({type(value).__name__}): "
                    f"expected {type_name(hints[key])}"
                )

    def check_schedule(self) -> None:
        pns = self.patch_nums
        ok = len(pns) >= 1 and min(pns) >= 1 and all(a < b for a, b in zip(pns, pns[1:]))
        self.require(ok, "patch_nums", "non-empty and strictly increasing (smallest scale first)")

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def L(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """[begin, end) of each scale in the token sequence."""
        out, cur = [], 0
        for pn in self.patch_nums:
            out.append((cur, cur + pn * pn))
            cur += pn * pn
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls: type[C], name: str, **overrides) -> C:
        if name not in cls.presets:
            raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(cls.presets)}")
        return cls.from_dict({**cls.presets[name], **overrides}, f"preset {name!r}")

    @classmethod
    def from_dict(cls: type[C], config: Mapping[str, Any], source: str | None = None) -> C:
        """The config from plain values (a file's, or a YAML section's); unknown keys and values that do not
        fit their fields are an error, naming ``source`` (the file) where there is one."""
        names = [f.name for f in dataclasses.fields(cls)]
        where = f"{source}: " if source else ""
        for key in config:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{where}unknown {cls.__name__} key {key!r}{hint} (known: {names})")
        cls.check_types(config, source)
        return cls(**config)

    @classmethod
    def resolve(cls: type[C], config: ModelConfig | str | Mapping | None = None, /, **fixed) -> C:
        """A config from an instance, a preset name or a dict (optionally with ``preset``), with ``fixed``
        values on top: a preset may be overridden by them, an explicit setting must agree with them."""
        base: dict[str, Any] = {}
        explicit: dict[str, Any] = {}
        if isinstance(config, ModelConfig):
            base = config.to_dict()
        elif isinstance(config, str):
            base = cls.from_name(config).to_dict()
        elif config is not None:
            explicit = dict(config)
            preset = explicit.pop("preset", None)
            base = cls.from_name(preset).to_dict() if preset is not None else {}
        for key in explicit.keys() & fixed.keys():
            if not same(explicit[key], fixed[key]):
                raise ValueError(
                    f"{cls.__name__}.{key}={explicit[key]!r} conflicts with {key}={fixed[key]!r}, which this "
                    f"model must have here (it follows from the tokenizer, text encoder or VAR it is built "
                    f"for); remove {key}"
                )
        return cls.from_dict({**base, **explicit, **fixed})

    def with_overrides(self: C, overrides: Mapping[str, Any], source: str) -> C:
        """This (loaded) config with ``overrides``: fields in ``free_on_load`` may change, the others must
        agree with the file, whose architecture the weights fix."""
        found, changes = self.to_dict(), {}
        type(self).check_types(overrides, source)
        for key, value in overrides.items():
            if key not in found:
                raise ValueError(
                    f"{source}: unknown {type(self).__name__} key {key!r} (known: {list(found)})"
                )
            if same(value, found[key]):
                continue
            if key not in self.free_on_load:
                raise ValueError(
                    f"{source}: {key}={value!r} conflicts with the file, which has {key}={found[key]!r}; the "
                    f"architecture comes from the file (only {list(self.free_on_load)} may differ)"
                )
            changes[key] = value
        return dataclasses.replace(self, **changes) if changes else self


class Model(nn.Module):
    """Base of every varctl network: ``build``, ``load``, ``save``, ``export_safetensors``."""

    kind: ClassVar[str]
    config_class: ClassVar[type[ModelConfig]]
    config: ModelConfig

    @classmethod
    def build(cls: type[M], config: ModelConfig | str | Mapping | None = None, /, **fixed) -> M:
        """A new, initialised model from a config, a preset name or a dict (``{"preset": ..., ...}``);
        ``fixed`` are values that follow from elsewhere (``ModelConfig.resolve``)."""
        return cls(cls.config_class.resolve(config, **fixed))

    @classmethod
    def load(
        cls: type[M],
        source: str | os.PathLike | Mapping[str, torch.Tensor],
        *,
        ema: bool = False,
        map_location: str | torch.device = "cpu",
        **overrides,
    ) -> M:
        """Restore from any file kind (module docstring) or a state_dict.

        Args:
            source: a path, or a state_dict (official layout; meta tensors give a model on the meta device).
            ema: the averaged weights of a Lightning checkpoint of a run with EMA.
            overrides: config values for this use; fine-tuning settings (``free_on_load``) may differ from
                the file, architecture fields must agree with it. Official files store no config: it is read
                off the shapes, with ``patch_nums`` (the scale schedule) from here.
        """
        state_dict, stored, name = read_weights(source, cls.kind, ema, map_location)
        state_dict = cls.upgrade_state_dict(state_dict)
        if stored is None:
            config = cls.config_from_state_dict(state_dict, name, overrides.get("patch_nums"))
        else:
            config = cls.config_class.from_dict(stored, name)
        return cls.restore(state_dict, config.with_overrides(overrides, name), name)

    @classmethod
    def upgrade_state_dict(cls, state_dict: dict) -> dict:
        """The state_dict of a file of an earlier version in today's names (none to change here)."""
        return state_dict

    @classmethod
    def config_from_state_dict(cls, state_dict: Mapping, source: str, patch_nums=None) -> ModelConfig:
        """The config of a file that stores none (official checkpoints), read off the tensor shapes."""
        raise ValueError(f"{source}: no {cls.kind} config in the file (expected a file written by varctl)")

    @classmethod
    def restore(cls: type[M], state_dict: Mapping[str, torch.Tensor], config: ModelConfig, source: str) -> M:
        """Build on the meta device and assign ``state_dict`` strictly (the one restore path)."""
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict().keys()
        missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{source}: the weights do not fit a {cls.__name__} with {config}: missing "
                f"{short_keys(missing)}, unexpected {short_keys(unexpected)}"
            )
        try:
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as e:  # shape mismatches, listed by torch
            raise ValueError(
                f"{source}: the weights do not fit a {cls.__name__} with {config}:\n{e}"
            ) from None
        # buffers no file holds (persistent=False: constants) are made as a new model makes them, unless the
        # state_dict is itself on the meta device (a layout check)
        unsaved = [
            (owner, leaf)
            for owner, module in model.named_modules()
            for leaf in module._non_persistent_buffers_set
            if module._buffers.get(leaf) is not None and module._buffers[leaf].is_meta
        ]
        device = next((t.device for t in state_dict.values() if isinstance(t, torch.Tensor)), None)
        if unsaved and device is not None and device.type != "meta":
            fresh = None  # a whole new model, built only for a module that cannot make its constants itself
            for owner, leaf in unsaved:
                module = model.get_submodule(owner)
                made = module.constants() if hasattr(module, "constants") else {}
                if leaf not in made:
                    fresh = cls(config) if fresh is None else fresh
                    made = {leaf: fresh.get_submodule(owner)._buffers[leaf]}
                module.register_buffer(leaf, made[leaf].to(device), persistent=False)
        return model

    # ------------------------------------------------------------------------------------------ writing
    def save(self, path: str | os.PathLike) -> Path:
        """A self-describing varctl model file (config + state_dict), written atomically."""
        file = {"format": FORMAT, "kind": self.kind, "config": self.config.to_dict()}
        return atomic_save({**file, "state_dict": self.state_dict()}, path)

    def export_safetensors(self, path: str | os.PathLike) -> Path:
        """The weights as safetensors, with format, kind and config (JSON) as metadata, written atomically."""
        from safetensors.torch import save_file

        # cloned: safetensors refuses tensors that share storage (official files are views of a few)
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}
        meta = {"format": FORMAT, "kind": self.kind, "config": json.dumps(self.config.to_dict())}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    def checkpoint_entry(self, prefix: str) -> dict[str, Any]:
        """What a Lightning checkpoint records of this model under ``checkpoint["varctl"][kind]``."""
        return {"config": self.config.to_dict(), "prefix": prefix}


# ---------------------------------------------------------------------------------------------- reading
def read_weights(
    source: str | os.PathLike | Mapping, kind: str, ema: bool = False, map_location="cpu"
) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """``(state_dict, stored config or None, name of the source)`` of model ``kind`` in any file kind."""
    if isinstance(source, Mapping):
        return _split(source, kind, ema, "<state_dict>") + ("<state_dict>",)
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if ema:
            raise ValueError(f"{name}: a safetensors export holds one set of weights; ema=True reads the "
                             "averaged weights of a Lightning checkpoint")  # fmt: skip
        with safe_open(name, framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == FORMAT and meta.get("kind") != kind:
            raise ValueError(f"{name}: a varctl '{meta.get('kind')}' export, expected a '{kind}' export")
        config = json.loads(meta["config"]) if meta.get("format") == FORMAT else None
        return load_file(name, device=str(map_location)), config, name
    obj = torch_load(path, "model file or checkpoint", map_location)  # a bad file: UnreadableFile, in words
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return _split(obj, kind, ema, name) + (name,)


def _split(obj: Mapping, kind: str, ema: bool, source: str) -> tuple[dict, dict | None]:
    want = f"{kind}_ema" if ema else kind
    if obj.get("format") == FORMAT:  # a varctl model file
        if obj.get("kind") != kind:
            raise ValueError(f"{source}: a varctl '{obj.get('kind')}' file, expected a '{kind}' file")
        if ema:
            raise ValueError(f"{source}: a varctl model file holds one set of weights; ema=True reads the "
                             "averaged weights of a Lightning checkpoint")  # fmt: skip
        return obj["state_dict"], obj["config"]
    if "varctl" in obj and "state_dict" in obj:  # a varctl Lightning checkpoint
        entries = obj["varctl"]
        if want not in entries:
            hint = "; ema=True needs a checkpoint of a run with EMA (model.ema_decay > 0)" if ema else ""
            raise ValueError(
                f"{source}: no '{want}' weights in this checkpoint (it holds {sorted(entries)}){hint}"
            )
        prefix = entries[want]["prefix"]
        sd = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        return sd, entries[want]["config"]
    if isinstance(obj.get("state_dict"), dict):
        raise ValueError(f"{source}: a Lightning checkpoint not written by varctl (no 'varctl' entry)")
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):  # official: a bare state_dict
        if ema:
            raise ValueError(f"{source}: a bare state_dict (official file) holds no EMA weights")
        return dict(obj), None
    raise ValueError(f"{source}: not a state_dict, a varctl model file or a varctl Lightning checkpoint")
