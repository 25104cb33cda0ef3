"""Training stage 3: control maps (edges, depth, segmentation, sketch) -> images, with a scale-wise control
branch on a VAR from stage 2 (SCALAR-style conditional decoding, arXiv 2507.19946; models/control.py).

The frozen tokenizer gives the target tokens as in stage 2; the VAR (``init_from``, usually the stage-2
checkpoint) predicts them with the control residuals added to every block's input, trained with the same
cross-entropy, condition dropout and optimiser as ``VARModule``. By default only the control branch learns
(``train_backbone=false``: the backbone's class/text behaviour is kept, as CAR); ``train_backbone=true``
fine-tunes both (SCALAR's best setting). Validation adds how well samples follow their controls
(varctl/metrics/control.py), and the same score for samples drawn with another image's controls: the level
that a model ignoring its controls would reach on the first.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from varctl.callbacks.images import ImageGrid
from varctl.checkpoints import CheckpointMismatch
from varctl.lit.evaluation import rows_of, start_evaluation, unrepeated
from varctl.lit.jobs import job_step
from varctl.lit.legacy import upgrade_control_keys
from varctl.lit.settings import ControlScores, Evaluation, OptimizerSettings, Predictions, Samples
from varctl.lit.var import VARModule
from varctl.metrics.control import build_control_metrics
from varctl.models.control import ControlBranch, ControlConfig, ControlledVAR, shape_of
from varctl.models.token_pruning import TokenPruning
from varctl.models.var import VAR


class ControlModule(VARModule):
    """Trains ``self.model`` = ControlledVAR(VAR, ControlBranch) on dict batches with control maps.

    Args (beyond ``VARModule``'s; ``init_from`` is the stage-2 VAR to control):
        control: ``ControlConfig`` fields (modalities, num_segments, width, feature_dim, max_width); the
            depth, width and scales follow the VAR, the resolution the tokenizer.
        control_init_from: continue from a saved branch (a control file or a control-stage checkpoint).
        train_backbone: which backbone parameters train beside the branch: false none (default), true all,
            "norms" the biases and normalisation parameters only, or a list of block indices.
        alignment_weight: weight of SCALAR-Uni's alignment loss (``train/align``; pretrained encoders).
        scores: how validation scores samples against their controls (``settings.ControlScores``; batches
            0: none); also the metrics' protocols in ``test``.
        evaluation: what ``test`` draws (a sample per image of its first ``batches`` batches, for its own
            and for another image's controls) and the networks that score generation quality beside the
            control fidelity (``settings.Evaluation``).
        metric_annotators: depth / segmentation annotators to score samples with (no built-in models), e.g.
            ``{depth: {_target_: datamodules.TorchScriptAnnotator, path: dpt.pt}}``; never stored.
    """

    free_settings = VARModule.free_settings + tuple(f"control.{k}" for k in ControlConfig.free_on_load)
    stage = "control"  # FitsCheckpoint: the checkpoints of this stage

    def __init__(
        self,
        tokenizer: str,
        init_from: str | None = None,
        control: dict | None = None,
        control_init_from: str | None = None,
        train_backbone: bool | str | list[int] = False,
        alignment_weight: float = 1.0,
        var: dict | None = None,
        text_encoder: dict | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerSettings | None = None,
        ema_decay: float = 0.0,
        ema_warmup: bool = True,
        samples: Samples | None = None,
        predict: Predictions | None = None,
        scores: ControlScores | None = None,
        evaluation: Evaluation | None = None,
        token_cache: str | None = None,
        metric_annotators: dict[str, Callable] | None = None,
        scale_loss_weights: list[float] | None = None,
        scale_sampling: Literal["all", "early"] = "all",
        compile_mode: str | None = None,
    ):
        check_tuning(train_backbone)
        if train_backbone is not True and init_from is None:
            raise ValueError(
                "model.init_from must name the VAR to control (e.g. the stage-2 last.ckpt) when "
                f"model.train_backbone={train_backbone!r}; or set model.train_backbone=true to train a VAR "
                "from scratch"
            )
        super().__init__(
            tokenizer, var, init_from, text_encoder, label_smoothing, optimizer, ema_decay, ema_warmup,
            samples, predict, scale_loss_weights, scale_sampling, evaluation, token_cache, compile_mode,
        )  # fmt: skip
        self.hparams.pop("metric_annotators", None)  # objects (models, functions): rebuilt from the config
        self.scoring = ControlScores.of(scores)
        cc = self.control.config
        for sampling in (self.samples, self.predictions, self.evaluation, self.scoring):
            unknown = sorted(set(sampling.modality_strength or {}) - set(cc.modalities))
            if unknown:
                raise ValueError(
                    f"model.{sampling.section}.modality_strength names {unknown}, which the control branch "
                    f"does not take: its modalities are {list(cc.modalities)} (model.control.modalities)"
                )
            if cc.injector == "prefill" and TokenPruning.of(sampling.token_pruning) is not None:
                raise ValueError(
                    f"model.{sampling.section}.token_pruning={sampling.token_pruning} cannot be used with "
                    "model.control.injector=prefill (the prefix's attention bias is per token, and pruning "
                    "drops tokens): set it to 0 or use another injector"
                )
        # per stage: samples for their own controls, for another image's (the no-control level), and the
        # tokenizer's reconstructions of the real images (the ceiling that the tokenizer allows)
        self.control_metrics = torch.nn.ModuleDict(
            {
                name: torch.nn.ModuleDict(
                    build_control_metrics(
                        cc.modalities,
                        metric_annotators,
                        cc.num_segments,
                        edge_protocols=self.scoring.edge_protocols,
                        ignore_index=self.scoring.ignore_index,
                        ms_ssim=self.scoring.ms_ssim,
                    )
                )
                for stage in ("val", "test")
                for name in (stage, f"{stage}_shuffled", f"{stage}_tokenizer")
            }
        )

    def build_model(self, var: VAR) -> ControlledVAR:
        hp = self.hparams
        shape = shape_of(var.config, self.vae.config.resolution)
        if hp.control_init_from is None:  # a checkpoint being restored brings the frozen encoder's weights
            branch = ControlBranch.build(hp.control, weights_later=True, **shape).init_from_backbone(var)
        else:  # the file's architecture, which the requested fields and the VAR's shape must agree with
            branch = ControlBranch.load(hp.control_init_from, **{**(hp.control or {}), **shape})
        tune_backbone(var, hp.train_backbone)
        return ControlledVAR(var, branch)

    def load_pending_weights(self) -> None:
        """A new branch's frozen pretrained encoder reads ``model.control.encoder_weights`` now, or names it:
        the command line calls this before a run without a checkpoint (which would bring the weights). Else
        the first encoding reads the file (Lightning restores a checkpoint after ``setup``)."""
        encoder = self.control.encoder
        if not getattr(encoder, "weights_ready", True):
            encoder.load_pretrained()

    @property
    def var(self) -> VAR:
        return self.model.var

    @property
    def control(self) -> ControlBranch:
        return self.model.control

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.control.config.modalities

    @property
    def train_needs_pixels(self) -> bool:
        return self.hparams.alignment_weight > 0 and self.control.config.encoder == "pretrained"

    def model_inputs(self, batch: dict) -> dict[str, Any]:
        inputs = {"control_maps": batch["control"]}
        if self.train_needs_pixels:
            inputs["images"] = batch["image"]  # SCALAR-Uni's alignment loss, computed in training
        return inputs

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        align = self.model.alignment
        if align is not None:
            self.log("train/align", align, batch_size=len(batch["image"]))
            self.loss_terms["align"] = align.detach()
            loss = loss + self.hparams.alignment_weight * align
        return loss

    def generate(self, cond, sampling, seed_offset: int = 0, **kwargs):
        """``VARModule.generate`` with the control fields of ``sampling`` (guidance, strengths)."""
        return self.eval_model.generate(
            cond, vae=self.vae, **self.sampling_kwargs(sampling, seed_offset, control=True), **kwargs
        )

    def load_refiner(self, path: str) -> ControlledVAR:
        """A controlled sample's refiner: a smaller VAR with a control branch of its own, both from one
        control-stage checkpoint."""
        try:
            branch = ControlBranch.load(path)
        except ValueError as err:
            raise ValueError(
                f"refiner: a control stage's refiner is a control checkpoint of a smaller VAR; {err}"
            ) from err
        return ControlledVAR(VAR.load(path, vae=self.vae), branch)

    def data_requirements(self) -> dict[str, Any]:
        req = {**super().data_requirements()}
        req["keys"] = (*req["keys"], "control")
        if "segmentation" in self.modalities:  # the data checks its ids against it before the run
            req["num_segments"] = self.control.config.num_segments
        return req

    def check_data(self, dm) -> None:
        super().check_data(dm)
        self.check_controls(dm)

    def check_controls(self, dm) -> None:
        """The data's control modalities against the branch's (the CLI calls it before the data is scanned
        too, so that a mismatch is named as such, not as maps missing from a folder)."""
        have = getattr(dm, "controls", None)
        if have is None:
            return
        missing = [m for m in self.modalities if m not in have]
        extra = [m for m in have if m not in self.modalities]
        if hasattr(dm, "check_conditions") and (missing or extra):  # data=jobs: exactly the branch's maps
            raise ValueError(
                f"data.controls={list(have)} but the control branch takes {list(self.modalities)} "
                f"(model.control.modalities): set data.controls=[{','.join(self.modalities)}]"
            )
        if missing:
            raise ValueError(
                f"model.control.modalities={list(self.modalities)} but data.controls={list(have)}: add "
                f"{missing} to data.controls"
            )

    def condition(self, batch: dict):
        if self.text_encoder is None:  # unlabelled control data (-1) is generated unconditionally
            labels = batch["label"]
            return torch.where(labels < 0, torch.full_like(labels, self.var.config.num_classes), labels)
        return super().condition(batch)

    def on_fit_start(self) -> None:
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        branch = sum(p.numel() for p in self.control.parameters())
        rank_zero_info(
            f"control stage: {branch / 1e6:.2f}M control parameters, {trained / 1e6:.2f}M trained "
            f"(train_backbone={self.hparams.train_backbone})"
        )

    # ------------------------------------------------------------------ evaluation
    def generate_for(self, batch: dict, maps: dict, sampling, seed_offset: int = 0, **kwargs):
        """Samples for the batch's conditions under the control ``maps`` (those of the branch's modalities:
        a batch may hold others)."""
        maps = {m: x for m, x in maps.items() if m in self.modalities}
        return self.generate(self.condition(batch), sampling, seed_offset, control_maps=maps, **kwargs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._score(batch, batch_idx, "val")

    def evaluate_samples(self, batch: dict, batch_idx: int) -> None:
        self._score(batch, batch_idx, "test")  # the test samples, scored for control and generation quality

    def _score(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Score samples drawn for the batch's controls against the batch's images and maps; then score,
        against the same images and maps, samples drawn for the controls rolled by one image: a model that
        ignores its controls scores the same on both, one that follows them scores lower on the second. The
        tokenizer's reconstructions of the real images give the ceiling."""
        evaluator = self.evaluator if stage == "test" else None
        sampling = self.evaluation if stage == "test" else self.scoring
        if batch_idx >= sampling.batches or not (len(self.control_metrics[stage]) or evaluator):
            return
        maps = {m: batch["control"][m] for m in self.modalities}  # the data may hold others too
        rolled = {m: t.roll(1, dims=0) for m, t in maps.items()}
        seed_offset = batch_idx * self.trainer.world_size + self.trainer.global_rank
        real = batch["image"].float().add(1).mul(0.5)
        with torch.no_grad(), torch.autocast(real.device.type, enabled=False):
            recon = self.vae.idx_to_img(self.vae.img_to_idx(batch["image"].float())).add(1).mul(0.5)
        keep = unrepeated(self, batch_idx, len(real))  # DDP's repeats of the first images count once
        real_kept, maps_kept, captions = (
            rows_of(real, keep),
            rows_of(maps, keep),
            rows_of(batch.get("caption"), keep),
        )
        drawn = [(stage, maps), (f"{stage}_shuffled", rolled)]
        if len(real) == 1:  # a lone image has no other image's controls: rolled, they would be its own
            drawn.pop()
        for name, images in [
            *((name, self.generate_for(batch, m, sampling, seed_offset)) for name, m in drawn),
            (f"{stage}_tokenizer", recon),
        ]:
            images = rows_of(images, keep)
            if not len(images):  # a batch of DDP's repeats only
                continue
            for metric in self.control_metrics[name].values():
                metric.update(images, real_kept if metric.against == "image" else maps_kept[metric.against])
            if evaluator is not None:
                evaluator.update(name, images.float().clamp(0, 1), real_kept, captions)

    def _log_scores(self, stage: str) -> None:
        for name in (stage, f"{stage}_shuffled", f"{stage}_tokenizer"):
            for key, metric in self.control_metrics[name].items():
                if metric.update_count:
                    self.log(f"{name}/{key}", metric.compute())
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_scores("val")

    def on_test_start(self) -> None:
        self.evaluator = start_evaluation(self, self.evaluation, ("test", "test_shuffled", "test_tokenizer"))

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()  # logs the generation scores too
        self._log_scores("test")

    def val_images(self, batch: dict, max_images: int) -> dict[str, ImageGrid]:
        """Rows: val images; columns: their controls, the samples coarse to fine, the real image."""
        n = min(max_images, len(batch["image"]))
        part = {k: v[:n] for k, v in batch.items() if k != "control"}
        part["control"] = {m: batch["control"][m][:n] for m in self.modalities}
        _, per_scale = self.generate_for(part, part["control"], self.samples, return_intermediates=True)
        columns = [part["control"], *per_scale, part["image"].add(1).mul(0.5)]
        return {"val/control_samples": ImageGrid(columns, [self._row_name(part, i) for i in range(n)])}

    def _row_name(self, batch: dict, i: int) -> str:
        if self.text_encoder is not None:
            return batch["caption"][i] or "(no caption)"
        label = int(batch["label"][i])
        return self.class_name(label) if label >= 0 else "unconditional"

    # ------------------------------------------------------------------ predict
    def predict_jobs(self) -> list:
        return []  # each image comes from the control maps of a predict batch

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Control-to-image for every sample of the batch, written beside its controls and the real image
        (``<name>_<modality>.png``, ``<name>_real.png``); with data=jobs, the user's maps and images."""
        if batch.get("job"):
            return job_step(self, batch, control=True)
        seed_offset = batch_idx * self.trainer.world_size + self.trainer.global_rank
        maps = {m: batch["control"][m] for m in self.modalities}
        images = self.generate_for(batch, maps, self.predictions, seed_offset)
        names = [f"{i:03d}_{self._row_name(batch, i)[:60]}" for i in range(len(images))]
        inputs = {"image": batch["image"], "control": maps}
        return {"images": images.float().clamp(0, 1), "names": names, "inputs": inputs}

    # ------------------------------------------------------------------ checkpoints
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if checkpoint.get("state_dict") is not None:
            upgrade_control_keys(checkpoint["state_dict"])
        # settings that change what the branch computes but no weight's shape: strict loading cannot see them
        saved = ((checkpoint.get("varctl") or {}).get("control") or {}).get("config")
        if saved is not None:
            path = getattr(self._trainer, "ckpt_path", None) or self._checkpoint_path or "the checkpoint"
            differences = unshaped_differences(saved, self.control.config)
            if differences:
                was = ", ".join(f"model.control.{k}={old} (here {here})" for k, old, here in differences)
                give = " ".join(f"model.control.{k}={trained}" for k, trained, _ in differences)
                raise CheckpointMismatch(
                    f"{path}: its control branch was trained with {was}; give {give} on the command line "
                    "(these settings shape no weight, so the weights alone cannot tell)"
                )

    def checkpoint_entries(self) -> dict[str, dict]:
        entries = {
            "vqvae": self.vae.checkpoint_entry("vae."),
            "var": self.var.checkpoint_entry("model.var."),
            "control": self.control.checkpoint_entry("model.control."),
        }
        if self.ema is not None:
            entries["var_ema"] = self.var.checkpoint_entry("ema.module.var.")
            entries["control_ema"] = self.control.checkpoint_entry("ema.module.control.")
        return entries


def unshaped_differences(saved: dict, config: ControlConfig) -> list[tuple[str, Any, Any]]:
    """(key, the file's value, this run's) for the branch settings that shape no weight but change what it
    computes and differ between a saved branch config (``saved``) and ``config``, when the weights fit
    (otherwise the weights' check names what differs): car's ``car_condition`` and prefill's
    ``prefix_condition`` (files from before the settings: "class") and which blocks receive the control
    (``blocks``, resolved)."""
    fields = {f.name for f in dataclasses.fields(ControlConfig)}
    try:
        then = ControlConfig(**{k: v for k, v in saved.items() if k in fields})
    except (TypeError, ValueError):  # another version's config: the weights' check is what remains
        return []
    blocks, here = then.injected_blocks, config.injected_blocks
    if (then.injector, len(blocks), then.side_blocks) != (config.injector, len(here), config.side_blocks):
        return []
    out = []
    if config.injector == "car" and then.car_condition != config.car_condition:
        out.append(("car_condition", then.car_condition, config.car_condition))
    if config.injector == "prefill" and then.prefix_condition != config.prefix_condition:
        out.append(("prefix_condition", then.prefix_condition, config.prefix_condition))
    if blocks != here:
        out.append(("blocks", list(blocks), list(here)))  # as Hydra writes a list
    return out


def check_tuning(train_backbone) -> None:
    ok = (
        isinstance(train_backbone, bool)
        or train_backbone == "norms"
        or (isinstance(train_backbone, (list, tuple)) and all(isinstance(i, int) for i in train_backbone))
    )
    if not ok:
        raise ValueError(
            'model.train_backbone must be true, false, "norms" or a list of block indices, found '
            f"{train_backbone!r}"
        )


NORM_PARAMS = ("bias", "scale_mul", "ada_gss", "ln_cross")


def tune_backbone(var: VAR, train_backbone) -> None:
    """Selective tuning of the backbone: all, nothing, norms and biases only, or chosen blocks."""
    if train_backbone is True:
        return
    var.requires_grad_(False)
    if train_backbone == "norms":
        for name, p in var.named_parameters():
            if any(part in name for part in NORM_PARAMS):
                p.requires_grad_(True)
    elif isinstance(train_backbone, (list, tuple)):
        bad = [i for i in train_backbone if not 0 <= i < len(var.blocks)]
        if bad:
            raise ValueError(f"model.train_backbone blocks {bad} out of range: the VAR has {len(var.blocks)}")
        for i in train_backbone:
            var.blocks[i].requires_grad_(True)
