"""``EvaluationWriter``: after ``test``, every logged score and its provenance in ``<run>/eval/test.json``."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import torch

from varctl.lit.evaluation import sampler_settings
from varctl.metrics.generation import file_sha256
from varctl.metrics.results import write_results


def _file(path) -> dict | None:
    if not path or not os.path.isfile(str(path)):
        return None if not path else {"path": str(path)}
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path), "bytes": os.path.getsize(path)}


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("varctl", "lightning", "torchmetrics", "torch-fidelity", "kornia", "opencv-python-headless"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


class EvaluationWriter(L.Callback):
    """Writes the scores a ``test`` run logged (``trainer.callback_metrics``) with the files, settings,
    networks and protocols that produced them (``varctl.metrics.results``). The CLI adds it to ``test``."""

    def __init__(
        self, directory: str | os.PathLike, config: dict | None = None, ckpt_path: str | None = None
    ):
        self.directory, self.config, self.ckpt_path = Path(directory), dict(config or {}), ckpt_path
        self.path: Path | None = None

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) or
                   isinstance(v, (int, float))}  # fmt: skip
        model = self.config.get("model") or {}
        inputs = {
            k: _file(model.get(k)) for k in ("tokenizer", "init_from", "control_init_from") if model.get(k)
        }
        provenance = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "stage": type(module).__name__,
            "checkpoint": _file(self.ckpt_path),
            "inputs": inputs,
            "evaluation": getattr(module, "evaluation_record", None),
            "protocols": self.protocols(metrics),
            "test_batches": [int(n) for n in trainer.num_test_batches],
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "seed": self.config.get("seed"),
            "data": self.config.get("data"),
            "versions": _versions(),
        }
        settings = getattr(module, "evaluation", None)  # what test sampled with
        var = getattr(module, "var", None)
        if var is not None and settings is not None:
            control = hasattr(module, "control")
            provenance["sampling"] = sampler_settings(settings, var.config.num_scales, control)
        self.path = write_results(self.directory, "test", metrics, provenance)
        print(f"varctl test: results written to {self.path}", flush=True)

    @staticmethod
    def protocols(metrics: dict) -> dict:
        from varctl.metrics import control

        PROTOCOLS = getattr(control, "PROTOCOLS", {})
        return {k: PROTOCOLS[k.split("/", 1)[-1]] for k in metrics if k.split("/", 1)[-1] in PROTOCOLS}
