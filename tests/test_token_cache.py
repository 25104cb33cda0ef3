"""The token cache (datamodules.token_cache): stage 2 and the control stage train from cached token indices
with the same losses as from images, flips included; a cache made for another tokenizer or data is refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import save
from lightning.pytorch.callbacks import Callback

from datamodules import synthetic
from datamodules.shards import ShardSplit
from datamodules.synthetic import SyntheticDataModule
from datamodules.token_cache import CachedTokens, StaleTokenCache, TokenCache, check_cacheable
from varctl.lit.control import ControlModule
from varctl.lit.var import VARModule
from varctl.models.vqvae import VQVAE, VQVAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
TINY_VAR = {"depth": 2, "num_classes": 10, "embed_dim": 64, "num_heads": 2, "cond_drop_rate": 0.3}
FAST = {"lr": 2e-3, "lr_scale_by_batch": False, "warmup_steps": 0, "decay": "constant"}


class Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))


def fit(module, tmp_path, steps=6, **data):
    torch.manual_seed(0)
    dm = SyntheticDataModule(**{"num_train": 24, "num_val": 8, "batch_size": 8, "flip": 0.5, **data})
    dm.connect(**module.data_requirements())
    rec = Losses()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[rec], default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(module, dm)
    return rec.losses, dm


def var_module(tokenizer_file, **kw):
    torch.manual_seed(0)
    return VARModule(tokenizer_file, var=TINY_VAR, optimizer=FAST, **kw)


def test_training_from_the_cache_gives_the_losses_of_training_from_images(
    tokenizer_file, tmp_path, monkeypatch
):
    plain, _ = fit(var_module(tokenizer_file), tmp_path)
    cache = tmp_path / "tokens"
    cached, dm = fit(var_module(tokenizer_file, token_cache=str(cache)), tmp_path)
    assert isinstance(dm.dataset("train"), CachedTokens)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["num_images"] == 24 and meta["flipped"] and meta["tokens_per_image"] == 1 + 4 + 16
    # 6 steps of 8 over 24 images: two epochs, flips and condition dropout drawn the same way
    assert cached == plain and len(plain) == 6
    # the cache is read, not rebuilt, by the next run: the same losses again
    # and neither the encoder runs in training nor are the scenes drawn
    mtime = (cache / "tokens.npy").stat().st_mtime_ns
    module = var_module(tokenizer_file, token_cache=str(cache))
    module.vae.encode = lambda *a, **k: pytest.fail("the tokenizer's encoder ran with a token cache")
    monkeypatch.setattr(synthetic, "render_image", lambda *a: pytest.fail("a train scene was drawn"))
    again, _ = fit(module, tmp_path)
    assert again == plain and (cache / "tokens.npy").stat().st_mtime_ns == mtime


def test_the_control_stage_trains_from_the_cache_with_the_same_losses(tokenizer_file, tmp_path):
    def control(**kw):
        torch.manual_seed(0)
        branch = {
            "injector": "scalar",
            "modalities": ["edges"],
            "width": 8,
            "feature_dim": 32,
            "max_width": 32,
        }
        return ControlModule(tokenizer_file, var=TINY_VAR, control=branch, train_backbone=True,
                             optimizer=FAST, scores={"batches": 0}, **kw)  # fmt: skip

    plain, _ = fit(control(), tmp_path, steps=4, controls=["edges"])
    cached, _ = fit(control(token_cache=str(tmp_path / "tokens")), tmp_path, steps=4, controls=["edges"])
    assert cached == plain


def test_a_cache_of_another_tokenizer_or_data_is_refused(tokenizer_file, tmp_path):
    cache = str(tmp_path / "tokens")
    fit(var_module(tokenizer_file, token_cache=cache), tmp_path, steps=1)
    torch.manual_seed(1)
    config = VQVAEConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                         patch_nums=(1, 2, 4))  # fmt: skip
    other = str(VQVAE(config).save(tmp_path / "other.pt"))
    with pytest.raises(StaleTokenCache, match="tokenizer_weights"):
        fit(var_module(other, token_cache=cache), tmp_path, steps=1)
    with pytest.raises(StaleTokenCache, match="made from other train images than this run's"):
        fit(var_module(tokenizer_file, token_cache=cache), tmp_path, steps=1, seed=3)
    # another batch size reads the same images: the cache is used
    fit(var_module(tokenizer_file, token_cache=cache), tmp_path, steps=1, batch_size=4)


def test_a_damaged_cache_is_named_before_the_run_and_nothing_is_written(tokenizer_file, tmp_path, capsys):
    """Through the command line, before the run directory: a cache of other data, or one whose arrays are
    missing, cut short or of another width, is a config error saying what is wrong (it was a traceback from
    numpy or the training step, after the run had written its directory)."""
    from varctl.cli import main

    cache = tmp_path / "tokens"
    base = ["fit", "-c", str(ROOT / "conf" / "var.yaml"), f"model.tokenizer={tokenizer_file}",
            "model.var.depth=1", "data.num_train=16", "data.batch_size=8", "trainer.max_steps=1",
            "trainer.limit_val_batches=0", f"model.token_cache={cache}", "trainer.enable_progress_bar=false",
            "callbacks.images=null"]  # fmt: skip
    assert main([*base, f"run.root={tmp_path / 'built'}"]) == 0
    meta = json.loads((cache / "meta.json").read_text())
    good = (cache / "tokens.npy").read_bytes()
    runs = tmp_path / "runs"

    def refused(*extra) -> str:
        assert main([*base, f"run.root={runs}", *extra]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"varctl: config error: {base[2]}: data: "), last
        assert not runs.exists()
        return last

    assert "made from other train images than this run's (SyntheticDataModule train split then, " in refused(
        "data.num_train=24"
    )
    (cache / "tokens.npy").unlink()
    assert f"{cache}: tokens.npy is missing or damaged" in refused()
    (cache / "tokens.npy").write_bytes(good[: len(good) // 2])
    assert f"{cache}: tokens.npy is missing or damaged (" in refused()
    np.save(cache / "tokens.npy", np.zeros((meta["num_images"], 100), np.int16))
    message = f"tokens.npy holds int16 ({meta['num_images']}, 100), meta.json says ({meta['num_images']}, 21)"
    assert message in refused()
    (cache / "tokens.npy").write_bytes(good)
    assert main([*base, f"run.root={runs}"]) == 0  # mended: the cache is used again


def test_a_folder_of_other_files_never_takes_a_cache(tokenizer_file, tmp_path):
    """model.token_cache naming a user's folder is refused before the run; the folder is untouched."""
    mine = tmp_path / "my_dataset"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "precious.jpg").write_bytes(b"a photo")
    with pytest.raises(ValueError, match=r"model\.token_cache=.*my_dataset: the folder holds other files"):
        var_module(tokenizer_file, token_cache=str(mine))
    cache = TokenCache(np.zeros((2, 3), np.int16), None, {})
    with pytest.raises(ValueError, match="not a varctl token cache"):
        cache.save(mine)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="a file, expected a folder"):
        cache.save(tmp_path / "a_file")
    assert (mine / "photos" / "precious.jpg").read_bytes() == b"a photo"
    (tmp_path / "empty").mkdir()
    cache.save(tmp_path / "empty")  # an empty folder, or a cache, takes one
    cache.save(tmp_path / "empty")
    assert TokenCache.load(tmp_path / "empty", {}).tokens.shape == (2, 3)
    (tmp_path / "made").mkdir()
    mode = (tmp_path / "empty").stat().st_mode & 0o777
    assert mode == (tmp_path / "made").stat().st_mode & 0o777 != 0o700  # as mkdir makes it, not mkdtemp


