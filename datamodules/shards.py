"""Sharded data streamed with litdata, for data that outgrows one disk: a local folder or a bucket URL.

`tools/make_shards.py` writes the splits of any datamodule at one resolution with `litdata.optimize`;
`ShardDataModule` reads them back as the same dict batch (base.py). Layout of `data.root`:

    meta/     one item: what the shards hold (JSON: resolution, splits, class names, maps, the source config);
              a litdata dataset itself, so it is read from wherever the shards are by the same reader
    train/    val/    test/ (optional)    litdata chunks + index.json

A local split is checked against meta/ when the datamodule is set up (`check_split`), so damaged or mixed
shards are a config error before the run, not a crash in it: its folder and index.json, every chunk file the
index lists with the size it records, the sample count, and the index's sha256 that the converter recorded
in meta/ after reading the split back (which ties the split to meta's resolution and classes).

A stored sample is {"index": its position in the source split, "image": PNG bytes (uint8 RGB, resolution
x resolution), "label": int, "caption": str, "control": {modality: 2-D array}}, the maps stored exactly:
edges uint8 {0,1}, segmentation ids uint8 (int32 beyond 255), depth and sketch float32. Every value read
back equals the source's (the source's images are 8-bit already: `transforms.image_to_tensor`).

The train split is shuffled by litdata (the order of its chunks, then the items within each, from the seed
and the epoch) and split across DDP ranks and loader workers by litdata itself; its loader (`ShardLoader`,
litdata's `StreamingDataLoader`) has `state_dict` / `load_state_dict`, which Lightning saves in checkpoints
and gives back on resume (the same interface as resume.py's loader). A horizontal flip (`data.flip`) is
drawn per sample from (seed, epoch, sample), not from torch's generator: the stream depends on the
position alone, so a resumed run sees the same flips with or without workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_png, encode_png

from datamodules.base import VarDataModule
from datamodules.transforms import (
    SOFT,
    as_tv_tensor,
    batch_map,
    check_controls,
    collate,
    image_to_tensor,
    map_to_tensor,
    random_flip,
)

FORMAT = "varctl-shards-1"
META = "meta"  # the sub-folder holding the description of the shards
WRITER = "python tools/make_shards.py"
INDEX = "index.json"  # litdata's index of a folder's chunks: the file name, bytes and samples of each


# --- the stored format: written by tools/make_shards.py, read by ShardStream --------------------------------
def encode_sample(sample: Mapping, index: int) -> dict:
    """A sample dict of base.py -> the item stored in a shard (module docstring); ValueError when a value
    would not read back exactly."""
    image = sample["image"]
    pixels = image.add(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)  # (3, H, W)
    if not torch.equal(image_to_tensor(pixels), image):
        raise ValueError(
            f"sample {index}: its image is not 8-bit RGB mapped to [-1, 1] (transforms.image_to_tensor), "
            "so it cannot be stored as PNG without change"
        )
    return {
        "index": int(index),
        "image": encode_png(pixels).numpy().tobytes(),
        "label": int(sample["label"]),
        "caption": str(sample["caption"]),
        "control": {m: _stored_map(t, m, index) for m, t in sample["control"].items()},
    }


def _stored_map(control: torch.Tensor, modality: str, index: int) -> np.ndarray:
    """A batch map (1, H, W) as the 2-D array stored for it, which `map_to_tensor` turns back into it."""
    if control.ndim != 3 or control.shape[0] != 1:
        shape = tuple(control.shape)
        raise ValueError(f"sample {index}: {modality} map of shape {shape}, expected (1, H, W)")
    arr = control[0].numpy()
    if modality in SOFT:  # depth, sketch: floats in [0, 1] as they are
        return arr.astype(np.float32)
    if modality == "segmentation":  # ids: one byte each when they fit (most label sets), else four
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < 0 or high > np.iinfo(np.int32).max:
            raise ValueError(f"sample {index}: segmentation ids outside [0, 2**31): {low}..{high}")
        return arr.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.int32)
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"sample {index}: {modality} map holds values other than 0 and 1")
    return arr.astype(np.uint8)


def meta_item(text: str) -> dict:
    """The one item of meta/ (litdata.optimize's fn for it)."""
    return {"meta": text}


def read_meta(root: str, cache_dir: str | None = None) -> dict:
    """The description of the shards at `root` (meta/); an error naming data.root and the path when there are
    none."""
    where = f"{root}/{META}"
    try:
        text = StreamingDataset(where, cache_dir=cache_dir)[0]["meta"]
    except (FileNotFoundError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise FileNotFoundError(
            f"data.root={root}: no shards found at {where} ({reason}). data.root is the folder written by "
            f"`{WRITER} --out DIR ...` (meta/, train/, val/ inside)"
        ) from None
    meta = json.loads(text)
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"data.root={root}: {where} is of format {meta.get('format')!r}, expected {FORMAT!r}; write the "
            f"shards again with `{WRITER}`"
        )
    return meta


def read_index(folder: str) -> tuple[list[tuple[str, int, int]], str]:
    """The chunks (file name, bytes, samples) that a local folder's index.json lists, and the file's sha256;
    ValueError naming the file when it is missing or not litdata's index."""
    path = os.path.join(folder, INDEX)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        chunks = [
            (str(c["filename"]), int(c["chunk_bytes"]), int(c["chunk_size"]))
            for c in json.loads(raw)["chunks"]
        ]
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {folder} is not a litdata shard folder") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not litdata's index, expected JSON with a list of chunks "
            f"({type(err).__name__}: {err})"
        ) from None
    return chunks, hashlib.sha256(raw).hexdigest()


