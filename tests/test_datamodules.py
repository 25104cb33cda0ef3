"""DataModules: the dict batch, connect(), file layouts, control-map files, annotators and errors."""

from __future__ import annotations

import gc
import inspect
import json
import pickle
import weakref
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

import datamodules
from datamodules import (
    MODALITIES,
    CaptionListDataModule,
    ClassFolderDataModule,
    ControlPairsDataModule,
    FileDataset,
    Record,
    SyntheticDataModule,
)
from datamodules.annotators import CannyAnnotator, TorchScriptAnnotator, annotate

ROOT = Path(__file__).resolve().parents[1]
ALL = ("image", "label", "caption", "control")
RGB = {"cat": (200, 30, 30), "dog": (30, 30, 200), "eel": (30, 200, 30)}


def fake_depth(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A user 'model' named by a `_partial_` node: brightness as depth."""
    return image.astype(np.float32).mean(-1) * scale


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def textured(seed: int, size=(40, 40)) -> np.ndarray:
    """Blocky random image (sharp boundaries, so canny finds edges)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))


def check_batch(batch: dict, size: int, resolution: int, controls: dict) -> None:
    assert set(batch) == set(ALL)
    image, label = batch["image"], batch["label"]
    assert image.dtype == torch.float32 and image.shape == (size, 3, resolution, resolution)
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
    assert label.dtype == torch.int64 and label.shape == (size,)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == size
    assert all(isinstance(c, str) for c in batch["caption"])
    assert set(batch["control"]) == set(controls)
    for m, (channels, dtype) in controls.items():
        t = batch["control"][m]
        assert t.dtype == dtype and t.shape == (size, channels, resolution, resolution)
    if "edges" in controls:
        assert set(batch["control"]["edges"].unique().tolist()) <= {0.0, 1.0}
    if "depth" in controls:
        assert batch["control"]["depth"].min() >= 0 and batch["control"]["depth"].max() <= 1


SYNTH_CONTROLS = {"edges": (1, torch.float32), "depth": (1, torch.float32), "segmentation": (1, torch.int64)}


# --- base: connect, loaders ------------------------------------------------------------------------------
def test_connect_conflicting_resolution():
    dm = SyntheticDataModule(resolution=64)
    with pytest.raises(ValueError, match=r"data\.resolution=64 .*128"):
        dm.connect(128, ALL)
    dm.connect(64, ("image",))  # agreeing is fine
    assert dm.resolution == 64 and dm.keys == ("image",)
    with pytest.raises(ValueError, match="unknown batch keys"):
        SyntheticDataModule().connect(64, ("image", "pixels"))
    with pytest.raises(ValueError, match=r"data\.resolution or call connect"):
        SyntheticDataModule().setup("fit")


def test_synthetic_loaders_follow_the_contract():
    dm = SyntheticDataModule(num_train=10, num_val=5, batch_size=4)
    dm.connect(32, ALL)
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 2  # drop_last on train
    for batch in train:
        check_batch(batch, 4, 32, SYNTH_CONTROLS)
        assert all(c for c in batch["caption"])
    val = list(dm.val_dataloader())
    assert [len(b["label"]) for b in val] == [4, 1]
    for loader in (dm.test_dataloader(), dm.predict_dataloader()):
        assert torch.equal(next(iter(loader))["image"], val[0]["image"])
    labels = torch.cat([b["label"] for b in val])
    assert labels.tolist() == [dm.dataset("val")[i]["label"] for i in range(5)]
    assert dm.num_classes == 10 and dm.class_names[0] == "circle"


def test_tokenizer_keys_give_empty_caption_and_control():
    dm = SyntheticDataModule(num_train=8, num_val=4, batch_size=4)
    dm.connect(32, ("image",))
    batch = next(iter(dm.val_dataloader()))
    check_batch(batch, 4, 32, {})
    assert batch["caption"] == [""] * 4 and batch["control"] == {}


def test_num_workers_give_the_same_batches():
    def batches(workers):
        dm = SyntheticDataModule(num_train=12, num_val=4, batch_size=4, num_workers=workers, seed=1)
        dm.connect(32, ALL)
        loader = dm.train_dataloader()
        assert loader.persistent_workers == (workers > 0)
        return list(loader)

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["caption"] == b["caption"]
        assert torch.equal(a["control"]["segmentation"], b["control"]["segmentation"])
    # the shuffle follows the seed: not the identity order
    unshuffled = SyntheticDataModule(num_train=12, batch_size=4, resolution=32, seed=1).dataset("train")
    identity = torch.tensor([unshuffled[i]["label"] for i in range(12)])
    assert not torch.equal(torch.cat([b["label"] for b in serial]), identity)


