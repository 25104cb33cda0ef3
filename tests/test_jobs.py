"""Generation jobs (datamodules/jobs.py, varctl/lit/jobs.py): a folder of edge maps becomes same-named
images, reruns resume, each image's seed comes from its name (so batching does not matter), bad inputs are
skipped by name, job lists with per-row settings, in-painting, out-painting and editing through predict."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from helpers import save, textured
from PIL import Image

from datamodules.jobs import GenerationJobs, OutputsDiffer, job_seed
from datamodules.synthetic import SyntheticDataModule
from varctl.callbacks import ImageWriter
from varctl.lit.control import ControlModule
from varctl.lit.jobs import paste_input
from varctl.lit.var import VARModule
from varctl.models.var_generate import Known

pytestmark = pytest.mark.usefixtures("one_thread")

BRANCH = {"modalities": ["edges"], "width": 8, "feature_dim": 32, "max_width": 32}


@pytest.fixture(scope="module")
def files(tokenizer_file, tmp_path_factory):
    """(tokenizer file, VAR file): the tiny random tokenizer and a random tiny class VAR."""
    torch.manual_seed(0)
    base = VARModule(tokenizer_file, var={"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2})
    return tokenizer_file, str(base.var.save(tmp_path_factory.mktemp("jobs") / "var.pt"))


@pytest.fixture(scope="module")
def control(files):
    """A control model whose branch matters (perturbed away from its zero init)."""
    torch.manual_seed(1)
    m = ControlModule(files[0], init_from=files[1], control=BRANCH, scores={"batches": 0})
    with torch.no_grad():
        for p in m.control.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


@pytest.fixture(scope="module")
def edge_maps(tmp_path_factory):
    """A folder with only edges/: 5 edge maps of synthetic shapes (two of them at another size)."""
    root = tmp_path_factory.mktemp("edge_jobs")
    dm = SyntheticDataModule(
        num_train=8, num_val=8, batch_size=4, resolution=32, controls=["edges"], max_distractors=0
    )
    dm.connect(32, ("image", "label", "control"))
    for i in range(5):
        edges = dm.dataset("val")[i]["control"]["edges"][0].numpy()
        if i >= 3:
            edges = np.kron(edges, np.ones((2, 2), np.float32))  # 64 px: resized to the model's 32
        save(root / "edges" / f"shape_{i}.png", (edges * 255).astype(np.uint8))
    return root


def predict(module, dm, **kw) -> L.Trainer:
    dm.connect(**module.data_requirements())
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ImageWriter(dm.output_dir)], **kw)  # fmt: skip
    trainer.predict(module, dm, return_predictions=False)
    return trainer


def read(path: Path) -> np.ndarray:
    return np.array(Image.open(path))


def expected(module, maps: dict, seed: int, label: int = -1, **kw) -> np.ndarray:
    """The image ``generate`` draws for one job alone (batch of 1), as the PNG stores it."""
    n = module.var.config.num_classes
    cond = torch.tensor([n if label < 0 else label])
    args = {**module.predictions.generate_kwargs(control=True), **kw, "seed": [seed]}
    with torch.no_grad():
        image = module.model.generate(cond, vae=module.vae, control_maps=maps, **args)[0]
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def same(a: np.ndarray, b: np.ndarray) -> None:
    """The same image up to float rounding (a batch of 8 and a batch of 1 round matmuls differently): no
    pixel off by more than one level."""
    assert a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1


def map_of(dm: GenerationJobs, name: str) -> dict:
    item = next(it for it in dm.dataset("predict") if it["name"] == name)
    return {m: t[None] for m, t in item["control"].items()}


def test_a_folder_of_edge_maps_becomes_same_named_images_and_a_rerun_resumes(control, edge_maps, capsys):
    out = edge_maps / "generated"
    dm = GenerationJobs(root=str(edge_maps), batch_size=2)
    predict(control, dm)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"shape_{i}.png" for i in range(5)]
    assert "5 written, 0 skipped (existing), 0 failed" in capsys.readouterr().out
    for i in range(5):  # each image is the one its map and its name's seed give, alone in its batch
        maps = map_of(dm, f"shape_{i}")
        same(read(out / f"shape_{i}.png"), expected(control, maps, job_seed(0, f"shape_{i}")))
    images = [read(out / n) for n in names]
    assert not all(np.array_equal(images[0], im) for im in images[1:])  # the maps matter
    stamps = {n: os.stat(out / n).st_mtime_ns for n in names}
    (out / "shape_2.png").unlink()  # an interrupted job: one output missing
    again = GenerationJobs(root=str(edge_maps), batch_size=3)
    predict(control, again)
    assert "1 written, 4 skipped (existing)" in capsys.readouterr().out
    assert all(os.stat(out / n).st_mtime_ns == stamps[n] for n in names if n != "shape_2.png")
    same(read(out / "shape_2.png"), images[2])  # the same image, batched otherwise
    predict(control, GenerationJobs(root=str(edge_maps)))
    assert "0 written, 5 skipped (existing)" in capsys.readouterr().out
    predict(control, GenerationJobs(root=str(edge_maps), overwrite=True, seed=5, sheets=True))
    assert "5 written, 0 skipped" in capsys.readouterr().out
    assert not np.array_equal(read(out / "shape_0.png"), images[0])  # another job seed
    sheet = read(out / "shape_0_sheet.png")
    assert sheet.shape == (32, 64, 3)  # edges | sample
    assert np.array_equal(sheet[:, 32:], read(out / "shape_0.png"))


def test_a_bad_input_is_reported_by_name_and_the_job_goes_on(control, tmp_path, capsys):
    for i in range(3):
        save(tmp_path / "edges" / f"ok_{i}.png", (np.eye(32)[::-1] * 255).astype(np.uint8))
    (tmp_path / "edges" / "broken.png").write_bytes(b"not a png")
    save(tmp_path / "images" / "small_mask.png", textured(0, size=(32, 32)))
    save(tmp_path / "masks" / "small_mask.png", np.full((16, 16), 255, np.uint8))  # not the image's size
    predict(control, GenerationJobs(root=str(tmp_path), batch_size=4))
    printed = capsys.readouterr().out
    assert "skipped broken" in printed and "broken.png" in printed
    assert "skipped small_mask" in printed and "{'mask': (16, 16)} differ" in printed
    assert "3 written, 0 skipped (existing), 2 failed" in printed
    assert sorted(p.name for p in (tmp_path / "generated").glob("*.png")) == [f"ok_{i}.png" for i in range(3)]


def test_a_job_list_with_labels_seeds_overrides_and_several_samples(control, edge_maps, tmp_path):
    rows = [
        {"name": "circle", "edges": str(edge_maps / "edges" / "shape_0.png"), "label": 0, "seed": 7},
        {"edges": str(edge_maps / "edges" / "shape_1.png"), "cfg": 1.0, "control_cfg": 2.0},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(r) for r in rows))
    dm = GenerationJobs(list=str(jobs), output=str(tmp_path / "out"), samples_per_input=2)
    predict(control, dm)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == ["circle_0.png", "circle_1.png", "shape_1_0.png",
                                                          "shape_1_1.png"]  # fmt: skip
    first = expected(control, map_of(dm, "circle_0"), 7, label=0)  # the row's seed, for its first sample
    same(read(out / "circle_0.png"), first)
    same(
        read(out / "circle_1.png"),
        expected(control, map_of(dm, "circle_1"), job_seed(7, "circle_1"), label=0),
    )
    guided = expected(control, map_of(dm, "shape_1_0"), job_seed(0, "shape_1_0"), cfg=1.0, control_cfg=2.0)
    same(read(out / "shape_1_0.png"), guided)
    assert not np.array_equal(read(out / "circle_0.png"), read(out / "circle_1.png"))


def test_job_list_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"edges": "a.png"}\n{"edges": "b.png", "colour": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown column\(s\) \['colour'\]"):
        GenerationJobs(list=str(bad)).jobs()
    bad.write_text('{"mask": "m.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a mask needs the image it applies to"):
        GenerationJobs(list=str(bad)).jobs()
    for row, message in [
        ({"name": "x", "seed": 3}, "a job needs control maps (['edges']), an image, or (to draw a sample)"),
        ({"label": 1}, "a sampling job (a label or caption, no input file) needs a name"),
        ({"name": "x", "label": 1, "outpaint": {"scale": 0.5, "x": 0, "y": 0}}, "outpaint needs an image"),
    ]:  # fmt: skip
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=re.escape("bad.jsonl:1: " + message)):
            GenerationJobs(list=str(bad), controls=["edges"]).jobs()
    bad.write_text('{"edges": "a.png", "name": "x"}\n{"edges": "b.png", "name": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: the name 'x' is used by line 1"):
        GenerationJobs(list=str(bad)).jobs()
    with pytest.raises(ValueError, match="exactly one of data.root"):
        GenerationJobs()
    with pytest.raises(ValueError, match="for `predict` only"):
        GenerationJobs(root=str(tmp_path)).train_dataloader()


def test_a_list_of_labels_draws_class_samples_as_resumable_jobs(files, control, tmp_path, capsys):
    """Rows with a label and a name but no file: samples of a class model (an FID set, say), K per row, each
    as ``generate`` draws it alone with the job's seed; a rerun draws nothing. A control model refuses such a
    row before anything is drawn."""
    rows = [{"name": "c1", "label": 1}, {"name": "c2", "label": 2, "seed": 5}, {"name": "free", "label": -1}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = VARModule(files[0], init_from=files[1]).eval()
    jobs = {"list": str(tmp_path / "jobs.jsonl"), "output": str(tmp_path / "out"), "samples_per_input": 2}
    predict(module, GenerationJobs(**jobs, batch_size=4))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.png")) == [
        "c1_0.png", "c1_1.png", "c2_0.png", "c2_1.png", "free_0.png", "free_1.png"
    ]  # fmt: skip
    kw = module.predictions.generate_kwargs()
    for name, label, seed in [
        ("c1_1", 1, job_seed(0, "c1_1")),
        ("c2_0", 2, 5),
        ("free_0", 10, job_seed(0, "free_0")),
    ]:
        with torch.no_grad():  # label -1 (free): the null class, 10
            want = module.var.generate(torch.tensor([label]), vae=module.vae, **{**kw, "seed": [seed]})[0]
        got = torch.from_numpy(read(out / f"{name}.png")).permute(2, 0, 1) / 255
        assert (got - want).abs().max() <= 1 / 255 + 1e-6, name
    assert not np.array_equal(read(out / "c1_0.png"), read(out / "c1_1.png"))
    capsys.readouterr()
    predict(module, GenerationJobs(**jobs))
    assert "0 written, 6 skipped (existing), 0 failed" in capsys.readouterr().out
    message = "jobs.jsonl:1: a sampling job (no input file), but a control model draws from control maps"
    with pytest.raises(ValueError, match=re.escape(message)):
        predict(control, GenerationJobs(**{**jobs, "output": str(tmp_path / "control")}))
    assert not (tmp_path / "control").exists() or not any((tmp_path / "control").iterdir())


def photos(root: Path, n: int = 2) -> None:
    for i in range(n):
        save(root / "images" / f"photo_{i}.png", textured(i, size=(32, 32)))
        mask = np.zeros((32, 32), np.uint8)
        mask[:16, :16] = 255  # redraw the top-left quarter
        save(root / "masks" / f"photo_{i}.png", mask)


@pytest.mark.parametrize("stage", ["var", "control"])
def test_inpainting_through_predict_keeps_the_input_outside_the_mask(files, control, tmp_path, stage):
    photos(tmp_path)
    torch.manual_seed(0)
    module = control if stage == "control" else VARModule(files[0], init_from=files[1]).eval()
    dm = GenerationJobs(root=str(tmp_path), controls=[] if stage == "var" else ["edges"])
    raw = GenerationJobs(root=str(tmp_path), controls=dm.controls, output=str(tmp_path / "raw"),
                         keep_input=False)  # fmt: skip
    predict(module, dm), predict(module, raw)
    for i in range(2):
        item = next(it for it in dm.dataset("predict") if it["name"] == f"photo_{i}")
        assert item["edit"] and item["mask"].sum() == 16 * 16
        assert item["present"] == (() if stage == "var" else ("edges",))  # the photo's Canny edges
        known = Known.from_image(module.vae, item["image"][None], item["mask"][None])
        kw = {
            **module.predictions.generate_kwargs(control=stage == "control"),
            "seed": [job_seed(0, item["name"])],
        }
        if stage == "control":
            kw["control_maps"] = {m: t[None] for m, t in item["control"].items()}
        with torch.no_grad():
            want = module.eval_model.generate(torch.tensor([10]), vae=module.vae, known=known, **kw)[0]
            plain = module.eval_model.generate(torch.tensor([10]), vae=module.vae, **kw)[0]
        got = torch.from_numpy(read(tmp_path / "generated" / f"photo_{i}.png")).permute(2, 0, 1) / 255
        pasted = paste_input(want[None], item["image"][None], item["mask"][None])[0]
        assert (got - pasted).abs().max() <= 1 / 255 + 1e-6
        photo = torch.from_numpy(textured(i, size=(32, 32))).permute(2, 0, 1) / 255
        outside = item["mask"][0] == 0
        assert (got - photo)[:, outside].abs().max() <= 1 / 255 + 1e-6  # the input's own pixels
        assert (want - photo)[:, outside].abs().max() > 0.05  # which the decoder alone does not give
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[:15, :15] = True  # the mask, but for the 1-pixel seam at its edge
        assert torch.equal(got[:, inside], (want[:, inside] * 255).round() / 255)
        assert (got - plain).abs().max() > 0.05  # the input shapes the output
        # keep_input=false: the decoder's output everywhere
        unpasted = torch.from_numpy(read(tmp_path / "raw" / f"photo_{i}.png")).permute(2, 0, 1) / 255
        assert (unpasted - want).abs().max() <= 1 / 255 + 1e-6


def test_pasting_the_input_keeps_it_exactly_outside_the_mask_and_blends_only_the_mask_edge():
    drawn, image = torch.zeros(1, 3, 128, 128), torch.ones(1, 3, 128, 128)  # black drawn, a white input
    redraw = torch.zeros(1, 1, 128, 128)
    redraw[..., 32:96, 32:96] = 1
    out = paste_input(drawn, image, redraw)
    assert torch.equal(out[..., redraw[0, 0] == 0], torch.ones_like(out[..., redraw[0, 0] == 0]))
    assert out[..., 34:94, 34:94].abs().max() == 0  # two pixels (128 // 64) in from the edge: drawn alone
    edge = out[0, 0, 64, 32:35]  # along a row into the mask: 2 of the 5 columns around kept, 1, then none
    torch.testing.assert_close(edge, torch.tensor([2 / 5, 1 / 5, 0.0]))


def test_outpainting_places_the_image_and_redraws_the_rest(files, tmp_path):
    save(tmp_path / "images" / "photo.png", textured(3, size=(32, 32)))
    dm = GenerationJobs(root=str(tmp_path), controls=[], outpaint={"scale": 0.5, "x": 0.0, "y": 1.0})
    dm.connect(32, ())
    item = dm.dataset("predict")[0]
    assert item["edit"] and item["mask"][0, 16:, :16].sum() == 0 and item["mask"].sum() == 32 * 32 - 16 * 16
    photo = torch.from_numpy(textured(3, size=(32, 32))).permute(2, 0, 1).float() / 127.5 - 1
    small = torch.nn.functional.interpolate(photo[None], size=(16, 16), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(item["image"][:, 16:, :16], small, atol=1e-5, rtol=0)  # bottom left
    assert item["image"][:, :16].abs().max() == 0  # a grey canvas elsewhere
    # the stage's own predict labels (40 images) are not what a job draws: no warning about their room
    module = VARModule(files[0], init_from=files[1], predict={"labels": list(range(10))}).eval()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*images are configured")
        predict(module, dm)
    got = torch.from_numpy(read(tmp_path / "generated" / "photo.png")).permute(2, 0, 1) / 255
    assert (got[:, 16:, :16] - small.add(1).mul(0.5)).abs().max() <= 1 / 255 + 1e-6  # the photo, as placed


def test_editing_with_a_new_class(files, tmp_path):
    photos(tmp_path, n=1)
    row = {"name": "as_star", "image": "images/photo_0.png", "mask": "masks/photo_0.png", "label": 3}
    (tmp_path / "jobs.jsonl").write_text(json.dumps(row) + "\n")
    module = VARModule(files[0], init_from=files[1]).eval()
    dm = GenerationJobs(list=str(tmp_path / "jobs.jsonl"))
    predict(module, dm)
    item = next(it for it in dm.dataset("predict") if it["name"] == "as_star")
    known = Known.from_image(module.vae, item["image"][None], item["mask"][None])
    kw = {**module.predictions.generate_kwargs(), "seed": [job_seed(0, "as_star")]}
    with torch.no_grad():
        want = module.var.generate(torch.tensor([3]), vae=module.vae, known=known, **kw)[0]
    got = torch.from_numpy(read(tmp_path / "generated" / "as_star.png")).permute(2, 0, 1) / 255
    want = paste_input(want[None], item["image"][None], item["mask"][None])[0]
    assert (got - want).abs().max() <= 1 / 255 + 1e-6


def test_jobs_a_model_can_never_draw_are_refused_before_anything_is_drawn(
    files, control, edge_maps, tmp_path
):
    """Control maps for a VAR without a control branch, an image with neither a mask nor outpaint for it,
    control settings it has no use for, a per-scale list without one value per scale: refused with the row's
    line (and how many other jobs alike) before the model draws, not failures of the run's jobs."""
    photos(tmp_path, n=1)
    var = VARModule(files[0], init_from=files[1]).eval()
    edge, image, mask = str(edge_maps / "edges" / "shape_0.png"), "images/photo_0.png", "masks/photo_0.png"
    good = {"name": "good", "image": image, "mask": mask}
    need = "control maps ['edges'] need a control model (conf/control.yaml); this VAR has no control branch"
    cases = [
        ({"edges": edge}, need),
        ({"edges": edge, "image": image}, need),  # the photo's edges would be all it has: nothing to redraw
        ({"image": image}, "an image with neither a mask nor outpaint: a VAR without a control branch has "),
        ({**good, "control_strength": 0.5}, "['control_strength'] apply to a control model only"),
        ({**good, "control_cfg": 2}, "['control_cfg'] apply to a control model only"),
    ]
    out = tmp_path / "out"
    for row, message in cases:
        (tmp_path / "jobs.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**row, "name": "bad"}))
        with pytest.raises(ValueError, match=re.escape(f"jobs.jsonl:2: {message}")):
            predict(var, GenerationJobs(list=str(tmp_path / "jobs.jsonl"), output=str(out)))
        assert not out.exists() or not list(out.glob("*.png"))
    # an image alone with data.outpaint is a job the VAR draws: only what can never work is refused
    (tmp_path / "jobs.jsonl").write_text(
        json.dumps(good) + "\n" + json.dumps({"name": "bad", "image": image})
    )
    dm = GenerationJobs(list=str(tmp_path / "jobs.jsonl"), outpaint={"scale": 0.5})
    dm.connect(**var.data_requirements())
    dm.setup("predict")
    var.check_data(dm)
    # a folder of edge maps for a VAR: the first named, the others counted
    dm = GenerationJobs(root=str(edge_maps), output=str(out))
    dm.connect(**var.data_requirements())
    dm.setup("predict")
    with pytest.raises(ValueError, match=re.escape(f"shape_0: {need} (4 more job(s) refused too: shape_1, ")):
        var.check_data(dm)

    # per-scale lists: one value per scale of the model (3 here)
    assert control.var.config.num_scales == 3
    rows = [{"edges": edge, "name": "a", "control_strength": [1, 2, 1]},
            {"edges": edge, "name": "b", "top_k": [0, 2]}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = GenerationJobs(list=str(tmp_path / "jobs.jsonl"))
    dm.connect(**control.data_requirements())
    dm.setup("predict")
    assert [it[0].overrides for it in dm.dataset("predict").items] == [
        {"control_strength": [1.0, 2.0, 1.0]}, {"top_k": [0.0, 2.0]}
    ]  # fmt: skip
    message = "jobs.jsonl:2: top_k holds 2 values, but the model draws 3 scales: give one value per scale"
    with pytest.raises(ValueError, match=re.escape(message)):
        dm.check_scales(3)
    with pytest.raises(ValueError, match=re.escape("jobs.jsonl:1: control_strength holds 3 values")):
        dm.check_scales(2)


def test_output_names_stay_in_the_folder_and_never_share_a_file(control, edge_maps, tmp_path, capsys):
    """Names with '..' or an absolute path, names equal but for case (one file on macOS and Windows), and
    a name that is another job's sheet are refused before anything is drawn; so is an output folder that
    holds the inputs, or an output that is a file."""
    edge = str(edge_maps / "edges" / "shape_0.png")

    def jobs(*rows, **kw):
        (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps({"edges": edge, **r}) for r in rows))
        return GenerationJobs(list=str(tmp_path / "jobs.jsonl"), controls=["edges"], **kw)

    for name in ("../escape", str(tmp_path / "abs")):
        with pytest.raises(
            ValueError, match="jobs.jsonl:1: the name .* must be a file name inside the output folder"
        ):
            jobs({"name": name}).jobs()
    with pytest.raises(ValueError, match="jobs.jsonl:2: the name 'Cat' is used by line 1 too"):
        jobs({"name": "cat"}, {"name": "Cat"}).jobs()
    dm = jobs({"name": "a"}, {"name": "a_sheet"}, sheets=True)
    dm.connect(**control.data_requirements())
    with pytest.raises(
        ValueError, match=r"jobs.jsonl:2: its output a_sheet.png is also an output of .*jobs.jsonl:1"
    ):
        dm.setup("predict")
    for folder in ("edges", "images"):  # folders: stems that differ only in case
        save(
            tmp_path / "folder" / folder / f"{'Shape' if folder == 'edges' else 'shape'}.png",
            textured(0, (32, 32)),
        )
    with pytest.raises(ValueError, match="'Shape' and 'shape' differ only in case"):
        GenerationJobs(root=str(tmp_path / "folder")).jobs()
    assert not (tmp_path / "generated").exists() and not (edge_maps.parent / "escape.png").exists()

    # an output folder that holds the inputs: a photo would pass for a finished output, or be replaced
    photo = save(tmp_path / "photos" / "images" / "p.png", textured(1, (32, 32)))
    before = photo.read_bytes()
    for output in (tmp_path / "photos" / "images", photo.parent / "." / ".." / "images"):
        for overwrite in (False, True):
            inplace = GenerationJobs(root=str(tmp_path / "photos"), output=str(output), overwrite=overwrite)
            inplace.connect(**control.data_requirements())
            with pytest.raises(ValueError, match=r"p: its output .*p.png is an input file of the jobs: set "
                                                 "data.output to another folder"):  # fmt: skip
                inplace.setup("predict")
    assert photo.read_bytes() == before
    with pytest.raises(ValueError, match=r"data.output=.*p.png is a file: expected a folder"):
        GenerationJobs(root=str(tmp_path / "photos"), output=str(photo))


def test_a_job_with_sheets_is_done_when_its_sheet_is_written(control, edge_maps, tmp_path, capsys):
    out = tmp_path / "out"
    predict(control, GenerationJobs(root=str(edge_maps), output=str(out), batch_size=5))
    assert "5 written" in capsys.readouterr().out and not list(out.glob("*_sheet.png"))
    # sheets asked for later (or lost in a crash between the two files): those jobs are drawn again
    (out / "shape_1.png").unlink()
    predict(control, GenerationJobs(root=str(edge_maps), output=str(out), sheets=True, batch_size=5))
    assert "5 written, 0 skipped" in capsys.readouterr().out
    assert len(list(out.glob("*_sheet.png"))) == 5
    predict(control, GenerationJobs(root=str(edge_maps), output=str(out), sheets=True))
    assert "0 written, 5 skipped" in capsys.readouterr().out


def test_every_bad_value_of_a_job_list_names_its_line(edge_maps, tmp_path):
    edge = str(edge_maps / "edges" / "shape_0.png")
    (tmp_path / "jobs.csv").write_text(f"edges,outpaint\n{edge},{{scale: 0.5\n")  # not JSON
    with pytest.raises(ValueError, match=r"jobs.csv:2: Expecting property name"):
        GenerationJobs(list=str(tmp_path / "jobs.csv")).jobs()
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"edges": edge, "outpaint": {"scale": "half"}}))
    with pytest.raises(ValueError, match=r"jobs.jsonl:1: outpaint values must be numbers"):
        GenerationJobs(list=str(tmp_path / "jobs.jsonl")).jobs()
    # JSON null is a value not given, as an empty CSV cell: no caption "None", no image ".../None"
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"edges": edge, "caption": None, "image": None}))
    (job,) = GenerationJobs(list=str(tmp_path / "jobs.jsonl")).jobs()
    assert job.caption == "" and job.image is None and job.name == "shape_0"


