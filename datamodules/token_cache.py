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
so a cache larger than memory works. Only a new or empty folder, or a cache, takes a cache: a folder of other
files is refused before the run (``check_cache_folder``), never replaced.

Legend: N images, L tokens per image (all scales).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from varctl.files import atomic_dir

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
    ) -> TokenCache:
        """Tokenize every image of ``dataset`` (and its mirror when the dataset flips) with ``vae``, one
        image at a time through the encoder in batches of ``batch_size``; write the cache to ``path``."""
        flip = float(getattr(dataset, "flip", 0.0) or 0.0)
        if getattr(dataset, "crop", None) == "random" and getattr(dataset, "train", False):
            raise ValueError(
                "a token cache needs a fixed crop: data.crop=random draws a new crop every epoch"
            )
        plain = copy.copy(dataset)
        if flip:
            plain.flip = 0.0  # the dataset's own images; their mirrors are tokenized below
        dtype = cls._dtype(vae.config.vocab_size)
        tokens, mirrored = [], []
        device = next(vae.parameters()).device
        for start in range(0, len(plain), batch_size):
            images = torch.stack(
                [plain[i]["image"] for i in range(start, min(start + batch_size, len(plain)))]
            )
            images = images.to(device).float()
            with torch.autocast(device.type, enabled=False):
                tokens.append(torch.cat(vae.img_to_idx(images), dim=1).cpu().numpy().astype(dtype))
                if flip:
                    idx = vae.img_to_idx(images.flip(-1))
                    mirrored.append(torch.cat(idx, dim=1).cpu().numpy().astype(dtype))
            if log_every and (start // batch_size + 1) % log_every == 0:
                print(f"[token cache] {start + len(images)}/{len(plain)} images", flush=True)
        # samples that could not be read were replaced by the next usable one (files.FileDataset): a
        # dataset read without pixels replaces them the same way
        unusable = sorted(int(i) for i in getattr(plain, "_unusable", {}))
        meta = {**meta, "unusable": unusable} if unusable else meta
        cache = cls(np.concatenate(tokens), np.concatenate(mirrored) if flip else None, meta)
        cache.save(path)
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
        for key, value in expect.items():
            if json.loads(json.dumps(value, default=str)) != meta.get(key):
                raise StaleTokenCache(
                    f"token cache {path} was made with {key}={meta.get(key)!r}, this run has "
                    f"{key}={value!r}: delete the folder (it is rebuilt) or name another model.token_cache"
                )
        tokens = np.load(path / "tokens.npy", mmap_mode="r")
        flipped = np.load(path / "tokens_flipped.npy", mmap_mode="r") if meta.get("flipped") else None
        if len(tokens) != meta.get("num_images") or (flipped is not None and flipped.shape != tokens.shape):
            raise StaleTokenCache(f"token cache {path}: arrays do not match meta.json; delete it to rebuild")
        return cls(tokens, flipped, meta)


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
