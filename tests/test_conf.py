"""Every file in conf/ composes, passes the key/type checks and instantiates (tiny overrides keep it fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from datamodules.scenes import CLASS_NAMES
from varctl.cli.config import ConfigError, compose, validate
from varctl.metrics.classifier import class_names_from_files
from varctl.models.vqvae import VQVAE, VQVAEConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
TOP_LEVEL = sorted(p.name for p in CONF.glob("*.yaml") if p.name != "control_d16.yaml")  # the demo chain
# control_d16.yaml (official shapes, 256-px folders) runs in tests/test_d16.py


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "vae.pt"
    VQVAE(VQVAEConfig.from_name("cpu_small")).save(path)
    return str(path)


@pytest.fixture(scope="module")
def var_file(tokenizer_file, tmp_path_factory) -> str:
    """A VAR for the demo tokenizer: what conf/control.yaml controls."""
    from varctl.models.var import VAR, VARConfig

    vae = VQVAE.load(tokenizer_file)
    fields = {k: getattr(vae.config, k) for k in ("vocab_size", "z_channels", "patch_nums")}
    path = tmp_path_factory.mktemp("var") / "var.pt"
    VAR(VARConfig(depth=2, num_classes=10, **fields)).save(path)
    return str(path)


def _overrides(name: str, tokenizer_file: str, var_file: str) -> list[str]:
    extra = ["data.num_train=8", "data.num_val=4", "data.batch_size=2"]
    if name != "tokenizer.yaml":
        extra.append(f"model.tokenizer={tokenizer_file}")
    if name == "control.yaml":
        extra.append(f"model.init_from={var_file}")
    return extra


def test_top_level_files_exist():
    assert {"tokenizer.yaml", "var.yaml", "var_text.yaml", "control.yaml"} <= set(TOP_LEVEL)


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_config_instantiates(name, tokenizer_file, var_file):
    path = CONF / name
    data = validate(compose(path, _overrides(name, tokenizer_file, var_file)), path)
    datamodule = instantiate(data["data"], _convert_="all")
    model = instantiate(data["model"], _convert_="all")
    needs = model.data_requirements()
    datamodule.connect(**needs)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    res = needs["resolution"]
    assert batch["image"].shape == (2, 3, res, res)
    if "control" in needs["keys"]:
        assert set(model.modalities) <= set(batch["control"])
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    trainer = instantiate(data["trainer"], _convert_="all", logger=False, enable_checkpointing=False)
    assert trainer.max_steps == data["trainer"]["max_steps"]
    callbacks = [instantiate(node, _convert_="all") for node in data["callbacks"].values() if node]
    assert callbacks


def test_stages_train_on_the_same_scenes():
    """A VAR must see the scenes its tokenizer was trained on: the demo configs agree on the data options."""
    keys = (
        *("_target_", "backgrounds", "max_distractors", "shape_colours", "background_colours"),
        *("num_train", "seed"),
    )
    datas = {n: compose(CONF / n, [])["data"] for n in TOP_LEVEL}
    assert {n: tuple(str(d[k]) for k in keys) for n, d in datas.items()} == {
        n: tuple(str(datas["tokenizer.yaml"][k]) for k in keys) for n in datas
    }
    assert list(datas["var.yaml"]["backgrounds"]) == ["solid"] and datas["var.yaml"]["max_distractors"] == 0


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml")))
def test_trainer_options_validate(option):
    data = validate(compose(CONF / "tokenizer.yaml", [f"trainer={option}"]), "tokenizer.yaml")
    assert data["trainer"]["_target_"] == "lightning.Trainer"
    if option == "cpu":
        trainer = instantiate(data["trainer"], _convert_="all", logger=False, enable_checkpointing=False)
        assert trainer.precision == "32-true"
    strategy = data["trainer"].get("strategy")
    if isinstance(strategy, dict):  # FSDP2: the strategy object builds without a GPU
        from lightning.pytorch.strategies import ModelParallelStrategy

        built = instantiate(strategy, _convert_="all")
        assert isinstance(built, ModelParallelStrategy)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_options_validate(option, tmp_path):
    required = {"folder": "root", "pairs": "root", "shards": "root", "captions": "train_list"}
    overrides = [f"data={option}"] + ([f"data.{required[option]}={tmp_path}"] if option in required else [])
    data = validate(compose(CONF / "tokenizer.yaml", overrides), "tokenizer.yaml")
    assert data["data"]["_target_"].startswith("datamodules.")
    if option in required:  # without the required path the error names the key
        with pytest.raises(ConfigError, match=rf"data\.{required[option]} must be set"):
            validate(compose(CONF / "tokenizer.yaml", [f"data={option}"]), "tokenizer.yaml")


def test_missing_mandatory_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.root must be set"):
        validate(compose(CONF / "control_d16.yaml", []), CONF / "control_d16.yaml")


def test_settings_sections_are_checked_like_arguments(tokenizer_file, var_file):
    """The grouped settings (model.optimizer, model.scores, ...) are checked key by key and type by type
    against their dataclasses, before anything is built; the control stage's signature is explicit."""
    path = CONF / "control.yaml"
    base = _overrides("control.yaml", tokenizer_file, var_file)
    validate(compose(path, base), path)
    with pytest.raises(ConfigError, match=r"unknown argument of .*ControlModule 'model\.lr'"):
        validate(compose(path, [*base, "+model.lr=0.1"]), path)
    with pytest.raises(
        ConfigError,
        match=r"unknown key of OptimizerSettings 'model\.optimizer\.lr_scale_by_bach'.*lr_scale_by_batch",
    ):
        validate(compose(path, [*base, "+model.optimizer.lr_scale_by_bach=false"]), path)
    with pytest.raises(ConfigError, match=r"model\.optimizer\.warmup_steps = 'x' \(str\): expected int"):
        validate(compose(path, [*base, "model.optimizer.warmup_steps=x"]), path)
    with pytest.raises(ConfigError, match=r"model\.scores\.cfg = 'high' \(str\): expected .*float"):
        validate(compose(path, [*base, "model.scores.cfg=high"]), path)
    with pytest.raises(ConfigError, match=r"model\.predict\.cfg_schedule = 'cosine'"):
        validate(compose(path, [*base, "+model.predict.cfg_schedule=cosine"]), path)