def check_split(root: str, split: str, meta: dict) -> None:
    """The local shards of ``split`` against meta/ (module docstring); ValueError naming the file or folder
    and what was expected."""
    folder, expected = f"{root}/{split}", int(meta["splits"][split])
    again = f"copy the whole folder again, or write it again with `{WRITER} --overwrite ...`"
    if not os.path.isdir(folder):
        raise ValueError(
            f"data.root={root}: {folder} is missing, expected the {split} split's {expected} samples that "
            f"{root}/{META} lists; {again}"
        )
    chunks, digest = read_index(folder)
    for name, size, _ in chunks:
        path = f"{folder}/{name}"
        found = os.path.getsize(path) if os.path.isfile(path) else None
        if found != size:
            what = "is missing" if found is None else f"is {found} bytes"
            raise ValueError(
                f"data.root={root}: {path} {what}, expected {size} bytes ({folder}/{INDEX}): a copy or "
                f"download cut short, or a damaged file; {again}"
            )
    count = sum(n for _, _, n in chunks)
    if count != expected:
        raise ValueError(
            f"data.root={root}: {folder}/{INDEX} lists {count} samples, expected {expected} ({root}/{META}); "
            f"{again}"
        )
    recorded = (meta.get("indexes") or {}).get(split)  # absent from shards of an earlier converter
    if recorded is not None and digest != recorded:
        classes = "no class names" if meta["class_names"] is None else f"{len(meta['class_names'])} classes"
        raise ValueError(
            f"data.root={root}: {folder}/{INDEX} is not the index {root}/{META} was written with (sha256 "
            f"{digest[:12]}..., expected {recorded[:12]}...): the split was replaced, by another "
            f"conversion's whose resolution, classes or samples need not be meta's ({meta['resolution']} px, "
            f"{classes}), or edited; {again}"
        )


