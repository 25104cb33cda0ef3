"""A toy LightningModule and DataModule for CLI tests that do not depend on the real stages."""

from __future__ import annotations

import os
import random
import signal
import time

import lightning as L
import numpy as np
import torch
import torchmetrics
from torch.utils.data import DataLoader, TensorDataset


class ToyData(L.LightningDataModule):
    def __init__(self, batch_size: int = 4, size: int = 16):
        super().__init__()
        self.batch_size, self.size, self.resolution = batch_size, size, None

    def connect(self, resolution: int, keys=("image",)):
        self.resolution = resolution

    def _loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.rand(self.size, 3, self.resolution, self.resolution, generator=g) * 2 - 1
        return DataLoader(TensorDataset(x), batch_size=self.batch_size)

    train_dataloader = val_dataloader = test_dataloader = predict_dataloader = _loader


class ToyModule(L.LightningModule):
    """One scale parameter fitted to 1. Faults for tests/test_faults.py: a NaN loss at the optimizer steps
    ``nan_steps`` (counted from 1), weights made NaN after step ``poison_after``, SIGTERM sent to the process
    during step ``sigterm_at`` (or in the first validation batch after step ``sigterm_in_validation``, or in
    predict batch ``sigterm_in_predict``, or test batch ``$TOY_SIGTERM_IN_TEST``),
    ``big`` extra weights for slow saves, ``sleep`` seconds per step. Validation records the step of every
    validation batch in ``validated`` (a list the tests read after ``fit``)."""

    def __init__(self, resolution: int = 8, lr: float = 0.1, name: str = "toy", nan_steps=(),
                 poison_after: int | None = None, sigterm_at: int | None = None, big: int = 0,
                 sleep: float = 0.0, sigterm_in_validation: int | None = None,
                 sigterm_in_predict: int | None = None):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.test_mse, self.test_batches_done = torchmetrics.MeanMetric(), 0
        self.scale = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("ballast", torch.zeros(int(big)))

    def data_requirements(self):
        return {"resolution": self.hparams.resolution, "keys": ("image",)}

    def training_step(self, batch, batch_idx):
        hp, step = self.hparams, self.global_step + 1
        loss = ((batch[0] * self.scale - batch[0]) ** 2).mean()
        if step in hp.nan_steps:
            loss = loss * float("nan")
        if step == hp.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(hp.sleep)
        self.loss_terms = {"mse": loss.detach()}
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == self.hparams.poison_after:
            with torch.no_grad():
                self.scale.fill_(float("nan"))

    def validation_step(self, batch, batch_idx):
        if self.global_step == self.hparams.sigterm_in_validation and batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        self.log("val/loss", ((batch[0] * self.scale - batch[0]) ** 2).mean())
        print(f"[toy] validation batch {batch_idx} at step {self.global_step}", flush=True)

    def test_step(self, batch, batch_idx):
        if str(batch_idx) == os.environ.get("TOY_SIGTERM_IN_TEST"):  # an env, not a setting: same config
            os.kill(os.getpid(), signal.SIGTERM)
        if batch_idx < self.test_batches_done:  # held by the metric a stopped test kept (TestProgress)
            return
        self.test_mse.update(((batch[0] * self.scale - batch[0]) ** 2).mean(), weight=len(batch[0]))
        self.log("test/mse", self.test_mse)

    def predict_step(self, batch, batch_idx):
        if batch_idx == self.hparams.sigterm_in_predict:
            os.kill(os.getpid(), signal.SIGTERM)
        return {"images": (batch[0] * self.scale + 1) / 2, "names": [f"img{i}" for i in range(len(batch[0]))]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class KillAt(L.Callback):
    """SIGKILL this process when optimizer step ``step`` (from 1) is about to run: no handler, no cleanup
    (``crash=True``: raise a RuntimeError instead, a crash that tests can run in-process)."""

    def __init__(self, step: int, crash: bool = False):
        self.step, self.crash = step, crash

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            if self.crash:
                raise RuntimeError(f"crashed before step {self.step}")
            os.kill(os.getpid(), signal.SIGKILL)


class DrawsInValidation(L.Callback):
    """Draws from the global torch, numpy and Python generators in every validation batch, as a validation
    step with random masks or noise would."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        torch.rand(3), np.random.rand(), random.random()
