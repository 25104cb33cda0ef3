"""TensorBoard image grids of every stage (``ImageLogger``) and the pictures of control maps, which the
predict writer shares.

A stage offers ``val_images(batch, max_images) -> {tag: ImageGrid}`` (the tokenizer also
``train_images(batch, outputs, max_images)``); the callback decides when to ask, lays each grid out (a row
per sample, a column per entry) and writes it with its row names. A column is an RGB image batch in [0, 1],
or a batch's control maps (modality -> (B, C, H, W)), drawn as one column per modality.

Legend: B batch, H W image size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

# segmentation ids -> colours (id 0 black), for grids and predict outputs
PALETTE = torch.tensor(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0]], dtype=torch.float32,
) / 255  # fmt: skip


class ImageGrid(NamedTuple):
    """Columns of one grid (each (B, 3, H, W) in [0, 1], or control maps) and optional row names."""

    columns: list[torch.Tensor | dict[str, torch.Tensor]]
    rows: list[str] | None = None


def control_pictures(maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One RGB picture (B, 3, H, W) in [0, 1] per modality: edges white on black, depth grey (white =
    near), segmentation ids in a fixed palette."""
    out = {}
    for modality, x in maps.items():
        if modality == "segmentation":
            ids = x[:, 0].long() % len(PALETTE)
            out[modality] = PALETTE.to(x.device)[ids].permute(0, 3, 1, 2)  # (B, 3, H, W)
        else:
            out[modality] = x.float().clamp(0, 1).expand(-1, 3, -1, -1)
    return out


def grid_picture(grid: ImageGrid) -> torch.Tensor:
    """The grid as one image (3, H', W'): a row per sample, a column per entry, 1 px between tiles."""
    columns = []
    for column in grid.columns:
        columns += list(control_pictures(column).values()) if isinstance(column, dict) else [column]
    tiles = torch.stack([c.float() for c in columns], dim=1).flatten(0, 1)  # (B * cols, 3, H, W)
    return torchvision.utils.make_grid(tiles.clamp(0, 1).cpu(), nrow=len(columns), padding=1)


class ImageLogger(Callback):
    """Write the stage's image grids to TensorBoard: validation grids from the first val batch once every
    ``every_n_steps`` optimizer steps, training grids (tokenizer) every ``every_n_steps`` steps.

    Every process makes the grids (sampling a sharded model needs all of them); the first one writes them.
    The step of the last validation grid is saved in checkpoints, so a resumed run keeps the schedule of
    the uninterrupted one; a training grid is made once per optimizer step, not once per accumulated batch.
    """

    def __init__(self, every_n_steps: int = 500, max_images: int = 8):
        self.every_n_steps, self.max_images = int(every_n_steps), int(max_images)
        self._last_val_step: int | None = None
        self._last_train_step: int | None = None

    def state_dict(self) -> dict:
        return {"last_val_step": self._last_val_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._last_val_step = state_dict.get("last_val_step")

    def _write(self, trainer, grids: dict[str, ImageGrid]) -> None:
        if not trainer.is_global_zero:
            return
        tb = trainer.logger.experiment
        for tag, grid in grids.items():
            tb.add_image(tag, grid_picture(grid), trainer.global_step)
            if grid.rows:
                rows = "  \n".join(f"{i}: {name}" for i, name in enumerate(grid.rows))
                tb.add_text(f"{tag}_rows", rows, trainer.global_step)

    def _enabled(self, trainer) -> bool:
        return (
            self.every_n_steps > 0 and self.max_images > 0 and isinstance(trainer.logger, TensorBoardLogger)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step - 1  # optimizer steps done before this batch
        if not (self._enabled(trainer) and hasattr(pl_module, "train_images")):
            return
        if step >= 0 and step % self.every_n_steps == 0 and step != self._last_train_step:
            self._last_train_step = step  # the batches accumulated before the next step see the same step
            with torch.no_grad():
                self._write(trainer, pl_module.train_images(batch, outputs, self.max_images))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx=0):
        if batch_idx != 0 or trainer.sanity_checking or not self._enabled(trainer):
            return
        if not hasattr(pl_module, "val_images"):  # a module without grids
            return
        last, step = self._last_val_step, trainer.global_step
        if last is not None and last <= step < last + self.every_n_steps:
            return
        self._last_val_step = step
        with torch.no_grad():
            self._write(trainer, pl_module.val_images(batch, self.max_images))
