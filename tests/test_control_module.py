"""The control stage (varctl/lit/control.py): a branch on a trained tiny VAR learns to use the edge maps,
the backbone stays frozen, checkpoints rebuild both parts, validation scores samples against their controls,
predict writes each sample beside its controls. Tiny random tokenizer (32 px, scales 1-2-4, V=64)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import perturbed
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from datamodules.synthetic import SyntheticDataModule
from varctl.callbacks import ImageLogger, ImageWriter
from varctl.lit.control import ControlModule
from varctl.lit.settings import Sampling
from varctl.lit.var import VARModule
from varctl.models.control import ControlBranch
from varctl.models.control.encoders import check_maps
from varctl.models.var import VAR

pytestmark = pytest.mark.usefixtures("one_thread")

SIMPLE = dict(backgrounds=["solid"], max_distractors=0, shape_colours=["white", "yellow"],
              background_colours=["black", "blue"])  # fmt: skip
BRANCH = {"modalities": ["edges"], "width": 8, "feature_dim": 32, "max_width": 32}


def make_trainer(root, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, max_steps=2, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=None, default_root_dir=str(root),
    )  # fmt: skip
    args.update(kw)
    return L.Trainer(**args)


def make_data(module, num_train=512, batch_size=16, **kw) -> SyntheticDataModule:
    dm = SyntheticDataModule(num_train=num_train, num_val=64, batch_size=batch_size, **{**SIMPLE, **kw})
    dm.connect(**module.data_requirements())
    return dm


def make_control(files, **kw) -> ControlModule:
    vae_file, var_file = files
    optimizer = {"lr": kw.pop("lr", 1e-3), "lr_scale_by_batch": False, "warmup_steps": 5, "decay": "constant"}
    args = dict(init_from=var_file, control=BRANCH, optimizer=optimizer, scores={"batches": 0})
    return ControlModule(vae_file, **{**args, **kw})


@pytest.fixture(scope="module")
def files(tokenizer_file, tmp_path_factory):
    """(tokenizer file, VAR file): a random tiny tokenizer and a class VAR trained 80 steps on it."""
    root = tmp_path_factory.mktemp("control")
    vae_file = tokenizer_file
    torch.manual_seed(0)
    base = VARModule(
        vae_file,
        var={"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2},
        optimizer={"lr": 2e-3, "lr_scale_by_batch": False, "warmup_steps": 5, "decay": "constant"},
    )
    make_trainer(root, max_steps=80).fit(base, make_data(base))
    return vae_file, str(base.var.save(root / "var.pt"))


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    """150 steps of the branch alone on 4096 scenes (each seen once: edges would otherwise let it memorise
    the training images): (module, data, checkpoint)."""
    torch.manual_seed(0)
    m = make_control(files)
    dm = make_data(m, num_train=4096)
    root = tmp_path_factory.mktemp("trained_control")
    trainer = make_trainer(root, max_steps=150)
    trainer.fit(m, dm)
    ckpt = root / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    return m, dm, ckpt


def val_losses(m: ControlModule, dm, var_file: str) -> dict[str, float]:
    """Token CE on 64 val images: with their controls, with another image's, and of the base VAR alone."""
    items = [dm.dataset("val")[i] for i in range(64)]
    labels = torch.tensor([it["label"] for it in items])
    maps = {"edges": torch.stack([it["control"]["edges"] for it in items])}
    target_BL, x = m.tokenize(torch.stack([it["image"] for it in items]))

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_BL.flatten()).item()

    m.model.eval()
    with torch.no_grad():
        return {
            "matched": ce(m.model(labels, x, maps)),
            "rolled": ce(m.model(labels, x, {k: v.roll(1, 0) for k, v in maps.items()})),
            "base": ce(VAR.load(var_file).eval()(labels, x)),
        }


# ---------------------------------------------------------------------------------------------- learning
def test_fresh_branch_gives_the_base_var_logits(files):
    m = make_control(files)
    dm = make_data(m)
    batch = next(iter(dm.val_dataloader()))
    _, x = m.tokenize(batch["image"])
    with torch.no_grad():
        ours = m.model.eval()(batch["label"], x, batch["control"])
        base = VAR.load(files[1]).eval()(batch["label"], x)
    assert torch.equal(ours, base)  # zero-initialised projections add exactly nothing


