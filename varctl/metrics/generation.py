"""Generation quality: FID, KID, Inception Score and precision / recall (torchmetrics), the CLIP score
(open_clip), and cached reference statistics.

Feature networks (``FeatureNet``): a network maps images in [0, 1] to features (B, D) and logits (B, C).
- ``inception``: the FID Inception-v3, the TF 2015-12-05 graph ported to PyTorch that the FID literature
  uses (torch-fidelity's ``FeatureExtractorInceptionV3``; its TF1-compatible bilinear resize to 299 px;
  2048-d pool features; ``logits_unbiased`` for IS). Its weights come from a local file that the user
  names, ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity) or
  ``pt_inception-2015-12-05-6726825d.pth`` (pytorch-fid); nothing is downloaded. Scores: ``fid``, ``kid``,
  ``is``, ``precision``, ``recall``. These follow torch-fidelity / clean-fid conventions, not the OpenAI
  ADM evaluator that official VAR reports (TF graph, its own resize), so expect a small offset from it.
- ``judge``: the small class judge the demo trains on the real images of the same data
  (``varctl.metrics.classifier``): its pooled features and class logits. The same statistics are named
  ``fd_judge``, ``kd_judge``, ``is_judge``, ``precision_judge``, ``recall_judge``: comparable between
  runs on the same data scored with the same judge file, never with published numbers.

Every network's weights file is hashed (sha256) into the results, and refused when it holds code (loaded
with ``weights_only=True`` before anything else reads it). A network whose weights are not configured is
skipped with a message naming the setting and the file it expects (``missing_weights``); a metric is
never computed on weights that are not the named ones.

Reference statistics (``ReferenceStats``): the features of a reference set at a resolution, with the
feature network, its weights hash and a fingerprint of the source (file names, sizes and modification
times, or the data configuration of a built-in split), written once as a safetensors file (features,
mean, covariance) and refused, naming the field, when any of these differ.

Legend: B batch, D feature width, C logits, N images.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.image import FrechetInceptionDistance, InceptionScore, KernelInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from varctl.files import UnreadableFile, atomic_path, torch_load

INCEPTION_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")


class MissingWeights(Exception):
    """A metric network whose weights are not configured: the metric is skipped, with this message."""


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _load_weights(path: str | os.PathLike | None, setting: str, expected: str) -> dict:
    """The tensors of a weights file named by ``setting`` (never unpickles code)."""
    if path is None:
        raise MissingWeights(f"{setting} is not set: name the local file {expected} (nothing is downloaded)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{setting}={path}: no such file (expected {expected})")
    try:
        state = torch_load(path, f"weights file ({expected})")
    except UnreadableFile as e:  # a pickle of code, a truncated or foreign file
        raise ValueError(f"{setting}={e}") from None
    if not isinstance(state, Mapping):
        raise ValueError(f"{setting}={path}: expected a state dict, found {type(state).__name__}")
    return dict(state)


def float32(x: torch.Tensor):
    """Autocast off: the feature networks score in float32 under a bf16/fp16 trainer too, as torch-fidelity
    does, so that scores of GPU and CPU runs compare."""
    return torch.autocast(x.device.type, enabled=False)


class FeatureNet(nn.Module):
    """Images in [0, 1] (B, 3, H, W) -> (features (B, D), logits (B, C)); always in eval mode."""

    name: str
    suffix: str  # appended to the metric names ("" for the FID Inception)
    num_features: int
    weights: str
    weights_sha256: str

    def train(self, mode: bool = True) -> FeatureNet:
        return super().train(False)

    def describe(self) -> dict:
        return {"network": self.name, "weights": self.weights, "sha256": self.weights_sha256}


class InceptionFeatures(FeatureNet):
    """The FID Inception-v3 (torch-fidelity), from the weights file ``path``."""

    name, suffix, num_features = "inception", "", 2048

    def __init__(self, path: str | os.PathLike | None, setting: str = "model.evaluation.inception_weights"):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        _load_weights(
            path, setting, " or ".join(INCEPTION_FILES)
        )  # refuses code before torch-fidelity reads it
        try:
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
            )
        except RuntimeError as e:  # load_state_dict: other keys or shapes, listed one kind a line
            found = [line.strip() for line in str(e).splitlines()[1:3]]
            short = "; ".join(line if len(line) <= 150 else f"{line[:150]} ..." for line in found)
            raise ValueError(f"{setting}={path}: not the FID Inception-v3 weights ({short})") from None
        self.weights, self.weights_sha256 = str(path), file_sha256(path)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images_B3HW.float().clamp(0, 1) * 255).round().to(torch.uint8)
        with float32(x):
            features, logits = self.net(x)
        return features.float(), logits.float()


class JudgeFeatures(FeatureNet):
    """The demo's class judge (``varctl.metrics.classifier.SmallClassifier``) from its saved file."""

    name, suffix = "judge", "_judge"

    def __init__(self, path: str | os.PathLike | None, setting: str = "model.evaluation.judge_weights"):
        super().__init__()
        from varctl.metrics.classifier import SmallClassifier

        payload = _load_weights(
            path, setting, "a classifier saved by tools/score_samples.py (runs/classifiers)"
        )
        try:
            self.net = SmallClassifier(payload["num_classes"], payload["width"])
            self.net.load_state_dict(payload["state_dict"])
        except (KeyError, TypeError, RuntimeError) as e:  # another file's payload, or other tensors
            what = f"no {e} entry" if isinstance(e, KeyError) else str(e).splitlines()[0][:150]
            raise ValueError(f"{setting}={path}: not a varctl class judge ({what})") from None
        self.num_features = self.net.head.in_features
        self.meta = dict(payload.get("meta") or {})
        self.weights, self.weights_sha256 = str(path), file_sha256(path)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with float32(images_B3HW):
            features = self.net.features(images_B3HW.float().clamp(0, 1) * 2 - 1).mean((2, 3))
            return features, self.net.head(features)


