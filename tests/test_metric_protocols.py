"""Known answers of the evaluation protocols (varctl/metrics/control.py, reconstruction.py): each expected
value is derived in the comment beside it, not read off the code's output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from varctl.metrics.control import (
    EDGE_PROTOCOLS,
    PROTOCOLS,
    EdgeF1,
    SegmentationMIoU,
    SketchSSIM,
    build_control_metrics,
)
from varctl.metrics.reconstruction import reconstruction_metrics


def square(top: int = 8, left: int = 8, side: int = 16, size: int = 32, rim: bool = False) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1], black with a white square of ``side`` px at (top, left). With ``rim``, an
    anti-aliased square: 252 * s(r) * s(c) / 255 with s = 1/2 on its outermost ring and 1 inside (ring 126,
    ring corners 63), so every step has one steepest pixel and no detector meets a tie."""
    s_r, s_c = torch.zeros(size), torch.zeros(size)
    for s, start in ((s_r, top), (s_c, left)):
        s[start : start + side] = 1.0
        if rim:
            s[start] = s[start + side - 1] = 0.5
    level = 252 if rim else 255
    return (torch.outer(s_r, s_c) * level).round().div(255).expand(1, 3, size, size).clone()


def f1_of(protocol: str, generated: torch.Tensor, real: torch.Tensor) -> float:
    metric = EdgeF1(protocol)
    metric.update(generated, real)
    return metric.compute().item()


@pytest.mark.parametrize("protocol", EDGE_PROTOCOLS)
def test_edge_f1_identical_disjoint_and_empty(protocol):
    # identical maps with edges: TP = |pred| = |target| > 0, F1 = 1
    assert f1_of(protocol, square(), square()) == 1.0
    # each edge pixel lies within 1 px of its square's outline; squares 8 px apart share none: TP = 0, F1 = 0
    left, right = square(left=4, side=8), square(left=20, side=8)
    assert f1_of(protocol, left, right) == 0.0
    # no edge in either map: 2TP / (2TP + FP + FN) is 0 / 0, which sklearn (ControlAR) and torchmetrics
    # (ControlNet++) both give as 0
    black = torch.zeros(1, 3, 32, 32)
    assert f1_of(protocol, black, black) == 0.0


@pytest.mark.parametrize(("contrast", "expected"), [(19, (0, 0)), (20, (0, 1)), (50, (0, 1)), (51, (1, 1))])
def test_edge_f1_thresholds_of_each_detector(contrast, expected):
    # A vertical step from 0 to contrast / 255 across the full height, against itself: F1 1 if a detector
    # keeps any edge, else 0. OpenCV (L1 Sobel on uint8): the steepest pixel has 4 * contrast, and a chain
    # needs one pixel above the high threshold: 4c > 200 from c = 51 (at 50 all pixels are weak, none kept).
    # kornia: the 5-tap Gaussian (sigma 1) turns a unit step into u = .0545, .2987, .7013, .9455, so the
    # steepest pixel has 4 * (.7013 - .0545) = 2.587 per unit, above the high threshold 0.2 from c = 20
    # (2.587 * 20 / 255 = .203; at 19, .193).
    step = torch.zeros(1, 3, 32, 32)
    step[..., 16:] = contrast / 255
    assert tuple(f1_of(protocol, step, step) for protocol in EDGE_PROTOCOLS) == expected


