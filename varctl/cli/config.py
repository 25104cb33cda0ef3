"""Compose a run configuration from a YAML file in conf/ with Hydra's compose API, and check it.

Hydra's own ``-c`` means ``--cfg``, so ``@hydra.main`` cannot give ``python -m varctl fit -c FILE``: the CLI
parses its subcommand and ``-c`` itself, then composes here with the remaining ``key=value`` overrides.

Checks run before any work: every key under a ``_target_`` node must be an argument of that target and its
value must fit the argument's annotation; an argument annotated with a settings dataclass (a grouped section
such as ``model.optimizer``) has its keys and values checked against the dataclass's fields the same way;
top-level keys are a fixed set. Errors name the key and the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

from varctl.typecheck import fits, type_name

TOP_LEVEL_KEYS = {
    "run": "run directory settings: name, root, version",
    "seed": "global seed (int) given to lightning.seed_everything",
    "ckpt_path": "Lightning checkpoint to resume (fit) or to evaluate (validate/test/predict)",
    "model": "the LightningModule (_target_ + constructor arguments)",
    "data": "the LightningDataModule (_target_ + constructor arguments)",
    "trainer": "lightning.Trainer arguments",
    "callbacks": "named callbacks (_target_ nodes); set one to null to disable it",
}
RUN_KEYS = {"name": str, "root": str, "version": (str, type(None))}
HYDRA_META = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key and the file."""


def compose(config_file: str | Path, overrides: list[str]) -> DictConfig:
    """Compose ``config_file`` (a YAML in a Hydra config dir) with ``key=value`` overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    path = Path(config_file)
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"-c {config_file}: expected a .yaml file")
    if not path.is_file():
        raise ConfigError(f"-c {config_file}: file not found")
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must look like key=value (Hydra syntax); got {bad} for {path}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(
            config_dir=str(path.parent.resolve()), version_base="1.3", job_name="varctl"
        ):
            cfg = hydra_compose(config_name=path.stem, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain_compose_error(str(e), path, overrides, _known_keys(path))) from None
    except yaml.YAMLError as e:  # the file or a group file it uses (conf/data/*.yaml): e names which, where
        raise ConfigError(f"-c {config_file}: not valid YAML: {e}") from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def _known_keys(path: Path) -> list[str]:
    """Dotted key paths of the file composed without overrides (for 'did you mean' hints)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(
            config_dir=str(path.parent.resolve()), version_base="1.3", job_name="varctl"
        ):
            data = OmegaConf.to_container(hydra_compose(config_name=path.stem), resolve=False)
    except Exception:
        return []
    finally:
        GlobalHydra.instance().clear()
    keys: list[str] = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                keys.append(prefix + str(k))
                walk(v, f"{prefix}{k}.")

    walk(data, "")
    return keys


def _explain_compose_error(msg: str, path: Path, overrides: list[str], known: list[str]) -> str:
    first = msg.strip().splitlines()[0] if msg.strip() else msg
    if "Could not override" in msg or "not in struct" in msg:
        key = first.split("'")[1] if "'" in first else first
        if key in known:  # an existing section given a dict with keys it does not have
            return _explain_section_override(key, path, overrides, known)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return (
            f"unknown config key '{key}' in the overrides of {path}.{hint}\n"
            f"  Use key=value for an existing key; add a new one with +key=value."
        )
    return f"could not compose {path} with overrides {overrides}: {first}"


def _explain_section_override(key: str, path: Path, overrides: list[str], known: list[str]) -> str:
    value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), "")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        parsed = None
    new = [k for k in parsed if f"{key}.{k}" not in known] if isinstance(parsed, dict) else []
    which = f" ({', '.join(map(str, new))} not among them)" if new else ""
    return (
        f"{key}={value}: a value for the existing section '{key}' of {path} can only set the keys it "
        f"already has{which}.\n  Set keys one by one ({key}.KEY=VALUE, +{key}.NEW=VALUE), or replace the "
        f"whole section with ++{key}={value}"
    )


def to_container(cfg: DictConfig, path: str | Path) -> dict:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        first = missing[0]
        raise ConfigError(
            f"{path}: {', '.join(missing)} must be set (the file has '???'); "
            f"e.g. add {first}=VALUE to the command"
        )
    try:
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except Exception as e:
        raise ConfigError(f"{path}: could not resolve an interpolation: {e}") from None