def test_branch_learns_to_use_the_controls_and_the_backbone_stays(trained, files):
    m, dm, _ = trained
    losses = val_losses(m, dm, files[1])
    # measured: matched ~2.66 < base ~2.68 < rolled ~2.71
    assert losses["matched"] < losses["base"] - 0.005, losses
    assert losses["rolled"] - losses["matched"] > 0.03, losses
    base = VAR.load(files[1])
    assert all(torch.equal(a, b) for a, b in zip(m.var.state_dict().values(), base.state_dict().values()))
    assert m.control.injector.proj_weight.abs().max() > 1e-3


def test_train_backbone_updates_both_parts(files, tmp_path):
    torch.manual_seed(0)
    m = make_control(files, train_backbone=True)
    make_trainer(tmp_path, max_steps=2).fit(m, make_data(m))
    base = VAR.load(files[1])
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, m.var.state_dict()[k])]
    assert len(moved) > 10 and m.control.injector.proj_weight.abs().max() > 0


# ---------------------------------------------------------------------------------------------- files
def test_checkpoint_rebuilds_the_var_and_the_branch(trained, files):
    m, dm, ckpt = trained
    var, branch = VAR.load(ckpt).eval(), ControlBranch.load(ckpt)
    assert branch.config == m.control.config
    batch = next(iter(dm.val_dataloader()))
    _, x = m.tokenize(batch["image"])
    with torch.no_grad():
        expected = m.model.eval()(batch["label"], x, batch["control"])
        got = var(batch["label"], x, control=branch.encode(batch["control"]))
    assert torch.equal(got, expected)
    again = ControlModule.load_from_checkpoint(ckpt)
    assert all(
        torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), m.model.state_dict().values())
    )
    # continue from the saved branch (e.g. a new run on other data)
    cont = make_control(files, control_init_from=str(ckpt))
    assert torch.equal(cont.control.injector.proj_weight, m.control.injector.proj_weight)
    with pytest.raises(
        ValueError, match=r"last\.ckpt: feature_dim=16 conflicts with the file, which has feature_dim=32"
    ):
        make_control(files, control_init_from=str(ckpt), control={**BRANCH, "feature_dim": 16})


def test_ema_of_the_branch_is_saved_and_used(files, tmp_path):
    torch.manual_seed(0)
    m = make_control(files, ema_decay=0.5, lr=1e-2)
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(m, make_data(m))
    ckpt = tmp_path / "ema.ckpt"
    trainer.save_checkpoint(ckpt)
    assert m.eval_model is m.ema.module
    frozen = m.var.blocks[0].attn.mat_qkv.weight  # the frozen backbone is its own average: not copied
    assert m.ema.module.var.blocks[0].attn.mat_qkv.weight is frozen and not frozen.requires_grad
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert torch.equal(saved["ema.module.var.blocks.0.attn.mat_qkv.weight"], frozen)
    averaged, trained = ControlBranch.load(ckpt, ema=True), ControlBranch.load(ckpt)
    assert torch.equal(averaged.injector.proj_weight, m.ema.module.control.injector.proj_weight)
    assert torch.equal(trained.injector.proj_weight, m.control.injector.proj_weight)
    assert (averaged.injector.proj_weight - trained.injector.proj_weight).abs().max() > 1e-6
    plain = make_control(files)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(plain, make_data(plain))
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match=r"plain\.ckpt: no 'control_ema' weights .*ema_decay > 0"):
        ControlBranch.load(tmp_path / "plain.ckpt", ema=True)


