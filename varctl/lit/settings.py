"""The grouped settings of the training stages: one dataclass per YAML section under ``model``.

A stage takes each section as a plain dict (``model.optimizer: {lr: ..., ...}``, so checkpoints and
``load_from_checkpoint`` see plain values) and reads it through ``Settings.of``; the command line checks the
section's keys and types against the dataclass before anything runs, like every other argument.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from varctl.models.sampling import check_sampling_args
from varctl.models.token_pruning import TokenPruning

S = TypeVar("S", bound="Settings")


class Settings:
    """Base of the settings dataclasses."""

    @classmethod
    def of(cls: type[S], value: S | dict | None, **defaults) -> S:
        """Settings from a section (missing keys take ``defaults``, then the dataclass defaults), an
        instance, or None."""
        if isinstance(value, cls):
            return value
        return cls(**{**defaults, **(value or {})})


def plain_hparams(hparams: dict[str, Any]) -> None:
    """Store settings given as instances as dicts, so checkpoints hold plain values only."""
    for key, value in hparams.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            hparams[key] = dataclasses.asdict(value)


@dataclass
class OptimizerSettings(Settings):
    """AdamW with parameter groups, linear warmup and a decay (``varctl/lit/optim.py``); the defaults are
    VAR's recipe (lr 1e-4 per 256 images, betas 0.9/0.95, weight decay 0.05 on matrices, cosine)."""

    lr: float = 1e-4
    lr_scale_by_batch: bool = True  # lr is given per reference_batch images, scaled to the global batch
    reference_batch: int = 256
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05
    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_fraction: float = 0.0


def _values(value) -> list:
    """A setting given as a number or one per scale, as a list."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Sampling(Settings):
    """Arguments of ``VAR.generate``: guidance and filtering (scalars or one value per scale) and a seed."""

    cfg: float | list[float] = 1.5
    cfg_schedule: Literal["linear", "constant"] = "linear"
    top_k: int | list[int] = 0
    top_p: float | list[float] = 0.0
    temperature: float | list[float] = 1.0
    seed: int = 0
    # control stage only (``ControlledVAR.generate``): control guidance, its strength, per-modality weights
    control_cfg: float | list[float] = 0.0
    control_strength: float | list[float] = 1.0
    modality_strength: dict[str, float] | None = None
    # the fast samplers, each off by default (README, "Fast sampling"): FastVAR's token pruning (the share
    # of tokens left out at the last two scales), guidance skipped from a scale on, and a smaller VAR file
    # (same tokenizer and classes; the control stage: a control checkpoint of a smaller VAR, its own branch)
    # that draws the scales from ``draft_scales`` on (CoDe)
    token_pruning: float = 0.0
    skip_guidance_from: int | None = None
    refiner: str | None = None
    draft_scales: int | None = None

    CONTROL_FIELDS = ("control_cfg", "control_strength", "modality_strength")
    section = "sampling"  # the section under ``model`` that error messages name

    def __post_init__(self):
        """The values ``generate`` would refuse, refused now (before a run starts), naming the section."""
        try:
            check_sampling_args(*(_values(v) for v in (self.top_k, self.top_p, self.temperature)))
            TokenPruning.of(self.token_pruning)
            for key in ("skip_guidance_from", "draft_scales"):
                value = getattr(self, key)
                if value is not None and value < 0:
                    raise ValueError(f"{key} must be a scale index >= 0, found {value}")
        except ValueError as e:
            raise ValueError(f"{self.section}.{e}") from None
        if self.refiner is not None:
            if not os.path.isfile(os.path.expanduser(str(self.refiner))):
                raise FileNotFoundError(f"refiner={self.refiner}: no such VAR file or checkpoint")
            if self.draft_scales is None:
                raise ValueError("refiner needs draft_scales: the scale from which the refiner draws")

    def generate_kwargs(self, seed_offset: int = 0, control: bool = False) -> dict[str, Any]:
        """The arguments of ``generate``; the control fields only for a controlled VAR (``control``)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Sampling)}
        if not control:
            defaults = {f.name: f.default for f in dataclasses.fields(Sampling)}
            set_here = [k for k in self.CONTROL_FIELDS if fields[k] != defaults[k]]
            if set_here:
                raise ValueError(
                    f"{set_here} apply to the control stage only (a VAR without a control branch)"
                )
            fields = {k: v for k, v in fields.items() if k not in self.CONTROL_FIELDS}
        return {**fields, "seed": self.seed + seed_offset}


@dataclass
class Samples(Sampling):
    """The TensorBoard sample grid at validation (``varctl.callbacks.ImageLogger``): class models draw one
    row per class (the first ``callbacks.images.max_images``), text models one per caption."""

    section = "samples"

    captions: list[str] | None = None