def test_a_row_the_model_cannot_draw_refuses_the_list_before_anything_is_drawn(control, edge_maps, tmp_path):
    """A label the model lacks or a caption for a class model (which it would ignore) is a mistake in the
    list: refused with its line before any image is drawn, not a failure of the rows batched with it."""
    edge = str(edge_maps / "edges" / "shape_0.png")
    cases = [
        ({"label": 10}, "jobs.jsonl:2: label 10 out of range, the model has 10 classes: expected [0, 10)"),
        ({"label": -2}, "jobs.jsonl:2: label -2 out of range"),
        ({"caption": "a red star"}, "jobs.jsonl:2: caption given, but the model is class-conditioned"),
    ]
    for extra, message in cases:
        rows = [{"name": "good", "edges": edge, "label": 1}, {"name": "bad", "edges": edge, **extra}]
        (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        dm = GenerationJobs(list=str(tmp_path / "jobs.jsonl"), output=str(tmp_path / "out"), batch_size=4)
        with pytest.raises(ValueError, match=re.escape(message)):
            predict(control, dm)  # the module's setup checks the data against the model
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"edges": edge, "seed": 2**64}) + "\n")
    with pytest.raises(ValueError, match=r"jobs.jsonl:1: seed 18446744073709551616 out of range, expected"):
        GenerationJobs(list=str(tmp_path / "jobs.jsonl")).jobs()


