"""Procedural scenes of coloured shapes: sampling, rasterization and exact control maps.

A scene lives in normalized image coordinates (x right, y down, both in [0, 1]), so the same (seed, index)
gives the same scene at every resolution. Shapes are painted back to front; the main shape is the largest
and the front-most. Inside-tests are evaluated at pixel centres for the maps (exact, from the geometry) and on
a 2x2 sub-pixel grid for the anti-aliased image, so the maps agree with the pixels they describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "star",
    "ring",
    "cross",
    "hexagon",
    "diamond",
    "heart",
    "ellipse",
)
# name -> RGB; shapes never share a colour with the background they sit on.
COLOURS = {
    "red": (215, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 215, 45),
    "green": (45, 165, 70),
    "cyan": (50, 205, 215),
    "blue": (40, 75, 215),
    "purple": (135, 60, 195),
    "pink": (240, 125, 190),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "brown": (125, 80, 40),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = ("solid", "gradient", "stripes", "checker")
MAIN_RADIUS = (0.275, 0.425)  # half-extent of the main shape: 55-85 % of the image side
DISTRACTOR_RADIUS = (0.07, 0.14)
MIN_VISIBLE = 0.5  # a distractor keeps at least this share of its area visible
SUBPIXELS = 2  # anti-aliasing: SUBPIXELS x SUBPIXELS samples per pixel for the image only

_STAR_INNER = 0.45
_STAR_HALF = math.pi / 5  # half the angle between two star tips
_STAR_EDGE = (_STAR_INNER * math.cos(_STAR_HALF) - 1.0, _STAR_INNER * math.sin(_STAR_HALF))
_EXTENT = 1.1  # every shape lies within this radius of its centre (in half-extents)
_HEX_NORMALS = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
_TRI_NORMALS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]


@dataclass(frozen=True)
class Shape:
    """One shape: class id, colour name and RGB, centre and half-extent (normalized), rotation (radians)."""

    cls: int
    colour: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    radius: float
    angle: float


@dataclass(frozen=True)
class Scene:
    """A background (kind, two colours, pattern parameters) and shapes ordered back to front."""

    background: str
    bg_colours: tuple[str, str]
    bg_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]
    bg_angle: float
    bg_period: float
    bg_phase: tuple[float, float]
    shapes: tuple[Shape, ...] = field(default_factory=tuple)

    @property
    def main(self) -> Shape:
        return self.shapes[-1]

    def mirrored(self) -> Scene:
        """The scene flipped left-right (used for captions of flipped samples)."""
        shapes = tuple(
            Shape(s.cls, s.colour, s.rgb, 1.0 - s.cx, s.cy, s.radius, -s.angle) for s in self.shapes
        )
        return Scene(
            self.background, self.bg_colours, self.bg_rgb, math.pi - self.bg_angle, self.bg_period,
            self.bg_phase, shapes,
        )  # fmt: skip


def inside(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape `cls` in its local frame (unit half-extent, v points down)."""
    name = CLASS_NAMES[cls]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "ellipse":
        return u * u + (v / 0.55) ** 2 <= 1.0
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if name == "diamond":
        return np.abs(u) / 0.62 + np.abs(v) <= 1.0
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3) & (av <= 0.95)) | ((av <= 0.3) & (au <= 0.95))
    if name == "hexagon":
        return _polygon(u, v, _HEX_NORMALS, math.cos(math.pi / 6))
    if name == "triangle":
        # Equilateral, tip up, circumradius 1; nudged down so it sits centred in its bounding circle.
        return _polygon(u, v - 0.12, _TRI_NORMALS, 0.5)
    if name == "star":
        return _star(u, v)
    if name == "heart":
        x, y = 1.25 * u, 0.12 - 1.25 * v  # y up; the classic quartic heart spans y in [-1, 1.24]
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape class {cls}")


