"""Training stage 2: a class- or text-conditioned VAR on the tokens of a frozen multi-scale VQVAE.

Teacher forcing (Tian et al., 2024, eq. 6 and sec. 4): the frozen tokenizer maps each image to K token maps;
the transformer predicts all L tokens at once under a block-causal mask; the loss is cross-entropy averaged
over tokens (optionally label-smoothed). The condition (a class, or a caption through a frozen open_clip text
encoder) is replaced by the null condition with probability ``cond_drop_rate`` inside VAR, which enables
classifier-free guidance at sampling time. Recipe: AdamW(0.9, 0.95), lr 1e-4 * batch / 256, wd 0.05,
gradient clipping at 2.0 (``trainer.gradient_clip_val``).

Legend: B batch, L all tokens, l tokens of one scale, K scales, V vocabulary, Cv code channels.
"""

from __future__ import annotations

from dataclasses import asdict, fields, replace
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import Metric

from varctl.models.var import VAR, VARConfig, check_vae_fits
from varctl.models.vqvae import VQVAE
from varctl.optim import EMA, no_weight_decay_names, param_groups, scaled_lr, warmup_decay_scheduler

# VARConfig fields that may differ from an ``init_from`` file: training settings, no weight depends on them
FINE_TUNE_OVERRIDES = ("cond_drop_rate", "drop_rate", "attn_drop_rate", "drop_path_rate")
TOKENIZER_FIELDS = ("vocab_size", "z_channels", "patch_nums")  # read off the tokenizer, never set by hand


def build_var(var: dict | None, init_from: str | None, vae: VQVAE, derived: dict[str, Any]) -> VAR:
    """A fresh VAR from ``var`` (VARConfig fields, optionally ``preset``) or the one in ``init_from``.

    ``derived`` holds the fields that come from elsewhere (tokenizer, text encoder, module arguments).
    """
    requested = dict(var or {})
    preset = requested.pop("preset", None)
    names = {f.name for f in fields(VARConfig)}
    unknown = sorted(set(requested) - names)
    if unknown:
        raise ValueError(f"model.var has unknown keys {unknown}; allowed: 'preset' and {sorted(names)}")
    owned = {"condition": "model.condition", "cond_drop_rate": "model.cond_drop_rate"}
    owned.update({k: "model.text_encoder" for k in ("text_dim", "text_len", "text_pooled_dim")})
    for key in sorted(set(requested) & (set(owned) | set(TOKENIZER_FIELDS))):
        source = owned.get(key, "model.tokenizer")
        if key not in derived or _same(requested[key], derived[key]):
            continue
        raise ValueError(
            f"model.var.{key}={requested[key]!r} conflicts with {source}, which gives {derived[key]!r}; "
            f"remove model.var.{key}"
        )
    base = asdict(VARConfig.from_name(preset)) if preset is not None else {}
    if init_from is None:
        return VAR(VARConfig(**{**base, **requested, **derived}))
    model = VAR.load(init_from, vae=vae)
    found = asdict(model.config)
    changes = {}
    for key, value in {**requested, **derived}.items():
        if _same(value, found[key]):
            continue
        if key not in FINE_TUNE_OVERRIDES:
            origin = owned.get(key, "model.tokenizer") if key in derived else f"model.var.{key}"
            raise ValueError(
                f"{origin} gives {key}={value!r}, but model.init_from={init_from} has {key}={found[key]!r}; "
                f"the architecture comes from the file (only {list(FINE_TUNE_OVERRIDES)} may differ)"
            )
        changes[key] = value
    if changes:  # rebuild with the new training settings, then load the same weights
        state = model.state_dict()
        model = VAR(replace(model.config, **changes))
        model.load_state_dict(state)
    return model


def _same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(b, tuple) else a == b


