"""Annotators: compute a control map from an image when no map file exists.

An annotator is any callable `annotator(image) -> map` taking the uint8 (H, W, 3) RGB image after resize and
crop (so the map aligns with the pixels; flips are applied to both afterwards). Configs name it as a Hydra
`_target_` node, which the CLI instantiates into the object the datamodule receives:
`{_target_: datamodules.CannyAnnotator, low: 100, high: 200}` (the default for edges),
`{_target_: datamodules.SketchAnnotator}` (the default for sketch),
`{_target_: datamodules.TorchScriptAnnotator, path: dpt.pt, device: cpu}`,
`{_target_: datamodules.annotators.TransformersDepthAnnotator, path: dpt-large}` (a local Hugging Face
folder), or any function with `{_target_: pkg.module.function, _partial_: true, ...keyword arguments}`.
Depth and segmentation have no default.
Outputs are normalized by `annotate`: edges -> {0,1}, depth -> [0,1] (min-max per image, larger = nearer,
as MiDaS/DPT-style inverse depth), segmentation -> int64 ids (argmax when the model returns class scores),
sketch -> [0,1] with strokes 1 (uint8 / 255; an HED or PiDiNet TorchScript model fits as it is).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.transforms import SOFT, check_modalities


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


class SketchAnnotator:
    """A sketch-like line drawing of the image: float32 (H, W) in [0, 1], strokes 1 on a 0 background.

    The difference of Gaussians of the luminance (in [0, 1]) at ``sigma`` and ``k * sigma`` is positive on
    the dark side of every edge and 0 on flat regions; XDoG's soft threshold (Winnemoeller et al. 2012)
    ``tanh(phi * (dog - epsilon))``, clipped at 0, turns it into strokes whose darkness follows the contrast.
    """

    def __init__(self, sigma: float = 1.0, k: float = 1.6, epsilon: float = 0.01, phi: float = 100.0):
        if not (sigma > 0 and k > 1 and phi > 0 and epsilon >= 0):
            raise ValueError(
                f"sketch annotator needs sigma > 0, k > 1, phi > 0, epsilon >= 0; got sigma={sigma}, k={k}, "
                f"phi={phi}, epsilon={epsilon}"
            )
        self.sigma, self.k, self.epsilon, self.phi = float(sigma), float(k), float(epsilon), float(phi)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
        fine = cv2.GaussianBlur(grey, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT)
        coarse = cv2.GaussianBlur(grey, (0, 0), self.k * self.sigma, borderType=cv2.BORDER_REFLECT)
        return np.clip(np.tanh(self.phi * (coarse - fine - self.epsilon)), 0.0, 1.0).astype(np.float32)


class TorchScriptAnnotator:
    """A TorchScript model file: input float (1, 3, H, W) in [0, 1]; output (1, C, h, w), (1, h, w) or (h, w).

    The model is loaded on first use (in each DataLoader worker), so the annotator stays picklable.
    """

    def __init__(self, path: str, device: str = "cpu", key: str = "data.annotators.<modality>"):
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


class TransformersDepthAnnotator:
    """A Hugging Face transformers depth model (DPT, e.g. Intel/dpt-large) in a local folder written by
    ``save_pretrained``: its image processor (resize, normalisation), then ``predicted_depth`` (1, h, w),
    relative inverse depth, which ``annotate`` resizes to the image and min-max normalises.

    Nothing is downloaded (``local_files_only``). The model is loaded on first use (in each DataLoader
    worker), so the annotator stays picklable.
    """

    def __init__(self, path: str, device: str = "cpu"):
        key = "data.annotators.depth.path or model.metric_annotators.depth.path"
        try:
            import transformers  # noqa: F401
        except ImportError as error:
            raise ImportError(
                f"datamodules.TransformersDepthAnnotator ({key}: {path}) needs the transformers package: "
                "pip install transformers (or export the model for datamodules.TorchScriptAnnotator)"
            ) from error
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{key}: no model folder {path} (nothing is downloaded)")
        needed = ("config.json", "preprocessor_config.json")
        missing = [name for name in needed if not os.path.isfile(os.path.join(path, name))]
        if missing:
            raise FileNotFoundError(
                f"{key}: {path} lacks {', '.join(missing)}; save the model and its image processor there "
                "with save_pretrained"
            )
        self.path, self.device = path, device
        self._model = self._processor = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None, "_processor": None}

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self._model is None:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            self._processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
            model = AutoModelForDepthEstimation.from_pretrained(self.path, local_files_only=True)
            self._model = model.to(self.device).eval()
        pixels = self._processor(images=np.ascontiguousarray(image), return_tensors="pt")["pixel_values"]
        return self._model(pixel_values=pixels.to(self.device)).predicted_depth.float().cpu()


def check_annotators(annotators: Mapping[str, Any] | None) -> dict[str, Annotator]:
    """Validate `data.annotators`: modality -> annotator (built by Hydra from a `_target_` node) or null."""
    if annotators is None:
        return {}
    if not isinstance(annotators, Mapping):
        raise TypeError(f"data.annotators must map modality -> annotator, got {annotators!r}")
    check_modalities(annotators, "data.annotators")
    checked = {}
    for modality, annotator in annotators.items():
        if annotator is None:
            continue
        if not callable(annotator):
            raise TypeError(
                f"data.annotators.{modality} must be an annotator: a `_target_` node such as "
                f"{_EXAMPLE[modality]}, or a Python callable image -> map; got {annotator!r}"
            )
        checked[str(modality)] = annotator
    return checked


_EXAMPLE = {
    "edges": "{_target_: datamodules.CannyAnnotator, low: 100, high: 200}",
    "depth": "{_target_: datamodules.TorchScriptAnnotator, path: dpt.pt, device: cpu}",
    "segmentation": "{_target_: pkg.module.function, _partial_: true}",
    "sketch": "{_target_: datamodules.SketchAnnotator, sigma: 1.0}",
}


def default_annotators() -> dict[str, Annotator]:
    """The annotators used when `data.annotators` names none: Canny for edges, XDoG for sketch (depth and
    segmentation need a user's model)."""
    return {"edges": CannyAnnotator(), "sketch": SketchAnnotator()}


def annotate(annotator: Annotator, image: np.ndarray, modality: str) -> np.ndarray:
    """Run an annotator on a uint8 (H, W, 3) image; return a 2-D (H, W) map ready for `map_to_tensor`."""
    out = annotator(image)
    out = out.detach().cpu().float().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
    while out.ndim > 3 and out.shape[0] == 1:
        out = out[0]  # drop batch dims
    height, width = image.shape[:2]
    if out.ndim == 3:
        if modality == "segmentation" and out.shape[0] > 1 and out.shape[-1] > 1:
            out = _segment_ids(out, height, width)  # class scores -> ids
        elif out.shape[0] == 1:
            out = out[0]
        elif out.shape[-1] == 1:
            out = out[..., 0]
        else:
            raise ValueError(f"{modality} annotator returned shape {out.shape}; expected (H, W) or (1, H, W)")
    if out.ndim != 2:
        raise ValueError(f"{modality} annotator returned shape {out.shape}; expected (H, W) or (1, H, W)")
    if out.shape != (height, width):
        out = _resize(out, height, width, modality)
    if modality == "depth":
        out = out.astype(np.float32)
        lo, hi = float(out.min()), float(out.max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    if modality == "segmentation":
        return np.rint(out).astype(np.int64)
    if modality == "sketch":
        scale = 255.0 if out.dtype == np.uint8 else 1.0
        return np.clip(out.astype(np.float32) / scale, 0.0, 1.0)
    return out


def _segment_ids(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Class scores (C, h, w) or (h, w, C), at the image's size or a scaled one, -> ids (h, w). The map's
    axes are the two whose ratio is the image's (within a pixel); (C, h, w) when both could be."""

    def image_like(h: int, w: int) -> bool:
        return abs(h * width - w * height) <= max(height, width)

    if image_like(*scores.shape[1:]):
        return scores.argmax(0)
    if image_like(*scores.shape[:2]):
        return scores.argmax(-1)
    raise ValueError(
        f"segmentation annotator returned scores of shape {scores.shape}, no two axes of which have the "
        f"image's aspect ({height} x {width}): expected (C, H, W) or (H, W, C), at the image size or scaled"
    )


def _resize(out: np.ndarray, height: int, width: int, modality: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))[None, None]  # (1, 1, h, w)
    if modality in SOFT:
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    else:
        x = F.interpolate(x, size=(height, width), mode="nearest")
    return x[0, 0].numpy()
