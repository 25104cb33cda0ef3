"""A token cache: a dataset tokenized once, so that the VAR and control stages train without running the
frozen tokenizer's encoder on every step.

``TokenCache.build`` runs the tokenizer over every image of a dataset (its flips switched off) and, when the
dataset flips, over each image's mirror too; the token indices (all scales concatenated, smallest first) are
written as ``tokens.npy`` (and ``tokens_flipped.npy``) beside a ``meta.json`` saying what they were made
from: the tokenizer file's sha256, its scales and vocabulary, the resolution and a fingerprint of the
dataset (its files, or the built-in data's settings). ``TokenCache.load`` refuses a cache whose meta
differs, naming the field. ``CachedTokens`` wraps the dataset: each item keeps everything the dataset
gives (labels, captions, control maps: the dataset still loads them, with the same random draws, so a run
is the same batch for batch) and gains ``tokens``, those of the image or of its mirror as the item was
flipped (``flipped``, which the datasets report). A stage that needs no pixels (the VAR stage) reads
the items without them where the dataset can: no image is decoded or drawn. A random crop cannot be cached
and is refused.

The folder is written atomically (a temporary folder, renamed), and the arrays are memory-mapped when read,
so a cache larger than memory works. A build keeps its progress beside the folder (``.<name>.progress/``:
one file per ``progress_every`` batches, each written atomically, and the meta it is for): a build that was
killed (preemption, a crash) goes on from its last part when it runs again with the same meta; a progress
folder made for other inputs is discarded. Only a new or empty folder, or a cache, takes a cache: a folder
of other files is refused before the run (``check_cache_folder``), never replaced.

Legend: N images, L tokens per image (all scales).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from varctl.files import atomic_dir, atomic_path, atomic_write_text

FORMAT = "varctl-token-cache-1"


class StaleTokenCache(ValueError):
    """A cache made for another tokenizer, dataset or resolution."""


class TokenCache:
    """Token indices (N, L) of a dataset's images, and of their mirrors when the dataset flips."""

    def __init__(self, tokens: np.ndarray, flipped: np.ndarray | None, meta: Mapping):
        self.tokens, self.flipped, self.meta = tokens, flipped, dict(meta)

    def __len__(self) -> int:
        return len(self.tokens)

    @staticmethod
    def _dtype(vocab_size: int):
        return np.int16 if vocab_size <= np.iinfo(np.int16).max + 1 else np.int32

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        dataset: Dataset,
        vae,
        path: str | os.PathLike,
        meta: Mapping,
        batch_size: int = 64,
        log_every: int = 0,
        progress_every: int = 32,
    ) -> TokenCache:
        """Tokenize every image of ``dataset`` (and its mirror when the dataset flips) with ``vae``, one
        image at a time through the encoder in batches of ``batch_size``; write the cache to ``path``. The
        tokens made so far are kept every ``progress_every`` batches: a build that was killed goes on from
        there (module docstring)."""
        flip = float(getattr(dataset, "flip", 0.0) or 0.0)
        check_cacheable(dataset)
        plain = copy.copy(dataset)
        if flip:
            plain.flip = 0.0  # the dataset's own images; their mirrors are tokenized below
        dtype = cls._dtype(vae.config.vocab_size)
        progress = _Progress(path, {**meta, "images": len(plain), "batch_size": batch_size, "flip": flip})
        tokens, mirrored, unusable = progress.resume()
        done = sum(len(t) for t in tokens)
        if done:
            print(f"[token cache] going on after {done}/{len(plain)} images ({progress.folder})", flush=True)
        device = next(vae.parameters()).device
        for start in range(done, len(plain), batch_size):
            images = torch.stack(
                [plain[i]["image"] for i in range(start, min(start + batch_size, len(plain)))]
            )
            images = images.to(device).float()
            with torch.autocast(device.type, enabled=False):
                tokens.append(torch.cat(vae.img_to_idx(images), dim=1).cpu().numpy().astype(dtype))
                if flip:
                    idx = vae.img_to_idx(images.flip(-1))
                    mirrored.append(torch.cat(idx, dim=1).cpu().numpy().astype(dtype))
            # samples that could not be read were replaced by the next usable one (files.FileDataset): a
            # dataset read without pixels replaces them the same way
            unusable |= {int(i) for i in getattr(plain, "_unusable", {})}
            batches = (start - done) // batch_size + 1
            if batches % progress_every == 0 and start + len(images) < len(plain):
                progress.keep(tokens, mirrored, unusable)
            if log_every and (start // batch_size + 1) % log_every == 0:
                print(f"[token cache] {start + len(images)}/{len(plain)} images", flush=True)
        meta = {**meta, "unusable": sorted(unusable)} if unusable else meta
        cache = cls(np.concatenate(tokens), np.concatenate(mirrored) if flip else None, meta)
        cache.save(path)
        progress.remove()
        return cls.load(path, meta)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to the folder ``path`` atomically; ``path`` must be new, empty or a cache
        (``check_cache_folder``): nothing else is ever replaced."""
        path = Path(path)
        check_cache_folder(path)
        with atomic_dir(path, overwrite=path.exists()) as tmp:
            np.save(tmp / "tokens.npy", self.tokens)
            if self.flipped is not None:
                np.save(tmp / "tokens_flipped.npy", self.flipped)
            shape = {"num_images": len(self.tokens), "tokens_per_image": int(self.tokens.shape[1])}
            meta = {"format": FORMAT, **self.meta, **shape, "flipped": self.flipped is not None}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Mapping) -> TokenCache:
        """The cache at ``path``; ``StaleTokenCache`` naming the field when it was made from other inputs."""
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise StaleTokenCache(
                f"token cache {path}: no readable meta.json ({e}); delete it to rebuild"
            ) from e
        if meta.get("format") != FORMAT:
            raise StaleTokenCache(f"token cache {path}: not a varctl token cache ({meta.get('format')})")
        again = "delete the folder (it is rebuilt) or name another model.token_cache"
        for key, value in expect.items():
            if json.loads(json.dumps(value, default=str)) == meta.get(key):
                continue
            if key in ("data", "data_fingerprint"):  # a description and a digest: say what they cover
                raise StaleTokenCache(
                    f"token cache {path} was made from other train images than this run's "
                    f"({meta.get('data')} then, {expect.get('data')} now: their files, their order or the "
                    f"data settings that change them, such as data.num_train, crop, resolution or "
                    f"controls, differ): {again}"
                )
            raise StaleTokenCache(
                f"token cache {path} was made with {key}={meta.get(key)!r}, this run has {key}={value!r}: "
                f"{again}"
            )
        names = ["tokens.npy", "tokens_flipped.npy"] if meta.get("flipped") else ["tokens.npy"]
        width, arrays = meta.get("tokens_per_image"), {}
        if "patch_nums" in meta and width != sum(p * p for p in meta["patch_nums"]):
            raise StaleTokenCache(f"token cache {path}: meta.json's tokens_per_image={width} does not fit "
                                  f"its patch_nums {meta['patch_nums']}; {again}")  # fmt: skip
        for name in names:
            try:
                arrays[name] = found = np.load(path / name, mmap_mode="r")
            except (OSError, ValueError) as e:  # missing, cut short, not an array
                raise StaleTokenCache(
                    f"token cache {path}: {name} is missing or damaged ({e}); {again}"
                ) from None
            if found.shape != (meta.get("num_images"), width) or found.dtype.kind not in "iu":
                raise StaleTokenCache(
                    f"token cache {path}: {name} holds {found.dtype} {found.shape}, meta.json says "
                    f"({meta.get('num_images')}, {width}) integer token indices; {again}"
                )
        return cls(arrays["tokens.npy"], arrays.get("tokens_flipped.npy"), meta)


def check_cacheable(dataset: Dataset) -> None:
    """A ValueError unless ``dataset`` gives the same images at the same positions every epoch, as a cache
    read by position needs: not streamed shards, not a random crop."""
    from datamodules.shards import ShardSplit

    if isinstance(dataset, ShardSplit):
        raise ValueError(
            f"model.token_cache reads images by position, but streamed shards ({dataset.path}) are read in "
            "order: train from the shards with model.token_cache=null"
        )
    if getattr(dataset, "crop", None) == "random" and getattr(dataset, "train", False):
        raise ValueError("a token cache needs a fixed crop: data.crop=random draws a new crop every epoch")


def check_cache_folder(path: str | os.PathLike, key: str = "model.token_cache") -> None:
    """``path`` may take a token cache: it is absent, an empty folder or a cache already (``load`` then
    checks it). A file, or a folder of other files, is refused (ValueError naming ``key``): a cache is
    written by replacing the folder, and a user's folder must never be replaced."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise ValueError(f"{key}={path}: a file, expected a folder for the token cache")
    if not any(path.iterdir()):
        return
    try:
        fmt = json.loads((path / "meta.json").read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise ValueError(
            f"{key}={path}: the folder holds other files and is not a varctl token cache (no meta.json of "
            f"{FORMAT}); name a new or empty folder for the cache (nothing in this one was touched)"
        )


class _Progress:
    """What a build has tokenized so far, beside the cache folder ``path``: ``.<name>.progress/`` holds
    ``meta.json`` (the build's inputs) and parts ``part_<first image>.npz`` (tokens, mirrored tokens, the
    unusable samples met so far), each written atomically, so a killed build leaves whole parts."""

    def __init__(self, path: str | os.PathLike, meta: Mapping):
        path = Path(path)
        self.folder = path.parent / f".{path.name}.progress"
        self.meta = json.loads(json.dumps(dict(meta), sort_keys=True, default=str))
        self.kept = 0  # the token arrays in the parts written (a part holds those made since the last)

    def resume(self) -> tuple[list[np.ndarray], list[np.ndarray], set[int]]:
        """The parts of a build of the same inputs, in order (a progress folder of others is discarded)."""
        tokens, mirrored, unusable = [], [], set()
        meta_file = self.folder / "meta.json"
        try:
            same = json.loads(meta_file.read_text()) == self.meta
        except (OSError, ValueError):
            same = False
        if not same:
            if self.folder.exists():
                print(f"[token cache] {self.folder} was made for other inputs: discarded", flush=True)
                shutil.rmtree(self.folder)
            return tokens, mirrored, unusable
        for part in sorted(self.folder.glob("part_*.npz")):
            if int(part.stem.split("_")[1]) != sum(len(t) for t in tokens):
                break  # not the next images (cannot happen with whole parts): start again from here
            with np.load(part) as arrays:
                tokens.append(arrays["tokens"])
                if "flipped" in arrays:
                    mirrored.append(arrays["flipped"])
                unusable = {int(i) for i in arrays["unusable"]}
        self.kept = len(tokens)
        return tokens, mirrored, unusable

    def keep(self, tokens: list[np.ndarray], mirrored: list[np.ndarray], unusable: set[int]) -> None:
        """Write the tokens made since the last part as a new part."""
        if not (self.folder / "meta.json").exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.folder / "meta.json", json.dumps(self.meta, sort_keys=True))
        first = sum(len(t) for t in tokens[: self.kept])  # the part's first image
        arrays = {"tokens": np.concatenate(tokens[self.kept :])}
        if mirrored:
            arrays["flipped"] = np.concatenate(mirrored[self.kept :])
        arrays["unusable"] = np.array(sorted(unusable), dtype=np.int64)
        with atomic_path(self.folder / f"part_{first:010d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        self.kept = len(tokens)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class CachedTokens(Dataset):
    """``dataset``'s items with ``tokens`` (L,) int64 from ``cache``: the image's, or its mirror's when the
    item was flipped. With ``pixels`` False (a stage that trains from the tokens alone) a dataset that can
    skip its images (``without_pixels``: the built-in scenes, image folders without control maps) neither
    decodes nor draws them; the items' image is then ``transforms.no_pixels()``, the rest unchanged."""

    def __init__(self, dataset: Dataset, cache: TokenCache, pixels: bool = True):
        if len(cache) != len(dataset):
            raise StaleTokenCache(f"token cache of {len(cache)} images for a dataset of {len(dataset)}")
        if float(getattr(dataset, "flip", 0.0) or 0.0) and cache.flipped is None:
            raise StaleTokenCache("the dataset flips but the token cache holds no mirrored images")
        if not pixels and hasattr(dataset, "without_pixels"):  # the caller's dataset keeps its pixels
            dataset = dataset.without_pixels(cache.meta.get("unusable", ()))
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # the wrapped dataset's attributes (flip, records, ...)
        if name in ("dataset", "cache"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        source = self.cache.flipped if item.get("flipped") else self.cache.tokens
        item["tokens"] = torch.from_numpy(np.asarray(source[index], dtype=np.int64))
        return item
