"""Checkpoint I/O shared by the models: atomic writes, self-describing files, safetensors export.

A varctl model file is a dict ``{"format": "varctl", "kind": KIND, "config": {...}, "state_dict": {...}}``
so the model can be rebuilt from the file alone. Lightning checkpoints written by varctl carry the same
information under ``checkpoint["varctl"][KIND] = {"config": {...}, "prefix": "vae."}``. Official VAR files
are bare state_dicts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = "varctl"


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint dict with ``weights_only=True``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file as st_load

        return st_load(str(path), device=str(map_location))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a pickle with non-tensor objects, or a corrupt file
        raise ValueError(f"could not read checkpoint {path}: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path}: expected a dict, found {type(obj).__name__}")
    return obj


def split_checkpoint(obj: dict, kind: str, source: str = "<dict>") -> tuple[dict[str, torch.Tensor], dict | None]:
    """Return ``(state_dict, config or None)`` for model ``kind`` from any supported checkpoint dict.

    Supported: a varctl model file, a varctl Lightning checkpoint (``checkpoint["varctl"][kind]``), or a
    bare state_dict (official files): then config is None and the caller reads it off the shapes.
    """
    if obj.get("format") == FORMAT:
        if obj.get("kind") != kind:
            raise ValueError(f"{source}: a varctl '{obj.get('kind')}' file, expected a '{kind}' file")
        return obj["state_dict"], obj["config"]
    if "varctl" in obj and "state_dict" in obj:
        meta = obj["varctl"].get(kind)
        if meta is None:
            raise ValueError(f"{source}: Lightning checkpoint holds {sorted(obj['varctl'])}, not '{kind}'")
        prefix = meta["prefix"]
        sd = {k[len(prefix):]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        return sd, meta["config"]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict) and "varctl" not in obj:
        raise ValueError(f"{source}: a Lightning checkpoint not written by varctl (no 'varctl' entry)")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(f"{source}: not a state_dict, a varctl model file or a varctl Lightning checkpoint")


def model_file(kind: str, config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    return {"format": FORMAT, "kind": kind, "config": config, "state_dict": state_dict}


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write weights as safetensors (atomically); tensors are cloned so shared storages are allowed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write text to a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