@dataclass
class Predictions(Sampling):
    """What ``predict`` draws: each label (class models) or caption (text models) ``num_per_condition``
    times; with neither, one image per predict-split sample, for its own label or caption."""

    section = "predict"

    labels: list[int] | None = None
    captions: list[str] | None = None
    num_per_condition: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.num_per_condition < 1:
            raise ValueError(f"{self.section}.num_per_condition must be >= 1, found {self.num_per_condition}")

    def jobs(self, text: bool, num_classes: int, class_name: Callable[[int], str]) -> list[tuple[Any, str]]:
        """(condition, file name) of every image to draw, for a text or a class model."""
        repeats = range(self.num_per_condition)
        if text:  # the caption goes last: the writer shortens long names from the end
            return [(c, f"caption{j}_{i}_{c}") for j, c in enumerate(self.captions or []) for i in repeats]
        bad = [label for label in self.labels or [] if not 0 <= int(label) < num_classes]
        if bad:
            raise ValueError(f"predict.labels holds {bad}, expected labels in [0, {num_classes})")
        return [(int(c), f"class_{class_name(int(c))}_{i}") for c in self.labels or [] for i in repeats]


@dataclass
class Evaluation(Sampling):
    """What ``test`` measures on generated images (``varctl.metrics.generation``, ``varctl.lit.evaluation``).

    One sample is drawn for the condition of each image of the first ``batches`` test batches (these
    sampling settings; seed + batch index * world size + rank), and scored against those real images (or
    the cached ``reference_stats``) with every feature network in ``networks`` whose weights are set:
    ``inception`` (FID, KID, IS, precision/recall; ``inception_weights``: the local FID Inception file) and
    ``judge`` (the demo's class judge, ``judge_weights``: a file from tools/score_samples.py). A network
    without weights is skipped with a message. Text models add the CLIP score with the open_clip
    architecture ``clip_model`` and the local weights ``clip_weights``. ``reference_stats``: a file for the
    real images' features, one per network (``ref.safetensors`` -> ``ref.judge.safetensors``); computed
    when absent, refused when computed for other images, weights or resolution (``refresh_reference``
    recomputes it)."""

    section = "evaluation"

    batches: int = 0
    networks: tuple[str, ...] = ("inception", "judge")
    inception_weights: str | None = None
    judge_weights: str | None = None
    clip_model: str | None = None
    clip_weights: str | None = None
    reference_stats: str | None = None
    refresh_reference: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    precision_recall_k: int = 3

    WEIGHTS = ("inception_weights", "judge_weights", "clip_weights")

    def __post_init__(self):
        super().__post_init__()
        for key in self.WEIGHTS:  # a named file that is absent fails now, before a run starts
            path = getattr(self, key)
            if path is not None and not os.path.isfile(os.path.expanduser(str(path))):
                raise FileNotFoundError(f"{key}={path}: no such file (weights are never downloaded)")
        unknown = sorted(set(self.networks) - {"inception", "judge"})
        if unknown:
            raise ValueError(f"networks: unknown {unknown}; expected inception and/or judge")


@dataclass
class ControlScores(Sampling):
    """How validation scores control samples (``varctl.metrics.control``): the first ``batches`` batches,
    edge F1 under each of ``edge_protocols``, depth RMSE, segmentation mIoU without the ``ignore_index``
    pixels, sketch SSIM or MS-SSIM. ``test`` scores the same metrics on the samples that ``evaluation``
    draws, with generation quality beside them."""

    section = "scores"

    batches: int = 1
    edge_protocols: tuple[str, ...] = ("controlar", "controlnetpp")
    ignore_index: int | None = None
    ms_ssim: bool = False


@dataclass
class PerceptualSettings(Settings):
    """The tokenizer's LPIPS (the ``lpips`` package): its loss weight, backbone, and the val/lpips metric.
    ``pretrained`` needs torchvision's ImageNet weights in the local cache (never downloaded); false gives
    a random backbone, a feature loss that is not LPIPS (then no LPIPS metric is reported)."""

    weight: float = 1.0
    net: Literal["vgg", "alex"] = "vgg"
    pretrained: bool = True
    val_lpips: bool = True


@dataclass
class DiscriminatorSettings(Settings):
    """The tokenizer's PatchGAN hinge loss with VQGAN's adaptive weight, from step ``start`` on
    (``weight`` 0: no discriminator); ``lr`` None: the optimizer's."""

    weight: float = 0.5
    start: int = 20000
    lr: float | None = None
    adaptive_weight: bool = True
    channels: int = 64
    layers: int = 3


@dataclass
class CodebookSettings(Settings):
    """Codebook health of the tokenizer: a code is dead below ``dead_code_threshold`` times its scale's
    uniform rate, used above ``usage_margin`` times it; dead codes restart every ``restart_every`` steps."""

    dead_code_threshold: float = 0.01
    usage_margin: float = 0.08
    restart_dead_codes: bool = False
    restart_every: int = 1000

    def __post_init__(self):
        if self.restart_dead_codes and self.restart_every < 1:  # `step % restart_every` would fail later
            raise ValueError(f"model.codebook.restart_every must be >= 1, found {self.restart_every}")