def test_a_resumed_job_refuses_images_drawn_with_other_settings(control, edge_maps, tmp_path, capsys):
    """The output folder logs what each image was drawn with (jobs_settings.jsonl): a rerun with other
    weights, sampling settings, data seed, or a changed row of a drawn job does not take its image for
    finished (a folder of mixed settings reported as a clean resume); rows of jobs not drawn yet may change;
    the same settings resume; a redraw cut short leaves the images it did not reach refused; images without
    a record are kept."""
    edges = [str(edge_maps / "edges" / f"shape_{i}.png") for i in range(3)]

    def run(rows, **kw):
        (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return predict(control, GenerationJobs(list=str(tmp_path / "jobs.jsonl"), batch_size=2, **kw))

    def log():
        return [json.loads(line) for line in (out / "jobs_settings.jsonl").read_text().splitlines()]

    rows = [{"name": f"s{i}", "edges": e, "label": 1} for i, e in enumerate(edges)]
    out = tmp_path / "generated"
    run(rows)
    (first,) = [e for e in log() if "settings_id" in e]
    assert first["settings"]["data"]["seed"] == 0
    assert sorted(e["image"] for e in log() if "image" in e) == ["s0", "s1", "s2"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    (out / "s2.png").unlink()  # interrupted

    cfg = control.predictions.cfg
    changed = {
        "data.seed was 0, now 5": lambda: run(rows, seed=5),
        "the rows of 1 job(s) changed: s1": lambda: run([*rows[:1], {**rows[1], "label": 2}, rows[2]]),
        "model.predict was {": lambda: run(rows),  # cfg changed below
    }
    for message, rerun in changed.items():
        if message.startswith("model.predict"):
            control.predictions = dataclasses.replace(control.predictions, cfg=cfg + 1)
        try:
            with pytest.raises(OutputsDiffer, match=re.escape(message)):
                rerun()
        finally:
            control.predictions = dataclasses.replace(control.predictions, cfg=cfg)
    assert not (out / "s2.png").exists()  # nothing drawn
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == {
        n: stamps[n] for n in ("s0.png", "s1.png")
    }

    rows[2] = {**rows[2], "label": 3}  # the row of a job not drawn yet: free to change
    run(rows)  # the same settings: resumes
    assert "1 written, 2 skipped (existing)" in capsys.readouterr().out
    # a redraw with other settings that reached s0 only (its list held s0 alone): s1 is still seed 0's
    run(rows[:1], overwrite=True, seed=5)
    with pytest.raises(OutputsDiffer, match=re.escape("data.seed was 0, now 5")):
        run(rows, seed=5)
    run(rows, seed=5, overwrite=True)
    assert "3 written, 0 skipped" in capsys.readouterr().out

    (out / "jobs_settings.jsonl").unlink()  # images from elsewhere: kept, with a warning
    (out / "s0.png").unlink()
    with pytest.warns(UserWarning, match="2 existing images have no record of their settings"):
        run(rows, seed=7)
    assert "1 written, 2 skipped (existing)" in capsys.readouterr().out


def test_jobs_under_a_sharded_strategy_are_refused(edge_maps):
    """A process with no job left skips predict, and under FSDP the others would wait for it in the sharded
    model's collectives: one process or DDP only, said before any image."""

    class ModelParallelStrategy:  # the name is what is checked
        pass

    dm = GenerationJobs(root=str(edge_maps))
    dm.connect(32, ("image", "label", "control"))
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, strategy=ModelParallelStrategy())
    with pytest.raises(
        ValueError, match="data=jobs runs on one process or under DDP, not ModelParallelStrategy"
    ):
        dm.predict_dataloader()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"top_p": 2}, "top_p must be in [0, 1] (0 = off), found 2.0"),
        ({"top_p": [0.5, 2, 0.5]}, "top_p must be in [0, 1] (0 = off), found 2.0"),
        ({"temperature": -1}, "temperature must be > 0, found -1.0"),
        ({"temperature": 0}, "temperature must be > 0, found 0.0"),
        ({"top_k": -5}, "top_k must be an integer >= 0 (0 = off), found -5.0"),
        ({"top_k": 1.5}, "top_k must be an integer >= 0 (0 = off), found 1.5"),
        ({"cfg": True}, "cfg must be a finite number or a per-scale list of them, found True"),
        ({"cfg": "high"}, "cfg must be a finite number or a per-scale list of them, found 'high'"),
        ({"cfg": float("nan")}, "cfg must be a finite number or a per-scale list of them, found nan"),
        ({"control_strength": []}, "control_strength must be a finite number or a per-scale list of them"),
        ({"control_cfg": [1, "x"]}, "control_cfg must be a finite number or a per-scale list of them"),
        ({"seed": 1.5}, "seed must be an integer, found 1.5"),
        ({"label": True}, "label must be an integer, found True"),
        ({"label": "2.0"}, "label must be an integer, found '2.0'"),
        ({"name": ""}, "the name '' must be a file name inside the output folder (not empty, no path"),
        ({"name": "a/b"}, "the name 'a/b' must be a file name inside the output folder"),
        ({"name": "a\\b"}, "the name 'a\\\\b' must be a file name inside the output folder"),
        ({"name": ".."}, "the name '..' must be a file name inside the output folder"),
        ({"outpaint": {"scale": 0.5}}, "outpaint needs an image (column 'image')"),  # maps alone
    ],
)
def test_every_value_and_shape_of_a_row_is_checked_with_its_line(edge_maps, tmp_path, extra, message):
    """Sampling values out of the sampler's ranges, seeds and labels that are not integers, names that are
    no file name, outpaint without an image: refused when the list is read, naming the file and line."""
    edge = str(edge_maps / "edges" / "shape_0.png")
    rows = [{"name": "ok", "edges": edge}, {"name": "x", "edges": edge, **extra}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"jobs.jsonl:2: {message}")):
        GenerationJobs(list=str(tmp_path / "jobs.jsonl")).jobs()