def test_edge_f1_one_pixel_shift_of_a_sharp_square_controlar():
    # White square rows/cols 8..23 on black; the copy shifted right by 1 px. Away from the image border the
    # edge map of the shifted copy is the original's shifted by 1 px, so TP = the number of horizontally
    # adjacent edge pairs of the original and F1 = 2 TP / (2 |A|) = pairs / |A|.
    # OpenCV Sobel (3x3, L1): across each side the two pixels beside the step tie at 4 * 255 = 1020, and its
    # non-maximum suppression keeps the left (upper) one of a tie: left side col 7, right side col 23, top
    # row 7, bottom row 23. Corners, e.g. (8, 8): |gx| + |gy| = 765 + 765 = 1530, diagonal, beats (7, 7) = 510
    # and (9, 9) = 0; (7, 8) = 255 + 765 is vertical and loses to (8, 8); so the corner pixels are (8, 8),
    # (8, 23), (23, 8), (23, 23). Edges: row 7 cols 9..22 (14), row 8 two, rows 9..22 cols 7 and 23 (28), row
    # 23 cols 8..23 (16): |A| = 60; pairs: 13 in row 7 + 15 in row 23 = 28. F1 = 28 / 60 = 7 / 15.
    # (kornia, sharp square: the same pairs tie in exact arithmetic, but its float32 blur breaks each tie by
    # rounding, not by a rule, so no value is derived for it; the anti-aliased square below has no tie.)
    assert f1_of("controlar", square(left=9), square()) == pytest.approx(7 / 15, abs=1e-6)


@pytest.mark.parametrize("protocol", EDGE_PROTOCOLS)
def test_edge_f1_one_pixel_shift_of_an_antialiased_square(protocol):
    # square(rim=True) at rows/cols 8..23 (ring at 8 and 23), shifted right by 1 px: F1 = pairs / |A| (above).
    # The image is separable, 252 s(r) s(c), and so are both Sobel components.
    # controlar (OpenCV, per 252): gx = sig(r) d(c), gy = d(r) sig(c) with d = s(c+1) - s(c-1) = .5, 1, .5 at
    #   c = 7, 8, 9 and sig = s(r-1) + 2 s(r) + s(r+1) = .5, 2, 3.5, 4 at r = 7, 8, 9, >= 10. Along each side
    #   the ring (d = 1) is the unique maximum. Corner (8, 8): 2 + 2 = 4, diagonal, beats (9, 9) = 3.5 and
    #   (7, 7) = .5; (8, 9): 1 + 3.5 = 4.5, vertical, beats (7, 9) = 2 and (9, 9) = 3.5. So A = the whole
    #   ring: rows 8 and 23 (16 each) + cols 8 and 23 on rows 9..22 (14 each) = 60; pairs 15 + 15 = 30.
    # controlnetpp (kornia: 5-tap Gaussian sigma 1 = .0545 .2442 .4026 .2442 .0545, Sobel, L2): the blurred
    #   profile u(5..11) = 0 .0273 .1766 .5 .8234 .9727 1; D(c) = u(c+1) - u(c-1) = .1766 .4727 .6468 .4727
    #   .1766 at c = 6..10; S(r) = u(r-1) + 2u(r) + u(r+1) = .8805 2 3.1196 3.7689 4 at r = 7..10, >= 12;
    #   gx = S(r) D(c), gy = D(r) S(c). Sides: the ring (D = .6468) again. Corner (8, 8): gx = gy = 1.294,
    #   |g| = 1.829, diagonal, loses to (9, 9) (gx = gy = 1.475, |g| = 2.086), which beats (10, 10) (.941);
    #   (8, 9): gx = .945, gy = 2.018, 65 degrees -> the 45-degree diagonal, |g| = 2.228 beats (7, 8) = 1.104
    #   and (9, 10) = 1.865; (9, 8) the same. A = rows 8 and 23 cols 9..22 (14 each), rows 9 and 22 cols 8, 9,
    #   22, 23 (4 each), rows 10..21 cols 8 and 23 (24) = 60; pairs 13 + 13 + 2 + 2 = 30.
    # Both: F1 = 30 / 60 = 1 / 2.
    assert f1_of(protocol, square(left=9, rim=True), square(rim=True)) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("protocol", EDGE_PROTOCOLS)
