"""DataModules: the dict batch, connect(), class folders, caption lists, configs and errors (control pairs:
test_pairs.py)."""

from __future__ import annotations

import gc
import inspect
import json
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ALL, check_batch, save, to_uint8
from hydra.utils import instantiate
from omegaconf import OmegaConf

import datamodules
from datamodules import (
    CaptionListDataModule,
    ClassFolderDataModule,
    ControlPairsDataModule,
    SyntheticDataModule,
)
from datamodules.annotators import CannyAnnotator

ROOT = Path(__file__).resolve().parents[1]
RGB = {"cat": (200, 30, 30), "dog": (30, 30, 200), "eel": (30, 200, 30)}


SYNTH_CONTROLS = {"edges": (1, torch.float32), "depth": (1, torch.float32), "segmentation": (1, torch.int64),
                  "sketch": (1, torch.float32)}  # fmt: skip


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


def test_class_folders_follow_linked_folders_inside_a_class_once(tmp_path):
    """A linked folder inside a class folder is read, as a linked class folder is (it was skipped in
    silence); a link back up is read once, not looped through; the order stays folder by folder."""
    make_class_folders(tmp_path / "data", per_class=1)
    elsewhere = tmp_path / "more_cats"
    for i in range(3):
        save(elsewhere / f"m{i}.png", np.full((24, 30, 3), RGB["cat"], dtype=np.uint8))
    (tmp_path / "data" / "cat" / "nested").symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "data" / "dog" / "up").symlink_to(tmp_path / "data" / "dog", target_is_directory=True)
    dm = ClassFolderDataModule(str(tmp_path / "data"), val_fraction=0.2, batch_size=2, resolution=16)
    dm.setup("fit")
    records = dm.splits["train"] + dm.splits["val"]
    found = sorted(str(Path(r.image).relative_to(tmp_path / "data")) for r in records)
    assert found == ["cat/0.png", "cat/nested/m0.png", "cat/nested/m1.png", "cat/nested/m2.png", "dog/0.png",
                     "eel/0.png"]  # fmt: skip


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
    bad.write_text(json.dumps({"image": "img/0.png", "caption": " "}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: the caption is empty \(the null caption is learnt "):
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
