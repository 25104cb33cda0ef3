"""How well generated images follow their control maps, each under a named protocol (``PROTOCOLS``).

- edges: F1 between the Canny edges of the generated image and those of the real image, the same detector
  on both, exact pixel match, per image then averaged; two detectors, as the published code runs them:
  ``controlar`` (ControlAR, hustvl/ControlAR ``autoregressive/test/metric.py``: OpenCV Canny 100/200 on the
  uint8 image, maps > 128, sklearn's ``f1_score``; SCALAR Table 1 "Canny F1") and ``controlnetpp``
  (ControlNet++, liming-ai/ControlNet_Plus_Plus ``eval/eval.py`` + ``eval_edge.py``: kornia's Canny 0.1/0.2
  on the image in [0, 1], torchmetrics' binary F1 per condition, averaged over conditions; varctl draws one
  sample per control map, so per image).
- depth: RMSE on the 0-255 scale between the depth annotator's map of the generated image (min-max per image)
  and the control depth map (ControlAR), only with a depth annotator configured: there is no built-in model.
- segmentation: mean IoU between the segmenter's ids on the generated image and the control ids, only with
  a segmentation annotator configured; ``ignore_index`` leaves out unlabelled pixels (ADE20K: id 0).
- sketch: SSIM, or MS-SSIM as ControlNet++ scores HED maps, between the sketch annotator's maps of the
  generated and of the real image, the same annotator on both (the built-in XDoG line drawing, or a user's HED
  / PiDiNet network).

Each metric's ``against`` says what it compares the generated images with: "image" (the real image) or the
name of the control modality whose map it reads; its ``protocol`` names the protocol, which ``PROTOCOLS``
describes under the metric's key (for the results files).

Every metric is a torchmetrics ``Metric`` (sums over batches and processes); an annotator is any callable
from a uint8 (H, W, 3) image to a map, as the data layer's (``datamodules.annotators``).

Legend: B batch, H W image size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from kornia.filters import canny
from torchmetrics import Metric
from torchmetrics.functional.classification import multiclass_jaccard_index
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)

from datamodules.annotators import CannyAnnotator, SketchAnnotator, annotate

EDGE_PROTOCOLS = ("controlar", "controlnetpp")

# what each number that build_control_metrics returns means, by key: "<protocol>: <how it is computed>"
PROTOCOLS = {
    "edges_f1": (
        "controlar: OpenCV Canny 100/200 on the uint8 RGB image (per pixel the channel of largest gradient), "
        "maps > 128, exact pixel match, F1 per image as sklearn's f1_score (0 when neither map has an edge), "
        "averaged over images"
    ),
    "edges_f1_controlnetpp": (
        "controlnetpp: kornia canny (low 0.1, high 0.2, 5x5 Gaussian, sigma 1, hysteresis) on the RGB image "
        "in [0, 1] at uint8 levels (kornia's grey), edges > 0, exact pixel match, binary F1 per image as "
        "torchmetrics' (0 when neither map has an edge), averaged over images"
    ),
    "depth_rmse": (
        "controlar: RMSE on the 0-255 scale between the depth annotator's map of the generated image "
        "(min-max per image, larger = nearer) and the control depth map, per image, averaged over images"
    ),
    "segmentation_miou": (
        "per-image: IoU per class between the segmenter's ids on the generated image and the control ids, "
        "averaged over the classes present in either map (pixels whose control id is ignore_index left out, "
        "and that class), per image, averaged over images"
    ),
    "sketch_ssim": (
        "ssim: SSIM (Gaussian window 11, sigma 1.5, data range 1) between the sketch maps of the generated "
        "and of the real image, per image, averaged over images"
    ),
    "sketch_ms_ssim": (
        "controlnetpp: torchmetrics MS-SSIM (5 scales, Wang et al.'s betas, Gaussian window 11, sigma 1.5, "
        "data range 1, relu) between the sketch maps of the generated and of the real image, per image, "
        "averaged over images; maps of at least 176 px a side"
    ),
}


def to_uint8(images_B3HW: torch.Tensor) -> list[np.ndarray]:
    """Images in [0, 1] -> uint8 (H, W, 3) arrays, as annotators take them."""
    arr = (images_B3HW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [np.ascontiguousarray(a) for a in arr.permute(0, 2, 3, 1).numpy()]


def annotate_batch(annotator, images_B3HW: torch.Tensor, modality: str) -> torch.Tensor:
    """Run an annotator over a batch of images in [0, 1]: (B, H, W) maps (float; int64 for segmentation)."""
    maps = [annotate(annotator, img, modality) for img in to_uint8(images_B3HW)]
    return torch.from_numpy(np.stack(maps))


class EdgeF1(Metric):
    """Mean per-image F1 of Canny(generated) against Canny(real), with the detector of ``protocol``."""

    full_state_update = False
    higher_is_better = True
    against = "image"

    def __init__(self, protocol: str = "controlar"):
        super().__init__()
        if protocol not in EDGE_PROTOCOLS:
            raise ValueError(f"edge F1 protocol must be one of {', '.join(EDGE_PROTOCOLS)}; got {protocol!r}")
        self.protocol = protocol
        self.add_state("f1_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def edges(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool edge maps of images in [0, 1]."""
        if self.protocol == "controlar":
            # cv2.Canny on all three channels keeps, per pixel, the channel of largest gradient; ControlAR
            # thresholds the 0/255 maps at 128
            return annotate_batch(CannyAnnotator(100, 200), images_B3HW, "edges") > 128
        # ControlNet++ runs kornia on its PNG samples / 255: the same uint8 levels. In float32 outside any
        # autocast, as its eval.py: under bf16 the blur and the ties of non-maximum suppression would move.
        x = (images_B3HW.detach().float().clamp(0, 1) * 255).round() / 255
        with torch.autocast(x.device.type, enabled=False):
            _, edges = canny(x, 0.1, 0.2, (5, 5), (1.0, 1.0), hysteresis=True)
        return edges[:, 0] > 0

    def update(self, generated_B3HW: torch.Tensor, real_B3HW: torch.Tensor) -> None:
        pred, target = self.edges(generated_B3HW), self.edges(real_B3HW)
        tp = (pred & target).sum(dim=(1, 2)).double()
        wrong = (pred ^ target).sum(dim=(1, 2)).double()  # FP + FN
        # F1 = 2TP / (2TP + FP + FN); 0 where neither map has an edge (sklearn's and torchmetrics' default)
        f1 = 2 * tp / (2 * tp + wrong).clamp_min(1)
        self.f1_sum += f1.sum().to(self.f1_sum)
        self.count += len(f1)

    def compute(self) -> torch.Tensor:
        return (self.f1_sum / self.count.clamp_min(1)).float()