def test_text_demo_captions_describe_the_demo_scenes():
    """The text demo's captions name one shape each (so its samples can be scored) in the data's palette."""
    cfg = compose(CONF / "var_text.yaml", [])
    model, data = cfg["model"], cfg["data"]
    captions = list(model["predict"]["captions"]) + list(model["samples"]["captions"])
    labels = class_names_from_files([f"caption_{c}.png" for c in captions], CLASS_NAMES)
    assert sorted(labels[: len(model["predict"]["captions"])]) == list(range(len(CLASS_NAMES)))
    for caption, label in zip(captions, labels):
        words = caption.split()
        assert words[words.index(CLASS_NAMES[label]) - 1] in data["shape_colours"], caption
        assert words[words.index("background") - 1] in data["background_colours"], caption


def test_data_that_cannot_feed_the_model_stops_before_the_run(tokenizer_file, var_file, tmp_path, capsys):
    """The data's classes and controls are checked against the model right after the data's scan: a config
    error naming both settings, and no run directory, not a traceback from the trainer's setup."""
    from varctl.cli import main

    cases = {
        "control.yaml": (["data.controls=[depth]"], "model.control.modalities=['edges'] but data.controls=["),
        "var.yaml": (["model.var.num_classes=5", "model.predict.labels=[0]"], "model.var.num_classes=5 but"),
    }
    for name, (overrides, message) in cases.items():
        args = [*_overrides(name, tokenizer_file, var_file), *overrides, f"run.root={tmp_path}"]
        assert main(["fit", "-c", str(CONF / name), *args]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and message in err
    assert not list(tmp_path.iterdir())