def test_good_row_values_are_read_exactly_from_jsonl_and_csv(edge_maps, tmp_path):
    edge = str(edge_maps / "edges" / "shape_0.png")
    row = {"name": "n", "edges": edge, "seed": 7, "label": 3, "top_k": 5, "top_p": 0.9, "temperature": 0.5,
           "cfg": [1, 2, 3]}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(row) + "\n")
    (line,) = GenerationJobs(list=str(tmp_path / "jobs.jsonl")).jobs()
    (tmp_path / "jobs.csv").write_text(f'name,edges,seed,label,top_k,top_p,temperature,cfg\nn,{edge},7,3,5,'
                                       '0.9,0.5,"[1, 2, 3]"\n')  # fmt: skip
    (cell,) = GenerationJobs(list=str(tmp_path / "jobs.csv")).jobs()
    for job in (line, cell):
        assert (job.name, job.seed, job.label) == ("n", 7, 3)
        assert job.overrides == {"top_k": 5.0, "top_p": 0.9, "temperature": 0.5, "cfg": [1.0, 2.0, 3.0]}
    (tmp_path / "jobs.csv").write_text(f"name,edges,seed\nn,{edge},1.5\n")
    with pytest.raises(ValueError, match=re.escape("jobs.csv:2: seed must be an integer, found '1.5'")):
        GenerationJobs(list=str(tmp_path / "jobs.csv")).jobs()


