"""Two CPU processes (gloo, DDP) over class folders: one run where both see the same files, one where the
second process finds a file fewer (as when a file goes missing or unreadable while they scan).

    python dist_data.py OUT ROOT    # each rank writes OUT/rank<r>.json
"""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from dist_shards import Recorder

from datamodules import ClassFolderDataModule


def fit(root: str) -> str | None:
    """Two steps on the class folders at `root`; the error the run stopped with, or None."""
    data = ClassFolderDataModule(root, resolution=8, batch_size=2, val_fraction=0.25)
    data.connect(8)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=2, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    try:
        trainer.fit(Recorder(), datamodule=data)
    except ValueError as err:
        return str(err)
    return None


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, root = sys.argv[1:3]
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    result = {"same": fit(os.path.join(root, "same")), "differ": fit(os.path.join(root, f"rank{rank}"))}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()
