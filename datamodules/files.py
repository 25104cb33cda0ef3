"""Datasets of image files (with optional label, caption and control-map files) and their shared base.

A split is a list of `Record`s. `FileDataset` loads an image and its control-map files, resizes and crops
them in one v2 call (see transforms.py), annotates the maps that have no file from the cropped image, flips
everything together (train only) and returns the per-sample dict that `transforms.collate` stacks into the
dict batch of base.py.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import Dataset

from datamodules.annotators import Annotator, annotate, check_annotators, default_annotators
from datamodules.base import BATCH_KEYS, VarDataModule
from datamodules.transforms import (
    as_tv_tensor,
    batch_map,
    check_controls,
    fit_to,
    image_to_tensor,
    is_image_file,
    load_image,
    load_map,
    map_to_tensor,
    random_flip,
    resize_crop,
)


@dataclass(frozen=True)
class Record:
    """One sample on disk: image path, label (-1 = none), caption and control-map files by modality."""

    image: str
    label: int = -1
    caption: str = ""
    maps: Mapping[str, str] = field(default_factory=dict)


def list_images(folder: str) -> list[str]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_file(f))


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class FileDataset(Dataset):
    """Image files -> sample dicts; maps without a file come from the modality's annotator.

    A map file whose size differs from its image's is first resized to the image's size (nearest for edges
    and segmentation, bicubic for depth), then transformed with the image.
    """

    def __init__(
        self,
        records: Sequence[Record],
        resolution: int,
        crop: str = "center",
        train: bool = False,
        flip: float = 0.0,
        keys: Sequence[str] = BATCH_KEYS,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Annotator] | None = None,
    ):
        self.records = list(records)
        self.train, self.flip = bool(train), float(flip)
        self.geometry = resize_crop(int(resolution), crop, random=self.train)
        self.with_caption = "caption" in keys
        self.controls = tuple(controls) if "control" in keys else ()
        self.annotators = dict(annotators or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = load_image(record.image)
        files = {m: fit_to(load_map(record.maps[m], m), image) for m in self.controls if m in record.maps}
        image, files = self.geometry(image, files)
        pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (H, W, 3) uint8 for annotators
        control = {}
        for modality in self.controls:
            if modality in files:
                control[modality] = files[modality]
                continue
            annotator = self.annotators.get(modality)
            if annotator is None:
                raise missing_annotator(modality, record.image)
            # On the cropped image, before the flip: the map aligns with the pixels and flips with them.
            arr = annotate(annotator, pixels, modality)
            control[modality] = as_tv_tensor(map_to_tensor(arr, modality), modality)
        if self.train:
            _, (image, control) = random_flip(self.flip, image, control)
        return {
            "image": image_to_tensor(image),
            "label": record.label,
            "caption": record.caption if self.with_caption else "",
            "control": {m: batch_map(t, m) for m, t in control.items()},
        }


def missing_annotator(modality: str, image: str) -> ValueError:
    return ValueError(
        f"no {modality} map for {image} and no annotator configured: provide the map file or set "
        f"data.annotators.{modality} (e.g. {{_target_: datamodules.TorchScriptAnnotator, path: model.pt}} or "
        f"{{_target_: pkg.module.function, _partial_: true}})"
    )


class FileDataModule(VarDataModule):
    """Base of the datamodules over files: control maps (files or annotators) and cached split scans."""

    def __init__(
        self,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Callable] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, resolution, crop, flip, val_fraction, seed)
        self.controls = check_controls(controls)
        # Objects, not settings: kept out of the hyperparameters (subclasses save_settings(ignore=...)).
        self.annotators = check_annotators(annotators)
        self._splits: dict[str, list[Record]] | None = None

    @abstractmethod
    def scan(self) -> dict[str, list[Record]]:
        """Find the records of each split ("train", "val", optionally "test")."""

    @property
    def splits(self) -> dict[str, list[Record]]:
        if self._splits is None:
            self._splits = self.scan()
        return self._splits

    def build_datasets(self) -> dict[str, Dataset]:
        controls = self.controls if self.wants("control") else ()
        # Canny for edges and XDoG for sketch unless data.annotators sets them; depth and segmentation have
        # no default.
        annotators = {**default_annotators(), **self.annotators}
        annotators = {m: annotators.get(m) for m in controls}
        for split, records in self.splits.items():
            if not records:
                raise ValueError(f"the {split} split of {type(self).__name__} has no images")
            for modality in controls:
                lacking = next((r.image for r in records if modality not in r.maps), None)
                if lacking is not None and annotators[modality] is None:
                    raise missing_annotator(modality, lacking)
        return {
            split: FileDataset(
                records,
                self.resolution,
                crop=self.crop,
                train=split == "train",
                flip=self.flip,
                keys=self.keys,
                controls=controls,
                annotators=annotators,
            )
            for split, records in self.splits.items()
        }
