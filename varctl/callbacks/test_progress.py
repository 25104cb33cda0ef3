"""``TestProgress``: a ``test`` that stops goes on where it stopped, with the scores of an uninterrupted one.

Scoring a model samples an image for each test condition (thousands for an FID), which takes hours at full
size. Every ``every_s`` seconds, and on SIGTERM (which Lightning ends a test with after the batch), each
process writes atomically the states of its metrics (every torchmetrics ``Metric`` of the stage and of its
generation evaluator: losses, accuracies, features of the generated and real images, control scores) and
the number of batches they hold to ``<run.root>/<run.name>/test_progress/<settings digest>.rank<r>.pt``,
keeping the save before it too (not in the run's own folder: a test without ``run.version`` gets a new one
each time). A ``test`` started again with the same weights (a digest of their values), settings and
processes reads them back and skips those batches (the stages' ``test_step`` leaves out the batches below
``test_batches_done``), every process from the newest save they all have. The samples of a batch are drawn
from a seed of its index, so the scores are those of the uninterrupted run. Progress of other weights or
settings is discarded; the files are removed when the test ends."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import lightning as L
import torch
from torchmetrics import Metric

from varctl.checkpoints import weights_digest
from varctl.files import UnreadableFile, atomic_save, torch_load

# what does not change a score: where and how a run is written, and how data is loaded
IGNORED = {"run", "callbacks", "ckpt_path"}
LOADING = {"num_workers", "persistent_workers", "pin_memory"}


def tested_metrics(module: L.LightningModule) -> dict[str, Metric]:
    """Every metric a stage's ``test`` updates, by a stable name: its own (sub-modules) and its generation
    evaluator's (a plain object: ``varctl.lit.evaluation``), nested metrics included."""
    roots: dict[str, torch.nn.Module] = {"module": module}
    evaluator = getattr(module, "evaluator", None)
    if evaluator is not None:
        for group, metrics in evaluator.metrics.items():
            roots.update({f"evaluator.{group}.{i}": m for i, m in enumerate(metrics)})
        roots.update({f"evaluator.clip.{group}": m for group, m in (evaluator.clip or {}).items()})
    out = {}
    for root, tree in roots.items():
        for name, m in tree.named_modules():
            if isinstance(m, Metric):
                out[f"{root}.{name}" if name else root] = m
    return out


def metric_state(metric: Metric) -> dict:
    """The metric's accumulated state (tensors and lists of tensors, on the CPU) and its update count."""
    states = {}
    for name in metric._defaults:
        value = getattr(metric, name)
        states[name] = [v.detach().cpu() for v in value] if isinstance(value, list) else value.detach().cpu()
    return {"states": states, "update_count": metric._update_count}


def set_metric_state(metric: Metric, saved: dict) -> None:
    device = metric.device
    for name, value in saved["states"].items():
        setattr(metric, name, [v.to(device) for v in value] if isinstance(value, list) else value.to(device))
    metric._update_count = saved["update_count"]
    metric._computed = None