def test_a_backbone_frozen_on_resume_keeps_its_trained_weights_not_their_average(files):
    """Saved with the backbone tuned (its EMA differs from it), resumed frozen: the average shares the
    frozen weights, and the checkpoint's trained weights fill them, not its average of them."""
    tuned = make_control(files, ema_decay=0.5, train_backbone=True)
    with torch.no_grad():
        tuned.var.blocks[0].attn.mat_qkv.weight.add_(1.0)  # as training moves it: its average lags
    checkpoint = {"state_dict": dict(tuned.state_dict()), "hyper_parameters": dict(tuned.hparams)}
    frozen = make_control(files, ema_decay=0.5)
    frozen.on_load_checkpoint(checkpoint)  # what Lightning calls before loading the state_dict
    frozen.load_state_dict(checkpoint["state_dict"])
    weight = frozen.var.blocks[0].attn.mat_qkv.weight
    assert torch.equal(weight, tuned.var.blocks[0].attn.mat_qkv.weight) and not weight.requires_grad
    assert frozen.ema.module.var.blocks[0].attn.mat_qkv.weight is weight


def test_settings_errors_name_the_key(files, tmp_path):
    with pytest.raises(ValueError, match=r"model\.init_from must name the VAR to control"):
        make_control(files, init_from=None)
    with pytest.raises(ValueError, match=r"ControlConfig\.depth=3 conflicts with depth=2, .* VAR"):
        make_control(files, control={**BRANCH, "depth": 3})
    with pytest.raises(ValueError, match=r"unknown ControlConfig key 'widht'; did you mean 'width'"):
        make_control(files, control={"widht": 3})
    m = make_control(files, control={**BRANCH, "modalities": ["edges", "depth"]})
    with pytest.raises(ValueError, match=r"data\.controls=\['edges'\]: add \['depth'\] to data\.controls"):
        make_trainer(tmp_path).fit(m, make_data(m, controls=["edges"]))


def one_step_checkpoint(files, tmp_path, control: dict):
    """The path of a control checkpoint after one training step of the branch ``control``."""
    m = make_control(files, control=control)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(m, make_data(m, num_train=16))
    path = tmp_path / f"{control['injector']}.ckpt"
    trainer.save_checkpoint(path)
    return path


@pytest.mark.parametrize("injector,setting", [("car", "car_condition"), ("prefill", "prefix_condition")])
def test_a_checkpoint_refuses_another_condition_of_its_branch(files, tmp_path, injector, setting):
    """car's car_condition and prefill's prefix_condition shape no weight, so strict loading cannot tell: a
    branch trained with the class (CAR's, and every file from before the settings) is refused by a run
    configured with the null condition, naming the setting; the same setting loads."""
    from varctl.checkpoints import CheckpointMismatch

    branch = {**BRANCH, "injector": injector, "car_blocks": 1, setting: "class"}
    ckpt = one_step_checkpoint(files, tmp_path, branch)
    make_control(files, control=branch).check_fits(ckpt)
    other = make_control(files, control={**branch, setting: "none"})
    with pytest.raises(
        CheckpointMismatch, match=rf"{injector}\.ckpt: .*{setting}=class \(here none\); give "
    ):
        other.check_fits(ckpt)


def test_a_car_checkpoint_refuses_another_receiving_block(files, tmp_path):
    """Which backbone block receives car's side output shapes no weight either: another one of the same count
    is refused, naming the setting; more receiving blocks are refused by their weights."""
    from varctl.checkpoints import CheckpointMismatch

    branch = {**BRANCH, "injector": "car", "car_blocks": 1, "car_condition": "class"}
    ckpt = one_step_checkpoint(files, tmp_path, branch)
    moved = make_control(files, control={**branch, "blocks": [0]})  # the last block by default
    with pytest.raises(CheckpointMismatch, match=r"car\.ckpt: .*model\.control\.blocks=\[1\] \(here \[0\]\)"):
        moved.check_fits(ckpt)
    # more receiving blocks: the weights differ, and their check names them (not a setting to give)
    more = make_control(files, control={**branch, "blocks": [0, 1]})
    with pytest.raises(CheckpointMismatch, match=r"injector\.outs\.1\.weight") as e:
        more.check_fits(ckpt)
    assert "give model.control" not in str(e.value)


def test_unlabelled_controls_sample_the_null_class(files):
    m = make_control(files)
    labels = m.condition({"label": torch.tensor([3, -1, 0])})
    assert labels.tolist() == [3, 10, 0]


