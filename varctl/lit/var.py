"""Training stage 2: a class- or text-conditioned VAR on the tokens of a frozen multi-scale VQVAE.

Teacher forcing (Tian et al., 2024, eq. 6 and sec. 4): the frozen tokenizer maps each image to K token maps;
the transformer predicts all L tokens at once under a block-causal mask; the loss is cross-entropy averaged
over tokens (optionally label-smoothed). The condition (a class, or a caption through a frozen open_clip text
encoder) is replaced by the null condition with probability ``cond_drop_rate`` inside VAR, which enables
classifier-free guidance at sampling time. Recipe: AdamW(0.9, 0.95), lr 1e-4 * batch / 256, wd 0.05,
gradient clipping at 2.0 (``trainer.gradient_clip_val``).

Legend: B batch, L all tokens, V vocabulary, Cv code channels.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from datamodules.token_cache import CachedTokens, TokenCache, check_cache_folder, check_cacheable
from varctl.callbacks.images import ImageGrid
from varctl.checkpoints import FitsCheckpoint, short_list, weights_digest
from varctl.lit import optim
from varctl.lit.compiling import compile_var
from varctl.lit.evaluation import log_evaluation, rows_of, split_fingerprint, start_evaluation, unrepeated
from varctl.lit.jobs import job_step
from varctl.lit.legacy import is_legacy, legacy_state_dict
from varctl.lit.settings import Evaluation, OptimizerSettings, Predictions, Samples, plain_hparams
from varctl.lit.sharding import ignore_in_fsdp1, shard_var
from varctl.metrics.tokens import ScaleMetrics
from varctl.models.text import TextEncoder
from varctl.models.var import VAR
from varctl.models.var_config import VARConfig
from varctl.models.vqvae import VQVAE

# checkpoint key: the names of the parameters the optimizer's no-decay group held
NO_DECAY_KEY = "varctl_no_decay"


def _named(load, path: str, key: str, **kwargs):
    """``load(path)``, a missing file reported with the setting that names it."""
    try:
        return load(path, **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{key}={path}: {err} (weights are never downloaded: name a local file)"
        ) from None


def wait_for_rank_zero(strategy, name: str) -> None:
    """A barrier without the process group's timeout (30 min by default): meanwhile rank 0 may tokenize a
    whole dataset, which takes longer. A gloo group with a day's timeout; a rank that dies still ends it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        strategy.barrier(name)
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
    dist.barrier(group=group)
    dist.destroy_process_group(group)


