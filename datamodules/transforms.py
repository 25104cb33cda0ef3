"""Joint image/control-map transforms (torchvision transforms.v2): load, resize + crop, flip, batch tensors.

A sample is a `tv_tensors.Image` (uint8 RGB) with its control maps as tv_tensors, so one v2 call moves them
together: edges and segmentation are `tv_tensors.Mask`, resampled nearest-neighbour, so ids and {0,1} edges
stay exact; depth is a float `tv_tensors.Image`, resampled bicubic like the image and clamped to [0, 1]
afterwards (bicubic overshoots at steps). A random crop draws one offset for all of them, a flip mirrors all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms import v2

from varctl.models.control import MODALITIES  # one list of modality names for the data and the model

CROPS = ("center", "random", "none")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
BICUBIC, NEAREST_EXACT = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.NEAREST_EXACT

SOFT = ("depth", "sketch")  # continuous maps in [0, 1]: resampled as images, clamped after
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")  # 16/32-bit greyscale PIL modes
UNREADABLE = (OSError, SyntaxError, EOFError, Image.DecompressionBombError)  # what PIL raises for bad files
_GREY_SPREAD = 8 / 255  # mean channel spread above which a depth file is colour (JPEG noise stays below)


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


def load_image(path: str) -> tv_tensors.Image:
    """Open an image as uint8 RGB (3, H, W), upright (``upright``); a missing or unreadable file raises an
    error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return v2.functional.to_image(read_rgb(upright(img)))
    except (*UNREADABLE, ValueError) as err:
        raise OSError(f"cannot read image file {path}: {unreadable(err)}") from err


