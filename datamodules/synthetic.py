"""Built-in synthetic data: coloured shapes on varied backgrounds, no files needed.

Sample `index` of a split is drawn from `np.random.default_rng([seed, offset + index])`, so it is the same
scene in every process and at every resolution (32..256). The label is the class of the main shape (largest,
front-most, 55-85 % of the image side), the caption is written from the geometry, and the control maps
(edges, depth, segmentation, sketch) are exact: computed from the shapes, not from the pixels (see
scenes.py).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from datamodules.base import BATCH_KEYS, VarDataModule
from datamodules.scenes import (
    BACKGROUNDS,
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    DISTRACTOR_RADIUS,
    MAIN_RADIUS,
    MIN_VISIBLE,
    Scene,
    Shape,
    depth_from_layers,
    edges_from_layers,
    layer_map,
    render_image,
    segmentation_from_layers,
    shape_mask,
    sketch_from_layers,
)
from datamodules.transforms import (
    MODALITIES,
    as_tv_tensor,
    batch_map,
    check_controls,
    image_to_tensor,
    map_to_tensor,
    no_pixels,
    random_flip,
)

__all__ = [
    "CLASS_NAMES",
    "SyntheticDataModule",
    "SyntheticShapes",
    "caption_of",
    "check_palette",
    "sample_scene",
]

MIN_RESOLUTION, MAX_RESOLUTION = 32, 256
VAL_OFFSET = 10**9  # val scenes use indices VAL_OFFSET + i, never reached by a train split
MAX_ROTATION = math.pi / 6  # shapes stay near upright so that triangles, hearts and stars read clearly
_BG_PHRASE = {
    "solid": "on a plain {0} background",
    "gradient": "on {2} {0} to {1} gradient background",
    "stripes": "on {2} {0} and {1} striped background",
    "checker": "on {2} {0} and {1} checkered background",
}


def _jitter(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    noise = rng.integers(-12, 13, size=3).tolist()  # plain Python: np.clip costs more on 3 numbers
    return tuple(min(max(c + e, 0), 255) for c, e in zip(COLOURS[name], noise))


def _visible_fraction(shape: Shape, front: Sequence[Shape], grid: int = 12) -> float:
    """Share of the shape not covered by the shapes in front of it, on a grid x grid probe of its box."""
    offsets = ((np.arange(grid) + 0.5) / grid * 2.0 - 1.0) * shape.radius
    x, y = shape.cx + offsets[None, :], shape.cy + offsets[:, None]
    own = shape_mask(shape, x, y)
    hidden = np.zeros_like(own)
    for other in front:
        hidden |= shape_mask(other, x, y)
    return float((own & ~hidden).sum()) / max(int(own.sum()), 1)


def _random_shape(rng: np.random.Generator, colour: str, radius: float, margin: float) -> Shape:
    """A shape of random class, jittered colour, position (centre at least `margin` inside) and rotation."""
    return Shape(
        cls=int(rng.integers(len(CLASS_NAMES))),
        colour=colour,
        rgb=_jitter(rng, colour),
        cx=float(rng.uniform(margin, 1.0 - margin)),
        cy=float(rng.uniform(margin, 1.0 - margin)),
        radius=radius,
        angle=float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)),
    )


def sample_scene(
    rng: np.random.Generator,
    max_distractors: int = 2,
    backgrounds: Sequence[str] = BACKGROUNDS,
    shape_colours: Sequence[str] | None = None,
    background_colours: Sequence[str] | None = None,
) -> Scene:
    """Draw a background (one of `backgrounds`), a main shape and 0..max_distractors smaller shapes behind it.

    Colours come from the whole palette (no shape shares a colour with its background), or, when
    `shape_colours` and `background_colours` are given (disjoint, see check_palette), from those lists.
    With the defaults the draws are those of earlier versions (same scenes per seed).
    """
    kind = backgrounds[int(rng.integers(len(backgrounds)))]
    if shape_colours is None and background_colours is None:
        order = rng.permutation(len(COLOUR_NAMES))
        main_colour, bg0, bg1 = (COLOUR_NAMES[i] for i in order[:3])
        shape_colours = [c for c in COLOUR_NAMES if c not in (main_colour, bg0, bg1)]
    else:
        shape_colours = list(shape_colours or COLOUR_NAMES)
        background_colours = list(background_colours or COLOUR_NAMES)
        main_colour = shape_colours[int(rng.integers(len(shape_colours)))]
        pair = rng.permutation(len(background_colours))[:2]
        bg0 = background_colours[pair[0]]
        bg1 = background_colours[pair[-1]]  # == bg0 with one background colour (then only solid is allowed)
        shape_colours = [c for c in shape_colours if c != main_colour] or [main_colour]

    radius = float(rng.uniform(*MAIN_RADIUS))
    margin = 0.7 * radius  # up to 30 % of the half-extent may leave the frame
    main = _random_shape(rng, main_colour, radius, margin)
    front_to_back = [main]
    for _ in range(int(rng.integers(max_distractors + 1))):
        for _attempt in range(8):
            r = float(rng.uniform(*DISTRACTOR_RADIUS))
            colour = shape_colours[int(rng.integers(len(shape_colours)))]
            candidate = _random_shape(rng, colour, r, r)
            if _visible_fraction(candidate, front_to_back) >= MIN_VISIBLE:
                front_to_back.append(candidate)  # each new distractor goes behind the previous ones
                break
    return Scene(
        background=kind,
        bg_colours=(bg0, bg1),
        bg_rgb=(_jitter(rng, bg0), _jitter(rng, bg1)),
        bg_angle=float(rng.uniform(0.0, 2 * math.pi)),
        bg_period=float(rng.uniform(0.3, 0.6)),  # wide stripes / cells keep the background smooth
        bg_phase=(float(rng.uniform(0.0, 2 * math.pi)), float(rng.uniform(0.0, 2 * math.pi))),
        shapes=tuple(reversed(front_to_back)),
    )


def _size_word(radius: float) -> str:
    diameter = 2.0 * radius
    if diameter < 0.2:
        return "tiny"
    if diameter < 0.4:
        return "small"
    return "medium" if diameter < 0.7 else "large"


def _position_phrase(cx: float, cy: float) -> str:
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    vertical = "top" if cy < 0.4 else "bottom" if cy > 0.6 else ""
    if horizontal and vertical:
        return f"at the {vertical} {horizontal}"
    if vertical:
        return f"at the {vertical}"
    if horizontal:
        return f"on the {horizontal}"
    return "in the center"


def caption_of(scene: Scene) -> str:
    """E.g. "a large red star at the top left and a tiny blue circle on a plain green background"."""
    parts = [
        f"a {_size_word(s.radius)} {s.colour} {CLASS_NAMES[s.cls]} {_position_phrase(s.cx, s.cy)}"
        for s in reversed(scene.shapes)  # main shape first
    ]
    shapes = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    first = scene.bg_colours[0]
    article = "an" if first[0] in "aeiou" else "a"
    return f"{shapes} {_BG_PHRASE[scene.background].format(*scene.bg_colours, article)}"


def check_backgrounds(backgrounds: Sequence[str]) -> tuple[str, ...]:
    """Validate `data.backgrounds`: a non-empty list of known kinds, order kept (it fixes the draws)."""
    if isinstance(backgrounds, str):
        backgrounds = [backgrounds]
    kinds = tuple(str(b) for b in backgrounds)
    unknown = [b for b in kinds if b not in BACKGROUNDS]
    if not kinds or unknown or len(set(kinds)) != len(kinds):
        raise ValueError(
            f"data.backgrounds must be a non-empty list of distinct kinds from {list(BACKGROUNDS)}, "
            f"got {list(kinds)}"
        )
    return kinds


def check_palette(
    shape_colours: Sequence[str] | None,
    background_colours: Sequence[str] | None,
    backgrounds: Sequence[str],
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """Validate `data.shape_colours` / `data.background_colours` (null = the whole palette).

    When either is set, both draw from their own list: the lists must name palette colours and be disjoint
    (a shape never has its background's colour, so its outline stays visible), and a background kind with two
    colours (gradient, stripes, checker) needs at least two background colours.
    """
    if shape_colours is None and background_colours is None:
        return None, None
    lists = {}
    for key, value in (("shape_colours", shape_colours), ("background_colours", background_colours)):
        if value is None:
            lists[key] = None
            continue
        names = (value,) if isinstance(value, str) else tuple(str(c) for c in value)
        unknown = [c for c in names if c not in COLOURS]
        if not names or unknown or len(set(names)) != len(names):
            raise ValueError(
                f"data.{key} must be null or a non-empty list of distinct colours from {list(COLOUR_NAMES)}, "
                f"got {list(names)}"
            )
        lists[key] = names
    shapes = lists["shape_colours"] or tuple(c for c in COLOUR_NAMES if c not in lists["background_colours"])
    grounds = lists["background_colours"] or tuple(c for c in COLOUR_NAMES if c not in shapes)
    shared = sorted(set(shapes) & set(grounds))
    if shared:
        raise ValueError(
            f"data.shape_colours and data.background_colours must not share colours (a shape would vanish "
            f"into its background), both have {shared}"
        )
    if not shapes or not grounds:
        raise ValueError("data.shape_colours / data.background_colours leave no colour for the other list")
    two_colour = [b for b in backgrounds if b != "solid"]
    if two_colour and len(grounds) < 2:
        raise ValueError(
            f"data.backgrounds {two_colour} use two colours, but data.background_colours has only "
            f"{list(grounds)}; add a colour or use backgrounds [solid]"
        )
    return shapes, grounds


class SyntheticShapes(Dataset):
    """Map-style dataset of `num` procedural scenes; sample i is scene (seed, offset + i). ``without_pixels``
    gives a copy that does not draw the image (``no_pixels``; a token cache's training items), all else the
    same."""

    pixels = True

    def __init__(
        self,
        num: int,
        resolution: int,
        seed: int = 0,
        offset: int = 0,
        max_distractors: int = 2,
        controls: Sequence[str] = MODALITIES,
        keys: Sequence[str] = BATCH_KEYS,
        flip: float = 0.0,
        backgrounds: Sequence[str] = BACKGROUNDS,
        shape_colours: Sequence[str] | None = None,
        background_colours: Sequence[str] | None = None,
    ):
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"data.resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] for synthetic data, "
                f"got {resolution}"
            )
        if seed < 0 or offset < 0:
            raise ValueError(f"data.seed must be >= 0, got seed={seed} (offset={offset})")
        self.num, self.resolution, self.seed, self.offset = int(num), int(resolution), int(seed), int(offset)
        self.max_distractors = int(max_distractors)
        self.backgrounds = check_backgrounds(backgrounds)
        self.shape_colours, self.background_colours = check_palette(
            shape_colours, background_colours, self.backgrounds
        )
        self.controls = check_controls(controls) if "control" in keys else ()
        self.with_caption = "caption" in keys
        self.flip = float(flip)

    def __len__(self) -> int:
        return self.num

    def without_pixels(self, unusable: Iterable[int] = ()) -> SyntheticShapes:
        """A copy that draws no image (this one is unchanged); every scene is usable (``unusable`` is
        empty)."""
        lean = copy.copy(self)
        lean.pixels = False
        return lean

    def scene(self, index: int) -> Scene:
        rng = np.random.default_rng([self.seed, self.offset + int(index)])
        return sample_scene(
            rng, self.max_distractors, self.backgrounds, self.shape_colours, self.background_colours
        )

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} synthetic samples")
        scene = self.scene(index)
        control = {}
        if self.controls:
            layers = layer_map(scene, self.resolution)
            maps = {
                "edges": lambda: edges_from_layers(layers),
                "depth": lambda: depth_from_layers(layers, len(scene.shapes)),
                "segmentation": lambda: segmentation_from_layers(layers, scene),
                "sketch": lambda: sketch_from_layers(layers),
            }
            control = {m: map_to_tensor(maps[m](), m) for m in self.controls}
        image = image_to_tensor(render_image(scene, self.resolution)) if self.pixels else no_pixels()
        # The flip of the file datasets; with flip 0 (the default) the tensors above are returned untouched.
        flipped, (image, control) = random_flip(
            self.flip, tv_tensors.Image(image), {m: as_tv_tensor(t, m) for m, t in control.items()}
        )
        return {
            "image": image.as_subclass(torch.Tensor),
            "label": scene.main.cls,
            # A mirrored scene swaps left and right in the caption.
            "caption": caption_of(scene.mirrored() if flipped else scene) if self.with_caption else "",
            "control": {m: batch_map(t, m) for m, t in control.items()},
            "flipped": bool(flipped),  # which cached tokens belong to the image (datamodules.token_cache)
        }


class SyntheticDataModule(VarDataModule):
    """Synthetic shapes for every stage (class labels, captions, exact control maps); works with no files.

    Args:
        num_train: number of train scenes (indices 0..num_train-1).
        num_val: number of val scenes (indices VAL_OFFSET + i, disjoint from train); also test and predict.
        controls: control maps produced when the model asks for "control" (edges, depth, segmentation,
            sketch).
        max_distractors: at most this many small shapes behind the main one (0..max_distractors, uniform).
        backgrounds: background kinds to draw from (solid, gradient, stripes, checker); e.g. [solid] with
            max_distractors 0 gives the simplest images (one shape on a plain colour).
        shape_colours, background_colours: restrict the palette (disjoint lists of colour names; null = all
            colours, a shape never sharing its background's colour). Few colours leave the tokenizer and the
            VAR more capacity for the shapes.
        batch_size, num_workers, resolution, flip, seed: see VarDataModule (resolution in [32, 256]).
    """

    def __init__(
        self,
        num_train: int = 20000,
        num_val: int = 256,
        controls: Sequence[str] = MODALITIES,
        max_distractors: int = 2,
        backgrounds: Sequence[str] = BACKGROUNDS,
        shape_colours: Sequence[str] | None = None,
        background_colours: Sequence[str] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        resolution: int | None = None,
        flip: float = 0.0,
        seed: int = 0,
    ):
        super().__init__(
            batch_size, num_workers, resolution, crop="none", flip=flip, val_fraction=0.0, seed=seed
        )
        self.save_settings()
        if not 1 <= int(num_train) <= VAL_OFFSET:
            raise ValueError(f"data.num_train must be in [1, {VAL_OFFSET}], got {num_train}")
        if int(num_val) < 1:
            raise ValueError(f"data.num_val must be >= 1, got {num_val}")
        if int(max_distractors) < 0:
            raise ValueError(f"data.max_distractors must be >= 0, got {max_distractors}")
        if int(seed) < 0:
            raise ValueError(f"data.seed must be >= 0 for synthetic data, got {seed}")
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.controls = check_controls(controls)
        self.max_distractors = int(max_distractors)
        self.backgrounds = check_backgrounds(backgrounds)
        self.shape_colours, self.background_colours = check_palette(
            shape_colours, background_colours, self.backgrounds
        )

    def check_resolution(self, resolution: int) -> None:
        if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
            raise ValueError(
                f"data.resolution must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}] for synthetic data, "
                f"got {resolution}"
            )

    def check_segments(self, num_segments: int) -> None:
        needed = len(CLASS_NAMES) + 1  # 0 background, 1 + class id of a shape
        if "segmentation" in self.controls and num_segments < needed:
            raise ValueError(
                f"the built-in scenes' segmentation ids run to {needed - 1} (0 background, 1..{needed - 1}: "
                f"the shapes), the model takes {num_segments}: set model.control.num_segments={needed}"
            )

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)

    def build_datasets(self) -> dict[str, Dataset]:
        common = dict(
            resolution=self.resolution,
            seed=self.seed,
            max_distractors=self.max_distractors,
            backgrounds=self.backgrounds,
            shape_colours=self.shape_colours,
            background_colours=self.background_colours,
            controls=self.controls,
            keys=self.keys,
        )
        return {
            "train": SyntheticShapes(self.num_train, offset=0, flip=self.flip, **common),
            "val": SyntheticShapes(self.num_val, offset=VAL_OFFSET, flip=0.0, **common),
        }
