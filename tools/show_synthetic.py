"""Write a PNG grid of synthetic samples with their control maps and print their captions.

Each row is one sample: image | edges | depth | segmentation (ids coloured) | edges drawn over the image.

    python tools/show_synthetic.py --num 8 --resolution 128 --out runs/synthetic.png
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image, ImageDraw

from datamodules.synthetic import CLASS_NAMES, SyntheticShapes

# Segmentation id -> RGB: black background, then one distinct colour per class.
_ID_COLOURS = np.array(
    [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
     (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)],
    dtype=np.uint8,
)  # fmt: skip


def sample_row(sample: dict) -> np.ndarray:
    """(H, 5W, 3) uint8 strip of one sample and its maps."""
    image = ((sample["image"].permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    edges = sample["control"]["edges"][0].numpy()
    depth = sample["control"]["depth"][0].numpy()
    seg = sample["control"]["segmentation"][0].numpy()
    grey = lambda a: np.repeat((a * 255).round().astype(np.uint8)[..., None], 3, axis=2)
    overlay = image.copy()
    overlay[edges > 0] = (255, 0, 255)
    return np.concatenate([image, grey(edges), grey(depth), _ID_COLOURS[seg], overlay], axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num", type=int, default=8, help="number of samples (rows)")
    parser.add_argument("--resolution", type=int, default=128, help="side in pixels, 32..256")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="first sample index")
    parser.add_argument("--flip", type=float, default=0.0, help="flip probability (checks maps follow)")
    parser.add_argument("--out", default="runs/synthetic.png", help="PNG file to write")
    args = parser.parse_args()

    data = SyntheticShapes(args.start + args.num, args.resolution, seed=args.seed, flip=args.flip)
    rows, pad = [], 4
    for i in range(args.start, args.start + args.num):
        start = time.perf_counter()
        sample = data[i]
        took = (time.perf_counter() - start) * 1e3
        print(f"[{i}] {CLASS_NAMES[sample['label']]:8s} ({took:.1f} ms) {sample['caption']}")
        rows.append(np.pad(sample_row(sample), ((0, pad), (0, 0), (0, 0)), constant_values=255))
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    draw = ImageDraw.Draw(grid)
    for i in range(args.num):
        draw.text((2, i * (args.resolution + pad) + 1), str(args.start + i), fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    print(f"wrote {args.out} ({grid.width}x{grid.height})")


if __name__ == "__main__":
    main()
