"""The checkpoints of earlier stages, found when the config says ``auto``: ``python -m varctl fit -c
conf/control.yaml`` then trains on the runs that README command 1 (``make demo``) left under ``run.root``.

``model.tokenizer: auto`` (conf/var.yaml, conf/control.yaml) is the newest ``<run.root>/tokenizer`` run, or
for the control stage the tokenizer its VAR was trained on; ``model.init_from: auto`` (conf/control.yaml) is
the newest ``<run.root>/var`` run. A path on the command line replaces ``auto``.

With ``ckpt_path`` (resuming, or validate / test / predict of a trained run), ``auto`` is what that run was
trained on, as its checkpoint records it, and where that file is gone the checkpoint itself, which holds the
tokenizer's and the VAR's weights: a checkpoint copied to another machine runs alone, and a newer run under
``run.root`` is never taken for the one the checkpoint was trained on.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from varctl.cli.config import ConfigError

AUTO = "auto"
FIRST = {
    "tokenizer": "python -m varctl fit -c conf/tokenizer.yaml",
    "var": "python -m varctl fit -c conf/var.yaml",
}


def newest(root: str | Path, name: str) -> Path | None:
    """The newest ``<root>/<name>/<version>/checkpoints/last.ckpt`` (by modification time), or None."""
    found = [p for p in Path(root, name).glob("*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _auto(cfg: DictConfig, key: str) -> bool:
    return not OmegaConf.is_missing(cfg, key) and OmegaConf.select(cfg, key) == AUTO


def _run_tokenizer(var_ckpt: Path) -> str | None:
    """The tokenizer a VAR run was trained on (its ``config_fit.yaml``), when that file still exists."""
    config = var_ckpt.parent.parent / "config_fit.yaml"
    if not config.is_file():
        return None
    tokenizer = OmegaConf.select(OmegaConf.load(config), "model.tokenizer")
    return str(tokenizer) if tokenizer and Path(tokenizer).is_file() else None


def _tokenizer_of(var_file: str) -> tuple[str, str] | None:
    """(tokenizer, why) that a VAR file was trained on: the one its run recorded (its hyper-parameters, or
    its run's config_fit.yaml) while that file exists, else the checkpoint itself when it holds the
    tokenizer's weights (a stage-2 checkpoint does); None for a file that says nothing (var_d16.pth)."""
    saved = _saved_with(var_file)
    if saved is not None:
        hparams, kinds = saved
        recorded = hparams.get("tokenizer")
        if isinstance(recorded, str) and recorded != AUTO and Path(recorded).is_file():
            return recorded, "the tokenizer that VAR was trained on"
        if "vqvae" in kinds:
            return var_file, "the VAR's checkpoint holds its tokenizer's weights"
    if Path(var_file).parent.name != "checkpoints":  # a file outside a run: no run config to read
        return None
    tokenizer = _run_tokenizer(Path(var_file))
    return None if tokenizer is None else (tokenizer, "the tokenizer that VAR was trained on")


def _saved_with(ckpt: str) -> tuple[dict, set[str]] | None:
    """(hyper-parameters, model kinds whose weights the file holds) of a varctl Lightning checkpoint, or
    None when it is not one (a damaged file is named first, by ``check_checkpoint``). A sharded checkpoint
    (a directory) records its hyper-parameters in ``meta.pt``; its weights are not read as one file."""
    import torch

    path, sharded = Path(ckpt), Path(ckpt, "meta.pt")
    if not (path.is_file() or sharded.is_file()):
        return None
    file = path if path.is_file() else sharded
    try:  # mmap: only the archive's index and the pickled structure are read
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("varctl"), dict):
        return None
    kinds = set(obj["varctl"]) if file == path else set()
    return dict(obj.get("hyper_parameters") or {}), kinds


