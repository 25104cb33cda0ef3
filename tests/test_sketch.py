"""The sketch modality: XDoG line drawings of photos, soft outlines of the built-in scenes, sketch files
(either polarity), SSIM scoring (the control branch on sketches: test_control_module.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ALL, save, textured
from PIL import Image

from datamodules import ControlPairsDataModule, SketchAnnotator, SyntheticDataModule, annotate
from datamodules.scenes import edges_from_layers, sketch_from_layers
from datamodules.transforms import load_map
from varctl.metrics.control import SketchSSIM, build_control_metrics


def step_image(dark: int = 40, light: int = 200, size: int = 32, at: int = 16) -> np.ndarray:
    """uint8 RGB: light left of column `at`, dark from it on (one vertical edge)."""
    img = np.full((size, size, 3), light, np.uint8)
    img[:, at:] = dark
    return img


def as_batch(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


def test_sketch_annotator_draws_strokes_on_the_dark_side_of_edges_only():
    sketch = annotate(SketchAnnotator(), step_image(), "sketch")
    assert sketch.dtype == np.float32 and sketch.shape == (32, 32)
    assert 0.0 <= sketch.min() and sketch.max() <= 1.0
    row = sketch[16]
    assert row[16] > 0.9 and row[17] > 0.9  # the first dark columns are the stroke
    assert row[:15].max() == 0.0 and row[20:].max() == 0.0  # flat regions on both sides are blank
    flat = annotate(SketchAnnotator(), np.full((32, 32, 3), 90, np.uint8), "sketch")
    assert flat.max() == 0.0
    # the stroke darkens with the contrast, and a faint edge under epsilon draws nothing
    faint = annotate(SketchAnnotator(), step_image(dark=180, light=190), "sketch")
    weak = annotate(SketchAnnotator(), step_image(dark=150, light=200), "sketch")
    assert faint.max() == 0.0 < weak.max() < sketch.max()
    with pytest.raises(ValueError, match=r"sketch annotator needs sigma > 0, k > 1"):
        SketchAnnotator(k=1.0)


def test_synthetic_sketch_is_the_soft_outline():
    layers = np.zeros((12, 12), np.int64)
    layers[3:9, 3:9] = 1
    sketch, edges = sketch_from_layers(layers), edges_from_layers(layers)
    assert sketch.dtype == np.float32
    assert sketch[edges == 1].min() >= 0.75 and sketch[3, 5] == 1.0  # on the outline
    assert sketch[2, 5] == 0.5 and sketch[4, 5] == 0.5  # one pixel beside a straight side
    assert sketch[:2].max() == 0.0 and sketch[5:7, 5:7].max() == 0.0  # away from every outline
    dm = SyntheticDataModule(num_train=4, num_val=4, controls=["sketch", "edges"], batch_size=2)
    dm.connect(32, ("image", "label", "control"))
    dm.setup("fit")
    sample = dm.dataset("train")[0]
    s, e = sample["control"]["sketch"], sample["control"]["edges"]
    assert s.dtype == torch.float32 and s.shape == (1, 32, 32)
    assert torch.all(s[e > 0] >= 0.5) and float(s.max()) == 1.0  # an isolated outline pixel: 0.5
    assert torch.all((s > 0) <= (torch.nn.functional.max_pool2d(e[None], 3, 1, 1)[0] > 0))


def test_sketch_files_of_either_polarity_and_depth(tmp_path):
    strokes = np.zeros((20, 20), np.uint8)
    strokes[:, 7] = 255
    strokes[:, 8] = 128
    save(tmp_path / "white_on_black.png", strokes)
    save(tmp_path / "black_on_white.png", 255 - strokes)  # as drawn with a pen on paper
    Image.fromarray(strokes.astype(np.uint16) * 257).save(tmp_path / "wide.png")  # 16-bit
    expected = strokes / 255.0
    for name in ("white_on_black", "black_on_white", "wide"):
        got = load_map(str(tmp_path / f"{name}.png"), "sketch")
        assert got.dtype == torch.float32 and got.shape == (1, 20, 20)
        np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-6, err_msg=name)


def test_sketch_ssim_known_answers():
    light = as_batch(step_image())
    same = SketchSSIM()
    same.update(light.repeat(2, 1, 1, 1), light.repeat(2, 1, 1, 1))
    assert same.compute().item() == pytest.approx(1.0, abs=1e-5)
    scores = []
    for shift in (1, 3, 6):  # the edge, hence the stroke, drawn further and further away
        moved = SketchSSIM()
        moved.update(as_batch(step_image(at=16 + shift)), light)
        scores.append(moved.compute().item())
    assert 1.0 > scores[0] > scores[1] > scores[2]
    blank = SketchSSIM()
    blank.update(torch.full_like(light, 0.5), light)  # no stroke at all
    assert blank.compute().item() < 0.9
    assert SketchSSIM.against == "image"

    def brightness(image: np.ndarray) -> np.ndarray:  # a user's "sketch network"
        return image.mean(axis=2) / 255

    built = build_control_metrics(("edges", "sketch"), {"sketch": brightness}, 16)
    assert set(built) == {"edges_f1", "edges_f1_controlnetpp", "sketch_ssim"}
    assert built["sketch_ssim"].annotator is brightness
    default = SketchSSIM()
    for metric in (built["sketch_ssim"], default):
        metric.update(light, 1 - light)
    # the user's maps (opposite brightness) disagree; the XDoG strokes of the two images are 1 px apart
    assert built["sketch_ssim"].compute().item() < 0.25 and default.compute().item() > 0.4


def test_pairs_compute_missing_sketches_with_xdog(tmp_path):
    for i, name in enumerate(("a", "b", "c")):
        save(tmp_path / "images" / f"{name}.png", textured(i))
    drawn = np.zeros((40, 40), np.uint8)
    drawn[:, 20] = 255
    save(tmp_path / "sketch" / "a.png", 255 - drawn)  # a pen drawing on paper for "a"; "b", "c" annotated
    dm = ControlPairsDataModule(
        str(tmp_path), controls=["sketch"], val_fraction=0.34, batch_size=1, resolution=40
    )
    dm.connect(40, ALL)
    seen = set()
    for split in ("train", "val"):
        for i, record in enumerate(dm.splits[split]):
            got = dm.dataset(split)[i]["control"]["sketch"][0].numpy()
            name = record.image.rsplit("/", 1)[-1][0]
            seen.add(name)
            if name == "a":
                np.testing.assert_allclose(got, drawn / 255.0, atol=1e-6)
            else:
                expected = annotate(SketchAnnotator(), textured("abc".index(name)), "sketch")
                np.testing.assert_allclose(got, expected, atol=1e-6)
                assert got.max() > 0.5  # the blocks' boundaries are drawn
    assert seen == {"a", "b", "c"}
