"""Checkpoint I/O shared by the models: atomic writes, self-describing files, safetensors export.

A varctl model file is a dict ``{"format": "varctl", "kind": KIND, "config": {...}, "state_dict": {...}}``
so the model can be rebuilt from the file alone. Lightning checkpoints written by varctl carry the same
information under ``checkpoint["varctl"][KIND] = {"config": {...}, "prefix": "vae."}``. Official VAR files
are bare state_dicts. A safetensors export holds the weights, with format, kind and config (JSON) as metadata.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

FORMAT = "varctl"


# ---------------------------------------------------------------------------------------------- atomic writes
@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to: when the block succeeds it is fsynced and renamed over
    ``path``, when it fails it is deleted, so ``path`` never holds a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files: give the file the permissions open() would
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:  # the writer may have closed its own handle: sync through a new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def save_safetensors(
    state_dict: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]
) -> Path:
    """Write weights as safetensors (atomically); tensors are cloned so shared storages are allowed."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


# ---------------------------------------------------------------------------------------------- reading
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


def split_checkpoint(
    obj: dict, kind: str, source: str = "<dict>"
) -> tuple[dict[str, torch.Tensor], dict | None]:
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
        sd = {k[len(prefix) :]: v for k, v in obj["state_dict"].items() if k.startswith(prefix)}
        return sd, meta["config"]
    if "state_dict" in obj and isinstance(obj["state_dict"], dict) and "varctl" not in obj:
        raise ValueError(f"{source}: a Lightning checkpoint not written by varctl (no 'varctl' entry)")
    if all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None
    raise ValueError(f"{source}: not a state_dict, a varctl model file or a varctl Lightning checkpoint")


def read_model(
    path: str | os.PathLike, kind: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict | None]:
    """``(state_dict, config or None)`` of model ``kind`` from a varctl model file, a varctl Lightning
    checkpoint, a safetensors export or a bare (official) state_dict; config None: read it off the shapes."""
    path = Path(path)
    obj = load_file(path, map_location=map_location)
    if path.suffix == ".safetensors":
        return obj, safetensors_config(path, kind)
    return split_checkpoint(obj, kind, str(path))


def official_state_dict(path_or_state_dict: str | os.PathLike | dict, kind: str) -> tuple[dict, str]:
    """``(state_dict, source)`` for a ``from_official`` argument: a state_dict, or a file holding one."""
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict, "<state_dict>"
    source = str(path_or_state_dict)
    state_dict, _ = split_checkpoint(load_file(path_or_state_dict), kind, source)
    return state_dict, source


def safetensors_config(path: Path, kind: str) -> dict | None:
    """The config stored in a varctl safetensors export of ``kind``; None for other safetensors files."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        return None
    if meta.get("kind") != kind:
        raise ValueError(
            f"{path}: a varctl '{meta.get('kind')}' safetensors export, expected a '{kind}' export"
        )
    return json.loads(meta["config"])


# ---------------------------------------------------------------------------------------------- writing
def model_file(kind: str, config: dict, state_dict: dict[str, torch.Tensor]) -> dict:
    return {"format": FORMAT, "kind": kind, "config": config, "state_dict": state_dict}


def save_model(kind: str, config: dict, state_dict: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a self-describing varctl model file (config + state_dict) atomically."""
    return atomic_save(model_file(kind, config, state_dict), path)


def export_safetensors(
    kind: str, config: dict, state_dict: dict[str, torch.Tensor], path: str | os.PathLike
) -> Path:
    """Weights as safetensors, with format, kind and the config (JSON) in the metadata."""
    meta = {"format": FORMAT, "kind": kind, "config": json.dumps(config)}
    return save_safetensors(state_dict, path, metadata=meta)


def short_keys(keys: list[str], n: int = 8) -> str:
    """The first ``n`` keys of a long list, for error messages."""
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")