class VARModule(FitsCheckpoint, L.LightningModule):
    """Trains ``self.model`` (here the VAR) on dict batches; ``self.vae`` (frozen tokenizer) and
    ``self.text_encoder`` (frozen, text models only; rebuilt from ``text_encoder``, never stored in
    checkpoints) are not trained. With ``ema_decay > 0``, ``self.ema`` holds the float32 average that
    validates, samples and predicts. ``train/loss`` is the optimised (label-smoothed) loss, ``val/*`` plain
    cross-entropy.

    Args:
        tokenizer: the frozen tokenizer (a stage-1 checkpoint, a VQVAE file or ``vae_ch160v4096z32.pth``).
        var: ``VARConfig`` fields, optionally with ``preset``; vocabulary, code width and scales come from the
            tokenizer, the text fields from the text encoder. Unused with ``init_from``.
        init_from: a VAR to fine-tune (a stage-2 checkpoint, a VAR file, ``var_d16.pth`` ...).
        text_encoder: ``TextEncoder`` arguments: makes a text-conditioned VAR (none: class-conditioned).
        optimizer, samples, predict, evaluation: the sections of ``varctl/lit/settings.py``; ``evaluation``
            says which samples ``test`` draws and how it scores them (FID, KID, IS, CLIP score).
        scale_loss_weights: a training loss weight per scale (default: every token alike).
        token_cache: a folder for the train images' token indices (``datamodules.token_cache``): built on
            the first ``fit`` (every image, and its mirror when the data flips), then the stage trains
            without running the tokenizer's encoder; refused when made for another tokenizer or data.
        scale_sampling: "early" trains each sample on its scales up to a random last one, early scales
            more often (ECM's early-centric sampling: the last scale k with probability proportional to
            K - k); "all" every scale.
        compile_mode: ``torch.compile`` the VAR (``varctl.lit.compiling``): "default" or "max-autotune"
            compile each block in place after FSDP2 sharding, "reduce-overhead" the whole teacher-forcing
            forward with CUDA graphs; null (default) runs eagerly.
    """

    test_batches_done = 0  # the test batches already in the metrics (varctl.callbacks.TestProgress)

    free_settings = tuple(f"var.{k}" for k in VARConfig.free_on_load)  # FitsCheckpoint: no weight's shape
    stage = "var"  # FitsCheckpoint: the checkpoints of this stage

    def __init__(
        self,
        tokenizer: str,
        var: dict | None = None,
        init_from: str | None = None,
        text_encoder: dict | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerSettings | None = None,
        ema_decay: float = 0.0,
        ema_warmup: bool = True,
        samples: Samples | None = None,
        predict: Predictions | None = None,
        scale_loss_weights: list[float] | None = None,
        scale_sampling: Literal["all", "early"] = "all",
        evaluation: Evaluation | None = None,
        token_cache: str | None = None,
        compile_mode: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        plain_hparams(self.hparams)
        self.optimizer_settings = OptimizerSettings.of(optimizer)
        self.samples, self.predictions = Samples.of(samples), Predictions.of(predict)
        self.evaluation = Evaluation.of(evaluation)
        self.evaluator = None  # made for each test run (varctl.lit.evaluation): never part of the state
        self.evaluation_record: dict | None = None
        if token_cache:
            check_cache_folder(token_cache)  # before the run: a folder of other files is never replaced
        self.vae = _named(VQVAE.load, tokenizer, "model.tokenizer").eval().requires_grad_(False)
        self.text_encoder = TextEncoder(**text_encoder) if text_encoder is not None else None
        self.model = self.build_model(self.build_var(var, init_from))
        if self.text_encoder is not None:
            self.var.set_null_text(self.text_encoder.empty())
        # decided on the plain model: FSDP1 flattens parameters, hiding which are matrices
        self._no_decay = optim.no_weight_decay_names(self.model)
        # sampling's refiner files, loaded once, never in the checkpoint
        self._refiners: dict[str, torch.nn.Module] = {}
        self.ema = optim.averaged(self.model, ema_decay, ema_warmup) if ema_decay > 0 else None
        K = self.var.config.num_scales
        if scale_loss_weights is not None and (
            len(scale_loss_weights) != K or min(scale_loss_weights) < 0 or sum(scale_loss_weights) <= 0
        ):
            raise ValueError(
                f"model.scale_loss_weights must hold {K} non-negative weights (one per scale), not all 0; "
                f"found {list(scale_loss_weights)}"
            )
        # predict's labels checked against the VAR now, before a run starts
        self.predictions.jobs(self.text_encoder is not None, self.var.config.num_classes, str)
        self.val_metrics = ScaleMetrics(self.var.config.begin_ends)
        self.test_metrics = ScaleMetrics(self.var.config.begin_ends)

    # ------------------------------------------------------------------ building
    def build_var(self, var: dict | None, init_from: str | None) -> VAR:
        """A new VAR from ``var`` or the one in ``init_from``, fitted to the tokenizer and text encoder."""
        fixed: dict[str, Any] = {
            k: getattr(self.vae.config, k) for k in ("vocab_size", "z_channels", "patch_nums")
        }
        enc = self.text_encoder
        fixed["condition"] = "class" if enc is None else "text"
        if enc is not None:
            fixed.update(text_dim=enc.width, text_len=enc.context_length, text_pooled_dim=enc.embed_dim)
        if init_from is None:
            return VAR.build(var, **fixed)
        # the architecture comes from the file: explicit settings and the fixed fields must agree with it
        settings = {k: v for k, v in (var or {}).items() if k != "preset"}
        return _named(VAR.load, init_from, "model.init_from", **{**settings, **fixed})

    def build_model(self, var: VAR) -> nn.Module:
        """The network this stage trains around the VAR (the control stage adds its branch)."""
        return var

    @property
    def var(self) -> VAR:
        return self.model

    @property
    def eval_model(self) -> nn.Module:
        """The weights that validate, sample and predict: the average if EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def model_inputs(self, batch: dict) -> dict[str, Any]:
        """Extra keyword arguments of the model's forward and generate for ``batch`` (none here)."""
        return {}

    def data_requirements(self) -> dict[str, Any]:
        keys = ("image", "label") if self.text_encoder is None else ("image", "caption")
        return {"resolution": self.vae.config.resolution, "keys": keys}

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: its dropout stays off
        return self

    def check_data(self, dm) -> None:
        """Raise ValueError when the datamodule cannot feed this model; the command line calls it after the
        data's setup, before a run starts (then a config error), and ``setup`` for any other trainer."""
        n_data, n_model = getattr(dm, "num_classes", None), self.var.config.num_classes
        if self.text_encoder is None and n_data is not None and n_data != n_model:
            if n_data > n_model or self.hparams.init_from is None:
                raise ValueError(f"model.var.num_classes={n_model} but the data ({type(dm).__name__}) has "
                                 f"{n_data} classes; set model.var.num_classes={n_data}")  # fmt: skip
            rank_zero_warn(f"the data has {n_data} classes, the VAR from model.init_from has {n_model}")
        check_jobs = getattr(dm, "check_conditions", None)  # data=jobs: each row's label or caption
        if check_jobs is not None:
            check_jobs(None if self.text_encoder is not None else n_model)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None:
            self.check_data(dm)
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            if self.ema is not None:
                raise ValueError(
                    "model.ema_decay > 0 is not supported with FSDPStrategy (FSDP1 flattens the average and "
                    "the model differently); use trainer.strategy=ModelParallelStrategy (FSDP2) or "
                    "model.ema_decay=0"
                )
            ignore_in_fsdp1(strategy, [self.vae, self.text_encoder])
        if stage == "fit" and self.hparams.token_cache and dm is not None:
            self._use_token_cache(dm, self.hparams.token_cache)

    @property
    def train_needs_pixels(self) -> bool:
        """Whether training reads the images beside cached tokens (a token cache then skips them when not)."""
        return False

    def check_token_cache(self, dm) -> None:
        """The token cache (``model.token_cache``) against this tokenizer and the fit's train data, before
        the run starts (the CLI calls it): data it cannot cache, or a cache made from other inputs or damaged,
        is a ValueError naming what differs. An absent cache is built when the fit starts."""
        path = self.hparams.token_cache
        train = dm.dataset("train") if path else None
        if train is None or isinstance(train, CachedTokens):
            return
        check_cacheable(train)
        if (Path(path) / "meta.json").exists():
            TokenCache.load(path, self._token_cache_meta(dm, train))

    def _use_token_cache(self, dm, path: str) -> None:
        """Train from cached token indices (datamodules.token_cache): built on the first process when
        absent, checked against this tokenizer and data when present."""
        train = dm.dataset("train")
        if isinstance(train, CachedTokens):
            return
        meta = self._token_cache_meta(dm, train)
        if self.trainer.is_global_zero and not (Path(path) / "meta.json").exists():
            rank_zero_info(f"token cache: tokenizing the {len(train)} train images into {path}")
            TokenCache.build(train, self.vae, path, meta, log_every=20)
        wait_for_rank_zero(self.trainer.strategy, "token cache")
        cache = TokenCache.load(path, meta)
        dm.datasets["train"] = CachedTokens(train, cache, pixels=self.train_needs_pixels)
        rank_zero_info(f"token cache: training from {path} ({len(cache)} images, the encoder is not run)")

    def _token_cache_meta(self, dm, train) -> dict:
        """What a token cache of ``train`` is made from: this tokenizer, its schedule and the images."""
        source, fingerprint = split_fingerprint(dm, "train", len(train), ordered=True)
        return {
            "tokenizer_weights": weights_digest(self.vae),
            "patch_nums": list(self.vae.config.patch_nums),
            "vocab_size": self.vae.config.vocab_size,
            "resolution": self.vae.config.resolution,
            "data": source,
            "data_fingerprint": fingerprint,
            "flip": float(getattr(train, "flip", 0.0) or 0.0),
        }

    def configure_model(self) -> None:
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, ModelParallelStrategy) and not getattr(self, "_sharded", False):
            for model in [self.model] + ([self.ema.module] if self.ema is not None else []):
                shard_var(model, self.device_mesh["data_parallel"])
            self._sharded = True
        mode = self.hparams.get("compile_mode")
        if mode and not getattr(self, "_compiled", False):
            if mode == "reduce-overhead" and isinstance(strategy, ModelParallelStrategy):
                raise ValueError(
                    "model.compile_mode=reduce-overhead (CUDA graphs of the whole forward) does not combine "
                    "with FSDP2's per-block collectives; use default or max-autotune"
                )
            compile_var(self.var, mode)
            self._compiled = True

    def check_trainer(self, trainer) -> None:
        """The trainer's settings against this stage's (the CLI calls it before a fit writes anything)."""
        optim.check_schedule(trainer, self.optimizer_settings)

    def configure_optimizers(self):
        groups = optim.param_groups(self.model, self.optimizer_settings.weight_decay, self._no_decay)
        return optim.configure_adamw(self.trainer, groups, self.optimizer_settings)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        optim.clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen VQVAE in float32: target tokens (B, L), teacher-forcing input (B, L - first_l, Cv)."""
        if self.vae.quant_conv.weight.device != images.device:  # FSDP1 leaves ignored modules where they were
            self.vae.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            idx_list = self.vae.img_to_idx(images.float())
            x_BLCv = self.vae.idx_to_var_input(idx_list)
        return torch.cat(idx_list, dim=1), x_BLCv

    def condition(self, batch: dict):
        """The batch's condition: its labels, or its captions through the text encoder."""
        if self.text_encoder is not None:
            if self.text_encoder.attn_mask.device != self.device:
                self.text_encoder.to(self.device)
            return self.text_encoder(batch["caption"])
        labels = batch["label"]
        if bool((labels < 0).any()):
            raise ValueError(
                "a class-conditional VAR needs labelled data: the batch has label -1 (no labels)"
            )
        return labels

    @torch.no_grad()
    def tokens_of(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokenize`` of the batch's images, or, when the batch carries cached ``tokens``, those with
        their teacher-forcing input (no encoder pass)."""
        if "tokens" not in batch:
            return self.tokenize(batch["image"])
        if self.vae.quant_conv.weight.device != batch["tokens"].device:
            self.vae.to(batch["tokens"].device)
        sizes = [pn * pn for pn in self.vae.config.patch_nums]
        target_BL = batch["tokens"].long()
        with torch.autocast(target_BL.device.type, enabled=False):
            x_BLCv = self.vae.idx_to_var_input(list(target_BL.split(sizes, dim=1)))
        return target_BL, x_BLCv

    def token_losses(self, batch: dict, model: nn.Module, smoothing: float = 0.0):
        """Per-token cross-entropy (B, L) and whether the argmax is the target (B, L)."""
        target_BL, x_BLCv = self.tokens_of(batch)
        logits_BLV = model(self.condition(batch), x_BLCv, **self.model_inputs(batch))
        B, L, V = logits_BLV.shape
        loss_BL = F.cross_entropy(
            logits_BLV.reshape(-1, V), target_BL.reshape(-1), label_smoothing=smoothing, reduction="none"
        ).view(B, L)  # (B, L)
        return loss_BL, (logits_BLV.argmax(dim=-1) == target_BL).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss_BL, correct_BL = self.token_losses(batch, self.model, self.hparams.label_smoothing)
        loss = self.training_loss(loss_BL)
        self.loss_terms = {"tokens": loss.detach()}  # checked by callbacks.nonfinite before the update
        B = loss_BL.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/acc", correct_BL.mean(), batch_size=B)
        with torch.no_grad():
            for k, (b, e) in enumerate(self.var.config.begin_ends):
                self.log(f"train/loss_s{k}", loss_BL[:, b:e].mean(), batch_size=B)
                self.log(f"train/acc_s{k}", correct_BL[:, b:e].mean(), batch_size=B)
        return loss

    def training_loss(self, loss_BL: torch.Tensor) -> torch.Tensor:
        """The mean token loss, weighted per scale (``scale_loss_weights``, ``scale_sampling``)."""
        weights, sampling = self.hparams.scale_loss_weights, self.hparams.scale_sampling
        if weights is None and sampling == "all":
            return loss_BL.mean()
        cfg = self.var.config
        lvl_L = self.var.lvl_1L[0]  # the scale of every token
        w_BL = torch.ones_like(loss_BL)
        if weights is not None:
            w_BL = w_BL * loss_BL.new_tensor(weights)[lvl_L]
        if sampling == "early":
            K = cfg.num_scales
            p_K = torch.arange(K, 0, -1, dtype=torch.float, device=loss_BL.device)  # K - k
            last_B = torch.multinomial(p_K / p_K.sum(), loss_BL.shape[0], replacement=True)
            w_BL = w_BL * (lvl_L[None, :] <= last_B[:, None]).float()
        return (loss_BL * w_BL).sum() / w_BL.sum().clamp_min(1e-12)

    def on_before_optimizer_step(self, optimizer) -> None:
        # the norm before clipping (and after AMP unscaling); sharded strategies hold only a shard per rank
        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The EMA follows each optimizer step at once (Lightning calls this once per accumulation window),
        before any callback sees the step: a checkpoint then holds the average of its own weights, where an
        update in ``on_train_batch_end`` came after ModelCheckpoint's save and was lost on resume. A step
        that ``callbacks.nonfinite`` skipped changed no weight and leaves the average alone too."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not getattr(self, "step_skipped", False):
            optim.update_average(self.ema, self.model)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        keep = unrepeated(self, batch_idx, len(batch["image"]))  # DDP's repeats of the first images
        self.val_metrics.update(*rows_of(self.token_losses(batch, self.eval_model), keep))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Teacher-forcing cross-entropy and token accuracy (per scale too) on the test split; with
        ``evaluation.batches``, a sample for each image's condition, scored against the real images. Every
        image counts once under DDP too (``unrepeated``)."""
        if batch_idx < self.test_batches_done:  # held by the metrics a stopped test kept (TestProgress)
            return
        keep = unrepeated(self, batch_idx, len(batch["image"]))
        self.test_metrics.update(*rows_of(self.token_losses(batch, self.eval_model), keep))
        self.evaluate_samples(batch, batch_idx)

    def evaluate_samples(self, batch: dict, batch_idx: int) -> None:
        if self.evaluator is not None and batch_idx < self.evaluation.batches:
            seed_offset = batch_idx * self.trainer.world_size + self.trainer.global_rank
            images = self.generate(self.condition(batch), self.evaluation, seed_offset)
            real = batch["image"].float().add(1).mul(0.5)
            keep = unrepeated(self, batch_idx, len(real))
            self.evaluator.update(
                "test", rows_of(images.float().clamp(0, 1), keep), rows_of(real, keep),
                rows_of(batch.get("caption"), keep),
            )  # fmt: skip

    def on_test_start(self) -> None:
        self.evaluator = start_evaluation(self, self.evaluation, ("test",))

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)
        log_evaluation(self, self.evaluator)

    def _log_metrics(self, stage: str, metrics: ScaleMetrics) -> None:
        # the metric states are summed over processes in compute(), so no sync_dist here
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()}, sync_dist=False)
        metrics.reset()

    def generate(self, cond, sampling, seed_offset: int = 0, **kwargs):
        """Images (B, 3, H, W) in [0, 1] from the evaluated weights (``sampling``: a settings.Sampling)."""
        return self.eval_model.generate(
            cond, vae=self.vae, **self.sampling_kwargs(sampling, seed_offset), **kwargs
        )

    def sampling_kwargs(self, sampling, seed_offset: int = 0, control: bool = False) -> dict:
        """``sampling.generate_kwargs`` with its refiner file loaded (``load_refiner``) on this device."""
        kwargs = sampling.generate_kwargs(seed_offset, control)
        path = kwargs.get("refiner")
        if path is not None:
            if path not in self._refiners:
                self._refiners[path] = self.load_refiner(path).eval().requires_grad_(False)
            kwargs["refiner"] = self._refiners[path].to(self.device)
        return kwargs

    def load_refiner(self, path: str) -> torch.nn.Module:
        """A sampling section's refiner file (CoDe), the kind of model the stage samples: a VAR here."""
        return VAR.load(path, vae=self.vae)

    def val_images(self, batch: dict, max_images: int) -> dict[str, ImageGrid]:
        """The sample grid (``ImageLogger``): a row per class or caption, coarse to fine left to right."""
        if self.text_encoder is not None:
            captions = list(self.samples.captions or [""])
            _, per_scale = self.generate(self.text_encoder(captions), self.samples, return_intermediates=True)
            return {"val/samples_text": ImageGrid(per_scale, captions)}
        n = min(max_images, self.var.config.num_classes)
        _, per_scale = self.generate(
            torch.arange(n, device=self.device), self.samples, return_intermediates=True
        )
        return {"val/samples": ImageGrid(per_scale, [self.class_name(i) for i in range(n)])}

    def class_name(self, label: int) -> str:
        names = getattr(self.trainer.datamodule, "class_names", None) if self._trainer is not None else None
        return names[label] if names is not None and label < len(names) else str(label)

    # ------------------------------------------------------------------ predict
    def predict_jobs(self) -> list[tuple[Any, str]]:
        """(condition, name) of every image to generate (``settings.Predictions.jobs``); empty when none is
        configured, then each predict batch's own labels or captions are used."""
        text = self.text_encoder is not None
        return self.predictions.jobs(text, self.var.config.num_classes, self.class_name)

    def job_settings(self) -> dict:
        """What generation jobs record beside their images (data=jobs, ``GenerationJobs.record``): the stage,
        the digests of the weights that draw (the EMA where there is one) and of the tokenizer, and the
        predict section."""
        return {
            "stage": type(self).__name__,
            "weights": weights_digest(self.eval_model),
            "tokenizer": weights_digest(self.vae),
            "predict": dataclasses.asdict(self.predictions),
        }

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if batch.get("job"):  # data=jobs: in-painting, out-painting, editing of the user's images
            return job_step(self, batch, control=False)
        jobs = self.predict_jobs()
        chunk = batch_idx * self.trainer.world_size + self.trainer.global_rank  # also seeds the chunk
        if jobs:  # the configured conditions, split over the predict batches of all processes
            # chunks of the loader's batch size, not of this batch's (a last batch may be short): batch k of
            # process r draws chunk k * processes + r, and the chunks drawn are 0, 1, ... with no gap
            B = getattr(self.trainer.datamodule, "batch_size", None) or len(batch["image"])
            part = jobs[chunk * B : (chunk + 1) * B]
            conds, names = [c for c, _ in part], [n for _, n in part]
        elif self.text_encoder is not None:
            conds = list(batch["caption"])
            names = [f"b{batch_idx}_{i}_{c[:60]}" for i, c in enumerate(conds)]
        else:
            conds = [int(c) for c in batch["label"]]
            names = [f"class_{self.class_name(c)}_b{batch_idx}_{i}" for i, c in enumerate(conds)]
        if not conds:
            res = self.vae.config.resolution
            return {"images": torch.zeros(0, 3, res, res, device=self.device), "names": []}
        if self.text_encoder is not None:
            cond = self.text_encoder(conds)
        else:
            cond = torch.tensor(conds, dtype=torch.long, device=self.device)
        images = self.generate(cond, self.predictions, seed_offset=chunk)
        return {"images": images.float().clamp(0, 1), "names": names}

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_entries(self) -> dict[str, dict]:
        """``checkpoint["varctl"]``: where each model's weights are and its config (models/lifecycle.py)."""
        entries = {"vqvae": self.vae.checkpoint_entry("vae."), "var": self.var.checkpoint_entry("model.")}
        if self.ema is not None:
            entries["var_ema"] = self.var.checkpoint_entry("ema.module.")
        return entries

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["varctl"] = self.checkpoint_entries()
        checkpoint[NO_DECAY_KEY] = sorted(self._no_decay)  # what the optimizer's groups were made of
        # the frozen text encoder is rebuilt from `text_encoder` (its pretrained weights), not stored
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("text_encoder.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        if is_legacy(state):
            checkpoint["state_dict"] = state = legacy_state_dict(state)
        saved = checkpoint.get(NO_DECAY_KEY)
        if saved is None:  # a run saved before the class embedding was decayed kept it in the no-decay group
            saved = self._no_decay | optim.decayed_embedding_names(self.model)
        saved = set(saved)
        for optimizer_state in checkpoint.get("optimizer_states", []):
            if optim.regroup_optimizer_state(optimizer_state, self.model, saved, self._no_decay):
                rank_zero_info(
                    "varctl: the checkpoint's optimizer groups are moved to today's weight-decay groups "
                    f"({', '.join(sorted(saved ^ self._no_decay))} changed group)"
                )
        if self.ema is not None:
            differed = optim.load_shared_from_model(state, self.model, self.ema, "model.", "ema.module.")
            if differed:
                rank_zero_info(
                    f"varctl: {len(differed)} frozen weights ({short_list(differed, 3)}) had another average "
                    "in the checkpoint (they trained then): their average is now the weights themselves"
                )
        if self.text_encoder is not None:
            for k, v in self.text_encoder.state_dict().items():
                state.setdefault(f"text_encoder.{k}", v)
