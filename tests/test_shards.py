"""Shards (datamodules/shards.py, tools/make_shards.py): written from the built-in scenes and from a pairs
tree they give the source's batches value for value; two DDP processes read disjoint samples covering the
split; a run stopped mid-epoch resumes with the very batches of the uninterrupted one (loader, Lightning,
DDP); the converter writes atomically, a stopped or failed conversion goes on to the same shards and leaves
nothing of litdata running; missing shards and another resolution are errors naming data.root
and both resolutions."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_shards import fit
from helpers import ALL, save, textured
from litdata import StreamingDataset
from PIL import Image

from datamodules import ShardDataModule
from datamodules.shards import ShardSplit
from varctl.cli import main as varctl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_shards  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SCENES = ["data=synthetic", "data.num_train=40", "data.num_val=8", "data.batch_size=4", "data.flip=0.5",
          "data.controls=[edges,depth,segmentation,sketch]"]  # fmt: skip


def convert(out: Path, overrides: list[str], *flags: str) -> int:
    return make_shards.main(["--out", str(out), "--resolution", "32", "--workers", "1", *flags, *overrides])


def make_pairs(root: Path) -> list[str]:
    """Eight 40 px images with edge, 16-bit depth and segmentation files and some captions; the overrides
    that read them."""
    for i in range(8):
        name = f"p{i}"
        save(root / "images" / f"{name}.png", textured(i))
        rng = np.random.default_rng(i)
        save(root / "edges" / f"{name}.png", (rng.random((40, 40)) > 0.8).astype(np.uint8) * 255)
        depth = (rng.random((40, 40)) * 65535).astype(np.uint16)
        (root / "depth").mkdir(exist_ok=True)
        Image.fromarray(depth).save(root / "depth" / f"{name}.png")
        save(root / "segmentation" / f"{name}.png", rng.integers(0, 7, (40, 40), dtype=np.uint8))
        if i % 2:
            (root / "captions").mkdir(exist_ok=True)
            (root / "captions" / f"{name}.txt").write_text(f"blocks number {i}\n")
    return ["data=pairs", f"data.root={root}", "data.controls=[edges,depth,segmentation]",
            "data.val_fraction=0.25", "data.batch_size=2", "data.num_workers=0"]  # fmt: skip


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "scenes"
    assert convert(out, SCENES) == 0
    return out


def shard_data(root: Path, **kwargs) -> ShardDataModule:
    data = ShardDataModule(str(root), **{"batch_size": 4, **kwargs})
    data.connect(32, ALL)
    data.setup()
    return data


def assert_same_samples(a: dict, b: dict) -> None:
    """Samples or batches: images, labels, captions and maps equal, value for value and dtype for dtype."""
    assert torch.equal(a["image"], b["image"]) and a["image"].dtype == b["image"].dtype
    assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
    assert a["caption"] == b["caption"] and list(a["control"]) == list(b["control"])
    for m, control in a["control"].items():
        assert control.dtype == b["control"][m].dtype and torch.equal(control, b["control"][m]), m


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_same_samples(x, y)


@pytest.mark.parametrize("source", ["scenes", "pairs"])
def test_shards_give_the_source_batches_value_for_value(source, scenes, tmp_path, capsys):
    """Val batches equal the source's (images exactly: PNG of the source's 8-bit pixels; labels, captions,
    maps with their dtypes); every train sample equals the source's sample of its index, none missing; a
    flip at read time mirrors the image and its maps together."""
    if source == "scenes":
        root, overrides = scenes, SCENES
    else:
        root, overrides = tmp_path / "pairs_shards", make_pairs(tmp_path / "pairs")
        assert convert(root, overrides) == 0
        assert "train samples written as val samples: data.flip=0" in capsys.readouterr().out
    # the source as the converter built it (flips off), with the same batch size
    src, _, _ = make_shards.build_data(ROOT / "conf" / "var.yaml", overrides, 32)
    data = shard_data(root, batch_size=src.batch_size)
    assert data.class_names == src.class_names and data.controls == src.controls
    val, expected = list(data.val_dataloader()), list(src.val_dataloader())
    assert len(val) == len(expected) > 0 and all(set(b) == set(ALL) for b in val)
    assert_same_batches(val, expected)
    train, stream = src.dataset("train"), data.train_dataloader().dataset
    stream.set_shuffle(False)
    samples = list(stream)
    assert [s["index"] for s in samples] == list(range(len(train)))
    for sample in samples:
        assert_same_samples(sample, train[sample["index"]])
    if source == "pairs":
        assert any(s["caption"] for s in samples) and any(not s["caption"] for s in samples)
    mirrored = next(iter(shard_data(root, flip=1.0).train_dataloader().dataset))
    want = train[mirrored["index"]]
    assert mirrored["flipped"] and torch.equal(mirrored["image"], want["image"].flip(-1))
    for m, control in want["control"].items():
        assert torch.equal(mirrored["control"][m], control.flip(-1)), m


def batches(loader, n: int | None = None) -> list[dict]:
    """The first `n` batches (all, when None) as Lightning asks for them: no more than the loader's length,
    so an epoch's iteration is left at its last batch rather than run out."""
    return list(islice(loader, len(loader) if n is None else n))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_loader_resumes_mid_epoch_with_the_uninterrupted_batches(scenes, num_workers):
    """Stopped after 3 batches, its state loaded into a fresh loader: the rest of the epoch and the next epoch
    equal the uninterrupted loader's (shuffled, flipped per sample, with or without workers)."""
    settings = {"num_workers": num_workers, "flip": 0.5}
    flips = [s["flipped"] for s in shard_data(scenes, **settings).train_dataloader().dataset]
    assert len(flips) == 40 and 0 < sum(flips) < 40
    whole = shard_data(scenes, **settings).train_dataloader()
    first, second = batches(whole), batches(whole)
    assert len(first) == 10 and any(b["caption"] != c["caption"] for b, c in zip(first, second))
    stopped = shard_data(scenes, **settings).train_dataloader()
    assert_same_batches(batches(stopped, 3), first[:3])
    state = stopped.state_dict()
    resumed = shard_data(scenes, **settings).train_dataloader()
    resumed.load_state_dict(state)
    assert_same_batches(batches(resumed), first[3:])
    assert_same_batches(batches(resumed), second)  # the resumed position served one epoch only


