"""Bad and odd data files: the check before the run (skip and report, or refuse naming them all), files that
go bad during the run, 16-bit images, coloured maps, extreme aspect ratios and maps of another size."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import ALL, save, textured, to_uint8
from PIL import Image

from datamodules import CaptionListDataModule, ClassFolderDataModule, ControlPairsDataModule
from datamodules.transforms import load_image, load_map
from datamodules.verify import BadFilesError, BadFileWarning

REPO = Path(__file__).resolve().parents[1]
GREY = {"cat": 40, "dog": 200}


def jpeg(seed: int = 0, size: int = 48) -> bytes:
    """A JPEG of noise: its scan data, not its header, is most of the file."""
    noise = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_bad_files(folder: Path) -> list[Path]:
    """A zero-byte PNG, a text file named .jpg and a JPEG cut off halfway, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    zero, text, cut = folder / "zero.png", folder / "text.jpg", folder / "cut.jpg"
    zero.write_bytes(b"")
    text.write_text("this is not a picture\n")
    whole = jpeg()
    cut.write_bytes(whole[: len(whole) // 2])
    return [zero, text, cut]


def class_folders(root: Path) -> list[Path]:
    """train/{cat,dog}/0..3.png of one grey each, val/ with one image per class, the three bad files in
    train/cat and a zero-byte train/dog/dzero.png."""
    for split, count in (("train", 4), ("val", 1)):
        for name, grey in GREY.items():
            for i in range(count):
                save(root / split / name / f"{i}.png", np.full((8, 8, 3), grey + i, np.uint8))
    (root / "train" / "dog" / "dzero.png").write_bytes(b"")
    return write_bad_files(root / "train" / "cat") + [root / "train" / "dog" / "dzero.png"]


def reasons(report: dict) -> dict[str, str]:
    return {Path(e["file"]).name: e["reason"] for e in report["skipped"]}


def test_bad_files_are_skipped_counted_and_reported(tmp_path):
    bad = class_folders(tmp_path / "data")
    report_file = tmp_path / "out" / "report.json"
    dm = ClassFolderDataModule(
        str(tmp_path / "data"), resolution=8, batch_size=2, report_file=str(report_file)
    )
    with pytest.warns(
        BadFileWarning, match=r"data: 4 file\(s\) skipped \(data\.on_bad_file=skip\): .*zero\.png"
    ):
        dm.setup("fit")
    assert len(dm.dataset("train")) == 8 and len(dm.dataset("val")) == 2
    assert dm.report["splits"]["train"] == {"samples": 12, "kept": 8, "skipped": 4, "resized_maps": 0}
    assert dm.report["splits"]["val"]["skipped"] == 0 and dm.report["files_checked"] == 14
    found = reasons(dm.report)
    assert found.pop("cut.jpg").startswith("truncated or corrupt (")  # decoded at 1/8 scale: caught
    assert found == {
        "zero.png": "empty file (0 bytes)",
        "dzero.png": "empty file (0 bytes)",
        "text.jpg": "not an image file that PIL can identify",
    }
    on_disk = json.loads(report_file.read_text())  # written by setup, atomically
    assert on_disk["skipped"] == dm.report["skipped"] and on_disk["settings"]["on_bad_file"] == "skip"
    assert {Path(e["file"]) for e in on_disk["skipped"]} == set(bad)
    assert on_disk["during_run"] == str(tmp_path / "out" / "report.during_run.jsonl")
    batches = list(dm.train_dataloader())  # every kept sample loads
    labels = torch.cat([b["label"] for b in batches]).sort().values
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_error_mode_refuses_naming_every_bad_file(tmp_path):
    bad = class_folders(tmp_path / "data")
    report_file = tmp_path / "report.json"
    dm = ClassFolderDataModule(
        str(tmp_path / "data"), resolution=8, on_bad_file="error", report_file=str(report_file)
    )
    with pytest.raises(ValueError, match=r"4 data file\(s\) refused \(data\.on_bad_file=error\)") as caught:
        dm.setup("fit")
    message = str(caught.value)
    assert isinstance(caught.value, BadFilesError) and isinstance(caught.value, OSError)
    assert "\n" not in message and all(str(path) in message for path in bad)
    assert f"cannot read image file {bad[0]}: empty file (0 bytes)" in message
    assert "set data.on_bad_file=skip to train without them" in message
    assert len(json.loads(report_file.read_text())["refused"]) == 4  # the report is written before refusing
    with pytest.raises(
        ValueError, match=r"data\.on_bad_file must be one of \('skip', 'error'\), got 'ignore'"
    ):
        ClassFolderDataModule(str(tmp_path / "data"), on_bad_file="ignore")
    with pytest.raises(ValueError, match=r"data\.check_files must be one of"):
        ClassFolderDataModule(str(tmp_path / "data"), check_files="fast")


def test_header_and_trust_checks_leave_the_rest_to_the_run(tmp_path):
    class_folders(tmp_path / "data")
    header = ClassFolderDataModule(str(tmp_path / "data"), resolution=8, batch_size=2, check_files="header")
    with pytest.warns(BadFileWarning):
        header.setup("fit")
    assert set(reasons(header.report)) == {"zero.png", "dzero.png", "text.jpg"}  # opened, not decoded
    train = header.dataset("train")
    cut = next(i for i, r in enumerate(train.records) if r.image.endswith("cut.jpg"))
    with pytest.warns(BadFileWarning, match=r"cannot read image file .*cut\.jpg.*Sample \d+ is skipped"):
        sample = train[cut]
    assert torch.equal(sample["image"], train[(cut + 1) % len(train)]["image"])
    trust = ClassFolderDataModule(str(tmp_path / "data"), resolution=8, batch_size=2, check_files="trust")
    trust.setup("fit")
    assert trust.report["files_checked"] == 0 and trust.report["skipped"] == []
    assert len(trust.dataset("train")) == 12
    with pytest.warns(BadFileWarning) as seen:
        images = [trust.dataset("train")[i]["image"] for i in range(12)]
    named = {Path(str(w.message).split(":")[1].split()[-1]).name for w in seen}
    assert named == {"zero.png", "dzero.png", "text.jpg", "cut.jpg"}
    assert all(im.shape == (3, 8, 8) for im in images)


def test_caption_lists_skip_bad_and_missing_files(tmp_path):
    for i in range(3):
        save(tmp_path / "img" / f"{i}.png", np.full((8, 8, 3), 50 * i, np.uint8))
    bad = write_bad_files(tmp_path / "img")
    names = [f"img/{i}.png" for i in range(3)] + [f"img/{p.name}" for p in bad] + ["img/gone.png"]
    rows = [json.dumps({"image": n, "caption": f"c{i}"}) for i, n in enumerate(names)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.jsonl").write_text(rows[0] + "\n")
    args = dict(val_list=str(tmp_path / "val.jsonl"), batch_size=1, resolution=8)
    dm = CaptionListDataModule(str(tmp_path / "train.jsonl"), **args)
    dm.connect(8, ALL)
    with pytest.warns(BadFileWarning, match=r"4 file\(s\) skipped"):
        dm.setup("fit")
    assert [s["caption"] for s in dm.dataset("train")] == ["c0", "c1", "c2"]
    assert dm.report["splits"]["train"] == {"samples": 7, "kept": 3, "skipped": 4, "resized_maps": 0}
    assert reasons(dm.report)["gone.png"] == "file not found"
    strict = CaptionListDataModule(str(tmp_path / "train.jsonl"), on_bad_file="error", **args)
    with pytest.raises(ValueError, match=r"4 data file\(s\) refused") as caught:
        strict.setup("fit")
    assert all(str(tmp_path / n) in str(caught.value) for n in names[3:])


def make_pairs(root: Path) -> None:
    """images/a..f (40 x 40) with edges maps of column 8: a's map is text, b's image is cut off, c's map is
    20 x 20 (the same shape at half size), d's 40 x 20 (another aspect); e and f are whole. With seed 1 the
    val split is e."""
    edges = np.zeros((40, 40), np.uint8)
    edges[:, 8] = 255
    for i, name in enumerate("abcdef"):
        save(root / "images" / f"{name}.png", textured(i))
        save(root / "edges" / f"{name}.png", edges)
    (root / "edges" / "a.png").write_text("not a map")
    whole = (root / "images" / "b.png").read_bytes()
    (root / "images" / "b.png").write_bytes(whole[: len(whole) // 2])
    save(root / "edges" / "c.png", edges[::2, ::2])
    save(root / "edges" / "d.png", edges[::2, :])  # 40 wide, 20 high


def pairs(root: Path, **kwargs) -> ControlPairsDataModule:
    args = dict(controls=["edges"], val_fraction=0.2, seed=1, batch_size=1, resolution=40)
    dm = ControlPairsDataModule(str(root), **{**args, **kwargs})
    dm.connect(40, ALL)
    return dm


def by_name(dm: ControlPairsDataModule) -> dict[str, tuple]:
    """stem -> (dataset, index) over the splits."""
    return {Path(r.image).stem: (d, i) for d in dm.datasets.values() for i, r in enumerate(d.records)}


def test_pairs_skip_bad_maps_and_resize_or_refuse_other_sizes(tmp_path):
    make_pairs(tmp_path)
    dm = pairs(tmp_path, report_file=str(tmp_path / "report.json"))
    with pytest.warns(BadFileWarning, match=r"2 file\(s\) resized to their image's size"):
        dm.setup("fit")
    samples = {name: d[i] for name, (d, i) in by_name(dm).items()}
    assert set(samples) == {"c", "d", "e", "f"} and dm.report["splits"]["train"]["skipped"] == 2
    skipped = {(Path(e["sample"]).name, e["kind"], e["reason"].split(" (")[0]) for e in dm.report["skipped"]}
    assert skipped == {
        ("a.png", "edges", "not an image file that PIL can identify"),
        ("b.png", "image", "truncated or corrupt"),
    }
    resized = {Path(e["file"]).name: e["reason"] for e in dm.report["resized"]}
    assert resized == {
        "c.png": "20 x 20 px, its image 40 x 40 px",
        "d.png": "40 x 20 px, its image 40 x 40 px",
    }
    assert dm.report["splits"]["train"]["resized_maps"] == 2
    expected = torch.zeros(40, 40)
    expected[:, 8] = 1
    for name in "def":  # nearest resizing keeps d's column (stretched vertically only)
        assert torch.equal(samples[name]["control"]["edges"][0], expected), name
    expected[:, 9] = 1  # c's column 4 of 20 covers columns 8 and 9 of 40
    assert torch.equal(samples["c"]["control"]["edges"][0], expected)
    skip = pairs(tmp_path, on_size_mismatch="skip")
    with pytest.warns(BadFileWarning, match=r"4 file\(s\) skipped"):
        skip.setup("fit")
    assert set(by_name(skip)) == {"e", "f"}
    assert {Path(e["file"]).name: e["setting"] for e in skip.report["skipped"]}["d.png"] == (
        "data.on_size_mismatch=skip"
    )
    strict = pairs(tmp_path, on_size_mismatch="error")
    with pytest.raises(
        ValueError, match=r"2 data file\(s\) refused \(data\.on_size_mismatch=error\)"
    ) as caught:
        strict.setup("fit")
    d_map = tmp_path / "edges" / "d.png"
    assert f"edges map file {d_map}: 40 x 20 px, its image 40 x 40 px" in str(caught.value)
    assert "set data.on_size_mismatch=resize" in str(caught.value)
    both = pairs(tmp_path, on_size_mismatch="error", on_bad_file="error")
    settings = r"\(data\.on_bad_file=error, data\.on_size_mismatch=error\)"
    with pytest.raises(ValueError, match=r"4 data file\(s\) refused " + settings):
        both.setup("fit")


def test_a_file_that_goes_bad_during_the_run_is_replaced_by_the_next(tmp_path):
    for i in range(4):
        save(tmp_path / "data" / "all" / f"{i}.png", np.full((8, 8, 3), 60 * i, np.uint8))
    report_file = tmp_path / "report.json"
    dm = ClassFolderDataModule(
        str(tmp_path / "data"), resolution=8, batch_size=1, val_fraction=0.25, report_file=str(report_file)
    )
    dm.setup("fit")
    train = dm.dataset("train")
    grey = [int(to_uint8(train[i]["image"])[0, 0, 0]) for i in range(3)]
    Path(train.records[1].image).unlink()
    Path(train.records[2].image).write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupted in place
    with pytest.warns(BadFileWarning) as seen:
        replaced = train[1]  # 2 is bad too: 0 comes next (wrapping around)
    gone, broken, first = (r.image for r in train.records[1:] + train.records[:1])
    assert [str(w.message) for w in seen] == [
        f"data: image file not found: {gone}. Sample 1 is skipped from now on: the next usable sample is "
        f"returned in its place, now 0 ({first})",
        f"data: cannot read image file {broken}: not an image file that PIL can identify. Sample 2 is "
        f"skipped from now on: the next usable sample is returned in its place, now 0 ({first})",
    ]
    assert int(to_uint8(replaced["image"])[0, 0, 0]) == grey[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known now: passed over without a second warning, the same answer
        assert torch.equal(train[1]["image"], replaced["image"]) and torch.equal(
            train[2]["image"], replaced["image"]
        )
        assert int(to_uint8(train[0]["image"])[0, 0, 0]) == grey[0]
    events = [json.loads(line) for line in Path(train.events_file).read_text().splitlines()]
    assert [(e["sample"], e["replaced_by"]) for e in events] == [(1, 0), (2, 0)]
    assert events[0]["image"] == train.records[1].image and "not found" in events[0]["reason"]
    Path(train.records[0].image).unlink()
    with pytest.raises(OSError, match=r"none of the 3 samples from 0 on can be used .*moved or deleted"):
        train[0]


def test_run_directory_gets_the_report(tmp_path):
    class_folders(tmp_path / "data")
    dm = ClassFolderDataModule(str(tmp_path / "data"), resolution=8, batch_size=2)
    with pytest.warns(BadFileWarning):
        dm.setup("fit")  # the CLI's first setup: no trainer yet, nothing written
    run = tmp_path / "runs" / "v0"
    dm.trainer = SimpleNamespace(loggers=[object()], log_dir=str(run), is_global_zero=True)
    dm.setup("fit")  # trainer.fit's setup: the report goes into the run directory
    report = json.loads((run / "data_report.json").read_text())
    assert report["splits"]["train"]["skipped"] == 4
    assert dm.dataset("train").events_file == str(run / "data_report.during_run.jsonl")


# --- what valid files hold ------------------------------------------------------------------------------
def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    values = np.array([[0, 128, 129, 257], [1000, 32767, 32896, 65535]], np.uint16)
    wide = np.tile(values, (4, 2))  # 8 x 8
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"
    expected = np.rint(wide / 257.0).astype(np.uint8)  # 65535 -> 255, 32896 -> 128, 128 -> 0, 129 -> 1
    image = load_image(str(tmp_path / "wide.png"))
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    for channel in image:
        np.testing.assert_array_equal(channel.numpy(), expected)
    save(tmp_path / "data" / "x" / "other.png", np.zeros((8, 8, 3), np.uint8))
    Image.fromarray(wide).save(tmp_path / "data" / "x" / "wide.png")
    dm = ClassFolderDataModule(str(tmp_path / "data"), resolution=8, val_fraction=0.5, batch_size=1)
    samples = [dm.dataset(s)[0]["image"] for s in ("train", "val")]
    wide_sample = next(s for s in samples if s.max() > -1)
    np.testing.assert_array_equal(to_uint8(wide_sample)[..., 1], expected)


def stroke_map(colour, background=(0, 0, 0)) -> np.ndarray:
    """A 12 x 12 map of `colour` strokes (column 4 and pixel (2, 8), 13 pixels) on `background`."""
    arr = np.empty((12, 12, len(colour)), np.uint8)
    arr[:] = background
    arr[:, 4] = colour
    arr[2, 8] = colour
    return arr


def test_edges_and_sketches_drawn_in_any_colour(tmp_path):
    white = save(tmp_path / "white.png", stroke_map((255, 255, 255)))
    expected = load_map(str(white), "edges")
    assert expected.sum() == 13
    for name, colour in {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "dim": (0, 0, 140),
    }.items():
        path = save(tmp_path / f"{name}.png", stroke_map(colour))
        assert torch.equal(load_map(str(path), "edges"), expected), name
    # sketches: brightest channel on black, darkest channel (inverted) on paper, alpha when transparent
    grey = load_map(str(save(tmp_path / "s.png", stroke_map((255,) * 3)[..., 0])), "sketch")
    blue_on_black = load_map(str(save(tmp_path / "sb.png", stroke_map((0, 0, 255)))), "sketch")
    red_on_paper = load_map(
        str(save(tmp_path / "sp.png", stroke_map((255, 0, 0), (255, 255, 255)))), "sketch"
    )
    black_on_paper = load_map(
        str(save(tmp_path / "sk.png", stroke_map((0, 0, 0), (255, 255, 255)))), "sketch"
    )
    ink = save(tmp_path / "ink.png", stroke_map((0, 0, 0, 255), (0, 0, 0, 0)))  # black strokes on transparent
    for got in (blue_on_black, red_on_paper, black_on_paper, load_map(str(ink), "sketch")):
        torch.testing.assert_close(got, grey)
    assert torch.equal(load_map(str(ink), "edges"), expected)
    # the pipeline: a red map in a pairs folder gives the white map's control
    for name, colour in (("a", (255, 0, 0)), ("b", (255, 255, 255))):
        save(tmp_path / "pairs" / "images" / f"{name}.png", np.full((12, 12, 3), 90, np.uint8))
        save(tmp_path / "pairs" / "edges" / f"{name}.png", stroke_map(colour))
    dm = ControlPairsDataModule(
        str(tmp_path / "pairs"), controls=["edges"], val_fraction=0.5, resolution=12, batch_size=1
    )
    dm.connect(12, ALL)
    maps = [dm.dataset(s)[0]["control"]["edges"] for s in ("train", "val")]
    assert torch.equal(maps[0], maps[1]) and maps[0].sum() == 13


def test_colour_depth_maps_are_refused_with_their_name(tmp_path):
    ramp = np.linspace(0, 1, 12)[None, :].repeat(12, 0)
    turbo = np.stack([ramp, 1 - np.abs(2 * ramp - 1), 1 - ramp], -1)  # a colour-mapped depth
    path = save(tmp_path / "depth.png", (turbo * 255).astype(np.uint8))
    with pytest.raises(ValueError, match=r"depth map file .*depth\.png: a colour image .*greyscale"):
        load_map(str(path), "depth")
    grey = save(tmp_path / "grey.png", np.repeat((ramp * 255).astype(np.uint8)[..., None], 3, -1))
    levels = (ramp * 255).astype(np.uint8) / 255
    np.testing.assert_allclose(load_map(str(grey), "depth")[0].numpy(), levels, atol=1e-6)


def test_extreme_aspect_ratios_follow_max_aspect(tmp_path):
    rng = np.random.default_rng(0)
    shapes = {"thin": (300, 1), "flat": (1, 300), "four": (8, 32), "square": (8, 8)}  # (H, W)
    for name, shape in shapes.items():
        save(tmp_path / "train" / "x" / f"{name}.png", rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    save(tmp_path / "val" / "x" / "also.png", textured(1, size=(8, 8)))
    args = dict(resolution=8, batch_size=1)
    dm = ClassFolderDataModule(str(tmp_path), **args)
    with pytest.warns(
        BadFileWarning, match=r"aspect ratio 300\.0:1 \(1 x 300 px\) is beyond data\.max_aspect=4"
    ):
        dm.setup("fit")
    assert reasons(dm.report) == {
        "thin.png": "aspect ratio 300.0:1 (1 x 300 px) is beyond data.max_aspect=4",
        "flat.png": "aspect ratio 300.0:1 (300 x 1 px) is beyond data.max_aspect=4",
    }
    assert [Path(r.image).stem for r in dm.dataset("train").records] == ["four", "square"]  # 4:1 is kept
    anything = ClassFolderDataModule(str(tmp_path), max_aspect=None, **args)
    anything.setup("fit")
    assert anything.report["skipped"] == [] and len(anything.dataset("train")) == 4
    with pytest.raises(ValueError, match=r"2 data file\(s\) refused .*flat\.png: aspect ratio"):
        ClassFolderDataModule(str(tmp_path), on_bad_file="error", **args).setup("fit")
    with pytest.raises(ValueError, match=r"data\.max_aspect is long side / short side, >= 1"):
        ClassFolderDataModule(str(tmp_path), max_aspect=0.5)
    trusted = ClassFolderDataModule(str(tmp_path), check_files="trust", **args)
    trusted.setup("fit")  # sizes unknown before the run: the dataset refuses the image when it loads it
    train = trusted.dataset("train")
    assert [Path(r.image).stem for r in train.records] == ["flat", "four", "square", "thin"]
    with pytest.warns(BadFileWarning) as seen:
        sample = train[3]  # thin, then flat (wrapping around): four is returned
    assert [str(w.message).split(". Sample")[0].split(": ")[1:] for w in seen] == [
        [
            f"image file {train.records[3].image}",
            "aspect ratio 300.0:1 (1 x 300 px) is beyond data.max_aspect=4",
        ],
        [
            f"image file {train.records[0].image}",
            "aspect ratio 300.0:1 (300 x 1 px) is beyond data.max_aspect=4",
        ],
    ]
    assert torch.equal(sample["image"], train[1]["image"])


def test_maps_of_another_size_warn_during_a_trusted_run(tmp_path):
    make_pairs(tmp_path)
    dm = pairs(tmp_path, check_files="trust")
    dm.setup("fit")
    dataset, i = by_name(dm)["d"]
    with pytest.warns(
        BadFileWarning, match=r"edges map file .*d\.png: 40 x 20 px, its image 40 x 40 px; resized"
    ):
        assert dataset[i]["control"]["edges"][0, :, 8].sum() == 40
    strict = pairs(tmp_path, check_files="trust", on_size_mismatch="skip")
    strict.setup("fit")
    dataset, i = by_name(strict)["c"]
    with pytest.warns(BadFileWarning) as seen:
        assert torch.equal(dataset[i]["image"], dataset[i + 1]["image"])  # d (another size): skipped too
    assert [str(w.message).split(". Sample")[0] for w in seen] == [
        f"data: edges map file {tmp_path / 'edges' / m}.png: {size} px, its image 40 x 40 px "
        "(data.on_size_mismatch=skip)"
        for m, size in (("c", "20 x 20"), ("d", "40 x 20"))
    ]


@pytest.mark.slow
def test_processes_that_find_different_files_are_refused_on_every_process(tmp_path):
    """Under DDP each process scans the files itself. A file the second process does not find (removed, or
    unreadable, while they scanned) would give it other samples and fewer batches, so that the processes
    wait for each other for ever: both refuse the run, naming the split and each process's count."""
    root = tmp_path / "data"
    for folder, count in (("same", 4), ("rank0", 4), ("rank1", 3)):
        for name, grey in GREY.items():
            for i in range(4 if name == "cat" else count):
                save(root / folder / name / f"{i}.png", np.full((8, 8, 3), grey + i, np.uint8))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = REPO / "tests" / "dist_data.py"
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(root)], cwd=REPO / "tests", env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((out / f"rank{rank}.json").read_text())
        assert result["same"] is None  # the same files: the run trains
        assert (
            "the processes found different data (train split: 6 samples on rank 0, 5 samples on rank 1"
            in (result["differ"] or "")
        )


def test_the_data_check_sees_a_photo_stored_sideways_at_its_upright_size(tmp_path):
    """A phone photo stored 80 x 64 with EXIF orientation 6 is read upright, 64 x 80 (load_image): the check
    before the run measures it so, and its 64 x 80 map is no size mismatch."""
    from datamodules.verify import FileInfo, inspect_file

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (80, 64), (200, 30, 30)).save(photo, exif=exif)
    assert inspect_file(str(photo), None, "header").size == (64, 80)
    assert inspect_file(str(photo), None, "decode").size == (64, 80)
    assert tuple(load_image(str(photo)).shape) == (3, 80, 64)
    plain = tmp_path / "plain.jpg"
    Image.new("RGB", (80, 64)).save(plain)
    assert inspect_file(str(plain), None, "header").size == (80, 64)
    png = tmp_path / "photo.png"  # EXIF in a PNG's header (eXIf chunk); the decode check still verifies it
    Image.new("RGB", (80, 64)).save(png, exif=exif)
    upright = FileInfo(size=(64, 80))
    assert inspect_file(str(png), None, "header") == inspect_file(str(png), None, "decode") == upright
    assert tuple(load_image(str(png)).shape) == (3, 80, 64)
