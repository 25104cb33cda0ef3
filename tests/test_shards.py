"""Shards (datamodules/shards.py, tools/make_shards.py): written from the built-in scenes and from a pairs
tree they give the source's batches value for value; two DDP processes read disjoint samples covering the
split; a run stopped mid-epoch resumes with the very batches of the uninterrupted one (loader, Lightning,
DDP); the converter writes atomically, a stopped or failed conversion goes on to the same shards and leaves
nothing of litdata running (a killed one included); missing shards and another resolution are errors naming
data.root and both resolutions; --overwrite replaces only a shard folder, never the source; damaged or mixed
shards are refused at setup naming the file; a source file that fails is an error, never a substitute."""

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
from datamodules.verify import BadFileWarning
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


def processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process, from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state ppid pgrp ...
        except OSError:  # ended meanwhile
            continue
        found.append((int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])))
    return found


def running_in_group(group: int) -> list[int]:
    """The processes of process group ``group`` that are not zombies (killed, waiting to be reaped)."""
    return [pid for pid, state, _, pgrp in processes() if pgrp == group and state != "Z"]


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


def test_litdata_dies_with_a_converter_killed_unwarned(tmp_path):
    """kill -9 of the converter mid-split (no handler runs): litdata's process group, writers included, is
    gone within 3 s instead of running on orphaned (its 4000 samples take longer than that)."""
    args = ["--out", str(tmp_path / "out"), "--resolution", "32", "--workers", "2", *SMALL_CHUNKS, *SCENES,
            "data.num_train=4000"]  # fmt: skip
    group = None
    process = multiprocessing.get_context("fork").Process(target=lambda: os._exit(make_shards.main(args)))
    process.start()
    try:
        while checkpointed(tmp_path / ".out.partial" / "train") < 4 and process.exitcode is None:
            time.sleep(0.05)
        [group] = [pid for pid, _, parent, pgrp in processes() if parent == process.pid and pgrp == pid]
        assert len(running_in_group(group)) >= 3  # the group's leader and litdata's two writers at least
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
        deadline = time.monotonic() + 3
        while running_in_group(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running_in_group(group) == []
    finally:
        process.kill()
        if group is not None and running_in_group(group):  # the test failed: stop what it left running
            os.killpg(group, signal.SIGKILL)


def image_tree(root: Path) -> list[str]:
    """A folder of two classes, four 40 px PNGs each in train/ and one in val/; the overrides that read it."""
    for split, count in (("train", 4), ("val", 1)):
        for c, name in enumerate(("cat", "dog")):
            for i in range(count):
                save(root / split / name / f"{i}.png", textured(10 * c + i))
    return ["data=folder", f"data.root={root}", "data.batch_size=2", "data.num_workers=0"]


def contents(folder: Path) -> list[tuple[str, bytes]]:
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


def test_overwrite_replaces_a_shard_folder_only_and_never_the_source(scenes, tmp_path, capsys, monkeypatch):
    """--overwrite refuses the source's folder, a folder of other files and a shard folder holding a file of
    its own; an --out that is or lies inside an input (data.root, a list file's image folder) is refused
    even without it; each refusal (exit 2) names the folder and leaves every file as it was, writing
    nothing. A shard folder is replaced, where RENAME_EXCHANGE is not available by two renames too."""
    fold, other, stray, copy = (tmp_path / name for name in ("fold", "other", "stray", "copy"))
    folder = image_tree(fold)
    (other / "notes").mkdir(parents=True)
    (other / "notes" / "mine.txt").write_text("keep me")
    shutil.copytree(scenes, stray)
    (stray / "train" / "mine.txt").write_text("keep me")
    shutil.copytree(scenes, copy)
    lists = tmp_path / "lists"
    lists.mkdir()
    rows = [{"image": f"../fold/train/cat/{i}.png", "caption": f"cat {i}"} for i in range(4)]
    (lists / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    captions = ["data=captions", f"data.train_list={lists / 'train.jsonl'}", "data.val_fraction=0.25",
                "data.batch_size=1", "data.num_workers=0"]  # fmt: skip
    cat = fold / "train" / "cat"
    cases = [
        (fold, folder, ["--overwrite"], f"--out {fold} is not a shard folder: it has no meta/"),
        (other, folder, ["--overwrite"], f"--out {other} is not a shard folder: it has no meta/"),
        (stray, SCENES, ["--overwrite"],
         f"--out {stray} holds {stray / 'train' / 'mine.txt'}, which is not in its index.json"),
        (fold / "shards", folder, [], f"--out {fold / 'shards'} lies inside the source's data.root ({fold})"),
        (copy, ["data=shards", f"data.root={copy}"], ["--overwrite"],
         f"--out {copy} is the source's data.root"),
        (cat / "shards", captions, [],
         f"--out {cat / 'shards'} lies inside the source's folder of image or map files ({cat})"),
    ]  # fmt: skip
    before = contents(tmp_path)
    for out, overrides, flags, message in cases:
        assert convert(out, overrides, *flags) == 2, message
        assert f"make_shards: {message}" in capsys.readouterr().err
        assert contents(tmp_path) == before  # nothing deleted, nothing written (no .partial, no report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "fold", "lists", "other", "stray"]

    monkeypatch.setattr(make_shards, "exchange", lambda new, old: False)  # a system without renameat2
    assert convert(copy, [*SCENES, "data.num_val=6"], "--overwrite") == 0
    assert len(shard_data(copy).dataset("val")) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "fold", "lists", "other", "stray"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    new, old = tmp_path / "new", tmp_path / "old"
    (new / "train").mkdir(parents=True)
    (new / "train" / "a").write_text("new")
    old.mkdir()
    (old / "b").write_text("old")
    if not make_shards.exchange(new, old):  # Linux with a file system that supports it (ext4, tmpfs, xfs)
        pytest.skip("this system or file system cannot exchange two folders in one step")
    assert contents(old) == [("train/a", b"new")] and contents(new) == [("b", b"old")]


def damage(root: Path, how: str, tmp_path: Path) -> str:
    """Damage the shard folder ``root`` (a copy of the scenes: 40 train samples in one chunk, 8 val); the
    error expected at setup."""
    train, chunk = root / "train", root / "train" / "chunk-0-0.bin"
    index = json.loads((train / "index.json").read_text())
    size = chunk.stat().st_size
    advice = r".*; copy the whole folder again, or write it again"
    if how == "no val":
        shutil.rmtree(root / "val")
        return (
            rf"data\.root={root}: {root}/val is missing, expected the val split's 8 samples that {root}/meta"
        )
    if how == "chunk missing":
        chunk.unlink()
        return rf"{chunk} is missing, expected {size} bytes \({train}/index\.json\): a copy or download cut"
    if how == "chunk truncated":
        chunk.write_bytes(chunk.read_bytes()[: size // 2])
        return (
            rf"{chunk} is {size // 2} bytes, expected {size} bytes \({train}/index\.json\): a copy or "
            + advice
        )
    if how == "index not JSON":
        (train / "index.json").write_text("{")
        return (
            rf"{train}/index\.json is not litdata's index, expected JSON with a list of chunks \(JSONDecode"
        )
    if how == "index missing a chunk":
        index["chunks"][0]["chunk_size"] = 39
        (train / "index.json").write_text(json.dumps(index))
        return rf"{train}/index\.json lists 39 samples, expected 40 \({root}/meta\)" + advice
    if how == "index edited":
        index["updated_at"] = "0"
        (train / "index.json").write_text(json.dumps(index))
    else:  # another conversion's train split, as many samples
        assert convert(tmp_path / "other", [*SCENES, "data.seed=1"]) == 0
        shutil.rmtree(train)
        shutil.copytree(tmp_path / "other" / "train", train)
    return (
        rf"{train}/index\.json is not the index {root}/meta was written with \(sha256 \w+\.\.\., expected "
        r"\w+\.\.\.\): the split was replaced, by another conversion's whose resolution, classes or samples "
        r"need not be meta's \(32 px, 10 classes\), or edited" + advice
    )


DAMAGES = ["no val", "chunk missing", "chunk truncated", "index not JSON", "index missing a chunk",
           "index edited", "another conversion's train"]  # fmt: skip


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_or_mixed_shards_are_refused_at_setup_naming_the_file(scenes, tmp_path, how):
    root = tmp_path / "shards"
    shutil.copytree(scenes, root)
    expected = damage(root, how, tmp_path)
    data = ShardDataModule(str(root), batch_size=4)
    data.connect(32, ALL)
    with pytest.raises(ValueError, match=expected):
        data.setup()


def test_the_cli_refuses_damaged_shards_before_the_run(scenes, tokenizer_file, tmp_path, capsys):
    root = tmp_path / "shards"
    shutil.copytree(scenes, root)
    damage(root, "chunk truncated", tmp_path)
    args = ["fit", "-c", str(ROOT / "conf" / "var.yaml"), f"model.tokenizer={tokenizer_file}", "data=shards",
            f"data.root={root}", f"run.root={tmp_path / 'runs'}"]  # fmt: skip
    assert varctl(args) == 2
    err = capsys.readouterr().err
    assert "varctl: config error" in err and f"{root}/train/chunk-0-0.bin is " in err
    assert not (tmp_path / "runs").exists()


def test_a_source_file_that_fails_is_an_error_never_a_substitute(tmp_path, capfd):
    """One truncated PNG: with data.check_files=trust the conversion fails naming its split, index and file
    (litdata's worker would otherwise store the next sample in its place); with the default check it is
    skipped, and the warning names the report written beside the shards, which lists it."""
    fold = tmp_path / "fold"
    overrides = image_tree(fold)
    bad = fold / "train" / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:100])
    out = tmp_path / "out"
    assert convert(out, [*overrides, "data.check_files=trust"]) == 1
    err = capfd.readouterr().err
    assert f"make_shards: failed: train sample 1: OSError: cannot read image file {bad}: truncated" in err
    assert "is skipped from now on" not in err and not out.exists()
    with pytest.warns(
        BadFileWarning, match=rf"1 file\(s\) skipped .* All of them are listed in {out}\.data_report"
    ):
        assert convert(out, overrides) == 0
    report = json.loads((tmp_path / "out.data_report.json").read_text())
    assert [(e["split"], e["file"]) for e in report["skipped"]] == [("train", str(bad))]
    assert shard_data(out, batch_size=2).meta["splits"] == {"train": 7, "val": 2}