NETWORKS = {"inception": InceptionFeatures, "judge": JudgeFeatures}


def build_networks(
    names: Sequence[str], weights: Mapping[str, str | None], settings: Mapping[str, str]
) -> tuple[list[FeatureNet], list[str]]:
    """The feature networks ``names`` with their weights files; networks without configured weights are left
    out and their messages returned (a named file that is absent or wrong is an error)."""
    nets, skipped = [], []
    for name in names:
        if name not in NETWORKS:
            raise ValueError(f"unknown feature network {name!r}; expected one of {sorted(NETWORKS)}")
        try:
            nets.append(NETWORKS[name](weights.get(name), settings[name]))
        except MissingWeights as e:
            skipped.append(f"{name} metrics skipped: {e}")
    return nets, skipped


class _Given(nn.Module):
    """The 'feature extractor' handed to torchmetrics: the features are computed before, once per image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def precision_recall(real_ND: torch.Tensor, fake_ND: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): the share of fake samples inside the
    k-nearest-neighbour balls of the real ones, and the share of real samples inside the fake ones'."""

    def radii(x: torch.Tensor) -> torch.Tensor:  # distance to the k-th neighbour other than itself
        return torch.cat([torch.cdist(c, x).kthvalue(k + 1, dim=1).values for c in x.split(1024)])

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        inside = [(torch.cdist(c, centres) <= r[None]).any(1) for c in points.split(1024)]
        return torch.cat(inside).double().mean().item()

    real, fake = real_ND.double(), fake_ND.double()
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} images per set")
    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


