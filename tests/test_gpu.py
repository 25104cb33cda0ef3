"""What only a CUDA device shows: fused attention kernels on VAR's attention, bf16 and fp16 (loss-scaled)
training steps through the Trainer flags. Skipped without a GPU (conftest.py); CI has none."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from datamodules.synthetic import SyntheticDataModule
from varctl.lit.var import VARModule
from varctl.models.var import VAR, VARConfig
from varctl.models.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.gpu

TINY_VAR = {"depth": 2, "num_classes": 10, "embed_dim": 128, "num_heads": 2}  # head width 64, as official


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vae = VQVAE(VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                            patch_nums=(1, 2, 4)))  # fmt: skip
    var = VAR(VARConfig(vocab_size=64, z_channels=8, patch_nums=(1, 2, 4), **TINY_VAR))
    return vae.cuda().eval(), var.cuda().eval()


def _teacher_forcing(var, backend):
    labels = torch.tensor([0, 3, 7, 9], device="cuda")
    x = torch.randn(4, var.config.L - 1, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([backend]):
        return var(labels, x)


def test_fused_kernels_run_var_attention(models):
    """The block-causal (additive mask) forward runs on the memory-efficient kernel, sampling (no mask, KV
    cache) on flash attention; both agree with the math kernel."""
    vae, var = models
    reference = _teacher_forcing(var, SDPBackend.MATH)
    fused = _teacher_forcing(var, SDPBackend.EFFICIENT_ATTENTION)
    torch.testing.assert_close(fused, reference, atol=5e-2, rtol=5e-2)
    labels = torch.tensor([1, 2], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            flash = var.generate(labels, cfg=1.5, top_k=1, seed=0, vae=vae)
        with sdpa_kernel([SDPBackend.MATH]):
            math_images = var.generate(labels, cfg=1.5, top_k=1, seed=0, vae=vae)
    assert flash.shape == (2, 3, 32, 32) and torch.isfinite(flash).all()
    assert (flash - math_images).abs().mean() < 0.05


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_fit_on_gpu(tmp_path, precision):
    torch.manual_seed(0)
    cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 4))  # fmt: skip
    vae_file = VQVAE(cfg).save(tmp_path / "vae.pt")
    m = VARModule(str(vae_file), var=TINY_VAR, optimizer={"lr": 2e-3, "lr_scale_by_batch": False})
    dm = SyntheticDataModule(num_train=64, num_val=16, batch_size=8)
    dm.connect(**m.data_requirements())
    trainer = L.Trainer(
        accelerator="gpu", devices=1, precision=precision, max_steps=4, limit_val_batches=1,
        val_check_interval=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        gradient_clip_val=2.0, log_every_n_steps=1, default_root_dir=str(tmp_path),
    )  # fmt: skip
    trainer.fit(m, dm)
    assert math.isfinite(trainer.callback_metrics["train/loss"].item())
    assert math.isfinite(trainer.callback_metrics["val/loss"].item())
    assert all(p.dtype == torch.float32 for p in m.var.parameters())
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    assert (scaler is not None) == (precision == "16-mixed")
    images = m.var.generate(torch.tensor([0, 1], device=m.device), cfg=1.5, seed=0, vae=m.vae)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_blocks_match_eager(tmp_path, mode):
    """``model.compile_mode``: the compiled blocks (with reduce-overhead the whole forward, CUDA graphs) give
    the eager logits in teacher forcing, and the model still samples (varying shapes per scale, KV caches)."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 4))  # fmt: skip
    vae_file = VQVAE(cfg).save(tmp_path / "vae.pt")
    m = VARModule(str(vae_file), var=TINY_VAR, compile_mode=mode).cuda().eval()
    labels = torch.tensor([0, 3, 7, 9], device="cuda")
    x = torch.randn(4, m.var.config.L - 1, 8, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        eager = m.var(labels, x)
        m.configure_model()
        for _ in range(3):  # the first calls record; later ones replay
            compiled = m.var(labels, x).clone()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    images = m.var.generate(labels, cfg=1.5, top_k=1, seed=0, vae=m.vae)
    assert images.shape == (4, 3, 32, 32) and torch.isfinite(images).all()