def test_maps_and_strengths_of_modalities_the_branch_lacks_are_refused_by_name(trained):
    """A typo in modality_strength, or a map of a modality the branch was not trained on, changed nothing
    and said nothing; maps of other batch sizes or 0-255 values reached the encoder unchecked."""
    m, dm, _ = trained
    batch = next(iter(dm.val_dataloader()))
    edges = batch["control"]["edges"][:2]
    cond = m.condition({"label": batch["label"][:2]})
    cases = [
        ({"control_maps": {"edges": edges, "depth": edges}}, r"control_maps names \['depth'\], which the"),
        ({"control_maps": {"edges": edges}, "modality_strength": {"edge": 0.0}}, r"modality_strength names"),
        (
            {"control_maps": {"edges": edges * 255}},
            r"control\['edges'\] holds values in \[0, 255\], expected",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            m.model.generate(cond, vae=m.vae, seed=0, **kwargs)
    with pytest.raises(ValueError, match=r"model.predict.modality_strength names \['edge'\]"):
        ControlModule(m.hparams.tokenizer, init_from=m.hparams.init_from, control=BRANCH,
                      predict={"modality_strength": {"edge": 0.0}})  # fmt: skip
    config = dataclasses.replace(m.control.config, modalities=("edges", "depth"))  # one batch size for all
    with pytest.raises(ValueError, match=r"control\['depth'\] holds 1 maps, control\['edges'\] 2"):
        check_maps(config, {"edges": edges, "depth": edges[:1]}, allow_missing=False)


# ---------------------------------------------------------------------------------------------- evaluation
def test_validation_scores_samples_and_logs_the_grid(trained, tmp_path):
    m, dm, _ = trained
    m.scoring.batches = m.evaluation.batches = 1  # test draws what `evaluation` says, val what `scores` says
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    grids = ImageLogger(every_n_steps=1, max_images=3)
    trainer = make_trainer(tmp_path, limit_val_batches=1, logger=logger, callbacks=[grids])
    metrics = trainer.validate(m, dm, verbose=False)[0]
    for key in ("val/edges_f1", "val_shuffled/edges_f1", "val_tokenizer/edges_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert math.isfinite(metrics["val/loss"])
    # the test split (here the val scenes again) is scored the same way: the same seeds, the same numbers
    tested = make_trainer(tmp_path, limit_test_batches=1).test(m, dm, verbose=False)[0]
    assert tested["test/edges_f1"] == pytest.approx(metrics["val/edges_f1"], abs=1e-6)
    assert tested["test_shuffled/edges_f1"] == pytest.approx(metrics["val_shuffled/edges_f1"], abs=1e-6)
    assert tested["test/loss"] == pytest.approx(metrics["val/loss"], abs=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    image = EventAccumulator(logger.log_dir).Reload().Images("val/control_samples")[-1]
    # columns: edges, 3 scales, real image (32 px + 1 px padding); rows: 3 val images
    assert (image.width, image.height) == (5 * 33 + 1, 3 * 33 + 1)


def test_fast_samplers_under_control_from_the_settings(trained, files):
    """A sampling section's fast samplers under control: a control checkpoint as its own refiner draws what
    the model draws (its branch is loaded with its VAR), guidance skipping runs; a VAR file is refused as
    a controlled refiner, naming the setting."""
    m, dm, ckpt = trained
    m.eval()
    items = [dm.dataset("val")[i] for i in range(4)]
    batch = {"label": torch.tensor([it["label"] for it in items])}
    maps = {"edges": torch.stack([it["control"]["edges"] for it in items])}
    base = dict(cfg=2.0, control_cfg=1.0, control_strength=[1.0, 1.5, 2.0], seed=3)
    with torch.no_grad():
        exact = m.generate_for(batch, maps, Sampling(**base))
        refined = m.generate_for(batch, maps, Sampling(**base, refiner=str(ckpt), draft_scales=1))
        skipped = m.generate_for(batch, maps, Sampling(**base, skip_guidance_from=2))
    assert (refined - exact).abs().max() < 1e-4
    assert skipped.shape == exact.shape and (skipped - exact).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="refiner: a control stage's refiner is a control checkpoint"):
        m.generate_for(batch, maps, Sampling(**base, refiner=files[1], draft_scales=1))


def test_predict_writes_each_sample_beside_its_controls(trained, tmp_path):
    m, dm, _ = trained
    out = tmp_path / "pred"
    trainer = make_trainer(tmp_path, limit_predict_batches=1, callbacks=[ImageWriter(out)])
    dm.batch_size = 4
    try:
        trainer.predict(m, dm, return_predictions=False)
    finally:
        dm.batch_size = 16
    samples = sorted(p for p in out.glob("*.png") if not p.stem.endswith(("_edges", "_real")))
    assert len(samples) == 4 and len(list(out.glob("*.png"))) == 12
    val = dm.dataset("predict")
    for i, path in enumerate(samples):
        edges = np.asarray(Image.open(path.with_name(path.stem + "_edges.png")))  # (H, W, 3), white edges
        assert np.array_equal(edges[..., 0] > 127, val[i]["control"]["edges"][0].numpy() > 0.5)
        real = np.asarray(Image.open(path.with_name(path.stem + "_real.png"))).astype(np.float32) / 127.5 - 1
        assert np.abs(real - val[i]["image"].permute(1, 2, 0).numpy()).max() < 1 / 127.5 + 1e-6
    first = [np.asarray(Image.open(p)) for p in samples]
    trainer.predict(m, make_data(m, batch_size=4), return_predictions=False)  # seeded: the same files again
    assert all(np.array_equal(a, np.asarray(Image.open(p))) for a, p in zip(first, samples))


def test_conf_control_composes(files, tmp_path):
    from hydra.utils import instantiate

    from varctl.cli.config import compose, validate

    path = Path(__file__).resolve().parents[1] / "conf" / "control.yaml"
    overrides = [f"model.tokenizer={files[0]}", f"model.init_from={files[1]}", "data.num_train=8",
                 "data.num_val=4", "data.batch_size=2"]  # fmt: skip
    data = validate(compose(path, overrides), path)
    model = instantiate(data["model"], _convert_="all")
    assert isinstance(model, ControlModule) and model.modalities == ("edges",)
    assert model.control.config.feature_dim == 128 and not model.hparams.train_backbone


def test_text_conditioned_control(files, tmp_path):
    """A branch on a text VAR: the caption conditions (and is dropped for guidance), the edges control."""
    text_encoder = {"name": "ViT-B-32", "pretrained": None,
                    "model_cfg": {"embed_dim": 32, "text_cfg": {"width": 32, "heads": 2, "layers": 1,
                                                                "context_length": 24}}}  # fmt: skip
    base = VARModule(files[0], text_encoder=text_encoder, var={"depth": 2, "embed_dim": 64, "num_heads": 2})
    perturbed(base.var)  # a fresh text VAR ignores the text (zero-init cross-attention)
    var_file = str(base.var.save(tmp_path / "text_var.pt"))
    torch.manual_seed(0)
    m = make_control((files[0], var_file), text_encoder=text_encoder, scores={"batches": 1})
    assert m.data_requirements()["keys"] == ("image", "caption", "control")
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    grids = ImageLogger(every_n_steps=1, max_images=2)
    trainer = make_trainer(
        tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, logger=logger, callbacks=[grids]
    )
    trainer.fit(m, make_data(m, batch_size=4))
    assert math.isfinite(trainer.callback_metrics["val/loss"]) and "val/edges_f1" in trainer.callback_metrics
    batch = next(iter(make_data(m, batch_size=4).val_dataloader()))
    sampling = Sampling(cfg=1.5, seed=0)
    images = m.generate_for(batch, batch["control"], sampling)
    again = m.generate_for(batch, batch["control"], sampling)
    other = m.generate_for({**batch, "caption": [""] * 4}, batch["control"], sampling)
    assert torch.equal(images, again) and images.shape == (4, 3, 32, 32)
    assert (images - other).abs().mean() > 1e-4  # the caption matters


# ---------------------------------------------------------------------------------------------- injectors
@pytest.mark.parametrize("injector", ["controlar", "car", "prefill", "ecm"])
def test_every_injector_learns_to_use_the_controls(files, tmp_path, injector):
    """80 steps of each injector (the backbone frozen, control dropout on): the val loss with the
    matched controls beats the loss with another image's; samples under control guidance are finite and
    differ from samples without it."""
    torch.manual_seed(0)
    # a prefix reaches a frozen backbone only through its fixed attention: it learns with a tuned one, and
    # slower (150 steps at lr 1e-3: margin 0.033; 80 at 2e-3: 0.011, the others 0.018-0.026 there)
    tuned = injector == "prefill"
    steps, lr = (150, 1e-3) if tuned else (80, 2e-3)
    branch = {**BRANCH, "injector": injector, "adapter_dim": 32, "control_drop_rate": 0.1}
    if injector == "car":  # conf/control.yaml's (CAR's own class conditioning: tests/test_injectors.py)
        branch["car_condition"] = "none"
    if injector == "prefill":  # conf/control.yaml's (the class-conditioned prefix: tests/test_injectors.py)
        branch["prefix_condition"] = "none"
    m = make_control(files, control=branch, train_backbone=tuned, lr=lr)
    dm = make_data(m, num_train=4096)
    make_trainer(tmp_path, max_steps=steps).fit(m, dm)
    losses = val_losses(m, dm, files[1])
    assert losses["rolled"] - losses["matched"] > 0.01, losses
    base = VAR.load(files[1])
    same = all(torch.equal(a, b) for a, b in zip(m.var.state_dict().values(), base.state_dict().values()))
    assert same != tuned
    batch = next(iter(dm.val_dataloader()))
    batch = {k: (v[:4] if k != "control" else {c: t[:4] for c, t in v.items()}) for k, v in batch.items()}
    plain = m.generate_for(batch, batch["control"], Sampling(cfg=1.0, seed=0))
    guided = m.generate_for(batch, batch["control"], Sampling(cfg=1.0, seed=0, control_cfg=2.0))
    assert torch.isfinite(guided).all() and (plain - guided).abs().amax() > 1e-3


def test_token_pruning_with_a_prefix_is_refused_when_the_module_is_built(files):
    """Pruning drops tokens, and prefill's attention bias is per token: refused before a run, naming the
    section (it failed at the first sampling step, every job of a list with it), other injectors prune."""
    prefill = {**BRANCH, "injector": "prefill"}
    for section in ("predict", "samples", "scores", "evaluation"):
        extra = {"batches": 0} if section == "scores" else {}
        with pytest.raises(ValueError, match=rf"model.{section}.token_pruning=0.5 cannot be used with model"
                                             r".control.injector=prefill"):  # fmt: skip
            make_control(files, control=prefill, **{section: {"token_pruning": 0.5, **extra}})
    m = make_control(files, control={**BRANCH, "injector": "ecm"}, predict={"token_pruning": 0.5})
    batch = next(iter(make_data(m).val_dataloader()))
    images = m.generate_for(batch, batch["control"], m.predictions)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("tuning", ["norms", [1]])
def test_selective_tuning_trains_only_the_chosen_backbone_parameters(files, tmp_path, tuning):
    torch.manual_seed(0)
    m = make_control(files, train_backbone=tuning, lr=1e-2)
    make_trainer(tmp_path, max_steps=2).fit(m, make_data(m))
    base = VAR.load(files[1]).state_dict()
    moved = {k for k, v in base.items() if not torch.equal(v, m.var.state_dict()[k])}
    if tuning == "norms":
        assert moved and all(any(p in k for p in ("bias", "scale_mul", "ada_gss")) for k in moved), moved
        assert "blocks.0.attn.mat_qkv.weight" not in moved
    else:
        assert moved and all(k.startswith("blocks.1.") for k in moved), moved
    with pytest.raises(ValueError, match=r"model\.train_backbone must be true, false, \"norms\" or a list"):
        make_control(files, train_backbone="biases")


def test_scale_loss_weights_and_early_sampling(files):
    m = make_control(files, scale_loss_weights=[0.0, 1.0, 3.0])
    loss_BL = torch.rand(8, 21)  # scales 1, 2, 4: tokens [0, 1), [1, 5), [5, 21)
    w = torch.tensor([0.0] + [1.0] * 4 + [3.0] * 16)
    expected = (loss_BL * w).sum() / (w.sum() * 8)
    assert torch.allclose(m.training_loss(loss_BL), expected)
    early = make_control(files, scale_sampling="early")
    torch.manual_seed(0)
    ones = torch.zeros(4096, 21)
    ones[:, 0] = 1.0  # loss 1 on the first scale only: the mean over the sampled tokens
    # P(last scale k) = (3 - k) / 6: the kept tokens are 1 (k=0), 5 (k=1), 21 (k=2)
    got = early.training_loss(ones).item()
    assert got == pytest.approx(4096 / (4096 * (3 * 1 + 2 * 5 + 1 * 21) / 6), rel=0.05)
    with pytest.raises(ValueError, match=r"model\.scale_loss_weights must hold 3 non-negative weights"):
        make_control(files, scale_loss_weights=[1.0, 1.0])


def test_pretrained_encoder_trains_its_alignment(files, tmp_path):
    """SCALAR-Uni: a frozen (random, tiny) ViT, an alignment layer per modality, the L2 alignment loss."""
    torch.manual_seed(0)
    vit = {"encoder": "pretrained", "encoder_weights": "random", "encoder_name": "vit_tiny_patch16_224",
           "encoder_input": 32, "encoder_layers": [0, 1], "encoder_kwargs": {"depth": 2, "embed_dim": 32,
           "num_heads": 2}, "modalities": ["edges", "depth"], "modality_drop_rate": 0.3}  # fmt: skip
    m = make_control(files, control={**BRANCH, **vit}, lr=1e-2)
    frozen = {k: v.clone() for k, v in m.control.encoder.backbone.state_dict().items()}
    align = m.control.encoder.align["edges"].weight.detach().clone()
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(m, make_data(m, controls=["edges", "depth"]))
    assert float(trainer.callback_metrics["train/align"]) > 0
    assert all(torch.equal(v, m.control.encoder.backbone.state_dict()[k]) for k, v in frozen.items())
    assert (m.control.encoder.align["edges"].weight - align).abs().max() > 0
    # one training forward passes the frozen encoder once per map and once over the real images, and gives
    # the logits and alignment loss of the separate encode + alignment_loss
    batch = next(iter(make_data(m, controls=["edges", "depth"]).train_dataloader()))
    _, x = m.tokenize(batch["image"])
    enc, calls = m.control.encoder, []
    original = enc.encode_image
    enc.encode_image = lambda img: calls.append(len(img)) or original(img)
    m.model.train()
    torch.manual_seed(1)
    logits = m.model(batch["label"], x, batch["control"], images=batch["image"])
    assert calls == [16, 16, 16]  # edges, depth, the real images
    torch.manual_seed(1)
    controls = m.control.encode(batch["control"], drop=True)
    alone = m.control.alignment_loss(batch["control"], batch["image"])
    torch.testing.assert_close(m.model.alignment, alone)
    torch.testing.assert_close(logits, m.var(batch["label"], x, control=controls))
    enc.encode_image = original


def test_a_pretrained_encoder_checkpoint_restores_without_the_weights_file(files, tmp_path):
    """A run's checkpoint holds the frozen encoder: it restores (load_from_checkpoint, or ckpt_path of a
    trainer) on a machine without the original weights file; a new run without the file names it."""
    import timm

    torch.manual_seed(0)
    kwargs = {"depth": 2, "embed_dim": 32, "num_heads": 2}
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **kwargs).state_dict(),
               weights)  # fmt: skip
    vit = {"encoder": "pretrained", "encoder_weights": str(weights), "encoder_name": "vit_tiny_patch16_224",
           "encoder_input": 32, "encoder_layers": [0, 1], "encoder_kwargs": kwargs}  # fmt: skip
    m = make_control(files, control={**BRANCH, **vit})
    dm = make_data(m, num_train=64)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(m, dm)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    weights.unlink()
    restored = ControlModule.load_from_checkpoint(ckpt, map_location="cpu")
    frozen = m.control.encoder.backbone.state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in restored.control.encoder.backbone.state_dict().items())
    fresh = make_control(files, control={**BRANCH, **vit})  # builds: the file is read when it is needed
    val = make_trainer(tmp_path, limit_val_batches=1).validate(fresh, dm, ckpt_path=str(ckpt), verbose=False)
    assert math.isfinite(val[0]["val/loss"])
    with pytest.raises(FileNotFoundError, match=r"encoder_weights names .*vit\.pth'?, which does not exist"):
        make_trainer(tmp_path, max_steps=1).fit(make_control(files, control={**BRANCH, **vit}), dm)