class TestProgress(L.Callback):
    """See the module docstring. ``directory``: where the saves go (needed by the test; the CLI gives the
    run's ``<run.root>/<run.name>/test_progress``); ``run_config``: the run's composed config (what the scores
    depend on); ``every_s``: the seconds between two saves (``callbacks.test_progress.every_s``)."""

    __test__ = False  # a callback, not a pytest class

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        run_config: dict | None = None,
        every_s: float = 300.0,
    ):
        # time, not batches: the generated features grow with the batches, so a save costs more and more
        if not float(every_s) >= 0:
            raise ValueError(f"every_s: seconds between two saves of the progress (>= 0), got {every_s}")
        self.directory = None if directory is None else Path(directory)
        self.every_s = float(every_s)
        self.last_save = 0.0
        config = {k: v for k, v in dict(run_config or {}).items() if k not in IGNORED}
        if isinstance(config.get("data"), dict):
            config["data"] = {k: v for k, v in config["data"].items() if k not in LOADING}
        self.config = json.dumps(config, sort_keys=True, default=str)
        self.tag = hashlib.sha256(self.config.encode()).hexdigest()[:16]
        self.key: dict | None = None
        self.done = 0  # batches the restored metrics hold

    def files(self, trainer: L.Trainer) -> tuple[Path, Path]:
        """This process's newest save and the one before it (a kill may fall between two processes' saves of
        the same batch: the processes go on from the newest save they all have)."""
        stem = f"{self.tag}.rank{trainer.global_rank}"
        return self.directory / f"{stem}.pt", self.directory / f"{stem}.previous.pt"

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.directory is None:
            raise ValueError("TestProgress: no directory for the saves (the CLI gives the run's)")
        self.key = {
            "config": self.config,
            "weights": weights_digest(module),  # this process's shards under FSDP
            "world_size": trainer.world_size,
            "test_batches": [int(n) for n in trainer.num_test_batches],
        }
        self.done, self.last_save = 0, time.monotonic()
        module.test_batches_done = 0

    def on_test_batch_start(self, trainer, module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx == 0:  # the stage's metrics and evaluator exist now (its on_test_start ran after ours)
            self._restore(trainer, module)

    def _read(self, file: Path, metrics: dict) -> dict | None:
        """A save of this test (its weights, settings, processes, metrics), or None (a stale one deleted)."""
        if not file.exists():
            return None
        try:
            saved = torch_load(file, "test progress file")
            why = "was made with other weights or settings"
        except (FileNotFoundError, ValueError) as e:  # cut short by a kill, or not one: discarded
            saved, why = {}, f"cannot be read ({e.reason if isinstance(e, UnreadableFile) else e})"
        if not isinstance(saved, dict):
            saved, why = {}, "does not hold a test's progress"
        if saved.get("key") != self.key or set(saved.get("metrics", {})) != set(metrics):
            print(f"varctl test: {file} {why}: discarded", flush=True)
            file.unlink(missing_ok=True)
            return None
        return saved

    def _restore(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = tested_metrics(module)
        saves = {int(s["batches"]): s for s in (self._read(f, metrics) for f in self.files(trainer)) if s}
        done = _common_max(trainer, set(saves))  # every process skips as many batches (FSDP's collectives)
        if not done:
            return
        for name, metric in metrics.items():
            set_metric_state(metric, saves[done]["metrics"][name])
        self.done = module.test_batches_done = done
        if trainer.is_global_zero:
            print(f"varctl test: going on after {done} test batches ({self.directory})", flush=True)

    def on_test_batch_end(
        self, trainer, module, outputs, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        n, last = batch_idx + 1, trainer.num_test_batches[dataloader_idx]
        if n <= self.done or n == last:  # after the last batch the test ends now
            return
        due = time.monotonic() - self.last_save >= self.every_s or trainer.received_sigterm
        # every process saves at the same batches (rank 0's clock, any process's SIGTERM)
        if not trainer.strategy.reduce_boolean_decision(bool(due), all=False):
            return
        metrics = {name: metric_state(m) for name, m in tested_metrics(module).items()}
        newest, previous = self.files(trainer)
        self.directory.mkdir(parents=True, exist_ok=True)
        if newest.exists():
            os.replace(newest, previous)
        atomic_save({"key": self.key, "batches": n, "metrics": metrics}, newest)
        self.last_save = time.monotonic()
        if trainer.received_sigterm:
            print(f"varctl test: SIGTERM after test batch {n}: the scores so far are in {newest}", flush=True)

    def on_test_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        for file in self.files(trainer):
            file.unlink(missing_ok=True)
        module.test_batches_done = 0


def _common_max(trainer: L.Trainer, counts: set[int]) -> int:
    """The largest of ``counts`` that every process has (0 when none)."""
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sorted(counts))
        counts = set.intersection(*(set(c) for c in gathered))
    return max(counts, default=0)
