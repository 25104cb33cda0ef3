"""Training on shards, recorded sample by sample: `Recorder` (imported by tests/test_shards.py) notes what
each step drew; run as a script it trains on two CPU processes (gloo, DDP), whole and resumed.

    python dist_shards.py OUT SHARDS    # rank 0 writes OUT/result.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules import ShardDataModule

RESOLUTION, BATCH_SIZE = 32, 4


def sample_keys(batch: dict) -> list[list[str]]:
    """Per sample: [its id, what was drawn]. The id is the same whether the image was flipped or not (the
    smaller digest of the image and its mirror); what was drawn is the digest of the image, caption, label
    and maps as they came."""

    def digest(*parts) -> str:
        h = hashlib.sha1()
        for p in parts:
            h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else str(p).encode())
        return h.hexdigest()[:16]

    keys = []
    for i, image in enumerate(batch["image"]):
        maps = [batch["control"][m][i] for m in sorted(batch["control"])]
        drawn = digest(image, batch["caption"][i], batch["label"][i], *maps)
        keys.append([min(digest(image), digest(image.flip(-1))), drawn])
    return keys


class Recorder(L.LightningModule):
    """One scalar fitted to the images' mean; each training step's samples are kept in `seen`."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[str]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(sample_keys(batch))
        return (self.w - batch["image"].mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(root: str, steps: int, devices: int = 1, save_dir: str | None = None, resume: str | None = None,
        flip: float = 0.5) -> list:  # fmt: skip
    """Train `steps` steps on the shards at `root` (a checkpoint per step in `save_dir`, or resumed from
    `resume`); the steps' samples."""
    data = ShardDataModule(root, batch_size=BATCH_SIZE, flip=flip)
    data.connect(RESOLUTION)
    module = Recorder()
    callbacks = []
    if save_dir is not None:
        callbacks.append(ModelCheckpoint(save_dir, "{step}", every_n_train_steps=1, save_top_k=-1))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=steps,
        max_epochs=-1, limit_val_batches=0, num_sanity_val_steps=0, logger=False, callbacks=callbacks,
        enable_checkpointing=save_dir is not None, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module.seen


def gathered(seen: list) -> list:
    """Each rank's steps, in rank order."""
    ranks = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(ranks, seen)
    return ranks


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, root = sys.argv[1:3]
    # Epochs of 40 / (2 ranks x 4) = 5 steps: 7 steps cross into the second epoch. The whole run saves a
    # checkpoint per step; the run resumed from the one of step 3 must draw what the whole run drew after it.
    saves = os.path.join(out, "checkpoints")
    whole = gathered(fit(root, 7, devices=2, save_dir=saves))
    resumed = gathered(fit(root, 7, devices=2, resume=os.path.join(saves, "step=3.ckpt")))
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"whole": whole, "resumed": resumed, "stopped": 3}, f)
    torch.distributed.destroy_process_group()  # gloo's threads left to interpreter shutdown can abort