def test_a_lightning_run_resumes_mid_epoch_with_the_uninterrupted_batches(scenes, tmp_path):
    """Trainer.fit for 14 steps (10 per epoch) with a checkpoint per step, and resumed from the one of step
    3: steps 4..14 draw the samples of the whole run, flipped the same way."""
    whole = fit(str(scenes), 14, save_dir=str(tmp_path))
    assert len({key[0] for step in whole[:10] for key in step}) == 40  # one epoch: every sample once
    assert fit(str(scenes), 14, resume=str(tmp_path / "step=3.ckpt")) == whole[3:]


@pytest.mark.slow
def test_two_ddp_processes_read_disjoint_samples_and_resume(scenes, tmp_path):
    """Two processes (gloo, DDP with Lightning's use_distributed_sampler on): each epoch the ranks draw
    disjoint samples that cover the split; resumed after step 3, both ranks draw what they drew before."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    script = str(ROOT / "tests" / "dist_shards.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path), str(scenes)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    whole, resumed, stopped = result["whole"], result["resumed"], result["stopped"]
    ids = [[key[0] for step in rank[:5] for key in step] for rank in whole]  # the first epoch: 5 steps
    assert len(ids[0]) == len(ids[1]) == 20 and not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == 40
    assert [rank[stopped:] for rank in whole] == resumed


def test_the_var_stage_fits_on_shards_through_the_cli(scenes, tokenizer_file, tmp_path, recwarn):
    args = ["fit", "-c", str(ROOT / "conf" / "var.yaml"), f"model.tokenizer={tokenizer_file}",
            "model.var.depth=2", "+model.var.embed_dim=64", "+model.var.num_heads=2", "data=shards",
            f"data.root={scenes}", "data.batch_size=4", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "callbacks.images=null",
            f"run.root={tmp_path}"]  # fmt: skip
    assert varctl(args) == 0
    assert (next((tmp_path / "var").iterdir()) / "checkpoints" / "last.ckpt").is_file()
    # no warning from Lightning about the frozen tokenizer's eval mode, or its own deprecated call into torch
    warned = [str(w.message) for w in recwarn]
    assert not [w for w in warned if "eval mode" in w or "LeafSpec" in w], warned


def test_the_converter_writes_atomically_and_refuses_to_overwrite(scenes, tmp_path, capsys, monkeypatch):
    assert convert(scenes, SCENES) == 2
    assert f"--out {scenes} exists; pass --overwrite" in capsys.readouterr().err
    out = tmp_path / "again"
    assert convert(out, [*SCENES, "data.num_val=4", "data.controls=[edges]"]) == 0
    assert "val 4 samples at 32 px, 10 classes, maps ['edges']" in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"data\.controls=\['depth'\]: the shards at .* hold no \['depth'\] maps"
    ):
        shard_data(out, controls=["depth"])
    assert convert(out, [*SCENES, "data.num_val=6"], "--overwrite") == 0
    assert len(shard_data(out).dataset("val")) == 6
    monkeypatch.setattr(make_shards, "write_shards", lambda *a: 1 / 0)  # fails while writing
    with pytest.raises(ZeroDivisionError):
        convert(tmp_path / "failed", SCENES)
    # no --out: the work folder alone, which the same command goes on from
    assert sorted(p.name for p in tmp_path.iterdir()) == [".failed.partial", "again"]
    assert convert(tmp_path / "bad", ["data=folder", f"data.root={tmp_path / 'none'}"]) == 2
    assert "data.root" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_missing_shards_and_another_resolution_are_named(scenes, tmp_path, tokenizer_file, capsys):
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(FileNotFoundError, match=rf"data\.root={root}: no shards found at {root}/meta"):
            ShardDataModule(str(root)).connect(32)
    with pytest.raises(ValueError, match=r"the shards hold 32 px images, the model needs 64 px"):
        ShardDataModule(str(scenes)).connect(64)
    with pytest.raises(TypeError, match=r"model\.token_cache=null"):
        ShardSplit(f"{scenes}/train", 40)[0]
    args = ["fit", "-c", str(ROOT / "conf" / "var.yaml"), f"model.tokenizer={tokenizer_file}", "data=shards",
            f"data.root={tmp_path / 'missing'}", f"run.root={tmp_path}"]  # fmt: skip
    assert varctl(args) == 2
    assert f"data.root={tmp_path / 'missing'}: no shards found" in capsys.readouterr().err


class Reads(torch.utils.data.Dataset):
    """A split that counts its reads across litdata's forked workers and fails at sample ``fail_at``."""

    def __init__(self, dataset, reads, fail_at: int | None = None):
        self.dataset, self.reads, self.fail_at = dataset, reads, fail_at

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        with self.reads.get_lock():
            self.reads.value += 1
        if index == self.fail_at:
            raise ValueError("unreadable file")
        return self.dataset[index]


