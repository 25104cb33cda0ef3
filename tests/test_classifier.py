"""The sample-scoring classifier: it learns the shapes, tells them apart; the score tool reads PNG names."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from datamodules.synthetic import CLASS_NAMES, VAL_OFFSET, SyntheticShapes
from varctl.callbacks import save_png
from varctl.metrics.classifier import (
    accuracy,
    class_names_from_files,
    colour_jitter,
    load_classifier,
    per_class_accuracy,
    predict,
    save_classifier,
    stack_dataset,
)

ROOT = Path(__file__).resolve().parents[1]
SIMPLE = dict(backgrounds=["solid"], max_distractors=0, keys=("image", "label"))
SCENES = {"backgrounds": ["solid"], "max_distractors": 0, "shape_colours": None, "background_colours": None}


def score_tool():
    spec = importlib.util.spec_from_file_location("score_samples", ROOT / "tools" / "score_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def val():
    return stack_dataset(SyntheticShapes(200, 32, offset=VAL_OFFSET, **SIMPLE), 200)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("classifiers")


@pytest.fixture(scope="module")
def trained(cache):
    """The judge the score tool trains for 32 px simple scenes (400 steps on 2000 images, colour-sensitive:
    the colour-invariant one needs ~1500 steps), through the tool's own cache, which the tool test reuses."""
    model = score_tool().get_classifier(32, SCENES, 0, 400, 2000, cache, colour_invariant=False)
    assert len(list(cache.glob("*.pt"))) == 1
    return model


def test_the_tool_caches_its_judge_with_its_settings(trained, val, cache):
    again = score_tool().get_classifier(32, SCENES, 0, 400, 2000, cache, colour_invariant=False)
    assert torch.equal(predict(again, val[0]), predict(trained, val[0]))  # read back, not trained again
    (path,) = cache.glob("*.pt")
    meta = torch.load(path, weights_only=True)["meta"]
    assert (meta["resolution"], meta["steps"], meta["num_train"], meta["colour_invariant"]) == (
        32,
        400,
        2000,
        False,
    )


def test_learns_the_shapes_of_unseen_scenes(trained, val):
    images, labels = val
    acc = accuracy(trained, images, labels)
    assert acc > 0.8, acc  # measured 0.965 (400 steps, 20 s); chance is 0.1
    # the score is about the shape: the same images judged against wrong classes score near zero
    assert accuracy(trained, images, (labels + 1) % 10) < 0.1
    # and not about colour statistics: flat images of each val image's mean colour are not recognised
    flat = images.mean((2, 3), keepdim=True).expand_as(images)
    assert accuracy(trained, flat, labels) < 0.35


def test_colour_jitter_keeps_the_shape_and_changes_the_colours(val):
    images = val[0][:16]
    out = colour_jitter(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= -1 and out.max() <= 1
    assert (out - images).abs().mean() > 0.2  # colours really change
    # each output channel is an affine function of one input channel: edges stay where they were
    edges_in = (images[:, :, :, 1:] - images[:, :, :, :-1]).abs().amax(1) > 0.05
    edges_out = (out[:, :, :, 1:] - out[:, :, :, :-1]).abs().amax(1) > 0.01
    assert (edges_out | ~edges_in).float().mean() > 0.99 and (edges_in | ~edges_out).float().mean() > 0.99


def test_per_class_accuracy_values():
    pred = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([0, 1, 1, 2, 2, 0])
    acc = per_class_accuracy(pred, labels, 4)
    assert acc[:3] == [0.5, 0.5, 1.0] and math.isnan(acc[3])


def test_save_load_round_trip_and_meta(trained, val, tmp_path):
    path = tmp_path / "clf.pt"
    save_classifier(trained, path, {"resolution": 32})
    loaded = load_classifier(path, {"resolution": 32})
    assert torch.equal(predict(loaded, val[0]), predict(trained, val[0]))
    assert load_classifier(path, {"resolution": 64}) is None  # trained for other settings
    assert load_classifier(tmp_path / "absent.pt") is None


def test_labels_from_predict_file_names():
    names = ["b00000_class_star_0.png", "r1_b00002_class_heart_3.png", "class_ring_12.png"]
    assert class_names_from_files(names, CLASS_NAMES) == [3, 8, 4]
    captions = ["b00001_caption2_0_a_large_white_star_on_the_left_on_a_plain_black_background.png"]
    captions += ["b00000_caption0_3_a_yellow_ellipse_in_the_center.png"]
    assert class_names_from_files(captions, CLASS_NAMES) == [3, 9]
    for bad in ("b00000_sample_0.png", "b00000_caption0_0_a_star_and_a_ring.png", "b0_caption0_0_stars.png"):
        with pytest.raises(ValueError, match=r"cannot tell the class from the file name.*class_<name>_<i>"):
            class_names_from_files([bad], CLASS_NAMES)


def test_score_tool_on_real_images(trained, val, cache, tmp_path, monkeypatch, capsys):
    """End to end (the tool's main, in this process): real val images written as a predictions folder score
    high, mislabelled ones low; the judge comes from the cache the fixture filled."""
    images, labels = val
    good, bad = tmp_path / "good" / "predictions", tmp_path / "bad" / "predictions"
    for i in range(40):
        name = CLASS_NAMES[int(labels[i])]
        wrong = CLASS_NAMES[(int(labels[i]) + 3) % 10]
        save_png(images[i] * 0.5 + 0.5, good / f"b00000_class_{name}_{i}.png")
        save_png(images[i] * 0.5 + 0.5, bad / f"b00000_class_{wrong}_{i}.png")
    (tmp_path / "good" / "config_predict.yaml").write_text(
        "data: {backgrounds: [solid], max_distractors: 0}\n"
    )
    tool = score_tool()

    def score(folder: Path, *extra: str) -> float:
        # the fixture's judge: 400 steps, colour-sensitive (the colour-invariant one needs ~1500 at 32 px)
        args = [
            str(folder),
            "--steps",
            "400",
            "--num-train",
            "2000",
            "--num-val",
            "200",
            "--colour-sensitive",
        ]
        monkeypatch.setattr(sys, "argv", ["score_samples.py", *args, "--cache", str(cache), *extra])
        tool.main()
        out = capsys.readouterr().out
        assert "(cached)" in out  # not trained again
        line = next(s for s in out.splitlines() if "samples (target" in s)
        return float(line.split(":")[1].split("%")[0]) / 100

    assert score(good) > 0.8  # data options read from the run's config_predict.yaml
    # the bad folder has no config: the options come from the flags; the cached classifier is reused
    assert score(bad, "--backgrounds", "solid", "--max-distractors", "0") < 0.1
    assert len(list(cache.glob("*.pt"))) == 1
    # a palette the data module would refuse is refused here too, before any training
    monkeypatch.setattr(sys, "argv", ["score_samples.py", str(good), "--shape-colours", "mauve"])
    with pytest.raises(ValueError, match="data.shape_colours"):
        tool.main()
