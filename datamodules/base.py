"""Base LightningDataModule shared by the tokenizer, VAR and control stages.

Every datamodule yields one dict batch, the contract of every stage (README, "Data"): `image` float
(B,3,H,W) in [-1,1], `label` int64 (B,), `caption` list[str], `control` dict modality -> (B,C,H,W). The
model states its needs once through `connect(resolution, keys)` (litgpt's pattern); captions and control
maps are only computed when asked for, but every batch still carries all four keys (empty defaults) so each
stage sees the same dict.
"""

from __future__ import annotations

import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.resume import ResumableLoader
from datamodules.transforms import CROPS, collate

BATCH_KEYS = ("image", "label", "caption", "control")


class VarDataModule(L.LightningDataModule, ABC):
    """Shared settings, `connect`, split bookkeeping and dataloaders; subclasses build the datasets.

    Args:
        batch_size: samples per batch (train drops the last incomplete batch).
        num_workers: DataLoader worker processes (persistent when > 0).
        resolution: output side in pixels; None = set by the model through `connect`.
        crop: "center" | "random" | "none": resize the shorter side then crop a square (random on the train
            split only, center elsewhere), or "none" to resize the whole image to a square.
        flip: probability of a horizontal flip of a train sample; control maps flip with the image.
        val_fraction: share of the samples held out for validation when the data has no explicit val split.
        seed: seeds the val split, the train shuffle order and the synthetic scenes.
    """

    def __init__(
        self,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        crop: str = "center",
        flip: float = 0.0,
        val_fraction: float = 0.05,
        seed: int = 0,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if int(num_workers) < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if crop not in CROPS:
            raise ValueError(f"data.crop must be one of {CROPS}, got {crop!r}")
        if not 0.0 <= float(flip) <= 1.0:
            raise ValueError(f"data.flip is a probability in [0, 1], got {flip}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        if resolution is not None:
            self.check_resolution(int(resolution))
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.crop = crop
        self.flip = float(flip)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self._config_resolution = None if resolution is None else int(resolution)
        self.resolution: int | None = self._config_resolution
        self.keys: tuple[str, ...] = BATCH_KEYS
        self.num_segments: int | None = None  # set by connect() for a segmentation control
        self.datasets: dict[str, Dataset] | None = None
        self._agreed: dict[str, Dataset] | None = None  # the datasets the processes were found to agree on

    def save_settings(self, ignore: Sequence[str] = ()) -> None:
        """`save_hyperparameters` (logger off) of the subclass __init__ that calls this.

        The frame is passed in, not left to Lightning: its lookup keeps `inspect.currentframe()` in a local,
        a reference cycle that holds the caller's frames and their locals (a DataLoader with persistent
        workers, say) until the cycle collector runs. Freed that way, the loader's queues may be finalized
        before it asks its workers to stop, and it then waits 5 s per worker before killing them.
        """
        caller = inspect.currentframe().f_back  # a local of this frame only, which is gone on return
        self.save_hyperparameters(logger=False, ignore=list(ignore) or None, frame=caller)

    # --- what the model asks for -------------------------------------------------------------------------
    def connect(
        self, resolution: int, keys: Sequence[str] = BATCH_KEYS, num_segments: int | None = None
    ) -> None:
        """Receive the model's needs (called by the CLI once, before `setup`): the resolution, the batch keys
        and, for a segmentation control, how many ids it takes (ids 0..num_segments-1)."""
        resolution = int(resolution)
        if self._config_resolution is not None and resolution != self._config_resolution:
            raise ValueError(
                f"data.resolution={self._config_resolution} conflicts with the model, which needs "
                f"resolution {resolution}; remove data.resolution or set it to {resolution}"
            )
        unknown = sorted(set(keys) - set(BATCH_KEYS))
        if unknown:
            raise ValueError(
                f"connect(keys=...) got unknown batch keys {unknown}; allowed: {list(BATCH_KEYS)}"
            )
        self.check_resolution(resolution)
        self.num_segments = None if num_segments is None else int(num_segments)
        if self.num_segments is not None:
            self.check_segments(self.num_segments)
        if self.datasets is not None and (resolution != self.resolution or tuple(keys) != self.keys):
            self.datasets = None  # built for other needs: rebuild in setup()
        self.resolution = resolution
        self.keys = tuple(k for k in BATCH_KEYS if k in keys)

    def check_resolution(self, resolution: int) -> None:
        """Raise when this data cannot be produced at `resolution` (subclasses narrow the range)."""
        if resolution < 1:
            raise ValueError(f"data.resolution must be a positive number of pixels, got {resolution}")

    def check_segments(self, num_segments: int) -> None:
        """Raise when this data's segmentation ids can reach `num_segments` (subclasses that know them)."""

    def wants(self, key: str) -> bool:
        return key in self.keys

    @property
    def num_classes(self) -> int | None:
        names = self.class_names
        return None if names is None else len(names)

    @property
    def class_names(self) -> list[str] | None:
        return None

    # --- datasets ------------------------------------------------------------------------------------------
    @abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """{"train": ..., "val": ...} (optionally "test", "predict") for self.resolution and self.keys."""

    def setup(self, stage: str | None = None) -> None:
        if self.resolution is None:
            raise ValueError(
                f"{type(self).__name__} has no resolution: set data.resolution or call "
                "connect(resolution, keys)"
            )
        if self.datasets is None:
            self.datasets = self.build_datasets()
            train = self.datasets.get("train")
            if train is not None and stage in (None, "fit") and len(train) < self.batch_size:
                raise ValueError(
                    f"the train split has {len(train)} samples, fewer than "
                    f"data.batch_size={self.batch_size}; with drop_last no batch would be produced"
                )
        self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        """Under DDP or FSDP each process builds its own datasets. They must hold the same samples in the same
        order, or the distributed sampler's shares overlap and miss samples, or the processes run different
        numbers of batches and wait for each other for ever. Files added, removed or unreadable while the
        processes scanned them do that: refused on every process, naming the splits that differ."""
        trainer, datasets = self.trainer, self.datasets
        if datasets is None or getattr(trainer, "world_size", 1) < 2 or self._agreed is datasets:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = {split: dataset_signature(ds) for split, ds in sorted(datasets.items())}
        every: list[dict] = [{}] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        found = []
        for split in sorted({s for signatures in every for s in signatures}):
            signatures = [g.get(split, ("no", None)) for g in every]
            if len(set(signatures)) == 1:
                continue
            counts = ", ".join(f"{n} samples on rank {r}" for r, (n, _) in enumerate(signatures))
            same = len({n for n, _ in signatures}) == 1
            found.append(f"{split} split: {counts}" + (" (other files or another order)" if same else ""))
        if found:
            raise ValueError(
                f"{type(self).__name__}: the processes found different data ({'; '.join(found)}). Files were "
                "added, removed or could not be read while the processes scanned them, and every process "
                "must see the same files: let the data settle (or mend the files the data report names) "
                "and start again"
            )
        self._agreed = datasets

    def dataset(self, split: str) -> Dataset:
        """The dataset of `split`; test and predict default to the val split."""
        if self.datasets is None:
            self.setup()
        fallback = {"test": "val", "predict": "test"}
        while split not in self.datasets and split in fallback:
            split = fallback[split]
        return self.datasets[split]

    def _processed(self) -> int:
        """Train batches of the current epoch that the training loop has processed (0 without a trainer)."""
        trainer = self.trainer
        return 0 if trainer is None else trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(self, split: str) -> DataLoader:
        train = split == "train"
        kind, extra = (ResumableLoader, {"progress": self._processed}) if train else (DataLoader, {})
        return kind(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate,
            # Seeds the shuffle and (through the worker base seed) the random crops and flips. The other
            # splits have one too: without it every iter() draws the base seed from the global generator,
            # so a validation inside fit would shift the training's draws (a run resumed at a validation
            # step would not repeat the uninterrupted one).
            generator=torch.Generator().manual_seed(self.seed),
            **extra,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


def dataset_signature(dataset: Dataset) -> tuple:
    """(number of samples, digest of their files in order): the files where the dataset reads records
    (``.records`` with ``.image``), else None (built-in data is generated from its settings); a dataset
    without a length (a stream) is (None, None)."""
    try:
        n = len(dataset)
    except TypeError:
        return (None, None)
    records = getattr(dataset, "records", None)
    if not records:
        return (n, None)
    digest = hashlib.sha1("\n".join(str(getattr(r, "image", r)) for r in records).encode()).hexdigest()
    return (n, digest)


def split_indices(num: int, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, val) index split of `num` samples; `what` names the data in errors."""
    if val_fraction <= 0.0:
        raise ValueError(
            f"{what} has no val split: set data.val_fraction > 0 or provide an explicit val split"
        )
    num_val = max(1, int(round(num * val_fraction)))
    if num_val >= num:
        raise ValueError(
            f"{what} has {num} samples; data.val_fraction={val_fraction} leaves none for training"
        )
    order = np.random.default_rng(seed).permutation(num)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
