"""Files written before the model lifecycle (tests/fixtures/legacy, made by make_legacy.py at commit e886d35):
model files, safetensors exports and Lightning checkpoints of all three stages still load and compute what
they computed then, EMA weights included, and `fit` resumes their checkpoints in today's layout."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules.synthetic import SyntheticDataModule
from varctl.lit.control import ControlModule
from varctl.lit.tokenizer import TokenizerModule
from varctl.lit.var import VARModule
from varctl.models import VAR, VQVAE, ControlBranch

LEGACY = Path(__file__).parent / "fixtures" / "legacy"
SIMPLE = dict(backgrounds=["solid"], max_distractors=0, shape_colours=["white", "yellow"],
              background_colours=["black", "blue"])  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")
# the tolerances of the parity tests: other CPUs (AVX2 / AVX-512) move convolutions and matmuls a little
LOGIT_TOL, IMAGE_TOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return torch.load(LEGACY / "expected.pt", weights_only=True)


@pytest.mark.parametrize(
    "name", ["vqvae.pt", "vqvae.safetensors", "tokenizer.ckpt", "var.ckpt", "control.ckpt"]
)
def test_tokenizer_files(name, expected):
    vae = VQVAE.load(LEGACY / name).eval()
    with torch.no_grad():
        idx = vae.img_to_idx(expected["images"])
        assert torch.equal(torch.cat(idx, 1), expected["idx"])
        torch.testing.assert_close(vae.idx_to_img(idx), expected["recon"], atol=IMAGE_TOL, rtol=0)


def _inputs(expected) -> tuple[torch.Tensor, torch.Tensor]:
    vae = VQVAE.load(LEGACY / "vqvae.pt").eval()
    with torch.no_grad():
        return expected["labels"], vae.idx_to_var_input(vae.img_to_idx(expected["images"]))


@pytest.mark.parametrize(
    "name, ema, key",
    [
        ("var.pt", False, "var_logits"),
        ("var.safetensors", False, "var_logits"),
        ("var.ckpt", False, "var_logits"),
        ("var.ckpt", True, "var_ema_logits"),
    ],
)
def test_var_files(name, ema, key, expected):
    labels, x = _inputs(expected)
    with torch.no_grad():
        logits = VAR.load(LEGACY / name, ema=ema).eval()(labels, x)
    torch.testing.assert_close(logits, expected[key], atol=LOGIT_TOL, rtol=0)


@pytest.mark.parametrize("ema, key", [(False, "control_logits"), (True, "control_ema_logits")])
def test_control_checkpoint(ema, key, expected):
    """The old control stage stored the VAR under `var.var.` and the branch under `var.control.`: the
    checkpoint's own entries say so, and both models still read it."""
    labels, x = _inputs(expected)
    var = VAR.load(LEGACY / "control.ckpt", ema=ema).eval()
    branch = ControlBranch.load(LEGACY / "control.ckpt", ema=ema)
    with torch.no_grad():
        logits = var(labels, x, control=branch.encode({"edges": expected["edges"]}))
    torch.testing.assert_close(logits, expected[key], atol=LOGIT_TOL, rtol=0)
    file = ControlBranch.load(LEGACY / "control.pt")
    if not ema:
        assert all(
            torch.equal(a, b) for a, b in zip(file.state_dict().values(), branch.state_dict().values())
        )


def _resume(module, ckpt: str, steps: int = 3) -> L.Trainer:
    dm = SyntheticDataModule(num_train=32, num_val=8, batch_size=4, **SIMPLE)
    dm.connect(**module.data_requirements())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, dm, ckpt_path=ckpt)
    return trainer


def _adam_steps(trainer: L.Trainer) -> set[int]:
    return {int(s["step"]) for s in trainer.optimizers[0].state.values()}


def test_resume_of_old_stage_checkpoints():
    """`fit ckpt_path=` continues the old runs: weights, EMA count (num_updates -> n_averaged) and the
    optimizer state (same parameter order) map to today's names. The old runs' cosine schedules ended at
    lr 0, which the restored optimizer keeps for the step taken here: the weights stay the old ones."""
    var_args = {"depth": 1, "num_classes": 10, "embed_dim": 32, "num_heads": 2}
    optimizer = {"lr": 1e-2, "lr_scale_by_batch": False}
    var = VARModule(str(LEGACY / "tokenizer.ckpt"), var=var_args, optimizer=optimizer, ema_decay=0.5)
    old = VAR.load(LEGACY / "var.ckpt")
    assert not torch.equal(var.var.head.weight, old.head.weight)  # a fresh model, before the resume
    trainer = _resume(var, str(LEGACY / "var.ckpt"))
    assert trainer.global_step == 3 and _adam_steps(trainer) == {3}
    assert int(var.ema.n_averaged) == 4  # the copy, two old updates, one new one
    assert all(torch.equal(a, b) for a, b in zip(var.var.state_dict().values(), old.state_dict().values()))

    control = ControlModule(str(LEGACY / "vqvae.pt"), init_from=str(LEGACY / "var.pt"),
                            control={"modalities": ["edges"], "width": 4, "feature_dim": 8, "max_width": 8},
                            optimizer=optimizer, ema_decay=0.5, scores={"batches": 0})  # fmt: skip
    trainer = _resume(control, str(LEGACY / "control.ckpt"))
    assert trainer.global_step == 3 and _adam_steps(trainer) == {3}
    assert int(control.ema.n_averaged) == 4
    # the frozen backbone is the old checkpoint's
    assert all(
        torch.equal(a, b) for a, b in zip(control.var.state_dict().values(), old.state_dict().values())
    )

    tok = TokenizerModule(vqvae={"preset": "tiny"}, init_from=str(LEGACY / "vqvae.pt"),
                          perceptual={"weight": 0.0, "val_lpips": False}, discriminator={"weight": 0.0},
                          optimizer={"lr": 1e-3})  # fmt: skip
    trainer = _resume(tok, str(LEGACY / "tokenizer.ckpt"))
    assert trainer.global_step == 3 and _adam_steps(trainer) == {3}
