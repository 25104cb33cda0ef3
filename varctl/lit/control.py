"""Training stage 3: control maps (edges, depth, segmentation) -> images, with a scale-wise control branch
on a VAR from stage 2 (SCALAR-style conditional decoding, arXiv 2507.19946; models/control.py).

The frozen tokenizer gives the target tokens as in stage 2; the VAR (``init_from``, usually the stage-2
checkpoint) predicts them with the control residuals added to every block's input, trained with the same
cross-entropy, condition dropout and optimiser as ``VARModule``. By default only the control branch learns
(``train_backbone=false``: the backbone's class/text behaviour is kept, as CAR); ``train_backbone=true``
fine-tunes both (SCALAR's best setting). Validation adds how well samples follow their controls
(control_metrics.py), and the same score for samples drawn with another image's controls: the level that a
model ignoring its controls would reach on the first.

Legend: B batch, L all tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from varctl.control_metrics import build_control_metrics
from varctl.lit.var import VARModule
from varctl.models.control import ControlBranch, ControlConfig, ControlledVAR
from varctl.models.var import VAR

DERIVED = ("depth", "embed_dim", "patch_nums", "resolution")  # from the VAR and the tokenizer
# segmentation ids -> colours for the grids and predict outputs (id 0 black)
PALETTE = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0]], dtype=torch.float32,
) / 255  # fmt: skip


def control_images(maps: dict[str, torch.Tensor], modalities: tuple[str, ...]) -> list[torch.Tensor]:
    """One RGB picture in [0, 1] per modality, (B, 3, H, W): edges white on black, depth grey (white =
    near), segmentation ids in a fixed palette."""
    out = []
    for m in modalities:
        x = maps[m].float()
        if m == "segmentation":
            ids = maps[m][:, 0].long() % len(PALETTE)
            out.append(PALETTE.to(x.device)[ids].permute(0, 3, 1, 2))
        else:
            out.append(x.clamp(0, 1).expand(-1, 3, -1, -1))
    return out


def build_branch(
    var: VAR, resolution: int, control: dict | None, control_init_from: str | None
) -> ControlBranch:
    requested = dict(control or {})
    names = {f.name for f in fields(ControlConfig)} - set(DERIVED)
    unknown = sorted(set(requested) - names - set(DERIVED))
    if unknown:
        raise ValueError(f"model.control has unknown keys {unknown}; allowed: {sorted(names)}")
    derived = sorted(set(requested) & set(DERIVED))
    if derived:
        raise ValueError(
            f"model.control.{derived[0]} is set by the VAR and the tokenizer (depth, width, scales, "
            f"resolution); remove model.control.{derived[0]}"
        )
    if control_init_from is None:
        return ControlBranch(ControlConfig.for_var(var.config, resolution, **requested))
    branch = ControlBranch.load(control_init_from)
    saved = {k: v for k, v in asdict(branch.config).items() if k not in DERIVED}
    expected = ControlConfig.for_var(var.config, resolution, **{**saved, **requested})
    if branch.config != expected:
        diff = {
            k: (v, getattr(expected, k))
            for k, v in asdict(branch.config).items()
            if v != getattr(expected, k)
        }
        raise ValueError(
            f"model.control_init_from={control_init_from} does not fit (file vs. this run: {diff}); the "
            "branch's architecture comes from the file"
        )
    return branch


class ControlModule(VARModule):
    """Trains ``self.var`` = ControlledVAR(VAR, ControlBranch) on dict batches with control maps.

    Beyond ``VARModule``'s arguments (``init_from`` is the stage-2 VAR to control):
        control: ControlConfig fields (modalities, num_segments, width, feature_dim, max_width).
        control_init_from: continue from a saved branch (a control file or a control-stage checkpoint).
        train_backbone: also train the VAR (default: only the control branch).
        num_sample_images: val images shown in the TensorBoard grid (controls | coarse to fine | real).
        metric_batches: val batches whose samples are scored against their controls (0: none).
        metric_annotators: depth / segmentation annotators to score samples with (no built-in models).
        metric_edge_thresholds: Canny thresholds of the edge F1.
        metric_cfg: guidance of the scored samples.
    """

    def __init__(
        self,
        tokenizer: str,
        control: dict | None = None,
        control_init_from: str | None = None,
        train_backbone: bool = False,
        num_sample_images: int = 4,
        metric_batches: int = 1,
        metric_annotators: dict | None = None,
        metric_edge_thresholds: tuple[float, float] = (100.0, 200.0),
        metric_cfg: float = 1.5,
        **kwargs,
    ):
        if not train_backbone and kwargs.get("init_from") is None:
            raise ValueError(
                "model.init_from must name the VAR to control (e.g. the stage-2 last.ckpt) when "
                "model.train_backbone=false; or set model.train_backbone=true to train a VAR from scratch"
            )
        super().__init__(tokenizer, **kwargs)
        cc = self.var.control.config
        # per stage: samples for their own controls, for another image's (the no-control level), and the
        # tokenizer's reconstructions of the real images (the ceiling that the tokenizer allows)
        self.scores = torch.nn.ModuleDict(
            {
                name: torch.nn.ModuleDict(
                    build_control_metrics(
                        cc.modalities, metric_annotators, cc.num_segments, metric_edge_thresholds
                    )
                )
                for stage in ("val", "test")
                for name in (stage, f"{stage}_shuffled", f"{stage}_tokenizer")
            }
        )

    def wrap_model(self, var: VAR) -> ControlledVAR:
        hp = self.hparams
        branch = build_branch(var, self.vae.config.resolution, hp.control, hp.control_init_from)
        if not hp.train_backbone:
            var.requires_grad_(False)
        return ControlledVAR(var, branch)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.var.control.config.modalities

    def model_inputs(self, batch: dict) -> dict[str, Any]:
        return {"control_maps": batch["control"]}

    def data_requirements(self) -> dict[str, Any]:
        req = super().data_requirements()
        return {**req, "keys": (*req["keys"], "control")}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None)
        have = getattr(dm, "controls", None)
        missing = [m for m in self.modalities if have is not None and m not in have]
        if missing:
            raise ValueError(
                f"model.control.modalities={list(self.modalities)} but data.controls={list(have)}: add "
                f"{missing} to data.controls"
            )

    def condition(self, batch: dict):
        if self.hparams.condition == "class":  # unlabelled control data (-1) is generated unconditionally
            labels = batch["label"]
            return torch.where(labels < 0, torch.full_like(labels, self.var.config.num_classes), labels)
        return super().condition(batch)

    # ------------------------------------------------------------------ evaluation
    def _generate(self, batch: dict, maps: dict, cfg: float, **kwargs):
        return self.eval_var.generate(
            self.condition(batch),
            control_maps=maps,
            cfg=cfg,
            top_k=kwargs.pop("top_k", self.hparams.sample_top_k),
            top_p=kwargs.pop("top_p", self.hparams.sample_top_p),
            vae=self.vae,
            **kwargs,
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._score(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._score(batch, batch_idx, "test")

    def _score(self, batch: dict, batch_idx: int, stage: str) -> None:
        """Score samples drawn for the batch's controls against the batch's images and maps; then score,
        against the same images and maps, samples drawn for the controls rolled by one image: a model that
        ignores its controls scores the same on both, one that follows them scores lower on the second. The
        tokenizer's reconstructions of the real images give the ceiling."""
        if batch_idx >= self.hparams.metric_batches or not len(self.scores[stage]):
            return
        maps = batch["control"]
        rolled = {m: t.roll(1, dims=0) for m, t in maps.items()}
        real = batch["image"].float().add(1).mul(0.5)
        seed = self.hparams.sample_seed + batch_idx
        with torch.no_grad(), torch.autocast(real.device.type, enabled=False):
            recon = self.vae.idx_to_img(self.vae.img_to_idx(batch["image"].float())).add(1).mul(0.5)
        for name, images in (
            (stage, self._generate(batch, maps, self.hparams.metric_cfg, seed=seed)),
            (f"{stage}_shuffled", self._generate(batch, rolled, self.hparams.metric_cfg, seed=seed)),
            (f"{stage}_tokenizer", recon),
        ):
            for key, metric in self.scores[name].items():
                if key == "edges_f1":
                    metric.update(images, real)
                else:
                    metric.update(images, maps["depth" if key == "depth_rmse" else "segmentation"])

    def _log_scores(self, stage: str) -> None:
        for name in (stage, f"{stage}_shuffled", f"{stage}_tokenizer"):
            for key, metric in self.scores[name].items():
                if metric.update_count:
                    self.log(f"{name}/{key}", metric.compute())
                metric.reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_scores("test")

    def _log_samples(self, batch: dict) -> None:
        """Rows: val images; columns: their controls, the samples coarse to fine, the real image."""
        n = min(self.hparams.num_sample_images, len(batch["image"]))
        part = {
            "image": batch["image"][:n],
            "label": batch["label"][:n],
            "caption": list(batch["caption"])[:n],
            "control": {m: t[:n] for m, t in batch["control"].items()},
        }
        _, per_scale = self._generate(
            part, part["control"], self.hparams.sample_cfg, seed=self.hparams.sample_seed,
            return_intermediates=True,
        )  # fmt: skip
        columns = [
            *control_images(part["control"], self.modalities),
            *per_scale,
            part["image"].add(1).mul(0.5),
        ]
        names = [self._row_name(part, i) for i in range(n)]
        self._add_grid("val/control_samples", columns, names)

    def _row_name(self, batch: dict, i: int) -> str:
        if self.hparams.condition == "text":
            return batch["caption"][i] or "(no caption)"
        label = int(batch["label"][i])
        return self._class_name(label) if label >= 0 else "unconditional"

    # ------------------------------------------------------------------ predict
    def predict_jobs(self) -> list:
        return []  # each image comes from the control maps of a predict batch

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Control-to-image for every sample of the batch: the image, plus its controls and the real image
        beside it (``<name>_<modality>.png``, ``<name>_real.png``)."""
        hp = self.hparams
        images = self._generate(
            batch, batch["control"], hp.predict_cfg, top_k=hp.predict_top_k, top_p=hp.predict_top_p,
            cfg_schedule=hp.predict_cfg_schedule, temperature=hp.predict_temperature,
            seed=hp.predict_seed + batch_idx * self.trainer.world_size + self.trainer.global_rank,
        )  # fmt: skip
        names = [f"{i:03d}_{self._row_name(batch, i)[:60]}" for i in range(len(images))]
        extras = dict(zip(self.modalities, control_images(batch["control"], self.modalities)))
        extras["real"] = batch["image"].float().add(1).mul(0.5)
        return {"images": images.float().clamp(0, 1), "names": names, "extras": extras}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        var_config = asdict(self.var.config)
        control_config = asdict(self.var.control.config)
        entry = checkpoint["varctl"]
        entry["var"] = {"config": var_config, "prefix": "var.var."}
        entry["control"] = {"config": control_config, "prefix": "var.control."}
        if self.var_ema is not None:
            entry["var_ema"] = {"config": var_config, "prefix": "var_ema.module.var."}
            entry["control_ema"] = {"config": control_config, "prefix": "var_ema.module.control."}

    def on_fit_start(self) -> None:
        trained = sum(p.numel() for p in self.var.parameters() if p.requires_grad)
        branch = sum(p.numel() for p in self.var.control.parameters())
        rank_zero_info(
            f"control stage: {branch / 1e6:.2f}M control parameters, {trained / 1e6:.2f}M trained "
            f"(train_backbone={self.hparams.train_backbone})"
        )
