"""Datasets of image files (with optional label, caption and control-map files) and their shared base.

A split is a list of `Record`s. `FileDataset` loads an image, resizes and crops it, loads or annotates the
requested control maps through the same crop box, flips everything together (train only) and returns the
per-sample dict that `transforms.collate` stacks into the dict batch of base.py.
"""

from __future__ import annotations

import inspect
import os
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from datamodules.annotators import annotate, build_annotator
from datamodules.base import BATCH_KEYS, VarDataModule
from datamodules.transforms import (
    check_controls,
    check_modalities,
    crop_box,
    flip_decision,
    hflip,
    image_to_tensor,
    is_image_file,
    load_image,
    load_map,
    map_to_tensor,
    resize_image,
    resize_map,
)


@dataclass(frozen=True)
class Record:
    """One sample on disk: image path, label (-1 = none), caption and control-map files by modality."""

    image: str
    label: int = -1
    caption: str = ""
    maps: Mapping[str, str] = field(default_factory=dict)


def plain(value: Any) -> Any:
    """Config containers (omegaconf's DictConfig/ListConfig included) -> plain dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [plain(v) for v in value]
    return value


def list_images(folder: str) -> list[str]:
    """Image files directly inside `folder`, sorted by name."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if is_image_file(f))


def stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


class FileDataset(Dataset):
    """Image files -> sample dicts; maps without a file come from the modality's annotator."""

    def __init__(
        self,
        records: Sequence[Record],
        resolution: int,
        crop: str = "center",
        train: bool = False,
        flip: float = 0.0,
        keys: Sequence[str] = BATCH_KEYS,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Any] | None = None,
    ):
        self.records = list(records)
        self.resolution, self.crop, self.train, self.flip = int(resolution), crop, bool(train), float(flip)
        self.with_caption = "caption" in keys
        self.controls = tuple(controls) if "control" in keys else ()
        self.annotators = dict(annotators or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        image = load_image(record.image)
        box = crop_box(image.width, image.height, self.crop, random=self.train)
        pixels = resize_image(image, box, self.resolution)
        control = {}
        for modality in self.controls:
            path = record.maps.get(modality)
            if path is not None:
                arr = resize_map(load_map(path, modality), box, self.resolution, modality)
            else:
                annotator = self.annotators.get(modality)
                if annotator is None:
                    raise missing_annotator(modality, record.image)
                arr = annotate(annotator, pixels, modality)  # on the cropped image, before the flip
            control[modality] = map_to_tensor(arr, modality)
        sample = {
            "image": image_to_tensor(pixels),
            "label": record.label,
            "caption": record.caption if self.with_caption else "",
            "control": control,
        }
        return hflip(sample) if self.train and flip_decision(self.flip) else sample


def missing_annotator(modality: str, image: str) -> ValueError:
    return ValueError(
        f"no {modality} map for {image} and no annotator configured: provide the map file or set "
        f"data.annotators.{modality} (e.g. {{type: torchscript, path: model.pt}} or "
        f"{{type: callable, target: 'pkg.module:function'}})"
    )


class FileDataModule(VarDataModule):
    """Base of the datamodules over files: control maps (files or annotators) and cached split scans."""

    def __init__(
        self,
        controls: Sequence[str] = (),
        annotators: Mapping[str, Any] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(batch_size, num_workers, resolution, crop, flip, val_fraction, seed)
        self.controls = check_controls(plain(controls))
        self.annotator_specs = plain(annotators) if annotators is not None else {}
        if not isinstance(self.annotator_specs, dict):
            raise TypeError(f"data.annotators must map modality -> annotator, got {annotators!r}")
        check_modalities(self.annotator_specs, "data.annotators")
        self._splits: dict[str, list[Record]] | None = None

    def save_settings(self, annotators: Any) -> None:
        """save_hyperparameters of the caller's __init__; annotators given as Python callables are left out
        (they cannot be pickled into a checkpoint)."""
        specs = annotators if isinstance(annotators, Mapping) else {}
        objects = any(callable(v) and not isinstance(v, Mapping) for v in specs.values())
        frame = inspect.currentframe().f_back
        self.save_hyperparameters(logger=False, ignore=["annotators"] if objects else None, frame=frame)

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
        annotators = {m: build_annotator(m, self.annotator_specs.get(m)) for m in controls}
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