def test_random_crops_cannot_be_cached(tokenizer_file, tmp_path):
    class Cropped(torch.utils.data.Dataset):
        crop, train, flip = "random", True, 0.0

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 32, 32)}

    with pytest.raises(ValueError, match="data.crop=random"):
        TokenCache.build(Cropped(), VQVAE.load(tokenizer_file), tmp_path / "t", {})
    # nor streamed shards, read in order (the command line checks this before the run: a config error)
    with pytest.raises(
        ValueError, match=r"streamed shards \(shards/train\) are read in order: .*token_cache=null"
    ):
        check_cacheable(ShardSplit("shards/train", 40))


def _items(dataset, seed: int) -> list[dict]:
    torch.manual_seed(seed)  # the flips' draws
    return [dataset[i] for i in range(len(dataset))]


def _same_but_the_image(full: list[dict], lean: list[dict]) -> None:
    for a, b in zip(full, lean, strict=True):
        assert a["image"].shape[-1] > 0 and b["image"].shape == (3, 0, 0)
        assert (a["label"], a["caption"], a["flipped"]) == (b["label"], b["caption"], b["flipped"])
        assert torch.equal(a["tokens"], b["tokens"])
    assert {a["flipped"] for a in full} == {True, False}


def test_a_stage_without_pixels_reads_no_image(tokenizer_file, tmp_path, monkeypatch):
    """The VAR stage's cached items skip the images (the scenes are not drawn, the files not decoded) and
    are otherwise the items with them: labels, captions, flip draws, tokens; the caller's dataset keeps its
    pixels. An image folder's unreadable files are replaced as when the cache was built."""
    from datamodules import ClassFolderDataModule
    from datamodules import files as file_data
    from datamodules.verify import BadFileWarning

    vae = VQVAE.load(tokenizer_file)
    scenes = SyntheticDataModule(num_train=12, num_val=4, batch_size=4, flip=0.5, resolution=32)
    scenes.setup("fit")
    train = scenes.dataset("train")
    cache = TokenCache.build(train, vae, tmp_path / "scenes", {})
    full = _items(CachedTokens(train, cache), seed=5)
    monkeypatch.setattr(synthetic, "render_image", lambda *a: pytest.fail("a scene was drawn"))
    lean = CachedTokens(train, cache, pixels=False)
    _same_but_the_image(full, _items(lean, seed=5))
    assert train.pixels and not lean.dataset.pixels
    monkeypatch.undo()

    for i in range(6):
        save(tmp_path / "data" / "train" / "ab"[i % 2] / f"{i}.png", np.full((40, 40, 3), 30 * i, np.uint8))
        save(tmp_path / "data" / "val" / "ab"[i % 2] / f"{i}.png", np.full((40, 40, 3), 30 * i, np.uint8))
    folders = ClassFolderDataModule(str(tmp_path / "data"), resolution=32, batch_size=2, flip=0.5,
                                    check_files="trust")  # fmt: skip
    folders.setup("fit")
    train = folders.dataset("train")
    Path(train.records[2].image).write_bytes(b"broken")  # found when the cache is built: 3 stands in
    with pytest.warns(BadFileWarning, match="Sample 2 is skipped"):
        cache = TokenCache.build(train, vae, tmp_path / "folders", {})
    assert cache.meta["unusable"] == [2]
    full = _items(CachedTokens(train, cache), seed=5)
    assert full[2]["label"] == full[3]["label"] == train.records[3].label != train.records[2].label
    monkeypatch.setattr(file_data, "load_image", lambda *a: pytest.fail("an image file was read"))
    _same_but_the_image(full, _items(CachedTokens(train, cache, pixels=False), seed=5))