class ScaleMetrics(Metric):
    """Token cross-entropy and accuracy per scale, summed over batches and processes (mean per token)."""

    full_state_update = False

    def __init__(self, begin_ends: list[tuple[int, int]]):
        super().__init__()
        self.begin_ends = begin_ends
        K = len(begin_ends)
        self.add_state("loss_sum", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("correct", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(K, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss_BL: torch.Tensor, correct_BL: torch.Tensor) -> None:
        for k, (b, e) in enumerate(self.begin_ends):
            self.loss_sum[k] += loss_BL[:, b:e].double().sum()
            self.correct[k] += correct_BL[:, b:e].double().sum()
            self.count[k] += loss_BL[:, b:e].numel()

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"loss": self.loss_sum.sum() / self.count.sum(), "acc": self.correct.sum() / self.count.sum()}
        for k in range(len(self.begin_ends)):
            out[f"loss_s{k}"] = self.loss_sum[k] / self.count[k]
            out[f"acc_s{k}"] = self.correct[k] / self.count[k]
        return {k: v.float() for k, v in out.items()}


class VARModule(L.LightningModule):
    """Trains ``self.var`` on dict batches; ``self.vae`` (frozen tokenizer) and ``self.text_encoder`` (frozen,
    text models only) are not trained, and the text encoder is not stored in checkpoints (it is rebuilt from
    ``text_encoder``). With ``ema_decay > 0``, ``self.var_ema`` holds the float32 average used to validate,
    sample and predict. ``train/loss`` is the optimised (label-smoothed) loss; ``val/*`` use plain CE.
    Gradient clipping is Lightning's ``trainer.gradient_clip_val`` (2.0 in conf/var.yaml).
    """

    def __init__(
        self,
        tokenizer: str,
        var: dict | None = None,
        init_from: str | None = None,
        condition: Literal["class", "text"] = "class",
        text_encoder: dict | None = None,
        label_smoothing: float = 0.0,
        cond_drop_rate: float = 0.1,
        lr: float = 1e-4,
        lr_scale_by_batch: bool = True,
        reference_batch: int = 256,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        decay: Literal["cosine", "linear", "constant"] = "cosine",
        final_lr_fraction: float = 0.0,
        ema_decay: float = 0.0,
        ema_warmup: bool = True,
        log_images_every_n_steps: int = 500,
        num_sample_classes: int = 8,
        sample_captions: list[str] | None = None,
        sample_cfg: float = 1.5,
        sample_top_k: int = 0,
        sample_top_p: float = 0.0,
        sample_seed: int = 0,
        predict_labels: list[int] | None = None,
        predict_captions: list[str] | None = None,
        predict_num_per_condition: int = 4,
        predict_cfg: float = 1.5,
        predict_cfg_schedule: str = "linear",
        predict_top_k: int = 0,
        predict_top_p: float = 0.0,
        predict_temperature: float = 1.0,
        predict_seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        if condition not in ("class", "text"):
            raise ValueError(f"model.condition must be 'class' or 'text', got {condition!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if predict_num_per_condition < 1:
            raise ValueError(f"model.predict_num_per_condition must be >= 1, got {predict_num_per_condition}")
        self.vae = VQVAE.load(tokenizer).eval().requires_grad_(False)
        derived: dict[str, Any] = {k: getattr(self.vae.config, k) for k in TOKENIZER_FIELDS}
        derived.update(condition=condition, cond_drop_rate=cond_drop_rate)
        self.text_encoder = None
        if condition == "text":
            from varctl.text import TextEncoder

            self.text_encoder = TextEncoder(**(text_encoder or {}))
            enc = self.text_encoder
            derived.update(text_dim=enc.width, text_len=enc.context_length, text_pooled_dim=enc.embed_dim)
        elif text_encoder:
            rank_zero_warn("model.text_encoder is ignored: model.condition='class'")
        self.var = self.wrap_model(build_var(var, init_from, self.vae, derived))
        check_vae_fits(self.var.config, self.vae)
        if self.text_encoder is not None:
            self.var.set_null_text(self.text_encoder.empty())
        # decided on the plain model: FSDP1 flattens parameters, hiding which are matrices
        self._no_decay = no_weight_decay_names(self.var)
        self.var_ema = EMA(self.var, ema_decay, ema_warmup) if ema_decay > 0 else None
        self.val_metrics = ScaleMetrics(self.var.config.begin_ends)
        self.test_metrics = ScaleMetrics(self.var.config.begin_ends)
        self._last_image_step: int | None = None
        self._ema_step = 0

    # ------------------------------------------------------------------ wiring
    def wrap_model(self, var: VAR) -> torch.nn.Module:
        """The module to train around the built VAR (subclasses add branches; here the VAR itself)."""
        return var

    def model_inputs(self, batch: dict) -> dict[str, Any]:
        """Extra keyword arguments of the trained module's forward and generate for ``batch`` (none here)."""
        return {}

    def data_requirements(self) -> dict[str, Any]:
        keys = ("image", "label") if self.hparams.condition == "class" else ("image", "caption")
        return {"resolution": self.vae.config.resolution, "keys": keys}

    @property
    def eval_var(self) -> VAR:
        """The weights used to validate, sample and predict: the EMA if enabled."""
        return self.var_ema.module if self.var_ema is not None else self.var

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen: its dropout stays off
        return self

    def setup(self, stage: str) -> None:
        if self.hparams.condition == "class":
            self._check_classes()
        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FSDPStrategy):
            if self.var_ema is not None:
                raise ValueError(
                    "model.ema_decay > 0 is not supported with FSDPStrategy (FSDP1 flattens the average and "
                    "the model differently); use trainer.strategy=ModelParallelStrategy (FSDP2) or "
                    "model.ema_decay=0"
                )
            # keep the frozen tokenizer and text encoder out of FSDP's sharding and mixed-precision casts
            ignored = list(strategy.kwargs.get("ignored_modules") or [])
            ignored += [m for m in (self.vae, self.text_encoder) if m is not None and m not in ignored]
            strategy.kwargs["ignored_modules"] = ignored

    def _check_classes(self) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        n_data = getattr(dm, "num_classes", None)
        n_model = self.var.config.num_classes
        if dm is None or n_data is None or n_data == n_model:
            return
        if n_data < n_model and self.hparams.init_from is not None:
            rank_zero_warn(f"the data has {n_data} classes, the VAR from model.init_from has {n_model}")
            return
        raise ValueError(
            f"model.var.num_classes={n_model} but the data ({type(dm).__name__}) has {n_data} classes; "
            f"set model.var.num_classes={n_data}"
        )

    def configure_model(self) -> None:
        """FSDP2 (``ModelParallelStrategy``): shard each VAR block, then the rest of the VAR (and the EMA)."""
        strategy = self.trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, ModelParallelStrategy) or getattr(self, "_sharded", False):
            return
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = self.device_mesh["data_parallel"]
        for model in [self.var] + ([self.var_ema.module] if self.var_ema is not None else []):
            for block in model.blocks:
                if block.cross_attn is not None:
                    fully_shard(block.cross_attn, mesh=mesh)
                    register_fsdp_forward_method(block.cross_attn, "context")  # called outside forward
                fully_shard(block, mesh=mesh)
                register_fsdp_forward_method(block, "modulation")
            fully_shard(model, mesh=mesh)
            register_fsdp_forward_method(model, "generate")
        self._sharded = True

    def configure_optimizers(self):
        hp = self.hparams
        lr = hp.lr
        if hp.lr_scale_by_batch:
            batch_size = getattr(getattr(self.trainer, "datamodule", None), "batch_size", None)
            if batch_size is None:
                raise ValueError(
                    "model.lr_scale_by_batch needs a datamodule with batch_size; or set it to false"
                )
            world = self.trainer.world_size
            lr = scaled_lr(hp.lr, batch_size, world, self.trainer.accumulate_grad_batches, hp.reference_batch)
            rank_zero_info(
                f"VAR lr = {hp.lr:g} * {batch_size} x {world} x {self.trainer.accumulate_grad_batches} / "
                f"{hp.reference_batch} = {lr:.3g}"
            )
        groups = param_groups(self.var, hp.weight_decay, self._no_decay)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = warmup_decay_scheduler(optimizer, hp.warmup_steps, total, hp.decay, hp.final_lr_fraction)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
        if self.hparams.condition == "text":
            if self.text_encoder.attn_mask.device != self.device:
                self.text_encoder.to(self.device)
            return self.text_encoder(batch["caption"])
        labels = batch["label"]
        if bool((labels < 0).any()):
            raise ValueError(
                "a class-conditional VAR needs labelled data: the batch has label -1 (no labels)"
            )
        return labels

    def _token_losses(self, logits_BLV: torch.Tensor, target_BL: torch.Tensor, smoothing: float):
        B, L, V = logits_BLV.shape
        loss_BL = F.cross_entropy(
            logits_BLV.reshape(-1, V), target_BL.reshape(-1), label_smoothing=smoothing, reduction="none"
        ).view(B, L)  # (B, L)
        return loss_BL, (logits_BLV.argmax(dim=-1) == target_BL).float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        target_BL, x_BLCv = self.tokenize(batch["image"])
        logits_BLV = self.var(self.condition(batch), x_BLCv, **self.model_inputs(batch))
        loss_BL, correct_BL = self._token_losses(logits_BLV, target_BL, self.hparams.label_smoothing)
        loss = loss_BL.mean()
        B = target_BL.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        self.log("train/acc", correct_BL.mean(), batch_size=B)
        with torch.no_grad():
            for k, (b, e) in enumerate(self.var.config.begin_ends):
                self.log(f"train/loss_s{k}", loss_BL[:, b:e].mean(), batch_size=B)
                self.log(f"train/acc_s{k}", correct_BL[:, b:e].mean(), batch_size=B)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # the norm before clipping (and after AMP unscaling); sharded strategies hold only a shard per rank
        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            return
        grads = [p.grad for p in self.var.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads), on_step=True, on_epoch=False)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        # once per optimizer step (global_step counts them; with accumulation not every batch steps)
        if self.var_ema is not None and self.global_step != self._ema_step:
            self.var_ema.update(self.var)
            self._ema_step = self.global_step

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict, metrics: ScaleMetrics) -> None:
        target_BL, x_BLCv = self.tokenize(batch["image"])
        logits_BLV = self.eval_var(self.condition(batch), x_BLCv, **self.model_inputs(batch))
        metrics.update(*self._token_losses(logits_BLV, target_BL, 0.0))

    def _log_metrics(self, stage: str, metrics: ScaleMetrics) -> None:
        # the metric states are summed over processes in compute(), so no sync_dist here
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.compute().items()}, sync_dist=False)
        metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)
        if batch_idx == 0 and self._images_due():
            self._log_samples(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """Teacher-forcing cross-entropy and token accuracy (per scale too) on the test split."""
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def _images_due(self) -> bool:
        every = self.hparams.log_images_every_n_steps
        if every <= 0 or not isinstance(self.logger, TensorBoardLogger) or self.trainer.sanity_checking:
            return False
        last = self._last_image_step
        return last is None or self.global_step - last >= every or self.global_step < last

    def sample_conditions(self) -> tuple[Any, list[str]]:
        """The validation grid's conditions (one per row) and their names."""
        hp = self.hparams
        if hp.condition == "text":
            captions = list(hp.sample_captions or [""])
            return self.text_encoder(captions), captions
        n = min(hp.num_sample_classes, self.var.config.num_classes)
        return torch.arange(n, device=self.device), [self._class_name(i) for i in range(n)]

    def _log_samples(self, batch: dict) -> None:
        """TensorBoard grid: a row per condition, coarse to fine from left to right."""
        hp = self.hparams
        cond, names = self.sample_conditions()
        _, per_scale = self.eval_var.generate(
            cond,
            cfg=hp.sample_cfg,
            top_k=hp.sample_top_k,
            top_p=hp.sample_top_p,
            seed=hp.sample_seed,
            return_intermediates=True,
            vae=self.vae,
        )
        self._add_grid("val/samples_text" if hp.condition == "text" else "val/samples", per_scale, names)

    def _add_grid(self, tag: str, columns: list[torch.Tensor], names: list[str]) -> None:
        """A grid with one row per sample and one column per tensor of ``columns`` (each (B, 3, H, W))."""
        tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (B * K, 3, H, W), row-major: sample, column
        grid = torchvision.utils.make_grid(tiles.float().clamp(0, 1).cpu(), nrow=len(columns), padding=1)
        self._last_image_step = self.global_step
        if self.trainer.is_global_zero:  # every rank sampled: sharded models need all of them
            self.logger.experiment.add_image(tag, grid, self.global_step)
            self.logger.experiment.add_text(
                f"{tag}_rows", "  \n".join(f"{i}: {n}" for i, n in enumerate(names)), self.global_step
            )

    def _class_name(self, label: int) -> str:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(dm, "class_names", None)
        return names[label] if names is not None and label < len(names) else str(label)

    # ------------------------------------------------------------------ predict
    def predict_jobs(self) -> list[tuple[Any, str]]:
        """(condition, name) of every image to generate: each configured label/caption times
        ``predict_num_per_condition``; empty when none is configured (then the batch's own are used)."""
        hp = self.hparams
        n = hp.predict_num_per_condition
        if hp.condition == "text":
            # the caption goes last: the image writer shortens long names from the end
            captions = enumerate(hp.predict_captions or [])
            return [(c, f"caption{j}_{i}_{c}") for j, c in captions for i in range(n)]
        num = self.var.config.num_classes
        for label in hp.predict_labels or []:
            if not 0 <= int(label) < num:
                raise ValueError(f"model.predict_labels holds {label}, expected labels in [0, {num})")
        return [
            (int(c), f"class_{self._class_name(int(c))}_{i}")
            for c in hp.predict_labels or []
            for i in range(n)
        ]

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        hp = self.hparams
        jobs = self.predict_jobs()
        B = len(batch["image"])
        if jobs:  # the configured conditions, split over the predict batches of all processes
            chunk = batch_idx * self.trainer.world_size + self.trainer.global_rank
            part = jobs[chunk * B : (chunk + 1) * B]
            conds, names = [c for c, _ in part], [n for _, n in part]
        elif hp.condition == "text":
            conds = list(batch["caption"])
            names = [f"b{batch_idx}_{i}_{c[:60]}" for i, c in enumerate(conds)]
        else:
            conds = [int(c) for c in batch["label"]]
            names = [f"class_{self._class_name(c)}_b{batch_idx}_{i}" for i, c in enumerate(conds)]
        res = self.vae.config.resolution
        if not conds:
            return {"images": torch.zeros(0, 3, res, res, device=self.device), "names": []}
        if hp.condition == "text":
            cond = self.text_encoder(conds)
        else:
            cond = torch.tensor(conds, dtype=torch.long, device=self.device)
        images = self.eval_var.generate(
            cond,
            cfg=hp.predict_cfg,
            cfg_schedule=hp.predict_cfg_schedule,
            top_k=hp.predict_top_k,
            top_p=hp.predict_top_p,
            temperature=hp.predict_temperature,
            seed=hp.predict_seed + batch_idx * self.trainer.world_size + self.trainer.global_rank,
            vae=self.vae,
        )
        return {"images": images.float().clamp(0, 1), "names": names}

    def on_predict_start(self) -> None:
        jobs = self.predict_jobs()
        loaders = self.trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        loader = loaders[0] if loaders else None
        # Lightning re-creates the predict loader around a batch sampler, which then holds the batch size
        batch_size = getattr(loader, "batch_size", None) or getattr(
            getattr(loader, "batch_sampler", None), "batch_size", None
        )
        batches = self.trainer.num_predict_batches[0] if self.trainer.num_predict_batches else None
        if jobs and batch_size and batches is not None and batches != float("inf"):
            capacity = int(batches) * batch_size * self.trainer.world_size
            if capacity < len(jobs):
                rank_zero_warn(
                    f"{len(jobs)} images are configured but the predict dataloader has room for {capacity} "
                    "(batches x batch_size x processes); the rest are not generated: raise "
                    "trainer.limit_predict_batches or data.batch_size"
                )

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        entry = {
            "var": {"config": asdict(self.var.config), "prefix": "var."},
            "vqvae": {"config": asdict(self.vae.config), "prefix": "vae."},
        }
        if self.var_ema is not None:
            entry["var_ema"] = {"config": asdict(self.var.config), "prefix": "var_ema.module."}
        checkpoint["varctl"] = entry
        # the frozen text encoder is rebuilt from `text_encoder` (its pretrained weights), not stored
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("text_encoder.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.text_encoder is not None and "state_dict" in checkpoint:
            for k, v in self.text_encoder.state_dict().items():
                checkpoint["state_dict"].setdefault(f"text_encoder.{k}", v)