def test_batch_smaller_than_dataset_is_an_error():
    dm = SyntheticDataModule(num_train=3, batch_size=4, resolution=32)
    with pytest.raises(ValueError, match=r"data\.batch_size=4"):
        dm.setup("fit")


@pytest.mark.parametrize("make", [lambda p: SyntheticDataModule(), lambda p: ControlPairsDataModule(str(p))])
def test_datamodules_are_freed_without_the_cycle_collector(make, tmp_path):
    # Lightning's own frame lookup in save_hyperparameters made a reference cycle holding the caller's frames;
    # a persistent-worker DataLoader kept alive by it took 10 s to stop when the collector freed it later.
    gc.disable()
    try:
        ref = weakref.ref(make(tmp_path))
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("name", ["synthetic", "folder", "captions", "pairs"])
def test_configs_instantiate_with_documented_keys(name, tmp_path):
    cfg = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    target = getattr(datamodules, cfg["_target_"].split(".")[-1])
    params = inspect.signature(target.__init__).parameters
    assert set(cfg) - {"_target_"} == set(params) - {"self"}
    for key in ("root", "train_list"):
        if key in cfg.keys():
            cfg[key] = str(tmp_path)
    dm = instantiate(cfg, _convert_="all")  # as the CLI does: `_target_` annotators arrive as objects
    assert isinstance(dm, datamodules.VarDataModule) and dm.resolution is None
    if name == "pairs":
        canny = dm.annotators["edges"]
        assert isinstance(canny, CannyAnnotator) and (canny.low, canny.high) == (100, 200)
        assert "annotators" not in dm.hparams
    text = (ROOT / "conf" / "data" / f"{name}.yaml").read_text()
    for key in set(cfg) - {"_target_"}:  # every key carries a comment (here or in pairs.yaml)
        line = next(line for line in text.splitlines() if line.startswith(f"{key}:"))
        assert "#" in line or key in ("batch_size",), line


# --- class folders ----------------------------------------------------------------------------------------
def make_class_folders(root: Path, per_class=4) -> None:
    for name, rgb in RGB.items():
        for i in range(per_class):
            save(root / name / f"{i}.png", np.full((24, 30, 3), rgb, dtype=np.uint8))


def test_class_folders_split_by_fraction(tmp_path):
    make_class_folders(tmp_path)
    (tmp_path / "notes.txt").write_text("ignored")
    dm = ClassFolderDataModule(str(tmp_path), val_fraction=0.25, batch_size=2, resolution=16)
    assert dm.class_names == ["cat", "dog", "eel"] and dm.num_classes == 3
    dm.setup("fit")
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(val) == 3 and len(train) == 9
    assert not {r.image for r in train} & {r.image for r in val}
    again = ClassFolderDataModule(str(tmp_path), val_fraction=0.25, resolution=16)
    assert [r.image for r in again.splits["val"]] == [r.image for r in val]
    for batch in dm.val_dataloader():
        check_batch(batch, len(batch["label"]), 16, {})
        for image, label in zip(batch["image"], batch["label"]):
            colour = to_uint8(image).reshape(-1, 3).mean(0)
            np.testing.assert_allclose(colour, RGB[dm.class_names[label]], atol=1)