BUILD_DATA = make_shards.build_data


def reading(monkeypatch, reads, fail_at: int | None = None) -> None:
    """Make the converter read its train split through ``Reads``."""
    build = BUILD_DATA

    def build_data(*args):
        datamodule, section, changed = build(*args)
        datamodule.datasets["train"] = Reads(datamodule.datasets["train"], reads, fail_at)
        return datamodule, section, changed

    monkeypatch.setattr(make_shards, "build_data", build_data)


def assert_same_shards(a: Path, b: Path) -> None:
    for split in ("train", "val"):
        x, y = list(StreamingDataset(f"{a}/{split}")), list(StreamingDataset(f"{b}/{split}"))
        assert len(x) == len(y) > 0
        for p, q in zip(x, y):
            assert p["index"] == q["index"] and p["image"] == q["image"] and p["label"] == q["label"]
            assert all(np.array_equal(p["control"][m], q["control"][m]) for m in p["control"])


def running_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that are not zombies (killed, waiting to be reaped)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state ppid pgrp ...
        except OSError:  # ended meanwhile
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


SMALL_CHUNKS = ["--chunk-bytes", "16KB"]  # two 32 px samples a chunk: a conversion stops between chunks


def checkpointed(split: Path) -> int:
    """The samples of a split that litdata's checkpoints hold as done: what a resumed conversion skips (a
    chunk file appears before the worker's checkpoint names it, so the files alone overcount)."""
    done = 0
    for file in (split / ".checkpoints").glob("checkpoint-*.json"):
        try:
            done += int(json.loads(file.read_text())["inputs_done"])
        except (OSError, ValueError, KeyError):  # being replaced
            pass
    return done


