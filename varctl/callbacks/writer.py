"""The predict writer the CLI attaches: every predicted image as a PNG, written atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from varctl.callbacks.images import control_pictures
from varctl.files import atomic_path


def save_png(image_CHW: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save a float image in [0, 1] as an 8-bit PNG, atomically (temporary file + rename)."""
    if image_CHW.ndim != 3 or image_CHW.shape[0] not in (1, 3):
        raise ValueError(f"save_png: expected an image tensor (1|3, H, W), found {tuple(image_CHW.shape)}")
    array = (image_CHW.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    array = array.permute(1, 2, 0).numpy()  # (H, W, C)
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else np.ascontiguousarray(array))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


class JobsFailed(RuntimeError):
    """Generation jobs of which some failed, each named where it failed: ``predict`` exits with status 1."""


class ImageWriter(BasePredictionWriter):
    """Write ``predict_step``'s ``{"images": (B,3,H,W) in [0,1], "names": [...]}`` as ``<name>.png``; an
    optional ``"inputs"`` in the batch's layout (``{"image": (B,3,H,W) in [-1,1], "control": {modality:
    maps}}``) is drawn beside each sample as ``<name>_real.png`` and ``<name>_<modality>.png``.

    A prediction with ``"exact_names": True`` (generation jobs, ``datamodules.jobs``) is written as
    ``<name>.png`` exactly, with an optional ``"sheets"`` image as ``<name>_sheet.png``; its ``"failed"``
    entries (inputs that could not be read) are reported, and a summary ends the run.
    """

    def __init__(self, output_dir: str | os.PathLike):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.written, self.failed = 0, []

    def on_predict_start(self, trainer, pl_module) -> None:
        """Warn when the predict loader has fewer slots than the images the stage is configured to draw (not
        for generation jobs, whose data says what to draw and where: ``output_dir``)."""
        if getattr(trainer.datamodule, "output_dir", None) is not None:
            return
        jobs = pl_module.predict_jobs() if hasattr(pl_module, "predict_jobs") else []
        loaders = trainer.predict_dataloaders
        loader = (loaders[0] if loaders else None) if isinstance(loaders, (list, tuple)) else loaders
        # Lightning re-creates the predict loader around a batch sampler, which then holds the batch size
        size = getattr(loader, "batch_size", None)
        size = size or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
        batches = trainer.num_predict_batches[0] if trainer.num_predict_batches else None
        if jobs and size and batches is not None and batches != float("inf"):
            capacity = int(batches) * size * trainer.world_size
            if capacity < len(jobs):
                rank_zero_warn(
                    f"{len(jobs)} images are configured but the predict dataloader has room for {capacity} "
                    "(batches x batch_size x processes); the rest are not generated: raise "
                    "trainer.limit_predict_batches or data.batch_size"
                )

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        if isinstance(prediction, dict) and prediction.get("exact_names"):
            self._write_jobs(prediction)
            if hasattr(trainer.datamodule, "drawn"):  # the jobs' settings record: these images are done
                trainer.datamodule.drawn(prediction["names"])
            return
        if not isinstance(prediction, dict) or "images" not in prediction:
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step must return a dict with 'images' (B,3,H,W) in "
                f"[0,1] and 'names'; found {type(prediction).__name__}"
            )
        images = prediction["images"]
        names = prediction.get("names") or [f"{i:03d}" for i in range(len(images))]
        if len(names) != len(images):
            raise ValueError(f"predict_step returned {len(images)} images but {len(names)} names")
        inputs = prediction.get("inputs") or {}
        beside = control_pictures(inputs.get("control") or {})
        if "image" in inputs:
            beside["real"] = inputs["image"].float().add(1).mul(0.5)
        for suffix, extra in beside.items():
            if len(extra) != len(images):
                raise ValueError(
                    f"predict_step returned {len(images)} images but {len(extra)} '{suffix}' inputs"
                )
        rank = f"r{trainer.global_rank}_" if trainer.world_size > 1 else ""
        for i, (image, name) in enumerate(zip(images, names)):
            stem = f"{rank}b{batch_idx:05d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", str(name))[:120]
            save_png(image, self.output_dir / f"{stem}.png")
            for suffix, extra in beside.items():
                save_png(extra[i], self.output_dir / f"{stem}_{suffix}.png")

    def _write_jobs(self, prediction: dict) -> None:
        for name, reason in prediction.get("failed", []):
            print(f"varctl predict: skipped {name}: {reason}", flush=True)
        self.failed += list(prediction.get("failed", []))
        sheets = prediction.get("sheets")
        for i, (image, name) in enumerate(zip(prediction["images"], prediction["names"])):
            if sheets is not None:  # first: the image marks the job done (datamodules.jobs skips it then)
                save_png(sheets[i], self.output_dir / f"{name}_sheet.png")
            save_png(image, self.output_dir / f"{name}.png")
            self.written += 1

    def totals(self, trainer) -> tuple[int, int] | None:
        """(images written, jobs failed) of generation jobs over all processes; None for other predictions.
        Under DDP a collective: every process calls it once ``trainer.predict`` has returned (not from a
        hook: a process with no job left skips the predict loop and its hooks)."""
        if getattr(trainer.datamodule, "counts", None) is None:
            return None
        counts = torch.tensor([self.written, len(self.failed)], device=trainer.strategy.root_device)
        written, failed = trainer.strategy.reduce(counts, reduce_op="sum").tolist()
        return int(written), int(failed)

    def on_predict_end(self, trainer, pl_module) -> None:
        counts = getattr(trainer.datamodule, "counts", None) if trainer.datamodule is not None else None
        if counts is None:
            return
        rank = f" (process {trainer.global_rank})" if trainer.world_size > 1 else ""
        skipped = counts["skipped"] if trainer.is_global_zero else 0
        print(
            f"varctl predict{rank}: {self.written} written, {skipped} skipped (existing), "
            f"{len(self.failed)} failed, in {self.output_dir}",
            flush=True,
        )