def test_class_folders_explicit_splits(tmp_path):
    make_class_folders(tmp_path / "train", per_class=2)
    save(tmp_path / "val" / "dog" / "x.jpg", np.full((20, 20, 3), RGB["dog"], dtype=np.uint8))
    dm = ClassFolderDataModule(str(tmp_path), batch_size=2, resolution=16)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 6 and [r.label for r in dm.splits["val"]] == [1]
    save(tmp_path / "val" / "fox" / "y.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="fox"):
        ClassFolderDataModule(str(tmp_path), resolution=16).setup()
    with pytest.raises(FileNotFoundError, match=r"data\.root"):
        ClassFolderDataModule(str(tmp_path / "nowhere"), resolution=16).setup()


def test_crop_policies(tmp_path):
    # 60 x 20: red | green | blue thirds.
    image = np.zeros((20, 60, 3), dtype=np.uint8)
    image[:, :20, 0], image[:, 20:40, 1], image[:, 40:, 2] = 255, 255, 255
    save(tmp_path / "a" / "0.png", image)
    save(tmp_path / "a" / "1.png", image)

    def first(crop, split="val"):
        dm = ClassFolderDataModule(str(tmp_path), crop=crop, val_fraction=0.5, resolution=20, batch_size=1)
        return to_uint8(dm.dataset(split)[0]["image"]).astype(int)

    center = first("center")
    assert (center[..., 1] > 250).all() and (center[..., [0, 2]] < 5).all()
    squashed = first("none")
    assert squashed.shape == (20, 20, 3)
    assert (squashed[:, :5, 0] > 250).all() and (squashed[:, -5:, 2] > 250).all()
    assert (first("random")[..., 1] > 250).all()  # "random" crops in the center off the train split


# --- caption lists ----------------------------------------------------------------------------------------
def make_caption_files(tmp_path: Path) -> None:
    for i in range(4):
        save(tmp_path / "img" / f"{i}.png", np.full((16, 16, 3), 60 * i, dtype=np.uint8))


def test_jsonl_and_csv_caption_lists(tmp_path):
    make_caption_files(tmp_path)
    lines = [json.dumps({"image": f"img/{i}.png", "caption": f"grey {i}", "label": i % 2}) for i in range(4)]
    (tmp_path / "list.jsonl").write_text("\n".join(lines[:3]) + "\n\n")
    (tmp_path / "val.csv").write_text('image,caption\nimg/3.png,"grey, three"\n')
    dm = CaptionListDataModule(
        str(tmp_path / "list.jsonl"), str(tmp_path / "val.csv"), batch_size=3, resolution=8
    )
    dm.connect(8, ALL)
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 3, 8, {})
    order = [int(c.split()[-1]) for c in batch["caption"]]
    assert batch["label"].tolist() == [i % 2 for i in order]
    assert [to_uint8(im)[0, 0, 0] for im in batch["image"]] == [60 * i for i in order]
    val = next(iter(dm.val_dataloader()))
    assert val["caption"] == ["grey, three"] and val["label"].tolist() == [-1]
    assert dm.num_classes == 2


def test_caption_list_errors(tmp_path):
    make_caption_files(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"image": "img/0.png", "caption": "ok"}) + "\n" + json.dumps({"image": "img/1.png"})
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: missing key 'caption'"):
        datamodules.read_caption_list(str(bad))
    bad.write_text(json.dumps({"image": "img/9.png", "caption": "gone"}))
    with pytest.raises(FileNotFoundError, match=r"bad\.jsonl:1: image file not found: .*9\.png"):
        datamodules.read_caption_list(str(bad))
    csv_file = tmp_path / "bad.csv"
    csv_file.write_text("image,text\nimg/0.png,hello\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: header lacks column\(s\) \['caption'\]"):
        datamodules.read_caption_list(str(csv_file))
    csv_file.write_text("image,caption,label\nimg/0.png,a,1\nimg/1.png,b,one\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: label must be an integer"):
        datamodules.read_caption_list(str(csv_file))


def test_corrupt_image_names_the_file(tmp_path):
    make_caption_files(tmp_path)
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "l.jsonl").write_text(json.dumps({"image": "img/broken.png", "caption": "x"}))
    dm = CaptionListDataModule(
        str(tmp_path / "l.jsonl"), str(tmp_path / "l.jsonl"), batch_size=1, resolution=8
    )
    with pytest.raises(OSError, match=r"cannot read image file .*broken\.png"):
        dm.dataset("val")[0]


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
    nodes = {"depth": {"_target_": "test_datamodules.fake_depth", "_partial_": True}}
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
    node = {"_target_": "test_datamodules.fake_depth", "_partial_": True, "scale": 2.0}
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
    segmentation id per pixel (60 x row + column), one edge column (17) and a depth step at column 30."""
    rows, cols = np.mgrid[0:40, 0:60]
    save(root / "image.png", np.stack([4 * cols, 4 * rows, 0 * rows], -1).astype(np.uint8))
    save(root / "segmentation.png", (60 * rows + cols).astype(np.uint16))  # 16-bit: ids up to 2399
    save(root / "edges.png", np.where(cols == 17, 255, 0).astype(np.uint8))
    save(root / "depth.png", np.where(cols >= 30, 255, 0).astype(np.uint8))
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