def upright(img: Image.Image) -> Image.Image:
    """An opened image as viewers show it: its EXIF orientation applied, so that a photo stored sideways (a
    phone's) and the mask a user drew on it on screen line up."""
    ImageOps.exif_transpose(img, in_place=True)
    return img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of ``upright(img)`` from the header alone: orientations 5-8 turn it a quarter. A PNG's
    EXIF is read only where its header holds it (PIL's ``getexif`` would decode the whole image for it)."""
    if img.format == "PNG":
        exif = Image.Exif()
        if img.info.get("exif"):
            exif.load(img.info["exif"])
    else:
        exif = img.getexif()
    turned = exif.get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return (img.height, img.width) if turned else img.size


def unreadable(err: BaseException) -> str:
    """Why PIL could not read a file, in a few words (the path is the caller's to add)."""
    if isinstance(err, UnidentifiedImageError):  # no format recognised it: empty, text, another kind of file
        return "not an image file that PIL can identify"
    if isinstance(err, Image.DecompressionBombError):
        return f"too large: {err}"
    return f"truncated or corrupt ({err})"


def read_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (v / 257, rounded) and float
    greyscale read as [0, 1]: PIL's own convert("RGB") clips both, saturating them to white."""
    if img.mode in _WIDE_MODES or img.mode == "F":
        arr, full = _grey(img)
        grey = np.clip(np.rint(arr * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def load_map(path: str, modality: str) -> torch.Tensor:
    """Open a control-map file as the tv_tensor of its batch tensor (1, H, W), upright like images, see
    `as_tv_tensor` and `read_map`; a missing or unreadable file raises an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{modality} map file not found: {path}")
    try:
        with Image.open(path) as img:
            arr = read_map(upright(img), modality)
    except UNREADABLE as err:
        raise OSError(f"cannot read {modality} map file {path}: {unreadable(err)}") from err
    except ValueError as err:
        raise ValueError(f"{modality} map file {path}: {err}") from err
    return as_tv_tensor(map_to_tensor(arr, modality), modality)


def read_map(img: Image.Image, modality: str) -> np.ndarray:
    """An opened map file as a 2-D array; a file whose content does not fit the modality raises ValueError.

    edges: a pixel with any channel at half the full scale or more is an edge (files holding only 0/1 are
    read as is), so red, green, blue or white lines on black all count; sketch: [0, 1] with strokes 1,
    scaled as depth, from the brightest channel on a dark background or the darkest channel, inverted, on a
    light one (median above half the full scale: a pen drawing on paper). A partly transparent edge or
    sketch file is read from its alpha (the strokes opaque). depth: greyscale [0, 1] (8-bit / 255, 16-bit /
    65535, float as is); a colour-mapped depth file is refused. segmentation: int64 ids (palette indices of
    a "P" PNG or grey levels).
    """
    img.load()
    if modality == "segmentation":
        if img.mode not in ("P", "L", "1", *_WIDE_MODES):
            raise ValueError(
                f"mode {img.mode}: expected class ids as a palette (P) or greyscale (L / 16-bit) PNG"
            )
        return np.asarray(img).astype(np.int64)
    if modality not in MODALITIES:
        raise ValueError(f"unknown control modality {modality!r}; expected one of {MODALITIES}")
    arr, full = _channels(img, strokes=modality != "depth")  # (H, W, C)
    if modality == "depth":
        spread = arr.max(-1) - arr.min(-1)
        if spread.mean() > _GREY_SPREAD * full:
            raise ValueError(
                f"a colour image (channels differ by {spread.mean() / full * 255:.0f} of 255 levels on "
                "average): depth is read as grey levels, so save it as a greyscale (L or 16-bit) PNG"
            )
        return arr.mean(-1) / full
    if modality == "edges":
        # 0/1 files are read as is; otherwise an edge has a channel at half the full scale or more.
        top = arr.max(-1)
        edge = top > 0 if top.max(initial=0) <= 1 else top >= full / 2
        return edge.astype(np.float32)
    # sketch: strokes are 1; on light paper (median above half) the darkest channel marks them, inverted
    arr = np.clip(arr / full, 0.0, 1.0)
    if np.median(arr.mean(-1)) > 0.5:
        return 1.0 - arr.min(-1)
    return arr.max(-1)


def _grey(img: Image.Image) -> tuple[np.ndarray, float]:
    """The file's grey levels as float32 and their full scale: 16/32-bit as is (65535), float as is (1),
    anything else converted to 8-bit greyscale (255)."""
    if img.mode == "F":
        return np.asarray(img, dtype=np.float32), 1.0
    if img.mode in _WIDE_MODES:
        return np.asarray(img, dtype=np.float32), 65535.0
    return np.asarray(img.convert("L"), dtype=np.float32), 255.0


def _channels(img: Image.Image, strokes: bool) -> tuple[np.ndarray, float]:
    """The file's channels as float32 (H, W, C) and their full scale: greyscale as in `_grey` (C = 1),
    colour as RGB (C = 3); for `strokes` (edges, sketch) a partly transparent file gives its alpha (C = 1):
    drawing apps export strokes on a transparent background that way, whatever their colour."""
    if img.mode in ("F", "L", "1", *_WIDE_MODES):
        arr, full = _grey(img)
        return arr[..., None], full
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
    if strokes and rgba[..., 3].min() < 255:
        return rgba[..., 3:], 255.0
    return rgba[..., :3], 255.0


def as_tv_tensor(control: torch.Tensor, modality: str) -> torch.Tensor:
    """A batch tensor (1, H, W) as the tv_tensor that tells v2 how to resample it: depth and sketch an Image
    (bicubic), edges and segmentation a Mask (nearest)."""
    return tv_tensors.Image(control) if modality in SOFT else tv_tensors.Mask(control)


class Resize(v2.Resize):
    """v2.Resize, bicubic with antialiasing for images and centred nearest-neighbour for masks.

    v2's own rule for a Mask, torch's "nearest" (output pixel i reads source pixel floor(i * in / out)), puts
    a downsampled map half an output pixel up-left of the image on average; "nearest-exact" reads the source
    pixel under the output pixel's centre, floor((i + 0.5) * in / out), as PIL's NEAREST did before v2.
    """

    def __init__(self, size: int | Sequence[int]):
        super().__init__(size, interpolation=BICUBIC, antialias=True)

    def transform(self, inpt, params: dict):
        if isinstance(inpt, tv_tensors.Mask):
            return v2.functional.resize(inpt, self.size, interpolation=NEAREST_EXACT)
        return super().transform(inpt, params)


def resize_crop(resolution: int, crop: str, random: bool) -> v2.Transform:
    """The resize + crop of an image and its maps (passed in one call), giving (resolution, resolution).

    "center" / "random": resize the shorter side to `resolution`, then crop a square, at a random offset from
    torch's global generator (seeded per DataLoader worker) when `random` is true (train split), else in the
    center; "none": resize the whole image to a square.
    """
    if crop not in CROPS:
        raise ValueError(f"data.crop must be one of {CROPS}, got {crop!r}")
    if crop == "none":
        return Resize((resolution, resolution))
    square = v2.RandomCrop(resolution) if crop == "random" and random else v2.CenterCrop(resolution)
    return v2.Compose([Resize(resolution), square])


def fit_to(control: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """A map file stored at another size than its image, resized to the image's (H, W) first (nearest for
    masks, bicubic for depth), so that one crop box and one flip serve both."""
    size = list(image.shape[-2:])
    return control if list(control.shape[-2:]) == size else Resize(size)(control)


def random_flip(probability: float, *inputs):
    """`v2.RandomHorizontalFlip(p=probability)` of all `inputs` together: (flipped, inputs).

    The decision is one draw from torch's global generator, flipping when it is below `probability`, the same
    draw and rule as the hand-written flip this replaced. Nothing is drawn when `probability` is 0, so a run
    without flips keeps the random stream it had (the synthetic demo's numbers depend on it).
    """
    if probability <= 0:
        return False, inputs
    outputs = v2.RandomHorizontalFlip(p=probability)(inputs)
    # v2 hands back its very inputs when it does not flip, and new tensors when it does.
    return outputs[0] is not inputs[0], outputs


def no_pixels() -> torch.Tensor:
    """The image of a sample read without its pixels, (3, 0, 0): a token cache's training items when the
    stage needs no pixels (datamodules.token_cache). Any use of it as an image fails on its shape."""
    return torch.empty(3, 0, 0)


def image_to_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 RGB, numpy (H, W, 3) or tensor (3, H, W) -> float32 (3, H, W) in [-1, 1]."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return image.as_subclass(torch.Tensor).float().div_(127.5).sub_(1.0)


def map_to_tensor(arr: np.ndarray, modality: str) -> torch.Tensor:
    """A 2-D map (from a file, a scene or an annotator) -> its batch tensor (1, H, W).

    edges -> float {0,1}; depth -> float [0,1]; segmentation -> int64 ids; sketch -> float [0,1] (uint8 is
    divided by 255).
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
    if modality == "sketch":
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.clip(arr.astype(np.float32) / scale, 0.0, 1.0))[None]
    raise ValueError(f"unknown control modality {modality!r}; expected one of {MODALITIES}")


def batch_map(control: torch.Tensor, modality: str) -> torch.Tensor:
    """A transformed map back to a plain batch tensor; depth and sketch clamped to [0, 1] (bicubic
    overshoot)."""
    control = control.as_subclass(torch.Tensor)
    return control.clamp(0.0, 1.0) if modality in SOFT else control


def collate(samples: list[Mapping]) -> dict:
    """Stack per-sample dicts into the dict batch of base.py (image, label, caption, control)."""
    control_keys = list(samples[0]["control"])
    for s in samples:
        if list(s["control"]) != control_keys:
            raise ValueError(
                f"samples disagree on control modalities: {control_keys} vs {list(s['control'])}"
            )
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "label": torch.tensor([int(s["label"]) for s in samples], dtype=torch.int64),
        "caption": [str(s["caption"]) for s in samples],
        "control": {m: torch.stack([s["control"][m] for s in samples]) for m in control_keys},
    }
    if "tokens" in samples[0]:  # a token cache's indices (datamodules.token_cache)
        batch["tokens"] = torch.stack([s["tokens"] for s in samples])
    return batch
