"""Control metrics (varctl/metrics/control.py) on images whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from varctl.metrics.control import DepthRMSE, EdgeF1, SegmentationMIoU, build_control_metrics


def squares(B: int = 2, size: int = 32, offset: int = 0) -> torch.Tensor:
    """White squares on black, in [0, 1]: sharp edges Canny finds."""
    x = torch.zeros(B, 3, size, size)
    x[:, :, 8 + offset : 24 + offset, 8:24] = 1.0
    return x


def grey_depth(image: np.ndarray) -> np.ndarray:
    """A stand-in depth model: brightness."""
    return image.mean(axis=2)


def threshold_segmenter(image: np.ndarray) -> np.ndarray:
    """A stand-in segmenter: id 1 where the image is bright."""
    return (image.mean(axis=2) > 127).astype(np.int64)


def test_edge_f1_values():
    same = EdgeF1()
    same.update(squares(), squares())
    assert same.compute().item() == pytest.approx(1.0)
    blank = EdgeF1()
    blank.update(torch.zeros(2, 3, 32, 32), squares())  # no edges predicted: F1 0
    assert blank.compute().item() == 0.0
    empty = EdgeF1()
    empty.update(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))  # nothing to find, nothing found
    assert empty.compute().item() == 1.0
    shifted = EdgeF1()
    shifted.update(squares(offset=4), squares())  # vertical sides overlap in part, horizontal ones do not
    assert 0.2 < shifted.compute().item() < 0.8


def test_edge_f1_averages_per_image():
    metric = EdgeF1()
    metric.update(torch.cat([squares(1), torch.zeros(1, 3, 32, 32)]), squares(2))
    assert metric.compute().item() == pytest.approx(0.5)


def test_depth_rmse_against_a_known_annotator():
    metric = DepthRMSE(grey_depth)
    images = squares(1)
    target = torch.zeros(1, 1, 32, 32)
    target[..., 8:24, 8:24] = 1.0
    metric.update(images, target)
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-4)
    off = DepthRMSE(grey_depth)
    off.update(images, torch.zeros(1, 1, 32, 32))  # a quarter of the pixels wrong by 255
    assert off.compute().item() == pytest.approx(255 * 0.5, rel=1e-4)


def test_segmentation_miou_against_a_known_annotator():
    target = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    target[..., 8:24, 8:24] = 1
    metric = SegmentationMIoU(threshold_segmenter, num_classes=4)
    metric.update(squares(1), target)
    assert metric.compute().item() == pytest.approx(1.0)
    half = SegmentationMIoU(threshold_segmenter, num_classes=4)
    shifted = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    shifted[..., 16:32, 8:24] = 1  # overlaps the square in 8 of its 16 rows
    half.update(squares(1), shifted)
    # class 1: IoU 128 / 384; class 0: (1024 - 384) / (1024 - 128); averaged over the two classes present
    assert half.compute().item() == pytest.approx((128 / 384 + 640 / 896) / 2, rel=1e-5)


def test_build_control_metrics_only_what_can_be_computed():
    assert set(build_control_metrics(("edges", "depth"), None, 16)) == {"edges_f1"}
    built = build_control_metrics(
        ("edges", "depth", "segmentation"),
        {
            "depth": grey_depth,
            "segmentation": threshold_segmenter,
        },
        16,
    )
    assert set(built) == {"edges_f1", "depth_rmse", "segmentation_miou"}
    with pytest.raises(ValueError, match=r"model\.metric_annotators takes depth, segmentation and sketch"):
        build_control_metrics(("edges",), {"edges": grey_depth}, 16)
