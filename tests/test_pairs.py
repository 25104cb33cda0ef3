"""Control pairs (images with edge / depth / segmentation maps or annotators): map files, annotators after
the crop, maps that stay exact through crop and flip, errors that name the setting."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import ALL, check_batch, fake_depth, save, textured, to_uint8
from hydra.utils import instantiate
from PIL import Image

from datamodules import MODALITIES, ControlPairsDataModule, FileDataset, Record
from datamodules.annotators import CannyAnnotator, TorchScriptAnnotator, annotate


# --- control pairs ----------------------------------------------------------------------------------------
def make_pairs(root: Path) -> None:
    for i, name in enumerate(("a", "b", "c")):
        save(root / "images" / f"{name}.png", textured(i))
    edges = np.zeros((40, 40), dtype=np.uint8)
    edges[10, :] = 255
    save(root / "edges" / "a.png", edges)
    depth = (np.linspace(0, 65535, 40)[None, :].repeat(40, 0)).astype(np.uint16)
    Image.fromarray(depth).save(root / "a_depth.png")  # 16-bit greyscale
    (root / "depth").mkdir()
    Image.open(root / "a_depth.png").save(root / "depth" / "a.png")
    seg = Image.fromarray(np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) % 5, np.ones((5, 5), np.uint8)))
    seg = seg.convert("P")  # palette PNG of ids 0..4, at half the image size
    seg.putpalette([v for i in range(256) for v in (i * 40 % 256, 0, 0)])
    (root / "segmentation").mkdir()
    seg.save(root / "segmentation" / "a.png")
    (root / "captions").mkdir()
    (root / "captions" / "a.txt").write_text("blocks\n")


def pairs(root: Path, **kwargs) -> ControlPairsDataModule:
    args = dict(controls=("edges", "depth", "segmentation"), val_fraction=0.34, batch_size=1, resolution=40)
    args.update(kwargs)
    dm = ControlPairsDataModule(str(root), **args)
    dm.connect(args["resolution"], ALL)
    return dm


def find(dm, name: str) -> dict:
    for split in ("train", "val"):
        for i, r in enumerate(dm.splits[split]):
            if Path(r.image).stem == name:
                return dm.dataset(split)[i]
    raise KeyError(name)


def test_pairs_load_map_files_and_canny(tmp_path):
    make_pairs(tmp_path)
    nodes = {"depth": {"_target_": "helpers.fake_depth", "_partial_": True}}
    annotators = {**instantiate(nodes, _convert_="all"), "segmentation": lambda im: np.zeros(im.shape[:2])}
    dm = pairs(tmp_path, annotators=annotators)
    assert "annotators" not in dm.hparams  # objects, not settings: a checkpoint cannot hold them
    a = find(dm, "a")
    edges = a["control"]["edges"][0]
    assert edges[10].eq(1).all() and edges.sum() == 40
    depth = a["control"]["depth"][0]
    np.testing.assert_allclose(depth[3].numpy(), np.linspace(0, 1, 40), atol=1e-4)
    seg = a["control"]["segmentation"][0].numpy()
    ids = np.arange(16).reshape(4, 4) % 5
    np.testing.assert_array_equal(seg, np.kron(ids, np.ones((10, 10), dtype=int)))  # NEAREST upsampling
    assert a["caption"] == "blocks" and a["label"] == -1
    # b and c have no map files: edges from cv2.Canny of the (resized) image, depth from the callable.
    b = find(dm, "b")
    pixels = to_uint8(b["image"])
    np.testing.assert_array_equal(pixels, textured(1))
    canny = cv2.Canny(pixels, 100, 200) > 0
    assert canny.sum() > 50
    np.testing.assert_array_equal(b["control"]["edges"][0].numpy(), canny.astype(np.float32))
    d = pixels.astype(np.float32).mean(-1)
    np.testing.assert_allclose(
        b["control"]["depth"][0].numpy(), (d - d.min()) / (d.max() - d.min()), atol=1e-6
    )
    assert b["caption"] == "" and b["control"]["segmentation"].abs().sum() == 0


def test_annotators_run_after_the_crop(tmp_path):
    save(tmp_path / "images" / "wide.png", textured(3, size=(40, 64)))
    save(tmp_path / "images" / "other.png", textured(4, size=(40, 64)))
    canny = instantiate(
        {"edges": {"_target_": "datamodules.CannyAnnotator", "low": 50, "high": 90}}, _convert_="all"
    )
    dm = pairs(tmp_path, controls=("edges",), resolution=32, annotators=canny)
    sample = dm.dataset("val")[0]
    pixels = to_uint8(sample["image"])
    expected = cv2.Canny(pixels, 50, 90) > 0
    np.testing.assert_array_equal(sample["control"]["edges"][0].numpy(), expected.astype(np.float32))


def test_missing_annotator_and_missing_dirs(tmp_path):
    make_pairs(tmp_path)
    dm = pairs(tmp_path, controls=("edges", "depth"))
    assert dm.hparams["controls"] == ("edges", "depth") and "annotators" not in dm.hparams
    with pytest.raises(ValueError, match=r"no depth map for .*\.png .*data\.annotators\.depth .*_target_"):
        dm.setup("fit")
    tokenizer = pairs(tmp_path, controls=("edges", "depth"))
    tokenizer.connect(40, ("image",))  # control not requested: no annotator needed
    tokenizer.setup("fit")
    with pytest.raises(FileNotFoundError, match=r"data\.image_dir: folder not found: .*pictures"):
        pairs(tmp_path, image_dir="pictures").setup("fit")
    old_spec = {"depth": {"type": "torchscript", "path": "dpt.pt"}}  # the registry form before `_target_`
    with pytest.raises(TypeError, match=r"data\.annotators\.depth must be an annotator: a `_target_` node"):
        pairs(tmp_path, annotators=old_spec)
    with pytest.raises(ValueError, match=r"data\.annotators has unknown modalities \['normals'\]"):
        pairs(tmp_path, annotators={"normals": CannyAnnotator()})
    save(tmp_path / "images" / "a.jpg", textured(5))  # a.png's stem: it would take a.png's maps and caption
    with pytest.raises(ValueError, match=r"two files share the stem 'a': .*a\.(jpg|png) and .*a\.(jpg|png)"):
        pairs(tmp_path, controls=("edges",)).setup("fit")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_and_function_annotators(tmp_path):
    class Depth(torch.nn.Module):
        def forward(self, x):
            return x[:, 1:2] * 3.0  # (1, 1, H, W) from float (1, 3, H, W) in [0, 1]

    path = tmp_path / "depth.pt"
    torch.jit.script(Depth()).save(str(path))
    image = textured(5, size=(16, 16))
    ts = instantiate({"_target_": "datamodules.TorchScriptAnnotator", "path": str(path)})
    assert isinstance(ts, TorchScriptAnnotator)
    out = annotate(ts, image, "depth")
    green = image[..., 1].astype(np.float32)
    expected = (green - green.min()) / (green.max() - green.min())
    np.testing.assert_allclose(out, expected, atol=1e-6)
    half = lambda im: (im[::2, ::2, 0] > 128).astype(np.int64)  # ids at half size: NEAREST back to (H, W)
    np.testing.assert_array_equal(
        annotate(half, image, "segmentation"), (image[..., 0] > 128).astype(np.int64)
    )
    node = {"_target_": "helpers.fake_depth", "_partial_": True, "scale": 2.0}
    scaled = pickle.loads(pickle.dumps(instantiate(node)))  # a partial of an importable function pickles
    brightness = image.astype(np.float32).mean(-1)
    expected = (brightness - brightness.min()) / (brightness.max() - brightness.min())
    np.testing.assert_allclose(annotate(scaled, image, "depth"), expected, atol=1e-6)
    clone = pickle.loads(pickle.dumps(ts))  # workers receive the annotator without the loaded model
    np.testing.assert_allclose(annotate(clone, image, "depth"), out)
    scores = lambda im: np.stack([np.zeros(im.shape[:2]), im[..., 0] > 128])  # (2, H, W) class scores
    np.testing.assert_array_equal(
        annotate(scores, image, "segmentation"), (image[..., 0] > 128).astype(np.int64)
    )
    np.testing.assert_array_equal(annotate(CannyAnnotator(), image, "edges"), cv2.Canny(image, 100, 200))
    with pytest.raises(FileNotFoundError, match=r"data\.annotators\.depth\.path"):
        TorchScriptAnnotator(str(tmp_path / "none.pt"), key="data.annotators.depth")


def test_flip_moves_controls_with_the_image(tmp_path):
    make_pairs(tmp_path)
    spec = {"depth": fake_depth, "segmentation": lambda im: (im[..., 0] > 128).astype(np.int64)}
    plain = pairs(tmp_path, annotators=spec, flip=0.0)
    flipped = pairs(tmp_path, annotators=spec, flip=1.0)
    for i in range(len(plain.dataset("train"))):
        a, b = plain.dataset("train")[i], flipped.dataset("train")[i]
        assert torch.equal(b["image"], torch.flip(a["image"], dims=[-1]))
        assert set(a["control"]) == set(b["control"]) == {"edges", "depth", "segmentation"}
        for m in a["control"]:
            assert torch.equal(b["control"][m], torch.flip(a["control"][m], dims=[-1]))
        # the flipped pair still agrees: the map annotated from the flipped image equals the flipped map
        seg = (to_uint8(b["image"])[..., 0] > 128).astype(np.int64)
        if Path(flipped.splits["train"][i].image).stem != "a":
            np.testing.assert_array_equal(b["control"]["segmentation"][0].numpy(), seg)
    assert torch.equal(
        flipped.dataset("val")[0]["image"], plain.dataset("val")[0]["image"]
    )  # val never flips


def ramp_record(root: Path) -> Record:
    """A 40 x 60 image whose red channel is 4 x column, with maps whose values name their pixels: a unique
    segmentation id per pixel (60 x row + column), one edge column (17), a depth step at column 30 and a
    sketch stroke at column 40."""
    rows, cols = np.mgrid[0:40, 0:60]
    save(root / "image.png", np.stack([4 * cols, 4 * rows, 0 * rows], -1).astype(np.uint8))
    save(root / "segmentation.png", (60 * rows + cols).astype(np.uint16))  # 16-bit: ids up to 2399
    save(root / "edges.png", np.where(cols == 17, 255, 0).astype(np.uint8))
    save(root / "depth.png", np.where(cols >= 30, 255, 0).astype(np.uint8))
    save(root / "sketch.png", np.where(cols == 40, 255, 0).astype(np.uint8))  # one soft-resampled stroke
    return Record(str(root / "image.png"), maps={m: str(root / f"{m}.png") for m in MODALITIES})


@pytest.mark.parametrize("crop, flip", [("center", 0.0), ("center", 1.0), ("random", 1.0)])
def test_crop_and_flip_keep_maps_exact(crop, flip, tmp_path):
    data = FileDataset([ramp_record(tmp_path)], 20, crop=crop, train=True, flip=flip, controls=MODALITIES)
    unflip = slice(None, None, -1) if flip else slice(None)
    offsets = set()
    for seed in range(6):
        torch.manual_seed(seed)
        sample = data[0]
        # 40 x 60 -> 20 x 30, then the square from column `left` (5 = center). Masks are resampled
        # nearest-exact: output pixel i reads source pixel floor((i + 0.5) * 2) = 2 i + 1, exactly.
        seg = sample["control"]["segmentation"][0].numpy()[:, unflip]
        left = (int(seg[0, 0]) % 60 - 1) // 2
        offsets.add(left)
        rows, cols = 2 * np.arange(20) + 1, 2 * (np.arange(20) + left) + 1
        np.testing.assert_array_equal(seg, 60 * rows[:, None] + cols)
        edges = sample["control"]["edges"][0].numpy()[:, unflip]
        np.testing.assert_array_equal(
            edges, np.broadcast_to(cols == 17, (20, 20))
        )  # the marked column, if kept
        # the image is resampled bicubic on the same grid: red ~ 4 x the source column at the pixel's centre
        red = to_uint8(sample["image"])[..., 0].astype(int)[:, unflip]
        assert np.abs(red - 4 * (cols - 0.5))[:, 1:-1].max() <= 1  # the frame's border columns aside
        depth = sample["control"]["depth"]  # bicubic overshoots at the step: clamped into [0, 1]
        assert depth.min() == 0 and depth.max() == 1
        # the sketch is resampled as an image too (a soft stroke, clamped to [0, 1]), on the same grid
        sketch = sample["control"]["sketch"][0].numpy()[:, unflip]
        assert sketch.min() >= 0 and 0 < sketch.max() <= 1
        assert abs(int(cols[sketch[0].argmax()]) - 40) <= 1 and np.allclose(sketch, sketch[:1], atol=1e-5)
    assert (offsets == {5}) if crop == "center" else (len(offsets) > 1 and min(offsets) <= 8)


def test_pairs_batches_with_workers(tmp_path):
    for split in ("train", "val"):
        make_pairs(tmp_path / split)
    dm = ControlPairsDataModule(
        str(tmp_path),
        controls=["edges", "segmentation"],
        batch_size=2,
        num_workers=2,
        annotators={"segmentation": lambda im: np.ones(im.shape[:2])},
    )
    dm.connect(24, ALL)
    dm.setup("fit")
    assert len(dm.dataset("train")) == len(dm.dataset("val")) == 3
    batches = list(dm.val_dataloader())
    assert [len(b["label"]) for b in batches] == [2, 1]
    check_batch(batches[0], 2, 24, {"edges": (1, torch.float32), "segmentation": (1, torch.int64)})
    assert batches[0]["caption"] == ["blocks", ""]
    assert batches[0]["control"]["segmentation"][0].unique().tolist() == [0, 1, 2, 3, 4]


def test_map_files_that_match_no_image_are_named(tmp_path):
    """Maps go with the image of their stem: a stray map file is named in a warning, and a folder of maps
    none of which matches an image (p0.png beside p0_edge.png) is refused; before, every map was left out
    in silence and Canny drew the edges instead."""
    for i in range(3):
        save(tmp_path / "images" / f"p{i}.png", textured(i))
        save(tmp_path / "edges" / f"p{i}_edge.png", np.zeros((40, 40), np.uint8))
    message = (f"3 edges map file(s) in {tmp_path / 'edges'} match no image of {tmp_path / 'images'} by "
               "name (p0_edge.png, p1_edge.png, p2_edge.png); maps go with the image of their stem: name "
               "each like its image (images/x.png, edges/x.png)")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message)):
        pairs(tmp_path, controls=("edges",)).setup("fit")
    for i in range(3):
        (tmp_path / "edges" / f"p{i}_edge.png").rename(tmp_path / "edges" / f"p{i}.png")
    save(tmp_path / "edges" / "stray.png", np.zeros((40, 40), np.uint8))
    with pytest.warns(UserWarning, match=r"1 edges map file\(s\) in .* \(stray\.png\); .*: they are not "):
        dm = pairs(tmp_path, controls=("edges",))
        dm.setup("fit")
    assert all(r.maps == {"edges": str(tmp_path / "edges" / f"{Path(r.image).stem}.png")}
               for split in ("train", "val") for r in dm.splits[split])  # fmt: skip
