"""``ResumeRandomState``: the global random generators go into every checkpoint and come back on resume, so
the model's own draws (dropout, condition dropout, scale sampling) continue as in the uninterrupted run.
The train loader's position and shuffle come back through ``datamodules.resume.ResumableLoader``.

A validation inside ``fit`` leaves the generators as it found them (its steps, image grids and callbacks
may draw): the checkpoints of a validation step are saved before it runs, so a run resumed there (which
does not repeat it) draws what the uninterrupted one drew after it. Lightning isolates its sanity check the
same way. The val loader is made before ``on_validation_start``: it needs a generator of its own, as the
datamodules' loaders have (``datamodules.base``), or its iterator draws its seed from torch's.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def _global_state() -> dict:
    """torch (CPU and, when in use, every CUDA device), numpy and Python generators: tensors and numbers only,
    so a checkpoint loads with weights_only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.copy()), "pos": pos, "has_gauss": has_gauss,
             "gauss": gauss}  # fmt: skip
    state = {"torch": torch.get_rng_state(), "numpy": numpy, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_state(state: dict, torch_cpu: bool = True) -> None:
    if torch_cpu:
        torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeRandomState(L.Callback):
    def __init__(self):
        self._pending: dict | None = None
        self._before_validation: dict | None = None

    def state_dict(self) -> dict:
        return _global_state()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        # the train loader sets torch's generator itself, in step with the batches it draws
        loader_sets_it = getattr(trainer.train_dataloader, "restores_global_rng", False)
        _set_global_state(state, torch_cpu=not loader_sets_it)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._before_validation = _global_state()

    def on_validation_end(self, trainer, pl_module) -> None:
        state, self._before_validation = self._before_validation, None
        if state is not None:
            _set_global_state(state)