def _fill_from_checkpoint(cfg: DictConfig, ckpt: str, config_file: str | Path, strict: bool) -> list[str]:
    """``auto`` keys from the run that wrote ``ckpt`` (module docstring)."""
    saved = _saved_with(ckpt)
    if saved is None:
        return []
    hparams, kinds = saved
    chosen = []
    for key, kind, what in (("model.init_from", "var", "VAR"), ("model.tokenizer", "vqvae", "tokenizer")):
        if not _auto(cfg, key):
            continue
        recorded = hparams.get(key.split(".")[1])
        recorded = recorded if isinstance(recorded, str) and recorded != AUTO else None
        if recorded is not None and Path(recorded).is_file():
            value, why = recorded, f"the {what} that ckpt_path's run was trained on"
        elif kind in kinds:
            value, why = ckpt, f"ckpt_path holds the {what}'s weights"
        elif recorded is not None and strict:  # a sharded checkpoint: never another run in its place
            raise ConfigError(
                f"{config_file}: {key}=auto: ckpt_path's run was trained on {recorded}, which is gone, and "
                f"{ckpt} (sharded) holds no {what} file to load it from; set {key}=PATH to that {what}"
            )
        else:
            continue
        OmegaConf.update(cfg, key, value)
        chosen.append(f"{key}={value} ({why})")
    return chosen


def fill_earlier_stages(cfg: DictConfig, config_file: str | Path, strict: bool = True) -> list[str]:
    """Replace ``auto`` in ``model.init_from`` and ``model.tokenizer`` by the newest runs under ``run.root``;
    returns what was chosen, one line each. With no run there, a ConfigError names the commands to run
    first (``strict``), or the value stays ``auto``."""
    if OmegaConf.select(cfg, "model") is None:
        return []
    root = OmegaConf.select(cfg, "run.root") or "runs"
    ckpt = OmegaConf.select(cfg, "ckpt_path", default=None)
    if ckpt and strict:  # a damaged or missing checkpoint is named before anything is taken in its place
        from varctl.checkpoints import check_checkpoint

        try:
            check_checkpoint(str(ckpt))
        except ValueError as e:
            raise ConfigError(f"{config_file}: ckpt_path: {e}") from None
    chosen = _fill_from_checkpoint(cfg, str(ckpt), config_file, strict) if ckpt else []

    def missing(stage: str, key: str) -> None:
        if not strict:
            return
        steps = [FIRST["tokenizer"]] + ([FIRST["var"]] if stage == "var" else [])
        raise ConfigError(
            f"{config_file}: {key}=auto but {Path(root) / stage} holds no <version>/checkpoints/last.ckpt. "
            f"Train the earlier stage{'s' if len(steps) > 1 else ''} first: "
            + " then ".join(f"`{s}`" for s in steps)
            + f" (or `make demo`, which runs them all), or set {key}=PATH"
        )

    if _auto(cfg, "model.init_from"):
        var = newest(root, "var")
        if var is None:
            missing("var", "model.init_from")
            return chosen
        cfg.model.init_from = str(var)
        chosen.append(f"model.init_from={var} (the newest VAR run under {root})")
    init_from = OmegaConf.select(cfg, "model.init_from", default=None)
    if _auto(cfg, "model.tokenizer") and isinstance(init_from, str) and Path(init_from).exists():
        found = _tokenizer_of(init_from)  # a given VAR too: the tokenizer it was trained on, not the newest
        if found is not None:
            cfg.model.tokenizer = found[0]
            chosen.append(f"model.tokenizer={found[0]} ({found[1]})")
    if _auto(cfg, "model.tokenizer"):
        tokenizer = newest(root, "tokenizer")
        if tokenizer is None:
            missing("tokenizer", "model.tokenizer")
            return chosen
        cfg.model.tokenizer = str(tokenizer)
        chosen.append(f"model.tokenizer={tokenizer} (the newest tokenizer run under {root})")
    return chosen


def still_to_set(cfg: DictConfig) -> list[str]:
    """The keys a run needs that are unset: ``???`` values and ``auto`` ones no run resolves."""
    unset = sorted(OmegaConf.missing_keys(cfg))
    return unset + [k for k in ("model.tokenizer", "model.init_from") if _auto(cfg, k)]
