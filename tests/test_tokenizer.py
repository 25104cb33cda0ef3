"""TokenizerModule: training with and without the discriminator, bf16, DDP, dead-code restart, fine-tuning,
checkpoints, validation metrics and images. Tiny VQVAE at 32 px (8x downsampling, scales 1..4)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from datamodules.synthetic import SyntheticDataModule
from varctl.callbacks import ImageLogger
from varctl.lit.tokenizer import TokenizerModule
from varctl.metrics import codebook
from varctl.models.vqvae import VQVAE, VQVAEConfig

TINY = {"preset": "tiny", "vocab_size": 64, "z_channels": 8, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
        "patch_nums": [1, 2, 3, 4]}  # fmt: skip


def make_module(**overrides) -> TokenizerModule:
    optimizer = {"lr": overrides.pop("lr", 1e-3), **overrides.pop("optimizer", {})}
    perceptual = {"weight": 0.0, "val_lpips": False, **overrides.pop("perceptual", {})}
    discriminator = {"weight": 0.0, **overrides.pop("discriminator", {})}
    args = dict(vqvae=TINY, perceptual=perceptual, discriminator=discriminator, optimizer=optimizer)
    return TokenizerModule(**{**args, **overrides})


GAN = {"weight": 0.5, "start": 0, "channels": 8, "layers": 2}  # a small discriminator from step 0


def make_data(module: TokenizerModule, batch_size: int = 4, num_train: int = 32, num_val: int = 8):
    dm = SyntheticDataModule(batch_size=batch_size, num_train=num_train, num_val=num_val)
    dm.connect(**module.data_requirements())
    return dm


def make_trainer(**kwargs) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(**{**base, **kwargs})


def clone_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def test_data_requirements_and_config_errors(tmp_path):
    m = make_module()
    assert m.data_requirements() == {"resolution": 32, "keys": ("image",)}
    assert m.vae.config.vocab_size == 64 and m.vae.config.patch_nums == (1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown VQVAEConfig key 'vocab'; did you mean 'vocab_size'"):
        make_module(vqvae={"preset": "tiny", "vocab": 3})
    with pytest.raises(ValueError, match="model.vqvae .* or model.init_from"):
        make_module(vqvae=None)
    with pytest.raises(ValueError, match="model.codebook.restart_every must be >= 1"):
        make_module(codebook={"restart_dead_codes": True, "restart_every": 0})


def test_fast_dev_run_trains_generator_and_discriminator_from_step_0():
    torch.manual_seed(0)
    m = make_module(discriminator=GAN, gradient_clip_val=1.0)
    vae0, disc0 = clone_params(m.vae), clone_params(m.discriminator)
    trainer = make_trainer(fast_dev_run=2)
    trainer.fit(m, datamodule=make_data(m))
    assert trainer.global_step == 2  # one optimizer step per batch, generator and discriminator together
    logged = trainer.callback_metrics
    for key in ("train/d_loss", "train/g_loss", "train/g_weight", "train/recon_loss", "val/psnr", "val/ssim"):
        assert torch.isfinite(logged[key]), key
    assert logged["train/g_weight"] > 0  # adaptive weight from the decoder's last layer
    assert "val/lpips" not in logged  # no real LPIPS weights: no metric at all
    for before, after in ((vae0, m.vae), (disc0, m.discriminator)):
        moved = [k for k, p in after.named_parameters() if not torch.equal(before[k], p)]
        assert len(moved) > 0.9 * len(before)


def test_discriminator_waits_for_disc_start():
    torch.manual_seed(0)
    m = make_module(discriminator={**GAN, "start": 100})
    disc0 = clone_params(m.discriminator)
    trainer = make_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(m, datamodule=make_data(m))
    assert trainer.global_step == 2
    assert all(torch.equal(disc0[k], p) for k, p in m.discriminator.named_parameters())
    optimizer = trainer.optimizers[0]
    assert not any(p in optimizer.state for p in m.discriminator.parameters())  # no Adam step was counted
    assert "train/g_loss" not in trainer.callback_metrics


def test_bf16_mixed_fast_dev_run():
    torch.manual_seed(0)
    m = make_module(discriminator=GAN)
    trainer = make_trainer(fast_dev_run=1, precision="bf16-mixed")
    trainer.fit(m, datamodule=make_data(m))
    for key in ("train/loss", "train/d_loss", "train/g_weight", "val/psnr"):
        assert torch.isfinite(trainer.callback_metrics[key]), key
    assert m.vae.quantize.embedding.weight.dtype == torch.float32


def test_fp16_loss_scaling_clips_unscaled_gradients():
    """16-mixed (fp16 autocast + GradScaler): clipping and the logged norm see unscaled gradients. A CPU
    Trainer maps precision="16-mixed" to bf16, so the fp16 plugin is passed directly (as on a GPU)."""
    norms = {}
    for name, plugins in (("32", []), ("16", [MixedPrecision("16-mixed", "cpu")])):
        torch.manual_seed(0)
        m = make_module(discriminator=GAN, gradient_clip_val=0.5)
        before = clone_params(m.vae)
        trainer = make_trainer(max_steps=1, limit_val_batches=0, plugins=plugins, log_every_n_steps=1)
        trainer.fit(m, datamodule=make_data(m))
        norms[name] = trainer.callback_metrics["train/grad_norm"].item()
        assert all(p.dtype == torch.float32 for p in m.vae.parameters())
        assert any(not torch.equal(before[k], p) for k, p in m.vae.named_parameters())  # the step was taken
    scaler = trainer.precision_plugin.scaler
    assert scaler.get_scale() == 2.0**16  # no overflow: the scale stays, the step was not skipped
    assert norms["32"] > 0.5  # the clip is active
    assert norms["16"] == pytest.approx(norms["32"], rel=2e-2), norms  # scaled gradients would be 65536x


def test_short_training_raises_psnr():
    # measured (seeds 0-3): 9.8-10.5 dB untrained -> 11.9-12.1 dB after 40 steps (+1.5..2.1 dB), ~4 s quiet
    torch.manual_seed(0)
    m = make_module(lr=2e-3, optimizer={"warmup_steps": 5, "betas": [0.9, 0.99]}, recon_loss="l2")
    dm = make_data(m, batch_size=8, num_train=320, num_val=16)
    trainer = make_trainer(
        max_steps=40, limit_val_batches=2, val_check_interval=40, check_val_every_n_epoch=None
    )
    before = trainer.validate(m, datamodule=dm, verbose=False)[0]["val/psnr"]
    trainer.fit(m, datamodule=dm)
    after = float(trainer.callback_metrics["val/psnr"])
    assert after > before + 1.0, (before, after)


def test_dead_code_restart_revives_codes():
    torch.manual_seed(0)
    m = make_module(codebook={"restart_dead_codes": True, "restart_every": 5, "dead_code_threshold": 0.05})
    quant = m.vae.quantize
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        quant.embedding.weight[:16] = 100.0  # codes 0..15 can never be the nearest
        out = m.vae(x)
    assert out.hits_SV[:, :16].sum() == 0
    quant.record_hits(out.hits_SV)
    dead = codebook.dead_everywhere(quant.ema_vocab_hit_SV, 0.05)
    assert dead[:16].all()
    dead_idx = dead.nonzero().flatten()

    # the residual vectors the quantiser sees at each scale, with the codebook before the restart
    with torch.no_grad():
        fhat = quant.f_to_idx_or_fhat(out.f_BChw, to_fhat=True)
    pools = []
    for si, pn in enumerate(m.vae.config.patch_nums):
        rest = out.f_BChw - (fhat[si - 1] if si else 0)
        rest = torch.nn.functional.interpolate(rest, size=(pn, pn), mode="area") if si < 3 else rest
        pools.append(rest.permute(0, 2, 3, 1).reshape(-1, 8))
    pool = torch.cat(pools)

    m._codebook_step(out.hits_SV, out.f_BChw, step=4)  # not a restart step
    assert int(m.restarted_codes) == 0
    m._codebook_step(out.hits_SV, out.f_BChw, step=5)  # a restart step
    assert int(m.restarted_codes) == dead_idx.numel()
    new = quant.embedding.weight.detach()[dead_idx]
    assert not (new == 100.0).any()
    # every new code is one of those residual vectors
    assert (new[:, None] - pool[None]).abs().amax(-1).min(1).values.max() < 1e-6
    # the codes are alive again: hit by the quantiser and no longer counted dead
    with torch.no_grad():
        hits_after = m.vae(x).hits_SV
    assert hits_after[:, dead_idx].sum() > 0
    assert not codebook.dead_everywhere(quant.ema_vocab_hit_SV, 0.05).any()
    assert quant.ema_vocab_hit_SV[:, dead_idx].sum() > 0


def test_fine_tune_init_from_a_varctl_file(tmp_path):
    torch.manual_seed(3)
    cfg = {k: v for k, v in TINY.items() if k != "preset"}
    source = VQVAE(VQVAEConfig.from_name("tiny", **cfg))
    path = source.save(tmp_path / "tok.pt")
    m = make_module(vqvae=None, init_from=str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(m.vae.state_dict()[k], v), k
    assert m.vae.config == source.config
    with pytest.raises(
        ValueError, match=r"tok\.pt: vocab_size=128 conflicts with the file, which has vocab_size=64"
    ):
        make_module(vqvae={"vocab_size": 128}, init_from=str(path))
    # a training setting may differ, and a key equal to the file's is accepted
    tuned = make_module(vqvae={"beta": 0.5, "vocab_size": 64}, init_from=str(path))
    assert tuned.vae.config.beta == 0.5 and tuned.vae.quantize.beta == 0.5
    assert torch.equal(tuned.vae.quantize.embedding.weight, source.quantize.embedding.weight)


def test_checkpoint_rebuilds_the_vqvae(tmp_path):
    torch.manual_seed(0)
    source = VQVAE(VQVAEConfig.from_name("tiny", **{k: v for k, v in TINY.items() if k != "preset"}))
    init = source.save(tmp_path / "init.pt")
    m = make_module(
        vqvae=None, init_from=str(init), perceptual={"weight": 0.1, "net": "alex", "pretrained": False}
    )
    trainer = make_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(m, datamodule=make_data(m))
    ckpt = tmp_path / "tok.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert raw["varctl"]["vqvae"]["prefix"] == "vae."
    assert not any(k.startswith("perceptual.") for k in raw["state_dict"])  # LPIPS is not stored
    assert raw["hyper_parameters"]["init_from"] is None

    vae = VQVAE.load(ckpt).eval()
    m.vae.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(vae.img_to_idx(x), m.vae.img_to_idx(x)))
        assert torch.equal(
            vae.fhat_to_img(vae.img_to_fhat(x)[-1]), m.vae.fhat_to_img(m.vae.img_to_fhat(x)[-1])
        )
    init.unlink()  # the checkpoint alone is enough
    again = TokenizerModule.load_from_checkpoint(ckpt)
    for k, v in m.vae.state_dict().items():
        assert torch.equal(again.vae.state_dict()[k], v), k


@pytest.mark.usefixtures("one_thread")  # conftest.py: tiny convs are far faster on 1 thread
def test_a_resume_continues_the_codebook_hit_statistics_exactly(tmp_path):
    """The quantizer's count of recorded hits sets the rate of their EMA (0.9/0.1 for the first 100, then
    0.99/0.01). The checkpoint keeps it beside the VQVAE's weights (whose layout is the official one), so a
    run resumed at step 2 folds its hits in at the uninterrupted run's rate; loading guessed 100 before."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from varctl.callbacks import ResumeRandomState

    def fit(folder, ckpt=None):
        torch.manual_seed(0)
        m = make_module(codebook={"restart_dead_codes": False})
        saves = ModelCheckpoint(tmp_path / folder, filename="{step}", every_n_train_steps=1, save_top_k=-1)
        trainer = make_trainer(max_steps=4, limit_val_batches=0, enable_checkpointing=True,
                               callbacks=[saves, ResumeRandomState()])  # fmt: skip
        trainer.fit(m, datamodule=make_data(m), ckpt_path=ckpt)
        return m.vae.quantize

    whole = fit("whole")
    step2 = tmp_path / "whole" / "step=2.ckpt"
    raw = torch.load(step2, weights_only=True)
    assert raw["codebook_hit_records"] == 2
    assert not any("hit_records" in k for k in raw["state_dict"])  # the VQVAE's layout is unchanged
    resumed = fit("resumed", ckpt=str(step2))
    assert whole.num_hit_records == resumed.num_hit_records == 4
    assert torch.equal(whole.ema_vocab_hit_SV, resumed.ema_vocab_hit_SV)
    del raw["codebook_hit_records"]  # a checkpoint of an earlier version: warmed-up statistics, as before
    old = make_module()
    old.on_load_checkpoint(raw)
    old.load_state_dict(raw["state_dict"])
    assert old.vae.quantize.num_hit_records == 100


