"""Annotators: compute a control map from an image when no map file exists.

An annotator is any callable `annotator(image) -> map` taking the uint8 (H, W, 3) RGB image after resize and
crop (so the map aligns with the pixels; flips are applied to both afterwards). Edges default to OpenCV's
Canny; depth and segmentation wrap a model the user provides, as a TorchScript file or a Python callable.
Outputs are normalized by `annotate`: edges -> {0,1}, depth -> [0,1] (min-max per image, larger = nearer,
as MiDaS/DPT-style inverse depth), segmentation -> int64 ids (argmax when the model returns class scores).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.transforms import MODALITIES


@runtime_checkable
class Annotator(Protocol):
    """uint8 (H, W, 3) RGB numpy image -> a map (numpy array or tensor) of the same height and width."""

    def __call__(self, image: np.ndarray) -> np.ndarray | torch.Tensor: ...


class CannyAnnotator:
    """Canny edges of the RGB image (cv2.Canny on all channels, as ControlNet does): uint8 0/255."""

    def __init__(self, low: float = 100, high: float = 200):
        if not 0 <= low <= high:
            raise ValueError(f"canny thresholds need 0 <= low <= high, got low={low}, high={high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return cv2.Canny(np.ascontiguousarray(image), self.low, self.high)


class TorchScriptAnnotator:
    """A TorchScript model file: input float (1, 3, H, W) in [0, 1]; output (1, C, h, w), (1, h, w) or (h, w).

    The model is loaded on first use (in each DataLoader worker), so the annotator stays picklable.
    """

    def __init__(self, path: str, device: str = "cpu", key: str = "data.annotators"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{key}.path: TorchScript file not found: {path}")
        self.path, self.device = path, device
        self._model = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self._model is None:
            self._model = torch.jit.load(self.path, map_location=self.device).eval()
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float().div(255.0)
        return self._model(x.to(self.device)).float().cpu()


class CallableAnnotator:
    """A Python callable named "pkg.module:attr": a function, or a class instantiated once with `kwargs`."""

    def __init__(self, target: str, kwargs: Mapping[str, Any] | None = None, key: str = "data.annotators"):
        if ":" not in target:
            raise ValueError(f"{key}.target must look like 'pkg.module:function', got {target!r}")
        self.target, self.kwargs, self.key = target, dict(kwargs or {}), key
        self._fn = self._resolve()  # fail early on a wrong name

    def _resolve(self):
        module_name, attr = self.target.split(":", 1)
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as err:
            raise ImportError(f"{self.key}.target={self.target!r} cannot be imported: {err}") from err
        if isinstance(obj, type):
            return obj(**self.kwargs)
        return functools.partial(obj, **self.kwargs) if self.kwargs else obj

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fn": None}

    def __call__(self, image: np.ndarray):
        if self._fn is None:
            self._fn = self._resolve()
        return self._fn(image)


def build_annotator(modality: str, spec: Any) -> Annotator | None:
    """Annotator from a config entry `data.annotators.<modality>`; None when the modality has none.

    spec: None (canny for edges, nothing otherwise); a callable; or a mapping with `type`:
    `{type: canny, low: 100, high: 200}`, `{type: torchscript, path: model.pt, device: cpu}` or
    `{type: callable, target: "pkg.module:function", kwargs: {...}}`.
    """
    key = f"data.annotators.{modality}"
    if modality not in MODALITIES:
        raise ValueError(f"data.annotators has unknown modality {modality!r}; allowed: {list(MODALITIES)}")
    if spec is None:
        return CannyAnnotator() if modality == "edges" else None
    if not isinstance(spec, Mapping):
        if callable(spec):
            return spec
        raise TypeError(f"{key} must be a mapping with a 'type' key or a callable, got {type(spec).__name__}")
    spec = dict(spec)
    kind = spec.pop("type", None)
    builders = {
        "canny": lambda: CannyAnnotator(**spec),
        "torchscript": lambda: TorchScriptAnnotator(**spec, key=key),
        "callable": lambda: CallableAnnotator(**spec, key=key),
    }
    if kind not in builders:
        raise ValueError(f"{key}.type must be one of {sorted(builders)}, got {kind!r}")
    try:
        return builders[kind]()
    except TypeError as err:
        raise TypeError(f"{key}: bad arguments for type {kind!r}: {err}") from err


def annotate(annotator: Annotator, image: np.ndarray, modality: str) -> np.ndarray:
    """Run an annotator on a uint8 (H, W, 3) image; return a 2-D (H, W) map ready for `map_to_tensor`."""
    out = annotator(image)
    out = out.detach().cpu().float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    while out.ndim > 3 and out.shape[0] == 1:
        out = out[0]  # drop batch dims
    if out.ndim == 3:
        if modality == "segmentation" and out.shape[0] > 1:
            out = out.argmax(0)  # class scores (C, h, w) -> ids
        elif out.shape[0] == 1:
            out = out[0]
        elif out.shape[-1] == 1:
            out = out[..., 0]
        else:
            raise ValueError(f"{modality} annotator returned shape {out.shape}; expected (H, W) or (1, H, W)")
    if out.ndim != 2:
        raise ValueError(f"{modality} annotator returned shape {out.shape}; expected (H, W) or (1, H, W)")
    height, width = image.shape[:2]
    if out.shape != (height, width):
        out = _resize(out, height, width, modality)
    if modality == "depth":
        out = out.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if modality == "segmentation":
        return np.rint(out).astype(np.int64)
    return out


def _resize(out: np.ndarray, height: int, width: int, modality: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None, None]  # (1, 1, h, w)
    if modality == "depth":
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=(height, width), mode="nearest")
    return x[0, 0].numpy()