def test_an_output_folder_that_cannot_be_made_is_refused_when_the_data_is_built(edge_maps, tmp_path):
    (tmp_path / "outfile").write_text("a file")
    sub = tmp_path / "outfile" / "sub"
    with pytest.raises(
        ValueError, match=re.escape(f"data.output={sub}: {tmp_path / 'outfile'} is a file, so")
    ):
        GenerationJobs(root=str(edge_maps), output=str(sub))
    if os.path.isdir("/proc/self"):  # Linux: nothing can be made in /proc, not even by root
        with pytest.raises(
            ValueError, match=re.escape("data.output=/proc/foo: cannot make files in /proc (")
        ):
            GenerationJobs(root=str(edge_maps), output="/proc/foo")
    before = sorted(os.listdir(tmp_path))
    dm = GenerationJobs(root=str(edge_maps), output=str(tmp_path / "new" / "deeper"))
    assert dm.output_dir == str(tmp_path / "new" / "deeper")
    assert sorted(os.listdir(tmp_path)) == before  # the probe leaves nothing behind, makes no folder


def test_images_and_maps_are_read_upright_as_their_exif_orientation_says(tmp_path):
    """A photo stored 80 wide x 64 high with EXIF orientation 6 is shown 64 wide x 80 high (turned 90°
    clockwise): it is read so, and the mask a user drew on it as shown fits it."""
    from datamodules.jobs import Job, JobDataset
    from datamodules.transforms import load_image, load_map

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    stored = textured(4, size=(64, 80))  # (H, W, 3)
    shown = np.rot90(stored, k=-1)  # clockwise: (80, 64, 3)
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100, subsampling=0)
    assert np.array_equal(load_image(str(tmp_path / "photo.png")).permute(1, 2, 0).numpy(), shown)
    jpeg = load_image(str(tmp_path / "photo.jpg")).permute(1, 2, 0).numpy().astype(int)
    assert jpeg.shape == (80, 64, 3) and np.abs(jpeg - shown).mean() < 4  # JPEG's loss only
    assert np.abs(jpeg - np.rot90(stored, k=1)).mean() > 30  # not turned the other way
    edges = np.zeros((64, 80), np.uint8)
    edges[5, :] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png", exif=exif)
    want = np.rot90(edges, k=-1) > 0
    assert np.array_equal(load_map(str(tmp_path / "edges.png"), "edges")[0].numpy() > 0, want)

    mask = np.zeros((80, 64), np.uint8)  # drawn on the photo as shown: its top half
    mask[:40] = 255
    save(tmp_path / "mask.png", mask)
    job = Job(name="p", image=str(tmp_path / "photo.jpg"), mask=str(tmp_path / "mask.png"))
    item = JobDataset([(job, "p", 0)], 32, (), {}, "center", None)[0]
    assert item["error"] == "" and item["edit"]
    # 64 x 80 -> 32 x 40 -> the centre 32 x 32 (rows 4..35): rows 4..19 of the 40 are white
    assert item["mask"][0, :16].all() and item["mask"][0, 16:].sum() == 0


