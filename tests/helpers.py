"""Paths shared by the test files; the shared fixtures built from them are in conftest.py."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

# the golden data of the official VAR code, with its provenance (tests/fixtures/reference/README.md)
REFERENCE = os.path.join(os.path.dirname(__file__), "fixtures", "reference")
TINY = os.path.join(REFERENCE, "var_tiny")  # the tiny VQVAE and VAR with their golden tensors
PATCH_NUMS = (1, 2, 3, 4)  # the scale schedule of the tiny models (64 px)


def perturbed(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter (in place) so zero-initialised parts (cross-attention,
    control projections) matter in a test."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


# ---------------------------------------------------------------------------------------------- data files
ALL = ("image", "label", "caption", "control")


def fake_depth(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """A user 'model' named by a `_partial_` node: brightness as depth."""
    return image.astype(np.float32).mean(-1) * scale


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return ((image + 1) * 127.5).round().permute(1, 2, 0).numpy().astype(np.uint8)


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def textured(seed: int, size=(40, 40)) -> np.ndarray:
    """Blocky random image (sharp boundaries, so canny finds edges)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))


def check_batch(batch: dict, size: int, resolution: int, controls: dict) -> None:
    assert set(batch) == set(ALL)
    image, label = batch["image"], batch["label"]
    assert image.dtype == torch.float32 and image.shape == (size, 3, resolution, resolution)
    assert image.min() >= -1 and image.max() <= 1 and image.std() > 0.05
    assert label.dtype == torch.int64 and label.shape == (size,)
    assert isinstance(batch["caption"], list) and len(batch["caption"]) == size
    assert all(isinstance(c, str) for c in batch["caption"])
    assert set(batch["control"]) == set(controls)
    for m, (channels, dtype) in controls.items():
        t = batch["control"][m]
        assert t.dtype == dtype and t.shape == (size, channels, resolution, resolution)
    if "edges" in controls:
        assert set(batch["control"]["edges"].unique().tolist()) <= {0.0, 1.0}
    if "depth" in controls:
        assert batch["control"]["depth"].min() >= 0 and batch["control"]["depth"].max() <= 1


def tiny_feature_net():
    """A FeatureNet of fixed random weights (features of the images' first 12 values) for metric tests that
    need no weights file."""
    from varctl.metrics.generation import FeatureNet

    class TinyFeatures(FeatureNet):
        name, suffix, num_features = "tiny", "_tiny", 8
        weights = weights_sha256 = "none"

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(12, 8)
            with torch.no_grad():
                self.proj.weight.copy_(torch.randn(8, 12, generator=torch.Generator().manual_seed(0)))
                self.proj.bias.zero_()

        def forward(self, images):
            features = self.proj(images.float().flatten(1)[:, :12])
            return features, features[:, :4]

    return TinyFeatures()


def metric_images(real: bool) -> torch.Tensor:
    """40 fixed images (40, 3, 2, 2) in [0, 1] for the generation-metric tests (real and generated sets)."""
    images = torch.rand(40, 3, 2, 2, generator=torch.Generator().manual_seed(1 if real else 2))
    return images if real else images**2


class StopAfter(L.Callback):
    """Fails a test run after batch ``index``, as a killed run stops: no on_test_end."""

    def __init__(self, index: int):
        self.index = index

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx == self.index:
            raise RuntimeError("killed")
