"""``ResumeRandomState``: the global random generators go into every checkpoint and come back on resume, so
the model's own draws (dropout, condition dropout, scale sampling) continue as in the uninterrupted run.
The train loader's position and shuffle come back through ``datamodules.resume.ResumableLoader``."""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


class ResumeRandomState(L.Callback):
    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # tensors and numbers: weights_only
        numpy = {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss,
                 "gauss": gauss}  # fmt: skip
        state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        if not getattr(trainer.train_dataloader, "restores_global_rng", False):
            torch.set_rng_state(state["torch"])  # else the loader sets it, in step with the batches it draws
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
