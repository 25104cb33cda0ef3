"""Training stage 1: the multi-scale VQ tokenizer of VAR, trained or fine-tuned VQGAN-style.

Generator loss (varctl/lit/losses.py): w_rec * L1|L2 + w_p * LPIPS + w_vq * L_vq + w_d * lambda * hinge_G,
with VQGAN's adaptive lambda from the decoder's last layer; the PatchGAN discriminator joins at
``disc_start``. Codebook health per scale (varctl/metrics/codebook.py) is logged from the quantiser's EMA
of code hits; dead codes can be restarted from encoder residuals. The official VAR release has no tokenizer
trainer; this follows VQGAN (Esser et al., 2021) and the statistics the official quantiser keeps.

Legend: B batch, C latent channels, h w latent size, pn side of one scale, S scales, V vocabulary.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from varctl.callbacks.images import ImageGrid
from varctl.checkpoints import FitsCheckpoint
from varctl.lit import losses, optim
from varctl.lit.evaluation import log_evaluation, rows_of, start_evaluation, unrepeated
from varctl.lit.settings import (
    CodebookSettings,
    DiscriminatorSettings,
    Evaluation,
    OptimizerSettings,
    PerceptualSettings,
    plain_hparams,
)
from varctl.metrics import codebook
from varctl.metrics.reconstruction import reconstruction_metrics
from varctl.models.discriminator import PatchDiscriminator
from varctl.models.vqvae import VQVAE

# Lightning warns that with manual optimization ModelCheckpoint saves the weights after the step's update:
# that is the state at global_step, which a resume continues from, as under automatic optimization; the
# warning's 15 lines of example code were noise on every tokenizer run
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

# the tokenizer's default recipe (VQGAN's optimiser): no lr scaling, no weight decay, a constant lr
RECIPE = {"lr_scale_by_batch": False, "betas": (0.5, 0.9), "weight_decay": 0.0, "decay": "constant"}
HIT_RECORDS = "codebook_hit_records"  # the checkpoint's entry of the quantizer's num_hit_records


class TokenizerModule(FitsCheckpoint, L.LightningModule):
    """Trains ``self.vae`` (a VQVAE) on dict batches ``{"image": (B, 3, H, W) in [-1, 1], ...}``.

    The generator and the discriminator are two parameter groups of one AdamW (``optimizer.lr`` and
    ``disc_lr``), stepped once per batch after one backward of both losses, so ``trainer.global_step`` counts
    batches and every parameter gets a gradient each step (plain DDP works).
    """

    test_batches_done = 0  # the test batches already in the metrics (varctl.callbacks.TestProgress)
    stage = "vqvae"  # FitsCheckpoint: the checkpoints of this stage

    def __init__(
        self,
        vqvae: dict | None = None,
        init_from: str | None = None,
        recon_loss: Literal["l1", "l2"] = "l1",
        recon_weight: float = 1.0,
        vq_weight: float = 1.0,
        perceptual: PerceptualSettings | None = None,
        discriminator: DiscriminatorSettings | None = None,
        codebook: CodebookSettings | None = None,
        optimizer: OptimizerSettings | None = None,
        gradient_clip_val: float | None = None,
        evaluation: Evaluation | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        plain_hparams(self.hparams)
        self.automatic_optimization = False
        self.lpips_settings = PerceptualSettings.of(perceptual)
        self.gan = DiscriminatorSettings.of(discriminator)
        self.codes = CodebookSettings.of(codebook)
        self.optimizer_settings = OptimizerSettings.of(optimizer, **RECIPE)
        self.evaluation = Evaluation.of(evaluation)  # test: reconstruction FID etc. (varctl.lit.evaluation)
        self.evaluator, self.evaluation_record = None, None
        if init_from is not None:  # the architecture comes from the file; explicit fields must agree with it
            self.vae = VQVAE.load(init_from, **{k: v for k, v in (vqvae or {}).items() if k != "preset"})
        elif vqvae:
            self.vae = VQVAE.build(vqvae)
        else:
            raise ValueError(
                "set model.vqvae (e.g. {preset: cpu_small}) or model.init_from (a checkpoint to fine-tune)"
            )
        gan = self.gan
        self.discriminator = PatchDiscriminator(3, gan.channels, gan.layers) if gan.weight > 0 else None
        # codes restarted since the start of training (kept in checkpoints, so it survives a resume)
        self.register_buffer("restarted_codes", torch.zeros((), dtype=torch.long))
        self._disc_on = False  # whether this step updates the discriminator (set in training_step)
        self._hit_records: int | None = None  # the quantizer's count, from a checkpoint being loaded

        lp, self.perceptual = self.lpips_settings, None
        if lp.weight > 0 or lp.val_lpips:
            self.perceptual = losses.PerceptualLoss(lp.net, lp.pretrained)
            if not lp.pretrained:
                rank_zero_warn(
                    "model.perceptual.pretrained=false: the perceptual loss uses a random backbone; it is a "
                    "feature loss, NOT the real LPIPS, and no LPIPS metric is reported"
                )
        self.has_lpips_metric = lp.val_lpips and self.perceptual is not None and self.perceptual.pretrained

        S, V = self.vae.config.num_scales, self.vae.config.vocab_size
        self.eval_metrics = torch.nn.ModuleDict(
            {stage: reconstruction_metrics(S, V) for stage in ("val", "test")}
        )

    # ------------------------------------------------------------------ wiring
    def data_requirements(self) -> dict[str, Any]:
        return {"resolution": self.vae.config.resolution, "keys": ("image",)}

    def check_trainer(self, trainer) -> None:
        """The trainer's settings against this stage's (the CLI calls it before a fit writes anything). The
        stage optimizes by hand (one step of generator and discriminator per batch), which Lightning's
        clipping and accumulation do not support: they would stop the fit with Lightning's traceback."""
        optim.check_schedule(trainer, self.optimizer_settings)
        clip, accumulate = trainer.gradient_clip_val, trainer.accumulate_grad_batches
        if clip:
            raise ValueError(
                f"trainer.gradient_clip_val={clip}: the tokenizer stage clips its own gradients with "
                f"model.gradient_clip_val (here {self.hparams.gradient_clip_val}); set that and leave "
                "trainer.gradient_clip_val=null"
            )
        if accumulate != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={accumulate}: the tokenizer stage takes one optimizer step "
                "per batch (manual optimization) and accumulates no gradients; raise data.batch_size (or the "
                "number of devices) instead"
            )

    def configure_optimizers(self):
        settings = self.optimizer_settings
        groups = optim.param_groups(self.vae, settings.weight_decay)
        if self.discriminator is not None:
            disc_groups = optim.param_groups(self.discriminator, settings.weight_decay)
            for g in disc_groups:
                g["name"] = "disc_" + g["name"]
                if self.gan.lr is not None:
                    g["lr"] = self.gan.lr
            groups += disc_groups
        return optim.configure_adamw(self.trainer, groups, settings)

    def on_fit_start(self) -> None:
        if self.perceptual is not None and not self.has_lpips_metric and self.lpips_settings.val_lpips:
            rank_zero_info(
                "val/lpips is not reported: model.perceptual.pretrained=false (no real LPIPS weights)"
            )

    # ------------------------------------------------------------------ training
    def _generator_losses(self, x: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        out = {"recon_loss": losses.reconstruction_loss(recon, x, hp.recon_loss)}
        nll = hp.recon_weight * out["recon_loss"]
        if self.lpips_settings.weight > 0:
            out["perceptual_loss"] = self.perceptual(recon, x).float().mean()
            nll = nll + self.lpips_settings.weight * out["perceptual_loss"]
        out["nll"] = nll
        return out

    def _adversarial(
        self, x: torch.Tensor, recon: torch.Tensor, nll: torch.Tensor, step: int
    ) -> dict[str, torch.Tensor]:
        """Generator and discriminator terms; before ``disc_start`` a zero that touches every D weight."""
        gan, disc = self.gan, self.discriminator
        if step < gan.start:
            # keeps DDP's reducer complete (every parameter gets a gradient); the D step is skipped below
            return {"d_loss": sum(p.sum() for p in disc.parameters()) * 0.0}
        # D's weights are detached here: the generator term trains the VQVAE only, D learns from d_loss
        frozen = {name: p.detach() for name, p in disc.named_parameters()}
        g_loss = losses.hinge_g_loss(torch.func.functional_call(disc, frozen, (recon,)))
        weight = torch.ones((), device=x.device)
        if gan.adaptive_weight:
            weight = losses.adaptive_weight(nll, g_loss, self.vae.decoder.conv_out.weight)
        logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).float().chunk(2)
        return {
            "g_loss": g_loss,
            "g_weight": gan.weight * weight,
            "d_loss": losses.hinge_d_loss(logits_real, logits_fake),
            "logits_real": logits_real.mean().detach(),
            "logits_fake": logits_fake.mean().detach(),
        }

    def training_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        hp = self.hparams
        x = batch["image"]
        step = self.global_step  # optimizer steps done before this batch
        disc_on = self.discriminator is not None and step >= self.gan.start
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        out = self.vae(x)
        logs = self._generator_losses(x, out.recon)
        loss = logs["nll"] + hp.vq_weight * out.vq_loss
        if self.discriminator is not None:
            logs.update(self._adversarial(x, out.recon, logs["nll"], step))
            if "g_loss" in logs:
                loss = loss + logs["g_weight"] * logs["g_loss"]
            loss_and_d = loss + logs["d_loss"]
        else:
            loss_and_d = loss

        # what callbacks.nonfinite checks before the update (and names when it stops the run)
        self.loss_terms = {"nll": logs["nll"], "vq_loss": out.vq_loss}
        self.loss_terms.update({k: logs[k] for k in ("g_loss", "d_loss") if k in logs})
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss_and_d)
        if self.discriminator is not None and not disc_on:
            for p in self.discriminator.parameters():
                p.grad = None  # AdamW skips parameters without gradient: no D update, no step count
        self._disc_on = disc_on
        optimizer.step()  # clips in on_before_optimizer_step, after 16-mixed has unscaled the gradients
        scheduler.step()

        if not getattr(self, "step_skipped", False):  # a skipped step's features may be NaN: keep the codes
            self._codebook_step(out.hits_SV, out.f_BChw, step + 1)
        mse = F.mse_loss(out.recon.detach().float().clamp(-1, 1), x.float())
        logs.update(loss=loss.detach(), vq_loss=out.vq_loss.detach(), psnr=10 * torch.log10(4.0 / mse))
        logs.pop("nll")
        for name, value in logs.items():
            self.log(f"train/{name}", value, prog_bar=name in ("loss", "psnr"), batch_size=x.shape[0])
        return {"loss": loss.detach(), "recon": out.recon.detach()}  # the recon for ImageLogger

    def on_before_optimizer_step(self, optimizer) -> None:
        # called inside optimizer.step(): after 16-mixed unscales the gradients, before the (scaler) step
        clip = self.hparams.gradient_clip_val
        if not clip:
            return
        norm = torch.nn.utils.clip_grad_norm_(self.vae.parameters(), clip)
        if self._disc_on:
            torch.nn.utils.clip_grad_norm_(self.discriminator.parameters(), clip)
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    # ------------------------------------------------------------------ codebook
    @torch.no_grad()
    def _codebook_step(self, hits_SV: torch.Tensor, f_BChw: torch.Tensor, step: int) -> None:
        """Fold the global code counts into the EMA, log health, restart dead codes (``step`` steps done).

        Every rank records the same all-reduced counts, so all of them take the same decisions.
        """
        codes, quant = self.codes, self.vae.quantize
        if self._trainer is not None:
            hits_SV = self.trainer.strategy.reduce(hits_SV.clone(), reduce_op="sum")
        quant.record_hits(hits_SV)
        if codes.restart_dead_codes and step % codes.restart_every == 0:
            dead_V = codebook.dead_everywhere(quant.ema_vocab_hit_SV, codes.dead_code_threshold)
            if dead_V.any():
                self.restart_codes(dead_V.nonzero().flatten(), f_BChw, seed=step)
                self.restarted_codes += dead_V.sum()
        # logged every step (cheap, no sync): Lightning writes them every trainer.log_every_n_steps
        stats = codebook.codebook_stats(quant.ema_vocab_hit_SV, codes.dead_code_threshold, codes.usage_margin)
        stats["restarted_total"] = self.restarted_codes.float()
        self.log_dict({f"codebook/{k}": v for k, v in stats.items()}, batch_size=f_BChw.shape[0])

    @torch.no_grad()
    def restart_codes(self, code_idx: torch.Tensor, f_BChw: torch.Tensor, seed: int) -> torch.Tensor:
        """Set codes ``code_idx`` to residual vectors the quantiser sees (``residual_samples``, drawn by rank
        0 and broadcast) and clear their AdamW moments. Returns the new vectors (n, C)."""
        quant = self.vae.quantize
        vectors = quant.residual_samples(f_BChw, code_idx.numel(), torch.Generator().manual_seed(int(seed)))
        if self._trainer is not None:  # an object broadcast: sent from the CPU, so every rank reads it back
            vectors = self.trainer.strategy.broadcast(vectors.cpu(), src=0).to(vectors.device)
        code_idx = code_idx.to(quant.embedding.weight.device)
        quant.restart_codes(code_idx, vectors)
        if self._trainer is not None:
            state = self.optimizers().optimizer.state.get(quant.embedding.weight, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][code_idx] = 0
        return vectors

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict, batch_idx: int, stage: str) -> None:
        x = rows_of(batch["image"], unrepeated(self, batch_idx, len(batch["image"])))
        if not len(x):  # only images that DDP's sampler repeats: every image counts once
            return
        out = self.vae(x)
        recon = out.recon.float().clamp(-1, 1)
        m = self.eval_metrics[stage]
        x01, r01 = (x.float() + 1) / 2, (recon + 1) / 2
        m["psnr"].update(r01, x01)
        m["ssim"].update(r01, x01)
        m["codebook"].update(out.hits_SV)
        logs = self._generator_losses(x, out.recon)
        logs.pop("nll")
        logs["vq_loss"] = out.vq_loss
        B = x.shape[0]
        for name, value in logs.items():  # weighted by images, summed over processes
            m[name].update(value.detach().float(), weight=B)
            self.log(f"{stage}/{name}", m[name], batch_size=B)
        self.log(f"{stage}/psnr", m["psnr"], prog_bar=stage == "val", batch_size=B)
        self.log(f"{stage}/ssim", m["ssim"], batch_size=B)
        if self.has_lpips_metric:
            m["lpips"].update(self.perceptual(recon, x.float()).float())
            self.log(f"{stage}/lpips", m["lpips"], batch_size=B)
        if stage == "test" and self.evaluator is not None and batch_idx < self.evaluation.batches:
            self.evaluator.update("test", r01.clamp(0, 1), x01)  # reconstruction FID (rFID) and the rest

    def _codebook_epoch_end(self, stage: str) -> None:
        stats = self.eval_metrics[stage]["codebook"]
        result = stats.compute()
        for name, values in result.items():
            for si, v in enumerate(values.tolist()):
                self.log(f"{stage}/codebook/{name}/s{si}", float(v))
        stats.reset()

    def on_validation_epoch_start(self) -> None:
        # a `validate` before `fit` leaves inference-mode states; fit's no-grad loop could not update them
        for metric in self.eval_metrics["val"].values():
            metric.reset()

    def on_test_epoch_start(self) -> None:
        for metric in self.eval_metrics["test"].values():
            metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if batch_idx >= self.test_batches_done:  # else held by the metrics a stopped test kept (TestProgress)
            self._evaluate(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        self._codebook_epoch_end("val")

    def on_test_start(self) -> None:
        self.evaluator = start_evaluation(self, self.evaluation, ("test",))

    def on_test_epoch_end(self) -> None:
        self._codebook_epoch_end("test")
        log_evaluation(self, self.evaluator)

    @torch.no_grad()
    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        x, start = batch["image"], batch_idx * len(batch["image"])
        recon = self.vae.fhat_to_img(self.vae.img_to_fhat(x)[-1])
        return {"images": _unit(recon), "names": [f"recon{start + i:06d}" for i in range(len(x))]}

    # ------------------------------------------------------------------ images (varctl.callbacks.ImageLogger)
    def train_images(self, batch: dict, outputs: dict, max_images: int) -> dict[str, ImageGrid]:
        x, recon = batch["image"][:max_images], outputs["recon"][:max_images].clamp(-1, 1)
        return {"train/input_recon": ImageGrid([_unit(x), _unit(recon)])}

    def val_images(self, batch: dict, max_images: int) -> dict[str, ImageGrid]:
        """Input | reconstruction, and input | the decoded running f_hat after each scale (coarse to fine)."""
        x = batch["image"][:max_images]
        fhats = self.vae.img_to_fhat(x)
        per_scale = self.vae.fhat_per_scale_to_img(fhats)
        return {
            "val/input_recon": ImageGrid([_unit(x), _unit(per_scale[-1])]),
            "val/input_then_scales": ImageGrid([_unit(x), *map(_unit, per_scale)]),
        }

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["varctl"] = {"vqvae": self.vae.checkpoint_entry("vae.")}
        # how often the code hits were recorded (it sets their EMA's rate): not in the VQVAE's state_dict,
        # whose layout is the official one, so loading it could only guess (warmed up or not)
        checkpoint[HIT_RECORDS] = self.vae.quantize.num_hit_records
        # LPIPS is rebuilt from the lpips package and torchvision's cache: not stored
        sd = checkpoint["state_dict"]
        for key in [k for k in sd if k.startswith("perceptual.")]:
            del sd[key]
        hp = checkpoint.get("hyper_parameters")
        if hp is not None and hp.get("init_from"):
            # the weights are in this file: load_from_checkpoint must not need the original one
            hp["init_from"], hp["vqvae"] = None, self.vae.config.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self._hit_records = checkpoint.get(HIT_RECORDS)  # set once the weights are loaded: load_state_dict
        if self.perceptual is not None:
            sd = checkpoint["state_dict"]
            for key, value in self.perceptual.state_dict(prefix="perceptual.").items():
                sd.setdefault(key, value)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._hit_records is not None:  # none in a checkpoint of an earlier version: the quantizer guesses
            self.vae.quantize.num_hit_records, self._hit_records = int(self._hit_records), None
        return result


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
