"""Provenance of the files in this folder: written by varctl at commit e886d35 (before the model lifecycle
of issue 12), with this script, on CPU with torch 2.14.1. Kept to show how they were made; it uses the API of
that commit and is not run by the tests (tests/test_legacy.py reads its outputs).

    git checkout e886d35 && python tests/data/legacy/make_legacy.py tests/data/legacy
"""

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules.synthetic import SyntheticDataModule
from varctl.lit.control import ControlModule
from varctl.lit.tokenizer import TokenizerModule
from varctl.lit.var import VARModule
from varctl.models.control import ControlBranch
from varctl.models.var import VAR
from varctl.models.vqvae import VQVAE

out = Path(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(1)
SIMPLE = dict(backgrounds=["solid"], max_distractors=0, shape_colours=["white", "yellow"],
              background_colours=["black", "blue"])  # fmt: skip


def fit(module, steps, name):
    dm = SyntheticDataModule(num_train=32, num_val=8, batch_size=4, **SIMPLE)
    dm.connect(**module.data_requirements())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, dm)
    trainer.save_checkpoint(out / name)
    return next(iter(dm.val_dataloader()))


vqvae = {"vocab_size": 64, "z_channels": 8, "ch": 8, "norm_groups": 4, "ch_mult": [1, 1, 1, 1],
         "num_res_blocks": 1, "patch_nums": [1, 2, 4]}  # fmt: skip
tok = TokenizerModule(vqvae=vqvae, perceptual_weight=0.0, val_lpips=False, disc_weight=0.0, lr=1e-3,
                      log_images_every_n_steps=0)  # fmt: skip
fit(tok, 2, "tokenizer.ckpt")
tok.vae.save(out / "vqvae.pt")
tok.vae.export_safetensors(out / "vqvae.safetensors")

var = VARModule(str(out / "tokenizer.ckpt"), var={"depth": 1, "num_classes": 10, "embed_dim": 32,
                "num_heads": 2}, lr=1e-2, lr_scale_by_batch=False, ema_decay=0.5,
                log_images_every_n_steps=0)  # fmt: skip
fit(var, 2, "var.ckpt")
var.var.save(out / "var.pt")
var.var.export_safetensors(out / "var.safetensors")

control = ControlModule(str(out / "vqvae.pt"), init_from=str(out / "var.pt"),
                        control={"modalities": ["edges"], "width": 4, "feature_dim": 8, "max_width": 8},
                        lr=1e-2, lr_scale_by_batch=False, ema_decay=0.5, log_images_every_n_steps=0,
                        metric_batches=0)  # fmt: skip
batch = fit(control, 2, "control.ckpt")
control.var.control.save(out / "control.pt")

# what the files compute, by the code that wrote them
vae = VQVAE.load(out / "vqvae.pt").eval()
images, labels, edges = batch["image"], batch["label"], {"edges": batch["control"]["edges"]}
with torch.no_grad():
    idx = vae.img_to_idx(images)
    x = vae.idx_to_var_input(idx)
    expected = {
        "images": images, "labels": labels, "edges": edges["edges"],
        "idx": torch.cat(idx, 1), "recon": vae.idx_to_img(idx),
        "var_logits": VAR.load(out / "var.ckpt").eval()(labels, x),
        "var_ema_logits": VAR.load(out / "var.ckpt", ema=True).eval()(labels, x),
        "control_logits": VAR.load(out / "control.ckpt").eval()(
            labels, x, control=ControlBranch.load(out / "control.ckpt").encode(edges)),
        "control_ema_logits": VAR.load(out / "control.ckpt", ema=True).eval()(
            labels, x, control=ControlBranch.load(out / "control.ckpt", ema=True).encode(edges)),
    }  # fmt: skip
torch.save(expected, out / "expected.pt")
