"""The checkpoints of earlier stages, found when the command does not name them: ``python -m varctl fit -c
conf/control.yaml`` on the runs that README command 1 (``make demo``) left under ``run.root``."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from varctl.cli.config import ConfigError

VAR_TARGET = "varctl.lit.var.VARModule"
CONTROL_TARGET = "varctl.lit.control.ControlModule"
FIRST = {
    "tokenizer": "python -m varctl fit -c conf/tokenizer.yaml",
    "var": "python -m varctl fit -c conf/var.yaml",
}


def newest(root: str | Path, name: str) -> Path | None:
    """The newest ``<root>/<name>/<version>/checkpoints/last.ckpt`` (by modification time), or None."""
    found = [p for p in Path(root, name).glob("*/checkpoints/last.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _unset(cfg: DictConfig, key: str) -> bool:
    return OmegaConf.is_missing(cfg, key) or OmegaConf.select(cfg, key) is None


def _from_scratch(cfg: DictConfig) -> bool:
    """The control stage trains its VAR from scratch (``model.train_backbone=true``, no ``init_from``)."""
    return OmegaConf.select(cfg, "model.train_backbone") is True


def _run_tokenizer(var_ckpt: Path) -> str | None:
    """The tokenizer a VAR run was trained on (its ``config_fit.yaml``), when that file still exists."""
    config = var_ckpt.parent.parent / "config_fit.yaml"
    if not config.is_file():
        return None
    tokenizer = OmegaConf.select(OmegaConf.load(config), "model.tokenizer")
    return str(tokenizer) if tokenizer and Path(tokenizer).is_file() else None


def fill_earlier_stages(cfg: DictConfig, config_file: str | Path, strict: bool = True) -> list[str]:
    """Set ``model.tokenizer`` (VAR and control stage) and ``model.init_from`` (control stage) when unset,
    from the newest runs under ``run.root``; returns what was chosen, one line each. With none there, a
    ConfigError names the commands to run first (``strict``), or the keys stay unset."""
    target = OmegaConf.select(cfg, "model._target_")
    if target not in (VAR_TARGET, CONTROL_TARGET):
        return []
    root = OmegaConf.select(cfg, "run.root") or "runs"
    chosen: list[str] = []

    def missing(stage: str, key: str) -> None:
        if not strict:
            return
        steps = [FIRST["tokenizer"]] + ([FIRST["var"]] if stage == "var" else [])
        raise ConfigError(
            f"{config_file}: {key} is not set and {Path(root) / stage} holds no checkpoints/last.ckpt. "
            f"Train the earlier stage{'s' if len(steps) > 1 else ''} first: "
            + " then ".join(f"`{s}`" for s in steps)
            + f" (or `make demo`, which runs them all), or set {key}=PATH"
        )

    if (
        target == CONTROL_TARGET
        and _unset(cfg, "model.init_from")
        and not OmegaConf.select(cfg, "model.train_backbone")
    ):
        var = newest(root, "var")
        if var is None:
            missing("var", "model.init_from")
            return chosen
        cfg.model.init_from = str(var)
        chosen.append(f"model.init_from={var} (the newest VAR run under {root})")
        if _unset(cfg, "model.tokenizer") and (tokenizer := _run_tokenizer(var)) is not None:
            cfg.model.tokenizer = tokenizer
            chosen.append(f"model.tokenizer={tokenizer} (the tokenizer that VAR was trained on)")
    if _unset(cfg, "model.tokenizer"):
        tokenizer = newest(root, "tokenizer")
        if tokenizer is None:
            missing("tokenizer", "model.tokenizer")
            return chosen
        cfg.model.tokenizer = str(tokenizer)
        chosen.append(f"model.tokenizer={tokenizer} (the newest tokenizer run under {root})")
    return chosen


def still_to_set(cfg: DictConfig) -> list[str]:
    """The keys a run needs that are unset: ``???`` values, and the control stage's ``model.init_from``."""
    unset = sorted(OmegaConf.missing_keys(cfg))
    control = OmegaConf.select(cfg, "model._target_") == CONTROL_TARGET
    if control and _unset(cfg, "model.init_from") and not _from_scratch(cfg):
        unset.append("model.init_from")
    return unset