def test_the_command_line_exits_non_zero_when_jobs_fail_or_cannot_work(tmp_path, capsys):
    """``predict data=jobs``: status 1 when a job failed (the images written are kept, a rerun skips them),
    no "images written to" line when none was; status 2, before a run directory, for jobs the model can
    never draw, a per-scale list of the wrong length, or an output folder that cannot be made."""
    from varctl.cli import main
    from varctl.models import VAR

    legacy, conf = Path(__file__).parent / "fixtures" / "legacy", Path(__file__).parents[1] / "conf"
    maps, out, runs = tmp_path / "maps", tmp_path / "maps" / "generated", tmp_path / "runs"
    for i in range(2):
        save(maps / "edges" / f"e{i}.png", (np.roll(np.eye(16), 3 * i, axis=0) * 255).astype(np.uint8))
    (maps / "edges" / "broken.png").write_bytes(b"not a png")
    control_run = ["predict", "-c", str(conf / "control.yaml"), "data=jobs", f"run.root={runs}",
                   f"ckpt_path={legacy / 'control.ckpt'}", "model.control.injector=scalar",
                   "model.control.width=4", "model.control.feature_dim=8", "model.control.max_width=8",
                   "model.ema_decay=0.5"]  # the legacy run's settings  # fmt: skip
    jobs = [*control_run, f"data.root={maps}"]

    assert main(jobs) == 1
    printed, err = capsys.readouterr()
    assert "skipped broken: " in printed and "2 written, 0 skipped (existing), 1 failed" in printed
    assert f"varctl predict: images written to {out}" in printed
    assert (
        f"varctl: 1 generation job(s) failed (named above: 'skipped NAME: why'); the 2 written to {out} are "
        in err
    )
    assert sorted(p.name for p in out.glob("*.png")) == ["e0.png", "e1.png"]
    assert main(jobs) == 1  # the rerun skips the two written and fails the broken one again
    printed, err = capsys.readouterr()
    assert "0 written, 2 skipped (existing), 1 failed" in printed and "images written to" not in printed
    assert "1 generation job(s) failed" in err and "no image was written" in err
    (maps / "edges" / "broken.png").unlink()
    assert main(jobs) == 0
    printed = capsys.readouterr().out
    assert (
        "images written to" not in printed
        and f"nothing to draw, every job's image is in {out} already" in printed
    )

    versions = sorted(p.name for p in (runs / "control").iterdir())
    num_scales = VAR.load(legacy / "control.ckpt").config.num_scales
    (tmp_path / "jobs.jsonl").write_text(json.dumps({"edges": str(maps / "edges" / "e0.png"), "name": "x",
                                                     "control_strength": [1, 2]}) + "\n")  # fmt: skip
    var_run = ["predict", "-c", str(conf / "var.yaml"), "data=jobs", f"ckpt_path={legacy / 'var.ckpt'}",
               f"run.root={runs}", "model.ema_decay=0.5", "model.var.depth=1", "+model.var.embed_dim=32",
               "+model.var.num_heads=2"]  # fmt: skip
    (tmp_path / "outfile").write_text("a file")
    scales = f"jobs.jsonl:1: control_strength holds 2 values, but the model draws {num_scales} scales"
    refused = [
        ([*control_run, f"data.list={tmp_path / 'jobs.jsonl'}"], scales),
        (
            [*var_run, f"data.root={maps}", f"data.output={tmp_path / 'v'}"],
            "e0: control maps ['edges'] need a control model (conf/control",
        ),
        ([*jobs, f"data.output={tmp_path / 'outfile' / 'sub'}"], f"{tmp_path / 'outfile'} is a file"),
        (  # named before the folder is scanned (it said: no image files in any of ['depth', 'images'])
            [*jobs, "data.controls=[depth]"],
            "data: data.controls=['depth'] but the control branch takes ['edges'] "
            "(model.control.modalities): set data.controls=[edges]",
        ),
    ]
    for args, message in refused:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "varctl: config error: " in err and message in err
    assert sorted(p.name for p in (runs / "control").iterdir()) == versions  # no run was started
    assert not (runs / "var").exists()
