"""How well generated images follow their control maps (the ControlNet++ / SCALAR evaluation protocol).

- edges: F1 between the Canny edges of the generated image and those of the real image, the same detector
  on both, exact pixel match, per image then averaged (ControlNet++; SCALAR Table 1 "Canny F1").
- depth: RMSE on the 0-255 scale between the depth annotator's map of the generated image and the control
  depth map (ControlAR), only with a depth annotator configured: there is no built-in depth model.
- segmentation: mean IoU between the segmenter's ids on the generated image and the control ids, only with
  a segmentation annotator configured.
- sketch: SSIM between the sketch annotator's maps of the generated and of the real image, the same
  annotator on both (the built-in XDoG line drawing, or a user's HED / PiDiNet network).

Each metric's ``against`` says what it compares the generated images with: "image" (the real image) or the
name of the control modality whose map it reads.

Every metric is a torchmetrics ``Metric`` (sums over batches and processes); an annotator is any callable
from a uint8 (H, W, 3) image to a map, as the data layer's (``datamodules.annotators``).

Legend: B batch, H W image size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_f1_score, multiclass_jaccard_index
from torchmetrics.functional.image import structural_similarity_index_measure

from datamodules.annotators import CannyAnnotator, SketchAnnotator, annotate


def to_uint8(images_B3HW: torch.Tensor) -> list[np.ndarray]:
    """Images in [0, 1] -> uint8 (H, W, 3) arrays, as annotators take them."""
    arr = (images_B3HW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [np.ascontiguousarray(a) for a in arr.permute(0, 2, 3, 1).numpy()]


def annotate_batch(annotator, images_B3HW: torch.Tensor, modality: str) -> torch.Tensor:
    """Run an annotator over a batch of images in [0, 1]: (B, H, W) maps (float; int64 for segmentation)."""
    maps = [annotate(annotator, img, modality) for img in to_uint8(images_B3HW)]
    return torch.from_numpy(np.stack(maps))


class EdgeF1(Metric):
    """Mean per-image F1 of Canny(generated) against Canny(real); thresholds as ControlNet's (100, 200)."""

    full_state_update = False
    higher_is_better = True
    against = "image"

    def __init__(self, low: float = 100, high: float = 200):
        super().__init__()
        self.canny = CannyAnnotator(low, high)
        self.add_state("f1_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, real_B3HW: torch.Tensor) -> None:
        pred = annotate_batch(self.canny, generated_B3HW, "edges") > 0
        target = annotate_batch(self.canny, real_B3HW, "edges") > 0
        for p, t in zip(pred, target):
            # an image without edges in either map agrees perfectly (torchmetrics would give 0)
            f1 = 1.0 if not (p.any() or t.any()) else binary_f1_score(p.flatten().int(), t.flatten().int())
            self.f1_sum += float(f1)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.f1_sum / self.count.clamp_min(1)).float()


class DepthRMSE(Metric):
    """Mean per-image RMSE (0-255 scale) between depth(generated) and the control depth map ([0, 1])."""

    full_state_update = False
    higher_is_better = False
    against = "depth"

    def __init__(self, annotator):
        super().__init__()
        self.annotator = annotator
        self.add_state("rmse_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, depth_B1HW: torch.Tensor) -> None:
        pred = annotate_batch(self.annotator, generated_B3HW, "depth").double() * 255  # min-max per image
        target = depth_B1HW[:, 0].detach().double().cpu() * 255
        self.rmse_sum += (pred - target).pow(2).mean(dim=(1, 2)).sqrt().sum()
        self.count += len(pred)

    def compute(self) -> torch.Tensor:
        return (self.rmse_sum / self.count.clamp_min(1)).float()


class SegmentationMIoU(Metric):
    """Mean per-image IoU over the classes present, between segment(generated) and the control ids."""

    full_state_update = False
    higher_is_better = True
    against = "segmentation"

    def __init__(self, annotator, num_classes: int):
        super().__init__()
        self.annotator, self.num_classes = annotator, num_classes
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, ids_B1HW: torch.Tensor) -> None:
        pred = annotate_batch(self.annotator, generated_B3HW, "segmentation").clamp(0, self.num_classes - 1)
        target = ids_B1HW[:, 0].detach().long().cpu()
        for p, t in zip(pred, target):
            # macro average over the classes present in either map
            miou = multiclass_jaccard_index(p[None], t[None], self.num_classes, average="macro")
            self.iou_sum += float(miou)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.iou_sum / self.count.clamp_min(1)).float()


class SketchSSIM(Metric):
    """Mean per-image SSIM (Gaussian window 11, sigma 1.5, data range 1) between sketch(generated) and
    sketch(real), maps in [0, 1]."""

    full_state_update = False
    higher_is_better = True
    against = "image"

    def __init__(self, annotator=None):
        super().__init__()
        self.annotator = annotator if annotator is not None else SketchAnnotator()
        self.add_state("ssim_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, real_B3HW: torch.Tensor) -> None:
        pred = annotate_batch(self.annotator, generated_B3HW, "sketch").float()[:, None]
        target = annotate_batch(self.annotator, real_B3HW, "sketch").float()[:, None]
        ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
        self.ssim_sum += ssim.double().sum()
        self.count += len(pred)

    def compute(self) -> torch.Tensor:
        return (self.ssim_sum / self.count.clamp_min(1)).float()


def build_control_metrics(
    modalities: tuple[str, ...],
    annotators: Mapping[str, Any] | None,
    num_segments: int,
    edge_thresholds: tuple[float, float] = (100, 200),
) -> dict[str, Metric]:
    """The metrics that can be computed for ``modalities``: edges always (Canny at ``edge_thresholds``),
    sketch always (the XDoG annotator unless ``annotators`` names one), depth and segmentation only with an
    annotator in ``annotators`` (``model.metric_annotators.<modality>``, configured as ``data.annotators``:
    a ``_target_`` node, e.g. ``datamodules.TorchScriptAnnotator``)."""
    annotators = dict(annotators or {})
    unknown = sorted(set(annotators) - {"depth", "segmentation", "sketch"})
    if unknown:
        raise ValueError(
            f"model.metric_annotators takes depth, segmentation and sketch, found {unknown} (edges use "
            "Canny: model.scores.edge_thresholds)"
        )
    metrics: dict[str, Metric] = {}
    if "edges" in modalities:
        metrics["edges_f1"] = EdgeF1(*edge_thresholds)
    if "depth" in modalities and annotators.get("depth") is not None:
        metrics["depth_rmse"] = DepthRMSE(annotators["depth"])
    if "segmentation" in modalities and annotators.get("segmentation") is not None:
        metrics["segmentation_miou"] = SegmentationMIoU(annotators["segmentation"], num_segments)
    if "sketch" in modalities:
        metrics["sketch_ssim"] = SketchSSIM(annotators.get("sketch"))
    return metrics
