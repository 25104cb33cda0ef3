"""ImageLogger's schedule: a resumed run writes its validation grids at the steps of the uninterrupted run,
and gradient accumulation makes one training grid per optimizer step."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import TensorBoardLogger

from varctl.callbacks import ImageLogger


class Grids(BoringModel):
    def train_images(self, batch, outputs, max_images):
        return {}

    def val_images(self, batch, max_images):
        return {}


@pytest.fixture
def written(monkeypatch):
    """(kind, step) of every grid written; kind 'val' or 'train'."""
    out = []

    def record(self, trainer, grids):
        out.append(("val" if trainer.validating else "train", trainer.global_step))

    monkeypatch.setattr(ImageLogger, "_write", record)
    return out


def fit(root, max_steps, every, ckpt_path=None, **kwargs):
    trainer = L.Trainer(
        default_root_dir=root, accelerator="cpu", max_steps=max_steps, logger=TensorBoardLogger(root),
        callbacks=[ImageLogger(every_n_steps=every)], enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, **{"limit_val_batches": 1, **kwargs},
    )  # fmt: skip
    trainer.fit(Grids(), ckpt_path=ckpt_path)
    return trainer


def test_a_resumed_run_writes_the_validation_grids_of_the_uninterrupted_run(tmp_path, written):
    fit(tmp_path / "whole", 10, every=3, val_check_interval=2)
    whole = [step for kind, step in written if kind == "val"]
    assert whole == [2, 6, 10]  # validations at 2, 4, ..., 10; a grid once 3 steps have passed
    written.clear()
    first = fit(tmp_path / "cut", 6, every=3, val_check_interval=2)
    last = first.checkpoint_callback.best_model_path  # saved at step 6
    fit(tmp_path / "cut", 10, every=3, val_check_interval=2, ckpt_path=last)
    assert [step for kind, step in written if kind == "val"] == whole  # before: 2, 6, then 8 (not 10)


def test_accumulated_batches_make_one_training_grid_per_optimizer_step(tmp_path, written):
    fit(tmp_path, 6, every=2, accumulate_grad_batches=3, limit_val_batches=0)
    assert [step for kind, step in written if kind == "train"] == [1, 3, 5]  # after steps 0, 2, 4