def test_a_stopped_conversion_goes_on_where_it_stopped_and_gives_the_same_shards(
    tmp_path, monkeypatch, capfd
):
    """SIGTERM mid-split: exit 143 (litdata alone exits 0 on Ctrl-C), no --out, the work folder kept; the
    same command goes on from litdata's checkpoints (fewer reads than samples) to the shards of an
    uninterrupted conversion."""
    overrides = [*SCENES, "data.num_train=240"]
    whole, out = tmp_path / "whole", tmp_path / "out"
    assert convert(whole, overrides, *SMALL_CHUNKS) == 0
    args = ["--out", str(out), "--resolution", "32", "--workers", "2", *SMALL_CHUNKS, *overrides]
    # the converter's process, forked from this one (a new interpreter would import everything again)
    process = multiprocessing.get_context("fork").Process(target=lambda: os._exit(make_shards.main(args)))
    process.start()
    partial = tmp_path / ".out.partial"
    try:
        while checkpointed(partial / "train") < 8 and process.exitcode is None:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGTERM)
        process.join(60)
    finally:
        process.kill()
    err = capfd.readouterr().err
    assert process.exitcode == 143, err
    assert f"make_shards: stopped\nmake_shards: what was written is kept in {partial}" in err
    assert not out.exists() and (partial / "train" / ".checkpoints").is_dir()

    reads = multiprocessing.Value("i", 0)
    reading(monkeypatch, reads)
    assert make_shards.main(["--out", str(out), "--resolution", "32", *SMALL_CHUNKS, *overrides]) == 0
    assert 0 < reads.value <= 240 - 8  # --workers 2 as the stopped run: at least 8 samples were kept
    assert_same_shards(out, whole)
    assert not partial.exists()


def test_a_failing_sample_is_named_and_nothing_of_litdata_is_left_running(
    scenes, tmp_path, monkeypatch, capsys
):
    """A sample that raises in a litdata worker: exit 1 naming split, sample and cause; litdata's process
    group is gone (litdata alone leaves a helper blocked for ever); the fixed source goes on from the chunks
    written; a work folder of other inputs is discarded."""
    out, reads, partial = tmp_path / "out", multiprocessing.Value("i", 0), tmp_path / ".out.partial"
    for overrides in (SCENES, [*SCENES, "data.num_val=4"]):
        reading(monkeypatch, reads, fail_at=27)
        assert convert(out, SCENES, *SMALL_CHUNKS) == 1
        assert "make_shards: failed: train sample 27: ValueError: unreadable file" in capsys.readouterr().err
        deadline = time.monotonic() + 10  # SIGKILL is delivered, not waited for
        while running_in_group(make_shards.last_group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_in_group(make_shards.last_group) == []
        assert not out.exists() and json.loads((partial / "job.json").read_text())["done"] == {}

        reading(monkeypatch, reads)
        reads.value = 0
        assert convert(out, overrides, *SMALL_CHUNKS) == 0
        printed = capsys.readouterr().out
        if overrides == SCENES:  # the 26 samples before the failure were kept, in chunks of 2
            assert "going on with the stopped conversion" in printed and reads.value == 40 - 26
            assert_same_shards(out, scenes)
        else:
            assert "was made for other inputs: discarded" in printed and reads.value == 40
        shutil.rmtree(out)