class Reads(torch.utils.data.Dataset):
    """A dataset that counts the images read (copies share the count) and fails at read ``fail_at``, as a
    build killed there would stop."""

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.count = inner, fail_at, [0]
        self._unusable = {}  # as files.FileDataset records a damaged file (here image 3, once read)

    @property
    def flip(self):
        return self.inner.flip

    @flip.setter
    def flip(self, value):  # as the build sets it on its copy: that copy's own scenes
        self.inner = copy.copy(self.inner)
        self.inner.flip = value

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        if self.count[0] == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.count[0] += 1
        if i == 3:
            self._unusable[3] = "damaged"
        return self.inner[i]


def test_a_killed_build_goes_on_from_its_last_part_and_gives_the_same_cache(tokenizer_file, tmp_path, capsys):
    vae = VQVAE.load(tokenizer_file).eval()
    scenes = synthetic.SyntheticShapes(20, 32, flip=0.5, keys=("image", "label"))
    meta = {"data": "scenes"}
    whole = TokenCache.build(Reads(scenes), vae, tmp_path / "whole", meta, batch_size=3, progress_every=2)

    path, progress = tmp_path / "tokens", tmp_path / ".tokens.progress"
    with pytest.raises(KeyboardInterrupt):  # killed while reading the 15th image: parts of 6 and 12 kept
        TokenCache.build(Reads(scenes, fail_at=14), vae, path, meta, batch_size=3, progress_every=2)
    assert not path.exists() and sorted(p.name for p in progress.glob("part_*")) == [
        "part_0000000000.npz", "part_0000000006.npz"
    ]  # fmt: skip
    again = Reads(scenes)
    resumed = TokenCache.build(again, vae, path, meta, batch_size=3, progress_every=2)
    assert again.count[0] == 8 and "going on after 12/20 images" in capsys.readouterr().out
    assert np.array_equal(resumed.tokens, whole.tokens) and np.array_equal(resumed.flipped, whole.flipped)
    assert resumed.meta["unusable"] == whole.meta["unusable"] == [3]  # met before the kill, kept in its parts
    assert not progress.exists()

    # the progress of a build of other inputs is discarded, not mixed in
    with pytest.raises(KeyboardInterrupt):
        TokenCache.build(
            Reads(scenes, fail_at=14), vae, tmp_path / "t2", meta, batch_size=3, progress_every=2
        )
    other = Reads(scenes)
    TokenCache.build(other, vae, tmp_path / "t2", {"data": "other"}, batch_size=3, progress_every=2)
    assert other.count[0] == 20 and "was made for other inputs: discarded" in capsys.readouterr().out