class GenerationMetrics(Metric):
    """FID, KID, IS, precision and recall of generated images against real ones, in one network's features.

    ``update(images, real)`` takes images in [0, 1]; the real side may instead come from cached reference
    statistics (``set_reference``). Features are gathered over processes; ``compute`` returns floats named
    after the network (see the module docstring) and is deterministic for a given ``seed``.
    """

    full_state_update = False

    def __init__(
        self,
        net: FeatureNet,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        pr_k: int = 3,
        seed: int = 0,
    ):
        super().__init__()
        self.net = net
        self.kid_subsets, self.kid_subset_size, self.is_splits, self.pr_k = (
            kid_subsets, kid_subset_size, is_splits, pr_k,
        )  # fmt: skip
        self.seed = seed
        self.reference: torch.Tensor | None = None
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")
        self.add_state("fake_logits", [], dist_reduce_fx="cat")

    def update(self, images_B3HW: torch.Tensor, real: bool) -> None:
        features, logits = self.net(images_B3HW.to(next(self.net.parameters()).device))
        if real:
            self.real_features.append(features.float())
        else:
            self.fake_features.append(features.float())
            self.fake_logits.append(logits.float())

    def set_reference(self, features_ND: torch.Tensor) -> None:
        """Use cached real features (``ReferenceStats.features``) instead of real images."""
        if features_ND.shape[1] != self.net.num_features:
            raise ValueError(
                f"reference features of width {features_ND.shape[1]}, the {self.net.name} network gives "
                f"{self.net.num_features}"
            )
        self.reference = features_ND.float()

    def real(self) -> torch.Tensor:
        if self.reference is not None:
            return self.reference
        return _cat(self.real_features, self.net.num_features)

    def compute(self) -> dict[str, float]:
        real = self.real().cpu()
        fake, logits = _cat(self.fake_features).cpu(), _cat(self.fake_logits).cpu()
        if len(real) < 2 or len(fake) < 2:
            raise ValueError(f"generation metrics need 2 or more real and generated images, got {len(real)} "
                             f"and {len(fake)}")  # fmt: skip
        s, D = self.net.suffix, self.net.num_features
        fd = "fid" if self.net.name == "inception" else "fd"
        kd = "kid" if self.net.name == "inception" else "kd"
        out: dict[str, float] = {f"num_real{s}": len(real), f"num_generated{s}": len(fake)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            # the features are gathered over processes already: these metrics must not gather them again
            fid = FrechetInceptionDistance(feature=_Given(D), sync_on_compute=False)
            fid.update(real, real=True)
            fid.update(fake, real=False)
            out[f"{fd}{s}"] = fid.compute().item()
            size = min(self.kid_subset_size, len(real), len(fake))
            if size == len(real) == len(fake):  # every subset would be both whole sets: no spread to report
                size = max(2, size // 2)
            out[f"{kd}{s}_subset_size"] = size
            kid = KernelInceptionDistance(
                feature=_Given(D), subsets=self.kid_subsets, subset_size=size, sync_on_compute=False
            )
            kid.update(real, real=True)
            kid.update(fake, real=False)
            mean, std = kid.compute()
            out[f"{kd}{s}"], out[f"{kd}{s}_std"] = mean.item(), std.item()
            inception_score = InceptionScore(
                feature=_Given(logits.shape[1]), splits=min(self.is_splits, len(fake)), sync_on_compute=False
            )
            inception_score.update(logits)
            mean, std = inception_score.compute()
            out[f"is{s}"], out[f"is{s}_std"] = mean.item(), std.item()
        if min(len(real), len(fake)) > self.pr_k:
            out[f"precision{s}"], out[f"recall{s}"] = precision_recall(real, fake, self.pr_k)
        return out

    def settings(self) -> dict:
        return {
            **self.net.describe(),
            "kid_subsets": self.kid_subsets,
            "kid_subset_size": self.kid_subset_size,
            "is_splits": self.is_splits,
            "precision_recall_k": self.pr_k,
            "seed": self.seed,
        }


def _cat(state, width: int = 1) -> torch.Tensor:
    """A ``cat`` state: a list of (B, D) tensors, or one (N, D) tensor once synced over processes."""
    if isinstance(state, torch.Tensor):
        return state
    return dim_zero_cat(state) if len(state) else torch.zeros(0, width)


# ---------------------------------------------------------------------------------------------- CLIP score
class ClipScore(Metric):
    """CLIP score (Hessel et al. 2021): 100 * max(cos(image, caption), 0), averaged over images, with an
    open_clip model (``model`` architecture name) and the user's local weights file ``weights``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, model: str, weights: str | os.PathLike | None, setting: str = "model.evaluation.clip"):
        # `setting` names the section in messages: f"{setting}.weights" / "_weights" as configured
        super().__init__()
        import open_clip

        if weights is None:
            raise MissingWeights(
                f"{setting}_weights is not set: name the local open_clip weights file of {model} "
                "(e.g. open_clip_pytorch_model.bin; nothing is downloaded)"
            )
        _load_weights(weights, f"{setting}_weights", f"open_clip weights of {model}")
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=str(weights))
        self.clip = clip.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model)
        size = clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        norm = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm.std).view(1, 3, 1, 1), persistent=False)
        self.model_name, self.weights, self.weights_sha256 = model, str(weights), file_sha256(weights)
        self.add_state("score_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @torch.no_grad()
    def update(self, images_B3HW: torch.Tensor, captions: Sequence[str]) -> None:
        x = F.interpolate(images_B3HW.float().clamp(0, 1), self.image_size, mode="bicubic", antialias=True)
        with float32(x):
            image = F.normalize(self.clip.encode_image((x - self.mean) / self.std), dim=-1)
            text = F.normalize(self.clip.encode_text(self.tokenizer(list(captions)).to(x.device)), dim=-1)
        self.score_sum += (100 * (image * text).sum(-1).clamp_min(0)).double().sum()
        self.count += len(captions)

    def compute(self) -> torch.Tensor:
        return (self.score_sum / self.count.clamp_min(1)).float()

    def describe(self) -> dict:
        return {
            "network": f"open_clip:{self.model_name}",
            "weights": self.weights,
            "sha256": self.weights_sha256,
        }


# ------------------------------------------------------------------------------------- reference statistics
class StaleReference(ValueError):
    """Cached reference statistics computed for another source, network, weights or resolution."""


def fingerprint_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """sha256 over the files' names (relative to ``root``), sizes and modification times, in sorted order:
    changes when a file is added, removed, replaced or edited; a copy (new times) reads as changed too."""
    h = hashlib.sha256()
    for p in sorted(Path(p).absolute() for p in paths):
        st = p.stat()
        name = p.relative_to(Path(root).absolute()) if root is not None else p.name
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint_config(config: Mapping) -> str:
    """sha256 of a JSON-able description of a reference set (a built-in split's data settings)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


REFERENCE_FIELDS = ("network", "weights_sha256", "resolution", "source_fingerprint", "num_images")


class ReferenceStats:
    """Features (N, D) of a reference set with what they were computed from (``meta``: REFERENCE_FIELDS,
    plus ``source`` for the reader)."""

    FORMAT = "varctl-reference-stats-1"

    def __init__(self, features_ND: torch.Tensor, meta: Mapping[str, str]):
        self.features, self.meta = features_ND.float(), {k: str(v) for k, v in meta.items()}

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        f = self.features.double()
        mean = f.mean(0)
        cov = (f - mean).T @ (f - mean) / max(len(f) - 1, 1)
        with atomic_path(path) as tmp:
            save_file(
                {"features": self.features.contiguous(), "mean": mean, "cov": cov.contiguous()},
                str(tmp),
                metadata={"format": self.FORMAT, **self.meta},
            )
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, expect: Mapping[str, object]) -> ReferenceStats:
        """The cached statistics at ``path``; ``StaleReference`` when a field of ``expect`` differs."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
                features = f.get_tensor("features")
        except Exception as e:
            raise StaleReference(
                f"reference statistics {path}: unreadable ({e}); delete it to recompute"
            ) from e
        if meta.get("format") != cls.FORMAT:
            raise StaleReference(
                f"reference statistics {path}: not a varctl reference file ({meta.get('format')})"
            )
        for key in REFERENCE_FIELDS:
            if key in expect and meta.get(key) != str(expect[key]):
                raise StaleReference(
                    f"reference statistics {path} were computed with {key}={meta.get(key)}, this evaluation "
                    f"has {key}={expect[key]}: the reference set, network, weights or resolution changed. "
                    "Recompute it (model.evaluation.refresh_reference=true; tools/evaluate.py "
                    "--refresh-reference), delete it, or name another reference_stats file"
                )
        if len(features) != int(meta.get("num_images", -1)):
            raise StaleReference(f"reference statistics {path}: {len(features)} features for "
                                 f"{meta.get('num_images')} images; recompute it (refresh_reference) or "
                                 "delete it")  # fmt: skip
        return cls(features, meta)


def reference_file(path: str | os.PathLike, network: str) -> Path:
    """The cache file of one network: ``{network}`` in ``path`` replaced by its name, else the name put before
    the suffix (``ref.safetensors`` -> ``ref.inception.safetensors``)."""
    path = str(path)
    if "{network}" in path:
        return Path(path.replace("{network}", network))
    p = Path(path)
    return p.with_name(f"{p.stem}.{network}{p.suffix or '.safetensors'}")


def reference_meta(net: FeatureNet, resolution: int, source: str, fingerprint: str, num_images: int) -> dict:
    return {
        "network": net.name,
        "weights_sha256": net.weights_sha256,
        "resolution": resolution,
        "source": source,
        "source_fingerprint": fingerprint,
        "num_images": num_images,
    }


@torch.no_grad()
def features_of(net: FeatureNet, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """Features (N, D) of batches of images in [0, 1]."""
    device = next(net.parameters()).device
    return torch.cat([net(b.to(device))[0].float().cpu() for b in batches])


def cached_reference(
    path: str | os.PathLike | None,
    net: FeatureNet,
    meta: Mapping[str, object],
    batches: Iterable[torch.Tensor] | None,
    refresh: bool = False,
) -> tuple[ReferenceStats, str]:
    """The reference statistics: read from ``path`` when it exists (checked against ``meta``), else
    computed from ``batches`` and, with a ``path``, cached there. Returns them and "cached" / "computed"."""
    if path is not None and Path(path).exists() and not refresh:
        return ReferenceStats.load(path, meta), "cached"
    if batches is None:
        raise ValueError(f"reference statistics {path} do not exist and no reference images were given")
    stats = ReferenceStats(features_of(net, batches), meta)
    if len(stats.features) != int(meta["num_images"]):
        stats.meta["num_images"] = str(len(stats.features))
    if path is not None:
        stats.save(path)
    return stats, "computed"