class DepthRMSE(Metric):
    """Mean per-image RMSE (0-255 scale) between depth(generated) and the control depth map ([0, 1])."""

    full_state_update = False
    higher_is_better = False
    against = "depth"
    protocol = "controlar"

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
    """Mean per-image IoU over the classes present in either map, between segment(generated) and the control
    ids; pixels whose control id is ``ignore_index`` are left out (ADE20K: 150 classes, ids 1-150, 0 ignored).

    torchmetrics' macro average gives a class absent from both maps weight 0 and, for an ``ignore_index`` in
    [0, num_classes), that class too; a kept pixel predicted as the ignored id counts against its true class.
    An image whose pixels are all ignored is not counted.
    """

    full_state_update = False
    higher_is_better = True
    against = "segmentation"
    protocol = "per-image"

    def __init__(self, annotator, num_classes: int, ignore_index: int | None = None):
        super().__init__()
        self.annotator, self.num_classes, self.ignore_index = annotator, num_classes, ignore_index
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, ids_B1HW: torch.Tensor) -> None:
        pred = annotate_batch(self.annotator, generated_B3HW, "segmentation").clamp(0, self.num_classes - 1)
        target = ids_B1HW[:, 0].detach().long().cpu()
        for p, t in zip(pred, target):
            if self.ignore_index is not None and bool((t == self.ignore_index).all()):
                continue
            miou = multiclass_jaccard_index(
                p[None], t[None], self.num_classes, average="macro", ignore_index=self.ignore_index
            )
            self.iou_sum += float(miou)
            self.count += 1

    def compute(self) -> torch.Tensor:
        return (self.iou_sum / self.count.clamp_min(1)).float()