def test_edge_f1_is_averaged_per_image_not_pooled(protocol):
    # image 1: identical anti-aliased squares of side 16: 60 edge pixels each (derived above), F1 = 1.
    # image 2: nothing generated against an anti-aliased square of side 10 (ring 9 px apart): 4 * 9 = 36 edge
    # pixels in either detector (the ring less what the corners change, as above), F1 = 0.
    # Per image then averaged (both protocols): (1 + 0) / 2 = 1/2. Pooled counts over the set would give
    # 2 * 60 / (2 * 60 + 0 + 36) = 10 / 13.
    generated = torch.cat([square(rim=True), torch.zeros(1, 3, 32, 32)])
    real = torch.cat([square(rim=True), square(side=10, rim=True)])
    assert f1_of(protocol, generated, real) == pytest.approx(0.5, abs=1e-6)
    # the counts the pooled value comes from
    edges = EdgeF1(protocol).edges(real)
    assert edges[0].sum().item() == 60 and edges[1].sum().item() == 36


def test_edge_protocols_are_named():
    assert EdgeF1().protocol == "controlar" and EdgeF1("controlnetpp").protocol == "controlnetpp"
    with pytest.raises(ValueError, match=r"one of controlar, controlnetpp; got 'canny'"):
        EdgeF1("canny")
    built = build_control_metrics(("edges", "sketch", "segmentation"), {"segmentation": np.zeros_like}, 4)
    assert set(built) == {"edges_f1", "edges_f1_controlnetpp", "sketch_ssim", "segmentation_miou"}
    built.update(build_control_metrics(("sketch",), None, 4, ms_ssim=True))
    for key, metric in built.items():  # every number carries its protocol's name and description
        assert PROTOCOLS[key].startswith(f"{metric.protocol}: "), key
    assert set(build_control_metrics(("edges",), None, 4, edge_protocols=("controlnetpp",))) == {
        "edges_f1_controlnetpp"
    }


def test_psnr_of_a_constant_offset_per_image():
    # y = x + d everywhere: MSE = d^2, PSNR = 10 log10(1 / d^2) = -20 log10 d: 20 dB for d = 0.1, 40 dB for
    # d = 0.01; per image then averaged: 30 dB (one MSE over both images: 10 log10(2 / 0.0101) = 22.97 dB)
    psnr = reconstruction_metrics(1, 2)["psnr"]
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    y = x + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    psnr.update(y, x)
    assert psnr.compute().item() == pytest.approx(30.0, abs=1e-3)
    assert -20 * math.log10(0.1) == pytest.approx(20.0)


def test_ssim_identical_and_constant_images():
    ssim = reconstruction_metrics(1, 2)["ssim"]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ssim.update(x, x)
    assert ssim.compute().item() == pytest.approx(1.0, abs=1e-6)
    # Constant images a, b: every window (torchmetrics pads by reflection, which keeps a constant, and
    # averages the map over all pixels) has means a, b and no variance, so SSIM = (2ab + C1) / (a^2 + b^2 +
    # C1) * C2 / C2 with C1 = (0.01 * 1)^2: a = .01, b = .02 -> 5e-4 / 6e-4 = 5/6 (4/5 without C1);
    # a = 0, b = .1 -> 1e-4 / 0.0101 = 1/101. Per image then averaged.
    ssim = reconstruction_metrics(1, 2)["ssim"]
    a = torch.tensor([0.01, 0.0]).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    b = torch.tensor([0.02, 0.1]).view(2, 1, 1, 1).expand(2, 3, 32, 32)
    ssim.update(a, b)
    assert ssim.compute().item() == pytest.approx((5 / 6 + 1 / 101) / 2, rel=1e-5)


def constant_sketch(image: np.ndarray) -> np.ndarray:
    """A stand-in sketch network: the map is the image's first pixel everywhere."""
    return np.full(image.shape[:2], image[0, 0, 0] / 255.0, np.float32)