def _polygon(u: np.ndarray, v: np.ndarray, normals, offset: float) -> np.ndarray:
    mask = np.ones(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for nx, ny in normals:
        mask &= u * nx + v * ny <= offset
    return mask


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star, one tip up: fold the angle onto the sector between a tip and an inner corner."""
    rho = np.sqrt(u * u + v * v)
    t = np.mod(np.arctan2(v, u) + math.pi / 2, 2 * _STAR_HALF)  # angle from the nearest tip going round
    t = np.minimum(t, 2 * _STAR_HALF - t)
    px, py = rho * np.cos(t) - 1.0, rho * np.sin(t)  # relative to the tip (1, 0)
    ex, ey = _STAR_EDGE
    return ex * py - ey * px >= 0.0  # on the centre's side of the tip -> inner-corner edge


def local_coords(shape: Shape, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalized image coordinates -> the shape's local frame (rotated, unit half-extent)."""
    c, s = math.cos(shape.angle), math.sin(shape.angle)
    dx, dy = (x - shape.cx) / shape.radius, (y - shape.cy) / shape.radius
    return dx * c + dy * s, dy * c - dx * s


def shape_mask(shape: Shape, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return inside(shape.cls, *local_coords(shape, x, y))


def _bbox(shape: Shape, n: int) -> tuple[int, int, int, int]:
    """Pixel rows/cols [y0, y1) x [x0, x1) of an n x n grid that can hold the shape (unit circle + margin)."""
    r = shape.radius * _EXTENT
    x0, x1 = max(int(math.floor((shape.cx - r) * n)), 0), min(int(math.ceil((shape.cx + r) * n)), n)
    y0, y1 = max(int(math.floor((shape.cy - r) * n)), 0), min(int(math.ceil((shape.cy + r) * n)), n)
    return y0, max(y1, y0), x0, max(x1, x0)


def _raster(shape: Shape, bbox: tuple[int, int, int, int], n: int) -> np.ndarray:
    """Inside-mask of the shape at the cell centres of an n x n grid, restricted to bbox (in cells of n)."""
    y0, y1, x0, x1 = bbox
    xs = (np.arange(x0, x1, dtype=np.float32) + 0.5) / n
    ys = (np.arange(y0, y1, dtype=np.float32) + 0.5) / n
    return shape_mask(shape, xs[None, :], ys[:, None])


def layer_map(scene: Scene, resolution: int, sub: int = 1) -> np.ndarray:
    """uint8 (n, n), n = resolution * sub: 0 background, k = k-th shape from the back (1-based)."""
    n = resolution * sub
    layers = np.zeros((n, n), dtype=np.uint8)
    for k, shape in enumerate(scene.shapes, start=1):
        y0, y1, x0, x1 = (b * sub for b in _bbox(shape, resolution))
        layers[y0:y1, x0:x1][_raster(shape, (y0, y1, x0, x1), n)] = k
    return layers


def background(scene: Scene, resolution: int) -> np.ndarray:
    """float32 (H, W, 3) background at pixel centres; patterns have soft (tanh) transitions."""
    xs = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution - 0.5
    c0, c1 = (np.asarray(c, dtype=np.float32) for c in scene.bg_rgb)
    if scene.background == "solid":
        return np.broadcast_to(c0, (resolution, resolution, 3)).copy()
    ca, sa = math.cos(scene.bg_angle), math.sin(scene.bg_angle)
    if scene.background == "checker":
        freq = math.pi / scene.bg_period  # cells of side bg_period
        px, py = np.sin(freq * xs + scene.bg_phase[0]), np.sin(freq * xs + scene.bg_phase[1])
        t = 0.5 + 0.5 * np.tanh(2.0 * py[:, None] * px[None, :])
    else:
        proj = xs[None, :] * ca + xs[:, None] * sa  # (H, W) position along the pattern direction
        if scene.background == "gradient":
            t = proj / (abs(ca) + abs(sa)) + 0.5
        elif scene.background == "stripes":
            t = 0.5 + 0.5 * np.tanh(2.0 * np.sin(2 * math.pi * proj / scene.bg_period + scene.bg_phase[0]))
        else:
            raise ValueError(f"unknown background kind {scene.background!r}; expected one of {BACKGROUNDS}")
    return c0 + t[..., None] * (c1 - c0)


def render_image(scene: Scene, resolution: int) -> np.ndarray:
    """uint8 (H, W, 3): background plus shapes, each pixel the average of SUBPIXELS^2 samples."""
    img = background(scene, resolution)
    sub = SUBPIXELS
    fine = layer_map(scene, resolution, sub)
    for k, shape in enumerate(scene.shapes, start=1):
        y0, y1, x0, x1 = _bbox(shape, resolution)
        h, w = y1 - y0, x1 - x0
        cover = (fine[y0 * sub : y1 * sub, x0 * sub : x1 * sub] == k).reshape(h, sub, w, sub).mean((1, 3))
        region = img[y0:y1, x0:x1]
        region += cover[..., None].astype(np.float32) * (np.asarray(shape.rgb, np.float32) - region)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def edges_from_layers(layers: np.ndarray) -> np.ndarray:
    """{0,1} float32: a pixel nearer than one of its 4 neighbours (each boundary once, on its near side)."""
    padded = np.pad(layers, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    edge = (
        (centre > padded[:-2, 1:-1])
        | (centre > padded[2:, 1:-1])
        | (centre > padded[1:-1, :-2])
        | (centre > padded[1:-1, 2:])
    )
    return edge.astype(np.float32)


def sketch_from_layers(layers: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: the outlines of `edges_from_layers` as soft strokes, the built-in sketch-like map.

    The {0,1} outline blurred by [1, 2, 1] / 4 along each axis, doubled and clipped: 1 on a straight
    outline, 0.5 beside it (and on an isolated outline pixel), 0 away from every outline.
    """
    edge = edges_from_layers(layers)
    padded = np.pad(edge, 1)
    rows = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    blurred = 0.25 * rows[:, :-2] + 0.5 * rows[:, 1:-1] + 0.25 * rows[:, 2:]
    return np.clip(2.0 * blurred, 0.0, 1.0).astype(np.float32)


def depth_from_layers(layers: np.ndarray, num_shapes: int) -> np.ndarray:
    """float32 in [0,1]: background 0, k-th shape from the back k / num_shapes (nearest = 1)."""
    return layers.astype(np.float32) / max(num_shapes, 1)


def segmentation_from_layers(layers: np.ndarray, scene: Scene) -> np.ndarray:
    """int64 ids: 0 background, 1 + class id of the visible shape."""
    lut = np.array([0] + [1 + s.cls for s in scene.shapes], dtype=np.int64)
    return lut[layers]