# torchmetrics' MS-SSIM needs side // (scales - 1) ** 2 > window - 1: 176 px for 5 scales and an 11-px window
MS_SSIM_MIN_SIZE = 176


class SketchSSIM(Metric):
    """Mean per-image SSIM (Gaussian window 11, sigma 1.5, data range 1) between sketch(generated) and
    sketch(real), maps in [0, 1]; with ``ms_ssim`` torchmetrics' MS-SSIM with its defaults, as ControlNet++
    scores HED maps (5 scales: maps of at least ``MS_SSIM_MIN_SIZE`` px a side, else a ValueError)."""

    full_state_update = False
    higher_is_better = True
    against = "image"

    def __init__(self, annotator=None, ms_ssim: bool = False):
        super().__init__()
        self.annotator = annotator if annotator is not None else SketchAnnotator()
        self.ms_ssim = ms_ssim
        self.protocol = "controlnetpp" if ms_ssim else "ssim"
        self.add_state("ssim_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, generated_B3HW: torch.Tensor, real_B3HW: torch.Tensor) -> None:
        pred = annotate_batch(self.annotator, generated_B3HW, "sketch").float()[:, None]
        target = annotate_batch(self.annotator, real_B3HW, "sketch").float()[:, None]
        if not self.ms_ssim:
            ssim = structural_similarity_index_measure(pred, target, data_range=1.0, reduction="none")
        elif min(pred.shape[-2:]) < MS_SSIM_MIN_SIZE:
            raise ValueError(
                f"sketch MS-SSIM (5 scales, 11-px window, as ControlNet++) needs maps of at least "
                f"{MS_SSIM_MIN_SIZE} px a side, got {pred.shape[-2]}x{pred.shape[-1]}; below that use "
                "ms_ssim=false (single-scale SSIM)"
            )
        else:
            ssim = multiscale_structural_similarity_index_measure(
                pred, target, data_range=1.0, reduction="none", normalize="relu"
            )
        self.ssim_sum += ssim.double().sum().to(self.ssim_sum)
        self.count += len(pred)

    def compute(self) -> torch.Tensor:
        return (self.ssim_sum / self.count.clamp_min(1)).float()


def build_control_metrics(
    modalities: tuple[str, ...],
    annotators: Mapping[str, Any] | None,
    num_segments: int,
    edge_protocols: tuple[str, ...] = EDGE_PROTOCOLS,
    ignore_index: int | None = None,
    ms_ssim: bool = False,
) -> dict[str, Metric]:
    """The metrics that can be computed for ``modalities``, by key (``PROTOCOLS`` describes each): edges
    always, one F1 per protocol of ``edge_protocols`` (``edges_f1`` for controlar, ``edges_f1_<protocol>``
    for the others); sketch always (the XDoG annotator unless ``annotators`` names one; ``sketch_ms_ssim``
    with ``ms_ssim``); depth and segmentation (mIoU over ``num_segments`` ids, ``ignore_index`` left out)
    only with an annotator in ``annotators`` (``model.metric_annotators.<modality>``, configured as
    ``data.annotators``: a ``_target_`` node, e.g. ``datamodules.TorchScriptAnnotator``)."""
    annotators = dict(annotators or {})
    unknown = sorted(set(annotators) - {"depth", "segmentation", "sketch"})
    if unknown:
        raise ValueError(
            f"model.metric_annotators takes depth, segmentation and sketch, found {unknown} (edges use the "
            f"Canny detector of each edge protocol: {', '.join(EDGE_PROTOCOLS)})"
        )
    metrics: dict[str, Metric] = {}
    if "edges" in modalities:
        for protocol in edge_protocols:
            metrics["edges_f1" if protocol == "controlar" else f"edges_f1_{protocol}"] = EdgeF1(protocol)
    if "depth" in modalities and annotators.get("depth") is not None:
        metrics["depth_rmse"] = DepthRMSE(annotators["depth"])
    if "segmentation" in modalities and annotators.get("segmentation") is not None:
        metrics["segmentation_miou"] = SegmentationMIoU(
            annotators["segmentation"], num_segments, ignore_index
        )
    if "sketch" in modalities:
        metrics["sketch_ms_ssim" if ms_ssim else "sketch_ssim"] = SketchSSIM(
            annotators.get("sketch"), ms_ssim
        )
    return metrics