def test_predict_and_validation_images(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = make_module()
    dm = make_data(m)
    x = next(iter(dm.val_dataloader()))["image"]
    m.eval()
    pred = m.predict_step({"image": x}, batch_idx=1)
    assert pred["names"] == ["recon000004", "recon000005", "recon000006", "recon000007"]
    with torch.no_grad():
        expected = (m.vae.fhat_to_img(m.vae.img_to_fhat(x)[-1]) + 1) / 2
    assert torch.equal(pred["images"], expected) and 0 <= pred["images"].min() and pred["images"].max() <= 1

    logger = TensorBoardLogger(tmp_path, name="tb")
    images = {}
    monkeypatch.setattr(logger.experiment, "add_image", lambda tag, img, step: images.__setitem__(tag, img))
    trainer = make_trainer(logger=logger, limit_val_batches=1, callbacks=[ImageLogger(max_images=2)])
    result = trainer.validate(m, datamodule=dm, verbose=False)[0]
    assert set(images) == {"val/input_recon", "val/input_then_scales"}
    grid = images["val/input_then_scales"]  # 2 rows (images) x (1 + 4 scales) columns, 1 px padding
    assert grid.shape == (3, 1 + 2 * 33, 1 + 5 * 33)
    torch.testing.assert_close(grid[:, 1:33, 1:33], (x[0] + 1) / 2)  # first cell: the input
    last_cell = grid[:, 1:33, 1 + 4 * 33 : 5 * 33]  # after the last scale: the reconstruction
    torch.testing.assert_close(last_cell, expected[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        idx = m.vae.img_to_idx(x)  # the one val batch
    for si in range(4):
        assert result[f"val/codebook/usage/s{si}"] == pytest.approx(100 * idx[si].unique().numel() / 64)
    assert 0 < result["val/psnr"] < 60 and 0 < result["val/ssim"] <= 1


def test_lpips_metric_only_with_real_weights(tmp_path, monkeypatch):
    import torchvision

    from varctl.lit.losses import backbone_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.perceptual.pretrained"):
        make_module(perceptual={"weight": 1.0, "net": "alex", "pretrained": True})
    with pytest.warns(UserWarning, match="NOT the real LPIPS"):
        fake = make_module(perceptual={"weight": 1.0, "net": "alex", "pretrained": False, "val_lpips": True})
    assert not fake.has_lpips_metric

    path, _ = backbone_weights_file("alex")  # stand-in ImageNet weights at the cache path
    path.parent.mkdir(parents=True)
    features = torchvision.models.alexnet().features.state_dict()
    torch.save({f"features.{k}": v for k, v in features.items()}, path)
    torch.manual_seed(0)
    m = make_module(perceptual={"weight": 1.0, "net": "alex", "pretrained": True, "val_lpips": True})
    dm = make_data(m)
    result = make_trainer(limit_val_batches=1).validate(m, datamodule=dm, verbose=False)[0]
    x = next(iter(dm.val_dataloader()))["image"]
    with torch.no_grad():
        recon = m.vae(x).recon.clamp(-1, 1)
        expected = m.perceptual(recon, x).mean()
    assert result["val/lpips"] == pytest.approx(float(expected), rel=1e-5)
    assert result["val/perceptual_loss"] == pytest.approx(
        float(m.perceptual(m.vae(x).recon, x).mean()), rel=1e-4
    )


def test_test_scores_reconstructions_with_the_feature_networks(judge_file):
    """Reconstruction FD (rFID with the FID Inception) of the test images, next to PSNR and codebook use;
    the value is the one computed by hand from the same reconstructions."""
    from varctl.metrics.generation import GenerationMetrics, JudgeFeatures

    torch.manual_seed(0)
    m = make_module(evaluation={"batches": 1, "networks": ["judge"], "judge_weights": judge_file,
                                "kid_subsets": 5})  # fmt: skip
    dm = make_data(m, batch_size=8)
    scores = make_trainer(limit_test_batches=2).test(m, dm, verbose=False)[0]
    assert scores["test/num_generated_judge"] == 8 and "test/psnr" in scores
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        recon = m.vae(batch["image"]).recon.float().clamp(-1, 1).add(1).mul(0.5)
    by_hand = GenerationMetrics(JudgeFeatures(judge_file), kid_subsets=5)
    by_hand.update(batch["image"].add(1).mul(0.5), real=True)
    by_hand.update(recon, real=False)
    assert scores["test/fd_judge"] == pytest.approx(by_hand.compute()["fd_judge"], rel=1e-4)


def test_a_stopped_test_of_the_tokenizer_goes_on_to_the_same_scores(judge_file, tmp_path):
    """The tokenizer's test metrics (PSNR, SSIM, losses, codebook use: metrics Lightning logs as objects;
    the rFID features) kept after 2 of 3 batches: the test run again evaluates the third batch alone."""
    from helpers import StopAfter

    from varctl.callbacks import TestProgress

    torch.manual_seed(0)
    m = make_module(evaluation={"batches": 3, "networks": ["judge"], "judge_weights": judge_file,
                                "kid_subsets": 5})  # fmt: skip
    dm = make_data(m, batch_size=2)  # 4 test batches, 3 of them tested
    stopped, resumed = copy.deepcopy(m), copy.deepcopy(m)
    whole = make_trainer(limit_test_batches=3).test(m, dm, verbose=False)[0]
    progress = tmp_path / "progress"
    with pytest.raises(RuntimeError, match="killed"):
        make_trainer(limit_test_batches=3, callbacks=[TestProgress(progress, every_s=0), StopAfter(1)]).test(
            stopped, dm, verbose=False
        )
    evaluated = []
    evaluate = resumed._evaluate
    resumed._evaluate = lambda batch, i, stage: evaluated.append(i) or evaluate(batch, i, stage)
    scores = make_trainer(limit_test_batches=3, callbacks=[TestProgress(progress, every_s=0)]).test(
        resumed, dm, verbose=False
    )[0]
    assert evaluated == [2] and scores.keys() == whole.keys() and scores["test/num_generated_judge"] == 6
    for key, value in whole.items():
        assert scores[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
