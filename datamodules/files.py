"""Datasets of image files (with optional label, caption and control-map files) and their shared base.

A split is a list of `Record`s. `FileDataModule` checks their files when it builds the datasets (verify.py:
samples with bad files skipped or refused, maps of another size resized, all of it in a report in the run
directory). `FileDataset` loads an image and its control-map files, resizes and crops them in one v2 call
(see transforms.py), annotates the maps that have no file from the cropped image, flips everything together
(train only) and returns the per-sample dict that `transforms.collate` stacks into the dict batch of base.py.
A sample whose file fails during the run (deleted or changed after the scan) is replaced by the next one.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
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
    no_pixels,
    random_flip,
    resize_crop,
)
from datamodules.verify import (
    CHECKS,
    ON_BAD_FILE,
    ON_SIZE_MISMATCH,
    REPORT_NAME,
    SHOWN,
    BadFilesError,
    BadFileWarning,
    FileInfo,
    Key,
    aspect_problem,
    check_choice,
    check_max_aspect,
    describe,
    during_run_file,
    inspect_files,
    log_event,
    refusal,
    size_problem,
    sort_records,
    summary,
    write_report,
)

MAX_ASPECT = 4.0  # default of data.max_aspect: long side / short side
MAX_REPLACEMENTS = 64  # unusable samples in a row after which the data is taken to be gone


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

    A map file whose size differs from its image's is resized to the image's size first (nearest for edges
    and segmentation, bicubic for depth and sketch) under `on_size_mismatch="resize"`, with a warning unless
    the scan reported it (`resized`), then transformed with the image; under "skip" or "error" its sample
    cannot be used. Neither can one whose image is beyond `max_aspect` or whose files cannot be read: sample
    i is then replaced by the next one that can, (i + 1) mod len, ..., the same one every time, with a
    warning naming the file (and a line in `events_file`), and is passed over for the rest of the process.

    ``without_pixels`` gives a copy that reads no file when no control map is asked for (a token cache's
    training items, datamodules.token_cache): the sample is the record's label, caption and flip draw with
    ``no_pixels()``, and the samples found unusable when the cache was built are replaced as then.
    """

    pixels = True

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
        max_aspect: float | None = MAX_ASPECT,
        on_size_mismatch: str = "resize",
        resized: Iterable[str] = (),
    ):
        self.records = list(records)
        self.train, self.flip, self.crop = bool(train), float(flip), crop
        self.geometry = resize_crop(int(resolution), crop, random=self.train)
        self.with_caption = "caption" in keys
        self.controls = tuple(controls) if "control" in keys else ()
        self.annotators = dict(annotators or {})
        self.max_aspect = check_max_aspect(max_aspect)
        self.on_size_mismatch = check_choice(on_size_mismatch, ON_SIZE_MISMATCH, "on_size_mismatch")
        self.resized = frozenset(resized)  # map files the scan reported as resized: no warning for them
        self.events_file: str | None = None  # set by the datamodule once it knows the run directory
        self._unusable: dict[int, str] = {}  # sample -> why, found during the run in this process

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")  # ends iteration: replacements wrap around
        index %= len(self)
        failed = []
        for step in range(min(len(self), MAX_REPLACEMENTS)):
            i = (index + step) % len(self)
            if i in self._unusable:
                continue
            if not self.pixels:
                return self._without_pixels(self.records[i])
            try:
                image, files = self._load(self.records[i])
            except (OSError, ValueError) as err:
                self._unusable[i] = str(err)
                failed.append(i)
                continue
            for j in failed:
                self._skipped(j, i)
            return self._sample(self.records[i], image, files)
        tried = min(len(self), MAX_REPLACEMENTS)
        raise OSError(
            f"none of the {tried} samples from {index} on can be used (was the data moved or deleted during "
            f"the run?); sample {index}: {self._unusable.get(index, '')}"
        )

    def without_pixels(self, unusable: Iterable[int] = ()) -> FileDataset:
        """A copy that reads no file (this one is unchanged), with the samples ``unusable`` (found so when
        a token cache was built) replaced as then; itself when control maps are read, which need the files."""
        if self.controls:
            return self
        lean = copy.copy(self)
        lean.pixels = False
        lean._unusable = {
            **self._unusable,
            **dict.fromkeys(unusable, "unusable when the token cache was built"),
        }
        return lean

    def _without_pixels(self, record: Record) -> dict:
        flipped = self.train and random_flip(self.flip, no_pixels())[0]  # the draw of the full path
        return {
            "image": no_pixels(),
            "label": record.label,
            "caption": record.caption if self.with_caption else "",
            "control": {},
            "flipped": bool(flipped),
        }

    def _load(self, record: Record) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The image and map files of `record`; OSError or ValueError naming a file that cannot be used."""
        image = load_image(record.image)
        size = (image.shape[-1], image.shape[-2])
        reason = aspect_problem(size, self.max_aspect)
        if reason:
            raise ValueError(f"image file {record.image}: {reason}")
        files = {}
        for modality in self.controls:
            path = record.maps.get(modality)
            if path is not None:
                files[modality] = self._fit(load_map(path, modality), image, path, modality)
        return image, files

    def _fit(self, control: torch.Tensor, image: torch.Tensor, path: str, modality: str) -> torch.Tensor:
        size, target = (control.shape[-1], control.shape[-2]), (image.shape[-1], image.shape[-2])
        if size == target:
            return control
        what = f"{modality} map file {path}: {size_problem(size, target)}"
        if self.on_size_mismatch != "resize":
            raise ValueError(f"{what} (data.on_size_mismatch={self.on_size_mismatch})")
        if path not in self.resized:
            message = f"data: {what}; resized to the image (data.on_size_mismatch=resize)"
            warnings.warn(message, BadFileWarning, stacklevel=2)
        return fit_to(control, image)

    def _skipped(self, index: int, replacement: int) -> None:
        record, why = self.records[index], self._unusable[index]
        warnings.warn(
            f"data: {why}. Sample {index} is skipped from now on: the next usable sample is returned in its "
            f"place, now {replacement} ({self.records[replacement].image})",
            BadFileWarning,
            stacklevel=2,
        )
        event = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": os.getpid(), "sample": index}
        event.update(image=record.image, reason=why, replaced_by=replacement)
        log_event(self.events_file, event)

    def _sample(self, record: Record, image: torch.Tensor, files: dict[str, torch.Tensor]) -> dict:
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
        flipped = False
        if self.train:
            flipped, (image, control) = random_flip(self.flip, image, control)
        return {
            "image": image_to_tensor(image),
            "label": record.label,
            "caption": record.caption if self.with_caption else "",
            "control": {m: batch_map(t, m) for m, t in control.items()},
            "flipped": bool(flipped),  # which cached tokens belong to the image (datamodules.token_cache)
        }


def missing_annotator(modality: str, image: str) -> ValueError:
    return ValueError(
        f"no {modality} map for {image} and no annotator configured: provide the map file or set "
        f"data.annotators.{modality} (e.g. {{_target_: datamodules.TorchScriptAnnotator, path: model.pt}} or "
        f"{{_target_: pkg.module.function, _partial_: true}})"
    )


class FileDataModule(VarDataModule):
    """Base of the datamodules over files: control maps (files or annotators), cached split scans, and the
    check of the files with its report (verify.py).

    Args (the others: see VarDataModule and the subclasses):
        check_files: "decode" | "header" | "trust": how much of each file is read before the run.
        on_bad_file: "skip" | "error": a sample with a file that cannot be used (or an image beyond
            max_aspect) is skipped, or the run refused with a BadFilesError (a ValueError) naming them all.
        max_aspect: long side / short side of an image beyond which it is a bad file; None = any.
        on_size_mismatch: "resize" | "skip" | "error": a map file of another size than its image is resized
            to the image, its sample skipped, or the run refused.
        report_file: where the report (JSON) goes; None = data_report.json in the run directory (the
            trainer's log_dir; with no trainer or no logger it is only kept in `self.report`).
    """

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
        check_files: str = "decode",
        on_bad_file: str = "skip",
        max_aspect: float | None = MAX_ASPECT,
        on_size_mismatch: str = "resize",
        report_file: str | None = None,
    ):
        super().__init__(batch_size, num_workers, resolution, crop, flip, val_fraction, seed)
        self.controls = check_controls(controls)
        # Objects, not settings: kept out of the hyperparameters (subclasses save_settings(ignore=...)).
        self.annotators = check_annotators(annotators)
        self.check_files = check_choice(check_files, CHECKS, "check_files")
        self.on_bad_file = check_choice(on_bad_file, ON_BAD_FILE, "on_bad_file")
        self.max_aspect = check_max_aspect(max_aspect)
        self.on_size_mismatch = check_choice(on_size_mismatch, ON_SIZE_MISMATCH, "on_size_mismatch")
        self.report_file = None if report_file is None else str(report_file)
        self.report: dict | None = None  # what the last check found (written by setup, see _report_path)
        self._splits: dict[str, list[Record]] | None = None
        self._files: dict[Key, FileInfo] = {}  # what the check read, kept when the datasets are rebuilt

    @abstractmethod
    def scan(self) -> dict[str, list[Record]]:
        """Find the records of each split ("train", "val", optionally "test")."""

    @property
    def splits(self) -> dict[str, list[Record]]:
        """The records as found, before the check of their files (the datasets hold the ones kept)."""
        if self._splits is None:
            self._splits = self.scan()
        return self._splits

    def build_datasets(self) -> dict[str, Dataset]:
        controls = self.controls if self.wants("control") else ()
        # Canny for edges and XDoG for sketch unless data.annotators sets them; depth and segmentation have
        # no default.
        annotators = {**default_annotators(), **self.annotators}
        annotators = {m: annotators.get(m) for m in controls}
        kept = self._usable_records(controls)
        for split, records in kept.items():
            if not records:
                raise self._no_images(split)
            for modality in controls:
                lacking = next((r.image for r in records if modality not in r.maps), None)
                if lacking is not None and annotators[modality] is None:
                    raise missing_annotator(modality, lacking)
        resized = {e["file"] for e in self.report["resized"]}
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
                max_aspect=self.max_aspect,
                on_size_mismatch=self.on_size_mismatch,
                resized=resized,
            )
            for split, records in kept.items()
        }

    def _usable_records(self, controls: Sequence[str]) -> dict[str, list[Record]]:
        """The records of each split whose image and `controls` map files can be used; sets `self.report`,
        warns when files were skipped or resized, raises BadFilesError when the settings refuse some."""
        splits = self.splits
        every = [r for records in splits.values() for r in records]
        keys = [(r.image, None) for r in every]
        keys += [(r.maps[m], m) for r in every for m in controls if m in r.maps]
        start = time.perf_counter()
        self._files.update(inspect_files([k for k in keys if k not in self._files], self.check_files))
        self._check_segment_ids(every, controls)
        verdicts = sort_records(
            splits, self._files, controls, self.max_aspect, self.on_bad_file, self.on_size_mismatch
        )
        counts = {
            split: {
                "samples": len(records),
                "kept": len(verdicts.kept[split]),
                "skipped": len(records) - len(verdicts.kept[split]),
                "resized_maps": sum(e["split"] == split for e in verdicts.resized),
            }
            for split, records in splits.items()
        }
        self.report = {
            "datamodule": type(self).__name__,
            "settings": {
                "check_files": self.check_files,
                "on_bad_file": self.on_bad_file,
                "max_aspect": self.max_aspect,
                "on_size_mismatch": self.on_size_mismatch,
            },
            "files_checked": 0 if self.check_files == "trust" else len(set(keys)),
            "seconds": round(time.perf_counter() - start, 3),
            "splits": counts,
            "skipped": verdicts.skipped,
            "resized": verdicts.resized,
            "refused": verdicts.refused,
        }
        if verdicts.refused:
            self._write_report(self.report_file)
            raise refusal(verdicts.refused)
        if verdicts.skipped or verdicts.resized:
            where = self.report_file or f"{REPORT_NAME} in the run directory"
            rank_zero_warn(summary(self.report, where), category=BadFileWarning)
        return verdicts.kept

    def _check_segment_ids(self, records: Sequence[Record], controls: Sequence[str]) -> None:
        """Segmentation map files with ids the model cannot take (connect's num_segments) refuse the run,
        naming them: a setting to change, not files to skip."""
        if self.num_segments is None or "segmentation" not in controls:
            return
        over = [
            (r.maps["segmentation"], info.max_id)
            for r in records
            if "segmentation" in r.maps
            and (info := self._files.get((r.maps["segmentation"], "segmentation"))) is not None
            and info.max_id is not None
            and info.max_id >= self.num_segments
        ]
        if over:
            top = max(i for _, i in over)
            listed = "; ".join(f"{path} (max id {i})" for path, i in over[:SHOWN])
            more = f"; and {len(over) - SHOWN} more" if len(over) > SHOWN else ""
            raise ValueError(
                f"{len(over)} segmentation map file(s) hold ids the model cannot take, expected ids in "
                f"[0, {self.num_segments}) (model.control.num_segments={self.num_segments}): {listed}{more}. "
                f"Set model.control.num_segments={top + 1}"
            )

    def _no_images(self, split: str) -> ValueError:
        lost = [e for e in self.report["skipped"] if e["split"] == split]
        if not lost:
            return ValueError(f"the {split} split of {type(self).__name__} has no images")
        self._write_report(self.report_file)
        more = f"; and {len(lost) - SHOWN} more" if len(lost) > SHOWN else ""
        return BadFilesError(
            f"the {split} split of {type(self).__name__} has no usable images, all "
            f"{self.report['splits'][split]['samples']} are skipped ({lost[0]['setting']}): "
            + "; ".join(describe(e) for e in lost[:SHOWN])
            + more
        )

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        path = self._report_path()
        if path is not None:
            self._write_report(path)
            for dataset in self.datasets.values():
                dataset.events_file = during_run_file(path)

    def _report_path(self) -> str | None:
        """data.report_file, else data_report.json in the run directory once a trainer with a logger has
        taken this datamodule (the CLI's first setup, before the trainer, only checks)."""
        if self.report_file is not None:
            return self.report_file
        trainer = self.trainer
        if trainer is None or not trainer.loggers:
            return None
        return os.path.join(trainer.log_dir, REPORT_NAME)  # log_dir broadcasts: asked on every rank

    def _write_report(self, path: str | None) -> None:
        if path is None or self.report is None:
            return
        if self.trainer is None or self.trainer.is_global_zero:
            write_report(path, {**self.report, "during_run": during_run_file(path)})
