"""Generation quality in ``test``: the stages' side of ``varctl.metrics.generation``.

``GenerationEvaluator`` holds the feature networks and metrics of a test run in a plain object, so that
their weights never enter a stage's ``state_dict`` (checkpoints stay the models' own). A stage makes one
in ``on_test_start`` for its groups of images ("test"; the control stage adds "test_shuffled" and
"test_tokenizer"), feeds it generated and real images batch by batch, and logs ``compute`` at the end.
``describe`` is what the results file records about it (``varctl.callbacks.EvaluationWriter``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from varctl.lit.settings import Evaluation
from varctl.metrics.generation import (
    ClipScore,
    GenerationMetrics,
    MissingWeights,
    ReferenceStats,
    build_networks,
    file_sha256,
    fingerprint_config,
    fingerprint_files,
    reference_file,
    reference_meta,
)
from varctl.models.sampling import guidance_schedule, per_scale


def sampler_settings(settings, num_scales: int, control: bool = False) -> dict:
    """The sampling settings of each scale, as the sampler applies them (guidance after its schedule)."""
    out = {
        "cfg_per_scale": guidance_schedule(settings.cfg, settings.cfg_schedule, num_scales),
        "top_k_per_scale": per_scale(settings.top_k, num_scales, "top_k"),
        "top_p_per_scale": per_scale(settings.top_p, num_scales, "top_p"),
        "temperature_per_scale": per_scale(settings.temperature, num_scales, "temperature"),
        "seed": settings.seed,
        "seeds": "seed + test batch index * world size + rank, one generator per batch",
    }
    if control:
        out["control_cfg_per_scale"] = per_scale(settings.control_cfg, num_scales, "control_cfg")
        out["control_strength_per_scale"] = per_scale(
            settings.control_strength, num_scales, "control_strength"
        )
        out["modality_strength"] = settings.modality_strength
    fast = {"token_pruning": settings.token_pruning, "skip_guidance_from": settings.skip_guidance_from}
    if settings.refiner is not None:
        fast.update(refiner=settings.refiner, refiner_sha256=file_sha256(settings.refiner))
        fast["draft_scales"] = settings.draft_scales
    out["fast_samplers"] = fast  # each changes the samples: part of what a score depends on
    return out


LOADING = ("batch_size", "num_workers")


# the data settings that change a file's pixels (the files themselves are fingerprinted)
PIXELS = ("crop", "resolution")


def split_fingerprint(datamodule, split: str, num_images: int, ordered: bool = False) -> tuple[str, str]:
    """(source, fingerprint) of the first ``num_images`` images of a datamodule's split: when it reads files,
    their names, sizes and times with the settings that change their pixels (``PIXELS``), and with
    ``ordered`` their order too (a token cache is read by position); else (built-in data) its settings."""
    dataset = datamodule.dataset(split) if hasattr(datamodule, "dataset") else None
    records = getattr(dataset, "records", None)
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    if records:
        files = [r.image for r in records[:num_images]]
        root = os.path.commonpath([os.path.abspath(f) for f in files])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        what = {"files": fingerprint_files(files, root), **{k: hparams.get(k) for k in PIXELS}}
        if ordered:
            what["order"] = [os.path.relpath(os.path.abspath(f), root) for f in files]
        return f"{split} split ({len(files)} files under {root})", fingerprint_config(what)
    settings = {
        "class": type(datamodule).__qualname__,
        "split": split,
        "num_images": num_images,
        # what the images are; how they are batched and loaded does not change them
        "settings": {k: v for k, v in hparams.items() if k not in LOADING},
    }
    return f"{type(datamodule).__name__} {split} split", fingerprint_config(settings)


class GenerationEvaluator:
    """The generation metrics of one test run, per group of images (see the module docstring)."""

    def __init__(
        self,
        settings: Evaluation,
        groups: Sequence[str],
        resolution: int,
        text: bool = False,
        section: str = "model.evaluation",
    ):
        self.settings, self.resolution = settings, resolution
        names = {"inception": "inception_weights", "judge": "judge_weights"}
        self.nets, self.skipped = build_networks(
            list(settings.networks),
            {n: getattr(settings, k) for n, k in names.items()},
            {n: f"{section}.{k}" for n, k in names.items()},
        )
        for net in self.nets:
            judged = getattr(net, "meta", {}).get("resolution")
            if judged is not None and int(judged) != resolution:
                raise ValueError(
                    f"{net.weights}: the judge was trained at {judged} px, images are {resolution}"
                )
        self.metrics = {
            g: [
                GenerationMetrics(
                    net,
                    settings.kid_subsets,
                    settings.kid_subset_size,
                    pr_k=settings.precision_recall_k,
                    seed=settings.seed,
                )  # fmt: skip
                for net in self.nets
            ]
            for g in groups
        }
        self.clip = None
        if text and settings.clip_model is not None:
            try:
                clip = ClipScore(settings.clip_model, settings.clip_weights, f"{section}.clip")
                self.clip = {groups[0]: clip}
            except MissingWeights as e:
                self.skipped.append(f"clip score skipped: {e}")
        for message in self.skipped:
            rank_zero_warn(f"varctl test: {message}")
        self.references: dict[str, dict] = {}
        self.need_real = {net.name: True for net in self.nets}

    @property
    def active(self) -> bool:
        return bool(self.nets) or bool(self.clip)

    def to(self, device: torch.device) -> GenerationEvaluator:
        for metrics in self.metrics.values():
            for m in metrics:
                m.to(device)
        for m in (self.clip or {}).values():
            m.to(device)
        return self

    def use_references(self, datamodule, split: str, num_images: int) -> None:
        """Read each network's cached reference statistics when ``reference_stats`` names an existing file."""
        path = self.settings.reference_stats
        if path is None:
            return
        source, fingerprint = split_fingerprint(datamodule, split, num_images)
        for net in self.nets:
            file = reference_file(path, net.name)
            meta = reference_meta(net, self.resolution, source, fingerprint, num_images)
            self.references[net.name] = {"path": str(file), "meta": meta, "how": "computed"}
            if file.exists() and not self.settings.refresh_reference:
                stats = ReferenceStats.load(file, meta)  # its network, weights, images and their number
                for metrics in self.metrics.values():
                    next(m for m in metrics if m.net is net).set_reference(stats.features)
                self.references[net.name].update(how="cached", sha256=file_sha256(file))
                self.need_real[net.name] = False
                rank_zero_info(f"varctl test: {net.name} reference statistics read from {file}")

    def update(self, group: str, generated: torch.Tensor, real: torch.Tensor | None, captions=None) -> None:
        if not len(generated):  # a batch of DDP's repeats only (``unrepeated``)
            return
        for m in self.metrics[group]:
            m.update(generated, real=False)
            if real is not None and self.need_real[m.net.name]:
                m.update(real, real=True)
        if self.clip is not None and group in self.clip and captions is not None:
            self.clip[group].update(generated, captions)

    def compute(self, is_global_zero: bool) -> dict[str, float]:
        """Every group's scores, ``<group>/<metric>``; writes the reference statistics that were computed."""
        out: dict[str, float] = {}
        for group, metrics in self.metrics.items():
            for m in metrics:
                if not len(m.fake_features) and not m.update_count:
                    continue
                for key, value in m.compute().items():
                    out[f"{group}/{key}"] = value
                ref = self.references.get(m.net.name)
                if ref and ref["how"] == "computed" and group == next(iter(self.metrics)):
                    with m.sync_context():
                        features = m.real()
                    if is_global_zero and len(features):
                        ref["meta"]["num_images"] = len(features)
                        ReferenceStats(features.cpu(), ref["meta"]).save(ref["path"])
                        ref["sha256"] = file_sha256(ref["path"])
                        rank_zero_info(
                            f"varctl test: {m.net.name} reference statistics written to {ref['path']}"
                        )
        for group, m in (self.clip or {}).items():
            if m.update_count:
                out[f"{group}/clip_score"] = float(m.compute())
        return out

    def describe(self) -> dict:
        nets = {net.name: net.describe() for net in self.nets}
        for m in (self.clip or {}).values():
            nets["clip"] = m.describe()
        first = next(iter(self.metrics.values()), [])
        return {
            "networks": nets,
            "metric_settings": [m.settings() for m in first],
            "skipped": list(self.skipped),
            "reference_stats": {
                name: {k: v for k, v in ref.items() if k != "meta"}
                | {"num_images": ref["meta"]["num_images"]}
                for name, ref in self.references.items()
            },
        }