class ShardStream(StreamingDataset):
    """One split's shards, each item decoded into the sample dict of base.py (the flip drawn per sample)."""

    def __init__(
        self,
        input_dir: str,
        controls: Sequence[str] = (),
        with_caption: bool = True,
        flip: float = 0.0,
        shuffle: bool = False,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(input_dir, cache_dir=cache_dir, shuffle=shuffle, seed=seed)
        self.controls, self.with_caption, self.flip = tuple(controls), bool(with_caption), float(flip)

    def __getitem__(self, index) -> dict:
        item = super().__getitem__(index)
        png = torch.from_numpy(np.frombuffer(item["image"], dtype=np.uint8).copy())
        image = tv_tensors.Image(decode_png(png, ImageReadMode.RGB))  # (3, H, W) uint8
        control = {m: as_tv_tensor(map_to_tensor(item["control"][m], m), m) for m in self.controls}
        flipped = False
        if self.flip > 0:
            flipped, (image, control) = self._random_flip(int(item["index"]), image, control)
        return {
            "image": image_to_tensor(image),
            "label": int(item["label"]),
            "caption": item["caption"] if self.with_caption else "",
            "control": {m: batch_map(t, m) for m, t in control.items()},
            "flipped": bool(flipped),
            "index": int(item["index"]),  # the sample's position in the source split (collate leaves it)
        }

    def _random_flip(self, index: int, image, control):
        """`random_flip` (transforms.py) with torch's generator seeded from (seed, epoch, sample) for its one
        draw and restored after: the decision does not depend on which worker reads the sample, or when."""
        seed = int(np.random.default_rng([self.seed, self.current_epoch, index]).integers(2**63))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return random_flip(self.flip, image, control)


class ShardLoader(StreamingDataLoader):
    """litdata's loader, whose resumed position serves one epoch only.

    `load_state_dict` sets litdata's `restore` flag, which its `__iter__` clears only when an epoch's batches
    run out. Lightning stops asking after the epoch's known number of batches (`len`), so the flag stayed
    set and the next epoch replayed the resumed one from the checkpoint's position. The flag is cleared here
    once a resumed epoch has been iterated, however far.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._resumed_epoch_started = False

    def __iter__(self):
        if self._resumed_epoch_started:
            self.restore, self._resumed_epoch_started = False, False
        return self._batches(super().__iter__())

    def _batches(self, batches):
        # Checked when the first batch is asked for, not when iter() is called: Lightning makes an iterator
        # it never reads while it sets up (FitLoop.setup_data), which must leave the resumed state alone.
        self._resumed_epoch_started = bool(self.restore)
        yield from batches


@dataclass(frozen=True)
class ShardSplit:
    """Where one split's shards are and how many samples they hold. The StreamingDataset is made with the
    loader (ShardDataModule._loader), once the process group exists."""

    path: str
    num_samples: int

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        raise TypeError(
            f"{self.path}: streamed shards are read in order, not by index; model.token_cache needs "
            "map-style data: train from the shards with model.token_cache=null"
        )


class ShardDataModule(VarDataModule):
    """Shards written by tools/make_shards.py, streamed with litdata (module docstring); every stage.

    Args:
        root: the folder written by the converter, or a bucket URL (s3://...) that litdata reads.
        controls: the stored maps to load when the model asks for "control"; None = all of them.
        cache_dir: where litdata keeps the chunks of remote shards (None = litdata's default).
        batch_size, num_workers, resolution, flip, seed: see VarDataModule. The images are stored at one
            resolution, which must be the model's; `seed` seeds the shuffle and the flips.
    """

    def __init__(
        self,
        root: str,
        controls: Sequence[str] | None = None,
        cache_dir: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        flip: float = 0.0,
        seed: int = 0,
    ):
        # Before super().__init__: a data.resolution is checked there against the shards' own.
        self.root = str(root).rstrip("/")
        self.cache_dir = cache_dir
        self.requested_controls = None if controls is None else check_controls(controls)
        self._meta: dict | None = None
        super().__init__(
            batch_size, num_workers, resolution, crop="none", flip=flip, val_fraction=0.0, seed=seed
        )
        self.save_settings()

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = read_meta(self.root, self.cache_dir)
        return self._meta

    @property
    def controls(self) -> tuple[str, ...]:
        """The maps loaded when the model asks for "control": data.controls, or all the stored ones."""
        stored = tuple(self.meta["controls"])
        if self.requested_controls is None:
            return stored
        missing = [m for m in self.requested_controls if m not in stored]
        if missing:
            raise ValueError(
                f"data.controls={list(self.requested_controls)}: the shards at {self.root} hold no "
                f"{missing} maps (they hold {list(stored)}); write them from data with those maps"
            )
        return self.requested_controls

    @property
    def class_names(self) -> list[str] | None:
        return self.meta["class_names"]

    def check_resolution(self, resolution: int) -> None:
        super().check_resolution(resolution)
        stored = int(self.meta["resolution"])
        if resolution != stored:
            raise ValueError(
                f"data.root={self.root}: the shards hold {stored} px images, the model needs {resolution} "
                f"px; write shards at {resolution} px (`{WRITER} --resolution {resolution} ...`) or train a "
                f"{stored} px model"
            )

    def check_segments(self, num_segments: int) -> None:
        top = self.meta["max_segment_id"]
        if top is not None and "segmentation" in self.controls and top >= num_segments:
            raise ValueError(
                f"data.root={self.root}: the shards' segmentation ids run to {top}, the model takes "
                f"{num_segments}: set model.control.num_segments={top + 1}"
            )

    def build_datasets(self) -> dict[str, Dataset]:
        self.controls  # noqa: B018 (data.controls checked against the stored maps before the run)
        if "://" not in self.root:  # a bucket's chunks are fetched by litdata as they are read
            for split in self.meta["splits"]:
                check_split(self.root, split, self.meta)
        return {split: ShardSplit(f"{self.root}/{split}", int(n)) for split, n in self.meta["splits"].items()}

    def _loader(self, split: str) -> ShardLoader:
        shard = self.dataset(split)
        if not isinstance(shard, ShardSplit):
            raise ValueError(
                f"data=shards streams its {split} split; it cannot be replaced by {type(shard).__name__} "
                "(model.token_cache needs map-style data: set model.token_cache=null)"
            )
        train = split == "train"
        # The dataset is made here, not in setup: litdata reads the rank and world size when a dataset is
        # made, and the CLI's first setup runs before the process group exists (in the processes Lightning
        # starts, WORLD_SIZE is set by then and the rank is not: each would read rank 0's share). Being
        # iterable, it is not wrapped in Lightning's DistributedSampler whatever
        # trainer.use_distributed_sampler says: litdata splits it over ranks and workers itself.
        stream = ShardStream(
            shard.path,
            controls=self.controls if self.wants("control") else (),
            with_caption=self.wants("caption"),
            flip=self.flip if train else 0.0,
            shuffle=train,
            seed=self.seed,
            cache_dir=self.cache_dir,
        )
        # No persistent workers: litdata sets each epoch (the shuffle, a resumed position) on the dataset in
        # this process, which a persistent worker's copy would not see. drop_last on the train split makes
        # every rank draw the same number of full batches; the other splits keep all their samples (under
        # DDP litdata still evens the ranks out, dropping at most a few).
        return ShardLoader(
            stream,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=True if train else None,
        )
