"""The checkpoints of earlier stages, found when the config says ``auto``: ``python -m varctl fit -c
conf/control.yaml`` then trains on the runs that README command 1 (``make demo``) left under ``run.root``.

``model.tokenizer: auto`` (conf/var.yaml, conf/control.yaml) is the newest ``<run.root>/tokenizer`` run, or
for the control stage the tokenizer its VAR was trained on; ``model.init_from: auto`` (conf/control.yaml) is
the newest ``<run.root>/var`` run. A path on the command line replaces ``auto``.
"""

from __future__ import annotations

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


def fill_earlier_stages(cfg: DictConfig, config_file: str | Path, strict: bool = True) -> list[str]:
    """Replace ``auto`` in ``model.init_from`` and ``model.tokenizer`` by the newest runs under ``run.root``;
    returns what was chosen, one line each. With no run there, a ConfigError names the commands to run
    first (``strict``), or the value stays ``auto``."""
    if OmegaConf.select(cfg, "model") is None:
        return []
    root = OmegaConf.select(cfg, "run.root") or "runs"
    chosen: list[str] = []

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
        if _auto(cfg, "model.tokenizer") and (tokenizer := _run_tokenizer(var)) is not None:
            cfg.model.tokenizer = tokenizer
            chosen.append(f"model.tokenizer={tokenizer} (the tokenizer that VAR was trained on)")
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