def test_sketch_ms_ssim_known_answers():
    gen, real = torch.full((1, 3, 176, 176), 3 / 255), torch.full((1, 3, 176, 176), 5 / 255)
    # constant maps a = 3/255, b = 5/255 (dark: float32's E[x^2] - E[x]^2 stays far below C2): at every scale
    # the contrast-structure term is C2 / C2 = 1 and the luminance l = (2ab + C1) / (a^2 + b^2 + C1) =
    # (30 + 6.5025) / (34 + 6.5025) with C1 = 1e-4 = 6.5025 / 255^2; MS-SSIM = l ** 0.1333 (the last of Wang
    # et al.'s betas, on the last scale's SSIM; the others weigh contrast terms of 1), single-scale SSIM = l
    luminance = 36.5025 / 40.5025
    ms, single = SketchSSIM(constant_sketch, ms_ssim=True), SketchSSIM(constant_sketch)
    for metric in (ms, single):
        metric.update(gen, real)
    assert ms.compute().item() == pytest.approx(luminance**0.1333, rel=1e-5)
    assert single.compute().item() == pytest.approx(luminance, rel=1e-5)
    same = SketchSSIM(ms_ssim=True)  # the XDoG strokes of a square, against themselves
    same.update(square(size=176, side=100), square(size=176, side=100))
    assert same.compute().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match=r"at least 176 px a side, got 64x64; below that use ms_ssim=false"):
        SketchSSIM(ms_ssim=True).update(torch.zeros(1, 3, 64, 64), torch.zeros(1, 3, 64, 64))


def fixed_segmenter(ids: list[list[int]]):
    """A stand-in segmenter that answers ``ids`` whatever the image."""
    return lambda image: np.array(ids, np.int64)


TARGET = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 1, 1], [2, 2, 2, 2]]
PRED = [[1, 0, 1, 1], [0, 0, 1, 3], [2, 1, 1, 1], [2, 2, 2, 2]]


def miou(pred, target, num_classes: int, ignore_index: int | None = None) -> float:
    metric = SegmentationMIoU(fixed_segmenter(pred), num_classes, ignore_index)
    ids = torch.tensor(target)[None, None]  # (1, 1, H, W)
    metric.update(torch.zeros(1, 3, *ids.shape[-2:]), ids)
    return metric.compute().item()


def test_segmentation_miou_known_answers():
    # per class, intersection / union of TARGET and PRED:
    #   0: both at (0,1) (1,0) (1,1): 3 / (4 + 3 - 3) = 3/4      1: 5 / (6 + 7 - 5) = 5/8
    #   2: 5 / (6 + 5 - 5) = 5/6                                 3: predicted once, never true: 0 / 1 = 0
    # macro over the 4 classes present: (3/4 + 5/8 + 5/6 + 0) / 4 = 53/96, with 6 classes as with 4 (4, 5 are
    # in neither map; counting them would give 53/144)
    assert miou(PRED, TARGET, 4) == pytest.approx(53 / 96, rel=1e-6)
    assert miou(PRED, TARGET, 6) == pytest.approx(53 / 96, rel=1e-6)
    # ignore_index 0: the 4 pixels whose true id is 0 go, and class 0 with them; on the 12 left
    #   1: 5 / (6 + 6 - 5) = 5/7   2: 5 / (6 + 5 - 5) = 5/6   3: 0 / 1 = 0   -> (5/7 + 5/6 + 0) / 3 = 65/126
    assert miou(PRED, TARGET, 4, ignore_index=0) == pytest.approx(65 / 126, rel=1e-6)
    # a kept pixel predicted as the ignored id counts against its true class: class 1 2 / 3, not 1
    assert miou([[1, 0], [1, 1]], [[0, 1], [1, 1]], 2, ignore_index=0) == pytest.approx(2 / 3, rel=1e-6)


def test_segmentation_miou_skips_images_that_are_all_ignored():
    metric = SegmentationMIoU(fixed_segmenter([[1, 1], [1, 0]]), 2, ignore_index=0)
    ids = torch.tensor([[[1, 1], [1, 1]], [[0, 0], [0, 0]]]).view(2, 1, 2, 2)
    metric.update(torch.zeros(2, 3, 2, 2), ids)
    # image 1: class 1 true everywhere, predicted on 3 of 4 pixels: 3/4; image 2 has nothing to score
    assert metric.compute().item() == pytest.approx(3 / 4, rel=1e-6)