def validate(cfg: DictConfig | dict, path: str | Path) -> dict:
    """Check the composed config, with ``auto`` paths resolved to the earlier stages' newest runs (said on
    stderr, see earlier.py); returns it as a plain resolved dict."""
    if isinstance(cfg, DictConfig):
        import sys

        from varctl.cli.earlier import fill_earlier_stages

        for line in fill_earlier_stages(cfg, path):
            print(f"varctl: using {line}", file=sys.stderr, flush=True)
    data = to_container(cfg, path) if isinstance(cfg, DictConfig) else cfg
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(_unknown(key, "", TOP_LEVEL_KEYS, path, "top-level key"))
    for key in ("model", "data", "trainer"):
        if key not in data or data[key] is None:
            raise ConfigError(f"{path}: missing the '{key}' section ({TOP_LEVEL_KEYS[key]})")
    for key, value in (data.get("run") or {}).items():
        if key not in RUN_KEYS:
            raise ConfigError(_unknown(key, "run.", RUN_KEYS, path, "key"))
        if not isinstance(value, RUN_KEYS[key]):
            raise ConfigError(f"{path}: run.{key} = {value!r}: expected a string")
    if data.get("seed") is not None and (not isinstance(data["seed"], int) or isinstance(data["seed"], bool)):
        raise ConfigError(f"{path}: seed = {data['seed']!r}: expected an integer")
    if data.get("ckpt_path") is not None and not isinstance(data["ckpt_path"], str):
        raise ConfigError(f"{path}: ckpt_path = {data['ckpt_path']!r}: expected a path string")
    callbacks = data.get("callbacks") or {}
    if not isinstance(callbacks, dict):
        raise ConfigError(
            f"{path}: callbacks must be a mapping name -> {{_target_: ...}}, found {callbacks!r}"
        )
    _walk(data, "", path)
    return data


def validate_section(data: dict, key: str, path: str | Path) -> dict:
    """Check one section of a resolved config (``data``, a ``_target_`` node) as ``validate`` does, for a tool
    that builds that part alone (tools/make_shards.py); returns it."""
    if not isinstance(data.get(key), dict):
        raise ConfigError(f"{path}: missing the '{key}' section ({TOP_LEVEL_KEYS.get(key, key)})")
    _walk(data[key], f"{key}.", path)
    return data[key]


def _walk(node: Any, prefix: str, path: str | Path) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            _check_target(node, prefix.rstrip("."), path)
        for key, value in node.items():
            _walk(value, f"{prefix}{key}.", path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _walk(value, f"{prefix}{i}.", path)


def locate(target: str, where: str, path: str | Path) -> Any:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:
        raise ConfigError(f"{path}: {where}._target_ = '{target}' cannot be imported: {e}") from None


def _check_target(node: dict, where: str, path: str | Path) -> None:
    obj = locate(node["_target_"], where, path)
    try:
        params = dict(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return
    hints = _type_hints(obj)
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key, value in node.items():
        if key in HYDRA_META:
            continue
        if key not in params:
            if takes_kwargs:
                continue
            names = {k: None for k, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            raise ConfigError(_unknown(key, f"{where}.", names, path, f"argument of {node['_target_']}"))
        expected = hints.get(key)
        settings = _settings_class(expected)
        if settings is not None and isinstance(value, dict):
            _check_settings(value, settings, f"{where}.{key}", path)
        elif expected is not None and not fits(value, expected):
            raise ConfigError(
                f"{path}: {where}.{key} = {value!r} ({type(value).__name__}): "
                f"expected {type_name(expected)} (argument '{key}' of {node['_target_']})"
            )
    missing = [
        k
        for k, p in params.items()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and k not in node
    ]
    if missing and not node.get("_partial_"):
        raise ConfigError(f"{path}: {where} is missing required argument(s) {missing} of {node['_target_']}")


def _settings_class(tp: Any) -> type | None:
    """The dataclass of a grouped-settings argument (``OptimizerSettings | None``), or None."""
    for candidate in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(candidate) and isinstance(candidate, type):
            return candidate
    return None


def _check_settings(value: dict, cls: type, where: str, path: str | Path) -> None:
    """A section of grouped settings (a dataclass): its keys and their types, as a constructor's."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: None for f in dataclasses.fields(cls)}
    for key, item in value.items():
        if key not in fields:
            raise ConfigError(_unknown(key, f"{where}.", fields, path, f"key of {cls.__name__}"))
        if not fits(item, hints[key]):
            raise ConfigError(
                f"{path}: {where}.{key} = {item!r} ({type(item).__name__}): expected "
                f"{type_name(hints[key])} ({cls.__name__}.{key})"
            )


def _type_hints(obj: Any) -> dict[str, Any]:
    fn = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: skip type checks for this target
        return {}


def _unknown(key: str, prefix: str, known: dict, path: str | Path, what: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    options = ", ".join(sorted(k for k in known if not k.startswith("_")))
    return f"{path}: unknown {what} '{prefix}{key}'.{hint}\n  Known keys: {options}"


def as_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))


__all__ = ["ConfigError", "compose", "validate", "validate_section", "as_yaml", "locate", "ListConfig"]
