"""Control metrics (varctl/metrics/control.py) on images whose answers are known."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from datamodules import annotate
from datamodules.annotators import TransformersDepthAnnotator
from varctl.metrics.control import EDGE_PROTOCOLS, DepthRMSE, EdgeF1, SegmentationMIoU, build_control_metrics


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


@pytest.mark.parametrize("protocol", EDGE_PROTOCOLS)
def test_edge_f1_values(protocol):
    same = EdgeF1(protocol)
    same.update(squares(), squares())
    assert same.compute().item() == pytest.approx(1.0)
    blank = EdgeF1(protocol)
    blank.update(torch.zeros(2, 3, 32, 32), squares())  # no edges predicted: F1 0
    assert blank.compute().item() == 0.0
    empty = EdgeF1(protocol)
    empty.update(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))  # no edge in either map: 0 (sklearn)
    assert empty.compute().item() == 0.0
    shifted = EdgeF1(protocol)
    shifted.update(squares(offset=4), squares())  # vertical sides overlap in part, horizontal ones do not
    assert 0.2 < shifted.compute().item() < 0.8


@pytest.mark.parametrize("protocol", EDGE_PROTOCOLS)
def test_edge_f1_averages_per_image(protocol):
    metric = EdgeF1(protocol)
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
    assert set(build_control_metrics(("edges", "depth"), None, 16)) == {"edges_f1", "edges_f1_controlnetpp"}
    built = build_control_metrics(
        ("edges", "depth", "segmentation"),
        {
            "depth": grey_depth,
            "segmentation": threshold_segmenter,
        },
        16,
    )
    assert set(built) == {"edges_f1", "edges_f1_controlnetpp", "depth_rmse", "segmentation_miou"}
    with pytest.raises(ValueError, match=r"model\.metric_annotators takes depth, segmentation and sketch"):
        build_control_metrics(("edges",), {"edges": grey_depth}, 16)


def test_transformers_depth_annotator_on_a_tiny_random_dpt(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DPTConfig(
        hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32, image_size=32,
        patch_size=8, backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
        head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5], initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.DPTForDepthEstimation(config).save_pretrained(tmp_path)
    transformers.DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    annotator = TransformersDepthAnnotator(str(tmp_path))
    image = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    raw = annotator(image)  # the model's relative inverse depth at its own size (the head doubles 32 px)
    assert raw.shape == (1, 64, 64) and float(raw.max()) > float(raw.min())
    depth = annotate(annotator, image, "depth")
    assert depth.shape == (40, 48) and depth.dtype == np.float32
    assert depth.min() == 0.0 and depth.max() == pytest.approx(1.0)
    # the convention of every depth annotator: bilinear to the image size, then min-max per image
    resized = torch.nn.functional.interpolate(raw[None], size=(40, 48), mode="bilinear", align_corners=False)
    resized = resized[0, 0].numpy()
    expected = (resized - resized.min()) / (resized.max() - resized.min())
    np.testing.assert_allclose(depth, expected, atol=1e-6)
    metric = DepthRMSE(annotator)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    metric.update(batch, torch.from_numpy(depth)[None, None])
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-3)


def test_transformers_depth_annotator_errors(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    key = r"data\.annotators\.depth\.path or model\.metric_annotators\.depth\.path"
    with pytest.raises(FileNotFoundError, match=rf"{key}: no model folder {tmp_path}/dpt"):
        TransformersDepthAnnotator(str(tmp_path / "dpt"))
    with pytest.raises(FileNotFoundError, match=r"lacks config\.json, preprocessor_config\.json"):
        TransformersDepthAnnotator(str(tmp_path))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(ImportError, match=rf"\({key}: .*\) needs the transformers package"):
        TransformersDepthAnnotator(str(tmp_path))


def test_segmentation_scores_channels_first_or_last_become_the_same_ids():
    """An annotator's class scores (C, h, w) or (h, w, C), at the image's size or a scaled one, give the same
    ids (channels-last scores had their height taken for the classes: all ids 0); scores with no axes of the
    image's aspect are refused by shape."""
    image = np.zeros((48, 64, 3), np.uint8)
    ids = np.random.default_rng(0).integers(0, 5, (48, 64))
    scores = np.eye(5, dtype=np.float32)[ids]  # (48, 64, 5), one-hot
    first = annotate(lambda _: scores.transpose(2, 0, 1), image, "segmentation")
    last = annotate(lambda _: scores, image, "segmentation")
    assert np.array_equal(first, ids) and np.array_equal(last, ids)
    small = np.eye(5, dtype=np.float32)[ids[::4, ::4]]  # (12, 16, 5): resized to the image, nearest
    upscaled = np.repeat(np.repeat(ids[::4, ::4], 4, axis=0), 4, axis=1)
    assert np.array_equal(annotate(lambda _: small, image, "segmentation"), upscaled)
    with pytest.raises(ValueError, match=r"segmentation annotator returned scores of shape \(5, 3, 9\)"):
        annotate(lambda _: np.zeros((5, 3, 9), np.float32), image, "segmentation")
