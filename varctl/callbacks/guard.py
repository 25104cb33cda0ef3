"""Runs that diverge or get preempted: catch the step, keep the checkpoints good.

``NonFiniteGuard`` looks at every optimizer step, after the backward and before the update: when a loss term
(the stage's ``loss_terms``) or a gradient is NaN or inf, it either stops the run with a message naming the
step and the terms (``action: stop``) or drops the step's gradients so the optimizer leaves the weights as
they were, and counts it (``action: skip``, ``train/skipped_steps``). ``max_consecutive`` skips in a row stop
the run too: a run that only skips is not training. Ranks decide together, so DDP and FSDP stay in step.

``PreemptionCheckpoint`` writes ``last.ckpt`` when the run receives SIGTERM (Lightning stops at the next
batch boundary; with gradient accumulation at the next optimizer step), so a preempted job resumes from
where it was stopped.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from varctl.checkpoints import NonFiniteError

ACTIONS = ("stop", "skip")


def _values(terms: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())


class NonFiniteGuard(L.Callback):
    def __init__(self, action: str = "stop", max_consecutive: int = 10):
        if action not in ACTIONS:
            raise ValueError(f"callbacks.nonfinite.action must be one of {ACTIONS}, got {action!r}")
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive must be >= 1, got {max_consecutive}")
        self.action, self.max_consecutive = action, int(max_consecutive)
        self.skipped, self.consecutive = 0, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        terms = {k: v.detach() for k, v in (getattr(pl_module, "loss_terms", None) or {}).items()}
        bad_terms = [k for k, v in terms.items() if not bool(torch.isfinite(v).all())]
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # 16-mixed skips inf gradients itself
        bad_grads = False
        if params and scaler is None:  # each rank checks its own shard (FSDP: the local part of a DTensor)
            grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
            norms = torch._foreach_norm(grads)
            bad_grads = not bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())
        local = bool(bad_terms) or bad_grads
        diverged = trainer.strategy.reduce_boolean_decision(local, all=False)  # true on one rank: on all
        pl_module.step_skipped = False
        if not diverged:
            self.consecutive = 0
            return
        step = trainer.global_step + 1  # the optimizer step being taken
        what = (
            f"non-finite loss ({', '.join(bad_terms)})" if bad_terms
            else "non-finite gradients" if bad_grads else "a non-finite value on another rank"
        )  # fmt: skip
        detail = f"{what} at step {step}: {_values(terms)}" if terms else f"{what} at step {step}"
        self.consecutive += 1
        if self.action == "stop" or self.consecutive >= self.max_consecutive:
            why = (
                "" if self.action == "stop"
                else f" ({self.consecutive} steps in a row skipped, callbacks.nonfinite.max_consecutive)"
            )  # fmt: skip
            raise NonFiniteError(
                f"training diverged: {detail}{why}. The checkpoints written so far are kept; lower the "
                f"learning rate, or set callbacks.nonfinite.action=skip to skip such steps"
            )
        for p in params:
            p.grad = None  # AdamW leaves parameters without a gradient untouched: no update, no decay
        pl_module.step_skipped = True
        self.skipped += 1
        pl_module.print(f"varctl: skipped step {step}: {detail} (skipped so far: {self.skipped})")
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])


@contextlib.contextmanager
def _validation_repeated(trainer):
    """While saving in a validation that a SIGTERM cut short, the validation loop's progress reads as
    interrupted in its first batch, so that the resumed run validates these weights again, from the start.
    Saved as it stands (its batches so far done, the last one not), Lightning's resume took the validation
    for finished and went on training: that validation point was lost, and anything it decides (a best-model
    checkpoint, early stopping) never saw it."""
    if not (trainer.state.fn == "fit" and trainer.validating and not trainer.sanity_checking):
        yield
        return
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    state = copy.deepcopy(progress.state_dict())
    before = progress.total.completed - progress.current.completed  # batches of the run's earlier validations
    for counter, done in ((progress.total, before), (progress.current, 0)):
        counter.ready = counter.started = done + 1
        counter.processed = counter.completed = done
    progress.is_last_batch = False
    try:
        yield
    finally:
        progress.load_state_dict(state)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM, write ``last.ckpt`` in the checkpoint callback's folder before the run exits.

    The save is made at the end of the train batch, where ModelCheckpoint saves, so the resumed run restarts
    as from any of its checkpoints (saved at the epoch's last batch after Lightning's stop instead, the next
    epoch's order was drawn twice). With gradient accumulation it waits for the batch whose optimizer step
    ends the window: a save between its micro-batches lost the gradients accumulated so far, and the
    resumed run took that step on the remaining micro-batches alone. A SIGTERM that Lightning acts on
    elsewhere (during validation) is saved when it stops the run, as interrupted in the validation's first
    batch: the resumed run validates again (``_validation_repeated``). A predict job stops before its next
    batch (``on_predict_batch_start``)."""

    def __init__(self):
        self._steps_before = 0
        self._deferred = False  # a SIGTERM held back until the end of the accumulation window
        self._saved = False
        self.saved_path: Path | None = None  # what the SIGTERM's save wrote (None: nothing)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._deferred = self._saved = False
        self.saved_path = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # Lightning stops after the batch once its signal connector has seen SIGTERM (trainer.received_sigterm
        # only reads that flag); the ranks decide together, so that all of them save at the same batch
        signals = trainer._signal_connector
        received = trainer.strategy.reduce_boolean_decision(bool(signals.received_sigterm), all=False)
        if not (received or self._deferred):
            return
        if trainer.global_step == self._steps_before and trainer.accumulate_grad_batches > 1:
            if not self._deferred and trainer.is_global_zero:
                step = trainer.global_step + 1
                print(f"varctl: SIGTERM during gradient accumulation: stopping after step {step}", flush=True)
            signals.received_sigterm, self._deferred = False, True
            return
        self._save(trainer)
        signals.received_sigterm, self._deferred = True, False  # Lightning stops once this batch is done

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0):
        # outside fit and evaluation, Lightning's SIGTERM handler only records the signal: a predict job went
        # on to its last batch. It stops before the next batch instead, each process on its own (their
        # batches need not be as many), the outputs of the batches done written.
        if trainer.received_sigterm:
            raise SIGTERMException()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" and not self._saved:
            self._save(trainer)

    def _save(self, trainer) -> None:
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if folder is None:  # the run was told to write no checkpoint
            self._saved = True
            if trainer.is_global_zero:
                step = trainer.global_step
                print(f"varctl: SIGTERM at step {step}: not saved (callbacks.checkpoint=null)", flush=True)
            return
        path = Path(folder) / "last.ckpt"
        if isinstance(trainer.checkpoint_callback, ModelCheckpoint):  # recorded in the file it writes:
            # the resumed run's ModelCheckpoint then overwrites this last.ckpt instead of writing last-v1.ckpt
            trainer.checkpoint_callback.last_model_path = str(path)
        with _validation_repeated(trainer):
            trainer.save_checkpoint(path)  # every rank takes part (sharded strategies); rank 0 writes
        self._saved, self.saved_path = True, path
        if trainer.is_global_zero:
            print(f"varctl: SIGTERM at step {trainer.global_step}: saved {path}", flush=True)
