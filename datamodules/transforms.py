"""Joint image/control-map transforms: load, resize + crop, flip, convert to the batch tensors.

An image and its control maps go through the same crop box, so maps stay aligned with the pixels. The box is
expressed in normalized coordinates and scaled to each source, so a map stored at another size than its image
still lands on the same region. Segmentation and edges are resized with NEAREST, depth bilinearly.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

CROPS = ("center", "random", "none")
MODALITIES = ("edges", "depth", "segmentation")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")

Box = tuple[float, float, float, float]
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16/32-bit greyscale PIL modes


def check_controls(controls: Sequence[str]) -> tuple[str, ...]:
    """Validate `data.controls` (a list of modality names)."""
    if isinstance(controls, str):
        raise TypeError(f"data.controls must be a list of modalities, got the string {controls!r}")
    controls = tuple(str(m) for m in controls)
    check_modalities(controls, "data.controls")
    if len(set(controls)) != len(controls):
        raise ValueError(f"data.controls lists a modality twice: {list(controls)}")
    return controls


def check_modalities(names: Iterable[str], key: str) -> None:
    """Raise when config key `key` names something other than a modality."""
    unknown = sorted(set(names) - set(MODALITIES))
    if unknown:
        raise ValueError(f"{key} has unknown modalities {unknown}; allowed: {list(MODALITIES)}")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise OSError(f"cannot read image file {path}: {err}") from err


def load_map(path: str, modality: str) -> Image.Image:
    """Open a control-map file as a single-channel PIL image in the mode its modality is resized in.

    edges: greyscale "L", a pixel >= 128 is an edge (files holding only 0/1 are scaled to 0/255 first);
    depth: float "F" in [0, 1] (8-bit / 255, 16-bit / 65535); segmentation: int32 "I" ids (palette indices
    of a "P" PNG or grey levels).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{modality} map file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return _map_mode(img, modality, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise OSError(f"cannot read {modality} map file {path}: {err}") from err


def _map_mode(img: Image.Image, modality: str, path: str) -> Image.Image:
    if modality == "edges":
        wide = img.mode in _WIDE_MODES or img.mode == "F"
        arr = np.asarray(img if wide else img.convert("L"), dtype=np.float32)
        full = 1.0 if img.mode == "F" else 65535.0 if img.mode in _WIDE_MODES else 255.0
        # 0/1 files are read as is; otherwise an edge is a pixel at half the full scale or more.
        edge = arr > 0 if arr.max(initial=0) <= 1 else arr >= full / 2
        return Image.fromarray(edge.astype(np.uint8) * 255, mode="L")
    if modality == "depth":
        if img.mode in _WIDE_MODES:
            arr = np.asarray(img, dtype=np.float32) / 65535.0
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float32)
        else:
            arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
        return Image.fromarray(np.clip(arr, 0.0, 1.0).astype(np.float32), mode="F")
    if modality == "segmentation":
        if img.mode not in ("P", "L", "1", *_WIDE_MODES):
            raise ValueError(
                f"segmentation map {path} has mode {img.mode}; expected class ids as a palette (P) or "
                "greyscale (L / 16-bit) PNG"
            )
        arr = np.asarray(img).astype(np.int32)
        return Image.fromarray(arr, mode="I")
    raise ValueError(f"unknown control modality {modality!r}; expected one of {MODALITIES}")


def crop_box(width: int, height: int, crop: str, random: bool) -> Box:
    """Normalized source box that becomes the square output (resize shorter side, then crop).

    `crop="none"` keeps the whole image (squashed to a square); `"random"` draws the offset from torch's
    global generator when `random` is true (train split) and falls back to center otherwise.
    """
    if crop not in CROPS:
        raise ValueError(f"data.crop must be one of {CROPS}, got {crop!r}")
    if crop == "none" or width == height:
        return (0.0, 0.0, 1.0, 1.0)
    side = min(width, height)
    if crop == "random" and random:
        x0 = int(torch.randint(0, width - side + 1, ()).item())
        y0 = int(torch.randint(0, height - side + 1, ()).item())
    else:
        x0, y0 = (width - side) // 2, (height - side) // 2
    return (x0 / width, y0 / height, (x0 + side) / width, (y0 + side) / height)


def _scaled(box: Box, size: tuple[int, int]) -> Box:
    w, h = size
    return (box[0] * w, box[1] * h, box[2] * w, box[3] * h)


def resize_image(img: Image.Image, box: Box, resolution: int) -> np.ndarray:
    """The box of an RGB image resized to (resolution, resolution): uint8 (H, W, 3)."""
    out = img.resize((resolution, resolution), Image.BICUBIC, box=_scaled(box, img.size))
    return np.array(out, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on read-only arrays)


def resize_map(img: Image.Image, box: Box, resolution: int, modality: str) -> np.ndarray:
    """The box of a map from `load_map` resized to (resolution, resolution) as a 2-D numpy array."""
    resample = Image.BILINEAR if modality == "depth" else Image.NEAREST
    out = img.resize((resolution, resolution), resample, box=_scaled(box, img.size))
    return np.array(out)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def map_to_tensor(arr: np.ndarray, modality: str) -> torch.Tensor:
    """A 2-D map (file from `resize_map` or annotator output) -> its batch tensor (1, H, W).

    edges -> float {0,1}; depth -> float [0,1]; segmentation -> int64 ids.
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"{modality} map must be 2-D (H, W), got shape {arr.shape}")
    if modality == "edges":
        threshold = 127 if arr.dtype == np.uint8 and arr.max(initial=0) > 1 else 0.5
        return torch.from_numpy(arr > threshold).float()[None]
    if modality == "depth":
        return torch.from_numpy(np.clip(arr.astype(np.float32), 0.0, 1.0))[None]
    if modality == "segmentation":
        return torch.from_numpy(arr.astype(np.int64))[None]
    raise ValueError(f"unknown control modality {modality!r}; expected one of {MODALITIES}")


def hflip(sample: Mapping) -> dict:
    """Mirror the image and every control map of a sample (same decision for all of them)."""
    out = dict(sample)
    out["image"] = sample["image"].flip(-1)
    out["control"] = {m: t.flip(-1) for m, t in sample["control"].items()}
    return out


def flip_decision(probability: float) -> bool:
    """Whether to flip this sample: torch's global generator (seeded per DataLoader worker)."""
    return probability > 0 and bool(torch.rand(()).item() < probability)


def collate(samples: list[Mapping]) -> dict:
    """Stack per-sample dicts into the dict batch of base.py (image, label, caption, control)."""
    control_keys = list(samples[0]["control"])
    for s in samples:
        if list(s["control"]) != control_keys:
            raise ValueError(
                f"samples disagree on control modalities: {control_keys} vs {list(s['control'])}"
            )
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
        "caption": [str(s["caption"]) for s in samples],
        "control": {m: torch.stack([s["control"][m] for s in samples]) for m in control_keys},
    }
