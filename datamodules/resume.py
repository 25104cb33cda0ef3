"""A train DataLoader that resumes mid-epoch with the very batches the interrupted run would have drawn.

Lightning saves the state of a loader that has ``state_dict`` / ``load_state_dict`` in every checkpoint and
gives it back before the resumed run iterates. The state is:

- the shuffle generator at the start of the epoch, so the epoch's order (and the workers' base seed) is
  drawn again identically;
- how many batches of the epoch the training loop has processed (the loader is asked, not counted: the
  loop prefetches one batch ahead), which the resumed iteration passes over;
- the global torch generator just before the next batch is drawn (with ``num_workers=0`` the random
  crops and flips draw from it, and the model's draws follow them), so that batch gets the same
  augmentation; when the loop had fetched that batch before the checkpoint, also the generator at the
  checkpoint, set once the batch is drawn again;
- the generator after the epoch's draws, for a checkpoint taken at the last batch of an epoch.

Passed-over batches are loaded and dropped (samplers in DDP are Lightning's, so skipping happens here, after
them): a resume costs one pass over the epoch's earlier batches. Exact with ``num_workers=0``. With workers
the order, the position and the model's draws are exact (the workers' base seed has a generator of its
own, see ``__init__``); the random crops and flips drawn inside workers are not: a resumed run starts a
new pool, whose workers' generators are seeded afresh rather than continuing where the persistent pool's
were. The global random state of the model's own draws is restored by ``varctl.callbacks.ResumeRandomState``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    restores_global_rng = True  # varctl.callbacks.ResumeRandomState leaves torch's generator to the loader

    def __init__(self, *args, progress: Callable[[], int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.progress = progress  # () -> batches of the current epoch that the training loop has processed
        # Without workers every epoch makes a new iterator, which draws the base seed from the shuffle
        # generator before the sampler draws the order. A persistent worker pool draws it once, and a
        # resumed run's new pool once more, which would change the resumed epoch's order. So with workers
        # the pool's base seed comes from a generator of its own, and every epoch draws one value from the
        # shuffle generator in its place (``__iter__``): the order is that of num_workers=0, every epoch,
        # resumed or not.
        self._seed_generator = None
        if self.num_workers > 0 and self.generator is not None:
            self._seed_generator = torch.Generator().manual_seed(self.generator.initial_seed() + 1)
        self._resume: dict | None = None
        self._epoch_generator: torch.Tensor | None = None
        self._rng_before: dict[int, torch.Tensor] = {}  # global RNG before batch j + 1 was drawn

    def state_dict(self) -> dict[str, Any]:
        done = int(self.progress()) if self.progress is not None else 0
        return {
            "generator": self._epoch_generator,
            "generator_now": None if self.generator is None else self.generator.get_state(),
            "batches": done,
            "rng_now": torch.get_rng_state(),
            "rng_next": self._rng_before.get(done),  # before the next batch, if the loop fetched it already
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def _get_iterator(self):
        if self._seed_generator is None:
            return super()._get_iterator()
        shuffle, self.generator = self.generator, self._seed_generator  # the sampler keeps `shuffle`
        try:
            return super()._get_iterator()
        finally:
            self.generator = shuffle

    def __iter__(self) -> Iterator:
        resume, self._resume = self._resume, None
        skip = int(resume["batches"]) if resume else 0
        if resume and self.generator is not None:
            if skip >= len(self):  # saved at the end of an epoch: the next one starts where it left off
                self.generator.set_state(resume["generator_now"])
                resume, skip = {"rng_now": resume["rng_now"]}, 0
            elif resume["generator"] is not None:
                self.generator.set_state(resume["generator"])
        self._epoch_generator = None if self.generator is None else self.generator.get_state()
        if self._seed_generator is not None:  # the base seed's draw of a new iterator (see __init__)
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        self._rng_before = {}
        return self._batches(super().__iter__(), skip, resume)

    def _batches(self, it: Iterator, skip: int, resume: dict | None) -> Iterator:
        for _ in range(skip):
            if next(it, None) is None:
                return
        fetched = resume is not None and resume.get("rng_next") is not None
        if resume is not None:  # the next batch draws its crops and flips as it did
            torch.set_rng_state(resume["rng_next"] if fetched else resume["rng_now"])
        j = skip
        while True:
            self._rng_before = {k: v for k, v in self._rng_before.items() if k >= j - 1}
            self._rng_before[j] = torch.get_rng_state()
            batch = next(it, None)
            if batch is None:
                return
            if fetched:  # then the run goes on from the checkpoint's state
                torch.set_rng_state(resume["rng_now"])
            resume, fetched = None, False
            j += 1
            yield batch