def unrepeated(module, batch_idx: int, rows: int) -> torch.Tensor | None:
    """Under DDP the test and validation loaders get Lightning's DistributedSampler, which repeats the first
    images of the split after its end so that every process has as many (the split's size is not a
    multiple of the processes). Which of this batch's ``rows`` are not such repeats, (rows,) bool; None when
    all are. Process r reads the padded order's positions r, r + W, ...; those from the split's size on are
    the repeats, shuffled or not."""
    from torch.utils.data import DistributedSampler

    trainer = module._trainer
    if trainer is None or trainer.world_size == 1:
        return None
    loader = trainer.test_dataloaders if trainer.testing else trainer.val_dataloaders
    loader = loader[0] if isinstance(loader, (list, tuple)) else loader
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, DistributedSampler) or sampler.drop_last or loader.batch_size is None:
        return None
    size, world = len(sampler.dataset), sampler.num_replicas
    position = sampler.rank + (batch_idx * loader.batch_size + torch.arange(rows)) * world
    keep = position < size
    return None if bool(keep.all()) else keep.to(module.device)


def rows_of(value, keep: torch.Tensor | None):
    """``value`` restricted to the rows ``keep`` (None: all): a tensor's first dimension, a list's items (one
    per row, e.g. captions), each value of a dict or each item of a tuple (tensors of the same rows)."""
    if keep is None or value is None:
        return value
    if isinstance(value, dict):
        return {k: rows_of(v, keep) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(rows_of(v, keep) for v in value)
    if isinstance(value, torch.Tensor):
        return value[keep]
    return [v for v, k in zip(value, keep.tolist()) if k]


def check_evaluation_weights(settings: Evaluation, section: str = "model.evaluation") -> None:
    """The feature networks' weights files are what their settings say (a ValueError naming the setting
    otherwise): the command line calls it before a test run starts, so a wrong file (a checkpoint given as
    the judge, the judge as the Inception) is refused before anything is written, not at the first batch."""
    if settings.batches > 0:
        names = {"inception": "inception_weights", "judge": "judge_weights"}
        build_networks(list(settings.networks), {n: getattr(settings, k) for n, k in names.items()},
                       {n: f"{section}.{k}" for n, k in names.items()})  # fmt: skip


def start_evaluation(
    module, settings: Evaluation, groups: Sequence[str], section: str = "model.evaluation"
) -> GenerationEvaluator | None:
    """The evaluator of a stage's test run (None when ``settings.batches`` is 0 or no network has weights),
    with the cached reference statistics of the test split read in."""
    if settings.batches <= 0:
        return None
    text = getattr(module, "text_encoder", None) is not None
    evaluator = GenerationEvaluator(settings, groups, module.vae.config.resolution, text, section)
    if not evaluator.active:
        return None
    trainer, datamodule = module.trainer, module.trainer.datamodule
    batch_size = int((getattr(datamodule, "hparams", None) or {}).get("batch_size", 1))
    dataset = datamodule.dataset("test") if hasattr(datamodule, "dataset") else None
    limit = trainer.num_test_batches[0] if trainer.num_test_batches else settings.batches
    # the images scored: the first batches of every process, repeats left out (``unrepeated``)
    n = min(settings.batches, limit) * batch_size * trainer.world_size
    evaluator.use_references(datamodule, "test", min(n, len(dataset)) if dataset is not None else n)
    return evaluator.to(module.device)


def log_evaluation(module, evaluator: GenerationEvaluator | None) -> None:
    """Log the generation scores (already reduced over processes) and keep the evaluator's description for
    the results file."""
    if evaluator is None:
        return
    scores = evaluator.compute(module.trainer.is_global_zero)
    module.log_dict({k: float(v) for k, v in scores.items()}, sync_dist=False)
    module.evaluation_record = evaluator.describe()