def test_the_average_shares_the_pretrained_encoder(files, tmp_path):
    """With EMA, the frozen encoder's weights are one set, read from the file when the branch is built: the
    average has them too, and validates after the file is gone."""
    import timm

    kwargs = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, **kwargs).state_dict(),
               weights)  # fmt: skip
    vit = {"encoder": "pretrained", "encoder_weights": str(weights), "encoder_name": "vit_tiny_patch16_224",
           "encoder_input": 32, "encoder_layers": [0], "encoder_kwargs": kwargs}  # fmt: skip
    m = make_control(files, control={**BRANCH, **vit}, ema_decay=0.5)
    weights.unlink()
    live, average = m.control.encoder, m.ema.module.control.encoder
    assert (
        average.weights_ready
        and average.backbone.patch_embed.proj.weight is live.backbone.patch_embed.proj.weight
    )
    val = make_trainer(tmp_path, limit_val_batches=1).validate(m, make_data(m, num_train=64), verbose=False)
    assert m.eval_model is m.ema.module and math.isfinite(val[0]["val/loss"])


def test_control_branch_trains_and_scores_on_sketches(files, tmp_path):
    torch.manual_seed(0)
    m = make_control(files, control={"modalities": ["sketch"], "width": 8, "feature_dim": 32,
                                                 "max_width": 32}, scores={"batches": 1})  # fmt: skip
    dm = make_data(m, controls=["sketch"])
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=1)
    trainer.fit(m, dm)
    metrics = trainer.validate(m, dm, verbose=False)[0]
    for key in ("val/sketch_ssim", "val_shuffled/sketch_ssim", "val_tokenizer/sketch_ssim"):
        assert -1.0 <= metrics[key] <= 1.0 and math.isfinite(metrics[key]), key
    assert metrics["val_tokenizer/sketch_ssim"] > metrics["val/sketch_ssim"]  # reconstructions beat 3 steps
    assert "val/edges_f1" not in metrics


def test_control_fields_are_for_the_control_stage_only():
    with pytest.raises(ValueError, match=r"\['control_cfg'\] apply to the control stage only"):
        Sampling(control_cfg=1.0).generate_kwargs()
    assert "control_cfg" in Sampling(control_cfg=1.0).generate_kwargs(control=True)


def test_test_scores_generation_quality_with_its_two_references(files, judge_file, tmp_path):
    """`test` scores the samples, the samples for other images' controls and the tokenizer's reconstructions
    (the ceiling) with the feature networks, next to the control fidelity."""
    torch.manual_seed(0)
    evaluation = {"batches": 1, "networks": ["judge"], "judge_weights": judge_file, "kid_subsets": 5}
    m = make_control(files, evaluation=evaluation)
    out = make_trainer(tmp_path, limit_test_batches=1).test(m, make_data(m, num_train=16), verbose=False)[0]
    for group in ("test", "test_shuffled", "test_tokenizer"):
        assert out[f"{group}/num_generated_judge"] == 16 and math.isfinite(out[f"{group}/fd_judge"]), group
        assert f"{group}/edges_f1" in out
    assert out["test_tokenizer/fd_judge"] != out["test/fd_judge"]
